"""Length-adaptive token pruning for the encoder (Kim & Cho 2021, "Length-Adaptive Transformer: Train Once with
Length Drop, Use Anytime with Search").

A length schedule `keep` has one fraction per layer: after layer l's self-attention, each sequence keeps
ceil(keep[l] x its original number of real tokens) tokens (never more than it still has, never fewer than one),
and layer l's feed-forward half and every later layer run on the shorter sequence: the batch physically shrinks,
which is where the speed comes from. The tokens kept are the most significant by attention: the attention each
one receives in that layer, summed over heads and over the (real) queries. The first token ([CLS] / <s>) is
always kept and padding is never kept before a real token. Significance needs the attention probabilities, so a
layer that drops tokens computes them explicitly; a layer that keeps everything runs the ordinary
scaled_dot_product_attention path, and so does the encoder without a schedule.

The same mechanics train the model to tolerate pruning (LengthDrop: `sample_keep` draws a random schedule,
`smallest_keep` the sandwich rule's smallest one; classify/prune.py does the training and the search) and count
its cost (`encoder_flops`: multiply-adds of the matrix products from the sequence length at each layer).
"""

from __future__ import annotations

import math
import random
from collections.abc import Sequence

import torch
import torch.nn.functional as F


def kept_lengths(n: int, keep: Sequence[float]) -> list[int]:
    """Tokens left after each layer for a sequence of `n` real tokens under `keep` (the rule the forward uses)."""
    out, current = [], n
    for frac in keep:
        # the small epsilon keeps e.g. 0.7 * 10 = 7.000000000000001 from rounding up to 8
        current = min(current, max(1, math.ceil(frac * n - 1e-9)))
        out.append(current)
    return out


def check_keep(keep: Sequence[float], n_layers: int) -> tuple[float, ...]:
    keep = tuple(float(k) for k in keep)
    if len(keep) != n_layers:
        raise ValueError(f"a length schedule needs one fraction per layer ({n_layers}), got {len(keep)}")
    if any(not 0 < k <= 1 for k in keep):
        raise ValueError(f"length schedule fractions must be in (0, 1], got {list(keep)}")
    return keep


def attention_with_probs(attn, x: torch.Tensor, key_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """model/encoder.py's SelfAttention computed by hand: (output (b, t, d), probabilities (b, heads, t, t))."""
    b, t, d = x.shape
    q, k, v = (proj(x).view(b, t, attn.n_heads, d // attn.n_heads).transpose(1, 2)
               for proj in (attn.query, attn.key, attn.value))
    scores = q @ k.transpose(-1, -2) / math.sqrt(d // attn.n_heads)
    scores = scores.masked_fill(~key_mask[:, None, None, :], torch.finfo(scores.dtype).min)
    probs = scores.softmax(dim=-1)
    dropped = F.dropout(probs, attn.dropout, training=attn.training)
    return (dropped @ v).transpose(1, 2).reshape(b, t, d), probs


def significance(probs: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """(b, t) attention received by each token, summed over heads and real queries; the first token scores +inf
    (always kept), padding -inf (never kept before a real token)."""
    received = (probs * mask[:, None, :, None].to(probs.dtype)).sum(dim=(1, 2))
    received = received.masked_fill(~mask, float("-inf"))
    received[:, 0] = float("inf")
    return received


def pruned_forward(model, ids: torch.Tensor, attention_mask: torch.Tensor | None, keep: Sequence[float],
                   token_type_ids: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The encoder's forward under the length schedule `keep`: (hidden states (b, t', d), mask (b, t') of the
    tokens kept, True = real), t' the longest kept sequence in the batch."""
    keep = check_keep(keep, model.cfg.n_layers)
    mask = torch.ones_like(ids, dtype=torch.bool) if attention_mask is None else attention_mask.bool()
    targets = torch.tensor([kept_lengths(int(n), keep) for n in mask.sum(1).tolist()],
                           device=ids.device).T  # (layers, b): tokens each row keeps after each layer
    x = model.embeddings(ids, token_type_ids)
    for layer, k in zip(model.encoder.layer, targets, strict=True):
        if torch.equal(k, mask.sum(1)):  # nothing to drop here: the ordinary (SDPA) layer
            x = layer(x, mask)
            continue
        attended, probs = attention_with_probs(layer.attention.self, x, mask)
        order = significance(probs, mask).topk(int(k.max()), dim=1).indices  # most significant first
        chosen = torch.arange(order.shape[1], device=ids.device)[None, :] < k[:, None]
        # back in sequence order (positions are already in the embeddings, but order keeps results readable)
        order, perm = torch.sort(order, dim=1)
        mask = torch.gather(chosen, 1, perm)
        index = order[..., None].expand(-1, -1, x.shape[-1])
        x = layer.attention.output(torch.gather(attended, 1, index), torch.gather(x, 1, index))
        x = layer.output(F.gelu(layer.intermediate.dense(x)), x)
    return x, mask


def sample_keep(n_layers: int, drop_ratio: float, rng: random.Random) -> tuple[float, ...]:
    """LengthDrop's random schedule: each layer keeps a fraction U(1 - p, 1) of the tokens the layer before kept."""
    out, current = [], 1.0
    for _ in range(n_layers):
        current *= rng.uniform(1 - drop_ratio, 1)
        out.append(current)
    return tuple(out)


def smallest_keep(n_layers: int, drop_ratio: float) -> tuple[float, ...]:
    """The sandwich rule's smallest sub-model: every layer drops the largest share LengthDrop allows."""
    return tuple((1 - drop_ratio) ** (i + 1) for i in range(n_layers))


def layer_flops(dim: int, hidden_dim: int, n_in: int, n_out: int) -> int:
    """Multiply-adds x 2 of one encoder layer's matrix products: Q, K, V on n_in tokens, scores and the weighted
    sum over n_in x n_in, then the attention output projection and the MLP on the n_out tokens kept."""
    return 2 * (3 * n_in * dim * dim + 2 * n_in * n_in * dim + n_out * dim * dim + 2 * n_out * dim * hidden_dim)


def encoder_flops(cfg, n: int, keep: Sequence[float] | None = None) -> int:
    """FLOPs of the encoder body on one sequence of `n` tokens, under `keep` (None: full length)."""
    lengths = kept_lengths(n, keep) if keep is not None else [n] * cfg.n_layers
    total, n_in = 0, n
    for n_out in lengths:
        total += layer_flops(cfg.dim, cfg.hidden_dim, n_in, n_out)
        n_in = n_out
    return total
