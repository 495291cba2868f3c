"""Training throughput and MFU of slmkit's training step: eager vs torch.compile, fp32 vs bf16, full vs chunked loss.

    python benchmarks/train_throughput.py                       # micro + stories15m, the full matrix
    python benchmarks/train_throughput.py --presets micro --steps 4 --json out.json

One step is exactly what `slmkit.train.loop.train` does per optimizer step (grad_accum 1): forward with the loss
under `slmkit.train.perf.autocast`, backward, `clip_grad_norm_(1.0)`, the fused AdamW of `make_optimizer`, zero_grad.
Batches are random tokens: data loading is not what is measured.

Each configuration runs in a fresh subprocess (this script re-invoked with `--one JSON`), so compile caches and
thread pools do not leak from one configuration into the next. By default each subprocess also gets an empty
TorchInductor cache, so the warm-up column is the cold compile a first-time user pays (`--warm-cache` reuses
the on-disk cache instead). The reported throughput is the MEDIAN step time after the warm-up steps; MFU divides
`ModelConfig.flops_per_token(seq_len)` × tokens/s by the square-matmul peak measured in this same run
(`slmkit.train.perf.matmul_peak_flops`; the bf16 peak for bf16 rows). Where the CPU has no native bf16 (AVX2-only
machines; `slmkit.train.perf.bf16_supported`), bf16 autocast is emulated and tens of times slower than fp32, so by
default only its eager full-loss row is measured, with one step; `--bf16 all` measures every bf16 row.
"""

from __future__ import annotations

import argparse
import datetime
import itertools
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time


def _threads_env(threads: int) -> dict:
    env = dict(os.environ)
    for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
        env[var] = str(threads)
    return env


# ---- one configuration (runs inside its own subprocess) --------------------------------------------------

def run_one(conf: dict) -> dict:
    import torch

    from slmkit.model.config import model_config
    from slmkit.model.llama import Transformer
    from slmkit.train.loop import TrainConfig, make_optimizer
    from slmkit.train.perf import autocast

    torch.set_num_threads(conf["threads"])
    device = torch.device(conf["device"])
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    seq_len, batch_size, precision = conf["seq_len"], conf["batch_size"], conf["precision"]

    torch.manual_seed(0)
    # As build_model does: the preset's shape, max_seq_len stretched to cover seq_len.
    mcfg = model_config(conf["preset"], max_seq_len=max(seq_len, 256))
    model = Transformer(mcfg).to(device)
    model.train()
    tcfg = TrainConfig(data="-", out="-", preset=conf["preset"], seq_len=seq_len, batch_size=batch_size,
                       max_steps=1, precision=precision, compile=conf["compile"], loss_chunk=conf["loss_chunk"])
    opt = make_optimizer(model, tcfg)
    step_fn = torch.compile(model) if conf["compile"] else model

    # A few random batches, made before timing and cycled through.
    gen = torch.Generator().manual_seed(0)
    batches = []
    for _ in range(4):
        tok = torch.randint(mcfg.vocab_size, (batch_size, seq_len + 1), generator=gen)
        batches.append((tok[:, :-1].contiguous().to(device), tok[:, 1:].contiguous().to(device)))

    def step(i: int) -> float:
        x, y = batches[i % len(batches)]
        with autocast(device, precision):
            loss = step_fn(x, y, loss_chunk=tcfg.loss_chunk)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), tcfg.grad_clip)
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss.item()  # also a sync point, as the loop's logging is

    t0 = time.perf_counter()
    warmup_times, losses = [], []  # the first warm-up step of a compiled model is where compilation happens
    for i in range(conf["warmup"]):
        sync()
        t = time.perf_counter()
        losses.append(step(i))
        sync()
        warmup_times.append(time.perf_counter() - t)
    warmup_s = time.perf_counter() - t0

    # CPU seconds per wall second over the timed steps: ~threads on an idle machine, lower when others compete.
    ru0, w0 = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
    times = []
    for i in range(conf["steps"]):
        sync()
        t = time.perf_counter()
        losses.append(step(conf["warmup"] + i))
        sync()
        times.append(time.perf_counter() - t)

    ru1 = resource.getrusage(resource.RUSAGE_SELF)
    cpu_util = (ru1.ru_utime + ru1.ru_stime - ru0.ru_utime - ru0.ru_stime) / (time.perf_counter() - w0)
    tokens = batch_size * seq_len
    med = statistics.median(times)
    return {**conf, "params": mcfg.num_params(), "flops_per_token": mcfg.flops_per_token(seq_len),
            "tokens_per_step": tokens, "warmup_s": warmup_s, "warmup_step_s": warmup_times, "step_s": times,
            "median_step_s": med, "tok_s": tokens / med, "cpu_util": cpu_util,
            "first_loss": losses[0], "last_loss": losses[-1]}


def spawn(conf: dict, timeout: float, warm_cache: bool) -> dict:
    """Run one configuration in a fresh interpreter; a failure or timeout becomes a row with an error."""
    env = _threads_env(conf["threads"])
    with tempfile.TemporaryDirectory(prefix="slmkit-bench-") as tmp:
        if not warm_cache:
            env["TORCHINDUCTOR_CACHE_DIR"] = os.path.join(tmp, "inductor")
            env["TRITON_CACHE_DIR"] = os.path.join(tmp, "triton")
        t0 = time.perf_counter()
        try:
            proc = subprocess.run([sys.executable, os.path.abspath(__file__), "--one", json.dumps(conf)],
                                  env=env, capture_output=True, text=True, timeout=timeout)
        except subprocess.TimeoutExpired:
            return {**conf, "error": f"timed out after {timeout:.0f} s"}
        wall = time.perf_counter() - t0
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
    if proc.returncode != 0 or not lines:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
        return {**conf, "error": f"exit {proc.returncode}: " + " | ".join(tail)}
    return {**json.loads(lines[-1]), "subprocess_wall_s": wall}


def measure_peaks(device_type: str, threads: int) -> dict:
    """fp32 and bf16 matmul peaks (best of several trials), in a fresh subprocess with the benchmark's threads."""
    code = (f"import json, torch; torch.set_num_threads({threads}); "
            "from slmkit.train.perf import matmul_peak_flops as m; "
            f"print(json.dumps({{p: m({device_type!r}, p) for p in ('fp32', 'bf16')}}))")
    out = subprocess.run([sys.executable, "-c", code], env=_threads_env(threads), capture_output=True, text=True,
                         check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


# ---- the matrix ----------------------------------------------------------------------------------------

def machine_info(device_type: str, threads: int) -> dict:
    import torch

    model = platform.processor() or platform.machine()
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
        for line in out.splitlines():
            if line.startswith("Model name:"):
                model = line.split(":", 1)[1].strip()
        flags = next((ln.split(":", 1)[1].split() for ln in out.splitlines() if ln.startswith("Flags:")), [])
        simd = sorted(f for f in flags if f.startswith(("avx", "amx")))
    except (OSError, subprocess.CalledProcessError):
        simd = []
    info = {"cpu": model, "cpus": os.cpu_count(), "simd": simd, "threads": threads, "torch": torch.__version__,
            "python": platform.python_version(), "date": datetime.date.today().isoformat(), "device": device_type}
    if hasattr(os, "getloadavg"):
        info["loadavg_start"] = os.getloadavg()
    if device_type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(0)
    return info


def table(rows: list[dict], peaks: dict) -> str:
    head = ("| preset | compile | precision | loss_chunk | median tok/s | MFU | vs eager fp32 | steps (spread) | "
            "CPU/wall | warmup s |")
    lines = [head, "|" + "---|" * (head.count(" | ") + 1)]
    note = ""
    anchors = {r["preset"]: r["tok_s"] for r in rows
               if "tok_s" in r and not r["compile"] and r["precision"] == "fp32" and r["loss_chunk"] == 0}
    for r in rows:
        cols = [r["preset"], "compile" if r["compile"] else "eager", r["precision"], str(r["loss_chunk"])]
        if "tok_s" not in r:
            what = f"skipped: {r['skipped']}" if "skipped" in r else f"failed: {r['error'][:100]}"
            lines.append("| " + " | ".join(cols + [what, "", "", "", "", ""]) + " |")
            continue
        mfu = r["flops_per_token"] * r["tok_s"] / peaks[r["precision"]]
        anchor = anchors.get(r["preset"])
        ratio = f"{r['tok_s'] / anchor:.2f}×" if anchor else "n/a"
        n, runs = len(r["step_s"]), r.get("runs_tok_s", [r["tok_s"]])
        if len(runs) > 1:  # spread of the per-run medians
            spread = f"{len(runs)}×{n // len(runs)} (±{(max(runs) - min(runs)) / 2 / r['tok_s']:.0%} over runs)"
        else:  # spread of the single run's step times
            spread = f"{n} (±{(max(r['step_s']) - min(r['step_s'])) / 2 / r['median_step_s']:.0%})" if n > 1 else "1"
        cols += [f"{r['tok_s']:,.0f}", f"{mfu:.1%}" + ("†" if mfu > 1 else ""), ratio, spread,
                 f"{r['cpu_util']:.2f}", f"{r['warmup_s']:.1f}"]
        lines.append("| " + " | ".join(cols) + " |")
        if mfu > 1:
            note = (f"† MFU above 100%: this machine's {r['precision']} matmul speed depends strongly on shape, so "
                    f"the square-matmul peak is no ceiling for this row's matmuls; against the fp32 peak it is "
                    f"{r['flops_per_token'] * r['tok_s'] / peaks['fp32']:.1%}.")
    return "\n".join(lines) + (f"\n\n{note}" if note else "")


def _bf16_native(device_type: str) -> bool:
    import torch

    from slmkit.train.perf import bf16_supported

    return bf16_supported(torch.device(device_type))


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--presets", nargs="+", default=["micro", "stories15m"])
    p.add_argument("--steps", type=int, default=8, help="timed steps per configuration; the median is reported")
    p.add_argument("--warmup", type=int, default=1,
                   help="untimed steps first; compilation happens in the first (default 1: the second step of a "
                        "compiled model already runs at full speed)")
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--batch-size", type=int, default=16, help="sequences per step")
    p.add_argument("--loss-chunk", type=int, default=1024,
                   help="positions per chunk for the chunked-loss rows (0: full-loss rows only)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--modes", nargs="+", default=["eager", "compile"], choices=["eager", "compile"])
    p.add_argument("--bf16", default="auto", choices=["auto", "all", "none"],
                   help="bf16-autocast rows. auto: all of them where the hardware does bf16 natively; otherwise "
                        "(emulated bf16, tens of times slower) only eager with the full loss, --bf16-steps steps and "
                        "no warm-up, to show the cost. all: every bf16 row. none: fp32 only")
    p.add_argument("--bf16-steps", type=int, default=None,
                   help="timed steps for bf16 rows (default: --steps, or 1 where bf16 is emulated)")
    p.add_argument("--repeat", type=int, default=1,
                   help="run the whole matrix this many times, round-robin, and report the median over runs "
                        "(on a shared machine); the warm-up column is the first run's")
    p.add_argument("--timeout", type=float, default=900, help="seconds before one configuration is abandoned")
    p.add_argument("--warm-cache", action="store_true",
                   help="reuse the on-disk TorchInductor cache (default: a fresh one per configuration, so the "
                        "warm-up column shows a cold compile)")
    p.add_argument("--json", help="write machine info, peaks and every row (with all step times) here")
    p.add_argument("--one", help=argparse.SUPPRESS)
    args = p.parse_args(argv)

    if args.one:
        print(json.dumps(run_one(json.loads(args.one))), flush=True)
        return

    t_start = time.perf_counter()
    info = machine_info(args.device, args.threads)
    native_bf16 = _bf16_native(args.device)
    info["bf16_native"] = native_bf16
    peaks = measure_peaks(args.device, args.threads)
    print(f"# {info['cpu']}, {info['cpus']} CPUs ({' '.join(info['simd']) or 'no AVX'}, native bf16: "
          f"{native_bf16}), torch {info['torch']}, {args.threads} threads, {info['date']}", flush=True)
    print(f"# matmul peak at the start: fp32 {peaks['fp32'] / 1e9:.1f} GFLOP/s, bf16 {peaks['bf16'] / 1e9:.2f} "
          f"GFLOP/s", flush=True)
    bf16_steps = args.bf16_steps or (args.steps if native_bf16 else 1)

    precisions = ["fp32"] if args.bf16 == "none" else ["fp32", "bf16"]
    plan = []  # (label, conf) to run, or (label, row) already decided as skipped
    chunks = [0, args.loss_chunk] if args.loss_chunk > 0 else [0]
    for preset, mode, precision, chunk in itertools.product(args.presets, args.modes, precisions, chunks):
        conf = {"preset": preset, "compile": mode == "compile", "precision": precision, "loss_chunk": chunk,
                "seq_len": args.seq_len, "batch_size": args.batch_size, "steps": args.steps, "warmup": args.warmup,
                "threads": args.threads, "device": args.device}
        label = f"{preset:<10} {mode:<7} {precision} chunk={chunk:<5}"
        if precision == "bf16":
            conf["steps"] = bf16_steps
            if args.bf16 == "auto" and not native_bf16:
                if mode == "compile" or chunk:
                    plan.append((label, {**conf, "skipped": "no native bf16 here (see eager bf16 row); "
                                                           "--bf16 all runs it"}))
                    continue
                conf["warmup"] = 0  # a single eager step of tens of seconds: allocation warm-up is noise
        plan.append((label, conf))

    # Rounds go through the whole matrix in turn, so a neighbour's burst of load hits every configuration alike.
    runs: list[list[dict]] = [[] for _ in plan]
    for rnd in range(args.repeat):
        for (label, conf), done in zip(plan, runs, strict=True):
            if "skipped" in conf:
                if rnd == 0:
                    print(f"  {label} skipped (emulated bf16)", file=sys.stderr, flush=True)
                continue
            if hasattr(os, "getloadavg"):
                conf = {**conf, "loadavg_before": os.getloadavg()[0]}
            row = spawn(conf, args.timeout, args.warm_cache)
            done.append(row)
            if "error" in row:
                print(f"  {label} FAILED {row['error']}", file=sys.stderr, flush=True)
            else:
                print(f"  {label} {row['tok_s']:8,.0f} tok/s  warmup {row['warmup_s']:5.1f} s  CPU/wall "
                      f"{row['cpu_util']:.2f}  loss {row['first_loss']:.2f}->{row['last_loss']:.2f}",
                      file=sys.stderr, flush=True)
            if args.json:  # partial results survive an interrupted run
                _write_json(args.json, info, args, peaks, None, runs)
    rows = [merge_runs(conf, done) for (_, conf), done in zip(plan, runs, strict=True)]

    # The peak again at the end: the machine may be shared, so show how much it moved; MFU uses the higher one.
    peaks_end = measure_peaks(args.device, args.threads)
    best = {k: max(peaks[k], peaks_end[k]) for k in peaks}
    print(f"# matmul peak at the end:   fp32 {peaks_end['fp32'] / 1e9:.1f} GFLOP/s, bf16 "
          f"{peaks_end['bf16'] / 1e9:.2f} GFLOP/s (MFU uses the higher of start and end)")
    print(f"# seq_len {args.seq_len}, batch {args.batch_size} sequences = {args.seq_len * args.batch_size:,} "
          f"tokens/step; chunked loss = {args.loss_chunk} positions per chunk; warm-up "
          f"{'warm' if args.warm_cache else 'cold'} inductor cache\n")
    print(table(rows, best))
    total = time.perf_counter() - t_start
    print(f"\n# total {total / 60:.1f} min")
    if args.json:
        if hasattr(os, "getloadavg"):
            info["loadavg_end"] = os.getloadavg()
        _write_json(args.json, {**info, "total_s": total}, args, peaks, peaks_end, runs, rows)


def merge_runs(conf: dict, done: list[dict]) -> dict:
    """One row per configuration: the median over rounds of each round's median tokens/s."""
    ok = [r for r in done if "tok_s" in r]
    if "skipped" in conf:
        return conf
    if not ok:
        return done[0] if done else {**conf, "error": "not run"}
    tok_s = statistics.median(r["tok_s"] for r in ok)
    return {**ok[0], "tok_s": tok_s, "median_step_s": ok[0]["tokens_per_step"] / tok_s,
            "step_s": [t for r in ok for t in r["step_s"]], "runs_tok_s": [r["tok_s"] for r in ok],
            "cpu_util": min(r["cpu_util"] for r in ok),  # the most contended round
            "warmup_s": ok[0]["warmup_s"]}  # the first round's: a cold compile unless --warm-cache


def _write_json(path: str, info: dict, args, peaks: dict, peaks_end: dict | None, runs: list, rows=None) -> None:
    out = {"machine": info, "args": vars(args), "peaks_start": peaks, "peaks_end": peaks_end, "runs": runs}
    if peaks_end:
        out["peaks_used"] = {k: max(peaks[k], peaks_end[k]) for k in peaks}
    if rows is not None:
        out["rows"] = rows
    with open(path, "w", encoding="utf-8") as f:
        json.dump(out, f, indent=1)


if __name__ == "__main__":
    main()
