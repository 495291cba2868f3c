"""Bits per byte of a model on raw text, next to general-purpose compressors on the same bytes.

Bits per byte (total cross-entropy in bits / UTF-8 bytes of the text) is comparable across tokenizers and
with compressors: `xz -9e` at 1.6 bits/byte means a model below that "compresses" the text better than xz.

This module holds the one sliding-window scorer: `sliding_windows` plans the windows, `document_nats` scores
them through any log-probability function — a Transformer here (`token_bits_per_byte`, used by `slm quickstart`),
an `LM` in eval/harness.py's perplexity tasks.
"""

from __future__ import annotations

import gzip
import lzma
import math
from collections.abc import Callable

import numpy as np
import torch

from slmkit.model.llama import Transformer


def bits_per_byte(nats: float, n_bytes: int) -> float:
    """Cross-entropy `nats` summed over a text, in bits per UTF-8 byte of that text."""
    return nats / math.log(2) / max(1, n_bytes)


def sliding_windows(n_tokens: int, window: int, stride: int) -> list[tuple[int, int, int]]:
    """The windows that score every token of an `n_tokens`-token document once, its first token (bos) being
    context only: (start, end, new) reads ids[start:end] and scores its last `new` tokens.

    Windows of `window` tokens move by `stride`. With stride < window - 1 each window re-reads tokens an earlier
    one scored, as context only (the usual sliding-window perplexity), so later tokens are predicted with more
    context; stride = window - 1 gives non-overlapping windows.
    """
    if not 0 < stride < window:
        raise ValueError(f"stride must be in 1..{window - 1} (the tokens one window predicts), got {stride}")
    out = []
    start, scored_until = 0, 1
    while True:
        end = min(start + window, n_tokens)
        if end > scored_until:
            out.append((start, end, end - scored_until))
        scored_until = max(scored_until, end)
        if end >= n_tokens:
            return out
        start += stride


def document_nats(logprobs: Callable[[list[list[int]]], list[np.ndarray]], docs: list[list[int]], window: int,
                  stride: int) -> list[tuple[float, int]]:
    """(cross-entropy in nats, tokens scored) of each document, scored in `sliding_windows`.

    `logprobs(windows)` gives, for each list of ids, the log-probabilities of ids[1:] (each given the ids before
    it): an `LM`'s `logprobs_batch`, or `model_logprobs` for a bare Transformer. All windows go in one call, so
    the scorer can batch them as it likes.
    """
    plans = [(d, start, end, new) for d, ids in enumerate(docs)
             for start, end, new in sliding_windows(len(ids), window, stride)]
    results = logprobs([list(docs[d][start:end]) for d, start, end, _ in plans])
    nats, tokens = [0.0] * len(docs), [0] * len(docs)
    for (d, _, _, new), lp in zip(plans, results, strict=True):
        nats[d] -= float(lp[-new:].sum())
        tokens[d] += new
    return list(zip(nats, tokens, strict=True))


def model_logprobs(model: Transformer, batch_size: int = 8) -> Callable[[list[list[int]]], list[np.ndarray]]:
    """`document_nats`'s scorer for a Transformer: windows right-padded into batches of `batch_size`."""
    model.eval()
    device = next(model.parameters()).device

    @torch.no_grad()
    def logprobs(windows: list[list[int]]) -> list[np.ndarray]:
        out = []
        for b in range(0, len(windows), batch_size):
            batch = windows[b:b + batch_size]
            width = max(len(w) for w in batch) - 1
            xs = torch.zeros(len(batch), width, dtype=torch.long)
            ys = torch.zeros(len(batch), width, dtype=torch.long)
            for i, w in enumerate(batch):
                xs[i, :len(w) - 1] = torch.tensor(w[:-1])
                ys[i, :len(w) - 1] = torch.tensor(w[1:])
            logp = torch.log_softmax(model(xs.to(device)).float(), dim=-1)
            picked = logp.gather(-1, ys.to(device).unsqueeze(-1)).squeeze(-1).cpu().numpy()
            out += [picked[i, :len(w) - 1] for i, w in enumerate(batch)]
        return out

    return logprobs


def text_bits_per_byte(model: Transformer, tokenizer, texts: list[str], seq_len: int | None = None,
                       stride: int | None = None, batch_size: int = 8) -> dict:
    """Score every token of every document (each starts with bos), in windows of `seq_len` moved by `stride`
    (default: seq_len, non-overlapping); see `sliding_windows`."""
    docs = [tokenizer.encode(text, add_bos=tokenizer.add_bos) for text in texts]
    n_bytes = sum(len(t.encode("utf-8")) for t in texts)
    return token_bits_per_byte(model, docs, n_bytes, seq_len, stride, batch_size)


def token_bits_per_byte(model: Transformer, docs: list[list[int]], n_bytes: int, seq_len: int | None = None,
                        stride: int | None = None, batch_size: int = 8) -> dict:
    """`text_bits_per_byte` for documents already tokenized (e.g. a token dataset's val split), whose text is
    `n_bytes` long in all. The first token of each document is context only."""
    seq_len = seq_len or model.cfg.max_seq_len
    # a window of seq_len inputs predicts seq_len targets: seq_len + 1 tokens
    scored = document_nats(model_logprobs(model, batch_size), docs, seq_len + 1, stride or seq_len)
    total_nats, n_tokens = sum(n for n, _ in scored), sum(t for _, t in scored)
    return {"bits_per_byte": bits_per_byte(total_nats, n_bytes), "loss": total_nats / max(1, n_tokens),
            "tokens": n_tokens, "bytes": n_bytes}


def compressor_bits_per_byte(docs: list[bytes]) -> dict:
    """gzip -9 and xz -9e (LZMA2 preset 9 + extreme, .xz container) on the same bytes.

    "whole" compresses the documents concatenated, so the compressor can reuse text across files;
    "per file" compresses each document on its own, which is what a model scoring each file separately faces.
    """
    n = max(1, sum(len(d) for d in docs))

    def gz(b):
        return len(gzip.compress(b, compresslevel=9, mtime=0))

    def xz(b):
        return len(lzma.compress(b, preset=9 | lzma.PRESET_EXTREME))

    whole = b"".join(docs)
    out = {"gzip -9": 8 * gz(whole) / n, "xz -9e": 8 * xz(whole) / n}
    if len(docs) > 1:
        out["gzip -9 (per file)"] = 8 * sum(gz(d) for d in docs) / n
        out["xz -9e (per file)"] = 8 * sum(xz(d) for d in docs) / n
    return out
