"""Hardware facts the trainer and benchmarks need: device choice, bf16 support, measured matmul peak."""

from __future__ import annotations

import functools
import time

import torch


def pick_device(device: str = "auto") -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def bf16_supported(device: torch.device) -> bool:
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    if device.type == "cpu":
        # Without native bf16 instructions (AVX512-BF16/AMX) CPU autocast emulates bf16 and is slower than fp32.
        try:
            return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
        except (AttributeError, RuntimeError):
            return False
    return False


# bf16 autocast pays a cast per op, so on a CPU it must win the matmul clearly to win a training step
BF16_MIN_SPEEDUP = 1.2


def resolve_precision(precision: str, device: torch.device) -> str:
    """'auto' -> 'bf16' where the hardware does bf16 natively (and, on a CPU, measurably faster), else 'fp32'.

    Native is not enough on a CPU: an AMD EPYC with AVX512-BF16 multiplies bf16 at 4.4x its fp32 rate, an Intel
    Xeon with AVX512-BF16 but no AMX at 0.64x, where bf16 training ran at 0.55x fp32's tokens/s (BENCHMARKS.md,
    "slm plan"). So 'auto' on a CPU times one square matmul in each (~1 s each, once a process)."""
    if precision == "auto":
        if not bf16_supported(device):
            return "fp32"
        if device.type == "cpu" and (matmul_peak_flops("cpu", "bf16")
                                     < BF16_MIN_SPEEDUP * matmul_peak_flops("cpu", "fp32")):
            return "fp32"
        return "bf16"
    if precision not in ("bf16", "fp32"):
        raise ValueError(f"precision must be auto, bf16 or fp32, not {precision!r}")
    return precision


def autocast(device: torch.device, precision: str):
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision == "bf16")


@functools.cache
def matmul_peak_flops(device_type: str = "cpu", precision: str = "fp32", n: int = 1024, trials: int = 5,
                      seconds: float = 0.2) -> float:
    """Measured FLOP/s of a square matmul: the denominator for MFU on this very machine, right now.

    The best of several short trials, so a moment of contention from another process doesn't lower the peak.
    """
    device = torch.device(device_type)
    dtype = torch.bfloat16 if precision == "bf16" else torch.float32
    # A private generator: drawing from the global one would shift a run's dropout masks by whether this cached
    # measurement ran before (the first run of a process, rank 0 only), breaking exact resume and DDP parity.
    g = torch.Generator(device).manual_seed(0)
    a = torch.randn(n, n, device=device, dtype=dtype, generator=g)
    b = torch.randn(n, n, device=device, dtype=dtype, generator=g)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    for _ in range(2):
        a @ b
    sync()
    best = 0.0
    for _ in range(trials):
        iters, t0 = 0, time.perf_counter()
        while time.perf_counter() - t0 < seconds:
            a @ b
            iters += 1
        sync()
        best = max(best, 2 * n**3 * iters / (time.perf_counter() - t0))
    return best
