"""The one training loop: AdamW, warmup + cosine, accumulation, clipping, bf16 autocast, compile, DDP,
budgets, periodic validation, atomic checkpoints and exact resume.

A run directory looks like:

    RUN/checkpoint/      latest checkpoint: a model directory + optimizer.safetensors + trainer_state.json
    RUN/model/           the final model directory (what `slm generate RUN` loads; with LoRA, merged)
    RUN/adapter/         with LoRA: the adapter alone, in Hugging Face PEFT's format (see lora.py)
    RUN/metrics.jsonl    one JSON object per logged step / validation
    RUN/loss.png         loss curve
    RUN/train_config.json

Run it under `torchrun --nproc_per_node N` for data parallelism; the global batch
(batch_size × grad_accum × world_size) is split so N processes see what one process would.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import signal
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.distributed as dist
from safetensors.torch import load_file, save_file
from tqdm import tqdm

from slmkit.data.tokens import TokenDataset, dataset_tokenizer
from slmkit.distill.kd import DistillConfig, Distiller
from slmkit.eval.perplexity import bits_per_byte
from slmkit.files import atomic_dir, atomic_write_json, atomic_write_text
from slmkit.formats.hf_dir import DTYPES, load_model_dir, save_model_dir
from slmkit.model.config import ModelConfig, model_config
from slmkit.model.llama import Transformer
from slmkit.model.lora import LoRAConfig, add_lora, count_parameters, load_lora_weights, merged_copy, save_adapter
from slmkit.train.perf import autocast, matmul_peak_flops, pick_device, resolve_precision


@dataclass
class TrainConfig:
    data: str
    out: str
    preset: str = "micro"
    model_overrides: dict = field(default_factory=dict)
    init_from: str | None = None  # start from an existing model directory instead of random weights
    lora: dict | None = None  # LoRAConfig fields: train low-rank adapters on the frozen init_from model
    base_dtype: str = "float32"  # with LoRA: the frozen base's dtype (bfloat16 halves its memory)
    distill: dict | None = None  # DistillConfig fields: learn from a teacher's distributions as well (distill.py)
    seq_len: int = 256
    batch_size: int = 16  # sequences per micro-batch per process
    grad_accum: int = 1
    lr: float = 3e-3
    min_lr_ratio: float = 0.1  # cosine decays to lr * min_lr_ratio
    warmup_steps: int = 100
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
        if not (self.max_steps or self.max_tokens or self.max_minutes):
            raise ValueError("set a budget: max_steps, max_tokens and/or max_minutes")
        if self.lora is not None:
            LoRAConfig(**self.lora)  # reject bad LoRA settings before any work
            if not self.init_from:
                raise ValueError("LoRA adapts an existing model: set init_from")
        if self.base_dtype not in ("float32", "bfloat16"):
            raise ValueError(f"base_dtype must be float32 or bfloat16, got {self.base_dtype!r}")
        if self.base_dtype != "float32" and self.lora is None:
            raise ValueError("base_dtype is the dtype of LoRA's frozen base; full fine-tuning trains in float32")
        if self.distill is not None:
            DistillConfig(**self.distill)

    def tokens_per_step(self, world_size: int = 1) -> int:
        return self.batch_size * self.grad_accum * world_size * self.seq_len


def lr_at(cfg: TrainConfig, step: int, progress: float) -> float:
    """Linear warmup over warmup_steps, then cosine from lr to lr*min_lr_ratio over the budget's progress."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    p = min(1.0, max(0.0, progress))
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


def make_optimizer(model: torch.nn.Module, cfg: TrainConfig) -> torch.optim.AdamW:
    decay = [p for p in model.parameters() if p.requires_grad and p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.requires_grad and p.dim() < 2]
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), eps=1e-8, fused=True)


# ---- checkpoints: everything in safetensors/JSON, never pickle ------------------------------------------

def _optimizer_tensors(opt: torch.optim.Optimizer) -> tuple[dict, dict]:
    state = opt.state_dict()
    tensors, scalars = {}, {}
    for pid, s in state["state"].items():
        for k, v in s.items():
            if torch.is_tensor(v):
                tensors[f"{pid}.{k}"] = v.detach().cpu().contiguous()
            else:
                scalars[f"{pid}.{k}"] = v
    return tensors, scalars


def save_checkpoint(run: Path, model: Transformer, opt, tokenizer, state: dict, provenance: dict,
                    lora: LoRAConfig | None = None) -> None:
    """With LoRA, the checkpoint's model files hold the merged model (so it loads like any model directory) and
    `adapter/` the LoRA matrices that resume reads back (the frozen base is init_from itself)."""
    with atomic_dir(run / "checkpoint") as tmp:
        save_model_dir(merged_copy(model) if lora else model, tmp / "model", tokenizer=tokenizer,
                       provenance=provenance)
        for f in (tmp / "model").iterdir():
            f.rename(tmp / f.name)
        (tmp / "model").rmdir()
        tensors, scalars = _optimizer_tensors(opt)
        tensors["rng.torch"] = torch.get_rng_state()
        save_file(tensors, str(tmp / "optimizer.safetensors"))
        if lora:
            save_adapter(model, lora, tmp / "adapter", provenance["train_config"]["init_from"], provenance)
        atomic_write_json(tmp / "trainer_state.json", {**state, "optimizer_scalars": scalars})


def load_checkpoint(run: Path, model: Transformer, opt) -> dict:
    ckpt = run / "checkpoint"
    state = json.loads((ckpt / "trainer_state.json").read_text())
    if (ckpt / "adapter").exists():
        load_lora_weights(model, ckpt / "adapter")  # the frozen base is init_from, already loaded
    else:
        model.load_state_dict(load_model_dir(ckpt).state_dict())
    tensors = load_file(str(ckpt / "optimizer.safetensors"))
    torch.set_rng_state(tensors.pop("rng.torch"))
    opt_state = opt.state_dict()
    per_param: dict[int, dict] = {}
    for key, v in tensors.items():
        pid, name = key.split(".", 1)
        per_param.setdefault(int(pid), {})[name] = v
    for key, v in state.pop("optimizer_scalars").items():
        pid, name = key.split(".", 1)
        per_param.setdefault(int(pid), {})[name] = v
    opt_state["state"] = per_param
    opt.load_state_dict(opt_state)
    return state


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

def _distributed() -> tuple[int, int, int]:
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not dist.is_initialized():
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        dist.init_process_group(backend)
    if dist.is_initialized():
        return dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", "0"))
    return 0, 1, 0


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
    """Train until the budget is spent; returns a summary (final validation, throughput, paths)."""
    rank, world, local_rank = _distributed()
    master = rank == 0
    device = pick_device(cfg.device)
    if device.type == "cuda":
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    precision = resolve_precision(cfg.precision, device)
    run = Path(cfg.out)
    data, tokenizer = open_training_data(cfg)

    torch.manual_seed(cfg.seed)
    model = build_model(cfg, data, tokenizer).to(device)
    lora = LoRAConfig(**cfg.lora) if cfg.lora is not None else None
    if lora:
        add_lora(model.to(DTYPES[cfg.base_dtype]), lora)  # freezes the base; A and B are fp32
    trainable, total = count_parameters(model)
    if cfg.seq_len > model.cfg.max_seq_len:
        raise ValueError(f"seq_len {cfg.seq_len} exceeds the model's context of {model.cfg.max_seq_len}; "
                         f"use --seq-len {model.cfg.max_seq_len} or less")
    model.train()
    distiller = Distiller(DistillConfig(**cfg.distill), data, tokenizer, cfg.seq_len, device, seed=cfg.seed,
                          log=log if master else lambda *_: None) if cfg.distill else None
    opt = make_optimizer(model, cfg)
    state = {"step": 0, "tokens": 0, "elapsed": 0.0}
    if resume:
        if not (run / "checkpoint" / "trainer_state.json").exists():
            raise FileNotFoundError(f"{run}/checkpoint: nothing to resume from; drop --resume to start fresh")
        state = load_checkpoint(run, model, opt)
        log(f"resumed from {run}/checkpoint at step {state['step']} ({state['tokens']:,} tokens)")
    elif master and (run / "checkpoint").exists():
        raise FileExistsError(f"{run} already holds a run; pass --resume to continue it or choose another --out")

    mcfg = model.cfg
    flops_per_token = mcfg.flops_per_token(cfg.seq_len)
    peak = matmul_peak_flops(device.type, precision) if master else 0.0
    provenance = {"data": {"path": str(cfg.data), "manifest_sha256": data.meta.get("manifest_sha256"),
                           "tokenizer_sha256": data.meta.get("tokenizer_sha256")},
                  "train_config": dataclasses.asdict(cfg), "precision": precision, "world_size": world}
    if data.meta.get("format") == "slmkit-sft":  # a chat fine-tune makes an assistant; else keep what it was
        from slmkit.formats.hf_dir import read_provenance
        provenance["instruction_tuned"] = bool(data.meta["chat"] or
                                               read_provenance(cfg.init_from).get("instruction_tuned", False))
    if master:
        run.mkdir(parents=True, exist_ok=True)
        atomic_write_json(run / "train_config.json", provenance["train_config"])
        _truncate_metrics(run / "metrics.jsonl", state["step"])
        log(f"model: {mcfg.num_params():,} parameters ({model.num_params():,} tensors' elements), "
            f"{flops_per_token / 1e6:.1f} MFLOPs/token; device {device}, {precision}, world {world}, "
            f"{cfg.tokens_per_step(world):,} tokens/step")
        log(f"trainable: {trainable:,} of {total:,} parameters ({trainable / total:.2%})"
            + (f", LoRA r={lora.r} on {', '.join(lora.targets)}" if lora else ""))

    step_fn = model
    if cfg.compile:
        step_fn = torch.compile(model)
    if world > 1:
        step_fn = torch.nn.parallel.DistributedDataParallel(step_fn, device_ids=[device] if device.type == "cuda"
                                                            else None)

    stop = {"signal": None}

    def on_signal(signum, _frame):
        stop["signal"] = signum

    old_handlers = {s: signal.signal(s, on_signal) for s in (signal.SIGINT, signal.SIGTERM)} if master else {}
    bar = tqdm(total=1000, disable=not (master and cfg.progress), dynamic_ncols=True,
               bar_format="{l_bar}{bar}| {postfix}")
    t_start = time.perf_counter() - state["elapsed"]
    window_t, window_tokens = time.perf_counter(), 0
    last_eval = None

    def elapsed() -> float:
        return time.perf_counter() - t_start

    try:
        while budget_progress(cfg, state["step"], state["tokens"], elapsed()) < 1.0:
            step = state["step"]
            lr = lr_at(cfg, step, budget_progress(cfg, step, state["tokens"], elapsed()))
            for g in opt.param_groups:
                g["lr"] = lr
            loss_sum = torch.zeros((), device=device)
            parts: dict[str, list] = {"kd": [], "ce": []}
            step_tokens = 0  # positions computed: fine-tuning batches are only as wide as their longest example
            for micro in range(cfg.grad_accum):
                # Global sample index: identical data for any split of the batch across ranks/micro-steps.
                first = (step * cfg.grad_accum * world + micro * world + rank) * cfg.batch_size
                x, y = data.train_batch(first, cfg.batch_size, cfg.seq_len, cfg.seed)
                x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
                step_tokens += x.numel() * world
                sync = world == 1 or micro == cfg.grad_accum - 1
                ctx = step_fn.no_sync() if (world > 1 and not sync) else contextlib.nullcontext()
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
            if world > 1:
                dist.all_reduce(loss_sum, op=dist.ReduceOp.AVG)
            state["step"] += 1
            state["tokens"] += step_tokens
            window_tokens += step_tokens
            step = state["step"]
            prog = budget_progress(cfg, step, state["tokens"], elapsed())

            if master and (step % cfg.log_every == 0 or step == 1 or prog >= 1.0):
                now = time.perf_counter()
                tok_s = window_tokens / max(now - window_t, 1e-9)
                window_t, window_tokens = now, 0
                mfu = flops_per_token * tok_s / peak if peak else 0.0
                rec = {"step": step, "tokens": state["tokens"], "loss": round(loss_sum.item(), 6),
                       "lr": lr, "grad_norm": round(float(grad_norm), 4) if grad_norm is not None else None,
                       "tok_s": round(tok_s, 1), "mfu": round(mfu, 4), "elapsed": round(elapsed(), 2)}
                rec.update({k: round(sum(v) / len(v), 6) for k, v in parts.items() if v})
                _append_metrics(run / "metrics.jsonl", rec)
                eta = max(0.0, elapsed() / prog - elapsed()) if prog > 0 else float("nan")
                bar.n = min(1000, int(prog * 1000))
                bar.set_postfix_str(f"step {step} loss {rec['loss']:.3f} {tok_s:,.0f} tok/s MFU {mfu:.0%} "
                                    f"ETA {_fmt_time(eta)}", refresh=True)

            done = prog >= 1.0
            if cfg.eval_every and step % cfg.eval_every == 0 and not done:
                if master:
                    last_eval = evaluate(model, data, cfg.seq_len, cfg.batch_size, device, precision,
                                         cfg.eval_tokens)
                    _append_metrics(run / "metrics.jsonl", {"step": step, "tokens": state["tokens"], **last_eval})
                    _plot_losses(run)
                    bar.write(f"step {step}: val loss {last_eval['val_loss']:.4f}, "
                              f"{last_eval['val_bpb']:.4f} bits/byte")
                _barrier(world)
            if _stop_requested(stop, world, device):
                if master:
                    bar.write(f"interrupted at step {step}: saving a checkpoint; continue with --resume")
                break
            if cfg.save_every and step % cfg.save_every == 0 and not done:
                if master:
                    state["elapsed"] = elapsed()
                    save_checkpoint(run, model, opt, tokenizer, state, provenance, lora)
                _barrier(world)
    finally:
        bar.close()
        for s, h in old_handlers.items():
            signal.signal(s, h)

    state["elapsed"] = elapsed()
    summary = {"run": str(run), "steps": state["step"], "tokens": state["tokens"], "elapsed_s": state["elapsed"],
               "preset": cfg.preset, "model_overrides": cfg.model_overrides, "precision": precision,
               "world_size": world, "parameters": mcfg.num_params(),
               "trainable_parameters": trainable,
               "tokens_per_s": state["tokens"] / max(state["elapsed"], 1e-9), "interrupted": bool(stop["signal"])}
    if master:
        save_checkpoint(run, model, opt, tokenizer, state, provenance, lora)
        if not stop["signal"]:
            final = evaluate(model, data, cfg.seq_len, cfg.batch_size, device, precision)
            _append_metrics(run / "metrics.jsonl", {"step": state["step"], "tokens": state["tokens"],
                                                    "final": True, **final})
            summary.update(final)
            provenance["metrics"] = {k: v for k, v in summary.items() if k != "run"}
            save_model_dir(merged_copy(model) if lora else model, run / "model", tokenizer=tokenizer,
                           provenance=provenance)
            summary["model_dir"] = str(run / "model")
            if lora:
                summary["adapter_dir"] = str(save_adapter(model, lora, run / "adapter", cfg.init_from, provenance))
            log(f"done: {state['step']} steps, {state['tokens']:,} tokens in {_fmt_time(state['elapsed'])}; "
                f"val loss {final['val_loss']:.4f}, {final['val_bpb']:.4f} bits/byte -> {run / 'model'}")
        _plot_losses(run)
    _barrier(world)
    return summary


def _stop_requested(stop: dict, world: int, device) -> bool:
    flag = torch.tensor([1.0 if stop["signal"] else 0.0], device=device)
    if world > 1:
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
    return bool(flag.item())


def _barrier(world: int) -> None:
    if world > 1:
        dist.barrier()


def _fmt_time(seconds: float) -> str:
    if not math.isfinite(seconds):
        return "?"
    m, s = divmod(int(seconds), 60)
    h, m = divmod(m, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m}:{s:02d}"


def _append_metrics(path: Path, rec: dict) -> None:
    with open(path, "a", encoding="utf-8") as f:
        f.write(json.dumps(rec) + "\n")


def read_metrics(path: str | Path) -> list[dict]:
    path = Path(path)
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _truncate_metrics(path: Path, step: int) -> None:
    """On resume, drop records written after the checkpoint we continue from (they will be redone)."""
    if not path.exists():
        return
    keep = [r for r in read_metrics(path) if r["step"] <= step and not r.get("final")]
    atomic_write_text(path, "".join(json.dumps(r) + "\n" for r in keep))


def _plot_losses(run: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    recs = read_metrics(run / "metrics.jsonl")
    train = [(r["tokens"], r["loss"]) for r in recs if "loss" in r]
    val = [(r["tokens"], r["val_loss"]) for r in recs if "val_loss" in r]
    if not train:
        return
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot(*zip(*train, strict=True), label="train loss", lw=1)
    if val:
        ax.plot(*zip(*val, strict=True), "o-", label="val loss")
    ax.set_xlabel("tokens")
    ax.set_ylabel("cross-entropy (nats/token)")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    tmp = run / ".loss.png.tmp.png"
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    os.replace(tmp, run / "loss.png")
