"""POST /v1/embeddings over an engine: the one route both fronts serve (app.py over slmkit's engine, proxy.py in
front of llama-server, where an `--embedder` encoder runs in an engine of its own beside the upstream)."""

from __future__ import annotations

import asyncio

from fastapi import FastAPI
from fastapi.responses import JSONResponse

from slmkit.serve import guard, protocol
from slmkit.serve.engine import EmbeddingRequest, Engine, EngineStopped
from slmkit.serve.protocol import APIError, EmbeddingBody


def add_embeddings_route(app: FastAPI, engine: Engine, model_name: str, request_timeout_s: float) -> None:
    """The route, answered by `engine`'s encoder, else its LM's hidden states; `model_name` is the response's
    `model` (whoever embeds)."""
    lm, encoder = engine.lm, engine.embedder

    @app.post("/v1/embeddings")
    async def embeddings(body: EmbeddingBody):
        """The encoder's sentence embeddings when the server has one (`Embedder.embed`), else mean-pooled final
        hidden states, L2-normalised (`TorchLM.embed`): only slmkit's own model exposes hidden states; other
        backends answer 400. They run on the engine thread, admitted like a generation (a full queue is a 429),
        and a request past its time stops there (504). Tokens are counted, and checked against the context,
        with the tokenizer of whichever embeds."""
        from slmkit.lm.torch_lm import TorchLM
        guard.check_unicode(body.model_dump(by_alias=True))
        if encoder is None and not isinstance(lm, TorchLM):
            raise APIError(400, f"embeddings need slmkit's own model (backend torch), not {type(lm).__name__}, "
                                "or an encoder (slm serve MODEL --embedder ENCODER)", param="model")
        inputs = [body.input] if isinstance(body.input, str) else body.input
        dim = encoder.dim if encoder is not None else lm.model.cfg.dim
        if body.dimensions is not None and body.dimensions != dim:
            raise APIError(400, f"this model's embeddings have {dim} dimensions", param="dimensions")
        # to check them and count them; embed encodes its own
        if encoder is not None:
            ids, context = [encoder.token_ids(text) for text in inputs], encoder.max_length
        else:
            ids, context = [lm.encode_prompt(text) for text in inputs], engine.max_length
        guard.check_embedding_inputs(ids, context)
        (pending,) = guard.submit_all(engine, [EmbeddingRequest(inputs)], "input")
        try:
            async with asyncio.timeout(request_timeout_s):
                vectors = await pending.events.get()
        except TimeoutError:
            raise guard.timeout_error(request_timeout_s) from None
        finally:
            pending.cancelled = True  # after a timeout (or a disconnect), the engine drops the rest
        if isinstance(vectors, EngineStopped):
            raise guard.engine_stopped(vectors)
        if isinstance(vectors, BaseException):
            raise APIError(500, f"embedding failed: {vectors}", type="server_error") from vectors
        n_tokens = sum(len(x) for x in ids)
        return JSONResponse(protocol.embeddings_response(vectors.numpy(), body.encoding_format, model_name,
                                                         n_tokens))
