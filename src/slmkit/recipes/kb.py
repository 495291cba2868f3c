"""The `slm kb` commands as plain functions over paths and names: `kb_search`, `kb_ask`, `kb_eval`
(`index_kb` in slmkit.kb.index is `slm kb index` as it is).

Answering decodes most of the time, so a model given by name goes through `generation_backend` like `slm serve`:
llama.cpp on a CPU when it is installed, else slmkit's torch model.
"""

from __future__ import annotations

from pathlib import Path

from slmkit.kb.ask import MIN_SIMILARITY, TOP_K, Answer, ask
from slmkit.kb.evaluate import evaluate_kb, read_questions
from slmkit.kb.index import open_kb
from slmkit.kb.retrieve import search


def _open_lm(model: str, backend: str):
    from slmkit.lm.resolve import generation_backend, load_lm
    backend, spec, options = generation_backend(model, backend, "cpu")
    return load_lm(spec, backend=backend, **options)


def kb_search(kb_dir: str | Path, query: str, k: int = 5, mode: str = "hybrid") -> list[dict]:
    """The `k` best chunks for `query` as dicts (path, lines, heading, text, scores and ranks)."""
    kb = open_kb(kb_dir)
    try:
        return [h.to_dict() for h in search(kb, query, k=k, mode=mode)]
    finally:
        kb.close()


def kb_ask(kb_dir: str | Path, question: str, model: str, backend: str = "auto", k: int = TOP_K,
           mode: str = "hybrid", min_similarity: float = MIN_SIMILARITY, max_new_tokens: int = 160) -> Answer:
    kb = open_kb(kb_dir)
    lm = _open_lm(model, backend)
    try:
        return ask(kb, question, lm, k=k, mode=mode, min_similarity=min_similarity, max_new_tokens=max_new_tokens)
    finally:
        lm.close()
        kb.close()


def kb_eval(kb_dir: str | Path | None, questions: str | Path, out: str | Path, model: str | None = None,
            backend: str = "auto", mode: str = "hybrid", k: int = TOP_K, min_similarity: float = MIN_SIMILARITY,
            limit: int | None = None, max_new_tokens: int = 160, log=None) -> dict:
    """`evaluate_kb` on a question file, writing OUT/results.json; no `model`: retrieval only."""
    if kb_dir is None and mode != "none":
        raise ValueError(f"--mode {mode} retrieves: name the knowledge base folder (slm kb eval KB --questions ...)")
    items = read_questions(questions)[:limit]
    kb = open_kb(kb_dir) if mode != "none" else None
    lm = _open_lm(model, backend) if model else None
    try:
        return evaluate_kb(kb, items, lm, mode=mode, k=k, min_similarity=min_similarity, out=out,
                           max_new_tokens=max_new_tokens, log=log)
    finally:
        if lm is not None:
            lm.close()
        if kb is not None:
            kb.close()
