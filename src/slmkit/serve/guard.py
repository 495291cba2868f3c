"""What a request must pass to be answered, and the errors it gets when it does not.

    401  any route but the open ones without `Authorization: Bearer KEY` when the server has a key (compared in
         constant time); the key is `--api-key`, else $SLM_API_KEY. Deny by default: only `/` (the chat page)
         and `/health` are open, and `/metrics` when the server is told so (`--public-metrics`). The route is
         the path the app routes on, without a mount prefix or root path, so a mounted app is guarded the same.
    413  a body larger than max_body_bytes (refused before it is read when Content-Length says so)
    503  more than max_concurrency requests in flight (/health and /metrics are not counted), with Retry-After
    400  more prompts, choices, log-probs or stop strings (or longer ones) than the server allows; more prompts
         than the queue can ever hold; a prompt (or an embedding input) with max_tokens beyond the model's
         context, naming the limit; text that is not valid Unicode (a lone surrogate)
    429  the engine's queue is full, with Retry-After
    504  the request ran past request_timeout_s

The first three are `Guard`, a plain ASGI middleware, so they run before any body is read or parsed (it also
counts every request into the metrics, refused ones included). It also drops a client that stalls: one that
takes more than write_timeout_s to accept the next piece of a response (a stream it stopped reading), or to
send the next piece of its body, has its request cancelled and its connection closed. The rest are functions
the routes call.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import logging
import math
import os
import time

from starlette._utils import get_route_path  # what Starlette's router matches on: the same path is guarded
from starlette.exceptions import HTTPException as StarletteHTTPException

from slmkit.serve.engine import Engine, EngineStopped, GenerationRequest, PromptTooLong, QueueFull
from slmkit.serve.metrics import Metrics, route_label
from slmkit.serve.protocol import APIError, error_response

log = logging.getLogger("slmkit.serve")

MAX_N = 16  # choices per prompt
MAX_LOGPROBS = 20  # top-k alternatives per token
MAX_STOP = 16  # stop strings per request
MAX_STOP_CHARS = 256  # per stop string: a stream holds back that much text
MAX_PROMPTS = 64  # prompts per completions request (each takes a queue slot)
MAX_CHOICES = 128  # n x prompts
MAX_EMBED_INPUTS = 2048
OPEN_ROUTES = ("/", "/agent", "/health")  # answered without the key (the pages ask for it); else it is needed
UNLIMITED_ROUTES = ("/health", "/metrics")  # answered even past max_concurrency (monitoring must see overload)
LOOPBACK = ("127.0.0.1", "localhost", "::1")


# --- the API key --------------------------------------------------------------------------------------------

def resolve_api_key(api_key: str | None, host: str) -> str | None:
    """`api_key`, else $SLM_API_KEY, else None (open /v1 routes: a warning when `host` is not loopback)."""
    api_key = api_key or os.environ.get("SLM_API_KEY") or None
    if api_key is None and host not in LOOPBACK:
        log.warning("serving on %s without an API key: anyone who can reach it can use it "
                    "(set --api-key or SLM_API_KEY)", host)
    return api_key


def authorized(header: bytes | None, api_key: str) -> bool:
    """Whether an Authorization header is `Bearer <api_key>` (the scheme in any case), compared in constant time."""
    if header is None:
        return False
    scheme, _, token = header.partition(b" ")
    return hmac.compare_digest(b"Bearer " + token.strip(), b"Bearer " + api_key.encode()) \
        and scheme.lower() == b"bearer"


# --- API key, body size, concurrency, stalled clients, metrics (plain ASGI: runs before any body is read) ------

class ClientStalled(BaseException):
    """The client took longer than the write timeout to take (or send) the next piece of a message. Not an
    Exception, so no handler on the way (FastAPI's body parsing turns any Exception into a 400) swallows it."""


def open_route(path: str, public_metrics: bool) -> bool:
    return path in OPEN_ROUTES or (public_metrics and path == "/metrics")


class Guard:
    def __init__(self, app, api_key: str | None, max_body_bytes: int, metrics: Metrics,
                 public_metrics: bool = False, max_concurrency: int = 256, write_timeout_s: float = 30.0):
        self.app = app
        self.api_key = api_key
        self.max_body_bytes = max_body_bytes
        self.metrics = metrics
        self.public_metrics = public_metrics
        self.max_concurrency = max_concurrency
        self.write_timeout_s = write_timeout_s
        self.in_flight = 0

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        path = get_route_path(scope)
        api = path.startswith("/v1/")
        counted = path not in UNLIMITED_ROUTES
        status, start, stalled = [500], time.perf_counter(), []

        started = False

        async def send_status(message):
            nonlocal started
            if message["type"] == "http.response.start":
                status[0], started = message["status"], True
            try:
                async with asyncio.timeout(self.write_timeout_s):
                    await send(message)
            except TimeoutError:
                stalled.append("read")
                raise ClientStalled(f"the client read nothing for {self.write_timeout_s:g} s") from None

        self.metrics.active += api
        self.in_flight += counted
        try:
            headers = dict(scope["headers"])
            if self.api_key is not None and not open_route(path, self.public_metrics) \
                    and not authorized(headers.get(b"authorization"), self.api_key):
                error = APIError(401, "missing or incorrect API key: send it as 'Authorization: Bearer KEY'",
                                 code="invalid_api_key", headers={"WWW-Authenticate": "Bearer"})
                return await error_response(error)(scope, receive, send_status)
            if counted and self.in_flight > self.max_concurrency:
                error = APIError(503, f"the server is answering its limit of {self.max_concurrency} requests; "
                                      "retry after 1 s", type="server_error", code="server_overloaded",
                                 headers={"Retry-After": "1"})
                return await error_response(error)(scope, receive, send_status)
            length = headers.get(b"content-length")
            if length is not None and (not length.isdigit() or int(length) > self.max_body_bytes):
                await self._drain(receive, int(length) if length.isdigit() else 0)
                return await error_response(self._too_large())(scope, receive, send_status)
            await self.app(scope, self._limited(receive, stalled), send_status)
        except BaseException as e:
            if not stalled or isinstance(e, asyncio.CancelledError):
                raise
            # Its request is cancelled (the stream's generator closed on the way out); returning with the
            # response unfinished makes the server close the connection.
            log.warning("dropped a stalled client on %s: %s", path, e)
            if stalled[0] == "send" and not started:  # it may still read: say why
                error = APIError(408, f"{e}; send the body at once", code="request_timeout")
                with contextlib.suppress(ClientStalled):
                    await error_response(error)(scope, receive, send_status)
                    return
            status[0] = 499  # nginx's "client closed request": nobody reads it
            if abort := scope.get("slmkit.abort"):
                abort()
                await asyncio.sleep(0)  # the server sees the connection gone, so it logs no unfinished response
        finally:
            self.metrics.active -= api
            self.in_flight -= counted
            self.metrics.observe_request(route_label(path), status[0], time.perf_counter() - start)

    def _too_large(self) -> APIError:
        return APIError(413, f"the request body exceeds the server's limit of {self.max_body_bytes} bytes",
                        code="request_too_large")

    def _limited(self, receive, stalled: list):
        """`receive`, refusing a body (chunked, or longer than its Content-Length said) once it passes the limit,
        and a body whose next piece takes longer than the write timeout to arrive."""
        received, complete = 0, False

        async def limited():
            nonlocal received, complete
            if complete:  # waiting for the disconnect: no limit on that
                return await receive()
            try:
                async with asyncio.timeout(self.write_timeout_s):
                    message = await receive()
            except TimeoutError:
                stalled.append("send")
                raise ClientStalled(f"the client sent nothing for {self.write_timeout_s:g} s") from None
            complete = message["type"] != "http.request" or not message.get("more_body")
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


# --- request limits ------------------------------------------------------------------------------------------

def check_n(n: int | None) -> int:
    """The request's number of choices per prompt (1 when left out), at most MAX_N."""
    if n is not None and n > MAX_N:
        raise APIError(400, f"n is {n}; this server answers at most {MAX_N} choices per prompt", param="n")
    return n or 1


def check_logprobs(k: int | None, param: str) -> None:
    """At most MAX_LOGPROBS alternatives per token (`param`: the request field that asked for them)."""
    if k is not None and k > MAX_LOGPROBS:
        raise APIError(400, f"{param} is {k}; this server returns at most {MAX_LOGPROBS} alternatives per token",
                       param=param)


def stop_list(stop: str | list[str] | None, extra: list[str] = ()) -> list[str]:
    """The request's stop strings (empty ones dropped; at most MAX_STOP of at most MAX_STOP_CHARS characters),
    then the `extra` ones not among them."""
    stops = [s for s in ([stop] if isinstance(stop, str) else stop or []) if s]
    if len(stops) > MAX_STOP:
        raise APIError(400, f"at most {MAX_STOP} stop strings", param="stop")
    if any(len(s) > MAX_STOP_CHARS for s in stops):
        raise APIError(400, f"a stop string is longer than this server's limit of {MAX_STOP_CHARS} characters",
                       param="stop")
    return stops + [s for s in extra if s and s not in stops]


def check_prompts(prompts: list, n: int, max_queue: int) -> None:
    """1 to MAX_PROMPTS prompts (and no more than the queue can ever hold: each takes a slot, so more could
    never be admitted), n x prompts at most MAX_CHOICES."""
    limit = min(MAX_PROMPTS, max_queue)
    if not prompts or len(prompts) > limit:
        raise APIError(400, f"prompt must be a string or a list of 1 to {limit} strings (this server's limit)",
                       param="prompt")
    if n * len(prompts) > MAX_CHOICES:
        raise APIError(400, f"n x prompts is {n * len(prompts)}; this server answers at most {MAX_CHOICES} "
                            "choices per request", param="n")


def check_unicode(value, param: str = "") -> None:
    """Every string in a parsed request body (nested lists and dicts too) is valid Unicode: JSON's \\ud800
    escapes can carry lone surrogates, which no tokenizer or UTF-8 encoder takes. A 400 naming the field."""
    if isinstance(value, str):
        try:
            value.encode("utf-8")
        except UnicodeEncodeError as e:
            raise APIError(400, f"{param or 'the body'} holds a lone surrogate (character {e.start}), not valid "
                                "Unicode text", param=param or None) from None
    elif isinstance(value, dict):
        for k, v in value.items():
            check_unicode(k, param)
            check_unicode(v, f"{param}.{k}" if param else str(k))
    elif isinstance(value, list):
        for i, v in enumerate(value):
            check_unicode(v, f"{param}.{i}" if param else str(i))


def check_embedding_inputs(ids: list[list[int]], max_length: int) -> None:
    """1 to MAX_EMBED_INPUTS inputs, none empty or beyond the model's context (its `max_length` tokens)."""
    if not ids or len(ids) > MAX_EMBED_INPUTS:
        raise APIError(400, f"input must be a string or a list of 1 to {MAX_EMBED_INPUTS} strings", param="input")
    for i, x in enumerate(ids):
        if not x:
            raise APIError(400, f"input {i} is empty", param="input")
        if len(x) > max_length:
            raise APIError(400, f"input {i} has {len(x)} tokens, more than the model's context of {max_length} "
                                "tokens", param="input", code="context_length_exceeded")


# --- admission and time --------------------------------------------------------------------------------------

def submit_all(engine: Engine, requests: list[GenerationRequest], what: str) -> list:
    """Submit every request to the engine, or none: a refusal cancels those already queued and is answered
    429 (queue full), 400 (`what`, the prompt or messages, beyond the context; or log-probs the backend lacks)
    or 503 (the engine is closed or dead)."""
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
            raise engine_stopped(e) from e
        raise
    return pendings


def engine_stopped(e: BaseException) -> APIError:
    """A request the engine cannot answer: it was closed, or its thread died."""
    message = str(e) if isinstance(e, EngineStopped) else f"the engine stopped: {e}"
    return APIError(503, message, type="server_error", code="engine_stopped")


def timeout_error(seconds: float) -> APIError:
    """A request that ran past the server's `seconds` (a stream sends its body as an error event)."""
    return APIError(504, f"the request ran past the server's limit of {seconds:g} s", type="timeout_error",
                    code="timeout")
