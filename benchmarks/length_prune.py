"""The length-adaptive pruning trade-off: dev accuracy against FLOPs and against measured latency.

    slm classify train minilm-l6-v2 --data ../shared/data/intent/train.jsonl --dev ../shared/data/intent/dev.jsonl \
        --train-body --lr 5e-5 -o runs/intent-minilm-full
    slm classify prune runs/intent-minilm-full --data ../shared/data/intent/train.jsonl \
        --dev ../shared/data/intent/dev.jsonl --budget 0.5 -o runs/intent-minilm-pruned
    nice python benchmarks/length_prune.py runs/intent-minilm-full runs/intent-minilm-pruned \
        --log docs/benchmark-logs/length_prune.jsonl

One `slm classify prune` run trains the length-adaptive student once and scores every schedule it searched; its
Pareto front (classifier.json's `pareto`) holds the most accurate schedule at every FLOPs level, so each budget
here picks from it exactly as the search picks for --budget. For the teacher (the fine-tuned classifier, full
length: the anchor, measured in the same run), the student at full length, and the student under each budget's
schedule: dev accuracy, FLOPs relative to the full length (counted from the dev token counts per layer), and
latency per utterance at batch 1 (median over the dev utterances, after a warm-up) and batched (all dev
utterances in batches of --batch, ms per utterance, the median of --repeats passes), with torch on --threads
threads (run it with 1 and with 2: on 2 cores other jobs oversubscribe, 2 threads mostly wait for each other).
The timings interleave the models, so the shared machine's changing load falls on all alike.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import numpy as np
import torch

from slmkit.classify.head import Classifier, read_labelled
from slmkit.classify.prune import schedule_flops
from slmkit.lm.embedder import Embedder

DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "intent"


def timed(clf: Classifier, keep, texts: list[str]) -> tuple[float, float]:
    """(wall seconds, CPU seconds of this process) of one predict_proba(texts) under the schedule `keep`."""
    clf.info.length_schedule = keep
    wall, cpu = time.perf_counter(), time.process_time()
    clf.predict_proba(texts)
    return time.perf_counter() - wall, time.process_time() - cpu


def measure(rows, texts, golds, lengths, batch: int, repeats: int, n_timed: int | None = None) -> list[dict]:
    """Accuracy, FLOPs and latencies of each (name, classifier, schedule). The timings interleave the rows (each
    utterance, each batched pass, through every row in turn), so a change in the shared machine's load falls on
    all of them alike."""
    for _, clf, keep in rows:
        for t in texts[:5]:  # warm-up
            timed(clf, keep, [t])
    some = texts[:n_timed]
    single = [[timed(clf, keep, [t]) for _, clf, keep in rows] for t in some]
    batched = [[[sum(x) / len(some) for x in zip(*(timed(clf, keep, some[i:i + batch])
                                                    for i in range(0, len(some), batch)), strict=True)]
                for _, clf, keep in rows] for _ in range(repeats)]
    out = []
    for r, (name, clf, keep) in enumerate(rows):
        clf.info.length_schedule = keep
        acc = float((clf.predict_proba(texts).argmax(1) == golds).mean())
        out.append({"model": name, "threads": torch.get_num_threads(), "dev_accuracy": round(acc, 4),
                    "flops": round(schedule_flops(clf, lengths, keep), 4),
                    "latency_ms_b1": round(1000 * statistics.median(s[r][0] for s in single), 3),
                    "cpu_ms_b1": round(1000 * statistics.median(s[r][1] for s in single), 3),
                    f"latency_ms_b{batch}": round(1000 * statistics.median(b[r][0] for b in batched), 3),
                    f"cpu_ms_b{batch}": round(1000 * statistics.median(b[r][1] for b in batched), 3), "keep": keep})
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("teacher", type=Path, help="the fine-tuned classifier (slm classify train --train-body)")
    ap.add_argument("pruned", type=Path, help="what slm classify prune wrote from it")
    ap.add_argument("--dev", type=Path, default=DATA / "dev.jsonl")
    ap.add_argument("--budgets", type=float, nargs="+", default=[0.9, 0.8, 0.7, 0.6, 0.5, 0.4, 0.3, 0.2])
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--timed", type=int, default=None, help="time the first N dev utterances only (default all)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--log", type=Path, default=Path("runs/length_prune.jsonl"))
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    texts, labels = read_labelled(args.dev)
    teacher, student = Classifier.load(args.teacher), Classifier.load(args.pruned)
    golds = np.array([teacher.info.labels.index(y) for y in labels])
    encode = Embedder(student.model, student.tokenizer).encode
    lengths = [len(encode(t)) for t in texts]
    print(f"dev tokens per utterance ([CLS] ... [SEP]): median {statistics.median(lengths)}, "
          f"min {min(lengths)}, max {max(lengths)}")
    front = student.info.pareto
    rows = [("teacher, full length", teacher, None), ("student, full length", student, None)]
    for budget in args.budgets:
        within = [f for f in front if f["flops"] <= budget]
        if within:
            rows.append((f"student, budget {budget}", student, max(within, key=lambda f: f["accuracy"])["keep"]))
    args.log.parent.mkdir(parents=True, exist_ok=True)
    results = measure(rows, texts, golds, lengths, args.batch, args.repeats, args.timed)
    with args.log.open("a") as f:
        for row in results:
            print(json.dumps(row))
            f.write(json.dumps(row) + "\n")
    anchor = results[0]
    print(f"torch threads: {args.threads}; ms per utterance, wall (CPU time of this process), speed-up over the "
          "teacher by CPU time")
    print(f"| model | schedule (fraction kept after each layer) | dev accuracy | FLOPs | batch 1 | speed-up "
          f"| batch {args.batch} | speed-up |\n|---|---|---|---|---|---|---|---|")
    b = args.batch
    for r in results:
        keep = "full" if r["keep"] is None else ", ".join(f"{k:g}" for k in r["keep"])
        print(f"| {r['model']} | {keep} | {100 * r['dev_accuracy']:.1f}% | {r['flops']:.2f} | "
              f"{r['latency_ms_b1']:.1f} ({r['cpu_ms_b1']:.1f}) | {anchor['cpu_ms_b1'] / r['cpu_ms_b1']:.2f}x | "
              f"{r[f'latency_ms_b{b}']:.2f} ({r[f'cpu_ms_b{b}']:.2f}) | "
              f"{anchor[f'cpu_ms_b{b}'] / r[f'cpu_ms_b{b}']:.2f}x |")


if __name__ == "__main__":
    main()
