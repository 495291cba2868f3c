"""`LlamaCppLM`: a GGUF file through llama-cpp-python, the fast CPU path (needs the `llamacpp` extra).

Text is tokenized by slmkit's tokenizer rebuilt from the GGUF's own metadata (tests check it splits exactly
like llama.cpp), and token ids go to llama.cpp; so every backend sees the same ids for the same text.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np
import torch

from slmkit.lm.base import LM, LogProbs, end_ids, logprobs_from_logits
from slmkit.sampling import SamplingParams


class LlamaCppLM(LM):
    def __init__(self, path, n_ctx: int | None = None, n_threads: int | None = None, logits_all: bool = True,
                 reuse_prefix: bool = True, lora_path: str | Path | None = None):
        try:
            import llama_cpp
        except ImportError as e:
            raise ImportError("the llamacpp backend needs llama-cpp-python: pip install 'slmkit[llamacpp]' "
                              "(it compiles llama.cpp, ~8 minutes on 2 cores)") from e
        import gguf

        from slmkit.formats.gguf import read_gguf_tokenizer
        path = Path(path)
        reader = gguf.GGUFReader(str(path))
        self.tokenizer = read_gguf_tokenizer(reader, path)
        trained_ctx = None
        if (f := reader.fields.get("llama.context_length")) is not None:
            trained_ctx = int(f.contents())
        self.max_length = n_ctx or min(trained_ctx or 2048, 2048)
        # logits_all keeps every position's logits (needed for logprobs/score); generation only reads the last.
        # no_perf: llama.cpp's default (llama-cpp-python turns its timing counters on). Flash attention, llama.cpp's
        # other default that llama-cpp-python turns off, stays off: ~3% faster here, but its q8_0 results varied
        # from run to run (log-probs moved by up to 0.16 nats on a near-tie).
        self.llm = llama_cpp.Llama(model_path=str(path), n_ctx=self.max_length,
                                   n_threads=n_threads or os.cpu_count(), n_batch=min(512, self.max_length),
                                   logits_all=logits_all, no_perf=True, verbose=False,
                                   lora_path=str(lora_path) if lora_path is not None else None)
        self.name = str(path)
        self.lora_path = lora_path  # a LoRA GGUF llama.cpp applies unmerged to every token (hub.lora_gguf)
        self.eos_id = self.llm.token_eos()
        self.bos_id = self.llm.token_bos() if self.llm.token_bos() >= 0 else None
        self.logits_all = logits_all
        # the tokens whose KV cells the last stream_ids left in llama.cpp's cache, in order: the next generation
        # evaluates only what follows their shared prefix (a chat's next turn, one system prompt asked again)
        self._streamed: list[int] = []
        self.reuse_prefix = reuse_prefix  # False: every generation evaluates its whole prompt (a benchmark's anchor)

    def logprobs(self, ids: Sequence[int], top_k: int = 0) -> LogProbs:
        ids = list(ids)
        if not self.logits_all:
            raise ValueError("this LlamaCppLM was opened with logits_all=False; open it with logits_all=True")
        if len(ids) > self.max_length:
            raise ValueError(f"{len(ids)} tokens exceed the context of {self.max_length} (n_ctx)")
        self._eval_reusing_prefix(ids)
        logits = torch.from_numpy(np.array(self.llm.scores[: len(ids)], dtype=np.float32))
        return logprobs_from_logits(logits, ids, top_k)

    def _eval_reusing_prefix(self, ids: list[int]) -> None:
        """Evaluate `ids`, keeping the KV cache of a shared prefix with the previous call.

        Scoring several continuations of one context (the choices of a multiple-choice question) then computes
        the context once. At least the last token is evaluated again so that its logits are fresh.
        """
        llm = self.llm
        self._streamed = []  # llm.eval writes over the cells stream_ids kept
        keep = _shared_prefix(llm.input_ids[: llm.n_tokens], ids[:-1])
        if keep and llm._ctx.kv_cache_seq_rm(-1, keep, -1):
            llm.n_tokens = keep
        else:
            llm.reset()
        llm.eval(ids[llm.n_tokens:])

    def stream_ids(self, prompt_ids, params: SamplingParams, first_allowed) -> Iterator[int]:
        """llama.cpp's C API in a bare loop: decode one token, sample it with llama.cpp's own sampler chain,
        repeat. llama-cpp-python's `Llama.generate` costs ~0.5 ms of Python per token on top (copying the
        logits out, its sampling context), a third of a small model's step; this loop runs as fast as plain
        llama.cpp (benchmarks/decode_backends.py compares the two).

        Sampling: slmkit's chain (see slmkit.sampling) built from llama.cpp's own samplers. `first_allowed`
        (token healing) becomes a logit bias on the first token only.

        The KV cells of the previous generation's prompt and reply stay; only the tokens after the longest prefix
        this prompt shares with them are evaluated (at least the last, whose logits the first sample reads).
        """
        import llama_cpp as L
        llm, ids = self.llm, list(prompt_ids)
        ctx = llm._ctx.ctx
        llm.n_tokens = 0  # the LM's prefix cache (logprobs) must not trust the KV cells this loop writes
        memory = L.llama_get_memory(ctx)
        keep = _shared_prefix(self._streamed, ids[:-1]) if self.reuse_prefix else 0
        if not (keep and L.llama_memory_seq_rm(memory, -1, keep, -1)):
            keep = 0
            L.llama_memory_seq_rm(memory, -1, 0, -1)
        self._streamed = ids[:keep]
        n_batch = L.llama_n_batch(ctx)
        for start in range(keep, len(ids), n_batch):
            chunk = ids[start:start + n_batch]
            self._decode((L.llama_token * len(chunk))(*chunk))
            self._streamed += chunk
        n_vocab = L.llama_vocab_n_tokens(L.llama_model_get_vocab(llm._model.model))
        sampler = _sampler_chain(params, n_vocab, ids)
        first = None
        if first_allowed is not None:
            first = _sampler_chain(params, n_vocab, ids, forbid=~first_allowed)
        ends = end_ids(params, self.eos_id, self.bos_id)
        token = (L.llama_token * 1)()
        try:
            for n in range(params.max_new_tokens):
                if first is not None and n == 0:
                    token[0] = L.llama_sampler_sample(first, ctx, -1)
                    L.llama_sampler_accept(sampler, token[0])  # the main chain's penalty sees it too
                else:
                    token[0] = L.llama_sampler_sample(sampler, ctx, -1)  # (and accepts the token into the chain)
                if token[0] in ends:
                    return
                yield int(token[0])
                if n + 1 == params.max_new_tokens or len(ids) + n + 1 >= self.max_length:
                    return  # (the last token is not decoded: nothing reads its logits)
                self._decode(token)
                self._streamed.append(int(token[0]))
        finally:
            if not self.reuse_prefix:
                self._streamed = []
            L.llama_sampler_free(sampler)
            if first is not None:
                L.llama_sampler_free(first)

    def _decode(self, tokens) -> None:
        import llama_cpp as L
        rc = L.llama_decode(self.llm._ctx.ctx, L.llama_batch_get_one(tokens, len(tokens)))
        if rc != 0:
            raise RuntimeError(f"llama_decode failed with code {rc}")

    def close(self) -> None:
        self.llm.close()


def _shared_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    n = 0
    for x, y in zip(a, b, strict=False):
        if x != y:
            break
        n += 1
    return n


def _sampler_chain(params: SamplingParams, n_vocab: int, prompt_ids: list[int], forbid: torch.Tensor | None = None):
    """llama.cpp's sampler chain for `params`, in slmkit's order (slmkit.sampling): penalties, temperature (or
    greedy), top-k, top-p, min-p, a seeded draw. `prompt_ids`' last repeat_last_n tokens go into the penalty's
    window, as llama.cpp's own tools do. `forbid` (bool over the vocabulary) bans tokens first."""
    import llama_cpp as L
    chain = L.llama_sampler_chain_init(L.llama_sampler_chain_default_params())
    if forbid is not None:  # a mask shorter than llama.cpp's vocabulary bans the tokens it does not cover
        banned = forbid[:n_vocab].nonzero().flatten().tolist() + list(range(len(forbid), n_vocab))
        bias = (L.llama_logit_bias * len(banned))(*[L.llama_logit_bias(t, float("-inf")) for t in banned])
        L.llama_sampler_chain_add(chain, L.llama_sampler_init_logit_bias(n_vocab, len(banned), bias))
    if params.repetition_penalty != 1.0 and params.repeat_last_n:
        # (n_vocab, last_n, repeat, frequency, presence): llama.cpp's repeat_penalty is CTRL's, as slmkit's
        L.llama_sampler_chain_add(chain, L.llama_sampler_init_penalties(
            n_vocab, params.repeat_last_n, params.repetition_penalty, 0.0, 0.0))
        for t in prompt_ids[-params.repeat_last_n:]:
            L.llama_sampler_accept(chain, t)
    if params.temperature == 0:
        L.llama_sampler_chain_add(chain, L.llama_sampler_init_greedy())
        return chain
    L.llama_sampler_chain_add(chain, L.llama_sampler_init_temp(params.temperature))
    if params.top_k:
        L.llama_sampler_chain_add(chain, L.llama_sampler_init_top_k(params.top_k))
    if params.top_p < 1.0:
        L.llama_sampler_chain_add(chain, L.llama_sampler_init_top_p(params.top_p, 1))
    if params.min_p > 0:
        L.llama_sampler_chain_add(chain, L.llama_sampler_init_min_p(params.min_p, 1))
    seed = L.LLAMA_DEFAULT_SEED if params.seed is None else params.seed % 2**32
    L.llama_sampler_chain_add(chain, L.llama_sampler_init_dist(seed))
    return chain
