"""What a request must pass to be answered, and the errors it gets when it does not.

    401  an /v1 route without `Authorization: Bearer KEY` when the server has a key (compared in constant time);
         the key is `--api-key`, else $SLM_API_KEY
    413  a body larger than max_body_bytes (refused before it is read when Content-Length says so)
    400  more choices, log-probs or stop strings than the server allows; a prompt (or an embedding input) with
         max_tokens beyond the model's context, naming the limit
    429  the engine's queue is full, with Retry-After
    504  the request ran past request_timeout_s

The first two are `Guard`, a plain ASGI middleware, so they run before any body is read or parsed (it also
counts every request into the metrics, refused ones included). The rest are functions the routes call.
"""

from __future__ import annotations

import hmac
import logging
import math
import os
import time

from starlette.exceptions import HTTPException as StarletteHTTPException

from slmkit.serve.engine import Engine, GenerationRequest, PromptTooLong, QueueFull
from slmkit.serve.metrics import Metrics, route_label
from slmkit.serve.protocol import APIError, error_response

log = logging.getLogger("slmkit.serve")

MAX_N = 16  # choices per prompt
MAX_LOGPROBS = 20  # top-k alternatives per token
MAX_STOP = 16  # stop strings per request
MAX_EMBED_INPUTS = 2048
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


# --- API key, body size, metrics (plain ASGI, so it runs before any body is read) ----------------------------

class Guard:
    def __init__(self, app, api_key: str | None, max_body_bytes: int, metrics: Metrics):
        self.app = app
        self.api_key = api_key
        self.max_body_bytes = max_body_bytes
        self.metrics = metrics

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        path = scope["path"]
        api = path.startswith("/v1/")
        status, start = [500], time.perf_counter()

        async def send_status(message):
            if message["type"] == "http.response.start":
                status[0] = message["status"]
            await send(message)

        self.metrics.active += api
        try:
            headers = dict(scope["headers"])
            if api and self.api_key is not None and not authorized(headers.get(b"authorization"), self.api_key):
                error = APIError(401, "missing or incorrect API key: send it as 'Authorization: Bearer KEY'",
                                 code="invalid_api_key", headers={"WWW-Authenticate": "Bearer"})
                return await error_response(error)(scope, receive, send_status)
            length = headers.get(b"content-length")
            if length is not None and (not length.isdigit() or int(length) > self.max_body_bytes):
                await self._drain(receive, int(length) if length.isdigit() else 0)
                return await error_response(self._too_large())(scope, receive, send_status)
            await self.app(scope, self._limited(receive), send_status)
        finally:
            self.metrics.active -= api
            self.metrics.observe_request(route_label(path), status[0], time.perf_counter() - start)

    def _too_large(self) -> APIError:
        return APIError(413, f"the request body exceeds the server's limit of {self.max_body_bytes} bytes",
                        code="request_too_large")

    def _limited(self, receive):
        """`receive`, refusing a body (chunked, or longer than its Content-Length said) once it passes the limit."""
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
    """The request's stop strings (empty ones dropped; at most MAX_STOP), then the `extra` ones not among them."""
    stops = [s for s in ([stop] if isinstance(stop, str) else stop or []) if s]
    if len(stops) > MAX_STOP:
        raise APIError(400, f"at most {MAX_STOP} stop strings", param="stop")
    return stops + [s for s in extra if s and s not in stops]


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
    or 503 (the engine is closed)."""
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


def timeout_error(seconds: float) -> APIError:
    """A request that ran past the server's `seconds` (a stream sends its body as an error event)."""
    return APIError(504, f"the request ran past the server's limit of {seconds:g} s", type="timeout_error",
                    code="timeout")
