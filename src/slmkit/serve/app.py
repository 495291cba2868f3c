"""`slm serve`: an OpenAI-compatible HTTP server over the generation `Engine`.

    GET  /                      the chat page (chat.html beside this file)
    GET  /v1/models             the model served (and MODEL:NAME per LoRA adapter), in OpenAI's list shape
    POST /v1/completions        text completions: prompt (one string or a list), n, seed, stop, logprobs, stream
    POST /v1/chat/completions   chat: messages through the model's chat template; logprobs, stream; image_url
                                content parts (data: URLs) for a vision model (lm/vision_lm.py), one at a time
    POST /v1/embeddings         the encoder's sentence embeddings (--embedder, or an encoder as the model), else
                                the model's mean-pooled, L2-normalised final hidden states (slmkit's own model only)
    GET  /health                ok, the model, the queue depth (503 "unhealthy" once the engine thread died)
    GET  /metrics               Prometheus text format: requests, tokens, latency and time to first token
                                (and who answered, with --escalate-to: escalate.py)

Any OpenAI client works against it (`OpenAI(base_url="http://127.0.0.1:8000/v1", api_key=...)`). This file
holds the routes and start-up; the pieces they wire together:

    protocol.py   request bodies, response and chunk shapes, OpenAI's error shape (every error is answered in it)
    guard.py      the API key, body size and request limits, admission (429) and the timeout (504)
    stream.py     events to a client as they come; a client that disconnects cancels its generation
    metrics.py    the Prometheus metrics
    engine.py     continuous batching (batch_torch.py, batch_llamacpp.py: the backends' batched decoders)
    embeddings.py /v1/embeddings over an engine (this app's, and the llama-server front's for --embedder)

The request's `model` field is not checked (the one model answers), except that with LoRA adapters loaded side by
side (`slm serve MODEL --adapter NAME=DIR ...`) "MODEL:NAME" (or "NAME") selects adapter NAME for that request;
requests for different adapters and the base decode in one batch (model/multi_lora.py).
`slm serve ENCODER` (an encoder directory or minilm-l6-v2) serves embeddings only: the completion routes answer
404 (no generator), as OpenAI's do for an embedding model. A sampling field a request leaves out takes
the model's own default (`LM.sampling_params`: its generation_config.json, else slmkit's). /health and the chat
page need no key; /metrics needs it unless `public_metrics` (every other path needs it: deny by default).
docs/reliability-server.md lists what the server guarantees under bad input, load and faults.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response

from slmkit.chat import stop_strings
from slmkit.kb.ask import ANSWERS, MIN_SIMILARITY, QUOTE_SENTENCES, TOP_K
from slmkit.kb.index import open_kb
from slmkit.kb.quote import check_sentences
from slmkit.lm import generation_backend
from slmkit.lm.constraints import compile_grammar
from slmkit.sampling import SamplingParams
from slmkit.serve import escalate, guard, protocol, stream
from slmkit.serve.embeddings import add_embeddings_route
from slmkit.serve.engine import Engine, EngineStopped, GenerationRequest
from slmkit.serve.kb import Grounding
from slmkit.serve.metrics import CONTENT_TYPE, Metrics
from slmkit.serve.protocol import APIError, ChatBody, CompletionBody, SamplingBody
from slmkit.serve.support import Support, open_support, open_tickets
from slmkit.serve.support import add_routes as add_support_routes

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
    if getattr(body, "tools", None):
        from slmkit.serve.tools import check_tools, tool_grammar
        functions, choice = check_tools(body.tools, body.tool_choice)
        # one call per reply unless parallel_tool_calls is true: given the choice, a small model repeats its call
        # until max_tokens (SmolLM2-135M does, greedy), where OpenAI's models stop on their own
        grammar = tool_grammar(functions, choice, parallel=body.parallel_tool_calls is True)
        if grammar is not None:
            given.append(("tools", {"grammar": grammar}))
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


def content_text(lm, parts: list, i: int, images: list) -> str:
    """A message's content parts as its text: text parts joined; each image_url part (a data: URL) decoded into
    `images` and written as the model's image token, at the start of the text as LLaVA's training places it
    ("<image>\n question"). A model with no vision part answers 400."""
    texts, tokens = [], []
    for j, p in enumerate(parts):
        where = f"messages.{i}.content.{j}"
        if p.type == "text" and p.text is not None:
            texts.append(p.text)
        elif p.type == "image_url" and p.image_url is not None:
            if not getattr(lm, "accepts_images", False):
                raise APIError(400, f"this model has no vision part ({type(lm).__name__}): image_url content needs a "
                                    "vision model (slm quickstart vision) on the torch backend", param=where)
            from slmkit.data.vision import read_image
            data = protocol.decode_image_url(p.image_url.url, f"{where}.image_url.url")
            try:
                images.append(read_image(data, lm.tower.cfg.image_size, name=f"{where}.image_url"))
            except ValueError as e:
                raise APIError(400, str(e), param=f"{where}.image_url.url") from e
            tokens.append(lm.image_token + "\n")
        else:
            raise APIError(400, "only text and image_url content parts are supported", param=where)
    return "".join(tokens) + "".join(texts)


def check_limits(**limits: float) -> None:
    """Each server limit is a positive number (`--max-batch 0` would leave requests waiting for ever); the
    error names the option."""
    for name, value in limits.items():
        if isinstance(value, bool) or not isinstance(value, int | float) or not value > 0 or value == float("inf"):
            raise ValueError(f"--{name.replace('_', '-')} is {value!r}; it must be a number above 0")


class App(FastAPI):
    """FastAPI, handing the Guard a way to drop a stalled client's connection.

    ASGI gives an app no way to abort a connection, and closing it (what uvicorn does when a response is left
    unfinished) waits to flush what is buffered, which a client that stopped reading never takes: the socket
    would stay open. uvicorn's `send` is a method of its request cycle, which holds the transport; when that
    is so, `scope["slmkit.abort"]` aborts it (else the connection is closed the ordinary way).
    """

    async def __call__(self, scope, receive, send):
        transport = getattr(getattr(send, "__self__", None), "transport", None)
        if scope["type"] == "http" and hasattr(transport, "abort"):
            scope["slmkit.abort"] = transport.abort
        await super().__call__(scope, receive, send)


def create_app(engine: Engine, model_name: str, api_key: str | None = None, max_body_bytes: int = 1_000_000,
               request_timeout_s: float = 300.0, public_metrics: bool = False, max_concurrency: int = 256,
               write_timeout_s: float = 30.0, escalation: escalate.Escalation | None = None,
               grounding: Grounding | None = None, support: Support | None = None) -> FastAPI:
    """The OpenAI-compatible app over `engine` (see the module docstring); `api_key` guards every route but the
    chat page and /health (and /metrics with `public_metrics`). More than `max_concurrency` requests at once are
    answered 503; a client that takes more than `write_timeout_s` to read the next piece is dropped.
    `escalation` makes chat completions a cascade (escalate.py); `grounding` answers them from a knowledge base,
    with citations (kb.py); `support` adds the agent page and the ticket routes, and with its assistant answers
    chat completions as the customer-service assistant (support.py)."""
    check_limits(max_body_bytes=max_body_bytes, request_timeout=request_timeout_s, max_concurrency=max_concurrency,
                 write_timeout=write_timeout_s)
    metrics = Metrics()
    if escalation is not None:
        metrics.answered = {"small": 0, "large": 0}  # counted from 0, so a dashboard sees both from the start
    lm, created = engine.lm, int(time.time())
    encoder = engine.embedder
    # who embeds answers in the `model` field: the encoder by its name (the served model's, when it is the model)
    embedding_model = model_name if lm is None or encoder is None else getattr(encoder, "name", model_name)
    names = [model_name] + ([embedding_model] if embedding_model != model_name else [])
    adapter_names = list(lm.adapters.names) if getattr(lm, "adapters", None) is not None else []
    names += [f"{model_name}:{a}" for a in adapter_names]

    def check_generator(route: str) -> None:
        if lm is None:
            raise APIError(404, f"{model_name} is an embedding model: this server has no generator for {route} "
                                "(it serves /v1/embeddings only; serve a decoder, with --embedder ENCODER for both)",
                           param="model", code="model_not_supported")
    # openapi_url=None: the schema is not served (tests/test_fuzz_api.py fuzzes the routes from app.openapi())
    app = App(title="slmkit", docs_url=None, redoc_url=None, openapi_url=None)
    app.add_middleware(guard.Guard, api_key=api_key, max_body_bytes=max_body_bytes, metrics=metrics,
                       public_metrics=public_metrics, max_concurrency=max_concurrency,
                       write_timeout_s=write_timeout_s)
    protocol.add_error_handlers(app)
    if support is not None:
        add_support_routes(app, support.tickets)

    async def generate(request: Request, body: SamplingBody, prompts: list[list[int]], params: SamplingParams,
                       n: int, logprobs: int | None, chat: bool, what: str, images: list | None = None,
                       annotate=None, append=None) -> Response:
        """Submit one generation per prompt, n choices each; answer with all of them, or stream them."""
        t0 = time.perf_counter()
        adapter = protocol.requested_adapter(body.model, model_name, adapter_names)
        grammar = await compile_structured_output(engine.tokenizer, body)
        requests = [GenerationRequest(ids, params, n=n, logprobs=logprobs, grammar=grammar, adapter=adapter,
                                      images=images or None)
                    for ids in prompts]
        pendings = guard.submit_all(engine, requests, what)
        deadline = asyncio.get_running_loop().time() + request_timeout_s
        include_usage = bool(body.stream and body.stream_options and body.stream_options.include_usage)
        tools = bool(getattr(body, "tools", None)) and getattr(body, "tool_choice", None) != "none"
        answered_by = model_name if adapter is None else f"{model_name}:{adapter}"
        choices = protocol.Choices(engine.tokenizer, answered_by, chat, n, n * len(prompts), logprobs is not None,
                                   sum(len(p) for p in prompts), include_usage, tools=tools, annotate=annotate,
                                   append=append)

        def record_ttft() -> None:
            if choices.first_token_at is not None:
                metrics.ttft.observe(choices.first_token_at - t0)

        if body.stream:
            return stream.event_stream(choices, pendings, deadline, request_timeout_s, on_close=record_ttft)
        try:
            finished = await stream.collect(request, choices, pendings, deadline)
        except TimeoutError:
            raise guard.timeout_error(request_timeout_s) from None
        except EngineStopped as e:
            raise guard.engine_stopped(e) from e
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
        return protocol.html_page(CHAT_PAGE, "chat page")

    @app.get("/health")
    async def health():
        state = {"model": model_name, "queue_depth": engine.queue_depth, "requests_active": metrics.active}
        if not engine.alive:  # a load balancer takes it out; the error says why, in OpenAI's shape
            error = guard.engine_stopped(engine.error or EngineStopped("the engine is closed"))
            return JSONResponse({"status": "unhealthy", **state, **error.body()}, status_code=503)
        return {"status": "ok", **state}

    @app.get("/metrics")
    async def prometheus():
        return Response(metrics.render(engine), media_type=CONTENT_TYPE)

    @app.get("/v1/models")
    async def list_models():
        return {"object": "list", "data": [protocol.model_card(name, created) for name in names]}

    @app.get("/v1/models/{model:path}")
    async def get_model(model: str):
        if model not in names:
            raise APIError(404, f"the model {model!r} does not exist; this server serves {' and '.join(names)}",
                           param="model", code="model_not_found")
        return protocol.model_card(model, created)

    @app.post("/v1/completions")
    async def completions(request: Request, body: CompletionBody):
        check_generator("/v1/completions")
        guard.check_unicode(body.model_dump(by_alias=True))
        n = guard.check_n(body.n)
        guard.check_logprobs(body.logprobs, "logprobs")
        if body.echo:
            raise APIError(400, "echo=true is not supported: the response holds only the completion; prepend the "
                                "prompt yourself", param="echo")
        prompts = [body.prompt] if isinstance(body.prompt, str) else body.prompt
        guard.check_prompts(prompts, n, engine.max_queue)
        ids = [lm.encode_prompt(p) for p in prompts]
        params = sampling(lm, body, 16 if body.max_tokens is None else body.max_tokens)  # OpenAI's default 16
        return await generate(request, body, ids, params, n, body.logprobs, chat=False, what="prompt")

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request, body: ChatBody):
        check_generator("/v1/chat/completions")
        guard.check_unicode(body.model_dump(by_alias=True))
        n = guard.check_n(body.n)
        guard.check_logprobs(body.top_logprobs, "top_logprobs")
        tok = engine.tokenizer
        if tok.chat_template is None:
            raise APIError(400, "this model's tokenizer has no chat template; use /v1/completions",
                           param="messages")
        messages, images = [], []
        for i, m in enumerate(body.messages):
            message = m.model_dump(exclude_none=True)
            if isinstance(m.content, list):
                message["content"] = content_text(lm, m.content, i, images)
            message.setdefault("content", "")
            messages.append(message)
        if support is not None and support.assistant is not None:
            if images:
                raise APIError(400, "image questions are not answered by the support assistant", param="messages")
            return await support.reply(tok, model_name, body, messages)
        annotate = append = None
        if grounding is not None:
            if images:
                raise APIError(400, "image questions are not answered with --kb", param="messages")
            grounding.check_request(body)
            hits = await grounding.retrieve(messages)
            if not grounding.answerable(hits):
                return grounding.abstention(tok, model_name, body, hits)
            quote = await grounding.quote(messages, hits)
            if grounding.answer == "quote":
                return grounding.quoted(tok, model_name, body, hits, quote)
            messages = grounding.prompt(messages, hits)
            append = grounding.appender(quote)

            def annotate(text):
                return grounding.info(hits, text, quote=quote)
        extra = {}
        if body.tools:
            from slmkit.serve.tools import check_tools, render_messages
            functions, choice = check_tools(body.tools, body.tool_choice)
            messages, extra = render_messages(messages, functions if choice != "none" else [], tok)
        elif body.tool_choice not in (None, "none", "auto"):
            raise APIError(400, "tool_choice needs tools", param="tool_choice")
        try:
            text = tok.apply_chat_template(messages, add_generation_prompt=True, **extra)
        except Exception as e:  # the template's raise_exception (e.g. roles must alternate), a missing field
            raise APIError(400, f"the chat template rejected the messages: {e}", param="messages") from e
        ids = lm.encode_prompt(text)
        if getattr(lm, "accepts_images", False):
            try:
                lm.check_images(ids, images)  # e.g. an `<image>` typed as text, or two images
            except ValueError as e:
                raise APIError(400, str(e), param="messages") from e
        if body.top_logprobs is not None and not body.logprobs:
            raise APIError(400, "top_logprobs needs logprobs=true", param="top_logprobs")
        # without max_tokens, the reply may fill the rest of the context
        max_tokens = body.max_completion_tokens or body.max_tokens or max(1, engine.max_length - len(ids))
        params = sampling(lm, body, max_tokens, stop_strings(tok))
        logprobs = (body.top_logprobs or 0) if body.logprobs else None
        if images and escalation is not None:
            raise APIError(400, "image questions are not escalated: serve without --escalate-to", param="messages")
        if images:
            return await generate(request, body, [ids], params, n, logprobs, chat=True, what="messages",
                                  images=images)
        if escalation is not None:
            tool_grammar = await compile_structured_output(tok, body) if body.tools else None
            return await escalate.chat(engine, escalation, metrics, request, body, messages, ids, params, n, logprobs,
                                       model_name, request_timeout_s, grammar=tool_grammar)
        return await generate(request, body, [ids], params, n, logprobs, chat=True, what="messages",
                              annotate=annotate, append=append)

    add_embeddings_route(app, engine, embedding_model, request_timeout_s)

    return app


def _is_encoder(spec: str) -> bool:
    """Whether `spec` names a BERT/RoBERTa encoder (a directory, or a pulled one such as minilm-l6-v2)."""
    from slmkit.formats.encoder_dir import is_encoder_dir
    from slmkit.hub import resolve_model
    try:
        ref = resolve_model(spec, kinds=("model", "embedding"))
    except (ValueError, FileNotFoundError):
        return False  # not a pulled name: load_lm gives the error a model would get
    return ref.kind == "dir" and is_encoder_dir(ref.location)


def _load_encoder(spec: str, option: str):
    from slmkit.lm.embedder import Embedder, load_embedder
    if not _is_encoder(spec):
        raise ValueError(f"{option} {spec}: not an encoder (a BERT/RoBERTa directory or minilm-l6-v2); "
                         "a decoder's embeddings are served without --embedder")
    embedder = load_embedder(spec)
    assert isinstance(embedder, Embedder)
    return embedder


def serve(model: str, host: str = "127.0.0.1", port: int = 8000, api_key: str | None = None, backend: str = "auto",
          max_batch: int = 16, max_queue: int = 64, max_body_bytes: int = 1_000_000,
          request_timeout_s: float = 300.0, device: str = "cpu", log_level: str = "info",
          adapter: str | Path | list[str] | None = None, weights: str = "fp32", draft: str | None = None,
          draft_k: int = 4, public_metrics: bool = False, max_concurrency: int = 256,
          write_timeout_s: float = 30.0, escalate_to: str | None = None,
          calibration: str | Path | None = None, target_error: float = 0.05, embedder: str | None = None,
          prefix_cache_mb: float = 512, llama_server_bin: str | Path | None = None, kb: str | Path | None = None,
          kb_k: int = TOP_K, kb_min_similarity: float = MIN_SIMILARITY, support_tickets: str | Path | None = None,
          intents: str | Path | None = None, catalogue: str | Path | None = None, kb_answer: str = "model",
          kb_quote_sentences: int = QUOTE_SENTENCES) -> None:
    """Load `model` (anything `load_lm` opens), start the engine and serve the API with uvicorn until stopped.
    `prefix_cache_mb`: memory for recent prompts' keys and values, reused by prompts that begin the same way
    (torch backend; 0: off).
    `adapter`: a LoRA adapter applied unmerged (slmkit's torch backend; "auto" picks it), or a list of "NAME=DIR"
    adapters loaded side by side, one chosen per request by its model "MODEL:NAME" (split_adapters).
    `weights`: fp32, bf16 or int8 (torch backend; "auto" picks it when not fp32). `draft`: decode speculatively
    (lm/speculative.py) with this draft model or "ngram"; the target runs on the torch backend ("auto" picks it).
    Both speculate inside continuous batching (engine.py: every row drafts by prompt lookup, or the draft model's
    rows beside the target's draft for all rows at once); a draft model with a shorter context than the target's
    is served one request at a time.

    The API key is `api_key`, else $SLM_API_KEY; without one the routes are open (a warning is logged
    when the address is not loopback). Nonsense limits (`max_batch` 0, a negative timeout) are refused before
    the model loads.
    `escalate_to` (a model, URL or queue:FILE.jsonl) with `calibration` (a file from `slm cascade calibrate`)
    answers chat completions by a cascade for `target_error` (escalate.py).
    `embedder` (an encoder directory or pulled encoder) answers /v1/embeddings; an encoder as `model` serves
    embeddings only (no generator: the completion routes answer 404).
    backend "llama-server": llama.cpp's C++ server does the generating, started on the model's GGUF with
    `max_batch` slots (`llama_server_bin`, else found as llama_server.find_llama_server says) behind slmkit's
    front (proxy.py); stopped when this returns.
    `kb` (a folder from `slm kb index`) grounds chat completions in it: the `kb_k` best chunks as numbered
    sources, an abstention below `kb_min_similarity`, the citations in the response (kb.py); `kb_answer`: model,
    quote (the sources' best `kb_quote_sentences` passages, no model call) or model+quote (kb.py).
    `support_tickets` (a .sqlite ticket store) serves the agent page at /agent, where people answer and close
    the hand-offs (support.py), with any backend; with `kb` (then the help center) and `intents` (a classifier
    directory or a descriptions JSON; `catalogue`: the product CSV), chat completions are the customer-service
    assistant's turns instead of grounded answers, its hand-offs tickets in that store.
    """
    import sys

    import torch
    import uvicorn

    check_limits(max_batch=max_batch, max_queue=max_queue, max_body_bytes=max_body_bytes,
                 request_timeout=request_timeout_s, max_concurrency=max_concurrency, write_timeout=write_timeout_s)
    if not 0 <= port <= 65535:
        raise ValueError(f"--port is {port}; it must be 0 to 65535")
    if escalate_to is not None and calibration is None:
        raise ValueError("--escalate-to needs --calibration FILE (write one with `slm cascade calibrate MODEL --dev "
                         "FILE -o FILE`)")
    adapter, adapters = split_adapters(adapter)
    if adapters and escalate_to is not None:
        raise ValueError("--adapter NAME=DIR is not served with --escalate-to (the calibration is the base model's)")
    if kb is not None and escalate_to is not None:
        raise ValueError("--kb is not served with --escalate-to (the calibration is for ungrounded replies); use one")
    if intents is not None and not (support_tickets and kb):
        raise ValueError("--intents is the support assistant's: give it with --support TICKETS.sqlite and --kb "
                         "HELP-CENTER-KB")
    if support_tickets and kb and not intents:
        raise ValueError("--support with --kb serves the support assistant: give --intents (a classifier directory "
                         "or a JSON file of intent descriptions, e.g. examples/support-intents.json)")
    if kb is not None and not 1 <= kb_k <= 20:
        raise ValueError(f"--kb-k is {kb_k}; show the model 1 to 20 sources")
    if kb_answer not in ANSWERS:
        raise ValueError(f"unknown answer mode {kb_answer!r} (--kb-answer); choose one of {', '.join(ANSWERS)}")
    if kb_answer != "model" and (kb is None or support_tickets is not None):
        raise ValueError(f"--kb-answer {kb_answer} answers from a knowledge base: give --kb (and not --support, "
                         "whose assistant quotes its articles itself)")
    check_sentences(kb_quote_sentences)
    if escalate_to is not None and draft is not None:
        raise ValueError("--escalate-to reads every token's log-probs: with --draft ngram its requests would not "
                         "speculate, and a draft model's one-request-at-a-time engine gives none; use one")
    if device == "cpu":
        # Leave a core to the HTTP event loop: with every core in the model's thread pool, the pool's spinning
        # workers and the event loop fight (measured on 2 cores, stories15m, 16 clients: 267 -> 364 tokens/s).
        torch.set_num_threads(max(1, (os.cpu_count() or 2) - 1))
    sys.setswitchinterval(0.001)  # hand the GIL between engine and event loop sooner (5 ms by default)
    if backend == "auto":
        backend = auto_backend(model, device, weights, engine_only=bool(adapters) or any(
            x is not None for x in (adapter, draft, escalate_to, kb)))  # (--embedder runs beside llama-server)
    if backend == "llama-server":
        return _serve_llama_server(model, host, port, api_key, max_batch, max_queue, max_body_bytes,
                                   request_timeout_s, log_level, public_metrics, max_concurrency, write_timeout_s,
                                   llama_server_bin, support_tickets, embedder, adapter, adapters,
                                   refused={"--draft": draft,
                                            "--escalate-to": escalate_to, "--kb": kb,
                                            "--weights": None if weights == "fp32" else weights})
    only_embeddings = _is_encoder(model)
    if only_embeddings and (embedder is not None or escalate_to is not None or draft is not None
                            or adapter is not None or adapters or kb is not None):
        raise ValueError(f"{model} is an encoder: it serves embeddings only, without --embedder, --draft, --adapter, "
                         "--kb or --escalate-to")
    opened_kb = open_kb(kb) if kb is not None else None
    grounding = (Grounding(opened_kb, k=kb_k, min_similarity=kb_min_similarity, answer=kb_answer,
                           quote_sentences=kb_quote_sentences)
                 if opened_kb is not None and support_tickets is None else None)
    tickets = open_tickets(support_tickets) if support_tickets is not None else None  # before the model loads
    lm = escalation = None
    if only_embeddings:
        log.info("serving %s: embeddings only (an encoder has no generator)", model)
        encoder = _load_encoder(model, "MODEL")
    else:
        encoder = _load_encoder(embedder, "--embedder") if embedder is not None else None
        lm, escalation = _load_generator(model, backend, device, weights, adapter, adapters, draft, draft_k,
                                         escalate_to, calibration, target_error)
    engine = Engine(lm, max_batch=max_batch, max_queue=max_queue, embedder=encoder, prefix_cache_mb=prefix_cache_mb)
    support = (open_support(tickets, engine, opened_kb, intents, catalogue, timeout_s=request_timeout_s)
               if tickets is not None else None)
    app = create_app(engine, model, api_key=guard.resolve_api_key(api_key, host), max_body_bytes=max_body_bytes,
                     request_timeout_s=request_timeout_s, public_metrics=public_metrics,
                     max_concurrency=max_concurrency, write_timeout_s=write_timeout_s, escalation=escalation,
                     grounding=grounding, support=support)
    try:
        # uvicorn's own connection limit is a backstop past the app's (its 503 is plain text, the app's is
        # OpenAI's shape): idle keep-alive connections count there, not in the app.
        uvicorn.run(app, host=host, port=port, log_level=log_level, limit_concurrency=2 * max_concurrency,
                    timeout_keep_alive=5)
    finally:
        engine.close()
        if lm is not None:
            lm.close()
        if escalation is not None:
            escalation.large.close()
        if opened_kb is not None:
            opened_kb.close()
        if support is not None:
            support.tickets.close_store()
            if support.assistant is not None and support.assistant.queue is not None:
                support.assistant.queue.close()


def auto_backend(model: str, device: str = "cpu", weights: str = "fp32", engine_only: bool = False) -> str:
    """What `slm serve --backend auto` serves `model` with: "llama-server" when a llama-server binary is found
    (llama_server.find_llama_server), on a CPU, for a local decoder (not an encoder or a vision model) with fp32
    weights asked and no option that needs slmkit's engine (`engine_only`: --adapter, --draft, --escalate-to,
    --embedder); else "auto", left to `generation_backend` (llama.cpp in-process when installed, else torch).

    The rule is the measurement in BENCHMARKS.md ("Serving: slm serve vs llama-server"): fronting llama-server
    served the most tokens a second on SmolLM2-135M at 1, 4, 16 and 32 clients (1.2x to 1.9x the in-process
    llama.cpp engine, 3.7x to 13x torch int8) and as much as llama-server itself (0.94x to 1.03x); only on a 15M
    model at 16+ clients did the torch int8 engine serve more (1.1x to 1.3x): `--backend torch --weights int8`."""
    from slmkit.serve.llama_server import find_llama_server
    if engine_only or device != "cpu" or weights != "fp32" or _is_encoder(model):
        return "auto"
    try:
        find_llama_server()
    except FileNotFoundError:
        return "auto"
    from slmkit.formats.vision_dir import is_vision_dir
    from slmkit.hub import resolve_model
    try:
        ref = resolve_model(model)
    except (ValueError, FileNotFoundError):
        return "auto"  # load_lm gives the error
    if ref.kind == "remote" or (ref.kind == "dir" and is_vision_dir(ref.location)):
        return "auto"
    try:
        ref.gguf_file(create=True)  # written once into the cache for a model directory; llama-server needs it
    except ValueError:  # e.g. a tokenizer llama.cpp cannot reproduce exactly
        return "auto"
    return "llama-server"


def _serve_llama_server(model, host, port, api_key, max_batch, max_queue, max_body_bytes, request_timeout_s,
                        log_level, public_metrics, max_concurrency, write_timeout_s, binary, support_tickets,
                        embedder, adapter, adapters: dict, refused: dict) -> None:
    import uvicorn

    from slmkit.hub import lora_gguf, resolve_model
    from slmkit.serve.llama_server import find_llama_server, llama_server_lora_args, start_llama_server
    from slmkit.serve.proxy import create_proxy_app
    given = [name for name, value in refused.items() if value is not None]
    if given:
        raise ValueError(f"{', '.join(given)} need slmkit's own engine; the llama-server backend serves the GGUF as "
                         "it is (use --backend torch or llamacpp)")
    binary = find_llama_server(binary)  # before converting anything: a missing binary is the likelier error
    ref = resolve_model(model)
    if ref.kind == "remote":
        raise ValueError(f"{model} is a remote endpoint: serve a local model with --backend llama-server")
    tickets = open_tickets(support_tickets) if support_tickets is not None else None
    # an --embedder encoder embeds in-process, in an engine of its own (llama-server serves a generator or, with
    # --embeddings, embeddings only: not both from one process)
    embeddings = (Engine(None, max_batch=max_batch, max_queue=max_queue,
                         embedder=_load_encoder(embedder, "--embedder")) if embedder is not None else None)
    base = ref.gguf_file(create=True)
    # LoRA adapters as llama.cpp's LoRA GGUFs, applied unmerged by llama-server: a single --adapter DIR to every
    # request; NAME=DIR adapters loaded at scale 0, each request's `model` choosing one (proxy.py)
    loras = [lora_gguf(a, base) for a in ([adapter] if adapter is not None else adapters.values())]
    lora_args = llama_server_lora_args(loras, per_request=bool(adapters))
    server = start_llama_server(base, binary, parallel=max_batch, alias=model, extra_args=lora_args)
    try:
        app = create_proxy_app(server.url, model, max_requests=max_batch + max_queue, tickets=tickets,
                               embeddings=embeddings, adapters=list(adapters),
                               api_key=guard.resolve_api_key(api_key, host), max_body_bytes=max_body_bytes,
                               request_timeout_s=request_timeout_s, public_metrics=public_metrics,
                               max_concurrency=max_concurrency, write_timeout_s=write_timeout_s,
                               upstream_alive=server.alive)
        uvicorn.run(app, host=host, port=port, log_level=log_level, limit_concurrency=2 * max_concurrency,
                    timeout_keep_alive=5)
    finally:
        server.close()
        if embeddings is not None:
            embeddings.close()
        if tickets is not None:
            tickets.close_store()


def split_adapters(values: str | Path | list | None) -> tuple[str | None, dict[str, str]]:
    """`--adapter` values as (one adapter for every request, {name: directory} chosen per request): DIR is the
    first, NAME=DIR (repeatable) the second; the two don't mix."""
    if values is None or isinstance(values, str | Path):
        return (None if values is None else str(values)), {}
    single, named = [], {}
    for value in map(str, values):
        name, sep, path = value.partition("=")
        if sep and "/" not in name and name:
            from slmkit.model.multi_lora import check_adapter_name
            if name in named:
                raise ValueError(f"--adapter {value}: the name {name!r} is given twice")
            named[check_adapter_name(name)] = path
        else:
            single.append(value)
    if len(single) > 1 or (single and named):
        raise ValueError(f"--adapter {single[-1]}: give each adapter a name (--adapter NAME=DIR, chosen per request "
                         "by its model MODEL:NAME), or serve a single --adapter DIR")
    return (single[0] if single else None), named


def _load_generator(model, backend, device, weights, adapter, adapters, draft, draft_k, escalate_to, calibration,
                    target_error):
    """The served LM (and the escalation target, with `escalate_to`), as `serve` describes."""
    from slmkit.lm import load_lm
    if (adapter is not None or adapters or draft is not None) and backend == "auto":
        # the torch engine batches rows of different adapters together (llama-server batches only requests with
        # the same adapters), and a draft is verified in slmkit's own slot cache
        backend = "torch"
    backend, model_arg, options = generation_backend(model, backend, device, weights)
    if draft is not None and "logits_all" in options:
        options["logits_all"] = True  # llama.cpp verifying drafted tokens reads every row's logits
    log.info("serving %s with the %s backend (%s weights)%s%s", model, backend, weights,
             f" and adapter {adapter}" if adapter else f" and adapters {', '.join(adapters)}" if adapters else "",
             f", draft {draft}" if draft else "")
    escalation = (escalate.load_escalation(escalate_to, calibration, target_error, device)
                  if escalate_to is not None else None)
    lm = load_lm(model_arg, backend=backend, device=device, weights=weights, adapter=adapter,
                 adapters=adapters or None, draft=draft, draft_k=draft_k, **options)
    if lm.tokenizer is None:
        lm.close()
        raise ValueError(f"{model} has no local tokenizer (a remote endpoint?); serve a local model")
    return lm, escalation
