"""A cascade: the small model answers when its calibrated confidence clears a threshold, otherwise the request
escalates to a larger LM — or to people (`lm.handoff.HandoffQueue` is an escalation target like any other LM).

    small, large = load_lm("runs/student"), load_lm("http://gpu-box:8000/v1")   # any backends
    calibration = calibrate(small, dev_items, feature="mean_logprob")         # on dev items with answers
    cascade = Cascade(small, large, calibration, target_error=0.05)
    cascade.generate(["Q: ...\\nA:"])                    # an LM: generate / stream / stream_chat route
    cascade.answers[-1]                                  # Answer(text, answered_by="small"|"large", confidence)

Confidence of a generated answer, from the small model's own log-probs of the tokens it produced
(`confidence`):
- `mean_logprob`: the mean token log-prob (the sequence log-prob normalised by length, so long answers are not
  penalised for being long);
- `neg_entropy`: minus the mean entropy of the next-token distributions along the answer, over each position's
  top-20 alternatives plus one bucket for the rest (what every backend, and the server's engine, can return);
- `agreement`: the share of `n_samples` sampled answers (temperature 0.8) that agree with the answer itself
  (normalised text), as in self-consistency; costs n more generations.
Each raw score is mapped to P(correct) by a `Calibration` fitted on dev items (`lm.calibration`, Platt scaling),
and the threshold is the lowest one whose dev error among the answered items is at most the target.

The small model always answers first: its full reply is generated before the decision, so `stream` yields the
chosen reply in one piece. Everything not generation (log-probs, scoring) is the small model's.
"""

from __future__ import annotations

import dataclasses
import math
import re
import string
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np

from slmkit.lm.base import LM
from slmkit.lm.calibration import Calibration, fit_calibration
from slmkit.sampling import SamplingParams

FEATURES = ("mean_logprob", "neg_entropy", "agreement")
PROMPT_FIELDS = ("prompt", "question", "text")
TOP_K = 20  # alternatives per position for neg_entropy (the server's engine returns as many)


@dataclass
class Answer:
    text: str
    answered_by: str  # "small" or "large" (the escalation target's role, whatever it is)
    confidence: float  # the small model's calibrated confidence, P(correct)
    score: float  # the raw feature value it was calibrated from


def token_entropy(top_logprobs: np.ndarray) -> float:
    """Entropy (nats) of one next-token distribution known by its top-k log-probs; the mass outside them counts
    as one more outcome, so the value is a lower bound that is exact when the top-k hold everything."""
    p = np.exp(np.asarray(top_logprobs, dtype=np.float64))
    rest = max(0.0, 1.0 - p.sum())
    p = np.append(p, rest) if rest > 0 else p
    p = p[p > 0]
    return float(-(p * np.log(p)).sum())


def confidence(feature: str, token_logprobs=None, top_logprobs=None, answer: str | None = None,
               samples: list[str] | None = None) -> float:
    """The raw confidence score of one answer for `feature` (see the module docstring).

    token_logprobs: (n,) log-probs of the answer's tokens; top_logprobs: (n, k) the top-k log-probs at each
    position; samples: other sampled answers to the same prompt (agreement)."""
    if feature == "mean_logprob":
        lp = np.asarray(token_logprobs, dtype=np.float64)
        return float(lp.mean()) if lp.size else 0.0
    if feature == "neg_entropy":
        top = np.asarray(top_logprobs, dtype=np.float64)
        return -float(np.mean([token_entropy(row) for row in top])) if len(top) else 0.0
    if feature == "agreement":
        if not samples:
            raise ValueError("the agreement feature needs sampled answers (n_samples >= 1)")
        return float(np.mean([normalize(s) == normalize(answer or "") for s in samples]))
    raise ValueError(f"unknown confidence feature {feature!r}; use one of {', '.join(FEATURES)}")


def normalize(text: str) -> str:
    """Lower case, no punctuation, single spaces: answers that differ only in form compare equal."""
    text = text.lower().translate(str.maketrans("", "", string.punctuation))
    return re.sub(r"\s+", " ", text).strip()


def is_correct(output: str, gold: str) -> bool:
    """Whether a generated answer contains the gold answer (both normalised, on word boundaries): a chatty
    model that says "It is Paris." for "Paris" is right."""
    gold, output = normalize(gold), normalize(output)
    return bool(gold) and re.search(rf"(^| ){re.escape(gold)}( |$)", output) is not None


class Cascade(LM):
    """An LM that answers with `small` when its calibrated confidence >= threshold, else with `large`.

    threshold: given directly, or chosen from `calibration`'s dev points for `target_error`. Every answer is
    appended to `answers` (text, answered_by, confidence); `counts` tallies who answered."""

    def __init__(self, small: LM, large: LM, calibration: Calibration, target_error: float | None = None,
                 threshold: float | None = None, n_samples: int = 5):
        if calibration.feature not in FEATURES:
            raise ValueError(f"this calibration scores {calibration.feature!r}, not a generation confidence "
                             f"({', '.join(FEATURES)}); make one with `slm cascade calibrate`")
        if (target_error is None) == (threshold is None):
            raise ValueError("give the cascade a target error or a threshold (one of them)")
        self.small, self.large, self.calibration, self.n_samples = small, large, calibration, n_samples
        self.threshold = threshold if threshold is not None else calibration.threshold(target_error)
        self.target_error = target_error
        self.name = f"cascade({small.name} -> {large.name})"
        self.tokenizer, self.max_length = small.tokenizer, small.max_length
        self.eos_id, self.bos_id = small.eos_id, small.bos_id
        self.instruction_tuned, self.generation_defaults = small.instruction_tuned, small.generation_defaults
        self.answers: list[Answer] = []
        self.counts = {"small": 0, "large": 0}

    # --- scoring is the small model's ---

    def logprobs(self, ids, top_k: int = 0):
        return self.small.logprobs(ids, top_k=top_k)

    def logprobs_batch(self, sequences, top_k: int = 0):
        return self.small.logprobs_batch(sequences, top_k=top_k)

    # --- generation routes ---

    def score_answer(self, prompt_text: str, answer: str, samples: list[str] | None = None) -> float:
        """The raw confidence of `answer` after `prompt_text` (the text the small model was prompted with)."""
        feature = self.calibration.feature
        if feature == "agreement":
            return confidence(feature, answer=answer, samples=samples)
        prompt_ids = self.small.encode_prompt(prompt_text)
        answer_ids = self.tokenizer.encode(answer)
        if not answer_ids:
            return confidence(feature, [], np.zeros((0, 1)))
        lp = self.small.logprobs((prompt_ids + answer_ids)[-self.max_length:], top_k=TOP_K)
        n = len(answer_ids)
        return confidence(feature, lp.token_logprobs[-n:], lp.top_logprobs[-n:])

    def decide(self, score: float) -> tuple[bool, float]:
        """(whether the small model answers, its calibrated confidence) for a raw score."""
        p = float(self.calibration(score))
        return p >= self.threshold, p

    def _route(self, prompt_text: str, params: SamplingParams | None, small_reply, large_reply) -> Iterator[str]:
        text = "".join(small_reply(params))
        samples = None
        if self.calibration.feature == "agreement":
            base = params or self.small.sampling_params()
            samples = ["".join(small_reply(_sample_params(base, i))) for i in range(self.n_samples)]
        score = self.score_answer(prompt_text, text, samples)
        small_answers, p = self.decide(score)
        if not small_answers:
            text = "".join(large_reply(params))
        who = "small" if small_answers else "large"
        self.counts[who] += 1
        self.answers.append(Answer(text, who, p, score))
        yield text

    def stream(self, prompt: str, params: SamplingParams | None = None, heal: bool = False) -> Iterator[str]:
        return self._route(prompt, params, lambda p: self.small.stream(prompt, p, heal=heal),
                           lambda p: self.large.stream(prompt, p, heal=heal))

    def stream_chat(self, messages: list[dict], params: SamplingParams | None = None) -> Iterator[str]:
        tok = self.tokenizer
        if tok is None or not tok.chat_template:
            raise ValueError(f"{self.small.name} has no chat template; prompt the cascade with plain text")
        prompt = tok.apply_chat_template(messages, add_generation_prompt=True)
        return self._route(prompt, params, lambda p: self.small.stream_chat(messages, p),
                           lambda p: self.large.stream_chat(messages, p))

    def stream_ids(self, prompt_ids, params, first_allowed):
        raise NotImplementedError("a cascade decides on whole answers: use stream / generate / stream_chat")

    def close(self) -> None:
        self.small.close()
        self.large.close()


def _sample_params(params: SamplingParams, i: int) -> SamplingParams:
    """The i-th of the n sampled answers `agreement` compares with: seeded, at temperature 0.8 when greedy."""
    temperature = params.temperature if params.temperature > 0 else 0.8
    seed = (params.seed if params.seed is not None else 0) + 1 + i
    return dataclasses.replace(params, temperature=temperature, seed=seed)


def calibrate(small: LM, items: list[dict], feature: str = "mean_logprob", max_new_tokens: int = 64,
              n_samples: int = 5, source: str = "dev") -> Calibration:
    """Fit the small model's confidence on dev items: each {"prompt": str} (or "question", as `slm eval`'s
    generate items, or "text") or {"messages": [...]}, with the gold "answer". The small model answers greedily,
    `is_correct` judges it, and Platt scaling maps the feature to P(correct)."""
    if feature not in FEATURES:
        raise ValueError(f"unknown confidence feature {feature!r}; use one of {', '.join(FEATURES)}")
    probe = Cascade(small, small, Calibration(feature=feature, scores=[0.0], correct=[True]), threshold=math.inf,
                    n_samples=n_samples)
    params = small.sampling_params(temperature=0.0, max_new_tokens=max_new_tokens)
    scores, correct = [], []
    for n, item in enumerate(items, 1):
        field = next((f for f in PROMPT_FIELDS if isinstance(item, dict) and isinstance(item.get(f), str)), None)
        if not isinstance(item, dict) or not isinstance(item.get("answer"), str) or not (
                field or isinstance(item.get("messages"), list)):
            raise ValueError(f"{source}:{n}: needs a string \"prompt\" (or \"question\", \"text\") or a list "
                             "\"messages\", and a string \"answer\"")
        if field is None:
            prompt = small.tokenizer.apply_chat_template(item["messages"], add_generation_prompt=True)
            reply = lambda p, m=item["messages"]: small.stream_chat(m, p)  # noqa: E731
        else:
            prompt = item[field]
            reply = lambda p, q=prompt: small.stream(q, p)  # noqa: E731
        text = "".join(reply(params))
        samples = ([("".join(reply(_sample_params(params, i)))) for i in range(n_samples)]
                   if feature == "agreement" else None)
        scores.append(probe.score_answer(prompt, text, samples))
        correct.append(is_correct(text, item["answer"]))
    return fit_calibration(scores, correct, feature)


def calibrate_file(model: str, dev: str, out: str, feature: str = "mean_logprob", max_new_tokens: int = 64,
                   backend: str = "auto", targets: tuple[float, ...] = (0.01, 0.05, 0.1, 0.2)) -> dict:
    """`slm cascade calibrate`: calibrate `model` on the dev JSONL file `dev` and write the calibration to `out`;
    a summary (accuracy, the fitted map, the share answered at a few target errors)."""
    from slmkit.files import iter_jsonl
    from slmkit.lm import load_lm
    items = [record for _, record in iter_jsonl(dev)]
    if not items:
        raise ValueError(f"{dev}: no items; give dev items {{\"prompt\" or \"messages\", \"answer\"}}")
    with load_lm(model, backend=backend) as small:
        cal = calibrate(small, items, feature=feature, max_new_tokens=max_new_tokens, source=str(dev))
    cal.model = model
    cal.save(out)
    p = cal(np.asarray(cal.scores))
    coverage = {str(t): float((p >= cal.threshold(t)).mean()) for t in targets}
    return {"out": str(out), "items": len(items), "small_accuracy": float(np.mean(cal.correct)),
            "feature": feature, "a": cal.a, "b": cal.b, "coverage_at_target_error": coverage}
