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

import dataclasses
import json
import math
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from slmkit.files import atomic_write_json

LOSSES = ("fkl", "rkl", "jsd")
CACHE_FORMAT = "slmkit-topk-cache"


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


# ---- the divergences -----------------------------------------------------------------------------------

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


@dataclass
class TeacherTargets:
    """The teacher's distribution at every position of a (B, T) batch, at the distillation temperature."""

    logp: torch.Tensor  # (B, T, V) full log-probs, or (B, T, k) top-k log-probs
    ids: torch.Tensor | None = None  # (B, T, k) token ids of the top-k; None for full distributions


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


# ---- tokenizers ----------------------------------------------------------------------------------------

class TokenizerMismatch(ValueError):
    pass


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
    a, b = teacher_tok.hf.get_vocab(), student_tok.hf.get_vocab()
    if a == b:
        return
    differ = sum(1 for tok, i in b.items() if a.get(tok) != i)
    example = next((tok for tok, i in sorted(b.items(), key=lambda kv: kv[1]) if a.get(tok) != i), None)
    raise TokenizerMismatch(
        f"teacher {teacher_name} and the student use different tokenizers ({len(a):,} vs {len(b):,} tokens; "
        f"{differ:,} of the student's tokens have another id or none in the teacher's, e.g. {example!r}). {hint}")


# ---- teacher log-probs ---------------------------------------------------------------------------------

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


# ---- the offline top-k cache ---------------------------------------------------------------------------

def _cache_arrays(path: Path, n_positions: int, k: int, id_dtype, mode: str):
    ids = np.memmap(path / "ids.bin", dtype=id_dtype, mode=mode, shape=(n_positions, k))
    logp = np.memmap(path / "logp.bin", dtype=np.float16, mode=mode, shape=(n_positions, k))
    return ids, logp


def build_topk_cache(teacher: str, data: str | Path, out: str | Path, *, seq_len: int = 256, top_k: int = 16,
                     temperature: float = 1.0, max_tokens: int | None = None, batch_size: int = 4,
                     backend: str = "auto", device: str = "cpu", progress: bool = True, log=print) -> dict:
    """Run the teacher once over the training windows of token dataset `data` and store, for every position, its
    top-k next-token ids and log-probs (float16) in `out`: ids.bin, logp.bin and meta.json.

    Window w is tokens [w * seq_len, (w + 1) * seq_len] of train.bin, exactly what the training loop reads at
    that seq_len; `max_tokens` covers the first windows only (training then uses just those). Interrupted builds
    continue where they stopped (progress.json); meta.json appears only when the cache is complete.
    """
    from slmkit.data.loader import TokenDataset, dataset_tokenizer
    out, dataset = Path(out), TokenDataset(data)
    if (out / "meta.json").exists():
        raise FileExistsError(f"{out} already holds a complete cache; choose another -o")
    lm = open_teacher_lm(teacher, backend, device)
    check_same_tokenizer(lm.tokenizer, dataset_tokenizer(data), teacher)
    windows = dataset.num_train_windows(seq_len)
    if max_tokens:
        windows = min(windows, max(1, max_tokens // seq_len))
    if windows < 1:
        raise ValueError(f"{data}: train split is shorter than one window of {seq_len + 1} tokens")
    vocab = lm.tokenizer.vocab_size
    id_dtype = np.uint16 if vocab <= 2 ** 16 else np.uint32
    settings = {"teacher": str(teacher), "backend": backend, "data": str(data), "seq_len": seq_len, "top_k": top_k,
                "temperature": temperature, "windows": windows, "id_dtype": np.dtype(id_dtype).name,
                "data_manifest_sha256": dataset.meta.get("manifest_sha256")}
    done = 0
    if (out / "progress.json").exists():
        prev = json.loads((out / "progress.json").read_text())
        if prev["settings"] != settings:
            raise ValueError(f"{out} holds an unfinished cache built with other settings ({prev['settings']}); "
                             "use another -o or delete it")
        done, elapsed = prev["windows_done"], prev["elapsed_s"]
        log(f"resuming the teacher cache at window {done:,} of {windows:,}")
        ids_arr, logp_arr = _cache_arrays(out, windows * seq_len, top_k, id_dtype, "r+")
    else:
        out.mkdir(parents=True, exist_ok=True)
        elapsed = 0.0
        ids_arr, logp_arr = _cache_arrays(out, windows * seq_len, top_k, id_dtype, "w+")
    bar = tqdm(total=windows * seq_len, initial=done * seq_len, unit="tok", unit_scale=True, disable=not progress,
               desc="teacher top-k")
    t0 = time.perf_counter() - elapsed
    try:
        while done < windows:
            rows = range(done, min(windows, done + batch_size))
            batch = torch.from_numpy(np.stack([dataset.train[w * seq_len:(w + 1) * seq_len + 1] for w in rows])
                                     .astype(np.int64))
            targets = teacher_logprobs(lm, batch, top_k, temperature)
            lo, hi = rows[0] * seq_len, (rows[-1] + 1) * seq_len
            ids_arr[lo:hi] = targets.ids.reshape(-1, top_k).cpu().numpy().astype(id_dtype)
            logp_arr[lo:hi] = targets.logp.reshape(-1, top_k).cpu().numpy().astype(np.float16)
            done = rows[-1] + 1
            bar.update(len(rows) * seq_len)
            ids_arr.flush()  # a teacher batch takes seconds; recording progress after each one costs nothing
            logp_arr.flush()
            atomic_write_json(out / "progress.json", {"settings": settings, "windows_done": done,
                                                      "elapsed_s": time.perf_counter() - t0})
    finally:
        bar.close()
        ids_arr.flush()
        logp_arr.flush()
    seconds = time.perf_counter() - t0
    tokens = windows * seq_len
    meta = {"format": CACHE_FORMAT, **settings, "tokens": tokens,
            "bytes_per_token": top_k * (np.dtype(id_dtype).itemsize + 2),
            "teacher_tokens_per_s": round(tokens / max(seconds, 1e-9), 1), "seconds": round(seconds, 1)}
    atomic_write_json(out / "meta.json", meta)
    (out / "progress.json").unlink(missing_ok=True)
    log(f"teacher cache: {tokens:,} positions x top-{top_k} ({meta['bytes_per_token']} bytes/token, "
        f"{(ids_arr.nbytes + logp_arr.nbytes) / 2**20:.1f} MiB) in {seconds:.0f} s "
        f"({meta['teacher_tokens_per_s']:,.0f} teacher tokens/s) -> {out}")
    return meta


class CachedTeacher:
    """Top-k targets read from a cache: no teacher model in memory, no teacher compute."""

    def __init__(self, path: str | Path, cfg: DistillConfig, seq_len: int):
        path = Path(path)
        if not (path / "meta.json").exists():
            hint = " (its build was interrupted: run `slm teacher-cache` again to finish it)" \
                if (path / "progress.json").exists() else ""
            raise FileNotFoundError(f"{path}/meta.json: not a complete teacher cache{hint}")
        self.meta = json.loads((path / "meta.json").read_text())
        if self.meta.get("format") != CACHE_FORMAT:
            raise ValueError(f"{path}/meta.json: not a teacher top-k cache (format {self.meta.get('format')!r})")
        if self.meta["seq_len"] != seq_len:
            raise ValueError(f"{path} was built with seq_len {self.meta['seq_len']}; train with --seq-len "
                             f"{self.meta['seq_len']} (positions are cached per window)")
        if abs(self.meta["temperature"] - cfg.temperature) > 1e-9:
            raise ValueError(f"{path} holds the teacher at temperature {self.meta['temperature']}; distil with "
                             f"that temperature or build another cache")
        self.seq_len = seq_len
        self.windows = self.meta["windows"]
        self.ids, self.logp = _cache_arrays(path, self.windows * seq_len, self.meta["top_k"],
                                            np.dtype(self.meta["id_dtype"]), "r")

    def targets(self, windows: list[int]) -> TeacherTargets:
        L = self.seq_len
        ids = np.stack([self.ids[w * L:(w + 1) * L] for w in windows]).astype(np.int64)
        logp = np.stack([self.logp[w * L:(w + 1) * L] for w in windows]).astype(np.float32)
        return TeacherTargets(logp=torch.from_numpy(logp), ids=torch.from_numpy(ids))


# ---- on-policy samples ---------------------------------------------------------------------------------

@torch.no_grad()
def sample_continuations(model, windows: torch.Tensor, n_new: int, generator: torch.Generator,
                         temperature: float = 1.0) -> torch.Tensor:
    """Keep the first T + 1 - n_new tokens of each (B, T + 1) window and let the student sample the rest."""
    from slmkit.model import KVCache
    was_training = model.training
    model.eval()
    B, width = windows.shape
    n_new = min(n_new, width - 1)
    device = next(model.parameters()).device
    seqs = windows.clone().to(device)
    cache = KVCache(model.cfg, B, width, device=device, dtype=next(model.parameters()).dtype)
    logits = model(seqs[:, :width - n_new], cache=cache)[:, -1]
    for pos in range(width - n_new, width):
        probs = torch.softmax(logits.float() / temperature, dim=-1)
        seqs[:, pos] = torch.multinomial(probs.cpu(), 1, generator=generator)[:, 0].to(device)
        if pos < width - 1:
            logits = model(seqs[:, pos:pos + 1], cache=cache)[:, -1]
    model.train(was_training)
    return seqs


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


# ---- a student made from the teacher -------------------------------------------------------------------

def student_from_teacher(teacher: str, out: str | Path, layer_step: int = 2) -> Path:
    """A smaller model directory from the teacher (DistilBERT-style): its tokenizer, embeddings, final norm and
    LM head, and every `layer_step`-th block (0, step, 2 step, ...). Width stays the teacher's."""
    from slmkit.checkpoint import load_any, read_provenance, save_model_dir
    from slmkit.hub import resolve_model
    from slmkit.model import Transformer
    if layer_step < 1:
        raise ValueError(f"layer_step must be >= 1, got {layer_step}")
    ref = resolve_model(teacher)
    model, tokenizer = load_any(ref.location)
    keep = list(range(0, model.cfg.n_layers, layer_step))
    student = Transformer(dataclasses.replace(model.cfg, n_layers=len(keep)))
    teacher_state = model.state_dict()
    state = {k: v for k, v in teacher_state.items() if not k.startswith("layers.")}
    for new, old in enumerate(keep):
        prefix = f"layers.{old}."
        state.update({f"layers.{new}." + k[len(prefix):]: v for k, v in teacher_state.items()
                      if k.startswith(prefix)})
    student.load_state_dict(state)
    provenance = {"student_from_teacher": {"teacher": str(teacher), "layers_kept": keep,
                                           "teacher_layers": model.cfg.n_layers},
                  "instruction_tuned": bool(read_provenance(ref.location).get("instruction_tuned", False))
                  if ref.kind == "dir" else False}
    return save_model_dir(student, out, tokenizer=tokenizer, provenance=provenance)
