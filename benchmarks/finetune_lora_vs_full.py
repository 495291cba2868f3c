"""LoRA vs full fine-tuning of one model on one SFT file, for the same wall-clock budget, one after the other.

    python benchmarks/finetune_lora_vs_full.py --model smollm2-135m-instruct --data runs/ni-mix/train.jsonl \
        --minutes 5 --out runs/lora-vs-full --variant full:lr=5e-5 --variant lora:lora_rank=8,lr=5e-4

Each variant is `slm finetune` in its own process (so its peak RSS is its own, read with wait4); the table
shows trainable parameters, peak RSS, tokens/s (positions computed, padding included; the same batches for
every variant) and the final validation loss on the answers, against the untrained model's loss on them.
Results are appended to OUT/results.jsonl.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path


def run_variant(name: str, options: str, args) -> dict:
    out = args.out / name
    cmd = [sys.executable, "-m", "slmkit.cli", "finetune", args.model, "--data", str(args.data), "--out", str(out),
           "--seq-len", str(args.seq_len), "--batch-size", str(args.batch_size), "--max-minutes", str(args.minutes),
           "--eval-every", "0", "--save-every", "0", "--precision", args.precision]
    for item in filter(None, options.split(",")):
        key, value = item.split("=", 1)
        cmd += [f"--{key.replace('_', '-')}", value]
    print("$", " ".join(cmd), flush=True)
    proc = subprocess.Popen(cmd)
    _, status, usage = os.wait4(proc.pid, 0)
    if status != 0:
        raise SystemExit(f"variant {name} failed (status {status})")
    metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    final = next(m for m in reversed(metrics) if m.get("final"))
    steps = [m for m in metrics if "tok_s" in m]
    provenance = json.loads((out / "model" / "slmkit.json").read_text())["metrics"]
    return {"variant": name, "options": options, "model": args.model, "minutes": args.minutes,
            "trainable_parameters": provenance["trainable_parameters"], "parameters": provenance["parameters"],
            "peak_rss_mib": round(usage.ru_maxrss / 1024), "tokens_per_s": round(provenance["tokens_per_s"], 1),
            "steps": steps[-1]["step"], "final_val_loss": round(final["val_loss"], 4),
            "final_val_bpb": round(final["val_bpb"], 4)}


def base_row(args) -> dict:
    """The model before any training, on the same validation answers (the anchor for the final losses)."""
    import torch

    from slmkit.formats.hf_dir import load_model_dir
    from slmkit.hub import resolve_model
    from slmkit.train.loop import TrainConfig, evaluate, open_training_data
    location = resolve_model(args.model).location
    cfg = TrainConfig(data=str(args.data), out=str(args.out / "base"), init_from=location, seq_len=args.seq_len,
                      max_steps=1)  # a budget is required; nothing is trained here
    data, _ = open_training_data(cfg)
    final = evaluate(load_model_dir(location).eval(), data, args.seq_len, args.batch_size, torch.device("cpu"), "fp32")
    return {"variant": "base", "options": "no training", "model": args.model, "trainable_parameters": 0,
            "final_val_loss": round(final["val_loss"], 4), "final_val_bpb": round(final["val_bpb"], 4)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--data", type=Path, required=True)
    ap.add_argument("--minutes", type=float, default=10)
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--precision", default="fp32")
    ap.add_argument("--variant", action="append", required=True, help="NAME:key=value,... (finetune options)")
    ap.add_argument("--out", type=Path, default=Path("runs/lora-vs-full"))
    args = ap.parse_args()
    rows = [base_row(args)]
    for spec in args.variant:
        name, _, options = spec.partition(":")
        row = run_variant(name, options, args)
        rows.append(row)
        args.out.mkdir(parents=True, exist_ok=True)
        with (args.out / "results.jsonl").open("a") as f:
            f.write(json.dumps(row) + "\n")
    print("\n| variant | trainable params | peak RSS | tokens/s | steps | final val loss |\n|---|---|---|---|---|---|")
    print(f"| base (no training) | - | - | - | - | {rows[0]['final_val_loss']:.4f} |")
    for r in rows[1:]:
        print(f"| {r['variant']} ({r['options']}) | {r['trainable_parameters']:,} of {r['parameters']:,} | "
              f"{r['peak_rss_mib']:,} MiB | {r['tokens_per_s']:,.0f} | {r['steps']} | {r['final_val_loss']:.4f} |")


if __name__ == "__main__":
    main()
