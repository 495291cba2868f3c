"""Calibrated confidence and the escalation threshold: what a cascade decides with.

A raw confidence score (a classifier's top probability, a generation's mean token log-prob, ...) is mapped to
P(correct) by **Platt scaling** (Platt 1999): a logistic regression sigmoid(a * score + b) fitted on dev items
whose correctness is known. Platt, not isotonic regression, because dev sets here are small (tens to a few
hundred items): two parameters do not overfit them, and the map is strictly increasing, so it never reorders
items and never ties distinct scores into one step. A classifier whose probability is already temperature-scaled
(`classify.head`) uses the identity map (`method="identity"`). The fit is a convex 2-parameter problem solved
with torch's L-BFGS (torch is already a dependency; scikit-learn would be a new one for a single call).

The threshold is chosen for a target error: the lowest threshold whose dev error among the items it answers
(confidence >= threshold) is at most the target (`select_threshold`); items below it go to the escalation target.
A `Calibration` keeps the fitted map and the dev points (score, correct), so a server can pick the threshold for
any `--target-error` at start-up, and is saved as JSON (`save` / `load_calibration`, format "slmkit-calibration").
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch

from slmkit.files import atomic_write_text

FORMAT = "slmkit-calibration"
METHODS = ("platt", "identity")


@dataclass
class Calibration:
    """score -> P(correct): sigmoid(a * score + b) for Platt, the score itself for identity."""

    feature: str  # what the score is (a confidence feature name, e.g. "mean_logprob" or "probability")
    method: str = "platt"
    a: float = 1.0
    b: float = 0.0
    scores: list[float] = field(default_factory=list)  # the dev items' raw scores ...
    correct: list[bool] = field(default_factory=list)  # ... and whether the small model was right on each
    model: str = ""  # the small model it was fitted for

    def __call__(self, score: float | np.ndarray) -> float | np.ndarray:
        s = np.asarray(score, dtype=np.float64)
        p = s if self.method == "identity" else 1.0 / (1.0 + np.exp(-(self.a * s + self.b)))
        return float(p) if p.ndim == 0 else p

    def threshold(self, target_error: float) -> float:
        """The escalation threshold on calibrated confidence for `target_error`, from the dev points."""
        return select_threshold(self(np.asarray(self.scores)), np.asarray(self.correct, dtype=bool), target_error)

    def save(self, path: str | Path) -> None:
        atomic_write_text(path, json.dumps({"format": FORMAT, **asdict(self)}, indent=1) + "\n")


def fit_calibration(scores, correct, feature: str, method: str = "platt") -> Calibration:
    """Fit the map on dev items: `scores` (raw confidence) and `correct` (whether the answer was right)."""
    scores = [float(s) for s in scores]
    correct = [bool(c) for c in correct]
    if method not in METHODS:
        raise ValueError(f"calibration method {method!r} is not one of {', '.join(METHODS)}")
    if len(scores) != len(correct) or not scores:
        raise ValueError(f"calibration needs one correctness flag per score and at least one item "
                         f"(got {len(scores)} scores, {len(correct)} flags)")
    if not all(math.isfinite(s) for s in scores):
        raise ValueError("calibration scores must be finite numbers")
    cal = Calibration(feature=feature, method=method, scores=scores, correct=correct)
    if method == "platt":
        cal.a, cal.b = platt(np.asarray(scores), np.asarray(correct, dtype=bool))
    return cal


def platt(scores: np.ndarray, correct: np.ndarray, l2: float = 1e-3) -> tuple[float, float]:
    """(a, b) of sigmoid(a * s + b) maximising the likelihood of `correct`, with Platt's smoothed targets
    ((n+ + 1) / (n+ + 2) and 1 / (n- + 2), so all-right or all-wrong dev sets still give a finite fit) and a
    small L2 penalty on a. Scores are standardised for the fit, then mapped back."""
    pos, neg = int(correct.sum()), int((~correct).sum())
    y = torch.tensor(np.where(correct, (pos + 1) / (pos + 2), 1 / (neg + 2)), dtype=torch.float64)
    mu, sd = float(scores.mean()), float(scores.std()) or 1.0
    x = torch.tensor((scores - mu) / sd, dtype=torch.float64)
    w = torch.zeros(2, dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS([w], max_iter=200, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = torch.nn.functional.binary_cross_entropy_with_logits(w[0] * x + w[1], y) + l2 * w[0] ** 2
        loss.backward()
        return loss
    opt.step(closure)
    w0, w1 = (float(v) for v in w.detach())
    a, b = w0 / sd, w1 - w0 * mu / sd
    return a, b


def select_threshold(confidence: np.ndarray, correct: np.ndarray, target_error: float) -> float:
    """The lowest threshold t (one of the dev confidences) such that the dev error among items with
    confidence >= t is at most `target_error`; inf (escalate everything) when no threshold reaches it."""
    if not 0.0 <= target_error <= 1.0:
        raise ValueError(f"target error must be between 0 and 1, got {target_error}")
    confidence, correct = np.asarray(confidence, dtype=np.float64), np.asarray(correct, dtype=bool)
    for t in np.unique(confidence):  # ascending: the first that qualifies is the lowest
        answered = confidence >= t
        if 1.0 - correct[answered].mean() <= target_error + 1e-12:
            return float(t)
    return math.inf


def risk_coverage(confidence, correct) -> list[dict]:
    """The risk-coverage curve: for each threshold (the distinct confidences, highest first), the share of items
    answered (`coverage`) and the error among them (`risk`)."""
    confidence, correct = np.asarray(confidence, dtype=np.float64), np.asarray(correct, dtype=bool)
    rows = []
    for t in np.unique(confidence)[::-1]:
        answered = confidence >= t
        rows.append({"threshold": float(t), "coverage": float(answered.mean()),
                     "risk": float(1.0 - correct[answered].mean())})
    return rows


def load_calibration(path: str | Path) -> Calibration:
    """A calibration file written by `Calibration.save` (`slm cascade calibrate`); a bad one is a one-line error."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such calibration file; make one with `slm cascade calibrate`")
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not JSON ({e.msg} at line {e.lineno}); make it with `slm cascade calibrate`") from e
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        raise ValueError(f"{path}: not a calibration file (\"format\" must be {FORMAT!r}); "
                         "make one with `slm cascade calibrate`")
    data.pop("format")
    try:
        cal = Calibration(**data)
    except TypeError as e:
        raise ValueError(f"{path}: bad calibration fields ({e})") from e
    if cal.method not in METHODS or len(cal.scores) != len(cal.correct) or not cal.scores:
        raise ValueError(f"{path}: method must be one of {', '.join(METHODS)} with as many `correct` flags as "
                         "`scores` (at least one)")
    return cal
