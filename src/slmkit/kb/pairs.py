"""Training pairs from an indexed knowledge base (`slm kb pairs KB -o pairs.jsonl`), for `slm embed-train` and
`slm rerank-train`: `{"query", "positive", "negative"}` per line, made from the KB's own chunks, no labels needed.

Two kinds of query per chunk (`kind` says which):
- `heading`: the chunk's deepest heading ("Invoking Descriptors") -> the chunk's text without its headings, once
  per distinct heading path (the first chunk under it), so two chunks never answer one query;
- `sentence`: the inverse cloze task (Lee et al. 2019, ORQA): one sentence of the chunk -> the chunk (heading
  included, as it is indexed) with that sentence cut out, so the match is by meaning and context, not a copy.
`negative` is a hard negative: the best BM25 match for the query from another document whose text is not a near
copy of the positive (pydoc-topics nests documents: `compound` contains `try`, so a chunk of another file can
hold the very same passage; a negative sharing over half its words with the positive is skipped).

Limits: the queries are headings and reference-manual sentences, not users' questions, so they teach the
corpus's vocabulary and topics more than the way people ask; and a heading or sentence can be answered by more
than one chunk (the hard negative is then a false negative). Use real questions when there are some.
"""

from __future__ import annotations

import json
import random
import re
from pathlib import Path

from slmkit.files import atomic_write_text
from slmkit.kb.index import open_kb

SENTENCE_END = re.compile(r"(?<=[.!?])\s+(?=[A-Z\"(])")
MIN_WORDS, MAX_WORDS = 6, 40
KINDS = ("heading", "sentence")


def _words(text: str) -> set[str]:
    return set(re.findall(r"\w+", text.lower()))


def _overlap(a: str, b: str) -> float:
    wa, wb = _words(a), _words(b)
    return len(wa & wb) / max(1, min(len(wa), len(wb)))


def _sentence(text: str, rng: random.Random) -> str | None:
    """A prose sentence of the chunk (not a grammar rule or a code line), or None."""
    flat = " ".join(text.split())
    candidates = [s for s in SENTENCE_END.split(flat)
                  if MIN_WORDS <= len(s.split()) <= MAX_WORDS and "::=" not in s and ">>>" not in s
                  and sum(c.isalpha() or c.isspace() for c in s) > 0.85 * len(s)]
    return rng.choice(candidates) if candidates else None


def kb_pairs(kb_dir: str | Path, out: str | Path, kinds: tuple[str, ...] = KINDS, seed: int = 0,
             negatives: bool = True) -> dict:
    """Write training pairs made from the chunks of the knowledge base in `kb_dir` to `out` (JSONL); returns
    counts per kind and how many got a hard negative."""
    unknown = [k for k in kinds if k not in KINDS]
    if unknown or not kinds:
        raise ValueError(f"unknown pair kind {', '.join(unknown) or '(none)'}; choose from {', '.join(KINDS)}")
    kb = open_kb(kb_dir)
    rng = random.Random(seed)
    try:
        chunks = kb.store.get_chunks(kb.store.chunk_ids())
        if not chunks:
            raise ValueError(f"{kb_dir}: the knowledge base has no chunks; index documents first (slm kb index)")
        records, seen_headings = [], set()
        for c in chunks:
            heading = c.chunk.heading.split(" > ")[-1].strip()
            if "heading" in kinds and heading and c.chunk.heading not in seen_headings and \
                    len(c.chunk.text.split()) >= MIN_WORDS:
                seen_headings.add(c.chunk.heading)
                records.append({"query": heading, "positive": c.chunk.text, "kind": "heading", "_c": c})
            if "sentence" in kinds:
                sentence = _sentence(c.chunk.text, rng)
                if sentence:
                    rest = " ".join(c.chunk.indexed_text().split()).replace(sentence, " ").strip()
                    records.append({"query": sentence, "positive": rest, "kind": "sentence", "_c": c})
        with_negative = 0
        for r in records:
            c = r.pop("_c")
            if not negatives:
                continue
            ids = [i for i, _ in kb.store.keyword_search(r["query"], 10)]
            for hit in kb.store.get_chunks(ids):
                if hit.path != c.path and _overlap(hit.chunk.text, c.chunk.text) <= 0.5:
                    r["negative"] = hit.chunk.indexed_text()
                    with_negative += 1
                    break
        rng.shuffle(records)
        atomic_write_text(out, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))
        counts = {k: sum(r["kind"] == k for r in records) for k in KINDS}
        return {"pairs": len(records), **counts, "with_negative": with_negative, "out": str(out)}
    finally:
        kb.close()
