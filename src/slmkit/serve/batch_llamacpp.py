"""`LlamaCppBatch`: continuous batching over llama.cpp, the engine's batched decoder for a `LlamaCppLM`.

Like llama.cpp's own server, every running request is a *sequence* of one llama.cpp context: each step submits
one token per sequence in a single `llama_decode`, so the weights are read once per step for all of them.

The context is our own, made from the LM's already loaded model (the weights are shared, not loaded twice) with
the LM's numeric settings (threads, flash attention, KV cache types, RoPE), and room for `max_batch` sequences
of the LM's full context each. Rows (what the engine sees) map to sequence ids; a row leaving only permutes that
mapping, and its id is reused by a later prompt.

Prefix reuse (`reuse_prefixes`, what llama.cpp's server does with `cache_prompt`): a sequence that finished keeps
its KV cells and the tokens they hold, and a new prompt takes the free sequence sharing the longest beginning with
it, keeps those cells and decodes only the rest: the same system prompt, few-shot block or conversation so far is
not computed again. Nothing is copied and no memory is added (the cells were there anyway). In llama.cpp's
unified KV pool (past MAX_KV_TOKENS) finished sequences' cells could crowd out running ones: when the pool is
full, the free sequences are cleared and the step is run again.
"""

from __future__ import annotations

from dataclasses import dataclass

import llama_cpp
import numpy as np
import torch

from slmkit.lm.llamacpp_lm import LlamaCppLM

# Above this many KV cells in all (max_batch x the LM's context), the sequences share one pool of this size
# (llama.cpp's unified KV cache) instead of each having its own: memory stays bounded, any row can still hold the
# full context, but not every row at once (llama_decode then reports that the cache is full).
MAX_KV_TOKENS = 65536

# Settings of the LM's own context that change the numbers, copied so the batched path computes like the LM's.
_SAME_AS_LM = ("n_threads", "n_threads_batch", "rope_scaling_type", "rope_freq_base", "rope_freq_scale",
               "yarn_ext_factor", "yarn_attn_factor", "yarn_beta_fast", "yarn_beta_slow", "yarn_orig_ctx",
               "flash_attn_type", "type_k", "type_v", "offload_kqv", "op_offload", "swa_full", "no_perf")


@dataclass
class PrefixReuse:
    """What prefix reuse saved (the engine reports it as the torch PrefixCache's)."""

    hits: int = 0  # prompts that kept a finished sequence's cells
    tokens_reused: int = 0  # prompt tokens not decoded again


class LlamaCppBatch:
    """Rows of a llama.cpp context decoding together, one llama.cpp sequence per row (the interface:
    engine.batch_decoder)."""

    def __init__(self, lm: LlamaCppLM, max_batch: int, reuse_prefixes: bool = False):
        if not 1 <= max_batch <= llama_cpp.llama_max_parallel_sequences():
            raise ValueError(f"max_batch must be between 1 and {llama_cpp.llama_max_parallel_sequences()} "
                             f"(llama.cpp's most parallel sequences), not {max_batch}")
        self.ctx, self.batch = None, None
        self.max_length = lm.max_length
        self._model = lm.llm._model  # llama-cpp-python's LlamaModel: owns the llama_model we share
        params = llama_cpp.llama_context_default_params()
        for name in _SAME_AS_LM:
            setattr(params, name, getattr(lm.llm.context_params, name))
        unified = max_batch * self.max_length > MAX_KV_TOKENS
        params.n_ctx = max(MAX_KV_TOKENS, self.max_length) if unified else max_batch * self.max_length
        params.n_seq_max = max_batch
        params.kv_unified = unified  # else llama.cpp gives each sequence its own n_ctx / n_seq_max cells
        params.n_batch = max(self.max_length, max_batch)  # a whole prompt, or one token for every row
        params.n_ubatch = min(params.n_batch, 512)
        params.embeddings = False
        self.ctx = llama_cpp.llama_init_from_model(self._model.model, params)
        if self.ctx is None:
            raise RuntimeError(f"llama.cpp could not create a context of {params.n_ctx} tokens for "
                               f"{max_batch} sequences")
        # The context must go before the model it uses: if the LM is closed first, it closes us.
        self._model._exit_stack.callback(self.close)
        self.n_ctx_seq = llama_cpp.llama_n_ctx_seq(self.ctx)
        if self.n_ctx_seq < self.max_length:
            self.close()
            raise RuntimeError(f"llama.cpp gives each sequence {self.n_ctx_seq} tokens of context, fewer than the "
                               f"model's {self.max_length}")
        self.mem = llama_cpp.llama_get_memory(self.ctx)
        self.n_vocab = llama_cpp.llama_vocab_n_tokens(llama_cpp.llama_model_get_vocab(self._model.model))
        self.capacity = params.n_batch
        self.batch = llama_cpp.llama_batch_init(self.capacity, 0, 1)
        # Writable views of the batch's arrays; seq_id is an array of per-token pointers, filled token by token.
        self._tokens = np.ctypeslib.as_array(self.batch.token, shape=(self.capacity,))
        self._pos = np.ctypeslib.as_array(self.batch.pos, shape=(self.capacity,))
        self._n_seq_id = np.ctypeslib.as_array(self.batch.n_seq_id, shape=(self.capacity,))
        self._logits = np.ctypeslib.as_array(self.batch.logits, shape=(self.capacity,))
        self._n_seq_id[:] = 1
        self.row_seq = list(range(max_batch))  # row -> sequence id: always a permutation of 0..max_batch-1
        self.next_pos = [0] * max_batch  # row -> position of its next token
        self.n_active = 0
        self.seq_tokens: list[list[int]] = [[] for _ in range(max_batch)]  # sequence -> tokens its cells hold
        self.prefixes = PrefixReuse() if reuse_prefixes else None

    def prefill(self, row: int, ids: list[int]) -> torch.Tensor:
        """The prompt into `row` (rows from `row` on are free: the engine fills them in order)."""
        n = len(ids)
        if not 0 < n <= min(self.n_ctx_seq, self.capacity):
            raise ValueError(f"a prompt of {n} tokens does not fit (at most {min(self.n_ctx_seq, self.capacity)})")
        keep = self._take_free_sequence(row, ids)
        seq = self.row_seq[row]
        llama_cpp.llama_memory_seq_rm(self.mem, seq, keep, -1)
        self.seq_tokens[seq] = list(ids)
        new = n - keep
        self._tokens[:new] = ids[keep:]
        self._pos[:new] = np.arange(keep, n)
        self._logits[:new] = 0
        self._logits[new - 1] = 1
        seq_id = self.batch.seq_id
        for i in range(new):
            seq_id[i][0] = seq
        self._decode(new, busy_rows=row + 1)
        self.next_pos[row] = n
        return self._row_logits(new - 1).clone()

    def _take_free_sequence(self, row: int, ids: list[int]) -> int:
        """With prefix reuse, give `row` the free sequence whose cells share the longest beginning with `ids`
        (never all of it: the last token runs to give the next token's logits); how many positions it keeps."""
        if self.prefixes is None:
            return 0
        best, keep = row, 0
        for r in range(row, len(self.row_seq)):
            held = self.seq_tokens[self.row_seq[r]]
            m = min(len(held), len(ids) - 1)
            same = np.asarray(held[:m]) == np.asarray(ids[:m])
            k = m if bool(same.all()) else int(same.argmin())
            if k > keep:
                best, keep = r, k
        self.row_seq[row], self.row_seq[best] = self.row_seq[best], self.row_seq[row]
        if keep:
            self.prefixes.hits += 1
            self.prefixes.tokens_reused += keep
        return keep

    def decode(self, tokens: list[int]) -> torch.Tensor:
        n = len(tokens)
        if n > self.capacity:
            raise ValueError(f"{n} rows exceed the batch of {self.capacity}")
        self.n_active = n
        self._tokens[:n] = tokens
        self._pos[:n] = self.next_pos[:n]
        self._logits[:n] = 1
        seq_id = self.batch.seq_id
        for i in range(n):
            seq_id[i][0] = self.row_seq[i]
        self._decode(n, busy_rows=n)
        for i in range(n):
            self.next_pos[i] += 1
            self.seq_tokens[self.row_seq[i]].append(tokens[i])
        out = torch.empty(n, self.n_vocab, dtype=torch.float32)
        for i in range(n):
            out[i] = self._row_logits(i)
        return out

    def move_row(self, src: int, dst: int) -> None:
        """Row `dst` leaves (its sequence is cleared, or kept for prefix reuse); row `src` takes its place. No KV
        data moves."""
        leaving = self.row_seq[dst]
        if self.prefixes is None:
            llama_cpp.llama_memory_seq_rm(self.mem, leaving, -1, -1)
            self.seq_tokens[leaving] = []
        self.row_seq[dst], self.row_seq[src] = self.row_seq[src], leaving
        self.next_pos[dst], self.next_pos[src] = self.next_pos[src], 0

    def close(self) -> None:
        if self.batch is not None:
            llama_cpp.llama_batch_free(self.batch)
            self.batch = None
        if self.ctx is not None:
            llama_cpp.llama_free(self.ctx)
            self.ctx = None

    # --- internals --------------------------------------------------------------------------------------

    def _decode(self, n: int, busy_rows: int) -> None:
        """Run the batch's first n tokens; rows from `busy_rows` on are free (their cells may be given up)."""
        if self.ctx is None:
            raise RuntimeError("the llama.cpp batch is closed")
        self.batch.n_tokens = n
        rc = llama_cpp.llama_decode(self.ctx, self.batch)
        if rc == 1 and self.prefixes is not None and any(self.seq_tokens[s] for s in self.row_seq[busy_rows:]):
            for seq in self.row_seq[busy_rows:]:  # the KV cache is full: give up the cells kept for reuse
                llama_cpp.llama_memory_seq_rm(self.mem, seq, -1, -1)
                self.seq_tokens[seq] = []
            rc = llama_cpp.llama_decode(self.ctx, self.batch)
        if rc != 0:
            raise RuntimeError(f"llama_decode failed with code {rc}"
                               + (" (the KV cache is full)" if rc == 1 else ""))

    def _row_logits(self, i: int) -> torch.Tensor:
        """The logits of batch token i (a view into llama.cpp's buffer, valid until the next decode)."""
        ptr = llama_cpp.llama_get_logits_ith(self.ctx, i)
        if not ptr:
            raise RuntimeError(f"llama.cpp has no logits for batch token {i}")
        return torch.from_numpy(np.ctypeslib.as_array(ptr, shape=(self.n_vocab,)))
