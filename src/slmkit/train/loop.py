"""The one training loop: AdamW or Muon (optim.py), warmup + cosine or warmup-stable-decay, accumulation,
clipping, bf16 autocast, compile, DDP, budgets, periodic validation, checkpoints and exact resume.

A run directory looks like:

    RUN/checkpoint/      latest checkpoint: a model directory + optimizer.safetensors + trainer_state.json
    RUN/model/           the final model directory (what `slm generate RUN` loads; with LoRA, merged)
    RUN/adapter/         with LoRA: the adapter alone, in Hugging Face PEFT's format (see lora.py)
    RUN/metrics.jsonl    one JSON object per logged step / validation
    RUN/loss.png         loss curve
    RUN/train_config.json

Run it under `torchrun --nproc_per_node N` for data parallelism; the global batch
(batch_size × grad_accum × world_size) is split so N processes see what one process would.
Checkpoints are checkpoint.py, metrics and the progress line metrics.py, the processes distributed.py.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from slmkit.data.tokens import TokenDataset, dataset_tokenizer
from slmkit.distill.kd import DistillConfig, Distiller
from slmkit.eval.perplexity import bits_per_byte
from slmkit.files import atomic_write_json
from slmkit.formats.hf_dir import DTYPES, load_model_dir, read_provenance, save_model_dir
from slmkit.hub import sampling_defaults
from slmkit.model.config import ModelConfig, model_config
from slmkit.model.llama import Transformer
from slmkit.model.lora import LoRAConfig, add_lora, count_parameters, merged_copy, save_adapter
from slmkit.train import distributed
from slmkit.train.checkpoint import save_checkpoint, start_state
from slmkit.train.metrics import Progress, append_metrics, fmt_time, plot_losses, truncate_metrics
from slmkit.train.optim import OPTIMIZERS, make_optimizer
from slmkit.train.perf import autocast, matmul_peak_flops, resolve_precision

SCHEDULES = ("cosine", "wsd")


@dataclass
class TrainConfig:
    data: str
    out: str
    preset: str = "micro"
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

    def __post_init__(self):
        # train_config.json holds these two as plain dicts (and so does a run written before they were typed):
        # TrainConfig(**json.load(...)) gives the dataclasses back.
        if isinstance(self.lora, dict):
            self.lora = LoRAConfig(**self.lora)
        if isinstance(self.distill, dict):
            self.distill = DistillConfig(**self.distill)
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
        return load_model_dir(cfg.init_from)
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
    run = Path(cfg.out)
    data, tokenizer = open_training_data(cfg)

    torch.manual_seed(cfg.seed)
    model = build_model(cfg, data, tokenizer).to(device)
    if cfg.lora:
        add_lora(model.to(DTYPES[cfg.base_dtype]), cfg.lora)  # freezes the base; A and B are fp32
    trainable, total = count_parameters(model)
    if cfg.seq_len > model.cfg.max_seq_len:
        raise ValueError(f"seq_len {cfg.seq_len} exceeds the model's context of {model.cfg.max_seq_len}; "
                         f"use --seq-len {model.cfg.max_seq_len} or less")
    model.train()
    distiller = Distiller(cfg.distill, data, tokenizer, cfg.seq_len, device, seed=cfg.seed,
                          log=log if master else lambda *_: None) if cfg.distill else None
    opt = make_optimizer(model, cfg)
    state = start_state(run, model, opt, resume, master)
    if resume:
        log(f"resumed from {run}/checkpoint at step {state['step']} ({state['tokens']:,} tokens)")

    provenance = _provenance(cfg, data, precision, world.size)
    flops_per_token = model.cfg.flops_per_token(cfg.seq_len)
    metrics = run / "metrics.jsonl"
    if master:
        run.mkdir(parents=True, exist_ok=True)
        atomic_write_json(run / "train_config.json", provenance["train_config"])
        truncate_metrics(metrics, state["step"])
        log(f"model: {model.cfg.num_params():,} parameters ({model.num_params():,} tensors' elements), "
            f"{flops_per_token / 1e6:.1f} MFLOPs/token; device {device}, {precision}, world {world.size}, "
            f"{cfg.tokens_per_step(world.size):,} tokens/step")
        log(f"trainable: {trainable:,} of {total:,} parameters ({trainable / total:.2%})"
            + (f", LoRA r={cfg.lora.r} on {', '.join(cfg.lora.targets)}" if cfg.lora else ""))
    step_fn = world.wrap(torch.compile(model) if cfg.compile else model)

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
                                                       distiller, world, precision)
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
                    if master:
                        val = evaluate(model, data, cfg.seq_len, cfg.batch_size, device, precision,
                                       cfg.eval_tokens)
                        append_metrics(metrics, {"step": step, "tokens": state["tokens"], **val})
                        plot_losses(run)
                        progress.write(f"step {step}: val loss {val['val_loss']:.4f}, "
                                       f"{val['val_bpb']:.4f} bits/byte")
                    world.barrier()
                if world.any(stop.signal is not None):
                    if master:
                        progress.write(f"interrupted at step {step}: saving a checkpoint; continue with --resume")
                    break
                if cfg.save_every and step % cfg.save_every == 0 and not done:
                    if master:
                        state["elapsed"] = elapsed()
                        save_checkpoint(run, model, opt, tokenizer, state, provenance, cfg.lora, cfg.init_from)
                    world.barrier()
        finally:
            progress.close()
        interrupted = stop.signal is not None

    # ---- save: the last checkpoint, then (unless interrupted) the final validation and the model
    state["elapsed"] = elapsed()
    summary = {"run": str(run), "steps": state["step"], "tokens": state["tokens"], "elapsed_s": state["elapsed"],
               "preset": cfg.preset, "model_overrides": cfg.model_overrides, "precision": precision,
               "world_size": world.size, "parameters": model.cfg.num_params(), "trainable_parameters": trainable,
               "tokens_per_s": state["tokens"] / max(state["elapsed"], 1e-9), "interrupted": interrupted}
    if master:
        save_checkpoint(run, model, opt, tokenizer, state, provenance, cfg.lora, cfg.init_from)
        if not interrupted:
            final = evaluate(model, data, cfg.seq_len, cfg.batch_size, device, precision)
            append_metrics(metrics, {"step": state["step"], "tokens": state["tokens"], "final": True, **final})
            summary.update(final)
            provenance["metrics"] = {k: v for k, v in summary.items() if k != "run"}
            save_model_dir(merged_copy(model) if cfg.lora else model, run / "model", tokenizer=tokenizer,
                           provenance=provenance, sampling=sampling_defaults(cfg.init_from) if cfg.init_from else None)
            summary["model_dir"] = str(run / "model")
            if cfg.lora:
                summary["adapter_dir"] = str(save_adapter(model, cfg.lora, run / "adapter", cfg.init_from,
                                                          provenance))
            log(f"done: {state['step']} steps, {state['tokens']:,} tokens in {fmt_time(state['elapsed'])}; "
                f"val loss {final['val_loss']:.4f}, {final['val_bpb']:.4f} bits/byte -> {run / 'model'}")
        plot_losses(run)
    world.barrier()
    world.close()
    return summary


def _step(cfg: TrainConfig, step: int, lr: float, model: Transformer, step_fn, opt, data, distiller, world,
          precision: str) -> tuple[float, dict, int, float | None]:
    """One optimizer step over grad_accum micro-batches: (mean loss across ranks, distillation parts, positions
    computed on all ranks, gradient norm before clipping)."""
    for g in opt.param_groups:
        g["lr"] = lr
    device = world.device
    loss_sum = torch.zeros((), device=device)
    parts: dict[str, list] = {"kd": [], "ce": []}
    tokens = 0  # positions computed: fine-tuning batches are only as wide as their longest example
    for micro in range(cfg.grad_accum):
        # Global sample index: identical data for any split of the batch across ranks/micro-steps.
        first = (step * cfg.grad_accum * world.size + micro * world.size + world.rank) * cfg.batch_size
        x, y = data.train_batch(first, cfg.batch_size, cfg.seq_len, cfg.seed)
        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        tokens += x.numel() * world.size
        # DDP averages gradients on the last micro-batch only
        sync = world.size == 1 or micro == cfg.grad_accum - 1
        ctx = step_fn.no_sync() if not sync else contextlib.nullcontext()
        with ctx, autocast(device, precision):
            if distiller:
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
    return loss_sum.item(), parts, tokens, float(grad_norm) if grad_norm is not None else None


def _provenance(cfg: TrainConfig, data, precision: str, world_size: int) -> dict:
    """What the run's model directories record about how they were made (slmkit.json)."""
    provenance = {"data": {"path": str(cfg.data), "manifest_sha256": data.meta.get("manifest_sha256"),
                           "tokenizer_sha256": data.meta.get("tokenizer_sha256")},
                  "train_config": dataclasses.asdict(cfg), "precision": precision, "world_size": world_size}
    if data.meta.get("format") == "slmkit-sft":  # a chat fine-tune makes an assistant; else keep what it was
        provenance["instruction_tuned"] = bool(data.meta["chat"] or
                                               read_provenance(cfg.init_from).get("instruction_tuned", False))
    return provenance
