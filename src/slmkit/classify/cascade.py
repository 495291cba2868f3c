"""A classifier cascade: the small classifier labels a text when its temperature-scaled probability clears the
threshold, otherwise a large labeler does.

The large labeler is any callable `texts -> labels` (a bigger classifier's `predict`, SuperICL, a person; None
for a text it cannot label keeps the small model's answer). From an `LM`: `escalation_labeler` (what `slm classify
cascade --escalate-to` builds) labels in context with demonstrations through `supericl.label_with_lm`, the one
few-shot LM labeler (a text-only remote endpoint included); `label_word_labeler` scores each label's verbaliser
after a PET pattern (`classify.pet.PET`) with `LM.score_many`, for a pattern written by hand. The small classifier's
probabilities are already calibrated (temperature scaling on dev, `classify.head`), so the calibration map is the
identity and the threshold is chosen directly on them (`lm.calibration.select_threshold`).

    small = Classifier.load("runs/intent-head")
    large = label_word_labeler(load_lm("smollm2-135m-instruct"), PET(patterns, verbalizers))
    cascade = ClassifierCascade.for_target(small, large, dev_texts, dev_labels, target_error=0.05)
    cascade.predict(["play some jazz"])  # [Prediction(label, answered_by, confidence)]
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np

from slmkit.classify.pet import PET
from slmkit.lm.calibration import select_threshold

Labeler = Callable[[list[str]], list[str | None]]


@dataclass
class Prediction:
    label: str
    answered_by: str  # "small" or "large"
    confidence: float  # the small classifier's calibrated probability of its own label


@dataclass
class ClassifierCascade:
    small: object  # a classify.head.Classifier (anything with predict_proba(texts) and info.labels)
    large: Labeler
    threshold: float
    counts: dict = field(default_factory=lambda: {"small": 0, "large": 0})

    @classmethod
    def for_target(cls, small, large: Labeler, dev_texts: list[str], dev_labels: list[str],
                   target_error: float) -> ClassifierCascade:
        """The cascade whose threshold is the lowest with dev error <= `target_error` among what `small`
        answers (on `dev_texts`, which should not be what `small` was trained on)."""
        probs = small.predict_proba(dev_texts)
        labels = small.info.labels
        correct = np.array([labels[int(p.argmax())] == y for p, y in zip(probs, dev_labels, strict=True)])
        return cls(small, large, select_threshold(probs.max(1), correct, target_error))

    def predict(self, texts: list[str]) -> list[Prediction]:
        probs = self.small.predict_proba(texts)
        labels = self.small.info.labels
        out = [Prediction(labels[int(p.argmax())], "small", float(p.max())) for p in probs]
        escalate = [i for i, p in enumerate(out) if p.confidence < self.threshold]
        if escalate:
            large = self.large([texts[i] for i in escalate])
            if len(large) != len(escalate):
                raise ValueError(f"the large labeler returned {len(large)} labels for {len(escalate)} texts")
            for i, label in zip(escalate, large, strict=True):
                if label is not None:  # (an LM's reply that names no label leaves the small model's answer)
                    out[i] = Prediction(label, "large", out[i].confidence)
        for p in out:
            self.counts[p.answered_by] += 1
        return out


def label_word_probabilities(lm, pet: PET, texts: Sequence[str]) -> np.ndarray:
    """(N, labels) probabilities from an LM: each label's verbaliser scored after each pattern
    (`LM.score_many`, every token of the word), normalised over the labels, averaged over patterns in
    log space as `classify.pet.predict` does."""
    labels, words = pet.labels, list(pet.verbalizers.values())
    logps = []
    for pattern in pet.patterns:
        pairs = [(pattern.format(text=t), w) for t in texts for w in words]
        scores = np.array([s.logprob for s in lm.score_many(pairs)], dtype=np.float64)
        scores = scores.reshape(len(texts), len(labels))
        logps.append(scores - np.logaddexp.reduce(scores, axis=1, keepdims=True))
    mean = np.mean(logps, axis=0)
    probs = np.exp(mean - mean.max(1, keepdims=True))
    return probs / probs.sum(1, keepdims=True)


def label_word_labeler(lm, pet: PET) -> Labeler:
    """A large labeler from any LM: the label whose verbaliser it finds most likely (label_word_probabilities)."""
    def label(texts: list[str]) -> list[str]:
        if not texts:
            return []
        return [pet.labels[int(i)] for i in label_word_probabilities(lm, pet, texts).argmax(1)]
    return label


def escalation_labeler(target: str, labels: list[str], backend: str = "auto",
                       demos: Sequence[tuple[str, str]] = (), k: int = 8, seed: int = 0) -> Labeler:
    """The large labeler `slm classify cascade --escalate-to` names: a classifier directory (its `predict`), or
    any model `load_lm` opens (a remote URL included) labelling in context: `k` of the labelled `demos` shown, then
    the text (`supericl.label_with_lm`: each label scored where the LM has log-probs, else a greedy reply matched
    to the labels). A reply that names no label leaves the text to the small classifier (None)."""
    from pathlib import Path

    from slmkit.classify.head import Classifier
    if (Path(target) / "classifier.json").is_file():
        large = Classifier.load(target)
        if sorted(large.info.labels) != sorted(labels):
            raise ValueError(f"{target}: its labels {large.info.labels} are not the small classifier's {labels}")
        return lambda texts: [y for y, _ in large.predict(texts)] if texts else []
    from slmkit.classify.supericl import Demo, label_with_lm, select_demos
    from slmkit.lm import load_lm
    lm = load_lm(target, backend=backend)
    shown = [Demo(t, y) for t, y in select_demos(list(demos), k, seed)]
    return lambda texts: [a.label for a in label_with_lm(lm, shown, texts, labels)] if texts else []


def cascade_labels(small: str, escalate_to: str, dev: str, data: str, target_error: float = 0.05,
                   backend: str = "auto") -> tuple[list[dict], dict]:
    """`slm classify cascade`: label `data` with the small classifier, escalating below the threshold chosen on
    the labelled `dev` file for `target_error`; (one record per line with label, confidence, answered_by; a
    summary)."""
    from slmkit.classify.head import Classifier, read_labelled
    clf = Classifier.load(small)
    dev_texts, dev_labels = read_labelled(dev)
    missing = [i + 1 for i, y in enumerate(dev_labels) if y is None]
    if missing:
        raise ValueError(f"{dev}:{missing[0]}: a dev record needs a \"label\" to choose the threshold")
    unknown = sorted(set(dev_labels) - set(clf.info.labels))
    if unknown:
        raise ValueError(f"{dev}: labels {unknown} are not the classifier's ({clf.info.labels})")
    # the large LM sees labelled dev texts as its demonstrations (the threshold concerns the small classifier only)
    demos = list(zip(dev_texts, dev_labels, strict=True))
    large = escalation_labeler(escalate_to, clf.info.labels, backend, demos=demos)
    cascade = ClassifierCascade.for_target(clf, large, dev_texts, dev_labels, target_error)
    texts, _ = read_labelled(data)
    records = [{"text": t, "label": p.label, "confidence": round(p.confidence, 6), "answered_by": p.answered_by}
               for t, p in zip(texts, cascade.predict(texts), strict=True)]
    return records, {"threshold": cascade.threshold, "target_error": target_error, **cascade.counts}
