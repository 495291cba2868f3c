"""The `slm kb` commands as plain functions over paths and names: `kb_search`, `kb_ask`, `kb_eval`
(`index_kb` in slmkit.kb.index is `slm kb index` as it is, `kb_pairs` in slmkit.kb.pairs `slm kb pairs`).

`reranker`: a cross-encoder directory (`slm rerank-train`) that reorders the best `rerank_pool` fused chunks.

Answering decodes most of the time, so a model given by name goes through `generation_backend` like `slm serve`:
llama.cpp on a CPU when it is installed, else slmkit's torch model. `answer="quote"` (kb/ask.py's answer modes)
quotes the sources and loads no model, even when one is named.
"""

from __future__ import annotations

from pathlib import Path

from slmkit.kb.ask import ANSWER, MIN_SIMILARITY, QUOTE_SENTENCES, TOP_K, Answer, ask, check_answer, default_answer
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


def kb_ask(kb_dir: str | Path, question: str, model: str | None = None, backend: str = "auto", k: int = TOP_K,
           mode: str = "hybrid", min_similarity: float = MIN_SIMILARITY, max_new_tokens: int = 160,
           reranker: str | Path | None = None, rerank_pool: int = RERANK_POOL, answer: str | None = None,
           quote_sentences: int = QUOTE_SENTENCES) -> Answer:
    """`ask` on the KB in `kb_dir`; `answer` None: `model` with a `model`, `quote` without."""
    answer = answer or default_answer(model)
    check_answer(answer, model)
    kb = open_kb(kb_dir)
    lm = None
    try:
        rerank = _open_reranker(reranker)
        lm = _open_lm(model, backend) if answer != "quote" else None
        return ask(kb, question, lm, k=k, mode=mode, min_similarity=min_similarity, max_new_tokens=max_new_tokens,
                   rerank=rerank, rerank_pool=rerank_pool, answer=answer, quote_sentences=quote_sentences)
    finally:
        if lm is not None:
            lm.close()
        kb.close()


def kb_eval(kb_dir: str | Path | None, questions: str | Path, out: str | Path, model: str | None = None,
            backend: str = "auto", mode: str = "hybrid", k: int = TOP_K, min_similarity: float = MIN_SIMILARITY,
            limit: int | None = None, max_new_tokens: int = 160, log=None, reranker: str | Path | None = None,
            rerank_pool: int = RERANK_POOL, answer: str = ANSWER, quote_sentences: int = QUOTE_SENTENCES) -> dict:
    """`evaluate_kb` on a question file, writing OUT/results.json; no `model`: retrieval only (or, with
    `answer="quote"`, the quotes)."""
    if kb_dir is None and mode != "none":
        raise ValueError(f"--mode {mode} retrieves: name the knowledge base folder (slm kb eval KB --questions ...)")
    if model is not None or answer != "model":  # `model` without a model: retrieval only
        check_answer(answer, model)
    items = read_questions(questions)[:limit]
    kb = open_kb(kb_dir) if mode != "none" else None
    lm = None
    try:
        rerank = _open_reranker(reranker)
        lm = _open_lm(model, backend) if model and answer != "quote" else None
        return evaluate_kb(kb, items, lm, mode=mode, k=k, min_similarity=min_similarity, out=out,
                           max_new_tokens=max_new_tokens, log=log, rerank=rerank, rerank_pool=rerank_pool,
                           answer=answer, quote_sentences=quote_sentences)
    finally:
        if lm is not None:
            lm.close()
        if kb is not None:
            kb.close()
