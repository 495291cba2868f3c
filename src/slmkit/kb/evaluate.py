"""`slm kb eval`: retrieval and answer quality of a knowledge base on a question file in kb-python's format
(`{"id", "question", "answer", "answer_keywords", "topics", "answerable"}`), written to OUT/results.json.

A retrieved chunk is gold when its file's stem is one of the question's `topics` (a file named by its stem or its
whole name both count, so support's `answer_articles: ["shipping.md"]` works too). The top-level numbers:
- `hit_at_5`: share of answerable questions with a gold chunk among the top 5;
- `mrr`: mean over answerable questions of 1 / rank of the first gold chunk in the top 10 (0 when none);
- `answer_correct`: share of answerable questions whose answer contains every answer keyword (case-insensitive,
  whitespace runs collapsed); an abstention is not correct;
- `citation_precision`: share of all citations (every question's) whose chunk is gold; null when none was made;
- `abstain_recall`: share of unanswerable questions the system declined;
- `false_abstain_rate`: share of answerable questions it declined.
Without a model only retrieval runs (the answer metrics are null, and abstention is the retrieval threshold's),
unless `answer="quote"`, which answers by quoting the sources and needs no model (kb/ask.py's answer modes).
`mode="none"` with a model is the closed-book baseline (no retrieval: hit_at_5 and mrr are null).
results.json also gives `median_answer_chars`: the median length of the answers given (abstentions left out),
since answer_correct rewards a longer answer (more of it can hold the keywords).
"""

from __future__ import annotations

import json
import re
import time
from pathlib import Path

from slmkit.files import atomic_write_json, atomic_write_text, iter_jsonl
from slmkit.kb.ask import ANSWER, MIN_SIMILARITY, QUOTE_SENTENCES, TOP_K, ask, ask_closed_book, check_answer
from slmkit.kb.index import KnowledgeBase
from slmkit.kb.quote import check_sentences
from slmkit.kb.retrieve import MODES, RERANK_POOL, Reranker, search

METRICS = ("hit_at_5", "mrr", "answer_correct", "citation_precision", "abstain_recall", "false_abstain_rate")
MRR_DEPTH = 10


def read_questions(path: str | Path) -> list[dict]:
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path}: no such question file")
    questions = []
    for n, q in iter_jsonl(path):
        questions.append({**check_question(q, f"{path}:{n}"), "id": q.get("id", f"line-{n}")})
    if not questions:
        raise ValueError(f"{path}: no questions")
    return questions


def is_gold(path: str, topics: list[str]) -> bool:
    p = Path(path)
    return p.stem in topics or p.name in topics


def _normal(text: str) -> str:
    return re.sub(r"\s+", " ", text).lower()


def keywords_present(answer: str, keywords: list[str]) -> bool:
    return all(_normal(k) in _normal(answer) for k in keywords)


def _share(values: list[bool]) -> float | None:
    return round(sum(values) / len(values), 4) if values else None


def tallies(records: list[dict]) -> dict[str, tuple[float, int]]:
    """Each of the six numbers as (total, count) over the questions (or citations) it is a share of, from
    per-question records: `answerable`, `gold_ranks` (1-based ranks of gold chunks in the retrieved list, or None
    when retrieval did not run), `abstained`, `correct` (None without a model) and `citations_gold` (a bool per
    citation). mrr's total is the sum of reciprocal ranks."""
    answerable = [r for r in records if r["answerable"]]
    unanswerable = [r for r in records if not r["answerable"]]
    retrieved = [r for r in answerable if r["gold_ranks"] is not None]
    answered = [r for r in answerable if r["correct"] is not None]
    citations = [g for r in records for g in r["citations_gold"]]
    first = [min(r["gold_ranks"], default=None) for r in retrieved]
    return {"hit_at_5": (sum(f is not None and f <= 5 for f in first), len(first)),
            "mrr": (sum(1 / f for f in first if f is not None and f <= MRR_DEPTH), len(first)),
            "answer_correct": (sum(bool(r["correct"]) for r in answered), len(answered)),
            "citation_precision": (sum(citations), len(citations)),
            "abstain_recall": (sum(r["abstained"] for r in unanswerable), len(unanswerable)),
            "false_abstain_rate": (sum(r["abstained"] for r in answerable), len(answerable))}


def score(records: list[dict]) -> dict:
    """The six numbers (None where nothing was counted: no model, no retrieval, no citation)."""
    return {name: round(total / n, 4) if n else None for name, (total, n) in tallies(records).items()}


def evaluate_kb(kb: KnowledgeBase | None, questions: list[dict], lm=None, mode: str = "hybrid", k: int = TOP_K,
                min_similarity: float = MIN_SIMILARITY, out: str | Path | None = None,
                rerank: Reranker | None = None, max_new_tokens: int = 160, log=None,
                rerank_pool: int = RERANK_POOL, answer: str = ANSWER,
                quote_sentences: int = QUOTE_SENTENCES) -> dict:
    """Run every question through retrieval (and `ask` when `lm` is given or `answer` is "quote") and score it;
    with `out`, write OUT/results.json (the six numbers on top, then counts, settings, latency and answer length)
    and OUT/answers.jsonl."""
    if mode not in (*MODES, "none"):
        raise ValueError(f"unknown mode {mode!r}; choose one of {', '.join(MODES)}, or none (closed book)")
    answering = lm is not None or answer != "model"  # `model` without a model: retrieval only
    if answering:
        check_answer(answer, lm)
    check_sentences(quote_sentences)
    if mode == "none" and lm is None:
        raise ValueError("mode none (no retrieval) needs a model to answer (--model)")
    if mode == "none" and answer != "model":
        raise ValueError(f"mode none retrieves nothing to quote: --answer {answer} needs retrieval")
    if mode != "none" and kb is None:
        raise ValueError(f"mode {mode} retrieves: give a knowledge base")
    records, latency = [], []
    for i, q in enumerate(questions, 1):
        record, timing = question_record(kb, q, lm, mode=mode, k=k, min_similarity=min_similarity, rerank=rerank,
                                         rerank_pool=rerank_pool, max_new_tokens=max_new_tokens, answer=answer,
                                         quote_sentences=quote_sentences)
        records.append(record)
        latency.append(timing)
        if log:
            log(f"{i}/{len(questions)} {q['id']}: {'abstained' if record['abstained'] else 'answered'}")
    results = {**score(records),
               "counts": {"questions": len(records), "answerable": sum(r["answerable"] for r in records),
                          "citations": sum(len(r["citations_gold"]) for r in records)},
               "settings": {"mode": mode, "k": k, "min_similarity": min_similarity, "model": getattr(lm, "name", None),
                            "answer": answer if answering else None,
                            "quote_sentences": quote_sentences if answering and answer != "model" else None,
                            "embedder": kb.embedder_spec if kb else None,
                            "reranker": getattr(rerank, "name", None) if rerank else None,
                            "rerank_pool": rerank_pool if rerank else None},
               "latency": _latency(latency),
               "median_answer_chars": _median([len(r["answer"]) for r in records
                                               if r["answer"] is not None and not r["abstained"]])}
    if out is not None:
        out = Path(out)
        out.mkdir(parents=True, exist_ok=True)
        atomic_write_text(out / "answers.jsonl", "".join(_json_line(r) for r in records))
        atomic_write_json(out / "results.json", results)
    return results


def question_record(kb: KnowledgeBase | None, q: dict, lm=None, mode: str = "hybrid", k: int = TOP_K,
                    min_similarity: float = MIN_SIMILARITY, rerank: Reranker | None = None,
                    rerank_pool: int = RERANK_POOL, max_new_tokens: int = 160, answer: str = ANSWER,
                    quote_sentences: int = QUOTE_SENTENCES) -> tuple[dict, dict]:
    """One question through retrieval (and `ask` with an `lm`, or with `answer="quote"`): its record for `score`,
    and its timings."""
    start = time.perf_counter()
    hits = search(kb, q["question"], k=max(MRR_DEPTH, k), mode=mode, rerank=rerank,
                  rerank_pool=rerank_pool) if mode != "none" else None
    search_s = time.perf_counter() - start
    reply = None
    if lm is None and answer != "quote":
        abstained = not hits or max(h.similarity for h in hits[:k]) < min_similarity
    elif mode == "none":
        reply = ask_closed_book(q["question"], lm, max_new_tokens=max_new_tokens)
    else:
        reply = ask(kb, q["question"], lm, k=k, min_similarity=min_similarity, hits=hits[:k],
                    max_new_tokens=max_new_tokens, answer=answer, quote_sentences=quote_sentences)
    if reply is not None:
        abstained = reply.abstained
    timing = {"search_s": search_s if hits is not None else None,
              "ttft_s": None if reply is None else reply.ttft_s,
              "total_s": None if reply is None else reply.total_s + search_s}
    record = {
        "id": q["id"], "question": q["question"], "answerable": q["answerable"], "topics": q["topics"],
        "gold_ranks": None if hits is None else [r for r, h in enumerate(hits, 1) if is_gold(h.path, q["topics"])],
        "retrieved": None if hits is None else [f"{Path(h.path).name}:{h.lines}" for h in hits[:5]],
        # what the abstention threshold is compared with, kept so a threshold can be tuned from this file
        "similarity": None if not hits else round(max(h.similarity for h in hits[:k]), 4),
        "abstained": abstained,
        "answer": None if reply is None else reply.text,
        "correct": None if reply is None or not q["answerable"] else
        (not abstained and keywords_present(reply.text, q["answer_keywords"])),
        "citations": [] if reply is None else [f"[{c.n}] {Path(c.path).name}:{c.lines}" for c in reply.citations],
        "citations_gold": [] if reply is None else [is_gold(c.path, q["topics"]) for c in reply.citations],
    }
    return record, timing


def check_question(q: dict, where: str) -> dict:
    """A question with its defaults filled in, or a ValueError naming `where` (file:line) and the field."""
    if not isinstance(q.get("question"), str) or not q["question"].strip():
        raise ValueError(f"{where}: no \"question\" (a non-empty string)")
    answerable = q.get("answerable", bool(q.get("topics")))
    if not isinstance(answerable, bool):
        raise ValueError(f"{where}: \"answerable\" must be true or false")
    for name in ("topics", "answer_keywords"):
        if not isinstance(q.get(name, []), list) or not all(isinstance(x, str) for x in q.get(name, [])):
            raise ValueError(f"{where}: \"{name}\" must be a list of strings")
    if answerable and not q.get("topics"):
        raise ValueError(f"{where}: an answerable question needs its gold \"topics\" (source file stems)")
    return {**q, "answerable": answerable, "topics": q.get("topics", []),
            "answer_keywords": q.get("answer_keywords", [])}


def _json_line(record: dict) -> str:
    return json.dumps(record, ensure_ascii=False) + "\n"


def _median(values):
    values = sorted(v for v in values if v is not None)
    return round(values[len(values) // 2], 3) if values else None


def _latency(rows: list[dict]) -> dict | None:
    if not rows:
        return None
    return {f"median_{key}": _median(r[key] for r in rows) for key in ("search_s", "ttft_s", "total_s")}
