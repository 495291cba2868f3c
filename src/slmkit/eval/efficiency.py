"""What a model costs to run: size, memory, prefill and decode speed, latency of a fixed request mix.

`measure(spec, backend)` runs in a fresh process (`python -m slmkit.eval.efficiency SPEC --backend B`) so that
peak RSS is this model's alone, not whatever the evaluating process held before. Speeds are medians over
repeats on the same machine, meant to be read side by side in one report, not as absolute numbers.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

# (prompt tokens, new tokens): short chat turns, a long prompt with a short answer, a long answer.
REQUEST_MIX = [(32, 16), (64, 32), (128, 64), (256, 32), (32, 64), (512, 16), (128, 128), (64, 16)]


def measure_in_subprocess(spec: str, backend: str = "auto", timeout: float = 1800) -> dict:
    """`measure` in a child process; returns its JSON (with an "error" key if it failed)."""
    cmd = [sys.executable, "-m", "slmkit.eval.efficiency", spec, "--backend", backend]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    if result.returncode != 0:
        return {"error": (result.stderr.strip().splitlines() or ["failed"])[-1]}
    return json.loads(result.stdout.strip().splitlines()[-1])


def measure(spec: str, backend: str = "auto", repeats: int = 3, prompt_tokens: int = 256,
            decode_tokens: int = 64) -> dict:
    from slmkit.lm import load_lm
    from slmkit.sampling import SamplingParams
    start = time.perf_counter()
    lm = load_lm(spec, backend=backend)
    load_s = time.perf_counter() - start
    text = _reference_text()
    ids = lm.tokenizer.encode(text)
    window = min(prompt_tokens, lm.max_length - 1)
    if len(ids) < window * (repeats + 1) + 1:
        raise ValueError("the reference text is too short for the prefill measurement")

    # Prefill: a different slice each time, so no backend can reuse a cached prefix.
    prefill = []
    for r in range(repeats + 1):
        chunk = ids[r * window:(r + 1) * window]
        t = time.perf_counter()
        lm.logprobs(chunk)
        prefill.append(len(chunk) / (time.perf_counter() - t))
    prefill = prefill[1:]  # the first call warms up

    decode, first_token = [], []
    greedy = SamplingParams(max_new_tokens=decode_tokens, temperature=0.0, stop_at_eos=False)
    for r in range(repeats + 1):
        prompt = lm.tokenizer.decode(ids[r * 16:(r + 1) * 16])
        t = time.perf_counter()
        times = [time.perf_counter() for _ in lm.stream(prompt, greedy)]
        if len(times) >= 2:
            first_token.append(times[0] - t)
            decode.append((len(times) - 1) / (times[-1] - times[0]))
    decode, first_token = decode[1:], first_token[1:]

    latency = []
    for i, (n_prompt, n_new) in enumerate(REQUEST_MIX):
        n_prompt = min(n_prompt, lm.max_length - n_new - 1)
        prompt = lm.tokenizer.decode(ids[i * 37:i * 37 + n_prompt])
        t = time.perf_counter()
        "".join(lm.stream(prompt, SamplingParams(max_new_tokens=n_new, temperature=0.0, stop_at_eos=False)))
        latency.append(time.perf_counter() - t)
    out = {"model": spec, "backend": type(lm).__name__, "parameters": count_parameters(lm),
           "disk_bytes": weights_bytes(lm, spec), "load_seconds": load_s,
           "prefill_tokens_per_s": statistics.median(prefill) if prefill else None,
           "decode_tokens_per_s": statistics.median(decode) if decode else None,
           "first_token_s": statistics.median(first_token) if first_token else None,
           "latency_p50_s": _percentile(latency, 50), "latency_p95_s": _percentile(latency, 95),
           "request_mix": REQUEST_MIX, "peak_rss_bytes": _peak_rss(), "threads": os.cpu_count()}
    lm.close()
    return out


def count_parameters(lm) -> int | None:
    if hasattr(lm, "model") and hasattr(lm.model, "parameters"):
        return sum(p.numel() for p in lm.model.parameters())
    if hasattr(lm, "llm"):
        return int(lm.llm._model.n_params())
    return None


def weights_bytes(lm, spec: str) -> int | None:
    """Bytes of the weight files this backend loaded (a model directory may also keep GGUF copies); for an
    up-scaling spec, those of its three models (None when one of them is remote)."""
    from slmkit.hub import resolve_model
    from slmkit.lm.upscale import UpscaledLM
    if isinstance(lm, UpscaledLM):
        parts = [weights_bytes(m, m.name) for m in (lm.large, lm.small_base, lm.small_tuned)]
        return None if None in parts else sum(parts)
    ref = resolve_model(spec)
    if ref.kind == "remote":
        return None
    if hasattr(lm, "llm"):
        return ref.gguf_file(create=True).stat().st_size
    if ref.kind == "gguf":
        return Path(ref.location).stat().st_size
    return sum(p.stat().st_size for p in Path(ref.location).glob("*.safetensors"))


def _reference_text() -> str:
    """Fixed, realistic text every model sees the same: a file of this Python's standard library."""
    from slmkit.data.stdlib import stdlib_dir
    return (stdlib_dir() / "argparse.py").read_text(encoding="utf-8")


def _percentile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    k = (len(ordered) - 1) * q / 100
    lo, hi = int(k), min(int(k) + 1, len(ordered) - 1)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (k - lo)


def _peak_rss() -> int:
    # ru_maxrss is in kilobytes on Linux, bytes on macOS.
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model")
    parser.add_argument("--backend", default="auto")
    args = parser.parse_args()
    print(json.dumps(measure(args.model, args.backend)))


if __name__ == "__main__":
    main()
