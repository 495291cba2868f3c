"""Hybrid retrieval: BM25 (the store's keyword index) and dense similarity (the KB's embedder) fused by
reciprocal rank (Cormack et al. 2009: score = sum over lists of 1 / (60 + rank)), then an optional reranker.

RRF needs no score calibration between the two lists, which is why it is the usual default: BM25 finds the
chunk that shares the question's rare words (`__cause__`, `nonlocal`), the embedder the one that paraphrases it.
A reranker (a cross-encoder: `slmkit.lm.reranker.load_reranker`, `--reranker DIR`) is any callable
`(query, hits) -> hits` given as `rerank=`; it sees the best `rerank_pool` fused candidates (20: a cross-encoder
reads every one with the query, so the pool is its cost) and returns them reordered (and may rescore them).

Every hit carries `similarity`: the cosine similarity of its chunk to the question, whatever the mode, which is
what `ask` abstains on.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass

from slmkit.kb.index import KnowledgeBase

MODES = ("hybrid", "bm25", "dense")
RRF_K = 60
CANDIDATES = 50
RERANK_POOL = 20


@dataclass
class Hit:
    id: int
    path: str
    heading: str
    start_line: int
    end_line: int
    text: str
    score: float  # the fused (or single-list) score, higher is better
    similarity: float  # cosine similarity of chunk and question
    bm25_rank: int | None = None  # 1-based rank in each list; None when the list did not return it
    dense_rank: int | None = None

    @property
    def lines(self) -> str:
        return f"{self.start_line}-{self.end_line}"

    def to_dict(self) -> dict:
        return {**asdict(self), "lines": self.lines}


Reranker = Callable[[str, list[Hit]], list[Hit]]


def rrf(rankings: list[list[int]], k: int = RRF_K) -> dict[int, float]:
    """Reciprocal-rank fusion of ranked id lists: id -> sum of 1 / (k + rank)."""
    scores: dict[int, float] = {}
    for ranking in rankings:
        for rank, i in enumerate(ranking, 1):
            scores[i] = scores.get(i, 0.0) + 1.0 / (k + rank)
    return scores


def search(kb: KnowledgeBase, query: str, k: int = 5, mode: str = "hybrid", candidates: int = CANDIDATES,
           rerank: Reranker | None = None, rerank_pool: int = RERANK_POOL) -> list[Hit]:
    """The `k` best chunks for `query`, best first; with `rerank`, the best `rerank_pool` fused ones reranked."""
    if mode not in MODES:
        raise ValueError(f"unknown retrieval mode {mode!r}; choose one of {', '.join(MODES)}")
    if not query.strip():
        raise ValueError("empty question; ask something")
    if k < 1:
        raise ValueError(f"k must be >= 1, not {k}")
    if rerank_pool < 1:
        raise ValueError(f"the rerank pool must be >= 1 candidate, not {rerank_pool}")
    pool = max(candidates, k)
    vector = kb.embed([query])[0]
    bm25 = [i for i, _ in kb.store.keyword_search(query, pool)] if mode != "dense" else []
    dense = [i for i, _ in kb.store.vector_search(vector, pool)] if mode != "bm25" else []
    if mode == "hybrid":
        fused = rrf([bm25, dense])
    else:
        ranking = bm25 or dense
        fused = {i: 1.0 / rank for rank, i in enumerate(ranking, 1)}
    order = sorted(fused, key=lambda i: -fused[i])[:max(rerank_pool, k) if rerank else k]
    sims = kb.store.similarities(vector, order)
    bm25_rank = {i: r for r, i in enumerate(bm25, 1)}
    dense_rank = {i: r for r, i in enumerate(dense, 1)}
    hits = [Hit(s.id, s.path, s.chunk.heading, s.chunk.start_line, s.chunk.end_line, s.chunk.text, fused[s.id],
                sims.get(s.id, 0.0), bm25_rank.get(s.id), dense_rank.get(s.id))
            for s in kb.store.get_chunks(order)]
    if rerank:
        hits = rerank(query, hits)
    return hits[:k]
