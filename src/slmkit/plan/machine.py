"""What this machine does, measured (`slm plan --calibrate`): the facts the planner's cost model (estimate.py) is
fitted to, never constants copied from elsewhere.

Two kinds of measurement, both on the machine itself, with the thread count slmkit's runs use:
- peaks: a square matmul's FLOP/s in fp32 and bf16, and the memory bandwidth of a large copy;
- slmkit's own model at a handful of small shapes: the seconds of a training step (forward, backward, AdamW) at the
  precision `slm train` picks, and of a LoRA step (rank LORA_RANK adapters on the attention projections of a frozen
  base: what `slm finetune --lora-rank` trains), the seconds per generated token at batch 1 (`generate_ids`, what
  `slm generate` runs) and at batch 4 and 16 (the serving engine, every row's sampling and events included), the
  bytes autograd saves for backward, the resident memory of a process that has imported the trainer, and what a
  distillation loss adds over a plain cross-entropy (time and peak memory per token x vocabulary entry, each in a
  child process of its own).
Each cost the planner predicts is a small linear model in terms the shapes give (FLOPs, layers, weight bytes,
tokens x width), fitted to those measurements by non-negative least squares, so it captures this machine's
per-op overhead as well as its peak. The result is cached ($SLMKIT_CACHE/plan/, keyed by CPU, threads and torch
version); `--calibrate` measures again.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from slmkit.files import atomic_write_json
from slmkit.model.config import ModelConfig

VERSION = 6
LORA_RANK = 16  # the rank `slm plan` recommends, and the one its LoRA steps are measured at
# (batch, seq, dim, layers, hidden, vocab): small enough to measure in seconds, spread so the fits separate
# per-step, per-layer, per-element and per-FLOP costs; the last is the micro preset's shape at 16 x 256 (vocabulary
# 4096), what `slm plan` most often weighs on a CPU, so the fit is pinned where it is used most
TRAIN_SHAPES = [(8, 64, 64, 2, 192, 512), (8, 64, 64, 8, 192, 512), (8, 256, 128, 4, 384, 4096),
                (16, 256, 256, 4, 688, 8192), (8, 256, 384, 6, 1024, 8192), (4, 256, 512, 8, 1376, 16384),
                (16, 256, 256, 6, 688, 4096)]
# Every training and decoding shape is measured once per round, the order reversed each round, and each takes its
# median: on a shared 2-core machine one shape measured 901 ms and then 671 ms in the next round, and the first
# shapes of a process run slow, so a single pass put such a spell on one or two shapes and bent the whole fit (the micro
# estimate was -19% and -20% in two benchmark runs, +8% in a third calibration the same day).
ROUNDS = 2
# LoRA steps: a frozen base has no weight gradients and adds the adapters' small matmuls, dropout and casts per
# projection, a mix no full-training shape shows; the last is SmolLM2-135M's width, hidden size and vocabulary
LORA_SHAPES = [(8, 128, 128, 4, 384, 4096), (8, 256, 256, 4, 688, 8192), (8, 256, 384, 8, 1024, 16384),
               (4, 256, 576, 6, 1536, 49152)]
# (batch, seq, vocab) of the distillation-loss measurements (kd_terms): two vocabularies, the fit is per element
KD_SHAPES = [(8, 128, 4096), (4, 128, 16384)]
DECODE_SHAPES = [(64, 2, 192, 512), (128, 8, 384, 4096), (256, 6, 688, 8192), (512, 8, 1376, 16384),
                 (768, 6, 2048, 32000)]


@dataclass
class Machine:
    cpu: str
    cores: int
    threads: int
    ram_gb: float
    gpu: str | None
    torch: str
    precision: str  # what `slm train --precision auto` trains in here
    matmul_fp32_gflops: float
    matmul_bf16_gflops: float
    bandwidth_gbs: float
    baseline_rss_mb: float  # a process that has imported torch and slmkit's trainer
    train_fit: list[float]  # seconds = c . [1, layers, tokens*dim*layers, train FLOPs]  (train_terms)
    decode_fit: list[float]  # seconds per token, batch 1 = c . [1, layers, weight bytes]  (decode_terms)
    serve_fit: list[float]  # seconds per engine step = c . [1, layers, weight bytes, rows, rows * forward FLOPs]
    activation_fit: list[float]  # saved bytes = c . [tokens*dim*layers, tokens*hidden*layers,
    #                              tokens*seq*heads*layers, tokens*vocab]
    # distillation's own work per token x vocabulary entry, over a plain step's cross-entropy (kd_terms): the
    # teacher's log-softmax, the student's fp32 log-softmax kept for backward, the divergence and its gradient
    kd_fit: list[float] = field(default_factory=lambda: [0.0, 0.0])  # [seconds, peak bytes] per token*vocab
    # a LoRA step's seconds on the training terms, fitted to LoRA steps (LORA_SHAPES); empty: not measured, and
    # the estimate scales train_fit's FLOPs by 4/6 instead
    lora_fit: list[float] = field(default_factory=list)
    measured: dict = field(default_factory=dict)  # the raw measurements the fits came from
    version: int = VERSION

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def _cfg(dim: int, layers: int, hidden: int, vocab: int, seq: int) -> ModelConfig:
    heads = max(1, dim // 64)
    return ModelConfig(vocab_size=vocab, dim=dim, n_layers=layers, n_heads=heads, n_kv_heads=heads,
                       hidden_dim=hidden, max_seq_len=max(seq, 64))


def train_terms(cfg: ModelConfig, batch: int, seq: int) -> list[float]:
    tokens = batch * seq
    return [1.0, cfg.n_layers, tokens * cfg.dim * cfg.n_layers, tokens * cfg.flops_per_token(seq)]


def decode_terms(cfg: ModelConfig, weight_bytes: int = 4) -> list[float]:
    return [1.0, cfg.n_layers, cfg.num_params() * weight_bytes]


def serve_terms(cfg: ModelConfig, rows: int, weight_bytes: int = 4) -> list[float]:
    forward = cfg.flops_per_token(1) / 3  # 2 FLOPs a weight per token: a third of training's 6
    return [*decode_terms(cfg, weight_bytes), rows, rows * forward]


def activation_terms(cfg: ModelConfig, batch: int, seq: int) -> list[float]:
    tokens, layers = batch * seq, cfg.n_layers
    return [tokens * cfg.dim * layers, tokens * cfg.hidden_dim * layers, tokens * seq * cfg.n_heads * layers,
            tokens * cfg.vocab_size]


def _median_seconds(fn, repeats: int, warmup: int = 2) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def _interleaved(items: list, measure, rounds: int) -> list[list]:
    """Each item's `rounds` measurements, taken in alternating order (forward, reversed, forward...), so a slow
    spell of a shared machine, or a process's warm-up, falls on every item alike instead of on one."""
    got: list[list] = [[] for _ in items]
    order = list(range(len(items)))
    for r in range(rounds):
        for i in order if r % 2 == 0 else order[::-1]:
            got[i].append(measure(items[i]))
    return got


def _bandwidth_gbs(mb: int = 256) -> float:
    src = torch.ones(mb * 2**20 // 4)
    dst = torch.empty_like(src)
    seconds = _median_seconds(lambda: dst.copy_(src), repeats=5)
    return 2 * src.numel() * 4 / seconds / 1e9  # read + write


def _train_step_seconds(cfg: ModelConfig, batch: int, seq: int, precision: str, repeats: int,
                        lora: bool = False) -> tuple[float, int]:
    """(median seconds, bytes autograd saves) of one training step; with `lora`, of a LoRA step on the frozen
    model (as `slm finetune --lora-rank LORA_RANK`: the default attention targets, dropout 0.05)."""
    from slmkit.model.llama import Transformer
    from slmkit.model.lora import LoRAConfig, add_lora
    from slmkit.train.perf import autocast
    torch.manual_seed(0)
    model = Transformer(cfg)
    if lora:
        add_lora(model, LoRAConfig(r=LORA_RANK))
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4, fused=True)
    x = torch.randint(0, cfg.vocab_size, (batch, seq + 1))
    device = torch.device("cpu")
    saved = [0]

    def pack(t):
        saved[0] += t.numel() * t.element_size()
        return t

    def step(count: bool = False):
        with autocast(device, precision):
            if count:
                with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
                    loss = model(x[:, :-1], targets=x[:, 1:])
            else:
                loss = model(x[:, :-1], targets=x[:, 1:])
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    step(count=True)
    return _median_seconds(step, repeats), saved[0]


def kd_terms(batch: int, seq: int, vocab: int) -> float:
    return float(batch * seq * vocab)


# What one distillation loss costs beyond a plain cross-entropy, run in a child process so that its peak memory
# (VmHWM, transient tensors included) is its own: the default online recipe (slm distill: the teacher's full
# distribution, forward KL, alpha 0.5), from the logits on (the models' own forward passes are the train fit's).
_KD_PROBE = """
import sys, time, statistics, torch, torch.nn.functional as F
from slmkit.distill.kd import kd_loss_from_logp
from slmkit.distill.teacher import TeacherTargets
from slmkit.plan.machine import peak_rss_mb
torch.set_num_threads(int(sys.argv[5]))
B, T, V, kind = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
torch.manual_seed(0)
y = torch.randint(0, V, (B, T))
mask = torch.ones(B, T)
def step():
    logits = torch.randn(B, T, V, requires_grad=True)
    if kind == "ce":
        loss = F.cross_entropy(logits.reshape(-1, V), y.reshape(-1))
    else:
        teacher = torch.log_softmax(torch.randn(B, T, V), dim=-1)
        s_logp = torch.log_softmax(logits, dim=-1)
        kd = kd_loss_from_logp(s_logp, TeacherTargets(logp=teacher), mask, "fkl", 0.5, 1.0)
        loss = 0.5 * kd + 0.5 * F.nll_loss(s_logp.reshape(-1, V), y.reshape(-1))
    loss.backward()
def rss_mb():
    try:
        return int(next(x for x in open("/proc/self/status") if x.startswith("VmRSS:")).split()[1]) / 1024
    except OSError:  # no /proc: the peak so far stands in for the resident size
        return peak_rss_mb()
before = rss_mb()
step()  # the first step's high-water mark over the resident size before it: what a training step adds at peak
peak = (peak_rss_mb() - before) * 2**20
times = []
for _ in range(int(sys.argv[6])):
    t0 = time.perf_counter(); step(); times.append(time.perf_counter() - t0)
print(statistics.median(times), peak)
"""


def _kd_probe(batch: int, seq: int, vocab: int, kind: str, repeats: int) -> tuple[float, float]:
    """(median seconds, peak bytes over the process before it) of one loss + backward of `kind` (ce | kd)."""
    out = subprocess.run([sys.executable, "-c", _KD_PROBE, str(batch), str(seq), str(vocab), kind,
                          str(torch.get_num_threads()), str(repeats)], capture_output=True, text=True, check=True,
                         timeout=600)
    seconds, peak = out.stdout.split()[-2:]
    return float(seconds), float(peak)


def _kd_fit(shapes, repeats: int) -> tuple[list[float], list]:
    """[seconds, bytes] per token*vocab of distillation over cross-entropy, fitted through the origin."""
    rows, extra_s, extra_b = [], [], []
    for batch, seq, vocab in shapes:
        ce_s, ce_b = _kd_probe(batch, seq, vocab, "ce", repeats)
        kd_s, kd_b = _kd_probe(batch, seq, vocab, "kd", repeats)
        rows.append(kd_terms(batch, seq, vocab))
        extra_s.append(max(0.0, kd_s - ce_s))
        extra_b.append(max(0.0, kd_b - ce_b))
    fit = [_nnls([[r] for r in rows], extra_s)[0], _nnls([[r] for r in rows], extra_b)[0]]
    return fit, [[*shape, s, b] for shape, s, b in zip(shapes, extra_s, extra_b, strict=True)]


def _decode_step_seconds(cfg: ModelConfig, batch: int, repeats: int) -> float:
    """Seconds per generated token as users get them: batch 1 through `generate_ids` (what `slm generate` and
    the torch LM run: forward, sampling, the cache), batch N through the serving engine (every row's sampling,
    text and events), the prompt's prefill excluded."""
    from slmkit.lm.torch_lm import TorchLM, generate_ids
    from slmkit.model.llama import Transformer
    from slmkit.sampling import SamplingParams
    torch.manual_seed(0)
    model = Transformer(cfg).eval()
    steps = repeats + 2
    params = SamplingParams(max_new_tokens=steps + 1, temperature=0.0, stop_at_eos=False)
    prompt = list(range(1, 17))
    if batch == 1:
        tokens = generate_ids(model, prompt, params)
        next(tokens)  # the prefill
        t0 = time.perf_counter()
        n = sum(1 for _ in tokens)
        return (time.perf_counter() - t0) / n
    import asyncio

    from slmkit.serve.engine import Engine, GenerationRequest
    engine = Engine(TorchLM(model, _Digits(cfg.vocab_size)), max_batch=batch, max_queue=batch)

    async def run() -> float:
        pendings = [engine.submit(GenerationRequest(prompt, params)) for _ in range(batch)]
        times = []
        while True:  # a step's time: between the events of one row (all rows step together)
            ev = await pendings[0].events.get()
            if ev is None or isinstance(ev, BaseException):
                break
            times.append(time.perf_counter())
        for p in pendings[1:]:
            while (ev := await p.events.get()) is not None and not isinstance(ev, BaseException):
                pass
        gaps = [b - a for a, b in zip(times[1:], times[2:], strict=False)]  # skip the prefills' first gap
        return statistics.median(gaps)
    try:
        return asyncio.run(run())
    finally:
        engine.close()


class _Digits:
    """A stand-in tokenizer for the engine's text (ids as digits): calibration measures decoding, not text."""

    def __init__(self, vocab_size: int):
        self.vocab_size, self.bos_id, self.eos_id, self.pad_id = vocab_size, None, None, None
        self.chat_template = None

    def decode(self, ids) -> str:
        return "".join(f" {i}" for i in ids)

    def encode(self, text: str) -> list[int]:
        return [int(t) for t in text.split()]


def _baseline_rss_mb() -> float:
    # VmHWM, not ru_maxrss: on Linux a child's ru_maxrss starts at its parent's resident size when it forked
    # (here, a process that has just trained six models), while VmHWM belongs to the new program alone
    code = ("import torch, slmkit.train.loop, slmkit.plan.machine as m; print(m.peak_rss_mb())")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=300)
    return float(out.stdout.strip().splitlines()[-1])


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _ram_gb() -> float:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    except (ValueError, OSError):
        return 0.0


def _nnls(rows: list[list[float]], y: list[float]) -> list[float]:
    """Non-negative least squares on relative error (each row divided by its y), so small and large shapes
    count alike."""
    from scipy.optimize import nnls
    # A measurement of nothing (a difference that noise took to 0, as _kd_fit clamps it) has no relative error:
    # it is left out, and with nothing left the fit is zero.
    keep = [i for i, v in enumerate(y) if v > 0]
    if not keep:
        return [0.0] * len(rows[0])
    rows, y = [rows[i] for i in keep], [y[i] for i in keep]
    a = np.array(rows, dtype=np.float64) / np.array(y)[:, None]
    scale = np.abs(a).max(axis=0)
    scale[scale == 0] = 1.0
    coef, _ = nnls(a / scale, np.ones(len(y)))
    return [float(c) for c in coef / scale]


def calibrate(quick: bool = False, log=print) -> Machine:
    """Measure this machine (tens of seconds; `quick`: the three smallest shapes of each kind, for tests)."""
    from slmkit.train.perf import matmul_peak_flops, resolve_precision
    threads = torch.get_num_threads()
    precision = resolve_precision("auto", torch.device("cpu"))
    train_shapes = TRAIN_SHAPES[:4] if quick else TRAIN_SHAPES
    decode_shapes = DECODE_SHAPES[:3] if quick else DECODE_SHAPES
    repeats = 2 if quick else 4
    rounds = 1 if quick else ROUNDS
    lora_shapes = LORA_SHAPES[:2] if quick else LORA_SHAPES
    log(f"calibrating: matmul peaks, memory bandwidth, {len(train_shapes)} training, {len(lora_shapes)} LoRA and "
        f"{len(decode_shapes)} decoding shapes ({rounds} rounds of training and decoding, "
        f"{threads} threads, training in {precision})")
    fp32 = matmul_peak_flops("cpu", "fp32") / 1e9
    bf16 = matmul_peak_flops("cpu", "bf16") / 1e9
    bandwidth = _bandwidth_gbs(64 if quick else 256)
    train_rows, train_y, act_rows, act_y = [], [], [], []

    def measure_train(shape):
        batch, seq, dim, layers, hidden, vocab = shape
        return _train_step_seconds(_cfg(dim, layers, hidden, vocab, seq), batch, seq, precision, repeats)
    train_rounds = _interleaved(train_shapes, measure_train, rounds)
    for (batch, seq, dim, layers, hidden, vocab), got in zip(train_shapes, train_rounds, strict=True):
        cfg = _cfg(dim, layers, hidden, vocab, seq)
        seconds, saved = statistics.median(t for t, _ in got), got[0][1]
        train_rows.append(train_terms(cfg, batch, seq))
        train_y.append(seconds)
        act_rows.append(activation_terms(cfg, batch, seq))
        act_y.append(float(saved))
        per_round = ", ".join(f"{t * 1e3:.1f}" for t, _ in got)
        log(f"  train {batch}x{seq} d{dim} L{layers} V{vocab}: {seconds * 1e3:.1f} ms/step (rounds: {per_round}), "
            f"{saved / 2**20:.1f} MB saved")
    lora_rows, lora_y = [], []
    for batch, seq, dim, layers, hidden, vocab in lora_shapes:
        cfg = _cfg(dim, layers, hidden, vocab, seq)
        seconds, _ = _train_step_seconds(cfg, batch, seq, precision, repeats, lora=True)
        lora_rows.append(train_terms(cfg, batch, seq))
        lora_y.append(seconds)
        log(f"  LoRA r{LORA_RANK} {batch}x{seq} d{dim} L{layers} V{vocab}: {seconds * 1e3:.1f} ms/step")
    kd_fit, kd_measured = _kd_fit(KD_SHAPES[:1] if quick else KD_SHAPES, repeats)
    log(f"  distillation over cross-entropy: {kd_fit[0] * 1e9:.2f} ns and {kd_fit[1]:.1f} bytes per token x vocab")
    decode_rows, decode_y, serve_rows, serve_y = [], [], [], []
    runs = [(shape, batch) for shape in decode_shapes for batch in (1, 4, 16)]

    def measure_decode(run):
        (dim, layers, hidden, vocab), batch = run
        return _decode_step_seconds(_cfg(dim, layers, hidden, vocab, 64), batch, 4 if quick else 16)
    for ((dim, layers, hidden, vocab), batch), got in zip(runs, _interleaved(runs, measure_decode, rounds),
                                                          strict=True):
        cfg, seconds = _cfg(dim, layers, hidden, vocab, 64), statistics.median(got)
        if batch == 1:
            decode_rows.append(decode_terms(cfg))
            decode_y.append(seconds)
        else:
            serve_rows.append(serve_terms(cfg, batch))
            serve_y.append(seconds)
        log(f"  decode d{dim} L{layers} batch {batch}: {seconds * 1e3:.2f} ms/step (rounds: "
            f"{', '.join(f'{t * 1e3:.2f}' for t in got)})")
    machine = Machine(
        cpu=_cpu_name(), cores=os.cpu_count() or 1, threads=threads, ram_gb=round(_ram_gb(), 1),
        gpu=torch.cuda.get_device_name(0) if torch.cuda.is_available() else None, torch=torch.__version__,
        precision=precision, matmul_fp32_gflops=round(fp32, 2), matmul_bf16_gflops=round(bf16, 2),
        bandwidth_gbs=round(bandwidth, 2), baseline_rss_mb=round(_baseline_rss_mb(), 1),
        train_fit=_nnls(train_rows, train_y), decode_fit=_nnls(decode_rows, decode_y),
        serve_fit=_nnls(serve_rows, serve_y),
        activation_fit=_nnls(act_rows, act_y), kd_fit=kd_fit, lora_fit=_nnls(lora_rows, lora_y),
        measured={"train": [[*s, y] for s, y in zip(train_shapes, train_y, strict=True)],
                  "train_rounds": [[t for t, _ in got] for got in train_rounds], "kd": kd_measured,
                  "lora": [[*s, y] for s, y in zip(lora_shapes, lora_y, strict=True)],
                  "decode": decode_y, "serve": serve_y, "activations": act_y, "quick": quick})
    return machine


def cache_path() -> Path:
    from slmkit.hub import cache_dir
    key = f"{_cpu_name()}|{torch.get_num_threads()}|{torch.__version__}|{VERSION}"
    return cache_dir() / "plan" / f"machine-{hashlib.sha256(key.encode()).hexdigest()[:12]}.json"


def load_machine(recalibrate: bool = False, log=print) -> Machine:
    """This machine's calibration: from the cache, or measured now (and cached) when missing or `recalibrate`."""
    path = cache_path()
    if path.exists() and not recalibrate:
        try:
            data = json.loads(path.read_text())
            if data.get("version") == VERSION:
                return Machine(**data)
        except (ValueError, TypeError):
            pass  # a damaged or older cache: measure again
    machine = calibrate(log=log)
    atomic_write_json(path, machine.to_dict())
    log(f"calibration cached in {path}")
    return machine


def peak_rss_mb() -> float:
    """This process's peak resident memory so far (MB): VmHWM where /proc has it, else ru_maxrss."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
