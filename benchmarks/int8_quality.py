"""int8 weights' quality check: validation loss of the same model with fp32 and int8 weights (`--weights int8`).

    python benchmarks/int8_quality.py --models smollm2-135m-instruct runs/quickstart/run runs/kd/kd-fkl \
        --json int8_quality.json

Each model scores the same held-out Python files (standard-library modules no quickstart run trains on:
`eval.tasks.heldout_python`) in 512-token windows: with its fp32 weights, then after `quantize_int8` (per-channel
int8 weights) with both kernels: "dynamic" (the CPU kernel, activations rounded to 8 bits too) and "weight-only".
Reported: cross-entropy per token for each, its relative change, and the kernel `--weights int8` picks for the
model (its calibration check: dynamic unless that raises the loss on a built-in text by more than 1%).
The target (issue 4) is within 1% of fp32.
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import sys
import time
from pathlib import Path


def main() -> None:
    from slmkit.eval.perplexity import text_bits_per_byte
    from slmkit.eval.tasks import heldout_python
    from slmkit.formats import load_any
    from slmkit.hub import resolve_model
    from slmkit.model.quantize import Int8Linear, calibration_ids, decode_bytes, quantize_int8

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", nargs="+", default=["smollm2-135m-instruct"])
    ap.add_argument("--files", type=int, default=8, help="held-out Python files")
    ap.add_argument("--max-bytes", type=int, default=4096, help="bytes read from each file")
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--json", help="also write the results here")
    args = ap.parse_args()
    texts = [item["text"] for item in heldout_python(args.files, args.max_bytes)]
    rows = []
    for spec in args.models:
        model, tokenizer = load_any(resolve_model(spec).location)
        seq_len = min(args.seq_len, model.cfg.max_seq_len)
        row = {"model": spec, "params": model.num_params(), "fp32_decode_mb": decode_bytes(model) / 1e6}
        t = time.perf_counter()
        fp32 = text_bits_per_byte(model, tokenizer, texts, seq_len=seq_len)
        row["fp32_s"] = time.perf_counter() - t
        picked = quantize_int8(model, calibration_ids(tokenizer, min(512, model.cfg.max_seq_len)))
        row.update(picked=picked["kernel"], int8_decode_mb=decode_bytes(model) / 1e6, tokens=fp32["tokens"],
                   bytes=fp32["bytes"], fp32_loss=fp32["loss"], fp32_bpb=fp32["bits_per_byte"])
        for kernel in ("dynamic", "weight-only"):
            for m in model.modules():
                if isinstance(m, Int8Linear):
                    m.dynamic = kernel == "dynamic"
            t = time.perf_counter()
            r = text_bits_per_byte(model, tokenizer, texts, seq_len=seq_len)
            row[f"{kernel}_s"] = time.perf_counter() - t
            row[f"{kernel}_loss"], row[f"{kernel}_bpb"] = r["loss"], r["bits_per_byte"]
            row[f"{kernel}_change"] = r["loss"] / fp32["loss"] - 1
        rows.append(row)
        print(json.dumps(row), file=sys.stderr, flush=True)
    print(f"\n{len(texts)} held-out Python files, {rows[0]['bytes']:,} bytes\n")
    print("| model | params | weights read per token fp32 → int8 | loss fp32 | int8 dynamic | int8 weight-only | "
          "`--weights int8` picks |")
    print("|---|---:|---:|---:|---:|---:|---|")
    for r in rows:
        print(f"| {r['model']} | {r['params'] / 1e6:.1f}M | {r['fp32_decode_mb']:.0f} → {r['int8_decode_mb']:.0f} MB | "
              f"{r['fp32_loss']:.4f} | {r['dynamic_loss']:.4f} ({100 * r['dynamic_change']:+.2f}%) | "
              f"{r['weight-only_loss']:.4f} ({100 * r['weight-only_change']:+.2f}%) | {r['picked']} |")
    if args.json:
        meta = {"date": datetime.datetime.now().isoformat(timespec="seconds"),
                "machine": platform.processor() or platform.machine(), "command": " ".join(sys.argv)}
        Path(args.json).write_text(json.dumps({"meta": meta, "results": rows}, indent=2))


if __name__ == "__main__":
    main()
