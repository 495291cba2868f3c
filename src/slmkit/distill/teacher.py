"""The teacher side of distillation: open a teacher, check it shares the student's vocabulary, read its top-k
log-probabilities for a batch of windows.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from slmkit import tokenizer
from slmkit.tokenizer import TokenizerMismatch


@dataclass
class TeacherTargets:
    """The teacher's distribution at every position of a (B, T) batch, at the distillation temperature."""

    logp: torch.Tensor  # (B, T, V) full log-probs, or (B, T, k) top-k log-probs
    ids: torch.Tensor | None = None  # (B, T, k) token ids of the top-k; None for full distributions


def check_same_tokenizer(teacher_tok, student_tok, teacher_name: str) -> None:
    """Raise TokenizerMismatch unless both tokenizers map every token string to the same id."""
    hint = ("Logit distillation compares the two models' probabilities token by token, so it needs one "
            "vocabulary. Either give the student the teacher's tokenizer (prepare the data with `slm data prepare "
            "--tokenizer TEACHER`, and/or `--student-from-teacher`), or distil at the sequence level: train the "
            "student on text the teacher wrote (`slm synth`).")
    if teacher_tok is None:
        raise TokenizerMismatch(f"teacher {teacher_name} exposes no tokenizer (a text-only endpoint). {hint}")
    if student_tok is None:
        raise TokenizerMismatch(f"the student's data has no tokenizer/ directory to compare with {teacher_name}'s. "
                                f"{hint}")
    tokenizer.check_same_tokenizer(teacher_tok, student_tok, f"teacher {teacher_name}", "the student", hint)


def open_teacher_lm(spec: str, backend: str = "auto", device: str | torch.device = "cpu"):
    from slmkit.lm import load_lm
    options = {"n_ctx": 4096} if backend == "llamacpp" else {}
    return load_lm(spec, backend=backend, device=str(device), **options)


@torch.no_grad()
def teacher_logprobs(lm, windows: torch.Tensor, top_k: int, temperature: float) -> TeacherTargets:
    """The teacher's distributions for inputs windows[:, :-1] (B, T) (windows: (B, T + 1) token ids).

    slmkit's own model (TorchLM) runs the whole batch in one forward pass and gives full distributions or any
    top-k at any temperature; other backends give their top-k log-probs at temperature 1, one sequence at a time.
    """
    from slmkit.lm.torch_lm import TorchLM
    if isinstance(lm, TorchLM):
        device = next(lm.model.parameters()).device
        logits = lm.model(windows[:, :-1].to(device)).float()
        logp = torch.log_softmax(logits / temperature, dim=-1)
        if not top_k:
            return TeacherTargets(logp=logp)
        top = logp.topk(top_k, dim=-1)
        return TeacherTargets(logp=top.values, ids=top.indices)
    if not top_k:
        raise ValueError(f"the {type(lm).__name__} teacher returns top-k log-probs only: set top_k (e.g. 16)")
    if temperature != 1.0:
        raise ValueError(f"the {type(lm).__name__} teacher gives log-probs at temperature 1 only; use temperature "
                         "1 or a teacher slmkit runs itself (a model directory or GGUF with the torch backend)")
    out = lm.logprobs_batch([row.tolist() for row in windows], top_k=top_k)
    return TeacherTargets(logp=torch.from_numpy(np.stack([o.top_logprobs for o in out])).float(),
                          ids=torch.from_numpy(np.stack([o.top_ids for o in out])).long())

