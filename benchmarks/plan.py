"""`slm plan`'s estimates against real runs on the same machine: calibrate, predict, then run five configurations
and measure them.

    python benchmarks/plan.py --json docs/benchmark-logs/plan.json

1. pretraining: `slm train`, the micro preset, batch 16 x 256 (training tokens/s, peak RSS of the process)
2. distillation: `slm distill`, a nano student of a micro-shaped teacher (tokens/s, peak RSS)
3. LoRA: `slm finetune smollm2-135m-instruct --lora-rank 16`, batch 8 x 256 (tokens/s, peak RSS)
4. batch-1 decode: slmkit's torch backend on the micro shape, fp32 (tokens/s)
5. serving at 16 clients: the serving engine, 16 requests decoding together (aggregate tokens/s)

Training tokens/s is the median of the per-step figures the run logs (metrics.jsonl) after its first 3 steps; peak
RSS is the child process's ru_maxrss. The prediction is `estimate_run` on the calibration measured at the start
of the same run (`load_machine(recalibrate=True)`), with each run's exact shape, batch and thread count. The
issue's bar: within 20% for time and throughput, 15% for peak memory.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

SLM = [sys.executable, "-m", "slmkit.cli"]
STDLIB_PART = ["json", "email", "asyncio", "http", "logging", "unittest"]  # a few MB of real code to train on


# Runs the command and prints its ru_maxrss: forked from this small process, not from the benchmark (on Linux a
# child's ru_maxrss starts at its parent's resident size at the fork: the benchmark's, after calibrating)
WRAPPER = ("import os, sys\npid = os.fork()\nif pid == 0:\n    os.execv(sys.argv[1], sys.argv[1:])\n"
           "_, status, usage = os.wait4(pid, 0)\nprint('peak_rss_kb', usage.ru_maxrss, file=sys.stderr)\n"
           "sys.exit(os.waitstatus_to_exitcode(status))\n")


def run_child(args: list[str], log: Path) -> dict:
    """Run a command; its wall time and peak RSS (MB)."""
    t0 = time.perf_counter()
    with open(log, "w") as out:
        code = subprocess.run([sys.executable, "-S", "-c", WRAPPER, *args], stdout=out, stderr=subprocess.STDOUT)
    text = log.read_text()
    if code.returncode != 0:
        raise RuntimeError(f"{' '.join(args[:6])}... failed; see {log}:\n{text[-2000:]}")
    peak = int(text.rsplit("peak_rss_kb", 1)[1].split()[0])
    return {"seconds": time.perf_counter() - t0, "peak_rss_mb": peak / 1024}


def logged_tokens_per_s(run: Path, skip: int = 3) -> float:
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    rates = [r["tok_s"] for r in records if "tok_s" in r and r["step"] > skip]
    return statistics.median(rates)


def prepare_data(root: Path) -> Path:
    import sysconfig
    src = Path(sysconfig.get_paths()["stdlib"])
    corpus = root / "corpus"
    for name in STDLIB_PART:
        for f in (src / name).rglob("*.py"):
            target = corpus / name / f.relative_to(src / name)
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(f.read_bytes())
    data = root / "data"
    subprocess.run([*SLM, "data", "prepare", str(corpus), "-o", str(data), "--vocab-size", "4096"], check=True,
                   capture_output=True)
    return data


def lora_records(path: Path, n: int = 200) -> Path:
    """Chat records long enough to fill 256 tokens, so every batch is full width (as the estimate assumes)."""
    import random
    rng = random.Random(0)
    words = "the kettle boils water in three minutes and the refund reaches your card within five days".split()
    with open(path, "w") as f:
        for _ in range(n):
            text = " ".join(rng.choice(words) for _ in range(260))
            f.write(json.dumps({"messages": [{"role": "user", "content": "Tell me about it."},
                                             {"role": "assistant", "content": text}]}) + "\n")
    return path


def measure_decode(cfg, tokenizer, tokens: int = 64, repeats: int = 5) -> float:
    import torch

    from slmkit.lm.torch_lm import TorchLM
    from slmkit.model.llama import Transformer
    from slmkit.sampling import SamplingParams
    torch.manual_seed(0)
    lm = TorchLM(Transformer(cfg).eval(), tokenizer=tokenizer)
    params = SamplingParams(max_new_tokens=tokens, temperature=0.0, stop_at_eos=False)
    prompt = list(range(1, 17))
    rates = []
    for i in range(repeats + 1):
        t0 = time.perf_counter()
        n = sum(1 for _ in lm.stream_ids(prompt, params, None))
        if i:  # the first is a warm-up
            rates.append(n / (time.perf_counter() - t0))
    return statistics.median(rates)


def measure_serving(cfg, tokenizer, clients: int = 16, tokens: int = 64) -> float:
    import asyncio

    import torch

    from slmkit.lm.torch_lm import TorchLM
    from slmkit.model.llama import Transformer
    from slmkit.sampling import SamplingParams
    from slmkit.serve.engine import Engine, GenerationRequest
    torch.manual_seed(0)
    lm = TorchLM(Transformer(cfg).eval(), tokenizer=tokenizer)
    engine = Engine(lm, max_batch=clients, max_queue=clients)
    params = SamplingParams(max_new_tokens=tokens, temperature=0.0, stop_at_eos=False)

    async def one_round() -> tuple[int, float]:
        pendings = [engine.submit(GenerationRequest(list(range(1, 17)), params)) for _ in range(clients)]
        t0, n = time.perf_counter(), 0
        for p in pendings:
            while (ev := await p.events.get()) is not None:
                if isinstance(ev, BaseException):
                    raise ev
                n += ev.token_id is not None
        return n, time.perf_counter() - t0

    try:
        asyncio.run(one_round())  # warm-up
        rates = []
        for _ in range(3):
            n, seconds = asyncio.run(one_round())
            rates.append(n / seconds)
        return statistics.median(rates)
    finally:
        engine.close()


def decode_and_serve(machine, data: Path, micro, row) -> None:
    """4, 5. decoding and serving the micro shape."""
    from slmkit.data.tokens import dataset_tokenizer
    from slmkit.plan.estimate import estimate_run
    tokenizer = dataset_tokenizer(data)
    est = estimate_run(machine, micro, clients=16)
    row("batch-1 decode: micro, torch fp32", est.decode_tokens_per_s, measure_decode(micro, tokenizer),
        "decode tokens/s")
    row("serving: micro, 16 clients (engine)", est.serve_tokens_per_s, measure_serving(micro, tokenizer), "tokens/s")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--json", type=Path)
    ap.add_argument("--steps", type=int, default=20, help="per training run (distill and finetune log every 10)")
    ap.add_argument("--skip-training", action="store_true", help="only the decoding and serving configurations")
    ap.add_argument("--lora-only", action="store_true", help="only the LoRA configuration, also against the "
                    "estimate without the calibration's LoRA steps (train_fit with 4/6 of the FLOPs)")
    args = ap.parse_args()

    import dataclasses

    import torch

    from slmkit.hub import pull
    from slmkit.model.config import ModelConfig, load_json, model_config
    from slmkit.plan.advise import LORA_RANK, _lora_params
    from slmkit.plan.estimate import estimate_run
    from slmkit.plan.machine import load_machine
    threads = torch.get_num_threads()
    machine = load_machine(recalibrate=True)
    root = Path(tempfile.mkdtemp(prefix="plan-bench-"))
    data = None if args.lora_only else prepare_data(root)
    vocab = 4096 if data is None else json.loads((data / "meta.json").read_text())["vocab_size"]
    common = ["--max-steps", str(args.steps), "--eval-every", "0", "--save-every", "1000", "--warmup-steps", "2"]
    rows = []

    def row(name, predicted, measured, unit):
        error = (predicted - measured) / measured
        rows.append({"config": name, "unit": unit, "predicted": predicted, "measured": measured, "error": error})
        print(f"{name:<42} {unit:<16} predicted {predicted:>10.1f}  measured {measured:>10.1f}  {error:+.0%}",
              flush=True)

    micro = model_config("micro", vocab_size=vocab)
    if not args.skip_training and not args.lora_only:
        # 1. pretraining
        run = root / "pretrain"
        got = run_child([*SLM, "train", "--data", str(data), "--out", str(run), "--preset", "micro", "--set",
                         f"vocab_size={vocab}", "--batch-size", "16", "--seq-len", "256", "--log-every", "1", *common],
                        root / "pretrain.log")
        est = estimate_run(machine, micro, batch=16, seq=256)
        row("pretraining: micro, 16 x 256", est.train_tokens_per_s, logged_tokens_per_s(run), "train tokens/s")
        row("pretraining: micro, 16 x 256", est.peak_rss_mb, got["peak_rss_mb"], "peak RSS MB")

        # 2. distillation: the micro run's model teaches a nano student
        run = root / "distill"
        nano = model_config("nano", vocab_size=vocab)
        got = run_child([*SLM, "distill", "--teacher", str(root / "pretrain" / "model"), "--data", str(data), "--out",
                         str(run), "--student", "nano", "--set", f"vocab_size={vocab}", "--batch-size", "16",
                         "--seq-len", "256", *common], root / "distill.log")
        est = estimate_run(machine, nano, batch=16, seq=256, teacher=micro)
        row("distillation: nano from micro, 16 x 256", est.train_tokens_per_s, logged_tokens_per_s(run),
            "train tokens/s")
        row("distillation: nano from micro, 16 x 256", est.peak_rss_mb, got["peak_rss_mb"], "peak RSS MB")

    if not args.skip_training:
        # 3. LoRA on SmolLM2-135M
        smol_dir = pull("smollm2-135m-instruct", log=lambda m: None)
        smol = ModelConfig.from_hf(load_json(Path(smol_dir) / "config.json"))
        run = root / "lora"
        got = run_child([*SLM, "finetune", "smollm2-135m-instruct", "--data", str(lora_records(root / "lora.jsonl")),
                         "--out", str(run), "--lora-rank", str(LORA_RANK), "--batch-size", "8", "--seq-len", "256",
                         *common], root / "lora.log")
        est = estimate_run(machine, smol, batch=8, seq=256, lora_params=_lora_params(smol))
        row("LoRA r16: SmolLM2-135M, 8 x 256", est.train_tokens_per_s, logged_tokens_per_s(run), "train tokens/s")
        row("LoRA r16: SmolLM2-135M, 8 x 256", est.peak_rss_mb, got["peak_rss_mb"], "peak RSS MB")
        if args.lora_only:  # the estimate before the calibration measured LoRA steps
            old = estimate_run(dataclasses.replace(machine, lora_fit=[]), smol, batch=8, seq=256,
                               lora_params=_lora_params(smol))
            row("LoRA r16, without lora_fit (4/6 FLOPs)", old.train_tokens_per_s, logged_tokens_per_s(run),
                "train tokens/s")

    if not args.lora_only:
        decode_and_serve(machine, data, micro, row)

    result = {"date": datetime.date.today().isoformat(), "cpu": machine.cpu, "threads": threads,
              "python": platform.python_version(), "torch": torch.__version__, "machine": machine.to_dict(),
              "load_average": os.getloadavg(), "rows": rows}
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
