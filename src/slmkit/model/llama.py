"""The whole Llama-family decoder in one file: RMSNorm, RoPE, grouped-query attention, SwiGLU.

Module and parameter names mirror Hugging Face's `LlamaForCausalLM` (`embed_tokens`, `layers.N.self_attn.q_proj`,
`mlp.gate_proj`, ...), and RoPE uses the HF "rotate-half" layout, so a state dict moves between slmkit and
transformers with only a `model.` prefix (see formats/hf_dir.py). Logits match transformers to ~1e-5 in fp32.
The caches it decodes with, and the inference-only rewrites, are in decode.py.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from slmkit.model.config import ModelConfig
from slmkit.model.decode import KVCache, SlotKVCache


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

    def hidden_states(self, idx: torch.Tensor, cache: KVCache | SlotKVCache | None = None,
                      embeds: torch.Tensor | None = None) -> torch.Tensor:
        """Final-norm hidden states (B, T, dim) for token ids (B, T), or for input embeddings `embeds` (B, T, dim)
        given instead of the ids' own (a vision model's image tokens spliced in: model/vit.py)."""
        T = idx.shape[1] if embeds is None else embeds.shape[1]
        if isinstance(cache, SlotKVCache):
            pos = cache.positions(T)  # every row at its own positions: (B, T, 1, head_dim) RoPE tables
            if int(pos.max()) >= self.cfg.max_seq_len:
                raise ValueError(f"a sequence exceeds max_seq_len {self.cfg.max_seq_len}")
            cos, sin = self.rope_cos[pos][:, :, None, :], self.rope_sin[pos][:, :, None, :]
        else:
            start = cache.length if cache is not None else 0
            if start + T > self.cfg.max_seq_len:
                raise ValueError(f"sequence of {start + T} tokens exceeds max_seq_len {self.cfg.max_seq_len}")
            cos, sin = self.rope_cos[start:start + T, None, :], self.rope_sin[start:start + T, None, :]
        x = self.embed_tokens(idx) if embeds is None else embeds
        for i, layer in enumerate(self.layers):
            x = layer(x, cos, sin, i, cache)
        if cache is not None:
            cache.advance(T)
        return self.norm(x)

    def forward(self, idx: torch.Tensor, targets: torch.Tensor | None = None,
                cache: KVCache | SlotKVCache | None = None,
                loss_chunk: int = 0, embeds: torch.Tensor | None = None):
        """Logits (B, T, vocab) when `targets` is None, else the mean cross-entropy (ignore_index -100).

        `loss_chunk` > 0 computes the loss over that many positions at a time, recomputing each chunk's
        logits in the backward pass, so the full (B·T, vocab) logits never exist at once.
        """
        h = self.hidden_states(idx, cache, embeds)
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

