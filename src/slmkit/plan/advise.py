"""`slm plan`: for a task, its data and this machine, which approach, which model, how long, how much memory and
how fast it will serve, with the commands to run.

The approach follows the choice the product's source documents describe (data available, resources, latency,
control), as rules a person can read:

- qa (questions over your documents): retrieval over an existing small instruct model (`slm kb`), grounded and
  citing; fine-tuned on the KB itself (`slm kb synth` + `slm finetune`) once it answers from it.
- classification: labelled examples train an encoder classifier (`slm classify train`); a few dozen or fewer go
  to PET-style few-shot; none: zero-shot by descriptions, or escalate.
- chat: a pretrained small instruct model as it is, LoRA-tuned on your conversations when you have them, with a
  cascade to a larger model or people for what it is unsure of.
- generation (a domain's text or code): train from scratch when the data and the time budget reach the model's
  compute-optimal tokens (Chinchilla: ~20 per parameter; the largest preset that does within the budget); with a
  teacher, distil into it; short of both, LoRA-tune a pretrained model.

The numbers are the cost model's (estimate.py) on this machine's calibration (machine.py): a shape's training
tokens/s, step time and peak memory, and its batch-1 decode, time to first token and serving throughput.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path

from slmkit.model.config import PRESETS, ModelConfig, model_config
from slmkit.plan.estimate import RunEstimate, estimate_run
from slmkit.plan.machine import LORA_RANK, Machine

TASKS = ("generation", "classification", "qa", "chat")
TOKENS_PER_PARAM = 20  # Chinchilla's compute-optimal ratio (Hoffmann et al. 2022)
BYTES_PER_TOKEN = 3.5  # for a data folder not yet tokenized: code and English text, with slmkit's BPE (measured
# on the quickstart corpus: BENCHMARKS.md) - only used before `slm data prepare` gives the real count
PRETRAINED = "smollm2-135m-instruct"
PLANNED_PRESETS = ("nano", "micro", "stories15m", "stories42m", "stories110m", "smollm2-135m", "tinyllama-1.1b")


@dataclass
class Plan:
    task: str
    approach: str
    reasons: list[str]
    model: str  # the preset (with --set overrides) or the pretrained model the approach starts from
    shape: dict
    data_tokens: int | None
    train_tokens: int | None
    train_hours: float | None
    estimate: RunEstimate
    machine: dict
    commands: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        d = asdict(self)
        # the stable, documented top-level numbers (scripts read these)
        d.update(train_tokens_per_s=self.estimate.train_tokens_per_s, peak_rss_mb=self.estimate.peak_rss_mb,
                 decode_tokens_per_s=self.estimate.decode_tokens_per_s)
        return d


def data_tokens(data: str | Path | None) -> int | None:
    """Training tokens in `data`: a token dataset's train split (meta.json), or a folder's bytes / BYTES_PER_TOKEN."""
    if data is None:
        return None
    path = Path(data)
    if not path.exists():
        raise ValueError(f"--data {path}: no such file or folder")
    meta = path / "meta.json"
    if meta.exists():
        from slmkit.data.tokens import load_meta
        return int(load_meta(path)["splits"]["train"]["tokens"])
    if path.is_file():
        size = path.stat().st_size
    else:
        size = sum(f.stat().st_size for f in path.rglob("*") if f.is_file())
    return int(size / BYTES_PER_TOKEN)


def _shape(cfg: ModelConfig) -> dict:
    return {k: getattr(cfg, k) for k in ("vocab_size", "dim", "n_layers", "n_heads", "n_kv_heads", "hidden_dim",
                                         "max_seq_len", "tie_embeddings")}


def _lora_params(cfg: ModelConfig, rank: int = LORA_RANK) -> int:
    # slmkit's default targets: the attention projections q, k, v, o
    d, kv = cfg.dim, cfg.n_kv_heads * cfg.head_dim
    return cfg.n_layers * rank * ((d + d) * 2 + (d + kv) * 2)


def pick_preset(m: Machine, tokens: int | None, hours: float, memory_mb: float, batch: int, seq: int
                ) -> tuple[str, RunEstimate, int]:
    """The largest preset that reaches its compute-optimal tokens within `hours` (and the data, at most 4
    epochs), in `memory_mb`: (name, estimate, the tokens it trains on)."""
    best = None
    for name in PLANNED_PRESETS:
        cfg = model_config(name)
        est = estimate_run(m, cfg, batch=batch, seq=min(seq, cfg.max_seq_len))
        optimal = TOKENS_PER_PARAM * cfg.num_params()
        affordable = est.train_tokens_per_s * hours * 3600
        if est.peak_rss_mb > memory_mb or affordable < optimal:
            continue
        if tokens is not None and 4 * tokens < optimal:
            continue
        best = (name, est, int(optimal))
    if best is None:  # nothing reaches its optimum: the smallest, trained for the whole budget
        cfg = model_config(PLANNED_PRESETS[0])
        est = estimate_run(m, cfg, batch=batch, seq=min(seq, cfg.max_seq_len))
        best = (PLANNED_PRESETS[0], est, int(est.train_tokens_per_s * hours * 3600))
    return best


def plan(task: str, m: Machine | None = None, data: str | Path | None = None, hours: float = 1.0,
         memory_gb: float | None = None, clients: int = 16, prompt_tokens: int = 128, latency_ms: float | None = None,
         labelled: int | None = None, teacher: str | None = None, preset: str | None = None,
         overrides: dict | None = None, batch: int = 16, seq: int = 256, recalibrate: bool = False,
         log=print) -> Plan:
    """The plan for `task` (see the module docstring) on machine `m` (None: this one's calibration, measured
    first when not cached or `recalibrate`). An explicit `preset` (and `overrides`) is estimated as it is instead
    of chosen."""
    if task not in TASKS:
        raise ValueError(f"unknown task {task!r}; choose one of {', '.join(TASKS)}")
    if hours <= 0 or clients < 1 or batch < 1 or seq < 1 or prompt_tokens < 1 or (memory_gb or 1) <= 0:
        raise ValueError("--hours, --memory-gb, --clients, --batch-size, --seq-len and --prompt-tokens must be "
                         "positive")
    if preset is not None:
        model_config(preset, **(overrides or {}))  # an unknown preset or field, before measuring anything
    tokens = data_tokens(data)
    if m is None:
        from slmkit.plan.machine import load_machine
        m = load_machine(recalibrate=recalibrate, log=log)
    memory_mb = (memory_gb if memory_gb is not None else m.ram_gb * 0.8) * 1024
    reasons, warnings, commands = [], [], []
    data_arg = str(data) if data is not None else "DATA"
    train_tokens = None
    if preset is not None or overrides:
        cfg = model_config(preset or "micro", **(overrides or {}))
        model = preset or "micro"
        approach = "train from scratch" if task == "generation" else "fine-tune"
        reasons.append(f"the shape you gave ({model}{' with --set' if overrides else ''}), estimated as it is")
        est = estimate_run(m, cfg, batch=batch, seq=min(seq, cfg.max_seq_len), clients=clients,
                           prompt_tokens=prompt_tokens)
        train_tokens = int(est.train_tokens_per_s * hours * 3600)
        commands.append(f"slm train --data {data_arg} --out runs/plan --preset {model}"
                        + "".join(f" --set {k}={v}" for k, v in (overrides or {}).items())
                        + f" --batch-size {batch} --seq-len {min(seq, cfg.max_seq_len)} --max-minutes {hours * 60:g}")
    elif task == "generation" and (teacher or tokens is None or tokens >= 1_000_000):
        model, est0, train_tokens = pick_preset(m, tokens, hours, memory_mb, batch, seq)
        cfg = model_config(model)
        teacher_cfg = None
        if teacher:
            approach = "distil from a teacher"
            reasons.append(f"a teacher ({teacher}) is available: its distributions teach more per token than the "
                           "text alone (distillation benchmark: BENCHMARKS.md)")
            teacher_cfg = _teacher_config(teacher)
        else:
            approach = "train from scratch"
            reasons.append("your own domain's data, enough for a small model at its compute-optimal tokens "
                           f"(~{TOKENS_PER_PARAM} per parameter)" if tokens else
                           "no data size given: the shape that fits the time budget")
        est = estimate_run(m, cfg, batch=batch, seq=min(seq, cfg.max_seq_len), teacher=teacher_cfg, clients=clients,
                           prompt_tokens=prompt_tokens)
        train_tokens = min(train_tokens, int(est.train_tokens_per_s * hours * 3600))
        reasons.append(f"{model}: the largest preset whose {TOKENS_PER_PARAM}x-parameter tokens fit {hours:g} h here"
                       if train_tokens >= TOKENS_PER_PARAM * cfg.num_params() else
                       f"{model}: the smallest preset; {hours:g} h here reach only "
                       f"{train_tokens / cfg.num_params():.1f} tokens per parameter")
        seq_arg = min(seq, cfg.max_seq_len)
        if teacher:
            commands.append(f"slm distill --teacher {teacher} --data {data_arg} --out runs/plan --student {model} "
                            f"--batch-size {batch} --seq-len {seq_arg} --max-minutes {hours * 60:g}")
        else:
            commands.append(f"slm train --data {data_arg} --out runs/plan --preset {model} --batch-size {batch} "
                            f"--seq-len {seq_arg} --max-minutes {hours * 60:g} --optimizer muon --schedule wsd")
    else:
        cfg = model_config("smollm2-135m")
        model = PRETRAINED
        lora = _lora_params(cfg)
        est = estimate_run(m, cfg, batch=min(batch, 8), seq=min(seq, 512), lora_params=lora, clients=clients,
                           prompt_tokens=prompt_tokens)
        if task == "qa":
            approach = "retrieval over an existing model"
            reasons += ["answers must come from your documents and cite them: retrieval, not training, puts the "
                        "knowledge in (and keeps it current: re-index, not re-train)",
                        "a pretrained small instruct model answers from the sources; `kb synth` fine-tunes it on "
                        "the knowledge base itself"]
            commands += [f"slm kb index {data_arg} -o kb/", f"slm kb ask kb/ \"QUESTION\" --model {PRETRAINED}",
                         f"slm kb synth kb/ -o kb-train.jsonl --teacher {PRETRAINED}",
                         f"slm finetune {PRETRAINED} --data kb-train.jsonl --out runs/kb-tuned --lora-rank "
                         f"{LORA_RANK}", f"slm serve {PRETRAINED} --kb kb/"]
        elif task == "classification":
            if labelled is not None and labelled >= 100:
                approach = "fine-tune an encoder classifier"
                reasons.append(f"{labelled} labelled examples: enough for a small encoder with a head (encoder "
                               "benchmark: BENCHMARKS.md), far cheaper to serve than a generator")
                commands.append(f"slm classify train minilm-l6-v2 --data {data_arg} --out runs/classifier "
                                "--train-body")
            elif labelled:
                approach = "few-shot (PET)"
                reasons.append(f"{labelled} labelled examples: too few for a head; pattern-exploiting training "
                               "uses the model's own words for the labels")
                commands.append(f"slm classify train {PRETRAINED} --data {data_arg} --out runs/classifier "
                                "--method pet --pattern '{text} It is about' --verbalizer LABEL=WORD")
            else:
                approach = "zero-shot, escalate to a larger model"
                reasons.append("no labelled examples: classify by descriptions of the classes, and send what the "
                               "small model is unsure of to a larger one (a cascade) until labels exist")
                commands.append(f"slm serve {PRETRAINED} --escalate-to LARGER --calibration cal.json")
        else:  # chat, or generation with little data
            approach = "fine-tune or LoRA a pretrained small model"
            reasons.append("too little data to train a model from scratch" if task == "generation" else
                           "a pretrained small instruct model already chats; your conversations tune its manner and "
                           "domain with LoRA (a fraction of the parameters, minutes on a CPU)")
            reasons.append("escalate what it is unsure of to a larger model or to people (`slm serve "
                           "--escalate-to`): the small model answers the rest, faster and privately")
            commands += [f"slm finetune {PRETRAINED} --data {data_arg} --out runs/lora --lora-rank {LORA_RANK}",
                         "slm serve runs/lora/model"]
        train_tokens = int(est.train_tokens_per_s * hours * 3600)
    if latency_ms is not None and 1000 / est.decode_tokens_per_s > latency_ms:
        warnings.append(f"one token takes ~{1000 / est.decode_tokens_per_s:.0f} ms here (batch 1), over "
                        f"--latency-ms {latency_ms:g}: a smaller shape, int8 weights or llama.cpp")
    if est.peak_rss_mb > memory_mb:
        warnings.append(f"training needs ~{est.peak_rss_mb:,.0f} MB, over the {memory_mb:,.0f} MB allowed: a smaller "
                        "--batch-size (with --grad-accum), LoRA, or `torchrun ... --parallel fsdp` across machines")
    return Plan(task=task, approach=approach, reasons=reasons, model=model, shape=_shape(cfg), data_tokens=tokens,
                train_tokens=train_tokens, train_hours=hours, estimate=est, machine=m.to_dict(), commands=commands,
                warnings=warnings)


def _teacher_config(teacher: str) -> ModelConfig:
    """The teacher's shape: a preset name, or a model directory's config."""
    if teacher in PRESETS:
        return model_config(teacher)
    from slmkit.hub import resolve_model
    ref = resolve_model(teacher)
    if ref.kind != "dir":
        raise ValueError(f"--teacher {teacher}: give a preset name or a local model directory to estimate it")
    from slmkit.model.config import load_json
    return ModelConfig.from_hf(load_json(Path(ref.location) / "config.json"))


def render(p: Plan) -> str:
    """The plan as a readable table."""
    e = p.estimate
    m = p.machine
    rows = [("approach", p.approach), ("model", f"{p.model} ({e.params / 1e6:.1f}M parameters"
                                                 + (f", {e.trainable_params / 1e6:.2f}M trained)" if
                                                    e.trainable_params != e.params else ")")),
            ("data", f"{p.data_tokens:,} tokens" if p.data_tokens is not None else "(not given)"),
            ("training", f"{e.train_tokens_per_s:,.0f} tokens/s, {e.train_step_s:.3f} s/step; "
                         f"{p.train_tokens:,} tokens in {p.train_hours:g} h" if p.train_tokens else
                         f"{e.train_tokens_per_s:,.0f} tokens/s"),
            ("peak memory", f"{e.peak_rss_mb:,.0f} MB (training)"),
            ("disk", f"{e.checkpoint_disk_mb:,.0f} MB (checkpoint + model)"),
            ("decode", f"{e.decode_tokens_per_s:,.1f} tokens/s (batch 1, torch fp32)"),
            ("first token", f"{e.ttft_s * 1000:,.0f} ms for a {e.prompt_tokens}-token prompt"),
            ("serving", f"{e.serve_tokens_per_s:,.0f} tokens/s at {e.clients} clients"),
            ("machine", f"{m['cpu']}, {m['threads']} threads, {m['ram_gb']:g} GB; matmul fp32 "
                        f"{m['matmul_fp32_gflops']:.0f} / bf16 {m['matmul_bf16_gflops']:.0f} GFLOP/s, "
                        f"{m['bandwidth_gbs']:.1f} GB/s")]
    width = max(len(k) for k, _ in rows)
    lines = [f"{k:<{width}}  {v}" for k, v in rows]
    lines += ["", "why:"] + [f"  - {r}" for r in p.reasons]
    if p.warnings:
        lines += ["", "warnings:"] + [f"  - {w}" for w in p.warnings]
    lines += ["", "run:"] + [f"  {c}" for c in p.commands]
    return "\n".join(lines)
