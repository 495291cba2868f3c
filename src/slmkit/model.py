"""The whole Llama-family decoder in one file: RMSNorm, RoPE, grouped-query attention, SwiGLU, KV cache.

Module and parameter names mirror Hugging Face's `LlamaForCausalLM` (`embed_tokens`, `layers.N.self_attn.q_proj`,
`mlp.gate_proj`, ...), and RoPE uses the HF "rotate-half" layout, so a state dict moves between slmkit and
transformers with only a `model.` prefix (see checkpoint.py). Logits match transformers to ~1e-5 in fp32.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from slmkit.config import ModelConfig


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        if x.dtype == torch.float32 and self.weight.dtype == torch.float32:
            return F.rms_norm(x, (x.shape[-1],), self.weight, self.eps)  # one op, not six: decoding is op-bound
        # Normalise in fp32 even under bf16 autocast, as HF does: the mean of squares is precision-sensitive.
        dtype = x.dtype
        x = x.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x.to(dtype)


def rope_tables(head_dim: int, max_len: int, theta: float, device=None) -> tuple[torch.Tensor, torch.Tensor]:
    """(cos, signed sin), each (max_len, head_dim). The sin table's first half is negated (see apply_rope)."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32, device=device) / head_dim))
    freqs = torch.outer(torch.arange(max_len, dtype=torch.float32, device=device), inv_freq)
    emb = torch.cat([freqs, freqs], dim=-1)  # rotate-half layout: first half pairs with second half
    sin = emb.sin()
    sin[:, : head_dim // 2] *= -1
    return emb.cos(), sin


def apply_rope(x, cos, sin):
    """HF's rotate-half RoPE, x·cos + (-x2, x1)·sin, written as one roll against the signed sin table:
    four ops instead of seven, and a decoding step on a CPU costs what its op count costs."""
    return (x * cos + x.roll(x.shape[-1] // 2, dims=-1) * sin).to(x.dtype)


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

    The first `n_active` rows are decoding; a forward pass feeds them one new token each (B = n_active, T = 1),
    at their own positions. A sequence enters with `load_row` (copying a prefilled single-sequence KVCache)
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

    def positions(self) -> torch.Tensor:
        return self.lengths[: self.n_active]

    def update(self, layer: int, k, v):
        n = self.n_active
        rows, pos = torch.arange(n, device=k.device), self.lengths[:n]
        self.k[layer][rows, :, pos] = k[:, :, 0]
        self.v[layer][rows, :, pos] = v[:, :, 0]
        end = self._end
        return self.k[layer][:n, :, :end], self.v[layer][:n, :, :end]

    def attention_mask(self, T: int, device) -> tuple[torch.Tensor | None, bool]:
        if T != 1:
            raise ValueError("SlotKVCache decodes one token per row; prefill with a KVCache and load_row")
        if self._mask is None:
            pos = self.lengths[: self.n_active]
            self._end = int(pos.max()) + 1
            if self._end > self.max_len:
                raise ValueError(f"KV cache full: {self._end} positions > max_len {self.max_len}")
            keys = torch.arange(self._end, device=device)
            self._mask = (keys[None, :] <= pos[:, None])[:, None, None, :]  # (B, 1, 1, end)
        return self._mask, False

    def advance(self, T: int) -> None:
        self.lengths[: self.n_active] += T
        self._mask = None

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


def single_query_attention(q, k, v, mask=None):
    """Attention for one new query per sequence (decoding): q (B, H, 1, D), k/v (B, KV, L, D).

    SDPA's CPU kernels are built for long queries; for a single one they cost milliseconds per call (measured:
    70% of a decode step). Two small matmuls, with the query heads of each KV group stacked so GQA needs no
    repeated keys, do the same in microseconds.
    """
    B, H, _, D = q.shape
    KV, L = k.shape[1], k.shape[2]
    scores = (q.view(B, KV, H // KV, D) @ k.transpose(-1, -2)) * (D ** -0.5)  # (B, KV, group, L)
    if mask is not None:
        scores = scores.masked_fill(~mask.view(B, 1, 1, L), float("-inf"))
    probs = torch.softmax(scores.float(), dim=-1).to(v.dtype)
    return (probs @ v).view(B, H, 1, D)


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
        self.q_proj = nn.Linear(cfg.dim, cfg.n_heads * cfg.head_dim, bias=False)
        self.k_proj = nn.Linear(cfg.dim, cfg.n_kv_heads * cfg.head_dim, bias=False)
        self.v_proj = nn.Linear(cfg.dim, cfg.n_kv_heads * cfg.head_dim, bias=False)
        self.o_proj = nn.Linear(cfg.n_heads * cfg.head_dim, cfg.dim, bias=False)

    def forward(self, x, cos, sin, layer: int, cache: KVCache | None):
        """x (B, T, dim); cos/sin broadcast against (B, T, heads, head_dim)."""
        B, T, _ = x.shape
        H, KV, D = self.n_heads, self.n_kv_heads, self.head_dim
        if hasattr(self, "qkv_proj"):  # fused by fuse_projections: one matmul, one RoPE for q and k together
            qkv = self.qkv_proj(x).view(B, T, H + 2 * KV, D)
            qk = apply_rope(qkv[:, :, :H + KV], cos, sin)
            q, k, v = qk[:, :, :H], qk[:, :, H:], qkv[:, :, H + KV:]
        else:
            q = apply_rope(self.q_proj(x).view(B, T, H, D), cos, sin)
            k = apply_rope(self.k_proj(x).view(B, T, KV, D), cos, sin)
            v = self.v_proj(x).view(B, T, KV, D)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
        mask, causal = None, True
        if cache is not None:
            mask, causal = cache.attention_mask(T, x.device)
            k, v = cache.update(layer, k.to(cache.k[layer].dtype), v.to(cache.v[layer].dtype))
            k, v = k.to(q.dtype), v.to(q.dtype)
        if T == 1 and cache is not None:
            y = single_query_attention(q, k, v, mask)
        else:
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal,
                                               enable_gqa=self.n_heads != self.n_kv_heads)
        return self.o_proj(y.transpose(1, 2).reshape(B, T, -1))


class MLP(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.gate_proj = nn.Linear(cfg.dim, cfg.hidden_dim, bias=False)
        self.up_proj = nn.Linear(cfg.dim, cfg.hidden_dim, bias=False)
        self.down_proj = nn.Linear(cfg.hidden_dim, cfg.dim, bias=False)

    def forward(self, x):
        if hasattr(self, "gate_up_proj"):  # fused by fuse_projections
            gate, up = self.gate_up_proj(x).chunk(2, dim=-1)
        else:
            gate, up = self.gate_proj(x), self.up_proj(x)
        return self.down_proj(F.silu(gate) * up)


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.self_attn = Attention(cfg)
        self.post_attention_layernorm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.mlp = MLP(cfg)

    def forward(self, x, cos, sin, layer, cache):
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, layer, cache)
        return x + self.mlp(self.post_attention_layernorm(x))


class Transformer(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.dim)
        self.layers = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layers))
        self.norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.lm_head = nn.Linear(cfg.dim, cfg.vocab_size, bias=False)
        if cfg.tie_embeddings:
            self.lm_head.weight = self.embed_tokens.weight
        cos, sin = rope_tables(cfg.head_dim, cfg.max_seq_len, cfg.rope_theta)
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)
        self.apply(self._init_weights)
        # GPT-2's scaled init: each residual branch's output projection shrinks with depth.
        for name, p in self.named_parameters():
            if name.endswith(("o_proj.weight", "down_proj.weight")):
                nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * cfg.n_layers))

    @staticmethod
    def _init_weights(module):
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)

    def hidden_states(self, idx: torch.Tensor, cache: KVCache | SlotKVCache | None = None) -> torch.Tensor:
        """Final-norm hidden states (B, T, dim) for token ids (B, T)."""
        T = idx.shape[1]
        if isinstance(cache, SlotKVCache):
            pos = cache.positions()  # every row at its own position: (B, 1, 1, head_dim) RoPE tables
            if int(pos.max()) >= self.cfg.max_seq_len:
                raise ValueError(f"a sequence exceeds max_seq_len {self.cfg.max_seq_len}")
            cos, sin = self.rope_cos[pos][:, None, None, :], self.rope_sin[pos][:, None, None, :]  # T is 1
        else:
            start = cache.length if cache is not None else 0
            if start + T > self.cfg.max_seq_len:
                raise ValueError(f"sequence of {start + T} tokens exceeds max_seq_len {self.cfg.max_seq_len}")
            cos, sin = self.rope_cos[start:start + T, None, :], self.rope_sin[start:start + T, None, :]
        x = self.embed_tokens(idx)
        for i, layer in enumerate(self.layers):
            x = layer(x, cos, sin, i, cache)
        if cache is not None:
            cache.advance(T)
        return self.norm(x)

    def forward(self, idx: torch.Tensor, targets: torch.Tensor | None = None,
                cache: KVCache | SlotKVCache | None = None,
                loss_chunk: int = 0):
        """Logits (B, T, vocab) when `targets` is None, else the mean cross-entropy (ignore_index -100).

        `loss_chunk` > 0 computes the loss over that many positions at a time, recomputing each chunk's
        logits in the backward pass, so the full (B·T, vocab) logits never exist at once.
        """
        h = self.hidden_states(idx, cache)
        if targets is None:
            return self.lm_head(h)
        h, targets = h.reshape(-1, h.shape[-1]), targets.reshape(-1)
        if loss_chunk <= 0 or loss_chunk >= h.shape[0]:
            logits = self.lm_head(h).float()
            return F.cross_entropy(logits, targets, ignore_index=-100)
        n_valid = (targets != -100).sum().clamp(min=1)
        total = h.new_zeros((), dtype=torch.float32)
        for hc, tc in zip(h.split(loss_chunk), targets.split(loss_chunk), strict=True):
            total = total + torch.utils.checkpoint.checkpoint(_chunk_loss_sum, hc, tc, self.lm_head.weight,
                                                              use_reentrant=False)
        return total / n_valid

    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())


def _chunk_loss_sum(h, targets, weight):
    logits = F.linear(h, weight).float()
    return F.cross_entropy(logits, targets, ignore_index=-100, reduction="sum")


# ---- inference: fewer and faster ops per decoding step ----------------------------------------------------

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
