"""Quoting the sources (`slm kb eval --answer quote|model+quote`) on kb-python dev: the answer modes side by
side, the quote at several budgets, with the six numbers, the answers' median length and latency.

    python benchmarks/kb_quote.py --kb /tmp/kb-python --questions ../shared/data/kb-python/questions.dev.jsonl \
        --sentences 1 2 3 4 5 --model smollm2-135m-instruct --json docs/benchmark-logs/kb-quote.json

Runs `kb_eval` (what `slm kb eval` runs) once per configuration on an existing KB (`slm kb index pydoc-topics -o
KB`): `--answer quote` with each `--sentences` budget (no model), then with `--model`: `--answer model` and
`--answer model+quote` (the default budget). Each row records the load average (`/proc/loadavg`) before and after,
because the machine is shared. Dev questions only.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from slmkit.files import atomic_write_json
from slmkit.kb.ask import QUOTE_SENTENCES
from slmkit.kb.evaluate import METRICS
from slmkit.recipes.kb import kb_eval


def load_avg() -> str:
    return " ".join(Path("/proc/loadavg").read_text().split()[:3])


def row(kb: Path, questions: Path, out: Path, **options) -> dict:
    before, start = load_avg(), time.perf_counter()
    r = kb_eval(kb, questions, out, **options)
    return {**{m: r[m] for m in METRICS}, "citations": r["counts"]["citations"],
            "median_answer_chars": r["median_answer_chars"], "latency": r["latency"],
            "seconds": round(time.perf_counter() - start, 1), "load_before": before, "load_after": load_avg(),
            "settings": r["settings"]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--kb", type=Path, required=True)
    ap.add_argument("--questions", type=Path, required=True)
    ap.add_argument("--sentences", type=int, nargs="+", default=[1, 2, 3, 4, 5])
    ap.add_argument("--model")
    ap.add_argument("--backend", default="auto")
    ap.add_argument("--max-new-tokens", type=int, default=160)
    ap.add_argument("--out", type=Path, default=Path("/tmp/kb-quote-runs"), help="where each run's answers go")
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    report = {"date": time.strftime("%Y-%m-%d"), "questions": str(args.questions), "kb": str(args.kb), "rows": {}}
    runs = [(f"quote-{n}", {"answer": "quote", "quote_sentences": n}) for n in args.sentences]
    if args.model:
        runs += [(name, {"answer": name, "model": args.model, "backend": args.backend,
                         "max_new_tokens": args.max_new_tokens, "quote_sentences": QUOTE_SENTENCES})
                 for name in ("model", "model+quote")]
    for name, options in runs:
        report["rows"][name] = row(args.kb, args.questions, args.out / name.replace("+", "-"), **options)
        print(name, json.dumps(report["rows"][name]), flush=True)
        if args.json:  # after every row: a long run stopped part way keeps what it measured
            atomic_write_json(args.json, report)


if __name__ == "__main__":
    main()
