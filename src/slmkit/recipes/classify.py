"""Text classifiers on a language model (`slm classify train | predict | eval`): a linear head on the decoder's
last hidden state, or PET (patterns + verbalisers, distilled into a head); see classify/head.py and pet.py."""

from __future__ import annotations

from pathlib import Path

from slmkit.classify.head import Classifier, expected_calibration_error, read_labelled
from slmkit.recipes import model_dir


def train_classifier(model: str, data: str | Path, out: str | Path, dev: str | Path | None = None,
                     method: str = "head", prompt: str = "{text}", patterns: list[str] | None = None,
                     verbalizers: dict[str, str] | None = None, unlabelled: str | Path | None = None,
                     train_body: bool = False, epochs: int | None = None, lr: float | None = None, seed: int = 0,
                     log=print) -> Classifier:
    """Train a classifier on `data` ({"text", "label"} JSONL) over `model` (a model/run directory or a pulled
    name) and save it to `out`; `dev` (labelled JSONL) calibrates its confidence (temperature scaling).

    method "head": a linear head on the frozen decoder (`train_body` fine-tunes the decoder too), reading each
    text through `prompt`; 200 epochs by default. method "pet": `patterns` (templates over {text} ending at the
    slot) and `verbalizers` (label -> word) fine-tune the decoder, whose soft labels on the training texts and
    `unlabelled` ({"text"} JSONL) are distilled into a head; 6 epochs at lr 1e-5 by default.
    """
    base = model_dir(model, "a classifier")
    texts, labels = read_labelled(data)
    if any(label is None for label in labels):
        raise ValueError(f"{data}: every training record needs a `label`")
    dev_set = read_labelled(dev) if dev else None
    if method == "head":
        from slmkit.classify.head import train_classifier as train_head
        clf = train_head(base, texts, labels, dev=dev_set, prompt=prompt, train_body=train_body,
                         epochs=epochs or 200, lr=lr, seed=seed, log=log)
    elif method == "pet":
        from slmkit.classify.pet import PET, pet_classifier
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
