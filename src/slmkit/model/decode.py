"""Decoding state and decoding-only rewrites of the model.

`KVCache` (one batch of sequences that advance together) and `SlotKVCache` (continuous batching: each row its
own sequence) hold keys and values between forward passes; `prepare_for_decoding` fuses projections and lays
out weights for the fastest CPU matmuls. Nothing here changes what the model computes.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import torch.nn as nn

from slmkit.model.config import ModelConfig

if TYPE_CHECKING:
    from slmkit.model.llama import Transformer

class KVCache:
    """Preallocated keys/values for every layer: (batch, n_kv_heads, max_len, head_dim).

    `length` is how many positions are filled; the model appends at `length` and advances it once per forward.
    """

    def __init__(self, cfg: ModelConfig, batch_size: int, max_len: int, device=None, dtype=torch.float32):
        shape = (batch_size, cfg.n_kv_heads, max_len, cfg.head_dim)
        self.k = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(cfg.n_layers)]
        self.v = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(cfg.n_layers)]
        self.max_len = max_len
        self.length = 0

    def update(self, layer: int, k, v):
        start, end = self.length, self.length + k.shape[2]
        if end > self.max_len:
            raise ValueError(f"KV cache full: {end} positions > max_len {self.max_len}")
        self.k[layer][:, :, start:end] = k
        self.v[layer][:, :, start:end] = v
        return self.k[layer][:, :, :end], self.v[layer][:, :, :end]

    def attention_mask(self, T: int, device) -> tuple[torch.Tensor | None, bool]:
        """(attn_mask, is_causal) for T new queries after `length` cached positions."""
        past = self.length
        if past == 0:
            return None, True
        if T == 1:
            return None, False  # one new query attends to everything before it
        # SDPA's is_causal aligns top-left; with a cache prefix the diagonal is offset by `past`.
        return torch.ones(T, past + T, dtype=torch.bool, device=device).tril(diagonal=past), False

    def advance(self, T: int) -> None:
        self.length += T


class SlotKVCache:
    """KV cache for continuous batching: row i is its own sequence, `lengths[i]` positions long.

    The first `n_active` rows are decoding; a forward pass feeds them T new tokens each (B = n_active), row i's
    at positions lengths[i] .. lengths[i] + T - 1: T = 1 is plain decoding, T > 1 a block of drafted tokens to
    verify (speculative decoding, serve/engine.py), after which `rollback` sets each row's length back past the
    drafts it rejected (the keys and values past a row's length are dead: the mask hides them, and the next
    forward overwrites them). A sequence enters with `load_row` (copying a prefilled single-sequence KVCache)
    and leaves with `move_row` (the last active row takes its place, so the active rows stay contiguous and
    attention reads plain slices, never gathers).
    """

    def __init__(self, cfg: ModelConfig, max_batch: int, max_len: int, device=None, dtype=torch.float32):
        shape = (max_batch, cfg.n_kv_heads, max_len, cfg.head_dim)
        self.k = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(cfg.n_layers)]
        self.v = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(cfg.n_layers)]
        self.lengths = torch.zeros(max_batch, dtype=torch.long, device=device)
        self.max_len, self.max_batch = max_len, max_batch
        self.n_active = 0
        self._mask = None

    def positions(self, T: int = 1) -> torch.Tensor:
        """(B, T): each active row's positions for its T new tokens."""
        pos = self.lengths[: self.n_active, None]
        return pos if T == 1 else pos + torch.arange(T, device=pos.device)

    def update(self, layer: int, k, v):
        n, T = self.n_active, k.shape[2]
        rows, pos = torch.arange(n, device=k.device), self.lengths[:n]
        if T == 1:
            self.k[layer][rows, :, pos] = k[:, :, 0]
            self.v[layer][rows, :, pos] = v[:, :, 0]
        else:  # (B, T) indices around the head slice: the indexed view is (B, T, KV, D)
            pos = self.positions(T)
            self.k[layer][rows[:, None], :, pos] = k.transpose(1, 2)
            self.v[layer][rows[:, None], :, pos] = v.transpose(1, 2)
        end = self._end
        return self.k[layer][:n, :, :end], self.v[layer][:n, :, :end]

    def attention_mask(self, T: int, device) -> tuple[torch.Tensor | None, bool]:
        """(B, 1, T, end): query t of row i sees that row's positions up to lengths[i] + t (its own prefix, causal
        inside the block), nothing after them (end is the longest row's: the rest of a shorter row is dead)."""
        if self._mask is None:
            pos = self.positions(T)  # (B, T)
            self._end = int(pos[:, -1].max()) + 1
            if self._end > self.max_len:
                raise ValueError(f"KV cache full: {self._end} positions > max_len {self.max_len}")
            keys = torch.arange(self._end, device=device)
            self._mask = (keys[None, None, :] <= pos[:, :, None])[:, None]  # (B, 1, T, end)
        return self._mask, False

    def advance(self, T: int) -> None:
        self.lengths[: self.n_active] += T
        self._mask = None

    def rollback(self, drop: list[int]) -> None:
        """Set each active row's length back by drop[i] positions (the drafted tokens it rejected)."""
        self.lengths[: self.n_active] -= torch.tensor(drop, dtype=torch.long, device=self.lengths.device)

    def load_row(self, row: int, cache: KVCache) -> None:
        n = cache.length
        for layer in range(len(self.k)):
            self.k[layer][row, :, :n] = cache.k[layer][0, :, :n]
            self.v[layer][row, :, :n] = cache.v[layer][0, :, :n]
        self.lengths[row] = n

    def move_row(self, src: int, dst: int) -> None:
        if src == dst:
            return
        n = int(self.lengths[src])
        for layer in range(len(self.k)):
            self.k[layer][dst, :, :n] = self.k[layer][src, :, :n]
            self.v[layer][dst, :, :n] = self.v[layer][src, :, :n]
        self.lengths[dst] = n


class PrefixCache:
    """Keys and values of recent prompts, so a new prompt that starts the same way (a system prompt, few-shot
    examples, retrieved context) skips recomputing that part: llama.cpp's `cache_prompt`, vLLM's prefix caching.

    `longest(ids)` finds the stored prompt sharing the longest common prefix with `ids` (at least `min_tokens`,
    and never all of `ids`: the last token must run to give the next token's logits) and `fill(cache, ...)`
    copies that many positions into a fresh KVCache, whose `length` then says where the forward pass starts.
    `store(ids, cache)` keeps a prefilled prompt's cache (no copy: the cache was made for this prompt alone);
    a stored prompt that the new one extends is replaced by it. Least recently used entries go first once the
    entries' bytes pass `max_bytes`. Lookup compares token ids (a tensor comparison per entry), so it is exact:
    two prompts share cached positions only where their tokens are equal, and RoPE positions are the same.
    `tag` keeps apart prompts whose keys and values differ for the same tokens: those run through different LoRA
    adapters (model/multi_lora.py) share nothing.
    """

    def __init__(self, max_bytes: int, min_tokens: int = 16):
        from collections import OrderedDict
        self.max_bytes, self.min_tokens = max_bytes, min_tokens
        self._entries: OrderedDict[int, tuple[torch.Tensor, KVCache, int, int]] = OrderedDict()
        self._next = 0
        self.bytes = 0
        self.hits = 0
        self.tokens_reused = 0

    def longest(self, ids: list[int], tag: int = 0) -> tuple[int, int] | None:
        """(shared prefix length, entry key) of the best stored prompt with this tag, or None."""
        query = torch.tensor(ids[:-1], dtype=torch.long)
        best = None
        for key, (tokens, _, _, entry_tag) in self._entries.items():
            m = min(len(tokens), len(query))
            if m < self.min_tokens or entry_tag != tag:
                continue
            same = tokens[:m] == query[:m]
            n = m if bool(same.all()) else int(same.to(torch.int8).argmin())
            if n >= self.min_tokens and (best is None or n > best[0]):
                best = (n, key)
        return best

    def fill(self, cache: KVCache, key: int, n: int) -> None:
        """Copy the entry's first `n` positions into `cache` (empty, batch 1) and mark them filled."""
        _, stored, _, _ = self._entries[key]
        self._entries.move_to_end(key)
        for layer in range(len(cache.k)):
            cache.k[layer][:, :, :n] = stored.k[layer][:, :, :n]
            cache.v[layer][:, :, :n] = stored.v[layer][:, :, :n]
        cache.length = n
        self.hits += 1
        self.tokens_reused += n

    def store(self, ids: list[int], cache: KVCache, tag: int = 0) -> None:
        tokens = torch.tensor(ids, dtype=torch.long)
        size = sum(t.numel() * t.element_size() for t in (*cache.k, *cache.v))
        if size > self.max_bytes:
            return
        for key, (old, _, old_size, old_tag) in list(self._entries.items()):
            if old_tag == tag and len(old) <= len(tokens) and bool((tokens[:len(old)] == old).all()):  # extended
                del self._entries[key]
                self.bytes -= old_size
        self._entries[self._next] = (tokens, cache, size, tag)
        self._next += 1
        self.bytes += size
        while self.bytes > self.max_bytes:
            _, (_, _, old_size, _) = self._entries.popitem(last=False)
            self.bytes -= old_size

    def __len__(self) -> int:
        return len(self._entries)


def fuse_projections(model: Transformer) -> Transformer:
    """Merge each block's q/k/v projections into one `qkv_proj` and gate/up into `gate_up_proj`, in place.

    The same numbers with fewer ops: a batch-1 decoding step on a CPU costs mostly per-op overhead. For
    inference only: the parameter names stop being Hugging Face's until `unfuse_projections`, and layers that
    are not plain Linears (LoRA-wrapped, quantized) are left as they are.
    """
    for block in model.layers:
        attn, mlp = block.self_attn, block.mlp
        if all(type(getattr(attn, n, None)) is nn.Linear for n in ("q_proj", "k_proj", "v_proj")):
            attn.qkv_proj = _concat_linears([attn.q_proj, attn.k_proj, attn.v_proj])
            del attn.q_proj, attn.k_proj, attn.v_proj
        if all(type(getattr(mlp, n, None)) is nn.Linear for n in ("gate_proj", "up_proj")):
            mlp.gate_up_proj = _concat_linears([mlp.gate_proj, mlp.up_proj])
            del mlp.gate_proj, mlp.up_proj
    return model


def unfuse_projections(model: Transformer) -> Transformer:
    """Undo `fuse_projections`: the Hugging Face layout again (e.g. before a LoRA adapter wraps q_proj)."""
    cfg = model.cfg
    for block in model.layers:
        attn, mlp = block.self_attn, block.mlp
        if hasattr(attn, "qkv_proj"):
            sizes = [cfg.n_heads * cfg.head_dim, cfg.n_kv_heads * cfg.head_dim, cfg.n_kv_heads * cfg.head_dim]
            attn.q_proj, attn.k_proj, attn.v_proj = _split_linear(attn.qkv_proj, sizes)
            del attn.qkv_proj
        if hasattr(mlp, "gate_up_proj"):
            mlp.gate_proj, mlp.up_proj = _split_linear(mlp.gate_up_proj, [cfg.hidden_dim, cfg.hidden_dim])
            del mlp.gate_up_proj
    return model


def is_fused(model: nn.Module) -> bool:
    return any(hasattr(m, "qkv_proj") or hasattr(m, "gate_up_proj") for m in model.modules())


def prepare_for_decoding(model: Transformer) -> Transformer:
    """`fuse_projections`, and on a CPU in fp32 the wide weights stored transposed (same values, other layout).

    Why the layout: PyTorch's CPU matmul (MKL) multiplies one row by an (out, in) row-major weight with
    out > in up to 3x slower than by the same weight stored (in, out) on the AVX2 AMD CPUs measured in
    BENCHMARKS.md (stories15m's 32000 x 288 LM head: 6.4 vs 2.1 ms; SmolLM2's fused gate/up: 1.15 vs 0.67 ms),
    while narrow weights (down_proj) are faster as they are. A tied embedding shares the transposed head (a
    lookup reads one strided row: negligible).
    """
    fuse_projections(model.eval())
    for module in model.modules():
        w = getattr(module, "weight", None)
        if not (type(module) is nn.Linear and w.device.type == "cpu" and w.dtype == torch.float32
                and w.shape[0] > w.shape[1] and w.is_contiguous()):
            continue
        transposed = nn.Parameter(w.detach().t().contiguous().t(), requires_grad=w.requires_grad)
        if model.embed_tokens.weight is w:
            model.embed_tokens.weight = transposed
        module.weight = transposed
    return model


def _concat_linears(linears: list[nn.Linear]) -> nn.Linear:
    w = torch.cat([m.weight.detach() for m in linears])
    out = nn.Linear(w.shape[1], w.shape[0], bias=False, device=w.device, dtype=w.dtype)
    out.weight = nn.Parameter(w, requires_grad=linears[0].weight.requires_grad)
    return out.train(linears[0].training)


def _split_linear(linear: nn.Linear, sizes: list[int]) -> list[nn.Linear]:
    parts = []
    for w in linear.weight.detach().split(sizes):
        m = nn.Linear(w.shape[1], w.shape[0], bias=False, device=w.device, dtype=w.dtype)
        m.weight = nn.Parameter(w.contiguous(), requires_grad=linear.weight.requires_grad)
        parts.append(m.train(linear.training))
    return parts

