"""The generation engine behind `slm serve`: requests in, token events out, on one background thread.

The server only talks to `Engine`:

    engine = Engine(lm, max_batch=16, max_queue=64)
    async for event in engine.generate(GenerationRequest(prompt_ids, params, n=2, logprobs=3)):
        ...   # TokenEvent(index, text, token_id, logprob, top_logprobs, finish_reason)

`submit` raises QueueFull when the bounded queue is full (the server answers 429) and PromptTooLong when the
prompt plus max_tokens exceed the context (400). Leaving the `async for` early (a client disconnecting)
cancels the request at the next token boundary and frees its slot. Embeddings (`EmbeddingRequest`) queue the
same way and run on the engine thread between decoding steps, a few inputs at a time, so a cancelled one stops;
an `embedder` (an encoder, lm/embedder.py) answers them instead of the model, and an engine with an embedder and
no model (`slm serve ENCODER`) serves embeddings only.

Two bounds keep one client from holding the engine's memory: a request whose events pile up unread (its
client stopped reading, `max_events` of them) is cancelled with `SlowReader`; and if the engine thread itself
dies, `alive` turns False, every request waiting on it fails at once with `EngineStopped`, and so does every
later `submit`.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import queue
import random
import threading
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field

import torch

from slmkit.lm.base import LM, end_ids
from slmkit.lm.constraints import Matcher
from slmkit.lm.llamacpp_lm import LlamaCppLM
from slmkit.lm.speculative import NGRAM, Acceptance, SpeculativeLM, draw_draft, prompt_lookup, recent_ids, verify
from slmkit.lm.torch_lm import TorchLM
from slmkit.sampling import SamplingParams, TextStream, sample_next, token_probs
from slmkit.serve.batch_torch import DraftedBatch, TorchBatch

log = logging.getLogger("slmkit.serve")


class QueueFull(Exception):
    """Too many requests are waiting; retry after `retry_after` seconds."""

    def __init__(self, retry_after: float = 1.0):
        super().__init__(f"the server is busy; retry after {retry_after:.0f} s")
        self.retry_after = retry_after


class PromptTooLong(ValueError):
    pass


class EngineStopped(RuntimeError):
    """The engine thread is not running (closed, or it died): nothing submitted will be answered."""


class SlowReader(RuntimeError):
    """A request's events piled up unread (its client stopped reading): it was cancelled."""


EMBED_CHUNK = 8  # embedding inputs run between two decoding steps (a cancelled request stops after at most these)


@dataclass
class GenerationRequest:
    prompt_ids: list[int]
    params: SamplingParams
    n: int = 1  # independent choices (seeds seed, seed+1, ...)
    logprobs: int | None = None  # also report the top-k alternatives of every generated token
    grammar: str | None = None  # every choice keeps to it (slmkit.lm.constraints.compile_grammar's)
    adapter: str | None = None  # one of the LoRA adapters loaded side by side (`lm.adapters`); None: the base
    images: list | None = None  # uint8 (S, S, 3) arrays, one per image token of the prompt (a VisionLM's)


@dataclass
class EmbeddingRequest:
    texts: list[str]  # each already checked to fit the context (the server counts their tokens)
    n: int = 1  # one queue entry; the engine's admission treats it as one choice


@dataclass
class TokenEvent:
    index: int  # which of the n choices
    text: str  # the new text ("" when a piece is held back, e.g. a partial UTF-8 character or a stop string)
    token_id: int | None = None
    logprob: float | None = None
    top_logprobs: dict[str, float] | None = None
    finish_reason: str | None = None  # "stop" (eos or stop string) | "length" | None while running


@dataclass
class EngineStats:
    requests_total: int = 0
    requests_active: int = 0
    queue_depth: int = 0
    prompt_tokens_total: int = 0
    completion_tokens_total: int = 0
    busy_seconds: float = 0.0
    prefix_cache_hits: int = 0  # prompts that started from a cached prefix
    prefix_tokens_reused: int = 0  # prompt tokens not recomputed thanks to it
    extra: dict = field(default_factory=dict)


@dataclass
class _Choice:
    """One running sequence: a choice of a request."""

    request: _Pending
    index: int
    generator: torch.Generator | None
    text: TextStream
    last_token: int = 0
    n_generated: int = 0
    finished: bool = False
    generated: list[int] = field(default_factory=list)  # for the repetition penalty and prompt lookup
    matcher: Matcher | None = None  # the request's grammar, this choice's place in it
    acceptance: Acceptance = field(default_factory=Acceptance)  # its drafts' running acceptance rate
    draft_behind: list[int] = field(default_factory=list)  # tokens before last_token its draft model has not seen


class _Pending:
    """A submitted request: where its events go, and whether its client is still listening."""

    def __init__(self, request: GenerationRequest | EmbeddingRequest, loop: asyncio.AbstractEventLoop,
                 max_events: int):
        self.request = request
        self.loop = loop
        self.events: asyncio.Queue = asyncio.Queue()
        self.cancelled = False
        self.done = False  # its last event (None) was sent
        self.remaining = request.n  # choices not finished yet
        self.max_events = max_events
        self.embedded: list[torch.Tensor] = []  # an EmbeddingRequest's vectors so far

    def emit(self, event: TokenEvent | BaseException | torch.Tensor | None) -> None:
        if self.done:
            return
        if isinstance(event, TokenEvent) and self.events.qsize() >= self.max_events:
            # Nobody is reading (a stalled client): stop generating for it instead of queueing without bound.
            self.cancelled = True
            event = SlowReader(f"{self.max_events} events were waiting unread: the client stopped reading")
        try:
            self.loop.call_soon_threadsafe(self.events.put_nowait, event)
        except RuntimeError:  # the listener's event loop is closed: nobody is listening any more
            self.cancelled = True
        if isinstance(event, SlowReader):
            self.finish()

    def fail(self, error: BaseException) -> None:
        """End the request with `error` (its listener raises it)."""
        self.emit(error)
        self.finish()

    def finish(self) -> None:
        if not self.done:
            self.emit(None)
            self.done = True
        self.cancelled = True


def batch_decoder(lm: LM, max_batch: int, prefix_cache_mb: float = 0):
    """The backend's batched decoder, or None: one request at a time.

    What every batched decoder gives the engine: `prefill(row, ids)` -> the (vocab,) logits after the prompt,
    placed in `row`; `decode(tokens)` -> (n, vocab) logits, one new token for each of rows 0..n-1;
    `move_row(src, dst)` (a row leaving: the last one takes its place); `n_active`; optionally `close()` and
    `prefixes` (its `hits` and `tokens_reused`: torch keeps `prefix_cache_mb` of recent prompts' keys and values,
    llama.cpp keeps finished sequences' cells for the next prompt that begins the same way).
    A speculative decoder also gives `decode_many(blocks)` -> (n, T, vocab), `room()` and `rollback(drop)`, and with
    a draft model `draft`, the draft's own decoder for the same rows (see Engine).
    """
    if isinstance(lm, TorchLM):
        return TorchBatch(lm, max_batch, prefix_cache_mb)
    if speculates(lm):
        if lm.draft == NGRAM:
            return TorchBatch(lm.target, max_batch, prefix_cache_mb)
        return DraftedBatch(lm.target, lm.draft, max_batch, prefix_cache_mb)
    if isinstance(lm, LlamaCppLM):
        from slmkit.serve.batch_llamacpp import LlamaCppBatch  # imports llama_cpp, as the LM itself does
        return LlamaCppBatch(lm, max_batch, reuse_prefixes=prefix_cache_mb > 0)
    return None


def speculates(lm: LM | None) -> bool:
    """Whether the engine decodes `lm` speculatively in its batch: slmkit's own model drafted for by prompt lookup
    or by another slmkit model whose context is at least the target's (its rows must hold every target row). Any
    other pair (llama.cpp, transformers, a shorter draft) runs one request at a time through `lm.stream_ids`."""
    if not isinstance(lm, SpeculativeLM) or not isinstance(lm.target, TorchLM):
        return False
    if lm.draft == NGRAM:
        return True
    return isinstance(lm.draft, TorchLM) and lm.draft.model.cfg.max_seq_len >= lm.target.model.cfg.max_seq_len


class Engine:
    """Continuous batching over slmkit's own model (TorchLM) and llama.cpp; other backends run one request at a time.

    With a batched decoder (see batch_decoder), up to `max_batch` sequences decode together: each step feeds every
    running sequence its last token in one batch, so weights are read once per step for all of them.
    New requests are prefilled and join between steps; finished or cancelled ones leave between steps.

    Given a `SpeculativeLM` with an "ngram" draft over a TorchLM (`slm serve MODEL --draft ngram`), every step is
    speculative: each row drafts up to k tokens by prompt lookup over its own prompt and output (k adapted to that
    row's acceptance rate, at most `lm.max_draft`), one (n, k + 1) forward scores every row's drafts, each row keeps
    what `speculative.verify` keeps (exact: greedy output is the target's own, sampled output has its
    distribution) and its cache rolls back past the rest. Rows that must not speculate (a grammar, log-probs) or
    find nothing to draft, or have one token left, draft nothing: their block is padded and they sample their one
    token as plain decoding does, from their block's first position (the same logits up to float rounding: a
    (n, T) forward's matmuls and attention kernel are not the (n, 1) step's); a step where no row drafts anything
    is a plain (n, 1) step, bit for bit.

    With a draft model (`--draft MODEL`, a TorchLM), the draft's rows mirror the target's in a cache of their own
    (DraftedBatch) and the drafting is batched too: each step first feeds every row's draft what it has not seen
    (its last token, and the last draft it had kept without feeding it) in one block, then up to k - 1 more
    (n, 1) draft steps, each row sampling its next draft from its own draft distribution q (after the same
    sampler chain as the target's; its argmax when greedy) with its own generator; one (n, k + 1) target forward
    verifies them all with q (exact as above), and both caches roll back past what each row rejected. Rows that
    never draft (a grammar, log-probs) keep only their prompt in the draft's cache.
    """

    def __init__(self, lm: LM | None, max_batch: int = 16, max_queue: int = 64, device: str | None = None,
                 max_events: int = 4096, embedder=None, prefix_cache_mb: float = 0):
        for name, value in (("max_batch", max_batch), ("max_queue", max_queue), ("max_events", max_events)):
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} is {value!r}; it must be a whole number >= 1")
        if lm is None and embedder is None:
            raise ValueError("an engine needs a language model, an embedder, or both")
        self.lm = lm  # None: an embeddings-only engine (`slm serve ENCODER`)
        self.embedder = embedder  # answers EmbeddingRequests instead of the LM (lm/embedder.py's Embedder)
        self.tokenizer = lm.tokenizer if lm is not None else embedder.tokenizer
        if not prefix_cache_mb >= 0:
            raise ValueError(f"prefix_cache_mb is {prefix_cache_mb!r}; it must be >= 0 (0: off)")
        self._batch = batch_decoder(lm, max_batch, prefix_cache_mb) if lm is not None else None
        self.max_batch = max_batch if self._batch is not None else 1
        self.max_queue = max_queue
        self.max_events = max_events  # events one request may have waiting unread (see SlowReader)
        self.max_length = lm.max_length if lm is not None else embedder.max_length
        self.stats = EngineStats()
        self.speculative = speculates(lm)
        if self.speculative:
            self.stats.extra.update(drafted_tokens=0, accepted_tokens=0)
        self._queue: queue.Queue[_Pending] = queue.Queue()
        self._closed = False
        self.error: BaseException | None = None  # why the engine thread died, if it did
        self._live: set[_Pending] = set()  # taken from the queue, not finished: failed if the thread dies
        self._thread = threading.Thread(target=self._run, name="slmkit-engine", daemon=True)
        self._thread.start()

    # --- called from the server's event loop ------------------------------------------------------------

    @property
    def alive(self) -> bool:
        """Whether the engine thread is running and answering requests."""
        return not self._closed and self.error is None and self._thread.is_alive()

    def _check_alive(self) -> None:
        if self.error is not None:
            raise EngineStopped(f"the engine stopped: {type(self.error).__name__}: {self.error}")
        if self._closed or not self._thread.is_alive():
            raise EngineStopped("the engine is closed")

    def submit(self, request: GenerationRequest | EmbeddingRequest) -> _Pending:
        self._check_alive()
        if isinstance(request, EmbeddingRequest):
            return self._enqueue(request, 0)
        n_prompt = len(request.prompt_ids)
        if n_prompt == 0:
            raise PromptTooLong("the prompt is empty")
        if n_prompt + request.params.max_new_tokens > self.max_length:
            raise PromptTooLong(f"prompt ({n_prompt} tokens) + max_tokens ({request.params.max_new_tokens}) "
                                f"exceeds the model's context of {self.max_length} tokens")
        if request.logprobs is not None and self._batch is None:
            raise ValueError(f"log-probs are not available from the {type(self.lm).__name__} backend")
        if request.images and (self._batch is not None or not getattr(self.lm, "accepts_images", False)):
            raise ValueError(f"images need a vision model, not {type(self.lm).__name__}")
        if request.grammar is not None and self._batch is None:  # its tokens are sampled inside the backend
            raise ValueError(f"structured output needs the torch or llama.cpp backend, not {type(self.lm).__name__}")
        if request.adapter is not None:
            bank = getattr(self.lm, "adapters", None)
            if bank is None or self._batch is None:
                raise ValueError(f"no adapter {request.adapter!r}: this model has no adapters loaded "
                                 "(slm serve MODEL --adapter NAME=DIR)")
            bank.slot(request.adapter)  # an unknown name: ValueError naming the loaded ones
        return self._enqueue(request, n_prompt * request.n)

    def _enqueue(self, request, prompt_tokens: int) -> _Pending:
        if self._queue.qsize() >= self.max_queue:
            raise QueueFull(retry_after=1.0)
        pending = _Pending(request, asyncio.get_running_loop(), self.max_events)
        self.stats.requests_total += 1
        self.stats.prompt_tokens_total += prompt_tokens
        self._queue.put(pending)
        if self.error is not None:  # it died while this was being queued: nobody else will answer it
            self._fail_queued()
        return pending

    async def generate(self, request: GenerationRequest) -> AsyncIterator[TokenEvent]:
        """Events of all n choices, interleaved, until every choice has finished."""
        pending = self.submit(request)
        try:
            while True:
                event = await pending.events.get()
                if event is None:
                    return
                if isinstance(event, BaseException):
                    raise event
                yield event
        finally:
            pending.cancelled = True  # a disconnected client frees its slots at the next step

    def close(self) -> None:
        self._closed = True
        self._queue.put(None)
        self._thread.join(timeout=10)
        if hasattr(self._batch, "close") and not self._thread.is_alive():  # never under a running decode
            self._batch.close()

    @property
    def queue_depth(self) -> int:
        return self._queue.qsize()

    # --- the engine thread ------------------------------------------------------------------------------

    def _run(self) -> None:
        try:
            if self._batch is not None:
                self._run_batched(self._batch)
            else:
                self._run_sequential()
        except BaseException as e:  # a bug or a backend crash outside one request: fail everyone, loudly
            self.error = e
            log.exception("the engine thread died; /health reports it and every request fails")
            stopped = EngineStopped(f"the engine stopped: {type(e).__name__}: {e}")
            for p in list(self._live):
                p.fail(stopped)
            self._fail_queued()

    def _fail_queued(self) -> None:
        stopped = EngineStopped(f"the engine stopped: {type(self.error).__name__}: {self.error}")
        while True:
            try:
                pending = self._queue.get_nowait()
            except queue.Empty:
                return
            if pending is not None:
                pending.fail(stopped)

    def _next_pending(self, block: bool) -> _Pending | None:
        try:
            pending = self._queue.get(block=block, timeout=0.5 if block else None)
        except queue.Empty:
            return None
        self._live = {p for p in self._live if not p.done}
        if pending is not None:
            self._live.add(pending)
        return pending

    def _run_sequential(self) -> None:
        """One request at a time through the backend's own token stream (llama.cpp, transformers, remote)."""
        while not self._closed:
            pending = self._next_pending(block=True)
            if pending is None:
                continue
            try:
                if isinstance(pending.request, EmbeddingRequest) and self.embedder is not None:
                    rest = [pending]
                    while rest:  # EMBED_CHUNK inputs at a time, so a cancelled request stops soon
                        rest = self._embed_some(rest)
                elif isinstance(pending.request, EmbeddingRequest):
                    raise ValueError(f"embeddings need slmkit's own model, not {type(self.lm).__name__}")
                else:
                    for index in range(pending.request.n):
                        if pending.cancelled:
                            break
                        self._sequential_choice(pending, index)
            except Exception as e:  # one bad request must not take the engine down
                pending.emit(e)
            pending.finish()

    def _sequential_choice(self, pending: _Pending, index: int) -> None:
        req = pending.request
        seed = None if req.params.seed is None else req.params.seed + index
        params = dataclasses.replace(req.params, seed=seed)
        text, n, start = TextStream(self.tokenizer, params.stop), 0, time.perf_counter()
        finish = "stop"  # unless the loop runs out of tokens below
        images = {"images": req.images} if req.images else {}  # only a vision LM takes them (lm/vision_lm.py)
        for tok in self.lm.stream_ids(req.prompt_ids, params, None, **images):
            if pending.cancelled:
                return
            n += 1
            piece = text.push(tok)
            if text.stopped:
                break
            pending.emit(TokenEvent(index, piece, tok))
        else:
            piece = text.finish()
            if n >= params.max_new_tokens:
                finish = "length"
        pending.emit(TokenEvent(index, piece, None, finish_reason=finish))
        self.stats.completion_tokens_total += n
        self.stats.busy_seconds += time.perf_counter() - start

    @torch.inference_mode()
    def _run_batched(self, batch) -> None:
        rows: list[_Choice] = []
        waiting: list[_Choice] = []  # choices of admitted requests not yet in a row
        embeds: list[_Pending] = []  # embedding requests, run EMBED_CHUNK inputs at a time between steps
        while not self._closed:
            # Admit: whole requests from the queue become choices; choices fill free rows (prefill each).
            while len(rows) + len(waiting) + len(embeds) < self.max_batch or not (rows or waiting or embeds):
                pending = self._next_pending(block=not (rows or waiting or embeds))
                if pending is None:
                    break
                req = pending.request
                if isinstance(req, EmbeddingRequest):
                    embeds.append(pending)
                    continue
                for index in range(req.n):
                    gen = None
                    if req.params.temperature > 0:
                        gen = torch.Generator(device="cpu")
                        gen.manual_seed((req.params.seed + index) % 2**64 if req.params.seed is not None
                                        else random.randrange(2**63))  # torch takes seeds modulo 2**64
                    waiting.append(_Choice(pending, index, gen, TextStream(self.tokenizer, req.params.stop)))
            start = time.perf_counter()
            while waiting and len(rows) < self.max_batch:
                choice = waiting.pop(0)
                if choice.request.cancelled:
                    continue
                try:
                    req = choice.request.request
                    choice.matcher = None if req.grammar is None else Matcher(self.tokenizer, req.grammar)
                    if req.adapter is None:
                        logits = batch.prefill(len(rows), req.prompt_ids)
                    else:
                        logits = batch.prefill(len(rows), req.prompt_ids, self.lm.adapters.slot(req.adapter))
                except Exception as e:
                    choice.request.fail(e)
                    continue
                prefixes = getattr(batch, "prefixes", None)
                if prefixes is not None:
                    self.stats.prefix_cache_hits, self.stats.prefix_tokens_reused = (prefixes.hits,
                                                                                     prefixes.tokens_reused)
                rows.append(choice)
                self._step_safely(choice, logits)
            rows = self._drop_finished(rows, batch)
            self.stats.requests_active = len({id(c.request) for c in rows + waiting})
            if embeds:
                embeds = self._embed_some(embeds)
            if not rows:
                self.stats.busy_seconds += time.perf_counter() - start
                continue
            # Decode: one token for every running row (or a block of drafted tokens), in one batch.
            try:
                if self.speculative and isinstance(batch, DraftedBatch):
                    self._speculate_with_model(rows, batch)
                elif self.speculative:
                    self._speculate(rows, batch)
                else:
                    self._plain_step(rows, batch)
            except Exception as e:  # e.g. out of memory: fail the running requests, keep serving
                for c in rows:
                    c.request.fail(e)
            rows = self._drop_finished(rows, batch)
            self.stats.busy_seconds += time.perf_counter() - start
            self.stats.requests_active = len({id(c.request) for c in rows + waiting})  # idle next: not stale
        self._fail_all(rows + waiting, EngineStopped("the engine stopped"))
        for p in embeds:
            p.fail(EngineStopped("the engine stopped"))

    def _embed_some(self, embeds: list[_Pending]) -> list[_Pending]:
        """Embed the next EMBED_CHUNK inputs of the first embedding request (its vectors, one (n, dim) tensor,
        are its one event when all are done); cancelled ones are dropped. The ones still to run."""
        embeds = [p for p in embeds if not p.cancelled]
        if not embeds:
            return embeds
        p = embeds[0]
        texts = p.request.texts
        start = time.perf_counter()
        try:
            done = len(p.embedded)
            p.embedded.extend((self.embedder or self.lm).embed(texts[done:done + EMBED_CHUNK]))
        except Exception as e:
            p.fail(e)
            return embeds[1:]
        finally:
            self.stats.busy_seconds += time.perf_counter() - start
        if len(p.embedded) < len(texts):
            return embeds
        p.emit(torch.stack(p.embedded))
        p.finish()
        return embeds[1:]

    def _step_safely(self, c: _Choice, logits: torch.Tensor) -> None:
        """`_step_choice`, failing only this request when its settings break sampling (e.g. a temperature so
        small the probabilities overflow), instead of the engine thread."""
        if c.request.cancelled:
            return
        try:
            self._step_choice(c, logits)
        except Exception as e:
            c.request.fail(e)

    def _step_choice(self, c: _Choice, logits: torch.Tensor) -> None:
        """Sample the choice's next token from `logits` and report it; marks the choice finished when it is.
        The same sampler and the same ends (eos, bos) as `LM.stream_ids`, so served text equals `lm.generate`'s.
        Under a grammar, the tokens it forbids are masked out first, and the completion ends when it is complete;
        its log-probs stay the model's own, before the mask (as vLLM's are), so none is -inf."""
        pending, params, raw = c.request, c.request.request.params, logits
        if c.matcher is not None:
            logits = c.matcher.mask(logits)
        penalised = params.repetition_penalty != 1.0
        n = params.repeat_last_n
        recent = [*pending.request.prompt_ids[-n:], *c.generated[-n:]] if penalised and n else ()
        tok = sample_next(logits, params, c.generator, recent)
        self._emit(c, tok, raw)

    def _emit(self, c: _Choice, tok: int, raw: torch.Tensor | None) -> None:
        """Report the choice's next token `tok` (its log-probs from `raw`, the logits it was drawn from, when the
        request asks for them); marks the choice finished when it is."""
        pending, params = c.request, c.request.request.params
        if c.matcher is not None:
            c.matcher.advance(tok)
        c.generated.append(tok)
        c.last_token = tok
        c.n_generated += 1
        self.stats.completion_tokens_total += 1
        finish = None
        if tok in end_ids(params, self.lm.eos_id, getattr(self.lm, "bos_id", None)):
            finish, piece = "stop", c.text.finish()
        else:
            piece = c.text.push(tok)
            if c.text.stopped:
                finish = "stop"
            elif c.matcher is not None and c.matcher.done:
                finish, piece = "stop", piece + c.text.finish()
            elif c.n_generated >= params.max_new_tokens:
                finish, piece = "length", piece + c.text.finish()
        event = TokenEvent(c.index, piece, tok, finish_reason=finish)
        if pending.request.logprobs is not None:
            logp = torch.log_softmax(raw, dim=-1)
            event.logprob = float(logp[tok])
            if pending.request.logprobs > 0:
                top = logp.topk(pending.request.logprobs)
                event.top_logprobs = {self.tokenizer.decode([int(i)]): float(v)
                                      for v, i in zip(top.values, top.indices, strict=True)}
        pending.emit(event)
        if finish is not None:
            c.finished = True
            pending.remaining -= 1
            if pending.remaining == 0:
                pending.finish()

    def _speculate(self, rows: list[_Choice], batch) -> None:
        """One speculative step for every running row, drafted by prompt lookup (see the class docstring)."""
        drafts = [prompt_lookup(c.request.request.prompt_ids + c.generated, k) if k > 0 else []
                  for c, k in zip(rows, map(self._draft_length, rows), strict=True)]
        if not any(drafts):
            self._plain_step(rows, batch)
            return
        # every row's block must fit its cache row, padding included: a row near the context's end bounds them all
        self._verify_drafts(rows, batch, [d[:batch.room() - 1] for d in drafts], [None] * len(rows))

    def _plain_step(self, rows: list[_Choice], batch) -> None:
        """One token for every running row: one (n, 1) forward."""
        for c, row_logits in zip(rows, batch.decode([c.last_token for c in rows]), strict=True):
            self._step_safely(c, row_logits)

    def _verify_drafts(self, rows: list[_Choice], batch, drafts: list[list[int]],
                       qs: list[torch.Tensor | None]) -> list[int]:
        """Feed every row its last token and its drafts (drawn from qs[i], None for point masses) in one (n, T)
        target forward, emit what each row keeps and roll its cache back past the rest; per row, the fed tokens
        whose keys and values stay (its last token and the accepted drafts). A row without drafts samples its one
        token from its block's first position."""
        blocks = [[c.last_token, *d] for c, d in zip(rows, drafts, strict=True)]
        T = max(len(b) for b in blocks)
        logits = batch.decode_many(blocks)
        kept = []
        for c, drafted, q, row_logits in zip(rows, drafts, qs, logits, strict=True):
            if not drafted:
                self._step_safely(c, row_logits[0])
                kept.append(1)
            else:
                kept.append(self._verify_safely(c, drafted, q, row_logits[:len(drafted) + 1]))
        batch.rollback([T - n for n in kept])
        return kept

    def _speculate_with_model(self, rows: list[_Choice], batch: DraftedBatch) -> None:
        """One speculative step for every running row, drafted by the draft model (see the class docstring)."""
        draft = batch.draft
        unseen = [c.draft_behind + [c.last_token] for c in rows]  # each row's first draft block
        B = max(len(b) for b in unseen)
        # the target's block (k + 1) and the draft's (B, then k - 1 single tokens) must fit every cache row
        limit = min(batch.room() - 1, draft.room() - B + 1)
        ks = [min(self._draft_length(c), limit) for c in rows]
        if max(ks) <= 0:  # a plain step; the draft catches up on these tokens when its rows next draft
            for c in rows:
                if self._drafts(c):
                    c.draft_behind.append(c.last_token)
            self._plain_step(rows, batch)
            return
        vocab = batch.model.cfg.vocab_size
        drafted: list[list[int]] = [[] for _ in rows]
        qs: list[list[torch.Tensor]] = [[] for _ in rows]
        logits = draft.decode_many(unseen)
        draft.rollback([B - len(b) for b in unseen])  # the padding, before anything is fed after it
        nexts = [row_logits[len(b) - 1] for row_logits, b in zip(logits, unseen, strict=True)]
        fed = 0  # single draft steps after the first block: row i's drafted[i][:fed] are in its draft row
        for j in range(max(ks)):
            if j > 0:
                if not any(len(d) == j < k for d, k in zip(drafted, ks, strict=True)):
                    break
                nexts = draft.decode([d[j - 1] if len(d) >= j else (d or [c.last_token])[-1]  # else: padding
                                      for c, d in zip(rows, drafted, strict=True)])
                fed += 1
            for i, c in enumerate(rows):
                if len(drafted[i]) == j < ks[i]:
                    drawn = self._draw_draft(c, nexts[i], drafted[i], vocab)
                    if drawn is None:  # all the draft's mass on ids the target does not have
                        ks[i] = j
                        continue
                    drafted[i].append(drawn[0])
                    qs[i].append(drawn[1])
        kept = self._verify_drafts(rows, batch, drafted, [torch.stack(q) if q else None for q in qs])
        drop = []
        for c, b, d, n in zip(rows, unseen, drafted, kept, strict=True):
            if not self._drafts(c):  # its draft row keeps its prompt only
                drop.append(len(b) + fed)
                continue
            accepted = n - 1
            drop.append(fed - min(accepted, fed))
            c.draft_behind = d[fed:accepted]  # kept, but not fed to the draft (at most its last draft)
        draft.rollback(drop)

    def _draw_draft(self, c: _Choice, logits: torch.Tensor, drafted: list[int],
                    vocab: int) -> tuple[int, torch.Tensor] | None:
        """Row `c`'s next draft after its context and `drafted`, from the draft model's (vocab,) `logits`, with its
        q (`speculative.draw_draft`, the row's own generator)."""
        ids = c.request.request.prompt_ids + c.generated + drafted
        return draw_draft(logits[None], c.request.request.params, ids, vocab, c.generator)

    @staticmethod
    def _drafts(c: _Choice) -> bool:
        """Whether row `c` may draft at all: not under a grammar (the mask decides each token) nor with log-probs
        asked (each token's own forward reports them)."""
        return c.matcher is None and c.request.request.logprobs is None

    def _draft_length(self, c: _Choice) -> int:
        """How many tokens row `c` drafts this step: none when it may not (`_drafts`) or one token is left,
        else what its acceptance rate sets (at most `lm.max_draft`)."""
        params = c.request.request.params
        if not self._drafts(c) or c.request.cancelled:
            return 0
        return min(c.acceptance.draft_length(self.lm.max_draft), params.max_new_tokens - c.n_generated - 1)

    def _verify_safely(self, c: _Choice, drafted: list[int], q: torch.Tensor | None, logits: torch.Tensor) -> int:
        """Verify row `c`'s drafts (drawn from `q`, None for prompt lookup's point masses) against the target's
        (len(drafted) + 1, vocab) `logits` and emit what it keeps, up to the choice's end; how many of the fed
        tokens' keys and values stay (1 + the accepted drafts)."""
        params = c.request.request.params
        try:
            ids = c.request.request.prompt_ids + c.generated
            p = torch.cat([token_probs(row[None], params, recent_ids(ids + drafted[:j], params))
                           for j, row in enumerate(logits)])
            new = verify(drafted, q, p, params.temperature == 0, c.generator)
            accepted = len(new) - 1
            c.acceptance.observe(len(drafted), accepted)
            self.stats.extra["drafted_tokens"] += len(drafted)
            self.stats.extra["accepted_tokens"] += accepted
            for tok in new:  # each its own event; eos, a stop string or max_tokens end it where plain decoding would
                self._emit(c, tok, None)
                if c.finished:
                    break
        except Exception as e:
            c.request.fail(e)
            return 1
        return 1 + accepted

    def _drop_finished(self, rows: list[_Choice], batch) -> list[_Choice]:
        """Remove finished and cancelled rows, keeping the running ones contiguous at the top of the cache."""
        i = 0
        while i < len(rows):
            c = rows[i]
            if c.finished or c.request.cancelled:
                last = len(rows) - 1
                batch.move_row(last, i)
                rows[i] = rows[last]
                rows.pop()
            else:
                i += 1
        batch.n_active = len(rows)
        return rows

    def _fail_all(self, choices: list[_Choice], error: BaseException) -> None:
        for c in choices:
            c.request.fail(error)


def generate_text(lm: LM, prompt_ids: list[int], params: SamplingParams, grammar: str | None = None) -> Iterator[str]:
    """One completion of `prompt_ids` through the engine, as text pieces while they are generated: what
    `slm generate --json-schema / --grammar / --regex` uses, so structured output takes the same path (the
    grammar's token mask in the batched decoder) in a script as in the server."""
    engine = Engine(lm, max_batch=1, max_queue=1)
    loop = asyncio.new_event_loop()
    events = engine.generate(GenerationRequest(prompt_ids, params, grammar=grammar))
    try:
        while True:
            try:
                event = loop.run_until_complete(events.__anext__())
            except StopAsyncIteration:
                return
            if event.text:
                yield event.text
    finally:
        loop.run_until_complete(events.aclose())
        loop.close()
        engine.close()
