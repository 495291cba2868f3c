"""`slm serve`: an OpenAI-compatible HTTP server over the generation `Engine`.

    GET  /                      the chat page (chat.html beside this file)
    GET  /v1/models             the one model served, in OpenAI's list shape
    POST /v1/completions        text completions: prompt (one string or a list), n, seed, stop, logprobs, stream
    POST /v1/chat/completions   chat: messages through the model's chat template; logprobs, stream
    POST /v1/embeddings         mean-pooled, L2-normalised final hidden states (slmkit's own model only)
    GET  /health                ok, the model, the queue depth
    GET  /metrics               Prometheus text format: requests, tokens, latency and time to first token
                                (and who answered, with --escalate-to: escalate.py)

Any OpenAI client works against it (`OpenAI(base_url="http://127.0.0.1:8000/v1", api_key=...)`). This file
holds the routes and start-up; the pieces they wire together:

    protocol.py   request bodies, response and chunk shapes, OpenAI's error shape (every error is answered in it)
    guard.py      the API key, body size and request limits, admission (429) and the timeout (504)
    stream.py     events to a client as they come; a client that disconnects cancels its generation
    metrics.py    the Prometheus metrics
    engine.py     continuous batching (batch_torch.py, batch_llamacpp.py: the backends' batched decoders)

The request's `model` field is not checked (the one model answers). A sampling field a request leaves out takes
the model's own default (`LM.sampling_params`: its generation_config.json, else slmkit's). /health, /metrics and
the chat page need no key.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.responses import FileResponse, JSONResponse, Response

from slmkit.chat import stop_strings
from slmkit.lm import generation_backend
from slmkit.lm.constraints import compile_grammar
from slmkit.sampling import SamplingParams
from slmkit.serve import escalate, guard, protocol, stream
from slmkit.serve.engine import Engine, GenerationRequest
from slmkit.serve.metrics import CONTENT_TYPE, Metrics
from slmkit.serve.protocol import APIError, ChatBody, CompletionBody, EmbeddingBody, SamplingBody

log = logging.getLogger("slmkit.serve")

CHAT_PAGE = Path(__file__).with_name("chat.html")


def sampling(lm, body: SamplingBody, max_tokens: int, extra_stop: list[str] = ()) -> SamplingParams:
    """The request's sampling fields over the model's defaults: a field the request left out (None) is the
    model's. min_p and repetition_penalty are passed only when given."""
    temperature = body.temperature
    if temperature is not None and temperature < 1e-5:
        temperature = 0.0  # so small the probabilities would overflow: greedy, as llama.cpp's server does
    extensions = {k: getattr(body, k) for k in ("min_p", "repetition_penalty") if getattr(body, k) is not None}
    try:
        return lm.sampling_params(temperature=temperature, top_p=body.top_p, top_k=body.top_k, seed=body.seed,
                                  max_new_tokens=max_tokens, stop=guard.stop_list(body.stop, extra_stop),
                                  stop_at_eos=not body.ignore_eos, **extensions)
    except ValueError as e:
        raise APIError(400, str(e)) from e


def structured_output(body: SamplingBody) -> tuple[str, dict] | None:
    """What the request's reply must keep to, as (its field, `compile_grammar`'s arguments): response_format
    json_object / json_schema, or llama.cpp's json_schema / grammar fields; None for free text."""
    given = []
    rf = body.response_format
    if rf is not None and rf.type == "json_object":
        given.append(("response_format", {"json_schema": {"type": "object"}}))
    elif rf is not None and rf.type == "json_schema":
        if rf.json_schema is None or rf.json_schema.schema_ is None:
            raise APIError(400, "response_format type json_schema needs json_schema.schema, a JSON schema",
                           param="response_format.json_schema.schema")
        given.append(("response_format.json_schema.schema", {"json_schema": rf.json_schema.schema_}))
    if body.json_schema is not None:
        given.append(("json_schema", {"json_schema": body.json_schema}))
    if body.grammar is not None:
        given.append(("grammar", {"grammar": body.grammar}))
    if len(given) > 1:
        raise APIError(400, f"give one of {' or '.join(f for f, _ in given)}, not both", param=given[1][0])
    return given[0] if given else None


async def compile_structured_output(tokenizer, body: SamplingBody) -> str | None:
    """The request's grammar, compiled off the event loop (the first one also builds llguidance's view of the
    vocabulary); a bad schema or grammar is a 400 naming its field."""
    given = structured_output(body)
    if given is None:
        return None
    field, spec = given
    try:
        return await asyncio.to_thread(compile_grammar, tokenizer, **spec)
    except ValueError as e:
        raise APIError(400, f"{field}: {e}", param=field) from e


def create_app(engine: Engine, model_name: str, api_key: str | None = None, max_body_bytes: int = 1_000_000,
               request_timeout_s: float = 300.0, escalation: escalate.Escalation | None = None) -> FastAPI:
    """The OpenAI-compatible app over `engine` (see the module docstring); `api_key` guards every /v1 route;
    `escalation` makes chat completions a cascade (escalate.py)."""
    metrics = Metrics()
    if escalation is not None:
        metrics.answered = {"small": 0, "large": 0}  # counted from 0, so a dashboard sees both from the start
    lm, created = engine.lm, int(time.time())
    app = FastAPI(title="slmkit", docs_url=None, redoc_url=None, openapi_url=None)
    app.add_middleware(guard.Guard, api_key=api_key, max_body_bytes=max_body_bytes, metrics=metrics)
    protocol.add_error_handlers(app)

    async def generate(request: Request, body: SamplingBody, prompts: list[list[int]], params: SamplingParams,
                       n: int, logprobs: int | None, chat: bool, what: str) -> Response:
        """Submit one generation per prompt, n choices each; answer with all of them, or stream them."""
        t0 = time.perf_counter()
        grammar = await compile_structured_output(engine.tokenizer, body)
        requests = [GenerationRequest(ids, params, n=n, logprobs=logprobs, grammar=grammar) for ids in prompts]
        pendings = guard.submit_all(engine, requests, what)
        deadline = asyncio.get_running_loop().time() + request_timeout_s
        include_usage = bool(body.stream and body.stream_options and body.stream_options.include_usage)
        choices = protocol.Choices(engine.tokenizer, model_name, chat, n, n * len(prompts), logprobs is not None,
                                   sum(len(p) for p in prompts), include_usage)

        def record_ttft() -> None:
            if choices.first_token_at is not None:
                metrics.ttft.observe(choices.first_token_at - t0)

        if body.stream:
            return stream.event_stream(choices, pendings, deadline, request_timeout_s, on_close=record_ttft)
        try:
            finished = await stream.collect(request, choices, pendings, deadline)
        except TimeoutError:
            raise guard.timeout_error(request_timeout_s) from None
        except Exception as e:
            log.exception("generation failed")
            raise APIError(500, f"generation failed: {e}", type="server_error") from e
        finally:
            record_ttft()
        if not finished:
            return Response(status_code=499)  # nginx's "client closed request"; nobody reads it
        return JSONResponse(choices.response())

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
        return Response(metrics.render(engine), media_type=CONTENT_TYPE)

    @app.get("/v1/models")
    async def list_models():
        return {"object": "list", "data": [protocol.model_card(model_name, created)]}

    @app.get("/v1/models/{model:path}")
    async def get_model(model: str):
        if model != model_name:
            raise APIError(404, f"the model {model!r} does not exist; this server serves {model_name!r}",
                           param="model", code="model_not_found")
        return protocol.model_card(model_name, created)

    @app.post("/v1/completions")
    async def completions(request: Request, body: CompletionBody):
        n = guard.check_n(body.n)
        guard.check_logprobs(body.logprobs, "logprobs")
        if body.echo:
            raise APIError(400, "echo=true is not supported: the response holds only the completion; prepend the "
                                "prompt yourself", param="echo")
        prompts = [body.prompt] if isinstance(body.prompt, str) else body.prompt
        if not prompts:
            raise APIError(400, "prompt must be a string or a non-empty list of strings", param="prompt")
        ids = [lm.encode_prompt(p) for p in prompts]
        params = sampling(lm, body, 16 if body.max_tokens is None else body.max_tokens)  # OpenAI's default 16
        return await generate(request, body, ids, params, n, body.logprobs, chat=False, what="prompt")

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request, body: ChatBody):
        n = guard.check_n(body.n)
        guard.check_logprobs(body.top_logprobs, "top_logprobs")
        tok = engine.tokenizer
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
        ids = lm.encode_prompt(text)
        if body.top_logprobs is not None and not body.logprobs:
            raise APIError(400, "top_logprobs needs logprobs=true", param="top_logprobs")
        # without max_tokens, the reply may fill the rest of the context
        max_tokens = body.max_completion_tokens or body.max_tokens or max(1, engine.max_length - len(ids))
        params = sampling(lm, body, max_tokens, stop_strings(tok))
        logprobs = (body.top_logprobs or 0) if body.logprobs else None
        if escalation is not None:
            return await escalate.chat(engine, escalation, metrics, request, body, messages, ids, params, n, logprobs,
                                       model_name, request_timeout_s)
        return await generate(request, body, [ids], params, n, logprobs, chat=True, what="messages")

    @app.post("/v1/embeddings")
    async def embeddings(body: EmbeddingBody):
        """Mean-pooled final hidden states, L2-normalised (`TorchLM.embed`): only slmkit's own model exposes
        hidden states; other backends answer 400."""
        from slmkit.lm.torch_lm import TorchLM
        if not isinstance(lm, TorchLM):
            raise APIError(400, f"embeddings need slmkit's own model (backend torch), not {type(lm).__name__}",
                           param="model")
        inputs = [body.input] if isinstance(body.input, str) else body.input
        dim = lm.model.cfg.dim
        if body.dimensions is not None and body.dimensions != dim:
            raise APIError(400, f"this model's embeddings have {dim} dimensions", param="dimensions")
        ids = [lm.encode_prompt(text) for text in inputs]  # to check them and count them; embed encodes its own
        guard.check_embedding_inputs(ids, engine.max_length)
        try:
            async with asyncio.timeout(request_timeout_s):
                vectors = await asyncio.to_thread(lm.embed, inputs)
        except TimeoutError:
            raise guard.timeout_error(request_timeout_s) from None
        n_tokens = sum(len(x) for x in ids)
        return JSONResponse(protocol.embeddings_response(vectors.numpy(), body.encoding_format, model_name, n_tokens))

    return app


def serve(model: str, host: str = "127.0.0.1", port: int = 8000, api_key: str | None = None, backend: str = "auto",
          max_batch: int = 16, max_queue: int = 64, max_body_bytes: int = 1_000_000,
          request_timeout_s: float = 300.0, device: str = "cpu", log_level: str = "info",
          adapter: str | Path | None = None, weights: str = "fp32", draft: str | None = None,
          draft_k: int = 4, escalate_to: str | None = None, calibration: str | Path | None = None,
          target_error: float = 0.05) -> None:
    """Load `model` (anything `load_lm` opens), start the engine and serve the API with uvicorn until stopped.
    `adapter`: a LoRA adapter applied unmerged (slmkit's torch backend; "auto" picks it). `weights`: fp32, bf16 or
    int8 (torch backend; "auto" picks it when not fp32). `draft`: decode speculatively (lm/speculative.py) with this
    draft model or "ngram"; the target runs on the torch backend ("auto" picks it) and the engine then serves one
    request at a time (speculation trades batching for latency: a batch of 1 per step, see BENCHMARKS.md).

    The API key is `api_key`, else $SLM_API_KEY; without one the /v1 routes are open (a warning is logged
    when the address is not loopback). `escalate_to` (a model, URL or queue:FILE.jsonl) with `calibration` (a file
    from `slm cascade calibrate`) answers chat completions by a cascade for `target_error` (escalate.py).
    """
    import sys

    import torch
    import uvicorn

    from slmkit.lm import load_lm
    if escalate_to is not None and calibration is None:
        raise ValueError("--escalate-to needs --calibration FILE (write one with `slm cascade calibrate MODEL --dev "
                         "FILE -o FILE`)")
    if escalate_to is not None and draft is not None:
        raise ValueError("--escalate-to needs the batched engine's log-probs, which --draft turns off; use one")
    if device == "cpu":
        # Leave a core to the HTTP event loop: with every core in the model's thread pool, the pool's spinning
        # workers and the event loop fight (measured on 2 cores, stories15m, 16 clients: 267 -> 364 tokens/s).
        torch.set_num_threads(max(1, (os.cpu_count() or 2) - 1))
    sys.setswitchinterval(0.001)  # hand the GIL between engine and event loop sooner (5 ms by default)
    if (adapter is not None or draft is not None) and backend == "auto":
        backend = "torch"  # the only backend that applies an adapter unmerged and rolls back a speculative cache
    backend, model_arg, options = generation_backend(model, backend, device, weights)
    log.info("serving %s with the %s backend (%s weights)%s%s", model, backend, weights,
             f" and adapter {adapter}" if adapter else "", f", draft {draft}" if draft else "")
    escalation = (escalate.load_escalation(escalate_to, calibration, target_error, device)
                  if escalate_to is not None else None)
    lm = load_lm(model_arg, backend=backend, device=device, weights=weights, adapter=adapter, draft=draft,
                 draft_k=draft_k, **options)
    if lm.tokenizer is None:
        lm.close()
        raise ValueError(f"{model} has no local tokenizer (a remote endpoint?); serve a local model")
    engine = Engine(lm, max_batch=max_batch, max_queue=max_queue)
    app = create_app(engine, model, api_key=guard.resolve_api_key(api_key, host), max_body_bytes=max_body_bytes,
                     request_timeout_s=request_timeout_s, escalation=escalation)
    try:
        uvicorn.run(app, host=host, port=port, log_level=log_level)
    finally:
        engine.close()
        lm.close()
        if escalation is not None:
            escalation.large.close()
