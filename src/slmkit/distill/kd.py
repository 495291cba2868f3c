"""Logit distillation for the one training loop: a teacher's next-token distributions as soft targets.

    loss = alpha * T^2 * D(teacher_T || student_T) + (1 - alpha) * CE(student, real next token)

D is one of (Hinton et al. 2015; MiniLLM, Gu et al. 2023; GKD, Agarwal et al. 2024):
- "fkl"  forward KL(P || Q): the student covers every mode of the teacher (classic KD);
- "rkl"  reverse KL(Q || P): the student seeks the teacher's main modes (MiniLLM);
- "jsd"  generalised Jensen-Shannon with weight beta: beta KL(P || M) + (1 - beta) KL(Q || M), M = beta P +
         (1 - beta) Q (GKD; small beta behaves like forward KL, large beta like reverse KL).
P is the teacher, Q the student, both at temperature T. The teacher's distribution comes either

- online: the teacher runs on every batch (`teacher`: any model slmkit can open; slmkit's own model gives the
  full distribution, other backends their top-k), or
- offline: from a top-k cache written once by `build_topk_cache` (`cache`), so any number of students train
  without running the teacher again.

With top-k targets the divergence is taken over k + 1 outcomes: the k tokens the teacher ranks highest and
"everything else" (1 - their total probability, for teacher and student alike). That is an exact divergence of
the coarsened distributions, so all three losses stay proper; nothing is renormalised away.

On-policy distillation (GKD): with `on_policy` = lambda > 0, that fraction of micro-batches keeps only the first
tokens of each window as a prompt, lets the student sample `on_policy_tokens` tokens, and trains the student on
the teacher's distribution at the student's own tokens (no ground-truth term: there is none).

Teacher and student must share one tokenizer (checked token by token); otherwise use sequence-level
distillation (train on teacher-written text) instead.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from slmkit.distill.teacher import TeacherTargets, check_same_tokenizer, open_teacher_lm, teacher_logprobs
from slmkit.distill.topk_cache import CachedTeacher

LOSSES = ("fkl", "rkl", "jsd")


@dataclass
class DistillConfig:
    teacher: str | None = None  # online: a model spec (directory, run, .gguf, pulled name, URL)
    teacher_backend: str = "auto"  # auto | torch | hf | llamacpp
    cache: str | None = None  # offline: a directory written by build_topk_cache
    loss: str = "fkl"
    beta: float = 0.5  # jsd only
    temperature: float = 1.0
    alpha: float = 0.5  # weight of the distillation term; 1 - alpha goes to the ground-truth cross-entropy
    top_k: int = 0  # online teacher: 0 = its full distribution; k > 0 = its top k (+ the rest)
    on_policy: float = 0.0  # lambda: fraction of micro-batches sampled by the student and scored by the teacher
    on_policy_tokens: int = 64  # tokens the student samples per on-policy sequence

    def __post_init__(self):
        if (self.teacher is None) == (self.cache is None):
            raise ValueError("distillation needs exactly one of: a teacher (online) or a top-k cache (offline)")
        if self.loss not in LOSSES:
            raise ValueError(f"unknown distillation loss {self.loss!r}; choose one of {', '.join(LOSSES)}")
        if not 0.0 < self.beta < 1.0:
            raise ValueError(f"beta must be strictly between 0 and 1, got {self.beta}")
        if self.temperature <= 0:
            raise ValueError(f"temperature must be > 0, got {self.temperature}")
        if not 0.0 <= self.alpha <= 1.0:
            raise ValueError(f"alpha must be in [0, 1], got {self.alpha}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0, got {self.top_k}")
        if not 0.0 <= self.on_policy <= 1.0:
            raise ValueError(f"on_policy (lambda) must be in [0, 1], got {self.on_policy}")
        if self.on_policy and self.cache:
            raise ValueError("on-policy distillation scores the student's own samples: it needs an online teacher, "
                             "not a cache")
        if self.on_policy_tokens < 1:
            raise ValueError(f"on_policy_tokens must be >= 1, got {self.on_policy_tokens}")


def divergence(t_logp: torch.Tensor, s_logp: torch.Tensor, kind: str, beta: float = 0.5) -> torch.Tensor:
    """D(P || Q) over the last dimension for log-probabilities that each sum to one; shape (...)."""
    t_logp = t_logp.clamp(min=-1e4)  # a -inf log-prob times a zero probability must give 0, not nan
    if kind == "fkl":
        return (t_logp.exp() * (t_logp - s_logp)).sum(-1)
    if kind == "rkl":
        return (s_logp.exp() * (s_logp - t_logp)).sum(-1)
    if kind == "jsd":
        m = torch.logaddexp(t_logp + math.log(beta), s_logp + math.log(1 - beta))
        return beta * (t_logp.exp() * (t_logp - m)).sum(-1) + (1 - beta) * (s_logp.exp() * (s_logp - m)).sum(-1)
    raise ValueError(f"unknown divergence {kind!r}")


def with_rest(top_logp: torch.Tensor) -> torch.Tensor:
    """(..., k) log-probs of k outcomes -> (..., k + 1): the same plus log(1 - their total) as one more outcome."""
    total = torch.logsumexp(top_logp, dim=-1, keepdim=True)
    rest = torch.log((-torch.expm1(total)).clamp(min=1e-10))  # fp16 cached values can sum to a hair over 1
    return torch.cat([top_logp, rest], dim=-1)


def kd_loss(student_logits: torch.Tensor, targets: TeacherTargets, mask: torch.Tensor, kind: str, beta: float,
            temperature: float) -> torch.Tensor:
    """Mean divergence over positions where `mask` (B, T) is true, scaled by T^2 (Hinton) so gradients keep their
    size across temperatures."""
    s_logp = torch.log_softmax(student_logits.float() / temperature, dim=-1)
    return kd_loss_from_logp(s_logp, targets, mask, kind, beta, temperature)


def kd_loss_from_logp(s_logp: torch.Tensor, targets: TeacherTargets, mask: torch.Tensor, kind: str, beta: float,
                      temperature: float) -> torch.Tensor:
    """`kd_loss` from the student's log-probs at the temperature (the training step computes them once for both
    the divergence and the cross-entropy: over a 49k vocabulary the softmax is a large share of a small model's
    step)."""
    if targets.ids is not None:
        return topk_kd(targets.logp, s_logp.gather(-1, targets.ids), mask, kind, beta, temperature)
    n = min(s_logp.shape[-1], targets.logp.shape[-1])  # a padded vocabulary's extra rows are never used
    t, s = targets.logp[..., :n], s_logp[..., :n]
    if n < s_logp.shape[-1]:
        s = s - torch.logsumexp(s, dim=-1, keepdim=True)
    return _masked_mean(divergence(t, s, kind, beta), mask) * temperature ** 2


def topk_kd(t_top: torch.Tensor, s_top: torch.Tensor, mask: torch.Tensor, kind: str, beta: float,
            temperature: float) -> torch.Tensor:
    """The divergence over the teacher's top-k + the rest, from both models' log-probs at those k tokens."""
    d = divergence(with_rest(t_top.float()), with_rest(s_top), kind, beta)
    return _masked_mean(d, mask) * temperature ** 2


def _masked_mean(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return (values * mask).sum() / mask.sum().clamp(min=1)


def sample_continuations(model, windows: torch.Tensor, n_new: int, generator: torch.Generator,
                         temperature: float = 1.0) -> torch.Tensor:
    """Keep the first T + 1 - n_new tokens of each (B, T + 1) window and let the student sample the rest (plain
    sampling at `temperature`: on-policy distillation wants the student's own distribution)."""
    from slmkit.lm.torch_lm import generate_batch
    from slmkit.sampling import SamplingParams
    was_training = model.training
    n_new = min(n_new, windows.shape[1] - 1)
    prompts = windows[:, :windows.shape[1] - n_new]
    params = SamplingParams(max_new_tokens=n_new, temperature=temperature, stop_at_eos=False)
    new = list(generate_batch(model, prompts, params, generator))  # puts the model in eval mode
    model.train(was_training)
    device = next(model.parameters()).device
    return torch.cat([prompts, torch.stack(new, dim=1)], dim=1).to(device)


class Distiller:
    """What the training loop calls for each micro-batch when distilling."""

    def __init__(self, cfg: DistillConfig, data, tokenizer, seq_len: int, device, seed: int = 0, log=print):
        self.cfg = cfg
        self.device = device
        self.lm, self.cache = None, None
        if cfg.cache:
            self.cache = CachedTeacher(cfg.cache, cfg, seq_len)
            if not hasattr(data, "max_windows"):
                raise ValueError("a teacher cache covers windows of a token dataset; fine-tuning records need an "
                                 "online teacher")
            sha = data.meta.get("manifest_sha256")
            if self.cache.meta.get("data_manifest_sha256") not in (None, sha):
                raise ValueError(f"{cfg.cache} was built from other data than {data.path} (manifest differs)")
            data.max_windows = min(self.cache.windows, data.num_train_windows(seq_len))
            log(f"teacher: cache {cfg.cache} ({self.cache.meta['teacher']}, top-{self.cache.meta['top_k']}, "
                f"{self.cache.windows * seq_len:,} positions); training on those windows")
        else:
            self.lm = open_teacher_lm(cfg.teacher, cfg.teacher_backend, device)
            check_same_tokenizer(self.lm.tokenizer, tokenizer, cfg.teacher)
            if getattr(self.lm, "model", None) is not None:
                self.lm.model.requires_grad_(False)
            log(f"teacher: {cfg.teacher} online ({type(self.lm).__name__}, "
                f"{'full distribution' if not cfg.top_k else f'top-{cfg.top_k}'})")
        self.seed = seed

    def loss(self, step_fn, model, x: torch.Tensor, y: torch.Tensor, windows: list[int] | None, sample: int):
        """(loss, parts): alpha * KD + (1 - alpha) * CE on the batch, or on-policy KD on student samples.

        `sample` (the global index of the batch's first sample) seeds the on-policy draw and sampling, so a
        resumed or data-parallel run makes the same choices as one uninterrupted process."""
        cfg = self.cfg
        on_policy = cfg.on_policy > 0 and np.random.default_rng([self.seed, sample]).random() < cfg.on_policy
        if on_policy:
            full = torch.cat([x, y[:, -1:]], dim=1)
            generator = torch.Generator().manual_seed(self.seed * 1_000_003 + sample)
            full = sample_continuations(model, full, cfg.on_policy_tokens, generator)
            x, y = full[:, :-1], full[:, 1:].clone()
            y[:, :x.shape[1] - cfg.on_policy_tokens] = -100  # the prompt is not the student's to learn
        if self.cache is not None:
            targets = self.cache.targets(windows)
        else:
            targets = teacher_logprobs(self.lm, torch.cat([x, y[:, -1:].clamp(min=0)], dim=1).cpu(), cfg.top_k,
                                       cfg.temperature)
        targets = TeacherTargets(logp=targets.logp.to(self.device),
                                 ids=targets.ids.to(self.device) if targets.ids is not None else None)
        logits = step_fn(x).float()
        mask = (y != -100).float()
        s_logp = torch.log_softmax(logits / cfg.temperature if cfg.temperature != 1.0 else logits, dim=-1)
        if targets.ids is not None and cfg.temperature == 1.0:
            # One gather for the teacher's top-k and the real next token: the backward pass then scatters into the
            # 49k-wide vocabulary once, not twice (that second pass cost a 17M student ~20% of its step).
            picked = s_logp.gather(-1, torch.cat([targets.ids, y.clamp(min=0).unsqueeze(-1)], dim=-1))
            kd = topk_kd(targets.logp, picked[..., :-1], mask, cfg.loss, cfg.beta, cfg.temperature)
            ce = -_masked_mean(picked[..., -1], mask)
        else:
            kd = kd_loss_from_logp(s_logp, targets, mask, cfg.loss, cfg.beta, cfg.temperature)
            logp = s_logp if cfg.temperature == 1.0 else torch.log_softmax(logits, dim=-1)
            ce = F.nll_loss(logp.reshape(-1, logp.shape[-1]), y.reshape(-1), ignore_index=-100)
        if on_policy:
            return kd, {"kd": kd.detach(), "ce": None}
        return cfg.alpha * kd + (1 - cfg.alpha) * ce, {"kd": kd.detach(), "ce": ce.detach()}

