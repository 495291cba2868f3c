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
utterances in batches of --batch, ms per utterance, the median of --repeats passes), on --threads threads.
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


def measure(clf: Classifier, texts, golds, lengths, batch: int, repeats: int) -> dict:
    probs = clf.predict_proba(texts)
    acc = float((probs.argmax(1) == golds).mean())
    for t in texts[:5]:
        clf.predict_proba([t])
    single = []
    for t in texts:
        start = time.perf_counter()
        clf.predict_proba([t])
        single.append(time.perf_counter() - start)
    batched = []
    for _ in range(repeats):
        start = time.perf_counter()
        for i in range(0, len(texts), batch):
            clf.predict_proba(texts[i:i + batch])
        batched.append((time.perf_counter() - start) / len(texts))
    keep = clf.info.length_schedule
    return {"dev_accuracy": round(acc, 4), "flops": round(schedule_flops(clf, lengths, keep), 4),
            "latency_ms_b1": round(1000 * statistics.median(single), 3),
            f"latency_ms_b{batch}": round(1000 * statistics.median(batched), 3), "keep": keep}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("teacher", type=Path, help="the fine-tuned classifier (slm classify train --train-body)")
    ap.add_argument("pruned", type=Path, help="what slm classify prune wrote from it")
    ap.add_argument("--dev", type=Path, default=DATA / "dev.jsonl")
    ap.add_argument("--budgets", type=float, nargs="+", default=[0.9, 0.8, 0.7, 0.6, 0.5, 0.4, 0.3, 0.2])
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=3)
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
    results = []
    for name, clf, keep in rows:
        clf.info.length_schedule = keep
        row = {"model": name, **measure(clf, texts, golds, lengths, args.batch, args.repeats)}
        print(json.dumps(row))
        results.append(row)
        with args.log.open("a") as f:
            f.write(json.dumps(row) + "\n")
    anchor = results[0]
    b = f"latency_ms_b{args.batch}"
    print(f"| model | schedule (fraction kept after each layer) | dev accuracy | FLOPs | ms/utterance, batch 1 "
          f"| speed-up | ms/utterance, batch {args.batch} | speed-up |\n|---|---|---|---|---|---|---|---|")
    for r in results:
        keep = "full" if r["keep"] is None else ", ".join(f"{k:g}" for k in r["keep"])
        print(f"| {r['model']} | {keep} | {100 * r['dev_accuracy']:.1f}% | {r['flops']:.2f} | "
              f"{r['latency_ms_b1']:.1f} | {anchor['latency_ms_b1'] / r['latency_ms_b1']:.2f}x | {r[b]:.2f} | "
              f"{anchor[b] / r[b]:.2f}x |")


if __name__ == "__main__":
    main()
