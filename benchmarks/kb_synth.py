"""`slm kb synth` records vs the dev questions (leakage), and `slm kb ask` latency through llama.cpp.

    python benchmarks/kb_synth.py overlap --records /tmp/kbsynth/synth.jsonl \
        --questions ../shared/data/kb-python/questions.dev.jsonl
    python benchmarks/kb_synth.py latency --kb /tmp/kbsynth/kb \
        --questions ../shared/data/kb-python/questions.dev.jsonl --model smollm2-135m-instruct --limit 10 \
        [-k 2] [--json docs/benchmark-logs/kb-ask-latency.json]

overlap: the synth questions never read the dev file, this checks it: exact matches (case and spaces folded), word
8-grams shared by a synth question and a dev question, and the largest content-word Jaccard similarity of any pair
(with the pair, so a reader can judge it).

latency: `kb.ask.ask` (what `slm kb ask` runs once the model is loaded) on the first `--limit` dev questions with one
model loaded once, as `slm kb ask` uses it (`generation_backend`: llama.cpp on a CPU); the median ttft_s and total_s
of the questions that reached the model (an abstention by retrieval does not call it), and the machine's load
average (`/proc/loadavg`) before and after, because the machine is shared.
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
import time
from pathlib import Path

from slmkit.files import atomic_write_json, iter_jsonl
from slmkit.kb.synth import content_words

WORD = re.compile(r"\w+")


def load_avg() -> str:
    return " ".join(Path("/proc/loadavg").read_text().split()[:3])


def _ngrams(text: str, n: int = 8) -> set[tuple]:
    words = WORD.findall(text.lower())
    return {tuple(words[i:i + n]) for i in range(len(words) - n + 1)}


def overlap(records: Path, questions: Path) -> dict:
    synth = [r["question"] for _, r in iter_jsonl(records)]
    dev = [q["question"] for _, q in iter_jsonl(questions)]
    fold = {" ".join(q.lower().split()) for q in dev}
    exact = [q for q in synth if " ".join(q.lower().split()) in fold]
    dev_grams = {g: q for q in dev for g in _ngrams(q)}
    shared = [{"synth": s, "dev": dev_grams[g], "ngram": " ".join(g)} for s in synth for g in _ngrams(s)
              if g in dev_grams]
    best = (0.0, "", "")
    for s in synth:
        ws = content_words(s)
        for d in dev:
            wd = content_words(d)
            j = len(ws & wd) / max(1, len(ws | wd))
            if j > best[0]:
                best = (j, s, d)
    return {"synth_questions": len(synth), "dev_questions": len(dev), "exact_matches": len(exact),
            "shared_8grams": shared, "max_jaccard": round(best[0], 3), "max_jaccard_pair": best[1:]}


def latency(kb_dir: Path, questions: Path, model: str, limit: int, k: int, max_new_tokens: int) -> dict:
    from slmkit.kb.ask import ask
    from slmkit.kb.index import open_kb
    from slmkit.lm.resolve import generation_backend, load_lm
    items = [q for _, q in iter_jsonl(questions)][:limit]
    kb = open_kb(kb_dir)
    backend, spec, options = generation_backend(model, "auto", "cpu")
    lm = load_lm(spec, backend=backend, **options)
    before = load_avg()
    rows = []
    try:
        ask(kb, "warm-up: what does the pass statement do?", lm, k=k, max_new_tokens=8)  # loads MiniLM, first prefill
        for q in items:
            a = ask(kb, q["question"], lm, k=k, max_new_tokens=max_new_tokens)
            rows.append({"id": q["id"], "ttft_s": a.ttft_s, "total_s": round(a.total_s, 3), "abstained": a.abstained,
                         "reason": a.reason})
            print(json.dumps(rows[-1]), flush=True)
    finally:
        lm.close()
        kb.close()
    asked = [r for r in rows if r["ttft_s"] is not None]
    return {"model": model, "backend": type(lm).__name__, "k": k, "max_new_tokens": max_new_tokens,
            "questions": len(rows), "reached_model": len(asked),
            "median_ttft_s": round(statistics.median(r["ttft_s"] for r in asked), 3) if asked else None,
            "median_total_s": round(statistics.median(r["total_s"] for r in asked), 3) if asked else None,
            "load_before": before, "load_after": load_avg(), "date": time.strftime("%Y-%m-%d %H:%M"), "rows": rows}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("what", choices=("overlap", "latency"))
    ap.add_argument("--records", type=Path)
    ap.add_argument("--kb", type=Path)
    ap.add_argument("--questions", type=Path, required=True)
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--limit", type=int, default=10)
    ap.add_argument("-k", type=int, default=3)
    ap.add_argument("--max-new-tokens", type=int, default=160)
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    if args.what == "overlap":
        report = overlap(args.records, args.questions)
    else:
        report = latency(args.kb, args.questions, args.model, args.limit, args.k, args.max_new_tokens)
    print(json.dumps({k: v for k, v in report.items() if k != "rows"}, indent=2))
    if args.json:
        atomic_write_json(args.json, report)


if __name__ == "__main__":
    main()
