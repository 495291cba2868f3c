"""Tool calling through the official openai client: a random tiny model's calls always parse and match their
tool's schema (constrained), streamed and not; the prompt through the default tool format or the template's own;
OpenAI's request errors."""

import json

import openai
import pytest
from conftest import live_server, tiny_model_dir
from test_structured import MODEL, TEXT, client

from slmkit.lm import load_lm
from slmkit.serve.app import create_app
from slmkit.serve.engine import Engine
from slmkit.serve.tools import parse_calls, render_messages, tool_grammar
from slmkit.tokenizer import train_tokenizer


@pytest.fixture(scope="module")
def lm(tmp_path_factory):
    """A random tiny model (it would never write a tool call by itself) with room for the tools' prompt."""
    tok = train_tokenizer([TEXT, "café ✓ naïve"] * 30, vocab_size=300)
    return load_lm(str(tiny_model_dir(tmp_path_factory.mktemp("tools") / "m", tok, max_seq_len=2048)))


@pytest.fixture(scope="module")
def url(lm):
    engine = Engine(lm, max_batch=8, max_queue=64)
    try:
        with live_server(create_app(engine, MODEL)) as url:
            yield url
    finally:
        engine.close()

ORDER_TOOL = {"type": "function", "function": {
    "name": "get_order", "description": "Look up an order by its number",
    "parameters": {"type": "object", "properties": {"order_id": {"type": "string", "pattern": "^KB-[0-9]{6}$"}},
                   "required": ["order_id"], "additionalProperties": False}}}
RETURN_TOOL = {"type": "function", "function": {
    "name": "start_return", "parameters": {"type": "object", "properties": {
        "order_id": {"type": "string", "pattern": "^KB-[0-9]{6}$"}, "reason": {"enum": ["damaged", "unwanted"]}},
        "required": ["order_id", "reason"], "additionalProperties": False}}}
MESSAGES = [{"role": "user", "content": "Where is my order KB-204877?"}]
MAX_TOKENS = 480  # a random model pads JSON with all the whitespace the grammar allows (lm/constraints.py)


def _check_call(call):
    args = json.loads(call.function.arguments)
    assert call.id.startswith("call_") and call.type == "function"
    if call.function.name == "get_order":
        assert set(args) == {"order_id"}
    else:
        assert call.function.name == "start_return" and args["reason"] in ("damaged", "unwanted")
    assert args["order_id"].startswith("KB-") and len(args["order_id"]) == 9


@pytest.mark.parametrize("seed", range(6))
def test_required_tool_calls_parse_from_a_random_model(url, seed):
    out = client(url).chat.completions.create(model=MODEL, messages=MESSAGES, tools=[ORDER_TOOL, RETURN_TOOL],
                                              tool_choice="required", max_tokens=MAX_TOKENS, temperature=1.0,
                                              seed=seed)  # one call: parallel_tool_calls is off unless asked
    choice = out.choices[0]
    assert choice.finish_reason == "tool_calls", choice
    [call] = choice.message.tool_calls
    _check_call(call)
    assert choice.message.content is None


def test_a_greedy_random_model_finishes_its_call(url):
    # the whitespace bound must reach the tools' %json too: unbounded, greedy decoding pads with tabs for ever
    out = client(url).chat.completions.create(model=MODEL, messages=MESSAGES, tools=[ORDER_TOOL],
                                              tool_choice="required", max_tokens=MAX_TOKENS, temperature=0)
    assert out.choices[0].finish_reason == "tool_calls", out.choices[0]
    _check_call(out.choices[0].message.tool_calls[0])


def test_parallel_calls_each_parse(url):
    # a random model may go on calling until max_tokens; every complete call parses, the cut one is not a call
    out = client(url).chat.completions.create(model=MODEL, messages=MESSAGES, tools=[ORDER_TOOL, RETURN_TOOL],
                                              tool_choice="required", parallel_tool_calls=True,
                                              max_tokens=MAX_TOKENS, temperature=1.0, seed=1)
    choice = out.choices[0]
    assert choice.message.tool_calls and choice.finish_reason in ("tool_calls", "length")
    for call in choice.message.tool_calls:
        _check_call(call)


def test_named_tool_and_streamed_deltas(url):
    kw = dict(model=MODEL, messages=MESSAGES, tools=[ORDER_TOOL, RETURN_TOOL], max_tokens=MAX_TOKENS,
              temperature=1.0, parallel_tool_calls=False,
              tool_choice={"type": "function", "function": {"name": "start_return"}})
    for seed in range(3):
        whole = client(url).chat.completions.create(**kw, seed=seed)
        [call] = whole.choices[0].message.tool_calls
        assert call.function.name == "start_return"
        _check_call(call)
        # the same request streamed: the deltas add up to the same call
        calls, finish = {}, None
        for chunk in client(url).chat.completions.create(**kw, seed=seed, stream=True):
            for choice in chunk.choices:
                for d in choice.delta.tool_calls or []:
                    entry = calls.setdefault(d.index, {"id": None, "name": "", "arguments": ""})
                    entry["id"] = d.id or entry["id"]
                    entry["name"] += (d.function.name or "") if d.function else ""
                    entry["arguments"] += (d.function.arguments or "") if d.function else ""
                finish = choice.finish_reason or finish
        assert finish == "tool_calls" and len(calls) == 1
        assert calls[0]["name"] == "start_return"
        assert json.loads(calls[0]["arguments"]) == json.loads(call.function.arguments)


def test_auto_answers_text_or_a_call_and_none_answers_text(url):
    c = client(url)
    for seed in range(4):
        out = c.chat.completions.create(model=MODEL, messages=MESSAGES, tools=[ORDER_TOOL], max_tokens=40,
                                        temperature=1.0, seed=seed)
        msg = out.choices[0].message
        assert msg.tool_calls or msg.content  # one or the other, and a call always parses
        for call in msg.tool_calls or []:
            _check_call(call)
    out = c.chat.completions.create(model=MODEL, messages=MESSAGES, tools=[ORDER_TOOL], tool_choice="none",
                                    max_tokens=10, temperature=0)
    assert out.choices[0].message.tool_calls is None


def test_a_conversation_with_a_tool_result(url):
    history = MESSAGES + [
        {"role": "assistant", "content": None, "tool_calls": [{"id": "call_1", "type": "function", "function": {
            "name": "get_order", "arguments": '{"order_id": "KB-204877"}'}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": '{"status": "shipped", "eta": "Friday"}'}]
    out = client(url).chat.completions.create(model=MODEL, messages=history, tools=[ORDER_TOOL], max_tokens=8,
                                              temperature=0)
    assert out.choices[0].finish_reason in ("stop", "length", "tool_calls")


def test_default_tool_format_and_the_templates_own(lm):
    functions = [ORDER_TOOL["function"]]
    history = [{"role": "system", "content": "Be brief."}, *MESSAGES,
               {"role": "assistant", "content": None, "tool_calls": [{"id": "c", "type": "function", "function": {
                   "name": "get_order", "arguments": '{"order_id": "KB-204877"}'}}]},
               {"role": "tool", "content": "shipped"}]
    messages, extra = render_messages(history, functions, lm.tokenizer)
    assert extra == {} and messages[0]["role"] == "system" and messages[0]["content"].startswith("Be brief.")
    assert '"name": "get_order"' in messages[0]["content"] and "<tool_call>" in messages[0]["content"]
    assert messages[2] == {"role": "assistant",
                           "content": '<tool_call>{"name": "get_order", "arguments": {"order_id": "KB-204877"}}'
                                      "</tool_call>"}
    assert messages[3] == {"role": "user", "content": "<tool_response>\nshipped\n</tool_response>"}

    class NativeTools:  # a template with its own tool format gets the tools as the `tools` variable
        chat_template = "{% for t in tools %}{{ t.function.name }}{% endfor %}"
    same, extra = render_messages(history, functions, NativeTools())
    assert same is history and extra["tools"][0]["function"]["name"] == "get_order"


def test_parse_calls_and_grammar():
    content, calls = parse_calls('<tool_call>{"name": "a", "arguments": {"x": 1}}</tool_call>\n'
                                 '<tool_call>{"name": "b", "arguments": {}}</tool_call>')
    assert content is None and [c["function"]["name"] for c in calls] == ["a", "b"]
    assert json.loads(calls[0]["function"]["arguments"]) == {"x": 1}
    content, calls = parse_calls("Sure! <tool_call>{broken</tool_call>")
    assert calls == [] and content == "Sure! <tool_call>{broken</tool_call>"
    assert tool_grammar([ORDER_TOOL["function"]], "none") is None
    assert "free" in tool_grammar([ORDER_TOOL["function"]], "auto")
    assert "free" not in tool_grammar([ORDER_TOOL["function"]], "required")


@pytest.mark.parametrize("kw,param", [
    (dict(tools=[{"type": "function", "function": {"name": "bad name!"}}]), "tools.0.function.name"),
    (dict(tools=[ORDER_TOOL], tool_choice={"type": "function", "function": {"name": "nope"}}), "tool_choice"),
    (dict(tools=[ORDER_TOOL], tool_choice="sometimes"), "tool_choice"),
    (dict(tools=[ORDER_TOOL, ORDER_TOOL]), "tools"),
    (dict(tools=[ORDER_TOOL], response_format={"type": "json_object"}), "tools"),
])
def test_bad_tool_requests_are_a_400_naming_the_field(url, kw, param):
    with pytest.raises(openai.BadRequestError) as e:
        client(url).chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=4, **kw)
    assert e.value.body["param"] == param, e.value.body
