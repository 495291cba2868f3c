"""How the engine's token events reach an HTTP client: merged across a request's prompts, collected into one
response or sent as server-sent events as they come, and cancelled when the client goes away."""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import AsyncIterator, Callable

from fastapi import Request
from fastapi.responses import StreamingResponse

from slmkit.serve.engine import TokenEvent
from slmkit.serve.guard import timeout_error
from slmkit.serve.protocol import Choices, error_body

log = logging.getLogger("slmkit.serve")


async def merged(pendings: list, deadline: float) -> AsyncIterator[tuple[int, TokenEvent]]:
    """(request index, event) for every choice of every submitted request, as they come, until all have finished.

    Raises TimeoutError at `deadline` (loop time) and the engine's error if a request failed. Closing the
    generator, or its end, marks every request cancelled: the engine frees their rows at the next token.
    (This is `Engine.generate` for requests submitted beforehand, so refusals come before a stream starts.)
    """
    # Bounded, so a reader that stops (a stalled stream) leaves the events in each request's own queue, where the
    # engine's bound (`Engine(max_events=...)`) sees them and cancels the request.
    out: asyncio.Queue = asyncio.Queue(maxsize=len(pendings))

    async def pump(i: int, pending) -> None:
        while True:
            event = await pending.events.get()
            await out.put((i, event))
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


async def collect(request: Request, choices: Choices, pendings: list, deadline: float) -> bool:
    """Every event of `pendings` into `choices`; False when the client disconnected first (its generation is
    then cancelled). Raises TimeoutError at `deadline` and the engine's error if a request failed."""

    async def gather() -> None:
        async for i, ev in merged(pendings, deadline):
            choices.add(i, ev)

    work = asyncio.ensure_future(gather())
    watch = asyncio.ensure_future(_wait_disconnect(request))
    try:
        await asyncio.wait({work, watch}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        watch.cancel()
        if not work.done():  # the client left (or the server is stopping): stop generating for it
            work.cancel()
            for p in pendings:
                p.cancelled = True
    if not work.done():
        await asyncio.wait({work})  # let it finish cancelling
        return False
    work.result()
    return True


async def _wait_disconnect(request: Request) -> None:
    while (await request.receive())["type"] != "http.disconnect":
        pass


def sse(obj: dict) -> bytes:
    """One server-sent event holding `obj` as JSON."""
    return b"data: " + json.dumps(obj, ensure_ascii=False, separators=(",", ":")).encode() + b"\n\n"


def event_stream(choices: Choices, pendings: list, deadline: float, timeout_s: float,
                 on_close: Callable[[], None]) -> EventStream:
    """The events of `pendings` as OpenAI's stream chunks, then `data: [DONE]`. A timeout (past `deadline`, the
    server's `timeout_s`) or an engine error ends the stream with an error event instead; `on_close` runs once
    the stream is over, however it ended."""

    async def events() -> AsyncIterator[bytes]:
        stream = merged(pendings, deadline)
        try:
            for chunk in choices.stream_start():
                yield sse(chunk)
            async for i, ev in stream:
                for chunk in choices.stream_event(i, ev):
                    yield sse(chunk)
            for chunk in choices.stream_end():
                yield sse(chunk)
            yield b"data: [DONE]\n\n"
        except TimeoutError:
            yield sse(timeout_error(timeout_s).body())
        except Exception as e:  # the engine failed this request; the others go on
            log.exception("generation failed")
            yield sse(error_body(f"generation failed: {e}", "server_error"))
        finally:
            await stream.aclose()

    def close() -> None:
        for p in pendings:
            p.cancelled = True
        on_close()

    return EventStream(events(), on_close=close)


class EventStream(StreamingResponse):
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


def whole_reply(choices: Choices, headers: dict | None = None) -> StreamingResponse:
    """A reply decided before it is sent (choice 0 of `choices`, complete: the cascade's, the knowledge base's
    abstention) as OpenAI stream chunks: the role, the content, the finish, then `data: [DONE]`."""
    whole = choices.response()["choices"][0]
    message = whole["message"]
    delta = {"content": message["content"]}
    if message.get("tool_calls"):  # OpenAI's streamed shape: each call with its index, whole in one delta
        delta["tool_calls"] = [{"index": i, **call} for i, call in enumerate(message["tool_calls"])]
    chunks = [*choices.stream_start(),
              choices._chunk([{"index": 0, "delta": delta, "logprobs": whole["logprobs"], "finish_reason": None}]),
              choices.finish_chunk(0, whole["finish_reason"]), *choices.stream_end()]

    async def events() -> AsyncIterator[bytes]:
        for chunk in chunks:
            yield sse(chunk)
        yield b"data: [DONE]\n\n"
    return StreamingResponse(events(), media_type="text/event-stream",
                             headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no", **(headers or {})})
