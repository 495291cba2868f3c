"""OpenAI's wire format, as the server speaks it: request bodies, response and stream-chunk shapes, errors.

Every error is answered as `{"error": {"message", "type", "param", "code"}}` (an `APIError` carries its status
and headers). Request bodies accept what OpenAI's do and ignore fields the server has no use for (frequency_penalty,
logit_bias, user, ...); `top_k`, `min_p`, `repetition_penalty` and `ignore_eos` are accepted as extensions, as
llama.cpp's and vLLM's servers do, and so are llama.cpp's `json_schema` and `grammar` beside `response_format`.
How many choices, log-probs and stop strings one request may ask for is this server's limit, checked in guard.py.
"""

from __future__ import annotations

import base64
import logging
import time
import uuid
from collections.abc import Callable
from typing import TYPE_CHECKING, Literal

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse
from pydantic import BaseModel, ConfigDict, Field
from starlette.exceptions import HTTPException as StarletteHTTPException

if TYPE_CHECKING:
    from slmkit.serve.engine import TokenEvent

log = logging.getLogger("slmkit.serve")

# --- errors ------------------------------------------------------------------------------------------------


class APIError(Exception):
    """An error answered in OpenAI's shape."""

    def __init__(self, status: int, message: str, type: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code
        self.headers = headers or {}

    def body(self) -> dict:
        return error_body(self.message, self.type, self.param, self.code)


def error_body(message: str, type: str = "invalid_request_error", param: str | None = None,
               code: str | None = None) -> dict:
    return {"error": {"message": message, "type": type, "param": param, "code": code}}


def html_page(path, what: str) -> FileResponse:
    """One of the server's pages (chat.html, agent.html beside these files), never cached by the browser."""
    if not path.exists():
        raise APIError(404, f"the {what} is not installed", code="not_found")
    return FileResponse(path, media_type="text/html", headers={"Cache-Control": "no-store"})


def error_response(e: APIError) -> JSONResponse:
    return JSONResponse(e.body(), status_code=e.status, headers=e.headers)


def add_error_handlers(app: FastAPI) -> None:
    """Answer every error `app` raises in OpenAI's shape: APIError as it says, a malformed body 400, Starlette's
    own errors (no such route, wrong method, a body past the limit) with their status, anything else 500."""

    @app.exception_handler(APIError)
    async def _api_error(request: Request, e: APIError):
        return error_response(e)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, e: RequestValidationError):
        return error_response(validation_error(e.errors()))

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, e: StarletteHTTPException):
        kind = "invalid_request_error" if e.status_code < 500 else "server_error"
        code = {404: "not_found", 405: "method_not_allowed", 413: "request_too_large"}.get(e.status_code)
        return error_response(APIError(e.status_code, str(e.detail), kind, code=code, headers=e.headers))

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, e: Exception):
        log.exception("unexpected error")
        return error_response(APIError(500, f"internal error: {type(e).__name__}: {e}", "server_error"))


def validation_error(errors) -> APIError:
    """A 400 with a readable message (and the offending field) from pydantic/FastAPI validation errors."""
    parts, param = [], None
    for err in errors:
        loc = [str(x) for x in err.get("loc", ()) if x != "body"]
        if err.get("type") == "json_invalid":
            reason = err.get("ctx", {}).get("error", "decode error")
            return APIError(400, f"the request body is not valid JSON: {reason}")
        field = ".".join(loc)
        param = param or field or None
        parts.append(f"{field}: {err.get('msg')}" if field else str(err.get("msg")))
    return APIError(400, "invalid request: " + "; ".join(parts[:5]), param=param)


# --- request bodies ----------------------------------------------------------------------------------------


class _Body(BaseModel):
    model_config = ConfigDict(extra="ignore", allow_inf_nan=False)


class StreamOptions(_Body):
    include_usage: bool = False


class JsonSchemaFormat(_Body):
    name: str = "response"
    description: str | None = None
    schema_: dict | None = Field(None, alias="schema")  # `schema` would shadow pydantic's own attribute
    strict: bool | None = None  # the output always keeps to the schema: strict or not, it is decoded under it


class ResponseFormat(_Body):
    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaFormat | None = None


class SamplingBody(_Body):
    """The fields completions and chat share. A sampling field left out (None) takes the model's default."""

    model: str | None = None
    max_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    top_k: int | None = Field(None, ge=0)  # not OpenAI's; as llama.cpp's and vLLM's servers take it
    min_p: float | None = Field(None, ge=0, le=1)  # not OpenAI's; llama.cpp's and vLLM's
    # not OpenAI's; llama.cpp's and vLLM's. Bounded: a penalty near 0 divides logits into infinities
    repetition_penalty: float | None = Field(None, ge=0.01, le=100)
    ignore_eos: bool = False  # not OpenAI's; vLLM's and llama.cpp's: generate max_tokens whatever comes
    stop: str | list[str] | None = None
    seed: int | None = Field(None, ge=-(2**63), le=2**63 - 1)
    n: int | None = Field(None, ge=1)
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    # Structured output, decoded under a grammar (slmkit.lm.constraints): OpenAI's response_format, or
    # llama.cpp's server's json_schema (a JSON schema) and grammar (GBNF, or llguidance's Lark). One at most.
    response_format: ResponseFormat | None = None
    json_schema: dict | None = None  # not OpenAI's; llama.cpp's
    grammar: str | None = None  # not OpenAI's; llama.cpp's


class CompletionBody(SamplingBody):
    prompt: str | list[str]
    logprobs: int | None = Field(None, ge=0)
    echo: bool | None = False


class ImageURL(_Body):
    url: str
    detail: str | None = None  # OpenAI's low/high/auto: one size here (the vision model's image size)


class ContentPart(_Body):
    type: str
    text: str | None = None
    image_url: ImageURL | None = None  # type "image_url": a data: URL (decode_image_url)


def decode_image_url(url: str, param: str) -> bytes:
    """The bytes of a `data:image/...;base64,...` URL; anything else (an http URL: this server fetches nothing) is
    a 400 naming the field."""
    import base64
    import binascii
    head, sep, data = url.partition(",")
    if not (sep and head.startswith("data:") and head.endswith(";base64")):
        raise APIError(400, "image_url.url must be a data: URL (data:image/png;base64,...); this server fetches "
                            "no URLs", param=param)
    try:
        return base64.b64decode(data, validate=True)
    except (binascii.Error, ValueError) as e:
        raise APIError(400, f"image_url.url: the base64 data does not decode ({e})", param=param) from e


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="allow")  # name, tool_call_id, ... reach the chat template as given
    role: str
    content: str | list[ContentPart] | None = None


class ChatBody(SamplingBody):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: bool | None = False
    top_logprobs: int | None = Field(None, ge=0)
    # tool calling (serve/tools.py): checked there, so a malformed tool is a 400 naming its field
    tools: list[dict] | None = None
    tool_choice: str | dict | None = None
    parallel_tool_calls: bool | None = None


class EmbeddingBody(_Body):
    model: str | None = None
    input: str | list[str]
    encoding_format: Literal["float", "base64"] | None = "float"
    dimensions: int | None = None


# --- responses ---------------------------------------------------------------------------------------------


def model_card(model: str, created: int) -> dict:
    return {"id": model, "object": "model", "created": created, "owned_by": "slmkit"}


def requested_adapter(requested: str | None, model_name: str, adapter_names: list[str]) -> str | None:
    """The LoRA adapter a request's `model` selects (`slm serve --adapter NAME=DIR`): MODEL:NAME or NAME; None
    (the base) for anything else; a 404 for MODEL:NAME with no such adapter."""
    if not adapter_names or requested is None:
        return None
    name = requested.removeprefix(f"{model_name}:")
    if name in adapter_names:
        return name
    if requested.startswith(f"{model_name}:"):
        raise APIError(404, f"the model {requested!r} does not exist; the adapters served are "
                            f"{', '.join(f'{model_name}:{a}' for a in adapter_names)}",
                       param="model", code="model_not_found")
    return None


def embeddings_response(vectors, encoding_format: str | None, model: str, prompt_tokens: int) -> dict:
    """`vectors`: (n, dim) float32 numpy; base64 is their little-endian float32 bytes, as OpenAI's are."""
    data = []
    for i, v in enumerate(vectors):
        embedding = (base64.b64encode(v.astype("<f4").tobytes()).decode() if encoding_format == "base64"
                     else v.tolist())
        data.append({"object": "embedding", "index": i, "embedding": embedding})
    return {"object": "list", "data": data, "model": model,
            "usage": {"prompt_tokens": prompt_tokens, "total_tokens": prompt_tokens}}


class Choices:
    """Collects the events of all choices of one HTTP request into OpenAI's response, or its stream chunks.

    Event `ev` of prompt `i` belongs to choice `i * n + ev.index` (n choices per prompt, prompts in order).
    """

    def __init__(self, tokenizer, model: str, chat: bool, n: int, n_choices: int, logprobs: bool,
                 prompt_tokens: int, include_usage: bool, tools: bool = False,
                 annotate: Callable[[str | None], dict] | None = None,
                 append: Callable[[str], str] | None = None):
        self.tokenizer, self.model, self.chat, self.n = tokenizer, model, chat, n
        # the "slmkit" field of a one-choice reply, from its text (None: before the text, in the first chunk):
        # the cascade's decision (escalate.py), the knowledge base's sources and citations (kb.py)
        self.annotate = annotate
        # text added to a choice when it finishes, from what it generated (kb.py: the sources' quote after the
        # model's answer); streamed as one more content delta before the finish
        self.append = append
        # with tools, a reply that opens with <tool_call> is held back and sent as tool_calls (serve/tools.py)
        self.tools = tools
        self.mode: list[str | None] = [None] * n_choices  # None: undecided, "content" or "call"
        self.logprobs, self.prompt_tokens, self.include_usage = logprobs, prompt_tokens, include_usage
        self.id = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex
        self.created = int(time.time())
        self.texts = [""] * n_choices
        self.appended = [""] * n_choices
        self.finish: list[str | None] = [None] * n_choices
        self.tokens: list[list[tuple[str, float, dict]]] = [[] for _ in range(n_choices)]
        self.offsets = [0] * n_choices  # text_offset of the next token (completions' logprobs)
        self.completion_tokens = 0
        self.first_token_at: float | None = None

    def add(self, i: int, ev: TokenEvent) -> tuple[int, tuple[str, float, dict] | None]:
        c = i * self.n + ev.index
        self.texts[c] += ev.text
        if ev.finish_reason:
            self.finish[c] = ev.finish_reason
            if self.append is not None:
                self.appended[c] = self.append(self.texts[c])
                self.texts[c] += self.appended[c]
        token = None
        if ev.token_id is not None:
            self.completion_tokens += 1
            if self.first_token_at is None:
                self.first_token_at = time.perf_counter()
            if self.logprobs and ev.logprob is not None:
                token = (self.tokenizer.decode([ev.token_id]), ev.logprob, ev.top_logprobs or {})
                self.tokens[c].append(token)
        return c, token

    def usage(self) -> dict:
        return {"prompt_tokens": self.prompt_tokens, "completion_tokens": self.completion_tokens,
                "total_tokens": self.prompt_tokens + self.completion_tokens}

    # --- logprobs in the two formats ---

    @staticmethod
    def _chat_logprobs(tokens: list[tuple[str, float, dict]]) -> dict:
        def entry(text: str, logprob: float) -> dict:
            return {"token": text, "logprob": logprob, "bytes": list(text.encode("utf-8"))}
        return {"content": [{**entry(t, lp), "top_logprobs": [entry(k, v) for k, v in top.items()]}
                            for t, lp, top in tokens], "refusal": None}

    @staticmethod
    def _completion_logprobs(tokens: list[tuple[str, float, dict]], start: int) -> dict:
        offsets, at = [], start
        for t, _, _ in tokens:
            offsets.append(at)
            at += len(t)
        return {"tokens": [t for t, _, _ in tokens], "token_logprobs": [lp for _, lp, _ in tokens],
                "top_logprobs": [top for _, _, top in tokens], "text_offset": offsets}

    # --- whole responses ---

    def response(self) -> dict:
        choices = []
        for c, text in enumerate(self.texts):
            if self.chat and self.tools:
                from slmkit.serve.tools import parse_calls
                content, calls = parse_calls(text)
                message = {"role": "assistant", "content": content, "refusal": None}
                if calls:
                    message["tool_calls"] = calls
                choice = {"index": c, "message": message,
                          "logprobs": self._chat_logprobs(self.tokens[c]) if self.logprobs else None}
                finish = "tool_calls" if calls and self.finish[c] == "stop" else self.finish[c]
                choices.append({**choice, "finish_reason": finish})
                continue
            if self.chat:
                choice = {"index": c, "message": {"role": "assistant", "content": text, "refusal": None},
                          "logprobs": self._chat_logprobs(self.tokens[c]) if self.logprobs else None}
            else:
                choice = {"index": c, "text": text,
                          "logprobs": self._completion_logprobs(self.tokens[c], 0) if self.logprobs else None}
            choices.append({**choice, "finish_reason": self.finish[c]})
        response = {"id": self.id, "object": "chat.completion" if self.chat else "text_completion",
                    "created": self.created, "model": self.model, "system_fingerprint": None, "choices": choices,
                    "usage": self.usage()}
        if self.annotate is not None:
            response["slmkit"] = self.annotate(self.texts[0])
        return response

    # --- stream chunks ---

    def _chunk(self, choices: list[dict]) -> dict:
        chunk = {"id": self.id, "object": "chat.completion.chunk" if self.chat else "text_completion",
                 "created": self.created, "model": self.model, "system_fingerprint": None, "choices": choices}
        if self.include_usage:
            chunk["usage"] = None
        return chunk

    def stream_start(self) -> list[dict]:
        if not self.chat:
            return []
        chunks = [self._chunk([{"index": c, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                                "finish_reason": None}]) for c in range(len(self.texts))]
        if self.annotate is not None:
            chunks[0]["slmkit"] = self.annotate(None)
        return chunks

    def finish_chunk(self, c: int, finish_reason: str) -> dict:
        chunk = self._chunk([{"index": c, "delta": {}, "logprobs": None, "finish_reason": finish_reason}])
        if self.annotate is not None:
            chunk["slmkit"] = self.annotate(self.texts[c])
        return chunk

    def stream_event(self, i: int, ev: TokenEvent) -> list[dict]:
        start = self.offsets[i * self.n + ev.index]
        c, token = self.add(i, ev)
        if token is not None:
            self.offsets[c] += len(token[0])
        if not (ev.text or token or ev.finish_reason):
            return []  # text held back (a possible stop string, a partial character): nothing to say yet
        if self.chat and self.tools and self.mode[c] != "content":
            return self._tool_event(c, ev)
        if self.chat:
            logprobs = self._chat_logprobs([token]) if token else None
            chunks = []
            if ev.text or token:
                chunks.append(self._chunk([{"index": c, "delta": {"content": ev.text}, "logprobs": logprobs,
                                            "finish_reason": None}]))
            if ev.finish_reason and self.appended[c]:
                chunks.append(self._chunk([{"index": c, "delta": {"content": self.appended[c]}, "logprobs": None,
                                            "finish_reason": None}]))
            if ev.finish_reason:
                chunks.append(self.finish_chunk(c, ev.finish_reason))
            return chunks
        logprobs = self._completion_logprobs([token], start) if token else None
        return [self._chunk([{"index": c, "text": ev.text, "logprobs": logprobs,
                              "finish_reason": ev.finish_reason}])]

    def _tool_event(self, c: int, ev: TokenEvent) -> list[dict]:
        """Stream chunks for a choice that may be a tool call: held until its text can no longer open with
        <tool_call> (then sent as content, and the rest streams as usual), or, for a call, until it ends: then
        OpenAI's tool_calls deltas (each call's id, type and name, then its arguments) and finish "tool_calls"."""
        from slmkit.serve.tools import OPEN, parse_calls
        text = self.texts[c].lstrip()
        if self.mode[c] is None:
            if text.startswith(OPEN):
                self.mode[c] = "call"
            elif not OPEN.startswith(text) or ev.finish_reason:
                self.mode[c] = "content"
                chunks = [self._chunk([{"index": c, "delta": {"content": self.texts[c]}, "logprobs": None,
                                        "finish_reason": None}])] if self.texts[c] else []
                if ev.finish_reason:
                    chunks.append(self.finish_chunk(c, ev.finish_reason))
                return chunks
        if not ev.finish_reason:
            return []
        content, calls = parse_calls(self.texts[c])
        chunks = []
        for k, call in enumerate(calls):
            fn = call["function"]
            chunks.append(self._chunk([{"index": c, "delta": {"tool_calls": [
                {"index": k, "id": call["id"], "type": "function", "function": {"name": fn["name"], "arguments": ""}}]},
                "logprobs": None, "finish_reason": None}]))
            chunks.append(self._chunk([{"index": c, "delta": {"tool_calls": [
                {"index": k, "function": {"arguments": fn["arguments"]}}]}, "logprobs": None, "finish_reason": None}]))
        if content:
            chunks.append(self._chunk([{"index": c, "delta": {"content": content}, "logprobs": None,
                                        "finish_reason": None}]))
        finish = "tool_calls" if calls and ev.finish_reason == "stop" else ev.finish_reason
        chunks.append(self.finish_chunk(c, finish))
        return chunks

    def stream_end(self) -> list[dict]:
        if not self.include_usage:
            return []
        return [{**self._chunk([]), "usage": self.usage()}]
