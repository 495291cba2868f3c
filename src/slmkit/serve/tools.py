"""Tool calling in chat completions: OpenAI's `tools` / `tool_choice`, a small model's calls constrained so they
always parse.

    prompt   the tools go through the model's chat template when it has a tool format (it uses a `tools`
             variable); otherwise slmkit's default, the Hermes / Qwen format most small models were tuned on: a
             system message listing the tools as JSON schemas in <tools>...</tools> and asking for
             <tool_call>{"name": ..., "arguments": {...}}</tool_call>; earlier calls are written back the same
             way and tool results as <tool_response> user turns.
    grammar  llguidance (lm/constraints.py): with tool_choice "required" or a named function the reply must be
             one call (several only when parallel_tool_calls is true: unlike OpenAI's default, because a small
             model given the choice repeats its call until max_tokens) whose JSON matches a tool's `parameters`;
             with "auto" it is either such calls or free text that does not start with "<"; "none" leaves
             the reply free and the tools out of the prompt.
    reply    the calls are parsed back into OpenAI's `tool_calls` (ids "call_...", arguments as a JSON string),
             the rest of the text is `content`, and finish_reason is "tool_calls" (protocol.Choices).
"""

from __future__ import annotations

import json
import re
import uuid

from slmkit.lm.constraints import JSON_OPTIONS
from slmkit.serve.protocol import APIError

OPEN, CLOSE = "<tool_call>", "</tool_call>"
_NAME = re.compile(r"^[A-Za-z0-9_-]{1,64}$")
DEFAULT_PROMPT = ("You may call functions (tools) to help with the user's request. The tools, as JSON schemas:\n"
                  "<tools>\n{tools}\n</tools>\n"
                  "To call a tool, reply with only this, one line per call:\n"
                  '<tool_call>{{"name": <the tool\'s name>, "arguments": <an object of its parameters>}}</tool_call>')


def check_tools(tools: list[dict], tool_choice) -> tuple[list[dict], str | None]:
    """The request's functions ({"name", "description", "parameters"}) and the forced one's name (or "required",
    "auto", "none"); a 400 naming the field for anything malformed."""
    functions = []
    for i, tool in enumerate(tools):
        if tool.get("type", "function") != "function" or not isinstance(tool.get("function"), dict):
            raise APIError(400, 'a tool is {"type": "function", "function": {"name": ..., "parameters": ...}}',
                           param=f"tools.{i}")
        fn = tool["function"]
        if not isinstance(fn.get("name"), str) or not _NAME.match(fn["name"]):
            raise APIError(400, "a function name is 1-64 letters, digits, _ or -", param=f"tools.{i}.function.name")
        params = fn.get("parameters") or {"type": "object", "properties": {}}
        if not isinstance(params, dict):
            raise APIError(400, "parameters must be a JSON schema object", param=f"tools.{i}.function.parameters")
        functions.append({"name": fn["name"], "description": fn.get("description", ""), "parameters": params})
    names = [f["name"] for f in functions]
    if len(set(names)) != len(names):
        raise APIError(400, "two tools have the same name", param="tools")
    if tool_choice is None:
        return functions, "auto"
    if isinstance(tool_choice, str):
        if tool_choice not in ("auto", "none", "required"):
            raise APIError(400, 'tool_choice is "auto", "none", "required" or {"type": "function", "function": '
                                '{"name": ...}}', param="tool_choice")
        return functions, tool_choice
    name = (tool_choice.get("function") or {}).get("name") if isinstance(tool_choice, dict) else None
    if name not in names:
        raise APIError(400, f"tool_choice names {name!r}, which is not one of the tools ({', '.join(names)})",
                       param="tool_choice")
    return functions, f"function:{name}"


def render_messages(messages: list[dict], functions: list[dict], tokenizer) -> tuple[list[dict], dict]:
    """(messages, extra template variables) for the chat template: the template's own tool format when it has
    one (it reads `tools`), else the default: a system message with the tools, calls and results as text."""
    if "tools" in (tokenizer.chat_template or ""):
        return messages, {"tools": [{"type": "function", "function": f} for f in functions]}
    out = []
    for m in messages:
        if m.get("role") == "assistant" and m.get("tool_calls"):
            calls = "\n".join(OPEN + json.dumps({"name": c["function"]["name"],
                                                 "arguments": _arguments(c["function"].get("arguments"))})
                              + CLOSE for c in m["tool_calls"])
            out.append({"role": "assistant", "content": ((m.get("content") or "") + "\n" + calls).strip()})
        elif m.get("role") == "tool":
            out.append({"role": "user", "content": f"<tool_response>\n{m.get('content', '')}\n</tool_response>"})
        else:
            out.append({k: v for k, v in m.items() if k in ("role", "content")})
    if functions:
        listing = "\n".join(json.dumps(f, ensure_ascii=False) for f in functions)
        block = DEFAULT_PROMPT.format(tools=listing)
        if out and out[0]["role"] == "system":
            out[0] = {"role": "system", "content": f"{out[0]['content']}\n\n{block}"}
        else:
            out.insert(0, {"role": "system", "content": block})
    return out, {}


def _arguments(arguments) -> dict:
    if isinstance(arguments, str):
        try:
            arguments = json.loads(arguments or "{}")
        except json.JSONDecodeError:
            return {}
    return arguments if isinstance(arguments, dict) else {}


def tool_grammar(functions: list[dict], choice: str, parallel: bool = True) -> str | None:
    """A Lark grammar (llguidance's, with %json) for the reply, or None when it is free."""
    if choice == "none" or not functions:
        return None
    chosen = [f for f in functions if choice == f"function:{f['name']}"] or functions
    rules = []
    for i, f in enumerate(chosen):
        # %json takes no compile-time defaults: the whitespace bound rides in the schema, or a weak model greedily
        # pads the call with tabs until max_tokens (a random tiny model did, every time)
        schema = {"type": "object", "properties": {"name": {"const": f["name"]}, "arguments": f["parameters"]},
                  "required": ["name", "arguments"], "additionalProperties": False, "x-guidance": JSON_OPTIONS}
        rules.append(f"tool_{i}: %json {json.dumps(schema)}")
    call = f'call: "{OPEN}" ({" | ".join(f"tool_{i}" for i in range(len(chosen)))}) "{CLOSE}"'
    calls = 'calls: call ("\\n" call)*' if parallel else "calls: call"
    start = "start: calls | free" if choice == "auto" else "start: calls"
    free = ["free: /[^<](.|\\n)*/"] if choice == "auto" else []
    return "\n".join([start, calls, call, *rules, *free])


def parse_calls(text: str) -> tuple[str | None, list[dict]]:
    """(content, tool_calls) of a reply: each <tool_call>{...}</tool_call> as OpenAI's tool call, the rest as
    content (None when nothing else was said)."""
    calls, rest, at = [], [], 0
    decoder = json.JSONDecoder()
    while True:
        start = text.find(OPEN, at)
        if start == -1:
            rest.append(text[at:])
            break
        rest.append(text[at:start])
        body = start + len(OPEN)
        while body < len(text) and text[body].isspace():  # JSON may start after whitespace (the grammar allows it)
            body += 1
        try:
            obj, end = decoder.raw_decode(text, body)
            close = text.index(CLOSE, end)
        except (json.JSONDecodeError, ValueError):  # unconstrained output that only looks like a call
            rest.append(text[start:])
            break
        if isinstance(obj, dict) and isinstance(obj.get("name"), str):
            calls.append({"id": "call_" + uuid.uuid4().hex[:24], "type": "function",
                          "function": {"name": obj["name"],
                                       "arguments": json.dumps(obj.get("arguments", {}), ensure_ascii=False)}})
        at = close + len(CLOSE)
    content = "".join(rest).strip()
    return (content or None), calls
