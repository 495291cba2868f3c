"""Cross-encoder reranking: `load_reranker(spec)` -> a `Reranker` that scores (query, passage) pairs together and
reorders retrieved hits, best first; the knowledge base's `rerank=` hook (`slm kb search|ask|eval --reranker DIR`).

    rr = load_reranker("runs/reranker")             # a directory `slm rerank-train` wrote, or any transformers
    rr.score("what does raise do?", ["...", "..."])  # BertForSequenceClassification / CrossEncoder with one label
    hits = rr("what does raise do?", hits)           # the hits (anything with .text) by score, rescored

A pair is encoded the way transformers' tokenizer does it for a CrossEncoder: the tokenizer.json's pair template
("[CLS] query [SEP] passage [SEP]", token types 0 then 1 for BERT; "<s> q </s></s> p </s>" for RoBERTa),
truncated longest-first to the model's positions (or `max_length`). Pairs run in length-sorted batches.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import tokenizers
import torch

from slmkit.model.cross_encoder import CrossEncoder


class Reranker:
    """A cross-encoder with its tokenizer; `__call__(query, hits)` is the knowledge base's rerank hook."""

    def __init__(self, model: CrossEncoder, tokenizer, name: str = "reranker", batch_size: int = 16,
                 max_length: int | None = None):
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.name = name
        self.batch_size = batch_size
        self.max_length = min(max_length or model.cfg.max_positions, model.cfg.max_positions)
        self._hf = tokenizers.Tokenizer.from_str(tokenizer.hf.to_str())
        self._hf.no_padding()
        self._hf.enable_truncation(self.max_length, strategy="longest_first")
        try:
            self._hf.encode("a", "b")
        except Exception as e:  # tokenizers: "Template for `pair` is not provided" and the like
            raise ValueError(f"{name}: the tokenizer cannot encode a (query, passage) pair ({e}); its tokenizer.json "
                             "needs a post-processor with a pair template, as BERT's and RoBERTa's have") from None

    def encode(self, query: str, passage: str) -> tuple[list[int], list[int]]:
        """(ids, token type ids) of one pair; RoBERTa has one token type, so its types are all 0."""
        enc = self._hf.encode(query, passage)
        types = enc.type_ids if self.model.cfg.type_vocab_size > 1 else [0] * len(enc.ids)
        return enc.ids, types

    def batch(self, pairs: list[tuple[list[int], list[int]]]) -> tuple[torch.Tensor, ...]:
        """Right-padded (ids, attention mask, token types) of encoded pairs, on the model's device."""
        width = max(len(ids) for ids, _ in pairs)
        x = torch.full((len(pairs), width), self.model.cfg.pad_token_id, dtype=torch.long)
        mask = torch.zeros(len(pairs), width, dtype=torch.long)
        types = torch.zeros(len(pairs), width, dtype=torch.long)
        for r, (ids, tt) in enumerate(pairs):
            x[r, :len(ids)], mask[r, :len(ids)], types[r, :len(ids)] = torch.tensor(ids), 1, torch.tensor(tt)
        device = next(self.model.parameters()).device
        return x.to(device), mask.to(device), types.to(device)

    @torch.inference_mode()
    def score(self, query: str, passages: list[str]) -> list[float]:
        """The relevance logit of each passage for `query` (higher is more relevant), in the passages' order."""
        pairs = [self.encode(query, p) for p in passages]
        out = [0.0] * len(pairs)
        order = sorted(range(len(pairs)), key=lambda i: len(pairs[i][0]))
        for start in range(0, len(order), self.batch_size):
            rows = order[start:start + self.batch_size]
            for i, s in zip(rows, self.model(*self.batch([pairs[i] for i in rows])).float().tolist(), strict=True):
                out[i] = s
        return out

    def __call__(self, query: str, hits: list) -> list:
        """`hits` (objects with .text, e.g. the knowledge base's) sorted by score, best first; a dataclass hit
        comes back as a copy with `score` set to the reranker's."""
        if not hits:
            return []
        scores = self.score(query, [h.text for h in hits])
        ranked = sorted(zip(scores, range(len(hits)), hits, strict=True), key=lambda t: (-t[0], t[1]))
        return [dataclasses.replace(h, score=s) if dataclasses.is_dataclass(h) and hasattr(h, "score") else h
                for s, _, h in ranked]

    def close(self) -> None:
        """Nothing to free: for symmetry with LM."""


def load_reranker(spec: str | Path, device: str = "cpu", dtype: torch.dtype = torch.float32,
                  max_length: int | None = None) -> Reranker:
    """A `Reranker` for a reranker directory (`slm rerank-train`'s, or a transformers / sentence-transformers
    cross-encoder with one label) or a run directory holding one (its `model/`)."""
    from slmkit.formats.reranker_dir import is_reranker_dir, load_reranker_dir
    from slmkit.tokenizer import load_tokenizer
    path = Path(spec)
    if not path.exists():
        raise FileNotFoundError(f"{path}: no such reranker directory; train one with `slm rerank-train`")
    if not is_reranker_dir(path) and is_reranker_dir(path / "model"):
        path = path / "model"
    model = load_reranker_dir(path, device=device, dtype=dtype)
    return Reranker(model, load_tokenizer(path), name=str(spec), max_length=max_length)
