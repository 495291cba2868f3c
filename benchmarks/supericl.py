"""SuperICL on the intent data: small classifier alone vs large LM alone (same demos) vs SuperICL.

    nice python benchmarks/supericl.py --large smollm2-135m-instruct --large-backend llamacpp \
        --shots 8 --k 8 --seed 0 --log docs/benchmark-logs/supericl.jsonl
    python benchmarks/supericl.py --summarise --log docs/benchmark-logs/supericl.jsonl   # the table

`--items 0:31` (etc.) runs a slice of dev, so one measurement can be split across processes; `--summarise` adds
the slices up.

The small classifiers are trained as `benchmarks/intent_fewshot.py` trains them, on a seeded draw of `--shots`
examples per intent from ../shared/data/intent/train.jsonl (`draw`, its PET patterns and verbalisers):
- head: a linear head on the frozen decoder (`classify.head.train_classifier`);
- pet: PET fine-tuning distilled into a head (`classify.pet.pet_classifier`, what `slm classify train --method
  pet` writes).
Both calibrate their confidence (temperature scaling) on the rest of train.jsonl, never on dev. The k
demonstrations are drawn (`supericl.select_demos`, round-robin over intents) from that rest too, so the small
model's predictions in the prompt are honest ones on texts it was not trained on. Everything is scored on all of
dev.jsonl (183 utterances, 7 intents):
- icl: the large LM alone with the k demonstrations (`supericl.icl_predict`);
- supericl+head, supericl+pet: the same prompt with the small model's label and confidence per demo and for the
  input (`supericl.supericl_predict`), with the overrides counted right / wrong (`override_counts`).
The large LM answers by scoring each label (`--methods score`) and/or by greedy generation parsed to a label
(`generate`, what a text-only endpoint gets). Classifiers are cached in --out (a rerun reuses them); one JSON
line per condition goes to --log. Accuracies carry 95% Wilson intervals.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from intent_fewshot import DATA, PATTERNS, VERBALIZERS, draw  # the few-shot benchmark's draw and PET setup

from slmkit.classify.head import Classifier, read_labelled, train_classifier
from slmkit.classify.pet import PET, pet_classifier
from slmkit.classify.supericl import icl_predict, override_counts, supericl_predict
from slmkit.eval.metrics import proportion
from slmkit.hub import resolve_model
from slmkit.lm.resolve import load_lm


class Memo:
    """A classifier whose predictions are computed once per text (every condition and method asks again)."""

    def __init__(self, clf):
        self.clf, self.info, self.seen = clf, clf.info, {}

    def predict(self, texts):
        todo = [t for t in dict.fromkeys(texts) if t not in self.seen]
        self.seen.update(zip(todo, self.clf.predict(todo) if todo else [], strict=True))
        return [self.seen[t] for t in texts]


def small_classifier(kind: str, out: Path, model_dir: str, texts, labels, rest, epochs: int, seed: int):
    path = out / kind
    if (path / "classifier.json").is_file():
        return Classifier.load(path), 0.0
    t = time.time()
    if kind == "head":
        clf = train_classifier(model_dir, texts, labels, dev=rest, seed=seed, log=print)
    else:
        clf = pet_classifier(model_dir, PET(PATTERNS, VERBALIZERS), texts, labels, unlabelled=rest[0], dev=rest,
                             epochs=epochs, seed=seed, log=print)
    clf.save(path)
    return clf, time.time() - t


def summarise(log: Path) -> None:
    """The log's slices added up per condition (correct counts and overrides), as a Markdown table."""
    rows = [json.loads(line) for line in log.read_text().splitlines() if line.strip()]
    groups: dict[tuple, dict] = {}
    for r in rows:
        key = (r["condition"], r.get("method", "-"))
        g = groups.setdefault(key, {"correct": 0, "n": 0, "small": 0, "overridden": 0, "right": 0, "wrong": 0,
                                    "neither": 0, "slices": set()})
        if r["items"] in g["slices"]:
            continue  # a slice run twice counts once
        g["slices"].add(r["items"])
        n = r["accuracy"]["n"]
        g["n"] += n
        g["correct"] += round(r["accuracy"]["value"] * n)
        if "small_accuracy" in r:
            g["small"] += round(r["small_accuracy"]["value"] * n)
            for f in ("overridden", "right", "wrong", "neither"):
                g[f] += r["overrides"][f]
    print("| condition | method | dev accuracy [95% CI] | overridden | right | wrong | neither |")
    print("|---|---|---|---|---|---|---|")
    for (condition, method), g in groups.items():
        m = proportion(g["correct"], g["n"])
        extra = (f"{g['overridden']} ({100 * g['overridden'] / g['n']:.1f}%) | {g['right']} | {g['wrong']} | "
                 f"{g['neither']}" if condition.startswith("supericl") else "- | - | - | -")
        print(f"| {condition} | {method} | {100 * m.value:.1f}% [{100 * m.low:.1f}, {100 * m.high:.1f}] "
              f"(n={g['n']}) | {extra} |")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--large", default="smollm2-135m-instruct")
    ap.add_argument("--large-backend", default="llamacpp")
    ap.add_argument("--large-threads", type=int, default=None,
                    help="llama.cpp threads (1 on a busy machine: its spinning threads degrade when cores are shared)")
    ap.add_argument("--small-model", default="smollm2-135m-instruct", help="the small classifiers' decoder")
    ap.add_argument("--data", type=Path, default=DATA)
    ap.add_argument("--shots", type=int, default=8, help="training examples per intent for the small models")
    ap.add_argument("--k", type=int, default=8, help="in-context demonstrations")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--pet-epochs", type=int, default=6)
    ap.add_argument("--small", nargs="+", default=["head", "pet"])
    ap.add_argument("--methods", nargs="+", default=["score", "generate"])
    ap.add_argument("--skip-icl", action="store_true", help="only the SuperICL conditions (icl logged already)")
    ap.add_argument("--items", default=None, help="START:END, a slice of dev.jsonl (split a run across processes; "
                                                  "each logs its slice's counts)")
    ap.add_argument("--out", type=Path, default=Path("runs/supericl"))
    ap.add_argument("--log", type=Path, default=Path("runs/supericl.jsonl"))
    ap.add_argument("--summarise", action="store_true", help="print the table of --log's rows and stop")
    args = ap.parse_args()
    if args.summarise:
        return summarise(args.log)
    model_dir = resolve_model(args.small_model).location
    train_texts, train_labels = read_labelled(args.data / "train.jsonl")
    dev_texts, dev_labels = read_labelled(args.data / "dev.jsonl")
    if args.items:
        start, end = (int(x) if x else None for x in args.items.split(":"))
        dev_texts, dev_labels = dev_texts[start:end], dev_labels[start:end]
    texts, labels, _ = draw(train_texts, train_labels, args.shots, args.seed)
    used = set(texts)
    rest = [(t, y) for t, y in zip(train_texts, train_labels, strict=True) if t not in used]
    rest_xy = ([t for t, _ in rest], [y for _, y in rest])
    out = args.out / f"shots{args.shots}-seed{args.seed}"
    args.log.parent.mkdir(parents=True, exist_ok=True)
    common = {"large": args.large, "large_backend": args.large_backend, "small_model": args.small_model,
              "shots": args.shots, "k": args.k, "seed": args.seed, "items": args.items}

    def record(row: dict) -> None:
        row = {**common, **row}
        print(json.dumps(row), flush=True)
        with args.log.open("a") as f:
            f.write(json.dumps(row) + "\n")

    def acc(preds) -> dict:
        return proportion(sum(p == g for p, g in zip(preds, dev_labels, strict=True)), len(dev_labels)).to_dict()

    smalls = {}
    for kind in args.small:
        clf, train_s = small_classifier(kind, out, model_dir, texts, labels, rest_xy, args.pet_epochs, args.seed)
        clf = Memo(clf)
        t = time.time()
        preds = [y for y, _ in clf.predict(dev_texts)]
        record({"condition": f"{kind} alone", "accuracy": acc(preds), "train_seconds": round(train_s, 1),
                "seconds": round(time.time() - t, 1), "temperature": clf.info.temperature})
        smalls[kind] = clf
    options = {"n_threads": args.large_threads} if args.large_threads else {}
    large = load_lm(args.large, backend=args.large_backend, **options)
    label_set = sorted(set(train_labels))
    for method in args.methods:
        t = time.time()
        answers = [] if args.skip_icl else icl_predict(large, rest, dev_texts, label_set, k=args.k, seed=args.seed,
                                                       method=method)
        if answers:
            record({"condition": "icl (large alone, same demos)", "method": method,
                    "accuracy": acc([a.label for a in answers]), "unparsed": sum(a.label is None for a in answers),
                    "seconds": round(time.time() - t, 1)})
        for kind, clf in smalls.items():
            t = time.time()
            preds = supericl_predict(large, clf, rest, dev_texts, k=args.k, seed=args.seed, method=method)
            record({"condition": f"supericl+{kind}", "method": method, "accuracy": acc([p.label for p in preds]),
                    "small_accuracy": acc([p.small_label for p in preds]),
                    "overrides": override_counts(preds, dev_labels), "seconds": round(time.time() - t, 1)})
    large.close()


if __name__ == "__main__":
    main()
