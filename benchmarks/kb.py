"""Knowledge base on kb-python dev: index throughput and size, BM25 vs dense vs hybrid retrieval, and optionally a
model answering with retrieval vs without (closed book).

    python benchmarks/kb.py --kb /tmp/kb-python --questions ../shared/data/kb-python/questions.dev.jsonl \
        --json docs/benchmark-logs/kb.json [--model smollm2-135m-instruct --limit 20]

Indexes Python's language reference (`pydoc-topics`) with MiniLM into a fresh KB (skipped with --reuse), then runs
`evaluate_kb` once per retrieval mode (retrieval only: abstention is the similarity threshold's), and with --model
once with hybrid retrieval and once closed book. Prints and writes one JSON object; query latency is the median
of the per-question search times (embedding the question included).
"""

from __future__ import annotations

import argparse
import json
import platform
import shutil
import subprocess
import time
from pathlib import Path

from slmkit.files import atomic_write_json
from slmkit.kb.evaluate import METRICS, read_questions
from slmkit.kb.index import index_kb
from slmkit.recipes.kb import kb_eval


def cpu_name() -> str:
    out = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
    return next((line.split(":", 1)[1].strip() for line in out.splitlines() if line.startswith("Model name")),
                platform.processor())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--kb", type=Path, required=True)
    ap.add_argument("--questions", type=Path, required=True)
    ap.add_argument("--json", type=Path)
    ap.add_argument("--reuse", action="store_true", help="keep an existing KB (no index timing)")
    ap.add_argument("--model")
    ap.add_argument("--limit", type=int, help="questions answered by the model (retrieval always runs on all)")
    ap.add_argument("--max-new-tokens", type=int, default=160)
    args = ap.parse_args()
    report = {"cpu": cpu_name(), "date": time.strftime("%Y-%m-%d"), "questions": str(args.questions)}
    if not args.reuse:
        shutil.rmtree(args.kb, ignore_errors=True)
        report["index"] = index_kb(["pydoc-topics"], args.kb)
        print(json.dumps(report["index"]), flush=True)
    n = len(read_questions(args.questions))
    for mode in ("bm25", "dense", "hybrid"):
        r = kb_eval(args.kb, args.questions, args.kb.parent / f"{args.kb.name}-eval-{mode}", mode=mode)
        report[f"retrieval_{mode}"] = {**{m: r[m] for m in ("hit_at_5", "mrr", "abstain_recall", "false_abstain_rate")},
                                       "median_search_s": r["latency"]["median_search_s"]}
        print(mode, json.dumps(report[f"retrieval_{mode}"]), flush=True)
    if args.model:
        for mode in ("hybrid", "none"):
            start = time.perf_counter()
            r = kb_eval(args.kb, args.questions, args.kb.parent / f"{args.kb.name}-answers-{mode}", model=args.model,
                        mode=mode, limit=args.limit, max_new_tokens=args.max_new_tokens)
            report[f"model_{mode}"] = {**{m: r[m] for m in METRICS}, "latency": r["latency"],
                                       "questions": args.limit or n, "seconds": round(time.perf_counter() - start)}
            print(mode, json.dumps(report[f"model_{mode}"]), flush=True)
    if args.json:
        atomic_write_json(args.json, report)


if __name__ == "__main__":
    main()
