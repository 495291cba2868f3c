"""A classifier cascade: the small classifier labels a text when its temperature-scaled probability clears the
threshold, otherwise a large labeler does.

The large labeler is any callable `texts -> labels` (a bigger classifier's `predict`, SuperICL, a person);
`label_word_labeler` makes one from any `LM`, including a remote one, by scoring each label's verbaliser (PET's
patterns and words, `classify.pet.PET`) after the text with `LM.score_many`. The small classifier's
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

Labeler = Callable[[list[str]], list[str]]


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
                out[i] = Prediction(label, "large", out[i].confidence)
        self.counts["large"] += len(escalate)
        self.counts["small"] += len(texts) - len(escalate)
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
