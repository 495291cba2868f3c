"""A classifier cascade on the intent data: a small classifier answers when its calibrated confidence clears the
threshold chosen for a target error, the rest escalates to a large labeler.

    nice python benchmarks/cascade.py --model smollm2-135m-instruct --layer-step 5 --seeds 0 1 2 \
        --json docs/benchmark-logs/cascade.json --plot docs/cascade_risk_coverage.png

- data: ../shared/data/intent/train.jsonl is split (seeded, per intent) into a fit part (2/3: trains both
  classifiers) and a calibration part (1/3: the small classifier's temperature and the threshold); dev.jsonl (183
  utterances, 7 intents) is the held-out evaluation, touched only to report.
- small: a linear head on a 6-layer decoder cut from SmolLM2-135M-Instruct (every `--layer-step`-th block,
  `distill.student_init.student_from_teacher`; the head on its frozen last hidden state, `classify.head`).
- large (`--large head`, the default): the same head on the full 30-layer SmolLM2-135M-Instruct. `--large lm`
  instead asks the 135M LM itself, scoring the intents' words after a few-shot prompt with `LM.score_many`
  (`classify.cascade.label_word_labeler`); it is weaker than the small classifier here (see BENCHMARKS.md), so
  it is not the default.
`--generation` measures the generation side instead: the 135M LM answers with the intent's word (greedy, after
two demonstrations per intent: zero-shot through its chat template it was right on 6% of the calibration part),
each confidence feature (`--features`: mean token log-prob, negative mean entropy, agreement of 5
samples) calibrated by Platt scaling on the calibration part (`lm.cascade.calibrate`), and on dev the share it
would answer per target error and its error there (the rest: people or a larger model).
For each target error: the threshold chosen on the calibration part (`ClassifierCascade.for_target`), then on
dev the share the small model answers, its error on those (vs the target), the cascade's accuracy and the large
calls made; the cascade at the first target is run for real (`ClassifierCascade.predict`), the other rows are the
same decision replayed on the two models' stored dev predictions. "Saved at equal accuracy": the lowest threshold
whose cascade accuracy on the calibration part is at least the large model's there, applied to dev.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

from slmkit.classify.cascade import ClassifierCascade, label_word_labeler
from slmkit.classify.head import read_labelled, train_classifier
from slmkit.classify.pet import PET
from slmkit.distill.student_init import student_from_teacher
from slmkit.eval.risk_coverage import plot_risk_coverage
from slmkit.files import atomic_write_json
from slmkit.hub import resolve_model
from slmkit.lm.calibration import risk_coverage

sys.path.insert(0, str(Path(__file__).parent))
from intent_fewshot import VERBALIZERS  # noqa: E402

DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "intent"
OPTIONS = "playlist, restaurant, weather, music, rating, title or showtimes"


def split(texts, labels, seed: int):
    """(fit, calibration) index lists: per intent, a seeded third goes to calibration."""
    rng = np.random.default_rng(seed)
    fit, cal = [], []
    for label in sorted(set(labels)):
        idx = rng.permutation([i for i, y in enumerate(labels) if y == label])
        k = len(idx) // 3
        cal += [int(i) for i in idx[:k]]
        fit += [int(i) for i in idx[k:]]
    return sorted(fit), sorted(cal)


def fewshot_pet(texts, labels, per_label: int = 2, seed: int = 0) -> PET:
    """One pattern: the intents' words, `per_label` demonstrations each (from the fit part), then the text."""
    rng = np.random.default_rng(seed)
    demos = []
    for label in VERBALIZERS:
        idx = [i for i, y in enumerate(labels) if y == label][:per_label]
        demos += [(texts[i], label) for i in idx]
    order = rng.permutation(len(demos))
    head = "".join(f"Request: {demos[i][0]}\nCategory:{VERBALIZERS[demos[i][1]]}\n\n" for i in order)
    return PET([f"Categories: {OPTIONS}\n\n{head}Request: {{text}}\nCategory:"], dict(VERBALIZERS))


def cascade_rows(threshold, small_conf, small_right, large_right) -> dict:
    answered = small_conf >= threshold
    n = len(small_conf)
    right = np.where(answered, small_right, large_right)
    return {"coverage": float(answered.mean()),
            "small_error": float(1 - small_right[answered].mean()) if answered.any() else None,
            "cascade_accuracy": float(right.mean()), "large_calls": int(n - answered.sum())}


def generation(args) -> None:
    """--generation: SmolLM2-135M-Instruct answers each request with the intent's word through its chat template;
    its mean token log-prob is calibrated (Platt) on the calibration part, the threshold chosen per target, and on
    dev the share it answers and its error there are reported (the rest would go to people: a hand-off queue)."""
    from slmkit.lm import load_lm
    from slmkit.lm.cascade import calibrate
    texts, labels = read_labelled(args.data / "train.jsonl")
    dev_texts, dev_labels = read_labelled(args.data / "dev.jsonl")
    fit, cal = split(texts, labels, args.seeds[0])
    # zero-shot through the chat template the 135M model names the right word for 6-8% of requests (measured:
    # nothing to cascade), so it answers after two demonstrations per intent from the fit part, as --large lm does
    pattern = fewshot_pet([texts[i] for i in fit], [labels[i] for i in fit]).patterns[0]

    def items(ts, ys):
        return [{"prompt": pattern.format(text=t), "answer": VERBALIZERS[y].strip()}
                for t, y in zip(ts, ys, strict=True)]
    lm = load_lm(args.model)
    result = {"model": args.model, "calibration_items": len(cal), "dev_items": len(dev_texts), "features": {}}
    for feature in args.features:
        t = time.perf_counter()
        fitted = calibrate(lm, items([texts[i] for i in cal], [labels[i] for i in cal]), feature=feature,
                           max_new_tokens=3)
        held = calibrate(lm, items(dev_texts, dev_labels), feature=feature, max_new_tokens=3)  # dev: to report
        seconds = time.perf_counter() - t
        p, right = fitted(np.asarray(held.scores)), np.asarray(held.correct)
        rows = []
        for target in args.targets:
            threshold = fitted.threshold(target)
            answered = p >= threshold
            rows.append({"target_error": target, "threshold": threshold if np.isfinite(threshold) else None,
                         "coverage": float(answered.mean()), "answered": int(answered.sum()),
                         "error": float(1 - right[answered].mean()) if answered.any() else None})
        result["features"][feature] = {
            "calibration_accuracy": float(np.mean(fitted.correct)), "dev_accuracy": float(right.mean()),
            "platt": [fitted.a, fitted.b], "seconds": round(seconds, 1), "rows": rows,
            "curve_dev": risk_coverage(p, right)}
        print(feature, json.dumps({k: v for k, v in result["features"][feature].items() if k != "curve_dev"}),
              flush=True)
        atomic_write_json(args.json, result)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--data", type=Path, default=DATA)
    ap.add_argument("--layer-step", type=int, default=5, help="the small decoder keeps every N-th block")
    ap.add_argument("--large", choices=["head", "lm"], default="head")
    ap.add_argument("--targets", type=float, nargs="+", default=[0.05, 0.10, 0.15, 0.20])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--work", type=Path, default=Path("runs/cascade"))
    ap.add_argument("--json", type=Path, default=Path("docs/benchmark-logs/cascade.json"))
    ap.add_argument("--plot", type=Path, default=Path("docs/cascade_risk_coverage.png"))
    ap.add_argument("--generation", action="store_true", help="the generation cascade instead (see generation())")
    ap.add_argument("--features", nargs="+", default=["mean_logprob", "neg_entropy", "agreement"],
                    help="--generation: the confidence features to calibrate and compare")
    args = ap.parse_args()
    torch.set_num_threads(2)
    if args.generation:
        return generation(args)
    model_dir = str(resolve_model(args.model).location)
    small_dir = args.work / f"small-step{args.layer_step}"
    if not (small_dir / "config.json").exists():
        student_from_teacher(model_dir, small_dir, layer_step=args.layer_step)
    texts, labels = read_labelled(args.data / "train.jsonl")
    dev_texts, dev_labels = read_labelled(args.data / "dev.jsonl")
    quiet = lambda m: None  # noqa: E731
    runs = []
    for seed in args.seeds:
        fit, cal = split(texts, labels, seed)
        fit_t, fit_y = [texts[i] for i in fit], [labels[i] for i in fit]
        cal_t, cal_y = [texts[i] for i in cal], [labels[i] for i in cal]
        small = train_classifier(small_dir, fit_t, fit_y, dev=(cal_t, cal_y), seed=seed, log=quiet)
        if args.large == "head":
            large_clf = train_classifier(model_dir, fit_t, fit_y, seed=seed, log=quiet)
            large = lambda ts, c=large_clf: [y for y, _ in c.predict(ts)]  # noqa: E731
        else:
            from slmkit.lm import load_lm
            lm = load_lm(args.model)
            large = label_word_labeler(lm, fewshot_pet(fit_t, fit_y, seed=seed))
        t = time.perf_counter()
        probs = small.predict_proba(dev_texts)
        small_s = time.perf_counter() - t
        t = time.perf_counter()
        large_dev = large(dev_texts)
        large_s = time.perf_counter() - t
        large_cal = large(cal_t)
        lab = small.info.labels
        conf = probs.max(1)
        small_right = np.array([lab[int(p.argmax())] == y for p, y in zip(probs, dev_labels, strict=True)])
        large_right = np.array([a == b for a, b in zip(large_dev, dev_labels, strict=True)])
        cal_probs = small.predict_proba(cal_t)
        cal_conf = cal_probs.max(1)
        cal_small_right = np.array([lab[int(p.argmax())] == y for p, y in zip(cal_probs, cal_y, strict=True)])
        cal_large_right = np.array([a == b for a, b in zip(large_cal, cal_y, strict=True)])
        rows = []
        for k, target in enumerate(args.targets):
            cascade = ClassifierCascade.for_target(small, large, cal_t, cal_y, target)
            row = {"target_error": target, "threshold": cascade.threshold,
                   **cascade_rows(cascade.threshold, conf, small_right, large_right)}
            if k == 0:  # the real thing: the cascade labels dev, calling the large model only where it escalates
                t = time.perf_counter()
                out = cascade.predict(dev_texts)
                row["seconds"] = round(time.perf_counter() - t, 2)
                real_acc = float(np.mean([p.label == y for p, y in zip(out, dev_labels, strict=True)]))
                assert abs(real_acc - row["cascade_accuracy"]) < 1e-9 and cascade.counts["large"] == row["large_calls"]
            rows.append(row)
        # equal accuracy: the lowest threshold whose calibration-part cascade accuracy >= the large model's there
        large_cal_acc = float(cal_large_right.mean())
        equal_t = np.inf
        for t_ in np.unique(cal_conf):
            if np.where(cal_conf >= t_, cal_small_right, cal_large_right).mean() >= large_cal_acc - 1e-12:
                equal_t = float(t_)
                break
        equal = {"threshold": equal_t, **cascade_rows(equal_t, conf, small_right, large_right)}
        # on dev itself (an oracle choice, for reference): the largest coverage whose accuracy >= large's
        oracle = max((cascade_rows(t_, conf, small_right, large_right) for t_ in np.unique(conf)),
                     key=lambda r: (r["cascade_accuracy"] >= large_right.mean() - 1e-12, r["coverage"]))
        run = {"seed": seed, "fit": len(fit), "calibration": len(cal), "dev": len(dev_texts),
               "small_accuracy": float(small_right.mean()), "large_accuracy": float(large_right.mean()),
               "small_temperature": small.info.temperature, "small_seconds": round(small_s, 2),
               "large_seconds": round(large_s, 2), "rows": rows, "equal_accuracy": equal,
               "equal_accuracy_oracle": oracle,
               "curve_dev": risk_coverage(conf, small_right), "curve_calibration": risk_coverage(cal_conf,
                                                                                                   cal_small_right),
               "cascade_curve_dev": [{"coverage": r["coverage"], "risk": 1 - r["cascade_accuracy"]}
                                     for r in (cascade_rows(t_, conf, small_right, large_right)
                                               for t_ in [*np.unique(conf), np.inf])]}
        print(json.dumps({k: v for k, v in run.items() if not k.startswith(("curve", "cascade_curve"))}), flush=True)
        runs.append(run)
        n_layers = small.model.cfg.n_layers

    result = {"model": args.model, "layer_step": args.layer_step, "large": args.large, "targets": args.targets,
              "runs": runs}
    args.json.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_json(args.json, json.loads(json.dumps(result).replace("Infinity", "null")))  # inf: escalate all
    first = runs[0]
    plot_risk_coverage({"small, dev (held out)": first["curve_dev"],
                        "small, calibration split": first["curve_calibration"],
                        "cascade overall error, dev": first["cascade_curve_dev"]},
                       args.plot, target_error=args.targets[0],
                       points={f"chosen for {args.targets[0]:g}, dev": (first["rows"][0]["coverage"],
                                                                       first["rows"][0]["small_error"] or 0.0),
                               "large alone": (0.0, 1 - first["large_accuracy"])},
                       title=f"intent: small ({n_layers}-layer) head -> large ({args.large}), seed "
                             f"{first['seed']}")

    def ms(values):
        values = [v for v in values if v is not None]
        return (f"{100 * statistics.mean(values):.1f} ± {100 * statistics.stdev(values):.1f}" if len(values) > 1
                else f"{100 * values[0]:.1f}") if values else "–"
    print(f"\nsmall accuracy {ms([r['small_accuracy'] for r in runs])}%, "
          f"large {ms([r['large_accuracy'] for r in runs])}% (dev, seeds {args.seeds})")
    print("| target error | small answers (dev) | small's error there | cascade accuracy | large calls |")
    print("|---|---|---|---|---|")
    for k, target in enumerate(args.targets):
        rows = [r["rows"][k] for r in runs]
        print(f"| {target:g} | {ms([r['coverage'] for r in rows])}% | {ms([r['small_error'] for r in rows])}% | "
              f"{ms([r['cascade_accuracy'] for r in rows])}% | "
              f"{statistics.mean([r['large_calls'] for r in rows]):.0f} / {len(dev_texts)} |")
    eq = [r["equal_accuracy"] for r in runs]
    print(f"equal accuracy (threshold from calibration): saved {ms([r['coverage'] for r in eq])}% of large calls, "
          f"cascade accuracy {ms([r['cascade_accuracy'] for r in eq])}%")
    orc = [r["equal_accuracy_oracle"] for r in runs]
    print(f"equal accuracy (oracle on dev): saved {ms([r['coverage'] for r in orc])}%, "
          f"accuracy {ms([r['cascade_accuracy'] for r in orc])}%")


if __name__ == "__main__":
    main()
