"""`slm serve`: an OpenAI-compatible HTTP server over the generation `Engine`.

    GET  /                      the chat page (chat.html beside this file)
    GET  /v1/models             the one model served, in OpenAI's list shape
    POST /v1/completions        text completions: prompt (one string or a list), n, seed, stop, logprobs, stream
    POST /v1/chat/completions   chat: messages through the model's chat template; logprobs, stream
    POST /v1/embeddings         mean-pooled, L2-normalised final hidden states (slmkit's own model only)
    GET  /health                ok, the model, the queue depth
    GET  /metrics               Prometheus text format: requests, tokens, latency and time to first token

Any OpenAI client works against it (`OpenAI(base_url="http://127.0.0.1:8000/v1", api_key=...)`). Every error
is answered in OpenAI's shape, `{"error": {"message", "type", "param", "code"}}`:

    401  an /v1 route without `Authorization: Bearer KEY` when the server has a key (compared in constant time)
    400  malformed JSON, a field of the wrong type or out of range, prompt + max_tokens beyond the context
    413  a body larger than max_body_bytes
    429  the engine's queue is full (with Retry-After)
    504  the request ran past request_timeout_s (a stream gets an error event instead, then closes)

A client that disconnects, streaming or not, cancels its generation; the engine frees its rows at the next token.
The request's `model` field is not checked (the one model answers). Sampling fields the engine has no use for
(frequency_penalty, logit_bias, user, ...) are ignored; `top_k` and `ignore_eos` are accepted as extensions,
like llama.cpp's and vLLM's servers do. /health, /metrics and the chat page need no key.
"""

from __future__ import annotations

import asyncio
import base64
import hmac
import json
import logging
import math
import os
import time
import uuid
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Literal

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, Response, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field
from starlette.exceptions import HTTPException as StarletteHTTPException

from slmkit.chat import stop_strings
from slmkit.lm import generation_backend
from slmkit.sampling import SamplingParams
from slmkit.serve.engine import Engine, GenerationRequest, PromptTooLong, QueueFull, TokenEvent

log = logging.getLogger("slmkit.serve")

CHAT_PAGE = Path(__file__).with_name("chat.html")
MAX_N = 16  # choices per prompt
MAX_LOGPROBS = 20  # top-k alternatives per token
MAX_STOP = 16  # stop strings per request
MAX_EMBED_INPUTS = 2048
ROUTES = ("/", "/health", "/metrics", "/v1/models", "/v1/models/{model}", "/v1/completions",
          "/v1/chat/completions", "/v1/embeddings")
LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0)
TTFT_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)


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


def _error_response(e: APIError) -> JSONResponse:
    return JSONResponse(e.body(), status_code=e.status, headers=e.headers)


def _validation_message(errors) -> tuple[str, str | None]:
    """A readable message (and the offending field) from pydantic/FastAPI validation errors."""
    parts, param = [], None
    for err in errors:
        loc = [str(x) for x in err.get("loc", ()) if x != "body"]
        if err.get("type") == "json_invalid":
            return f"the request body is not valid JSON: {err.get('ctx', {}).get('error', 'decode error')}", None
        field = ".".join(loc)
        param = param or field or None
        parts.append(f"{field}: {err.get('msg')}" if field else str(err.get("msg")))
    return "invalid request: " + "; ".join(parts[:5]), param


# --- request bodies ----------------------------------------------------------------------------------------

class _Body(BaseModel):
    model_config = ConfigDict(extra="ignore", allow_inf_nan=False)


class StreamOptions(_Body):
    include_usage: bool = False


class _Sampling(_Body):
    model: str | None = None
    max_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    top_k: int | None = Field(None, ge=0)  # not OpenAI's; as llama.cpp's and vLLM's servers take it
    ignore_eos: bool = False  # not OpenAI's; vLLM's and llama.cpp's: generate max_tokens whatever comes
    stop: str | list[str] | None = None
    seed: int | None = Field(None, ge=-(2**63), le=2**63 - 1)
    n: int | None = Field(None, ge=1, le=MAX_N)
    stream: bool | None = False
    stream_options: StreamOptions | None = None


class CompletionBody(_Sampling):
    prompt: str | list[str]
    logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS)
    echo: bool | None = False


class ContentPart(_Body):
    type: str
    text: str | None = None


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="allow")  # name, tool_call_id, ... reach the chat template as given
    role: str
    content: str | list[ContentPart] | None = None


class ChatBody(_Sampling):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: bool | None = False
    top_logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS)


class EmbeddingBody(_Body):
    model: str | None = None
    input: str | list[str]
    encoding_format: Literal["float", "base64"] | None = "float"
    dimensions: int | None = None


# --- metrics -----------------------------------------------------------------------------------------------

class _Histogram:
    def __init__(self, buckets: tuple[float, ...]):
        self.buckets = buckets
        self.counts = [0] * len(buckets)  # per bucket, not cumulative
        self.sum = 0.0
        self.count = 0

    def observe(self, value: float) -> None:
        for i, bound in enumerate(self.buckets):
            if value <= bound:
                self.counts[i] += 1
                break
        self.sum += value
        self.count += 1

    def lines(self, name: str, labels: str) -> list[str]:
        sep = "," if labels else ""
        out, total = [], 0
        for bound, n in zip(self.buckets, self.counts, strict=True):
            total += n
            out.append(f'{name}_bucket{{{labels}{sep}le="{bound:g}"}} {total}')
        out.append(f'{name}_bucket{{{labels}{sep}le="+Inf"}} {self.count}')
        braces = f"{{{labels}}}" if labels else ""
        out += [f"{name}_sum{braces} {self.sum:.6f}", f"{name}_count{braces} {self.count}"]
        return out


def _label(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


class Metrics:
    """Counters, gauges and histograms, rendered by hand in Prometheus' text exposition format (0.0.4)."""

    def __init__(self):
        self.requests: dict[tuple[str, int], int] = {}
        self.latency: dict[str, _Histogram] = {}
        self.ttft = _Histogram(TTFT_BUCKETS)
        self.active = 0

    def observe_request(self, route: str, status: int, seconds: float) -> None:
        self.requests[(route, status)] = self.requests.get((route, status), 0) + 1
        self.latency.setdefault(route, _Histogram(LATENCY_BUCKETS)).observe(seconds)

    def render(self, engine: Engine) -> str:
        stats = engine.stats
        lines: list[str] = []

        def family(name: str, kind: str, help: str) -> None:
            lines.extend([f"# HELP {name} {help}", f"# TYPE {name} {kind}"])

        family("slmkit_requests_total", "counter", "HTTP requests answered, by route and status code.")
        for (route, status), n in sorted(self.requests.items()):
            lines.append(f'slmkit_requests_total{{route="{_label(route)}",status="{status}"}} {n}')
        family("slmkit_prompt_tokens_total", "counter", "Prompt tokens prefilled (once per choice).")
        lines.append(f"slmkit_prompt_tokens_total {stats.prompt_tokens_total}")
        family("slmkit_completion_tokens_total", "counter", "Tokens generated.")
        lines.append(f"slmkit_completion_tokens_total {stats.completion_tokens_total}")
        family("slmkit_engine_busy_seconds_total", "counter", "Seconds the engine spent prefilling and decoding.")
        lines.append(f"slmkit_engine_busy_seconds_total {stats.busy_seconds:.6f}")
        family("slmkit_request_seconds", "histogram", "Time from request to the end of its response, by route.")
        for route, hist in sorted(self.latency.items()):
            lines.extend(hist.lines("slmkit_request_seconds", f'route="{_label(route)}"'))
        family("slmkit_time_to_first_token_seconds", "histogram",
               "Time from a generation request to its first generated token.")
        lines.extend(self.ttft.lines("slmkit_time_to_first_token_seconds", ""))
        family("slmkit_queue_depth", "gauge", "Requests waiting for the engine to admit them.")
        lines.append(f"slmkit_queue_depth {engine.queue_depth}")
        family("slmkit_requests_active", "gauge", "/v1 requests being answered now.")
        lines.append(f"slmkit_requests_active {self.active}")
        return "\n".join(lines) + "\n"


# --- the guard: API key, body size, metrics (plain ASGI, so it runs before any body is read) ----------------

class _Guard:
    def __init__(self, app, api_key: str | None, max_body_bytes: int, metrics: Metrics):
        self.app = app
        self.expected = b"Bearer " + api_key.encode() if api_key else None
        self.max_body_bytes = max_body_bytes
        self.metrics = metrics

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        path = scope["path"]
        route = path if path in ROUTES else "/v1/models/{model}" if path.startswith("/v1/models/") else "other"
        api = path.startswith("/v1/")
        status, start = [500], time.perf_counter()

        async def send_status(message):
            if message["type"] == "http.response.start":
                status[0] = message["status"]
            await send(message)

        self.metrics.active += api
        try:
            headers = dict(scope["headers"])
            if api and self.expected is not None and not self._authorized(headers.get(b"authorization")):
                error = APIError(401, "missing or incorrect API key: send it as 'Authorization: Bearer KEY'",
                                 code="invalid_api_key", headers={"WWW-Authenticate": "Bearer"})
                return await _error_response(error)(scope, receive, send_status)
            length = headers.get(b"content-length")
            if length is not None and (not length.isdigit() or int(length) > self.max_body_bytes):
                await self._drain(receive, int(length) if length.isdigit() else 0)
                return await _error_response(self._too_large())(scope, receive, send_status)
            await self.app(scope, self._limited(receive), send_status)
        finally:
            self.metrics.active -= api
            self.metrics.observe_request(route, status[0], time.perf_counter() - start)

    def _authorized(self, header: bytes | None) -> bool:
        if header is None:
            return False
        scheme, _, token = header.partition(b" ")
        return hmac.compare_digest(b"Bearer " + token.strip(), self.expected) and scheme.lower() == b"bearer"

    def _too_large(self) -> APIError:
        return APIError(413, f"the request body exceeds the server's limit of {self.max_body_bytes} bytes",
                        code="request_too_large")

    def _limited(self, receive):
        received = 0

        async def limited():
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_body_bytes:
                    if message.get("more_body"):
                        await self._drain(receive, received)
                    raise StarletteHTTPException(413, self._too_large().message)
            return message

        return limited

    async def _drain(self, receive, size: int) -> None:
        """Read and drop the body, so the client sees the 413 instead of a reset connection (up to a bound)."""
        if size > 16 * self.max_body_bytes:
            return  # too much to read: answer now, the connection closes
        total = 0
        while total <= 16 * self.max_body_bytes:
            message = await receive()
            if message["type"] != "http.request" or not message.get("more_body"):
                return
            total += len(message.get("body", b""))


# --- generation --------------------------------------------------------------------------------------------

def _submit_all(engine: Engine, requests: list[GenerationRequest], what: str) -> list:
    """Submit every request, or none: a refusal cancels those already queued."""
    pendings = []
    try:
        for r in requests:
            pendings.append(engine.submit(r))
    except BaseException as e:
        for p in pendings:
            p.cancelled = True
        if isinstance(e, QueueFull):
            raise APIError(429, str(e), type="rate_limit_error", code="rate_limit_exceeded",
                           headers={"Retry-After": str(max(1, math.ceil(e.retry_after)))}) from e
        if isinstance(e, PromptTooLong):
            raise APIError(400, str(e), param=what, code="context_length_exceeded") from e
        if isinstance(e, ValueError):
            raise APIError(400, str(e), param=what) from e
        if isinstance(e, RuntimeError):
            raise APIError(503, str(e), type="server_error") from e
        raise
    return pendings


async def _merged(pendings: list, deadline: float) -> AsyncIterator[tuple[int, TokenEvent]]:
    """(request index, event) for every choice of every submitted request, as they come, until all have finished.

    Raises TimeoutError at `deadline` (loop time) and the engine's error if a request failed. Closing the
    generator, or its end, marks every request cancelled: the engine frees their rows at the next token.
    (This is `Engine.generate` for requests submitted beforehand, so refusals come before a stream starts.)
    """
    out: asyncio.Queue = asyncio.Queue()

    async def pump(i: int, pending) -> None:
        while True:
            event = await pending.events.get()
            out.put_nowait((i, event))
            if event is None or isinstance(event, BaseException):
                return

    tasks = [asyncio.ensure_future(pump(i, p)) for i, p in enumerate(pendings)] if len(pendings) > 1 else []
    try:
        remaining = len(pendings)
        while remaining:
            async with asyncio.timeout_at(deadline):
                i, event = await out.get() if tasks else (0, await pendings[0].events.get())
            if event is None:
                remaining -= 1
            elif isinstance(event, BaseException):
                raise event
            else:
                yield i, event
    finally:
        for p in pendings:
            p.cancelled = True
        for t in tasks:
            t.cancel()


class _Choices:
    """Collects the events of all choices of one HTTP request into OpenAI's response, or its stream chunks."""

    def __init__(self, tokenizer, model: str, chat: bool, n: int, n_choices: int, logprobs: bool,
                 prompt_tokens: int, include_usage: bool):
        self.tokenizer, self.model, self.chat, self.n = tokenizer, model, chat, n
        self.logprobs, self.prompt_tokens, self.include_usage = logprobs, prompt_tokens, include_usage
        self.id = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex
        self.created = int(time.time())
        self.texts = [""] * n_choices
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

    def _completion_logprobs(self, c: int, tokens: list[tuple[str, float, dict]], start: int) -> dict:
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
            if self.chat:
                choice = {"index": c, "message": {"role": "assistant", "content": text, "refusal": None},
                          "logprobs": self._chat_logprobs(self.tokens[c]) if self.logprobs else None}
            else:
                choice = {"index": c, "text": text,
                          "logprobs": self._completion_logprobs(c, self.tokens[c], 0) if self.logprobs else None}
            choices.append({**choice, "finish_reason": self.finish[c]})
        return {"id": self.id, "object": "chat.completion" if self.chat else "text_completion",
                "created": self.created, "model": self.model, "system_fingerprint": None, "choices": choices,
                "usage": self.usage()}

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
        return [self._chunk([{"index": c, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                              "finish_reason": None}]) for c in range(len(self.texts))]

    def stream_event(self, i: int, ev: TokenEvent) -> list[dict]:
        start = self.offsets[i * self.n + ev.index]
        c, token = self.add(i, ev)
        if token is not None:
            self.offsets[c] += len(token[0])
        if not (ev.text or token or ev.finish_reason):
            return []  # text held back (a possible stop string, a partial character): nothing to say yet
        if self.chat:
            logprobs = self._chat_logprobs([token]) if token else None
            chunks = []
            if ev.text or token:
                chunks.append(self._chunk([{"index": c, "delta": {"content": ev.text}, "logprobs": logprobs,
                                            "finish_reason": None}]))
            if ev.finish_reason:
                chunks.append(self._chunk([{"index": c, "delta": {}, "logprobs": None,
                                            "finish_reason": ev.finish_reason}]))
            return chunks
        logprobs = self._completion_logprobs(c, [token], start) if token else None
        return [self._chunk([{"index": c, "text": ev.text, "logprobs": logprobs,
                              "finish_reason": ev.finish_reason}])]

    def stream_end(self) -> list[dict]:
        if not self.include_usage:
            return []
        return [{**self._chunk([]), "usage": self.usage()}]


def _sse(obj: dict) -> bytes:
    return b"data: " + json.dumps(obj, ensure_ascii=False, separators=(",", ":")).encode() + b"\n\n"


class _EventStream(StreamingResponse):
    """A server-sent-events response that always closes its generator (and so cancels its generation): at its
    end, on a client disconnect, or if it never started."""

    def __init__(self, content: AsyncIterator[bytes], on_close: Callable[[], None]):
        super().__init__(content, media_type="text/event-stream",
                         headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        self.on_close = on_close

    async def __call__(self, scope, receive, send):
        try:
            await super().__call__(scope, receive, send)
        finally:
            await self.body_iterator.aclose()
            self.on_close()


async def _wait_disconnect(request: Request) -> None:
    while (await request.receive())["type"] != "http.disconnect":
        pass


# --- the app -----------------------------------------------------------------------------------------------

class _Server:
    def __init__(self, engine: Engine, model_name: str, request_timeout_s: float, metrics: Metrics):
        self.engine, self.model_name, self.timeout, self.metrics = engine, model_name, request_timeout_s, metrics
        self.created = int(time.time())

    def sampling(self, body: _Sampling, max_tokens: int, extra_stop: list[str] = ()) -> SamplingParams:
        stops = [body.stop] if isinstance(body.stop, str) else list(body.stop or [])
        stops = [s for s in stops if s]
        if len(stops) > MAX_STOP:
            raise APIError(400, f"at most {MAX_STOP} stop strings", param="stop")
        stops += [s for s in extra_stop if s and s not in stops]
        temperature = 1.0 if body.temperature is None else body.temperature
        try:
            return SamplingParams(max_new_tokens=max_tokens, temperature=temperature if temperature >= 1e-5 else 0.0,
                                  top_p=1.0 if body.top_p is None else body.top_p, top_k=body.top_k or 0,
                                  stop=stops, seed=body.seed, stop_at_eos=not body.ignore_eos)
        except ValueError as e:
            raise APIError(400, str(e)) from e

    async def generate(self, request: Request, body: _Sampling, prompts: list[list[int]], params: SamplingParams,
                       logprobs: int | None, chat: bool, what: str) -> Response:
        t0 = time.perf_counter()
        n = body.n or 1
        requests = [GenerationRequest(ids, params, n=n, logprobs=logprobs) for ids in prompts]
        pendings = _submit_all(self.engine, requests, what)
        deadline = asyncio.get_running_loop().time() + self.timeout
        choices = _Choices(self.engine.tokenizer, self.model_name, chat, n, n * len(prompts), logprobs is not None,
                           sum(len(p) for p in prompts),
                           bool(body.stream and body.stream_options and body.stream_options.include_usage))

        def record_ttft() -> None:
            if choices.first_token_at is not None:
                self.metrics.ttft.observe(choices.first_token_at - t0)

        if body.stream:
            async def events() -> AsyncIterator[bytes]:
                merged = _merged(pendings, deadline)
                try:
                    for chunk in choices.stream_start():
                        yield _sse(chunk)
                    async for i, ev in merged:
                        for chunk in choices.stream_event(i, ev):
                            yield _sse(chunk)
                    for chunk in choices.stream_end():
                        yield _sse(chunk)
                    yield b"data: [DONE]\n\n"
                except TimeoutError:
                    yield _sse(error_body(f"the request ran past the server's limit of {self.timeout:g} s",
                                          "timeout_error", code="timeout"))
                except Exception as e:  # the engine failed this request; the others go on
                    log.exception("generation failed")
                    yield _sse(error_body(f"generation failed: {e}", "server_error"))
                finally:
                    await merged.aclose()
                    record_ttft()

            def cancel() -> None:
                for p in pendings:
                    p.cancelled = True

            return _EventStream(events(), on_close=cancel)

        async def collect() -> None:
            async for i, ev in _merged(pendings, deadline):
                choices.add(i, ev)

        work = asyncio.ensure_future(collect())
        watch = asyncio.ensure_future(_wait_disconnect(request))
        try:
            await asyncio.wait({work, watch}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            watch.cancel()
            if not work.done():  # the client left (or the server is stopping): stop generating for it
                work.cancel()
                for p in pendings:
                    p.cancelled = True
        record_ttft()
        if not work.done():
            await asyncio.wait({work})  # let it finish cancelling
            return Response(status_code=499)  # nginx's "client closed request"; nobody reads it
        try:
            work.result()
        except TimeoutError:
            raise APIError(504, f"the request ran past the server's limit of {self.timeout:g} s",
                           type="timeout_error", code="timeout") from None
        except Exception as e:
            log.exception("generation failed")
            raise APIError(500, f"generation failed: {e}", type="server_error") from e
        return JSONResponse(choices.response())

    async def completions(self, request: Request, body: CompletionBody) -> Response:
        if body.echo:
            raise APIError(400, "echo=true is not supported: the response holds only the completion; prepend the "
                                "prompt yourself", param="echo")
        prompts = [body.prompt] if isinstance(body.prompt, str) else body.prompt
        if not prompts:
            raise APIError(400, "prompt must be a string or a non-empty list of strings", param="prompt")
        lm = self.engine.lm
        ids = [lm.encode_prompt(p) for p in prompts]
        params = self.sampling(body, 16 if body.max_tokens is None else body.max_tokens)
        return await self.generate(request, body, ids, params, body.logprobs, chat=False, what="prompt")

    async def chat(self, request: Request, body: ChatBody) -> Response:
        tok = self.engine.tokenizer
        if tok.chat_template is None:
            raise APIError(400, "this model's tokenizer has no chat template; use /v1/completions",
                           param="messages")
        messages = []
        for i, m in enumerate(body.messages):
            message = m.model_dump(exclude_none=True)
            if isinstance(m.content, list):
                if any(p.type != "text" or p.text is None for p in m.content):
                    raise APIError(400, "only text content parts are supported", param=f"messages.{i}.content")
                message["content"] = "".join(p.text for p in m.content)
            message.setdefault("content", "")
            messages.append(message)
        try:
            text = tok.apply_chat_template(messages, add_generation_prompt=True)
        except Exception as e:  # the template's raise_exception (e.g. roles must alternate), a missing field
            raise APIError(400, f"the chat template rejected the messages: {e}", param="messages") from e
        ids = self.engine.lm.encode_prompt(text)
        if body.top_logprobs is not None and not body.logprobs:
            raise APIError(400, "top_logprobs needs logprobs=true", param="top_logprobs")
        max_tokens = body.max_completion_tokens or body.max_tokens or max(1, self.engine.max_length - len(ids))
        params = self.sampling(body, max_tokens, stop_strings(tok))
        logprobs = (body.top_logprobs or 0) if body.logprobs else None
        return await self.generate(request, body, [ids], params, logprobs, chat=True, what="messages")

    async def embeddings(self, body: EmbeddingBody) -> Response:
        """Mean-pooled final hidden states, L2-normalised.

        Each input is encoded as a prompt (with the bos token when the model uses one), run through slmkit's
        Transformer once, and its final-norm hidden states (after the last layer and norm, before the output
        head) are averaged over all its positions, then scaled to unit length: one `dim`-sized vector per
        input, whose dot products are cosine similarities. Only slmkit's own model (TorchLM) exposes hidden
        states; other backends answer 400.
        """
        from slmkit.lm.torch_lm import TorchLM
        lm = self.engine.lm
        if not isinstance(lm, TorchLM):
            raise APIError(400, f"embeddings need slmkit's own model (backend torch), not {type(lm).__name__}",
                           param="model")
        inputs = [body.input] if isinstance(body.input, str) else body.input
        if not inputs or len(inputs) > MAX_EMBED_INPUTS:
            raise APIError(400, f"input must be a string or a list of 1 to {MAX_EMBED_INPUTS} strings",
                           param="input")
        dim = lm.model.cfg.dim
        if body.dimensions is not None and body.dimensions != dim:
            raise APIError(400, f"this model's embeddings have {dim} dimensions", param="dimensions")
        ids = [lm.encode_prompt(text) for text in inputs]
        for i, x in enumerate(ids):
            if not x:
                raise APIError(400, f"input {i} is empty", param="input")
            if len(x) > self.engine.max_length:
                raise APIError(400, f"input {i} has {len(x)} tokens, more than the model's context of "
                                    f"{self.engine.max_length} tokens", param="input",
                               code="context_length_exceeded")
        try:
            async with asyncio.timeout(self.timeout):
                vectors = await asyncio.to_thread(_embed, lm.model, ids)
        except TimeoutError:
            raise APIError(504, f"the request ran past the server's limit of {self.timeout:g} s",
                           type="timeout_error", code="timeout") from None
        data = []
        for i, v in enumerate(vectors):
            embedding = (base64.b64encode(v.astype("<f4").tobytes()).decode() if body.encoding_format == "base64"
                         else v.tolist())
            data.append({"object": "embedding", "index": i, "embedding": embedding})
        n_tokens = sum(len(x) for x in ids)
        return JSONResponse({"object": "list", "data": data, "model": self.model_name,
                             "usage": {"prompt_tokens": n_tokens, "total_tokens": n_tokens}})


def _embed(model, ids: list[list[int]]):
    import torch
    device = next(model.parameters()).device
    out = []
    with torch.no_grad():
        for x in ids:
            h = model.hidden_states(torch.tensor([x], device=device))[0].float().mean(dim=0)
            out.append(torch.nn.functional.normalize(h, dim=0).cpu().numpy())
    return out


def create_app(engine: Engine, model_name: str, api_key: str | None = None, max_body_bytes: int = 1_000_000,
               request_timeout_s: float = 300.0) -> FastAPI:
    """The OpenAI-compatible app over `engine` (see the module docstring); `api_key` guards every /v1 route."""
    metrics = Metrics()
    server = _Server(engine, model_name, request_timeout_s, metrics)
    app = FastAPI(title="slmkit", docs_url=None, redoc_url=None, openapi_url=None)
    app.state.server = server
    app.add_middleware(_Guard, api_key=api_key, max_body_bytes=max_body_bytes, metrics=metrics)

    @app.exception_handler(APIError)
    async def _api_error(request: Request, e: APIError):
        return _error_response(e)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, e: RequestValidationError):
        message, param = _validation_message(e.errors())
        return _error_response(APIError(400, message, param=param))

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, e: StarletteHTTPException):
        kind = "invalid_request_error" if e.status_code < 500 else "server_error"
        code = {404: "not_found", 405: "method_not_allowed", 413: "request_too_large"}.get(e.status_code)
        return _error_response(APIError(e.status_code, str(e.detail), kind, code=code, headers=e.headers))

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, e: Exception):
        log.exception("unexpected error")
        return _error_response(APIError(500, f"internal error: {type(e).__name__}: {e}", "server_error"))

    @app.get("/", include_in_schema=False)
    async def chat_page():
        if not CHAT_PAGE.exists():
            raise APIError(404, "the chat page is not installed", code="not_found")
        return FileResponse(CHAT_PAGE, media_type="text/html", headers={"Cache-Control": "no-store"})

    @app.get("/health")
    async def health():
        return {"status": "ok", "model": model_name, "queue_depth": engine.queue_depth,
                "requests_active": metrics.active}

    @app.get("/metrics")
    async def prometheus():
        return Response(metrics.render(engine), media_type="text/plain; version=0.0.4; charset=utf-8")

    def model_card() -> dict:
        return {"id": model_name, "object": "model", "created": server.created, "owned_by": "slmkit"}

    @app.get("/v1/models")
    async def list_models():
        return {"object": "list", "data": [model_card()]}

    @app.get("/v1/models/{model:path}")
    async def get_model(model: str):
        if model != model_name:
            raise APIError(404, f"the model {model!r} does not exist; this server serves {model_name!r}",
                           param="model", code="model_not_found")
        return model_card()

    @app.post("/v1/completions")
    async def completions(request: Request, body: CompletionBody):
        return await server.completions(request, body)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request, body: ChatBody):
        return await server.chat(request, body)

    @app.post("/v1/embeddings")
    async def embeddings(body: EmbeddingBody):
        return await server.embeddings(body)

    return app


def serve(model: str, host: str = "127.0.0.1", port: int = 8000, api_key: str | None = None, backend: str = "auto",
          max_batch: int = 16, max_queue: int = 64, max_body_bytes: int = 1_000_000,
          request_timeout_s: float = 300.0, device: str = "cpu", log_level: str = "info",
          adapter: str | Path | None = None, weights: str = "fp32") -> None:
    """Load `model` (anything `load_lm` opens), start the engine and serve the API with uvicorn until stopped.
    `adapter`: a LoRA adapter applied unmerged (slmkit's torch backend; "auto" picks it). `weights`: fp32, bf16 or
    int8 (torch backend; "auto" picks it when not fp32).

    The API key is `api_key`, else $SLM_API_KEY; without one the /v1 routes are open (a warning is logged
    when the address is not loopback).
    """
    import sys

    import torch
    import uvicorn

    from slmkit.lm import load_lm
    api_key = api_key or os.environ.get("SLM_API_KEY") or None
    if device == "cpu":
        # Leave a core to the HTTP event loop: with every core in the model's thread pool, the pool's spinning
        # workers and the event loop fight (measured on 2 cores, stories15m, 16 clients: 267 -> 364 tokens/s).
        torch.set_num_threads(max(1, (os.cpu_count() or 2) - 1))
    sys.setswitchinterval(0.001)  # hand the GIL between engine and event loop sooner (5 ms by default)
    if adapter is not None and backend == "auto":
        backend = "torch"  # the only backend that applies an adapter without merging it
    backend, model_arg, options = generation_backend(model, backend, device, weights)
    log.info("serving %s with the %s backend (%s weights)%s", model, backend, weights,
             f" and adapter {adapter}" if adapter else "")
    lm = load_lm(model_arg, backend=backend, device=device, weights=weights, **options)
    if adapter is not None:
        from slmkit.lm.torch_lm import apply_adapter
        try:
            apply_adapter(lm, adapter)
        except BaseException:
            lm.close()
            raise
    if lm.tokenizer is None:
        lm.close()
        raise ValueError(f"{model} has no local tokenizer (a remote endpoint?); serve a local model")
    engine = Engine(lm, max_batch=max_batch, max_queue=max_queue)
    if api_key is None and host not in ("127.0.0.1", "localhost", "::1"):
        log.warning("serving on %s without an API key: anyone who can reach it can use it "
                    "(set --api-key or SLM_API_KEY)", host)
    app = create_app(engine, model, api_key=api_key, max_body_bytes=max_body_bytes,
                     request_timeout_s=request_timeout_s)
    try:
        uvicorn.run(app, host=host, port=port, log_level=log_level)
    finally:
        engine.close()
        lm.close()
