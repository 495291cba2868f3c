"""SuperICL (Xu et al., 2023, "Small models are valuable plug-ins for large language models").

A small classifier fine-tuned on local data is a plug-in to a large LM. The large LM's prompt holds k
demonstrations, each with the small model's predicted label and its (calibrated) confidence next to the gold
label, then the test input with the small model's prediction; the large LM writes the final label:

    Classify each input as one of: add_to_playlist, book_restaurant, get_weather, ...

    Input: Add the artist Cho Kyu Hyun to funky jams.
    Small model: add_to_playlist (confidence 0.93)
    Label: add_to_playlist

    ...

    Input: Will it rain in Oslo tomorrow?
    Small model: get_weather (confidence 0.71)
    Label:

The baseline that the paper compares against, the large LM alone with the same in-context examples, is the
same prompt without the "Small model:" lines (`icl_predict`), so the two differ only in the plug-in.

    preds = supericl_predict(large_lm, classifier, demos, texts, k=8)   # demos: [(text, label), ...]
    preds[0].label, preds[0].small_label, preds[0].small_confidence, preds[0].overridden

`label_with_lm` is the reusable step: a large LM labels texts given demonstrations (with or without a small
model's predictions in them). The large LM is any `LM`. Where it has log-probabilities (every local backend, and
a remote server that echoes prompt log-probs) each label is scored as the continuation after "Label:" and the
likeliest wins, so the answer is always in the label set; a text-only LM (a remote chat API) generates greedily
and the reply is matched to the label set (`parse_label`: exact, then normalised, then the closest label).
"""

from __future__ import annotations

import difflib
import math
import re
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

METHODS = ("auto", "score", "generate")


@dataclass
class Demo:
    """One in-context example: a text, its gold label and (SuperICL) the small model's prediction for it."""

    text: str
    label: str
    small_label: str | None = None
    small_confidence: float | None = None


@dataclass
class LMLabel:
    """What the large LM answered for one text."""

    label: str | None  # one of the labels; None only when a generated reply names none of them
    method: str  # "score" (log-probs of each label) or "generate" (a parsed greedy reply)
    confidence: float | None = None  # score: softmax over the labels' log-probs; generate: None
    reply: str | None = None  # generate: the raw reply
    explanation: str | None = None


@dataclass
class SuperICLPrediction:
    text: str
    label: str  # the final label (the large LM's; the small model's when a generated reply named no label)
    small_label: str
    small_confidence: float
    overridden: bool  # the large LM's label differs from the small model's
    large_confidence: float | None = None
    method: str = "score"
    explanation: str | None = None


def select_demos(examples: Sequence[tuple[str, str]], k: int, seed: int = 0) -> list[tuple[str, str]]:
    """k examples drawn (seeded) round-robin over the labels, so that with k >= the number of labels each label
    is shown at least once, in a shuffled order (an ordering by label would teach the LM a pattern)."""
    if k < 0:
        raise ValueError(f"k must be >= 0, got {k}")
    rng = np.random.default_rng(seed)
    by_label: dict[str, list[int]] = {}
    for i, (_, label) in enumerate(examples):
        by_label.setdefault(label, []).append(i)
    pools = {label: list(rng.permutation(idx)) for label, idx in sorted(by_label.items())}
    picked: list[int] = []
    while len(picked) < min(k, len(examples)):
        for label in pools:
            if pools[label] and len(picked) < k:
                picked.append(int(pools[label].pop()))
    return [examples[i] for i in rng.permutation(picked)]


def format_prompt(demos: Sequence[Demo], text: str, labels: Sequence[str], small: tuple[str, float] | None = None,
                  with_small: bool | None = None) -> str:
    """The prompt, ending at "Label:" where the large LM's answer goes.

    The "Small model:" lines appear when `with_small` (default: whether `small`, the test input's prediction,
    is given); every demo then needs its own small_label and small_confidence.
    """
    with_small = small is not None if with_small is None else with_small
    parts = [f"Classify each input as one of: {', '.join(labels)}.\n"]
    for d in demos:
        lines = [f"Input: {_one_line(d.text)}"]
        if with_small:
            if d.small_label is None or d.small_confidence is None:
                raise ValueError(f"demo {d.text[:40]!r} has no small-model prediction")
            lines.append(_small_line(d.small_label, d.small_confidence))
        lines.append(f"Label: {d.label}")
        parts.append("\n".join(lines) + "\n")
    last = [f"Input: {_one_line(text)}"]
    if with_small:
        if small is None:
            raise ValueError("with_small needs the test input's small-model prediction")
        last.append(_small_line(*small))
    last.append("Label:")
    parts.append("\n".join(last))
    return "\n".join(parts)


def _small_line(label: str, confidence: float) -> str:
    return f"Small model: {label} (confidence {confidence:.2f})"


def _one_line(text: str) -> str:
    return " ".join(text.split())  # a newline inside a text would end its "Input:" line early


def parse_label(reply: str, labels: Sequence[str]) -> str | None:
    """The label a generated reply names: the first line compared exactly, then case/space/underscore/punctuation
    normalised, then the label mentioned earliest in the reply, then the closest label by string similarity
    (difflib ratio >= 0.6); None when the reply is nothing like any label."""
    norm = {_normalise(label): label for label in labels}
    first = reply.strip().splitlines()[0].strip() if reply.strip() else ""
    if first in labels:
        return first
    key = _normalise(first)
    if key in norm:
        return norm[key]
    whole = _normalise(reply)
    found = [(whole.find(n), -len(n), label) for n, label in norm.items() if n and n in whole]
    if found:
        return min(found)[2]
    close = difflib.get_close_matches(key, list(norm), n=1, cutoff=0.6)
    return norm[close[0]] if close else None


def _normalise(text: str) -> str:
    return re.sub(r"[\W_]+", " ", text.lower()).strip()


def label_with_lm(lm, demos: Sequence[Demo], texts: Sequence[str], labels: Sequence[str],
                  small: Sequence[tuple[str, float]] | None = None, method: str = "auto", explain: bool = False,
                  max_explanation_tokens: int = 48) -> list[LMLabel]:
    """A large LM labels each text given in-context demonstrations: the one place that turns an `LM` into a
    few-shot classifier over `labels` (SuperICL calls it with `small`, the small model's (label, confidence) per
    text, shown for every demo too; the ICL baseline and a cascade's escalation call it without).

    method "score" ranks the labels by log p(" " + label | prompt) (needs log-probs: a local backend, or a
    remote server that echoes prompt log-probs) and always answers a label; "generate" decodes greedily up to
    the end of the line and matches the reply to the labels (`parse_label`; label None when it names none);
    "auto" scores and falls back to generating when the LM cannot score (a text-only endpoint). `explain` adds a
    greedy one-line explanation after the chosen label.
    """
    if method not in METHODS:
        raise ValueError(f"method must be one of {', '.join(METHODS)}, got {method!r}")
    labels = list(labels)
    if not labels:
        raise ValueError("the label set is empty")
    bad = sorted({d.label for d in demos} - set(labels))
    if bad:
        raise ValueError(f"demo label(s) {bad} are not in the label set {labels}")
    if small is not None and len(small) != len(texts):
        raise ValueError(f"{len(small)} small-model predictions for {len(texts)} texts")
    if method == "auto":
        method = "score" if _can_score(lm) else "generate"
    out = []
    for i, text in enumerate(texts):
        prompt = format_prompt(demos, text, labels, small[i] if small is not None else None)
        if method == "score":
            scores = [s.logprob for s in lm.score_many([(prompt, " " + label) for label in labels])]
            best = int(np.argmax(scores))
            z = np.exp(np.array(scores) - max(scores))
            result = LMLabel(labels[best], "score", confidence=float(z[best] / z.sum()))
        else:
            reply = _greedy(lm, prompt, max_new_tokens=_label_tokens(lm, labels))
            result = LMLabel(parse_label(reply, labels), "generate", reply=reply)
        if explain and result.label is not None:
            result.explanation = _greedy(lm, f"{prompt} {result.label}\nExplanation:",
                                         max_new_tokens=max_explanation_tokens).strip()
        out.append(result)
    return out


def _can_score(lm) -> bool:
    """Whether `lm` gives log-probs: local backends do; a remote one only if its server echoes prompt log-probs
    (asked once with a one-token probe)."""
    if lm.tokenizer is not None:
        return True
    try:
        lm.score("Label:", " yes")
    except NotImplementedError:
        return False
    return True


def _label_tokens(lm, labels: Sequence[str]) -> int:
    """Enough new tokens for the longest label (a few extra for spacing or quotes the reply may add)."""
    if lm.tokenizer is not None:
        return max(len(lm.tokenizer.encode(" " + label)) for label in labels) + 4
    return max(len(label) for label in labels) // 2 + 8  # no tokenizer: ~2 characters a token, generously


def _greedy(lm, prompt: str, max_new_tokens: int) -> str:
    params = lm.sampling_params(temperature=0.0, max_new_tokens=max_new_tokens, stop=["\n"],
                                repetition_penalty=1.0)
    return lm.generate([prompt], params)[0]


def _demos(examples: Sequence[tuple[str, str]] | Sequence[Demo], k: int, seed: int) -> list[Demo]:
    pairs = [(d.text, d.label) if isinstance(d, Demo) else (d[0], d[1]) for d in examples]
    return [Demo(text, label) for text, label in select_demos(pairs, k, seed)]


def icl_predict(large_lm, demos: Sequence[tuple[str, str]], texts: Sequence[str], labels: Sequence[str],
                k: int = 8, seed: int = 0, method: str = "auto", explain: bool = False) -> list[LMLabel]:
    """The baseline: the large LM alone with the same k in-context examples SuperICL would show (the same
    `select_demos(demos, k, seed)`), without the small model's predictions."""
    return label_with_lm(large_lm, _demos(demos, k, seed), texts, labels, method=method, explain=explain)


def supericl_predict(large_lm, classifier, demos: Sequence[tuple[str, str]], texts: Sequence[str], k: int = 8,
                     seed: int = 0, method: str = "auto", explain: bool = False) -> list[SuperICLPrediction]:
    """SuperICL: the small `classifier` (a `classify.head.Classifier`, or anything with `predict(texts) ->
    [(label, confidence)]` and `info.labels`) predicts the k demos (drawn by `select_demos` from `demos`,
    (text, label) pairs) and every text; the large LM sees those predictions and writes the final label.

    `overridden` says whether the final label differs from the small model's. A generated reply that names no
    label leaves the small model's label in place (not an override).
    """
    labels = list(classifier.info.labels)
    chosen = _demos(demos, k, seed)
    demo_preds = classifier.predict([d.text for d in chosen]) if chosen else []
    for d, (label, confidence) in zip(chosen, demo_preds, strict=True):
        d.small_label, d.small_confidence = label, confidence
    small = classifier.predict(list(texts)) if texts else []
    answers = label_with_lm(large_lm, chosen, texts, labels, small=small, method=method, explain=explain)
    out = []
    for text, (small_label, small_conf), answer in zip(texts, small, answers, strict=True):
        final = answer.label if answer.label is not None else small_label
        out.append(SuperICLPrediction(text, final, small_label, float(small_conf), final != small_label,
                                      answer.confidence, answer.method, answer.explanation))
    return out


def override_counts(preds: Sequence[SuperICLPrediction], golds: Sequence[str]) -> dict:
    """How often the large LM changed the small model's label, and whether rightly: `right` (small wrong, final
    right), `wrong` (small right, final wrong), `neither` (both wrong); the rate is over all texts."""
    right = wrong = neither = 0
    for p, gold in zip(preds, golds, strict=True):
        if p.overridden:
            if p.label == gold:
                right += 1
            elif p.small_label == gold:
                wrong += 1
            else:
                neither += 1
    total = right + wrong + neither
    return {"overridden": total, "rate": total / len(golds) if golds else math.nan, "right": right,
            "wrong": wrong, "neither": neither}
