"""An encoder classifier (all-MiniLM-L6-v2, frozen or fine-tuned) vs a decoder one (SmolLM2-135M) on the intents.

    nice python benchmarks/encoder_intent.py --seeds 0 1 2 --log docs/benchmark-logs/encoder_intent.jsonl \
        --save runs/intent-minilm-full

Settings: the full training split (210 utterances), and `--shots` examples per intent drawn exactly as
benchmarks/intent_fewshot.py draws them (its `draw`, the same seeds, so the 8-shot sets match its table). Methods:
- minilm-frozen: a linear head on the frozen encoder's mean-pooled sentence embedding;
- minilm-full: the same head fitted first, then the whole encoder fine-tuned (`--epochs` at `--lr`, batch 8,
  dropout on): `classify.head.train_classifier(train_body=True)`, what `slm classify train --train-body` runs;
- smollm2-head: a linear head on the frozen decoder's last hidden state (the anchor, measured in the same run).
Each row: dev accuracy on all 183 dev utterances, training seconds, latency per utterance (batch 1: one
`predict_proba([text])` per dev utterance after a warm-up, the median of the wall time and of this process's
CPU time, with torch on 1 thread, and on 2 for the first 30 dev utterances: on a
machine whose 2 cores are oversubscribed by other jobs, 2 threads spend most of their time waiting for each
other at every operation, so both are reported) and the body's size (parameters, fp32 MB). Training uses
`--threads` threads. The full-split fine-tuned MiniLM is saved to `--save` for benchmarks/length_prune.py.
Rows are appended to --log; a (setting, seed, method) already there is skipped, so a rerun resumes.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch
from intent_fewshot import DATA, draw  # the few-shot benchmark's seeded draw

from slmkit.classify.head import read_labelled, train_classifier
from slmkit.hub import resolve_model


def latency_ms(clf, texts: list[str], threads: int, warmup: int = 5) -> tuple[float, float]:
    """Median (wall, CPU-time-of-this-process) milliseconds of predict_proba([text]) over `texts`."""
    torch.set_num_threads(threads)
    for t in texts[:warmup]:
        clf.predict_proba([t])
    wall, cpu = [], []
    for t in texts:
        w, c = time.perf_counter(), time.process_time()
        clf.predict_proba([t])
        wall.append(time.perf_counter() - w)
        cpu.append(time.process_time() - c)
    return round(1000 * statistics.median(wall), 2), round(1000 * statistics.median(cpu), 2)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", type=Path, default=DATA, help="the intent folder (train.jsonl, dev.jsonl)")
    ap.add_argument("--encoder", default="minilm-l6-v2")
    ap.add_argument("--decoder", default="smollm2-135m-instruct")
    ap.add_argument("--shots", type=int, default=8)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--settings", nargs="+", default=["full", "few"], help="full: the whole split; few: --shots")
    ap.add_argument("--methods", nargs="+", default=["minilm-frozen", "minilm-full", "smollm2-head"])
    ap.add_argument("--epochs", type=int, default=5)
    ap.add_argument("--lr", type=float, default=5e-5)
    ap.add_argument("--threads", type=int, default=1, help="torch threads while training")
    ap.add_argument("--log", type=Path, default=Path("runs/encoder_intent.jsonl"))
    ap.add_argument("--save", type=Path, default=None, help="where to save the full-split fine-tuned MiniLM")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    texts, labels = read_labelled(args.data / "train.jsonl")
    dev_texts, dev_labels = read_labelled(args.data / "dev.jsonl")
    encoder = resolve_model(args.encoder, kinds=("model", "embedding")).location
    decoder = resolve_model(args.decoder).location
    args.log.parent.mkdir(parents=True, exist_ok=True)
    done = set()
    if args.log.exists():
        done = {(r["setting"], r["seed"], r["method"]) for r in map(json.loads, args.log.read_text().splitlines())}
    for setting in args.settings:
        for seed in (args.seeds if setting == "few" else [0]):
            train = (texts, labels) if setting == "full" else draw(texts, labels, args.shots, seed)[:2]
            for method in args.methods:
                if (setting, seed, method) in done:
                    continue
                base = decoder if method.startswith("smollm2") else encoder
                body = method == "minilm-full"
                started = time.perf_counter()
                clf = train_classifier(base, *train, dev=(dev_texts, dev_labels), train_body=body,
                                       epochs=args.epochs if body else 200, lr=args.lr if body else None,
                                       seed=seed, log=print)
                seconds = time.perf_counter() - started
                # 2 threads on the first 30 utterances only: on the oversubscribed cores each takes seconds
                (w1, c1), (w2, c2) = latency_ms(clf, dev_texts, 1), latency_ms(clf, dev_texts[:30], 2)
                latency = {"latency_ms_b1_t1": w1, "cpu_ms_b1_t1": c1, "latency_ms_b1_t2": w2, "cpu_ms_b1_t2": c2}
                torch.set_num_threads(args.threads)
                params = sum(p.numel() for p in clf.model.parameters())
                row = {"setting": setting, "shots": args.shots if setting == "few" else None, "seed": seed,
                       "method": method, "train_examples": len(train[0]),
                       "dev_accuracy": clf.info.metrics["dev_accuracy"], "train_s": round(seconds, 1),
                       **latency, "params": params,
                       "fp32_mb": round(params * 4 / 2**20, 1), "threads": args.threads}
                print(json.dumps(row))
                with args.log.open("a") as f:
                    f.write(json.dumps(row) + "\n")
                if body and setting == "full" and args.save:
                    clf.save(args.save)
                    print(f"saved to {args.save}")
    rows = [json.loads(line) for line in args.log.read_text().splitlines()]
    print("| setting | method | dev accuracy (mean, per seed) | ms/utterance, batch 1, 1 thread: wall (CPU) "
          "| 2 threads | params | train s |")
    print("|---|---|---|---|---|---|---|")
    for setting in args.settings:
        for method in args.methods:
            these = [r for r in rows if r["setting"] == setting and r["method"] == method]
            if these:
                accs = [100 * r["dev_accuracy"] for r in these]
                print(f"| {setting} | {method} | {statistics.mean(accs):.1f}% ({', '.join(f'{a:.1f}' for a in accs)})"
                      f" | {statistics.median(r['latency_ms_b1_t1'] for r in these):.1f} "
                      f"({statistics.median(r.get('cpu_ms_b1_t1', float('nan')) for r in these):.1f}) | "
                      f"{statistics.median(r['latency_ms_b1_t2'] for r in these):.1f} | {these[0]['params']:,} | "
                      f"{statistics.median(r['train_s'] for r in these):.0f} |")


if __name__ == "__main__":
    main()
