"""slmkit's front over an OpenAI-compatible server that does the generating: `slm serve --backend llama-server`.

The upstream (llama.cpp's llama-server, started and stopped by llama_server.py) batches and samples; this app
keeps what slmkit's own server guarantees in front of it: the API key and body/concurrency limits (guard.py),
request validation in OpenAI's error shape (the same bodies as app.py's routes), admission (more than
`max_requests` generations at once: 429 with Retry-After, as the engine's full queue answers), the per-request
timeout (504), Prometheus metrics (requests, latency, tokens from the upstream's usage, TTFT of streams), /health
(503 once the upstream is gone) and the chat page. Bodies are forwarded as the client sent them (llama-server
reads response_format, json_schema, grammar, tools and the sampling fields itself), and streams are relayed
chunk by chunk; a client that disconnects closes the upstream stream, which stops its generation there.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import httpx
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse

from slmkit.serve import guard, protocol
from slmkit.serve.embeddings import add_embeddings_route
from slmkit.serve.engine import Engine, EngineStats
from slmkit.serve.metrics import CONTENT_TYPE, Metrics
from slmkit.serve.protocol import APIError, ChatBody, CompletionBody


@dataclass
class UpstreamView:
    """What Metrics.render reads from an engine, kept by the proxy."""

    stats: EngineStats = field(default_factory=EngineStats)
    queue_depth: int = 0  # the upstream queues itself: nothing waits here


def create_proxy_app(upstream: str, model_name: str, max_requests: int, api_key: str | None = None,
                     max_body_bytes: int = 1_000_000, request_timeout_s: float = 300.0, public_metrics: bool = False,
                     max_concurrency: int = 256, write_timeout_s: float = 30.0,
                     upstream_alive: Callable[[], bool] = lambda: True, tickets=None,
                     embeddings: Engine | None = None, adapters: list[str] = ()) -> FastAPI:
    """The app described in the module docstring, forwarding to `upstream` (http://host:port); `tickets` (a
    TicketStore) adds the agent page and the ticket routes (support.py); `embeddings` (an engine over an encoder,
    `slm serve --embedder`) answers /v1/embeddings here, behind the same admission as slmkit's own server.
    `adapters`: the names of the LoRA adapters the upstream loaded (`--lora`, in this order: llama-server's ids
    0, 1, ...); a request's `model` MODEL:NAME selects one, sent upstream as llama-server's per-request `lora`
    field (every adapter listed, the chosen one at scale 1), anything else the base (all at 0)."""
    from slmkit.serve.app import CHAT_PAGE, App, check_limits
    check_limits(max_requests=max_requests, max_body_bytes=max_body_bytes, request_timeout=request_timeout_s,
                 max_concurrency=max_concurrency, write_timeout=write_timeout_s)
    metrics, view, created = Metrics(), UpstreamView(), int(time.time())
    client = httpx.AsyncClient(base_url=upstream, timeout=httpx.Timeout(request_timeout_s, connect=5.0),
                               limits=httpx.Limits(max_connections=max_requests + 8))
    running = [0]  # generations forwarded and not finished

    app = App(title="slmkit", docs_url=None, redoc_url=None, openapi_url=None)
    app.add_middleware(guard.Guard, api_key=api_key, max_body_bytes=max_body_bytes, metrics=metrics,
                       public_metrics=public_metrics, max_concurrency=max_concurrency,
                       write_timeout_s=write_timeout_s)
    protocol.add_error_handlers(app)
    if tickets is not None:
        from slmkit.serve.support import add_routes
        add_routes(app, tickets)

    def upstream_error(e: Exception) -> APIError:
        if isinstance(e, httpx.TimeoutException):
            return guard.timeout_error(request_timeout_s)
        return APIError(503, f"the llama-server backend is not answering: {type(e).__name__}", type="server_error",
                        code="engine_stopped")

    def count_usage(data: dict) -> None:
        usage = data.get("usage") or {}
        view.stats.prompt_tokens_total += int(usage.get("prompt_tokens") or 0)
        view.stats.completion_tokens_total += int(usage.get("completion_tokens") or 0)

    adapter_names = list(adapters)

    async def forward(path: str, body: dict) -> Response:
        chosen = protocol.requested_adapter(body.get("model"), model_name, adapter_names)
        if running[0] >= max_requests:
            raise APIError(429, "the server is busy; retry after 1 s", type="rate_limit_error",
                           code="rate_limit_exceeded", headers={"Retry-After": "1"})
        body = {**body, "model": model_name}
        if adapter_names:  # (an empty list would leave a slot with the adapters its last request had)
            body["lora"] = [{"id": i, "scale": 1.0 if name == chosen else 0.0} for i, name in enumerate(adapter_names)]
        view.stats.requests_total += 1
        running[0] += 1
        t0 = time.perf_counter()
        if not body.get("stream"):
            try:
                r = await client.post(path, json=body)
            except httpx.HTTPError as e:
                raise upstream_error(e) from e
            finally:
                running[0] -= 1
            if r.status_code == 200:
                try:
                    count_usage(json.loads(r.content))
                except ValueError:
                    pass
            return Response(r.content, status_code=r.status_code, media_type="application/json")
        try:
            r = await client.send(client.build_request("POST", path, json=body), stream=True)
        except httpx.HTTPError as e:
            running[0] -= 1
            raise upstream_error(e) from e
        if r.status_code != 200:
            data = await r.aread()
            await r.aclose()
            running[0] -= 1
            return Response(data, status_code=r.status_code, media_type="application/json")

        async def relay():
            first, tail = True, b""
            try:
                async for chunk in r.aiter_raw():
                    if first:
                        metrics.ttft.observe(time.perf_counter() - t0)
                        first = False
                    tail = (tail + chunk)[-4096:]  # the last event carries the usage, when asked for
                    yield chunk
            except httpx.HTTPError as e:
                error = upstream_error(e)
                yield f"data: {json.dumps(error.body())}\n\n".encode()
            finally:
                await r.aclose()
                running[0] -= 1
                for line in tail.decode(errors="replace").splitlines():
                    if line.startswith("data: {") and '"usage"' in line:
                        try:
                            count_usage(json.loads(line[6:]))
                        except ValueError:
                            pass
        return StreamingResponse(relay(), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    @app.get("/", include_in_schema=False)
    async def chat_page():
        return protocol.html_page(CHAT_PAGE, "chat page")

    @app.get("/health")
    async def health():
        state = {"model": model_name, "queue_depth": 0, "requests_active": metrics.active, "backend": "llama-server"}
        try:
            ok = upstream_alive() and (await client.get("/health", timeout=5)).status_code == 200
        except httpx.HTTPError:
            ok = False
        if not ok:
            error = APIError(503, "the llama-server backend stopped", type="server_error", code="engine_stopped")
            return JSONResponse({"status": "unhealthy", **state, **error.body()}, status_code=503)
        return {"status": "ok", **state}

    @app.get("/metrics")
    async def prometheus():
        return Response(metrics.render(view), media_type=CONTENT_TYPE)

    served = [model_name] + [f"{model_name}:{a}" for a in adapter_names]

    @app.get("/v1/models")
    async def list_models():
        return {"object": "list", "data": [protocol.model_card(m, created) for m in served]}

    @app.get("/v1/models/{model:path}")
    async def get_model(model: str):
        if model not in served:
            raise APIError(404, f"the model {model!r} does not exist; this server serves {model_name}",
                           param="model", code="model_not_found")
        return protocol.model_card(model, created)

    @app.post("/v1/completions")
    async def completions(request: Request, body: CompletionBody):
        guard.check_unicode(body.model_dump(by_alias=True))
        guard.check_n(body.n)
        return await forward("/v1/completions", await request.json())

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request, body: ChatBody):
        guard.check_unicode(body.model_dump(by_alias=True))
        guard.check_n(body.n)
        return await forward("/v1/chat/completions", await request.json())

    if embeddings is not None:
        add_embeddings_route(app, embeddings, getattr(embeddings.embedder, "name", model_name), request_timeout_s)
    else:
        @app.post("/v1/embeddings")
        async def no_embeddings():
            raise APIError(400, "embeddings are not served by the llama-server backend without an encoder; add "
                                "--embedder ENCODER (e.g. minilm-l6-v2), or serve with --backend torch",
                           param="model")

    app.router.on_shutdown.append(client.aclose)
    return app
