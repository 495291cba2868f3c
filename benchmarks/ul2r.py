"""UL2R before/after: continue a decoder on UL2's mixture of denoisers (`slm train --objective ul2 --init MODEL`)
and measure, before and after, on held-out code:

- FIM exact match of a removed line (eval/fim.py) on the held-out `test` split (20 Lib/test files, 5 lines
  each): before, the base model from the left context alone ("prefix"); after, the same and the UL2 FIM prompt;
- left-to-right bits per byte on the dataset's validation split (first --bpb-tokens tokens), fp32;
- the built-in `python` task of `slm eval` (bits per byte on 20 other Lib/test files);
- optionally a plain causal-LM control run (--control: `--objective clm`, same data order and budget), which
  tells the effect of the denoisers apart from the effect of more training on this data.

Each measurement is appended to OUT/results.jsonl as it finishes, and a rerun skips what is already there (a
killed run keeps what it measured).

    nice python benchmarks/ul2r.py --name quickstart --model /work/bench/ul2/qs/run/model \
        --data /work/bench/ul2/qs/data --out /work/bench/ul2/quickstart --steps 150 --batch-size 4 --lr 3e-4 \
        --control   # (the control can run beside it as a second process: --control-only)
    nice python benchmarks/ul2r.py --name smollm2 --model smollm2-135m-instruct --data /work/bench/ul2/smol-data \
        --out /work/bench/ul2/smollm2 --steps 40 --batch-size 2 --seq-len 128 --lr 1e-4 --warmup 5 \
        --bpb-tokens 4096 --python-limit 2 --fim-limit 40 --after-formats fim
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import time
from pathlib import Path

import torch

from slmkit.data.tokens import TokenDataset
from slmkit.eval.fim import evaluate_fim, heldout_fim_items
from slmkit.eval.harness import evaluate as evaluate_task
from slmkit.eval.tasks import load_task
from slmkit.lm.resolve import load_lm
from slmkit.recipes.pretrain import pretrain
from slmkit.train.loop import evaluate as val_loss


def done(results: Path) -> dict[str, dict]:
    if not results.exists():
        return {}
    return {r["key"]: r for r in (json.loads(line) for line in results.read_text().splitlines() if line.strip())}


def record(results: Path, key: str, **fields) -> dict:
    rec = {"key": key, **fields, "at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    with results.open("a") as f:
        f.write(json.dumps(rec) + "\n")
        f.flush()
    print(json.dumps({k: v for k, v in rec.items() if k != "records"}), flush=True)
    return rec


def measure(results: Path, have: dict, label: str, model: str, data: TokenDataset, args, fim_formats) -> None:
    lm = None

    def open_lm():
        nonlocal lm
        if lm is None:
            lm = load_lm(model, backend="torch")
            lm.model.eval()
        return lm

    key = f"{label}/bpb"
    if key not in have:
        t = time.perf_counter()
        val = val_loss(open_lm().model, data, args.seq_len, 8, torch.device("cpu"), "fp32", args.bpb_tokens)
        record(results, key, model=model, **val, seconds=round(time.perf_counter() - t, 1))
    key = f"{label}/python"
    if key not in have:
        t = time.perf_counter()
        res = evaluate_task(open_lm(), load_task("python"), limit=args.python_limit, progress=False)
        record(results, key, model=model, bits_per_byte=res.metrics["bits_per_byte"].value, files=len(res.records),
               seconds=round(time.perf_counter() - t, 1))
    items = heldout_fim_items("test")[:args.fim_limit]
    for fmt in fim_formats:
        key = f"{label}/fim-{fmt}"
        if key not in have:
            t = time.perf_counter()
            res = evaluate_fim(open_lm(), items, fmt=fmt, context=args.context)
            record(results, key, model=model, exact_match=res["exact_match"], n=res["n"],
                   seconds=round(time.perf_counter() - t, 1), records=res["records"])


def train_run(results: Path, have: dict, label: str, args, mixture: str | None, objective: str = "ul2") -> str:
    run = Path(args.out) / label
    key = f"{label}/train"
    if key not in have:
        resume = (run / "checkpoint" / "trainer_state.json").exists()
        summary = pretrain(args.data, run, objective=objective, init_from=args.model, resume=resume,
                           ul2_mixture=mixture, seq_len=args.seq_len, batch_size=args.batch_size, lr=args.lr,
                           warmup_steps=args.warmup, max_steps=args.steps, eval_every=0,
                           eval_tokens=args.bpb_tokens or 65536, save_every=25, log_every=10, seed=0, progress=False)
        record(results, key, mixture=mixture, steps=summary["steps"], tokens=summary["tokens"],
               elapsed_s=round(summary["elapsed_s"], 1), tokens_per_s=round(summary["tokens_per_s"], 1),
               command=f"slm train --data {args.data} --out {run} --objective {objective} --init {args.model} "
                       f"{'--ul2-mixture ' + mixture + ' ' if mixture else ''}--seq-len {args.seq_len} "
                       f"--batch-size {args.batch_size} --lr {args.lr} --warmup-steps {args.warmup} "
                       f"--max-steps {args.steps} --eval-every 0")
    return str(run / "model")


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--name", required=True)
    p.add_argument("--model", required=True)
    p.add_argument("--data", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--lr", type=float, default=3e-4)
    p.add_argument("--warmup", type=int, default=20)
    p.add_argument("--mixture", default=None, help="--ul2-mixture (default: train/ul2.py's)")
    p.add_argument("--context", type=int, default=256, help="FIM prompt tokens")
    p.add_argument("--bpb-tokens", type=int, default=None, help="validation tokens for bits per byte (None: all)")
    p.add_argument("--fim-limit", type=int, default=None, help="the first N FIM test items (None: all 100)")
    p.add_argument("--python-limit", type=int, default=None, help="files of the `python` task (None: its 20)")
    p.add_argument("--after-formats", default="fim,prefix", help="FIM formats scored after training")
    p.add_argument("--control-only", action="store_true", help="only the control run (run it beside the main one)")
    p.add_argument("--control", action="store_true", help="also a plain causal-LM run (mixture C=1)")
    args = p.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    results = out / "results.jsonl"
    have = done(results)
    if "env" not in have:
        cpu = subprocess.run("lscpu | grep 'Model name'", shell=True, capture_output=True, text=True).stdout
        record(results, "env", name=args.name, cpu=cpu.split(":", 1)[-1].strip(), python=platform.python_version(),
               torch=torch.__version__, threads=torch.get_num_threads(), args=vars(args),
               note="machine shared with other jobs while measured")
    data = TokenDataset(args.data)
    if not args.control_only:
        measure(results, have, "before", args.model, data, args, ["prefix"])
        after = train_run(results, have, "ul2", args, args.mixture)
        measure(results, have, "ul2", after, data, args, args.after_formats.split(","))
    if args.control or args.control_only:
        control = train_run(results, have, "control", args, None, objective="clm")
        measure(results, have, "control", control, data, args, ["prefix"])


if __name__ == "__main__":
    main()
