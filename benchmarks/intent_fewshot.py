"""Few-shot intent classification: PET vs a classification head vs zero-shot prompting vs the majority class.

    python benchmarks/intent_fewshot.py --model smollm2-135m-instruct --shots 8 --seeds 0 1 2 \
        --log runs/intent_fewshot.jsonl

For each seed, `--shots` labelled examples per intent are drawn from ../shared/data/intent/train.jsonl; every
method is scored on the whole dev set (183 utterances, 7 intents):
- majority: the most frequent intent of the full training file (the draw itself is balanced);
- zero-shot: the PET patterns' ensemble with no training at all (the LM's log-probs at the slot);
- head: a linear head on the frozen decoder's last hidden state (`classify.head.train_classifier`);
- pet: the model fine-tuned with PET on the draw, ensemble over patterns (`classify.pet.train_pet`);
- pet+distil: PET's soft labels on the rest of the training texts (labels unused) distilled into a head on the
  PET-tuned decoder (`classify.pet.distil_classifier`, the last step of `pet_classifier`), as in PET's final step.
Results are appended as JSON lines to --log (one per seed and method), so an interrupted run keeps what it
finished; the summary prints mean ± std over seeds.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections import Counter
from pathlib import Path

import numpy as np
import torch

from slmkit.classify.head import read_labelled, train_classifier
from slmkit.classify.pet import PET, distil_classifier, predict, train_pet
from slmkit.formats.hf_dir import load_model_dir
from slmkit.hub import resolve_model
from slmkit.tokenizer import load_tokenizer

DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "intent"
# One word per intent, each a single distinct token for SmolLM2's tokenizer (" showtimes" is scored by " show").
VERBALIZERS = {"add_to_playlist": " playlist", "book_restaurant": " restaurant", "get_weather": " weather",
               "play_music": " music", "rate_book": " rating", "search_creative_work": " title",
               "search_screening_event": " showtimes"}
OPTIONS = "playlist, restaurant, weather, music, rating, title or showtimes"
PATTERNS = [
    "<|im_start|>user\nWhich of these does the request ask for: " + OPTIONS + "?\nRequest: {text}<|im_end|>\n"
    "<|im_start|>assistant\nIt asks for",
    "{text}\nThe request above is about (" + OPTIONS + "):",
    "Request: {text}\nCategory (" + OPTIONS.replace(", ", " / ").replace(" or ", " / ") + "):",
]


def draw(texts, labels, shots: int, seed: int):
    rng = np.random.default_rng(seed)
    picked = []
    for label in sorted(set(labels)):
        idx = [i for i, y in enumerate(labels) if y == label]
        picked += list(rng.choice(idx, size=min(shots, len(idx)), replace=False))
    picked = sorted(int(i) for i in picked)
    rest = [i for i in range(len(texts)) if i not in set(picked)]
    return [texts[i] for i in picked], [labels[i] for i in picked], [texts[i] for i in rest]


def accuracy(predicted, golds) -> float:
    return float(np.mean([p == g for p, g in zip(predicted, golds, strict=True)]))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--data", type=Path, default=DATA)
    ap.add_argument("--shots", type=int, default=8)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--epochs", type=int, default=6)
    ap.add_argument("--lr", type=float, default=1e-5)
    ap.add_argument("--log", type=Path, default=Path("runs/intent_fewshot.jsonl"))
    ap.add_argument("--methods", nargs="+", default=["majority", "zero-shot", "head", "pet"],
                    help="which to run (pet also runs pet+distil; ~16 CPU-minutes per seed on 2 cores)")
    args = ap.parse_args()
    model_dir = resolve_model(args.model).location
    train_texts, train_labels = read_labelled(args.data / "train.jsonl")
    dev_texts, dev_labels = read_labelled(args.data / "dev.jsonl")
    pet = PET(PATTERNS, VERBALIZERS)
    args.log.parent.mkdir(parents=True, exist_ok=True)
    done = {(seed, m) for seed in args.seeds for m in ["majority", "zero-shot", "head", "pet"]
            if m not in args.methods}
    if args.log.exists():
        done |= {(r["seed"], r["method"]) for r in map(json.loads, args.log.read_text().splitlines()) if r}

    def record(seed: int, method: str, acc: float, started: float) -> None:
        row = {"model": args.model, "shots": args.shots, "seed": seed, "method": method, "dev_accuracy": acc,
               "seconds": round(time.time() - started, 1)}
        print(json.dumps(row), flush=True)
        with args.log.open("a") as f:
            f.write(json.dumps(row) + "\n")

    def rows_so_far() -> list[dict]:
        rows = map(json.loads, args.log.read_text().splitlines()) if args.log.exists() else []
        return [r for r in rows if r["model"] == args.model and r["shots"] == args.shots]

    majority = Counter(train_labels).most_common(1)[0][0]
    for seed in args.seeds:
        texts, labels, unlabelled = draw(train_texts, train_labels, args.shots, seed)
        t = time.time()
        if (seed, "majority") not in done:
            record(seed, "majority", accuracy([majority] * len(dev_labels), dev_labels), t)
        zero_shot = [r for r in rows_so_far() if r["method"] == "zero-shot"]
        if (seed, "zero-shot") not in done:  # no training, so the same for every seed: computed once
            if zero_shot:
                acc = zero_shot[0]["dev_accuracy"]
            else:
                model, tokenizer = load_model_dir(model_dir).eval(), load_tokenizer(model_dir)
                probs = predict(model, tokenizer, pet, dev_texts)
                acc = accuracy([pet.labels[i] for i in probs.argmax(1)], dev_labels)
            record(seed, "zero-shot", acc, t)
        t = time.time()
        if (seed, "head") not in done:
            clf = train_classifier(model_dir, texts, labels, seed=seed, log=lambda m: None)
            record(seed, "head", accuracy([y for y, _ in clf.predict(dev_texts)], dev_labels), t)
        t = time.time()
        if (seed, "pet") not in done:
            torch.manual_seed(seed)
            model, tokenizer = load_model_dir(model_dir), load_tokenizer(model_dir)
            train_pet(model, tokenizer, pet, texts, labels, epochs=args.epochs, lr=args.lr, seed=seed, log=print)
            probs = predict(model, tokenizer, pet, dev_texts)
            record(seed, "pet", accuracy([pet.labels[i] for i in probs.argmax(1)], dev_labels), t)
            # distil from the PET model just trained (a seed whose PET result was logged by an interrupted run
            # has no model left to distil from, and is not retrained for it)
            t = time.time()
            clf = distil_classifier(model, tokenizer, pet, texts + unlabelled, str(model_dir))
            record(seed, "pet+distil", accuracy([y for y, _ in clf.predict(dev_texts)], dev_labels), t)

    rows = [r for r in rows_so_far() if r["seed"] in args.seeds]
    print(f"\n{args.model}, {args.shots} examples per intent, dev accuracy over seeds {args.seeds}:")
    print("| method | mean | std | per seed |\n|---|---|---|---|")
    for method in ["majority", "zero-shot", "head", "pet", "pet+distil"]:
        accs = [r["dev_accuracy"] for r in rows if r["method"] == method]
        if accs:
            std = statistics.stdev(accs) if len(accs) > 1 else 0.0
            print(f"| {method} | {100 * statistics.mean(accs):.1f}% | {100 * std:.1f} | "
                  + ", ".join(f"{100 * a:.1f}" for a in accs) + " |")


if __name__ == "__main__":
    main()
