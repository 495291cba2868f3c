"""Bits per byte of a model on raw text, next to general-purpose compressors on the same bytes.

Bits per byte (total cross-entropy in bits / UTF-8 bytes of the text) is comparable across tokenizers and
with compressors: `xz -9e` at 1.6 bits/byte means a model below that "compresses" the text better than xz.
"""

from __future__ import annotations

import gzip
import lzma
import math

import torch

from slmkit.model.llama import Transformer


def bits_per_byte(nats: float, n_bytes: int) -> float:
    """Cross-entropy `nats` summed over a text, in bits per UTF-8 byte of that text."""
    return nats / math.log(2) / max(1, n_bytes)


def text_bits_per_byte(model: Transformer, tokenizer, texts: list[str], seq_len: int | None = None,
                       stride: int | None = None, batch_size: int = 8) -> dict:
    """Score every token of every document (each starts with bos), in windows of `seq_len` moved by `stride`.

    With stride < seq_len each window re-reads `seq_len - stride` tokens of context that are not scored
    again (the usual sliding-window perplexity), so later tokens are predicted with more context.
    """
    docs = [tokenizer.encode(text, add_bos=tokenizer.add_bos) for text in texts]
    n_bytes = sum(len(t.encode("utf-8")) for t in texts)
    return token_bits_per_byte(model, docs, n_bytes, seq_len, stride, batch_size)


@torch.no_grad()
def token_bits_per_byte(model: Transformer, docs: list[list[int]], n_bytes: int, seq_len: int | None = None,
                        stride: int | None = None, batch_size: int = 8) -> dict:
    """`text_bits_per_byte` for documents already tokenized (e.g. a token dataset's val split), whose text is
    `n_bytes` long in all. The first token of each document is context only."""
    model.eval()
    device = next(model.parameters()).device
    seq_len = seq_len or model.cfg.max_seq_len
    stride = stride or seq_len
    if not 0 < stride <= seq_len:
        raise ValueError(f"stride must be in 1..seq_len ({seq_len}), got {stride}")
    windows = []  # (input ids, targets with -100 on context-only positions)
    for ids in docs:
        scored_until = 1  # position 0 (bos) is never predicted
        for start in range(0, max(1, len(ids) - 1), stride):
            chunk = ids[start:start + seq_len + 1]
            if len(chunk) < 2:
                break
            x, y = chunk[:-1], list(chunk[1:])
            for i in range(len(y)):
                if start + i + 1 < scored_until:
                    y[i] = -100
            scored_until = start + len(chunk)
            windows.append((x, y))
            if start + len(chunk) >= len(ids):
                break
    total_nats, n_tokens = 0.0, 0
    for b in range(0, len(windows), batch_size):
        batch = windows[b:b + batch_size]
        width = max(len(x) for x, _ in batch)
        xs = torch.zeros(len(batch), width, dtype=torch.long)
        ys = torch.full((len(batch), width), -100, dtype=torch.long)
        for i, (x, y) in enumerate(batch):
            xs[i, :len(x)] = torch.tensor(x)
            ys[i, :len(y)] = torch.tensor(y)
        logits = model(xs.to(device)).float()
        losses = torch.nn.functional.cross_entropy(logits.flatten(0, 1), ys.to(device).flatten(),
                                                   ignore_index=-100, reduction="sum")
        total_nats += losses.item()
        n_tokens += int((ys != -100).sum())
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
