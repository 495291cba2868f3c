"""The `slm kb` commands as plain functions over paths and names: `kb_search`, `kb_ask`, `kb_eval`
(`index_kb` in slmkit.kb.index is `slm kb index` as it is, `kb_pairs` in slmkit.kb.pairs `slm kb pairs`).

`reranker`: a cross-encoder directory (`slm rerank-train`) that reorders the best `rerank_pool` fused chunks.

Answering decodes most of the time, so a model given by name goes through `generation_backend` like `slm serve`:
llama.cpp on a CPU when it is installed, else slmkit's torch model.
"""

from __future__ import annotations

from pathlib import Path

from slmkit.kb.ask import MIN_SIMILARITY, TOP_K, Answer, ask
from slmkit.kb.evaluate import evaluate_kb, read_questions
from slmkit.kb.index import open_kb
from slmkit.kb.retrieve import RERANK_POOL, search


def _open_lm(model: str, backend: str):
    from slmkit.lm.resolve import generation_backend, load_lm
    backend, spec, options = generation_backend(model, backend, "cpu")
    return load_lm(spec, backend=backend, **options)


def _open_reranker(reranker: str | Path | None):
    if reranker is None:
        return None
    from slmkit.lm.reranker import load_reranker
    return load_reranker(reranker)


def kb_search(kb_dir: str | Path, query: str, k: int = 5, mode: str = "hybrid", reranker: str | Path | None = None,
              rerank_pool: int = RERANK_POOL) -> list[dict]:
    """The `k` best chunks for `query` as dicts (path, lines, heading, text, scores and ranks); with `reranker`,
    `score` is the cross-encoder's."""
    kb = open_kb(kb_dir)
    try:
        rerank = _open_reranker(reranker)
        return [h.to_dict() for h in search(kb, query, k=k, mode=mode, rerank=rerank, rerank_pool=rerank_pool)]
    finally:
        kb.close()


def kb_ask(kb_dir: str | Path, question: str, model: str, backend: str = "auto", k: int = TOP_K,
           mode: str = "hybrid", min_similarity: float = MIN_SIMILARITY, max_new_tokens: int = 160,
           reranker: str | Path | None = None, rerank_pool: int = RERANK_POOL) -> Answer:
    kb = open_kb(kb_dir)
    rerank = _open_reranker(reranker)
    lm = _open_lm(model, backend)
    try:
        return ask(kb, question, lm, k=k, mode=mode, min_similarity=min_similarity, max_new_tokens=max_new_tokens,
                   rerank=rerank, rerank_pool=rerank_pool)
    finally:
        lm.close()
        kb.close()


def kb_eval(kb_dir: str | Path | None, questions: str | Path, out: str | Path, model: str | None = None,
            backend: str = "auto", mode: str = "hybrid", k: int = TOP_K, min_similarity: float = MIN_SIMILARITY,
            limit: int | None = None, max_new_tokens: int = 160, log=None, reranker: str | Path | None = None,
            rerank_pool: int = RERANK_POOL) -> dict:
    """`evaluate_kb` on a question file, writing OUT/results.json; no `model`: retrieval only."""
    if kb_dir is None and mode != "none":
        raise ValueError(f"--mode {mode} retrieves: name the knowledge base folder (slm kb eval KB --questions ...)")
    items = read_questions(questions)[:limit]
    kb = open_kb(kb_dir) if mode != "none" else None
    rerank = _open_reranker(reranker)
    lm = _open_lm(model, backend) if model else None
    try:
        return evaluate_kb(kb, items, lm, mode=mode, k=k, min_similarity=min_similarity, out=out,
                           max_new_tokens=max_new_tokens, log=log, rerank=rerank, rerank_pool=rerank_pool)
    finally:
        if lm is not None:
            lm.close()
        if kb is not None:
            kb.close()
