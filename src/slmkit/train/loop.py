"""The one training loop: AdamW or Muon (optim.py), warmup + cosine or warmup-stable-decay, accumulation,
clipping, bf16 autocast, compile, DDP, budgets, periodic validation, checkpoints and exact resume.

A run directory looks like:

    RUN/checkpoint/      latest checkpoint: a model directory + optimizer.safetensors + trainer_state.json
    RUN/model/           the final model directory (what `slm generate RUN` loads; with LoRA, merged)
    RUN/adapter/         with LoRA: the adapter alone, in Hugging Face PEFT's format (see lora.py)
    RUN/metrics.jsonl    one JSON object per logged step / validation
    RUN/loss.png         loss curve
    RUN/train_config.json

objective "clm" (the default) trains a causal decoder (model/llama.py); "mlm" trains a bidirectional encoder
(model/encoder.py) with RoBERTa's masked-LM recipe (train/mlm.py), and RUN/model and RUN/checkpoint are then
transformers RobertaForMaskedLM directories (formats/encoder_dir.py); "ul2" continues a decoder (init_from) on
UL2's mixture of denoisers (train/ul2.py), its tokenizer and embedding grown by the mode and sentinel tokens, and
validates it left to right as "clm" does. Budgets, schedules, optimizers,
checkpoints, exact resume and DDP are the same for both.

Run it under `torchrun --nproc_per_node N` for data parallelism; the global batch
(batch_size × grad_accum × world_size) is split so N processes see what one process would.
Checkpoints are checkpoint.py, metrics and the progress line metrics.py, the processes distributed.py.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace

import torch

from slmkit.data.tokens import TokenDataset, dataset_tokenizer
from slmkit.distill.kd import DistillConfig, Distiller
from slmkit.eval.perplexity import bits_per_byte
from slmkit.files import atomic_write_json
from slmkit.formats.encoder_dir import save_encoder_dir
from slmkit.formats.hf_dir import DTYPES, load_model_dir, read_provenance, save_model_dir
from slmkit.hub import sampling_defaults
from slmkit.model.config import ModelConfig, model_config
from slmkit.model.llama import Transformer
from slmkit.model.lora import LoRAConfig, add_lora, count_parameters, merged_copy, save_adapter
from slmkit.train import distributed, mlm, ul2
from slmkit.train.checkpoint import save_checkpoint, start_state
from slmkit.train.metrics import Progress, append_metrics, fmt_time, plot_losses, truncate_metrics
from slmkit.train.optim import OPTIMIZERS, make_optimizer
from slmkit.train.perf import autocast, matmul_peak_flops, resolve_precision

SCHEDULES = ("cosine", "wsd")


@dataclass
class TrainConfig:
    data: str
    out: str
    preset: str | None = None  # None: "micro" (clm) or "enc-tiny" (mlm)
    objective: str = "clm"  # clm: causal LM (a decoder) | mlm: RoBERTa's masked LM (an encoder; train/mlm.py)
    # | ul2: UL2R, a decoder continued on the mixture of denoisers (train/ul2.py)
    ul2_mixture: str | None = None  # ul2: mode weights, e.g. "R=1,X=1,S=1,C=1" (None: ul2.DEFAULT_MIXTURE)
    model_overrides: dict = field(default_factory=dict)
    init_from: str | None = None  # start from an existing model directory instead of random weights
    lora: LoRAConfig | None = None  # train low-rank adapters on the frozen init_from model
    base_dtype: str = "float32"  # with LoRA: the frozen base's dtype (bfloat16 halves its memory)
    distill: DistillConfig | None = None  # learn from a teacher's distributions as well (distill/kd.py)
    seq_len: int = 256
    batch_size: int = 16  # sequences per micro-batch per process
    grad_accum: int = 1
    lr: float = 3e-3
    min_lr_ratio: float = 0.1  # the schedule decays to lr * min_lr_ratio
    warmup_steps: int = 100
    optimizer: str = "adamw"  # adamw | muon (hidden matrices; AdamW for the rest: train/optim.py)
    schedule: str = "cosine"  # after warmup: cosine, or wsd (warmup-stable-decay: flat, then a linear decay)
    decay_frac: float = 0.2  # wsd: the last fraction of the budget that decays
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    grad_clip: float = 1.0
    max_steps: int | None = None
    max_tokens: int | None = None
    max_minutes: float | None = None
    eval_every: int = 250  # steps; 0 disables periodic validation (a final one always runs)
    eval_tokens: int = 65536  # validation tokens per periodic check (the final check uses all of val)
    save_every: int = 500  # steps between checkpoints (one is always written at the end / on Ctrl-C)
    log_every: int = 10
    precision: str = "auto"  # auto | bf16 | fp32
    compile: bool = False
    loss_chunk: int = 0  # >0: chunked cross-entropy over this many positions
    seed: int = 0
    device: str = "auto"
    threads: int | None = None
    progress: bool = True
    parallel: str = "ddp"  # under torchrun: ddp (whole model per rank) | fsdp (sharded: train/distributed.py)

    def __post_init__(self):
        # train_config.json holds these two as plain dicts (and so does a run written before they were typed):
        # TrainConfig(**json.load(...)) gives the dataclasses back.
        if isinstance(self.lora, dict):
            self.lora = LoRAConfig(**self.lora)
        if isinstance(self.distill, dict):
            self.distill = DistillConfig(**self.distill)
        if self.objective not in mlm.OBJECTIVES:
            raise ValueError(f"unknown objective {self.objective!r}; choose one of {', '.join(mlm.OBJECTIVES)}")
        if self.objective == "ul2":
            ul2.check_config(self)
        elif self.ul2_mixture is not None:
            raise ValueError("ul2_mixture is the mixture of --objective ul2")
        if self.preset is None:
            self.preset = "enc-tiny" if self.objective == "mlm" else "micro"
        if not self.init_from:
            mlm.check_preset(self.preset, self.objective)
        if self.objective == "mlm":
            unsupported = [name for name, on in (("lora", self.lora), ("distill", self.distill),
                                                 ("loss_chunk", self.loss_chunk)) if on]
            if unsupported:
                raise ValueError(f"objective mlm pretrains an encoder; {unsupported[0]} is for causal LMs "
                                 "(--objective clm)")
        self._check_numbers()
        if not (self.max_steps or self.max_tokens or self.max_minutes):
            raise ValueError("set a budget: max_steps, max_tokens and/or max_minutes")
        if self.lora is not None and not self.init_from:
            raise ValueError("LoRA adapts an existing model: set init_from")
        if self.base_dtype not in ("float32", "bfloat16"):
            raise ValueError(f"base_dtype must be float32 or bfloat16, got {self.base_dtype!r}")
        if self.optimizer not in OPTIMIZERS:
            raise ValueError(f"unknown optimizer {self.optimizer!r}; choose one of {', '.join(OPTIMIZERS)}")
        if self.optimizer == "muon" and self.lora is not None:
            raise ValueError("muon orthogonalises whole weight matrices; LoRA's low-rank factors train with adamw")
        if self.schedule not in SCHEDULES:
            raise ValueError(f"unknown schedule {self.schedule!r}; choose one of {', '.join(SCHEDULES)}")
        if not 0 < self.decay_frac <= 1:
            raise ValueError(f"decay_frac must be in (0, 1], got {self.decay_frac}")
        if self.base_dtype != "float32" and self.lora is None:
            raise ValueError("base_dtype is the dtype of LoRA's frozen base; full fine-tuning trains in float32")
        if self.parallel not in distributed.PARALLEL:
            raise ValueError(f"unknown parallel {self.parallel!r}; choose one of {', '.join(distributed.PARALLEL)}")
        if self.parallel == "fsdp":
            # what sharding is tested with; Muon orthogonalises whole matrices, which a shard is not
            unsupported = [f"--{name}" for name, on in (("objective " + self.objective, self.objective != "clm"),
                                                        ("optimizer muon", self.optimizer == "muon"),
                                                        ("lora-rank", self.lora), ("teacher", self.distill)) if on]
            if unsupported:
                raise ValueError(f"--parallel fsdp trains a causal decoder with adamw; {unsupported[0]} is not "
                                 "sharded (use --parallel ddp)")

    def _check_numbers(self) -> None:
        """Reject what would divide by zero, never end (a budget that cannot be reached) or make no sense."""
        at_least = {"seq_len": 1, "batch_size": 1, "grad_accum": 1, "log_every": 1, "eval_every": 0,
                    "eval_tokens": 1, "save_every": 0, "warmup_steps": 0, "loss_chunk": 0}
        for name, low in at_least.items():
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                what = "a positive integer" if low else "an integer >= 0 (0 = off)"
                raise ValueError(f"{name}={value!r}: must be {what}")
        for name in ("max_steps", "max_tokens", "max_minutes", "threads"):  # 0 / None: unset
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not value >= 0):
                raise ValueError(f"{name}={value!r}: must be positive (or unset)")
        ranges = {"lr": (0, None), "min_lr_ratio": (0, 1), "weight_decay": (0, None), "beta1": (0, 1),
                  "beta2": (0, 1), "grad_clip": (0, None)}
        for name, (low, high) in ranges.items():
            value = getattr(self, name)
            ok = isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value) \
                and value >= low and (high is None or value <= high) and (name != "lr" or value > 0)
            if not ok:
                bounds = "positive" if name == "lr" else f"in [{low}, {high}]" if high is not None else ">= 0"
                raise ValueError(f"{name}={value!r}: must be {bounds}")

    def tokens_per_step(self, world_size: int = 1) -> int:
        return self.batch_size * self.grad_accum * world_size * self.seq_len


def lr_at(cfg: TrainConfig, step: int, progress: float) -> float:
    """Linear warmup over warmup_steps, then from lr down to lr*min_lr_ratio over the budget's progress: a cosine,
    or (wsd) flat until the last decay_frac of the budget and linear from there (Hägele et al. 2024: as good as
    cosine at the end, and a run can be extended from any point of its flat part)."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    p = min(1.0, max(0.0, progress))
    if cfg.schedule == "wsd":
        decayed = max(0.0, p - (1 - cfg.decay_frac)) / cfg.decay_frac
        return cfg.lr * (1 - (1 - cfg.min_lr_ratio) * decayed)
    return cfg.lr * (cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * p)))


def budget_progress(cfg: TrainConfig, step: int, tokens: int, elapsed: float) -> float:
    """Fraction of the budget used: the most advanced of the step, token and time budgets."""
    parts = [0.0]
    if cfg.max_steps:
        parts.append(step / cfg.max_steps)
    if cfg.max_tokens:
        parts.append(tokens / cfg.max_tokens)
    if cfg.max_minutes:
        parts.append(elapsed / (cfg.max_minutes * 60))
    return max(parts)


# ---- validation ----------------------------------------------------------------------------------------

@torch.no_grad()
def evaluate(model: Transformer, data: TokenDataset, seq_len: int, batch_size: int, device, precision: str,
             max_tokens: int | None = None) -> dict:
    """Mean validation loss (nats/token) and bits per byte of the text those tokens encode."""
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    for x, y in data.val_batches(batch_size, seq_len, max_tokens):
        with autocast(device, precision):
            loss = model(x.to(device), y.to(device))
        targets = int((y != -100).sum())  # fine-tuning rows have padding and prompt positions
        total += loss.item() * targets
        count += targets
    model.train(was_training)
    if count == 0:
        return {"val_loss": float("nan"), "val_bpb": float("nan"), "val_tokens": 0}
    loss = total / count
    # mean nats per token over bytes per token = total nats over total bytes
    return {"val_loss": loss, "val_bpb": bits_per_byte(loss, data.bytes_per_token("val")), "val_tokens": count}



# ---- the loop ------------------------------------------------------------------------------------------

def build_model(cfg: TrainConfig, data: TokenDataset, tokenizer) -> Transformer:
    if cfg.init_from:
        return load_model_dir(cfg.init_from, overrides=cfg.model_overrides)
    overrides = {"vocab_size": data.vocab_size, "max_seq_len": max(cfg.seq_len, 256), **cfg.model_overrides}
    if tokenizer is not None:
        overrides.setdefault("bos_token_id", tokenizer.bos_id)
        overrides.setdefault("eos_token_id", tokenizer.eos_id)
        overrides.setdefault("pad_token_id", tokenizer.pad_id)
    mcfg: ModelConfig = model_config(cfg.preset, **overrides)
    if mcfg.vocab_size < data.vocab_size:
        raise ValueError(f"model vocab_size {mcfg.vocab_size} < dataset vocab_size {data.vocab_size}")
    return Transformer(mcfg)


def open_training_data(cfg: TrainConfig):
    """(dataset, tokenizer): a token dataset directory (pretraining), or a JSONL file of chat / prompt-completion
    records (supervised fine-tuning of `init_from`, with the loss on the answers only; see data/sft.py)."""
    path = Path(cfg.data)
    if path.suffix == ".jsonl":
        if cfg.objective == "mlm":
            raise ValueError(f"{path}: masked-LM pretraining reads a token dataset (from `slm data prepare`), "
                             "not JSONL records")
        if not cfg.init_from:
            raise ValueError(f"{path}: fine-tuning on JSONL records needs the model to start from (init_from)")
        from slmkit.data.sft import SFTDataset
        from slmkit.tokenizer import load_tokenizer
        tokenizer = load_tokenizer(cfg.init_from)
        return SFTDataset(path, tokenizer, seed=cfg.seed), tokenizer
    return TokenDataset(path), dataset_tokenizer(path)


def train(cfg: TrainConfig, resume: bool = False, log=print) -> dict:
    """Train until the budget is spent or Ctrl-C; returns a summary (final validation, throughput, paths)."""
    # ---- set-up: processes, data, model, optimizer, where to start
    world = distributed.join(cfg.device)
    device, master = world.device, world.master
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    precision = resolve_precision(cfg.precision, device)
    if cfg.precision == "auto" and world.any(precision == "fp32"):  # each rank measured its own: one choice for all
        precision = "fp32"
    run = Path(cfg.out)
    data, tokenizer = open_training_data(cfg)
    # masked LM: the dataset's tokenizer + <mask>, saved with the encoder (train/mlm.py)
    vocab = mlm.mlm_vocab(data, tokenizer, cfg.init_from) if cfg.objective == "mlm" else None
    if vocab is not None:
        tokenizer = vocab.tokenizer

    torch.manual_seed(cfg.seed)
    denoise = None  # ul2: (the extended vocabulary, the mixture); the model grows by the sentinels (train/ul2.py)
    if cfg.objective == "ul2":
        model, ul2_vocab = ul2.continued_decoder(cfg.init_from, tokenizer, data, cfg.model_overrides)
        denoise, tokenizer = (ul2_vocab, ul2.parse_mixture(cfg.ul2_mixture)), ul2_vocab.tokenizer
        model = model.to(device)
        n_params, flops_per_token = model.cfg.num_params(), model.cfg.flops_per_token(cfg.seq_len)
    elif vocab is not None:
        model = (mlm.continued_encoder(cfg.init_from, cfg.model_overrides, vocab, cfg.seq_len) if cfg.init_from
                 else mlm.build_encoder(cfg.preset, cfg.model_overrides, vocab, cfg.seq_len)).to(device)
        n_params, flops_per_token = model.num_params(), mlm.flops_per_token(model.cfg, cfg.seq_len)
        if tokenizer is not None:  # transformers truncates at the positions the encoder has
            tokenizer.model_max_length = model.cfg.max_positions
    else:
        model = build_model(cfg, data, tokenizer).to(device)
        n_params, flops_per_token = model.cfg.num_params(), model.cfg.flops_per_token(cfg.seq_len)
    if cfg.lora:
        add_lora(model.to(DTYPES[cfg.base_dtype]), cfg.lora)  # freezes the base; A and B are fp32
    trainable, total = count_parameters(model)
    if vocab is None and cfg.seq_len > model.cfg.max_seq_len:
        raise ValueError(f"seq_len {cfg.seq_len} exceeds the model's context of {model.cfg.max_seq_len}; "
                         f"use --seq-len {model.cfg.max_seq_len} or less"
                         + (", or extend it with --set max_seq_len=N" if cfg.init_from else ""))
    model.train()
    if cfg.parallel == "fsdp" and world.size > 1:
        world.shard(model)  # before the optimizer, which must hold the shards
    distiller = Distiller(cfg.distill, data, tokenizer, cfg.seq_len, device, seed=cfg.seed,
                          log=log if master else lambda *_: None) if cfg.distill else None
    opt = make_optimizer(model, cfg)
    provenance = _provenance(cfg, data, precision, world.size)
    state = start_state(run, model, opt, resume, master, provenance, sharded=world.sharded)
    if resume:
        log(f"resumed from {run}/checkpoint at step {state['step']} ({state['tokens']:,} tokens)")

    metrics = run / "metrics.jsonl"
    if master:
        run.mkdir(parents=True, exist_ok=True)
        atomic_write_json(run / "train_config.json", provenance["train_config"])
        truncate_metrics(metrics, state["step"])
        kind = f"encoder ({model.cfg.flavour}, masked LM), " if vocab is not None else ""
        if denoise:
            kind = "UL2R mixture " + ", ".join(f"{m} {w:.0%}" for m, w in denoise[1].items() if w) + "; "
        log(f"model: {kind}{n_params:,} parameters ({model.num_params():,} tensors' elements), "
            f"{flops_per_token / 1e6:.1f} MFLOPs/token; device {device}, {precision}, world {world.size}, "
            f"{cfg.tokens_per_step(world.size):,} tokens/step")
        log(f"trainable: {trainable:,} of {total:,} parameters ({trainable / total:.2%})"
            + (f", LoRA r={cfg.lora.r} on {', '.join(cfg.lora.targets)}" if cfg.lora else ""))
    stepped = mlm.MaskedLM(model) if vocab is not None else model  # what the steps call: the loss inside forward
    step_fn = world.wrap(torch.compile(stepped) if cfg.compile else stepped)

    def validate(max_tokens: int | None = None) -> dict:
        if vocab is not None:
            return mlm.evaluate(model, data, vocab, cfg.seq_len, cfg.batch_size, device, precision, max_tokens)
        return evaluate(model, data, cfg.seq_len, cfg.batch_size, device, precision, max_tokens)

    def whole() -> tuple:
        """The model and optimizer as one process holds them (gathered from every rank when sharded: all ranks
        call this; the others get None)."""
        if not world.sharded:
            return model, opt
        weights, optimizer_state = distributed.full_state(model, opt)
        if not master:
            return None, None
        plain = Transformer(model.cfg)
        plain.load_state_dict(weights)
        return plain, SimpleNamespace(state_dict=lambda: optimizer_state)

    def checkpoint():
        """Save the checkpoint; the model saved (None on ranks other than the master)."""
        saved_model, saved_opt = whole()
        if master:
            save_checkpoint(run, saved_model, saved_opt, tokenizer, state, provenance, cfg.lora, cfg.init_from)
        return saved_model

    def save_final(provenance: dict, plain) -> None:
        if vocab is not None:
            save_encoder_dir(model, run / "model", tokenizer=tokenizer, provenance=provenance)
        else:
            save_model_dir(merged_copy(plain) if cfg.lora else plain, run / "model", tokenizer=tokenizer,
                           provenance=provenance,
                           sampling=sampling_defaults(cfg.init_from) if cfg.init_from else None)

    # ---- steps, until the budget is spent (or Ctrl-C, which saves a checkpoint to resume from)
    with distributed.StopSignals(enabled=master) as stop:
        progress = Progress(master and cfg.progress, flops_per_token,
                            matmul_peak_flops(device.type, precision) if master else 0.0)
        t_start = time.perf_counter() - state["elapsed"]

        def elapsed() -> float:
            return time.perf_counter() - t_start

        try:
            while budget_progress(cfg, state["step"], state["tokens"], elapsed()) < 1.0:
                lr = lr_at(cfg, state["step"], budget_progress(cfg, state["step"], state["tokens"], elapsed()))
                loss, parts, tokens, grad_norm = _step(cfg, state["step"], lr, model, step_fn, opt, data,
                                                       distiller, world, precision, vocab, denoise)
                state["step"] += 1
                state["tokens"] += tokens
                progress.count(tokens)
                step = state["step"]
                spent = budget_progress(cfg, step, state["tokens"], elapsed())
                done = spent >= 1.0

                if master and (step % cfg.log_every == 0 or step == 1 or done):
                    tok_s, mfu = progress.throughput()
                    rec = {"step": step, "tokens": state["tokens"], "loss": round(loss, 6), "lr": lr,
                           "grad_norm": round(grad_norm, 4) if grad_norm is not None else None,
                           "tok_s": round(tok_s, 1), "mfu": round(mfu, 4), "elapsed": round(elapsed(), 2),
                           **{k: round(sum(v) / len(v), 6) for k, v in parts.items() if v}}
                    append_metrics(metrics, rec)
                    progress.show(rec, spent, elapsed())
                if cfg.eval_every and step % cfg.eval_every == 0 and not done:
                    val = validate(cfg.eval_tokens) if master or world.sharded else None  # sharded: all compute
                    if master:
                        append_metrics(metrics, {"step": step, "tokens": state["tokens"], **val})
                        plot_losses(run)
                        progress.write(f"step {step}: val loss {val['val_loss']:.4f}, "
                                       f"{val['val_bpb']:.4f} bits/byte{_accuracy(val)}")
                    world.barrier()
                if world.any(stop.signal is not None):
                    if master:
                        progress.write(f"interrupted at step {step}: saving a checkpoint; continue with --resume")
                    break
                if cfg.save_every and step % cfg.save_every == 0 and not done:
                    state["elapsed"] = elapsed()
                    checkpoint()
                    world.barrier()
        finally:
            progress.close()
        interrupted = stop.signal is not None

    # ---- save: the last checkpoint, then (unless interrupted) the final validation and the model
    state["elapsed"] = elapsed()
    summary = {"run": str(run), "steps": state["step"], "tokens": state["tokens"], "elapsed_s": state["elapsed"],
               "preset": cfg.preset, "model_overrides": cfg.model_overrides, "precision": precision,
               "objective": cfg.objective, "optimizer": cfg.optimizer, "schedule": cfg.schedule,
               "world_size": world.size, "parameters": n_params,
               "trainable_parameters": trainable,
               "tokens_per_s": state["tokens"] / max(state["elapsed"], 1e-9), "interrupted": interrupted}
    saved = checkpoint()
    if not interrupted and world.sharded and not master:
        validate()  # a sharded forward pass needs every rank
    if master:
        if not interrupted:
            final = validate()
            append_metrics(metrics, {"step": state["step"], "tokens": state["tokens"], "final": True, **final})
            summary.update(final)
            provenance["metrics"] = {k: v for k, v in summary.items() if k != "run"}
            save_final(provenance, saved)
            summary["model_dir"] = str(run / "model")
            if cfg.lora:
                summary["adapter_dir"] = str(save_adapter(model, cfg.lora, run / "adapter", cfg.init_from,
                                                          provenance))
            log(f"done: {state['step']} steps, {state['tokens']:,} tokens in {fmt_time(state['elapsed'])}; "
                f"val loss {final['val_loss']:.4f}, {final['val_bpb']:.4f} bits/byte{_accuracy(final)} "
                f"-> {run / 'model'}")
        plot_losses(run)
    world.barrier()
    world.close()
    return summary


def _accuracy(val: dict) -> str:
    return f", masked-token accuracy {val['val_masked_acc']:.2%}" if "val_masked_acc" in val else ""


def _step(cfg: TrainConfig, step: int, lr: float, model: Transformer, step_fn, opt, data, distiller, world,
          precision: str, vocab: mlm.MLMVocab | None = None,
          denoise: tuple | None = None) -> tuple[float, dict, int, float | None]:
    """One optimizer step over grad_accum micro-batches: (mean loss across ranks, distillation parts or the
    masked-token accuracy, positions computed on all ranks, gradient norm before clipping)."""
    for g in opt.param_groups:
        g["lr"] = lr
    device = world.device
    loss_sum = torch.zeros((), device=device)
    parts: dict[str, list] = {"kd": [], "ce": []}
    right, masked = torch.zeros((), device=device), torch.zeros((), device=device)
    tokens = 0  # positions computed: fine-tuning batches are only as wide as their longest example
    for micro in range(cfg.grad_accum):
        # Global sample index: identical data for any split of the batch across ranks/micro-steps.
        first = (step * cfg.grad_accum * world.size + micro * world.size + world.rank) * cfg.batch_size
        if vocab is not None:  # inputs with 15% of tokens masked, labels -100 except there (train/mlm.py)
            x, y = mlm.train_batch(data, first, cfg.batch_size, cfg.seq_len, cfg.seed, vocab)
        elif denoise:  # each sequence one denoiser's: mode, corrupted input, targets; labels on the targets only
            x, y = ul2.train_batch(data, first, cfg.batch_size, cfg.seq_len, cfg.seed, *denoise)
        else:
            x, y = data.train_batch(first, cfg.batch_size, cfg.seq_len, cfg.seed)
        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        tokens += x.numel() * world.size
        # DDP and FSDP average gradients on the last micro-batch only
        sync = world.size == 1 or micro == cfg.grad_accum - 1
        if world.sharded:
            model.set_requires_gradient_sync(sync)
        ctx = step_fn.no_sync() if not sync and not world.sharded else contextlib.nullcontext()
        with ctx, autocast(device, precision):
            if vocab is not None:
                loss, n_right, n_masked = step_fn(x, y)
                right += n_right.detach()
                masked += n_masked
                loss = loss / cfg.grad_accum
            elif distiller:
                windows = data.train_windows(first, cfg.batch_size, cfg.seq_len, cfg.seed) \
                    if distiller.cache else None
                loss, micro_parts = distiller.loss(step_fn, model, x, y, windows, first)
                for k, v in micro_parts.items():
                    if v is not None:
                        parts[k].append(v.item())
                loss = loss / cfg.grad_accum
            else:
                loss = step_fn(x, y, loss_chunk=cfg.loss_chunk) / cfg.grad_accum
        with ctx:
            loss.backward()
        loss_sum += loss.detach()
    grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip) if cfg.grad_clip else None
    opt.step()
    opt.zero_grad(set_to_none=True)
    world.average(loss_sum)
    if vocab is not None:
        world.average(right)
        world.average(masked)
        parts = {"masked_acc": [right.item() / max(masked.item(), 1)]}
    return loss_sum.item(), parts, tokens, float(grad_norm) if grad_norm is not None else None


def _fingerprint(data) -> str:
    """What identifies the training data, so resume can refuse other data: its manifest hash where `slm data
    prepare` wrote one, and in any case the format, vocabulary and split sizes."""
    meta = data.meta
    key = {k: meta.get(k) for k in ("format", "vocab_size", "splits", "manifest_sha256", "tokenizer_sha256")}
    return hashlib.sha256(json.dumps(key, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _provenance(cfg: TrainConfig, data, precision: str, world_size: int) -> dict:
    """What the run's model directories record about how they were made (slmkit.json)."""
    provenance = {"data": {"path": str(cfg.data), "manifest_sha256": data.meta.get("manifest_sha256"),
                           "tokenizer_sha256": data.meta.get("tokenizer_sha256"), "fingerprint": _fingerprint(data)},
                  "train_config": dataclasses.asdict(cfg), "precision": precision, "world_size": world_size}
    if data.meta.get("format") == "slmkit-sft":  # a chat fine-tune makes an assistant; else keep what it was
        provenance["instruction_tuned"] = bool(data.meta["chat"] or
                                               read_provenance(cfg.init_from).get("instruction_tuned", False))
    return provenance
