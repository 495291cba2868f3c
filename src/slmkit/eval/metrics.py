"""Scores with honest error bars, and the answer extraction every generation task needs.

Every reported number is a `Metric`: the value, a 95% confidence interval and how many items it rests on.
Accuracies use the Wilson score interval (correct near 0 and 1, unlike value ± 1.96·se); other per-item
means use the normal approximation; ratios of sums (bits per byte) use a seeded bootstrap over documents.
"""

from __future__ import annotations

import math
import random
import re
from collections.abc import Sequence
from dataclasses import asdict, dataclass

Z95 = 1.959964


@dataclass
class Metric:
    value: float
    low: float | None = None  # 95% confidence interval
    high: float | None = None
    n: int = 0  # items (or documents) behind the value

    def to_dict(self) -> dict:
        return asdict(self)

    def __str__(self) -> str:
        if self.low is None:
            return f"{self.value:.4g}"
        return f"{self.value:.4g} [{self.low:.4g}, {self.high:.4g}]"


def proportion(successes: float, n: int) -> Metric:
    """A rate with its Wilson score interval."""
    if n == 0:
        return Metric(float("nan"), None, None, 0)
    p = successes / n
    denom = 1 + Z95**2 / n
    centre = (p + Z95**2 / (2 * n)) / denom
    half = Z95 * math.sqrt(p * (1 - p) / n + Z95**2 / (4 * n * n)) / denom
    return Metric(p, max(0.0, centre - half), min(1.0, centre + half), n)


def mean(values: Sequence[float]) -> Metric:
    """A mean with a normal-approximation interval (pass@k, per-item scores in [0, 1])."""
    n = len(values)
    if n == 0:
        return Metric(float("nan"), None, None, 0)
    m = sum(values) / n
    if n == 1:
        return Metric(m, None, None, 1)
    sd = math.sqrt(sum((v - m) ** 2 for v in values) / (n - 1))
    return Metric(m, m - Z95 * sd / math.sqrt(n), m + Z95 * sd / math.sqrt(n), n)


def ratio_of_sums(numerators: Sequence[float], denominators: Sequence[float], resamples: int = 1000,
                  seed: int = 0) -> Metric:
    """sum(num) / sum(den) (e.g. bits / bytes over documents), with a bootstrap interval over the pairs."""
    n = len(numerators)
    if n == 0 or sum(denominators) == 0:
        return Metric(float("nan"), None, None, n)
    value = sum(numerators) / sum(denominators)
    if n == 1:
        return Metric(value, None, None, 1)
    rng = random.Random(seed)
    stats = []
    for _ in range(resamples):
        idx = [rng.randrange(n) for _ in range(n)]
        den = sum(denominators[i] for i in idx)
        if den:
            stats.append(sum(numerators[i] for i in idx) / den)
    stats.sort()
    return Metric(value, stats[int(0.025 * len(stats))], stats[int(0.975 * len(stats)) - 1], n)


def classification_report(golds: Sequence[str], preds: Sequence[str], labels: Sequence[str]) -> dict:
    """Accuracy, macro-F1, per-class precision/recall/F1/support and the confusion matrix (rows = gold)."""
    index = {label: i for i, label in enumerate(labels)}
    confusion = [[0] * len(labels) for _ in labels]
    for g, p in zip(golds, preds, strict=True):
        confusion[index[g]][index[p]] += 1
    per_class = {}
    for i, label in enumerate(labels):
        tp = confusion[i][i]
        predicted = sum(row[i] for row in confusion)
        support = sum(confusion[i])
        precision = tp / predicted if predicted else 0.0
        recall = tp / support if support else 0.0
        f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
        per_class[label] = {"precision": precision, "recall": recall, "f1": f1, "support": support}
    present = [c for c in per_class.values() if c["support"]]
    macro_f1 = sum(c["f1"] for c in present) / len(present) if present else float("nan")
    correct = sum(confusion[i][i] for i in range(len(labels)))
    return {"accuracy": proportion(correct, len(golds)), "macro_f1": Metric(macro_f1, None, None, len(golds)),
            "per_class": per_class, "labels": list(labels), "confusion": confusion}


# --- answers out of generated text ------------------------------------------------------------------------

_NUMBER = r"-?[\d,]*\.?\d+"


def normalize_number(text: str) -> str | None:
    """'1,200.00' -> '1200', '$18' -> '18', '-3.50' -> '-3.5'; None when it is not a number."""
    cleaned = text.strip().replace(",", "").replace("$", "").rstrip(".")
    try:
        value = float(cleaned)
    except ValueError:
        return None
    if not math.isfinite(value):
        return None
    return str(int(value)) if value == int(value) else repr(value)


def extract_number(text: str) -> str | None:
    """The final numeric answer of a worked solution (GSM8K style).

    Looks, in order, for "#### N" (the dataset's own format), "answer is N", and otherwise takes the last number
    in the text, which is what lm-eval's "flexible extract" does.
    """
    for pattern in (rf"####\s*\$?\s*({_NUMBER})", rf"answer is[:\s]*\$?\s*({_NUMBER})"):
        found = re.findall(pattern, text, flags=re.IGNORECASE)
        if found:
            return normalize_number(found[-1])
    numbers = re.findall(_NUMBER, text)
    return normalize_number(numbers[-1]) if numbers else None


def normalize_text(text: str) -> str:
    """Exact-match normalisation: lower case, single spaces, no surrounding whitespace or final period."""
    return re.sub(r"\s+", " ", text).strip().lower().rstrip(".").strip()


def rouge_l(prediction: str, reference: str) -> float:
    """ROUGE-L F1 over lower-cased word tokens (Lin, 2004): the longest common subsequence's precision and
    recall. Natural-Instructions reports it for every generation task; no stemming here."""
    pred, ref = re.findall(r"\w+", prediction.lower()), re.findall(r"\w+", reference.lower())
    if not pred or not ref:
        return float(pred == ref)
    previous = [0] * (len(ref) + 1)
    for p in pred:  # dynamic programme over prefixes, one row at a time
        row = [0]
        for j, r in enumerate(ref):
            row.append(previous[j] + 1 if p == r else max(previous[j + 1], row[j]))
        previous = row
    lcs = previous[-1]
    if lcs == 0:
        return 0.0
    precision, recall = lcs / len(pred), lcs / len(ref)
    return 2 * precision * recall / (precision + recall)


def extract_regex(text: str, pattern: str) -> str | None:
    """The first capture group (or whole match) of the first match of `pattern`."""
    match = re.search(pattern, text, flags=re.MULTILINE)
    if not match:
        return None
    return match.group(1) if match.groups() else match.group(0)


def extract_code(text: str) -> str:
    """The Python in a chat answer: the first fenced code block if there is one, else the text itself."""
    match = re.search(r"```(?:python|py)?[ \t]*\n(.*?)(?:```|$)", text, flags=re.DOTALL)
    return match.group(1) if match else text
