"""Text classifiers on a language model (`slm classify train | predict | eval | prune`): a linear head on a
decoder's last hidden state or an encoder's mean-pooled ones, or PET (patterns + verbalisers, distilled into a
head); length-adaptive token pruning of an encoder classifier. See classify/head.py, pet.py and prune.py."""

from __future__ import annotations

from pathlib import Path

from slmkit.classify.head import Classifier, expected_calibration_error, read_labelled
from slmkit.recipes import model_dir


def train_classifier(model: str, data: str | Path, out: str | Path, dev: str | Path | None = None,
                     method: str = "head", prompt: str = "{text}", patterns: list[str] | None = None,
                     verbalizers: dict[str, str] | None = None, unlabelled: str | Path | None = None,
                     train_body: bool = False, epochs: int | None = None, lr: float | None = None, seed: int = 0,
                     log=print) -> Classifier:
    """Train a classifier on `data` ({"text", "label"} JSONL) over `model` (a decoder or encoder: a model/run
    directory or a pulled name such as minilm-l6-v2) and save it to `out`; `dev` (labelled JSONL) calibrates its
    confidence (temperature scaling).

    method "head": a linear head on the frozen model (`train_body` fine-tunes the model too, after fitting the
    head), reading each text through `prompt`; 200 epochs of the head by default, 5 of fine-tuning with
    `train_body`. method "pet": `patterns` (templates over {text} ending at the
    slot) and `verbalizers` (label -> word) fine-tune the decoder, whose soft labels on the training texts and
    `unlabelled` ({"text"} JSONL) are distilled into a head; 6 epochs at lr 1e-5 by default.
    """
    base = model_dir(model, "a classifier", kinds=("model", "embedding"))
    texts, labels = read_labelled(data)
    if any(label is None for label in labels):
        raise ValueError(f"{data}: every training record needs a `label`")
    dev_set = read_labelled(dev) if dev else None
    if method == "head":
        from slmkit.classify.head import train_classifier as train_head
        clf = train_head(base, texts, labels, dev=dev_set, prompt=prompt, train_body=train_body,
                         epochs=epochs or (5 if train_body else 200), lr=lr, seed=seed, log=log)
    elif method == "pet":
        from slmkit.classify.pet import PET, pet_classifier
        from slmkit.formats.encoder_dir import is_encoder_dir
        if is_encoder_dir(base):
            raise ValueError(f"{model}: --method pet fills a slot with a decoder's next word; this is an encoder "
                             "(use --method head)")
        if not patterns or not verbalizers:
            raise ValueError("--method pet needs at least one --pattern and a --verbalizer LABEL=WORD per label")
        missing = sorted(set(labels) - set(verbalizers))
        if missing:
            raise ValueError(f"no --verbalizer for label(s) {', '.join(missing)}")
        extra = read_labelled(unlabelled)[0] if unlabelled else None
        clf = pet_classifier(base, PET(patterns, verbalizers), texts, labels, unlabelled=extra, dev=dev_set,
                             epochs=epochs or 6, lr=lr or 1e-5, seed=seed, log=log)
    else:
        raise ValueError(f"--method must be head or pet, got {method!r}")
    clf.save(out)
    log(f"classifier written to {out}")
    return clf


def prune_classifier(classifier: str | Path, data: str | Path, dev: str | Path, out: str | Path,
                     budget: float = 0.5, epochs: int = 3, lr: float = 3e-5, drop_ratio: float = 0.2,
                     sub_models: int = 2, generations: int = 10, population: int = 16, seed: int = 0,
                     log=print) -> Classifier:
    """Length-adaptive token pruning (classify/prune.py) of the encoder classifier directory `classifier` (one
    `train_classifier(ENCODER, train_body=True)` wrote): `epochs` of LengthDrop distillation from it and `epochs`
    on the labels of `data`, then the search on `dev` for the most accurate per-layer length schedule within
    `budget` (a fraction of the full-length FLOPs). The classifier written to `out` records the schedule and the
    Pareto front, and predicts pruned."""
    from slmkit.classify.prune import check_prunable
    from slmkit.classify.prune import prune_classifier as prune
    clf = Classifier.load(classifier)
    check_prunable(clf, budget)  # before reading data: a wrong classifier or budget fails at once
    texts, labels = read_labelled(data)
    dev_texts, dev_labels = read_labelled(dev)
    for path, these in ((data, labels), (dev, dev_labels)):
        if not these or any(y is None for y in these):
            raise ValueError(f"{path}: needs labelled records ({{\"text\", \"label\"}} on every line)")
    pruned = prune(clf, texts, labels, dev_texts, dev_labels, budget=budget, epochs=(epochs, epochs), lr=lr,
                   drop_ratio=drop_ratio, sub_models=sub_models, generations=generations, population=population,
                   seed=seed, log=log)
    pruned.save(out)
    log(f"pruned classifier written to {out}")
    return pruned


def predict_labels(classifier: str | Path, data: str | Path) -> list[dict]:
    """{"text", "label", "confidence"} for each record of `data` (JSONL with a "text" field), by the classifier
    directory `slm classify train` wrote; the confidence is calibrated."""
    clf = Classifier.load(classifier)
    texts, _ = read_labelled(data)
    return [{"text": text, "label": label, "confidence": round(confidence, 4)}
            for text, (label, confidence) in zip(texts, clf.predict(texts), strict=True)]


def evaluate_classifier(classifier: str | Path, data: str | Path) -> dict:
    """Accuracy (with its interval), macro-F1, per-class scores, the confusion matrix and the expected calibration
    error of a saved classifier on labelled `data`."""
    import numpy as np

    from slmkit.eval.metrics import classification_report
    clf = Classifier.load(classifier)
    texts, labels = read_labelled(data)
    unknown = sorted({y for y in labels if y not in clf.info.labels})
    if unknown:
        raise ValueError(f"{data}: label(s) {unknown} are not the classifier's {clf.info.labels}")
    probs = clf.predict_proba(texts)
    preds = [clf.info.labels[int(p.argmax())] for p in probs]
    report = classification_report(labels, preds, clf.info.labels)
    golds = np.array([clf.info.labels.index(y) for y in labels])
    return {"accuracy": report["accuracy"].to_dict(), "macro_f1": report["macro_f1"].value,
            "ece": expected_calibration_error(probs, golds), "per_class": report["per_class"],
            "labels": report["labels"], "confusion": report["confusion"]}


def supericl(classifier: str | Path, large: str, demos: str | Path, data: str | Path, k: int = 8, seed: int = 0,
             method: str = "auto", explain: bool = False, baseline: bool = False, backend: str = "auto"
             ) -> tuple[list[dict], dict | None]:
    """SuperICL (classify/supericl.py): the classifier directory's predictions and confidences, for k
    demonstrations drawn from `demos` ({"text", "label"} JSONL) and for each record of `data`, go into the
    prompt of the `large` LM (any model spec `load_lm` takes, e.g. an http(s):// endpoint), which gives the
    final label (k is capped at the number of demonstrations). `baseline` runs the large LM alone with the same
    demonstrations instead.

    Returns one record per text ({"text", "label", "small_label", "small_confidence", "overridden", ...}; the
    baseline's have no small_* fields) and, when every record of `data` has a label, the metrics: accuracy with
    its interval, macro-F1, and for SuperICL the small model's own accuracy and the overrides (right / wrong).
    """
    from dataclasses import asdict

    from slmkit.classify.supericl import icl_predict, override_counts, supericl_predict
    from slmkit.eval.metrics import classification_report, proportion
    from slmkit.lm.resolve import load_lm
    clf = Classifier.load(classifier)
    labels = clf.info.labels
    demo_texts, demo_labels = read_labelled(demos)
    for n, label in enumerate(demo_labels, 1):
        if label is None:
            raise ValueError(f"{demos}:{n}: a demonstration needs a `label`")
        if label not in labels:
            raise ValueError(f"{demos}:{n}: label {label!r} is not one of the classifier's {labels}")
    texts, golds = read_labelled(data)
    for n, gold in enumerate(golds, 1):
        if gold is not None and gold not in labels:
            raise ValueError(f"{data}:{n}: label {gold!r} is not one of the classifier's {labels}")
    pairs = list(zip(demo_texts, demo_labels, strict=True))
    with load_lm(large, backend=backend) as lm:
        if baseline:
            answers = icl_predict(lm, pairs, texts, labels, k=k, seed=seed, method=method, explain=explain)
            records = [{"text": t, "label": a.label, "large_confidence": _round(a.confidence), "method": a.method,
                        **({"explanation": a.explanation} if explain else {})} for t, a in zip(texts, answers,
                                                                                               strict=True)]
        else:
            preds = supericl_predict(lm, clf, pairs, texts, k=k, seed=seed, method=method, explain=explain)
            records = []
            for p in preds:
                record = asdict(p)
                record["small_confidence"], record["large_confidence"] = (round(p.small_confidence, 4),
                                                                         _round(p.large_confidence))
                if not explain:
                    del record["explanation"]
                records.append(record)
    if not texts or any(g is None for g in golds):
        return records, None
    none = "(no label)"  # a generated reply that named no label (baseline only): wrong, in a column of its own
    predicted = [r["label"] if r["label"] is not None else none for r in records]
    report = classification_report(golds, predicted, labels + [none])
    metrics = {"accuracy": report["accuracy"].to_dict(), "macro_f1": report["macro_f1"].value}
    if not baseline:
        metrics["small_accuracy"] = proportion(sum(p.small_label == g for p, g in zip(preds, golds, strict=True)),
                                               len(golds)).to_dict()
        metrics["overrides"] = override_counts(preds, golds)
    else:
        metrics["unparsed"] = predicted.count(none)
    return records, metrics


def _round(x: float | None) -> float | None:
    return None if x is None else round(x, 4)
