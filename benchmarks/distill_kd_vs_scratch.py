"""Knowledge distillation vs training from scratch: same student, same data, same token budget.

    python benchmarks/distill_kd_vs_scratch.py --out runs/kd --cache-tokens 262144 --epochs 1 \
        --variants scratch kd-fkl --log docs/benchmark-logs/distill_kd_vs_scratch.jsonl

1. data: this Python's standard library (the quickstart corpus: no tests, no site-packages), tokenized with the
   teacher's tokenizer (SmolLM2's 49,152 tokens), 2% of files held out for validation;
2. teacher cache: SmolLM2-135M-Instruct (`slm pull smollm2-135m-instruct`) run once over the first
   --cache-tokens training tokens, top-16 log-probs per position (`slm teacher-cache`);
3. students (about 17M parameters: dim 256, 6 layers, the teacher's vocabulary, tied embeddings), each trained
   for --epochs passes over exactly those cached windows, in the same order, with the same seed:
   - scratch: alpha 0 (the real text's cross-entropy only; the cache is read but has no weight),
   - kd-fkl / kd-rkl / kd-jsd: alpha --alpha on the divergence from the teacher's top-16 (+ the rest);
   - seqkd: sequence-level KD, no logits: the first --seqkd-tokens of those windows with only their first
     --prompt-tokens real tokens, the rest written by the teacher (`slm teacher-text`, temperature 0.8), plain
     cross-entropy on that text, for the same token budget (several passes when --seqkd-tokens is smaller).
Validation cross-entropy against the real held-out text is logged every --eval-every steps; the summary reports
each student's final loss and how many training tokens the distilled student needed to reach the scratch
student's final loss. Each finished variant is appended to --log; rerunning skips finished ones.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

TEACHER = "smollm2-135m-instruct"
STUDENT = dict(dim=256, n_layers=6, n_heads=4, n_kv_heads=2, hidden_dim=768, tie_embeddings=True)


def prepare(out: Path, log) -> Path:
    from slmkit.data.prepare import prepare_dataset
    from slmkit.data.stdlib import STDLIB_EXCLUDE, stdlib_dir
    from slmkit.hub import resolve_model
    data = out / "data"
    if not (data / "meta.json").exists():
        prepare_dataset([str(stdlib_dir() / "**" / "*.py")], data, tokenizer=resolve_model(TEACHER).location,
                        val_fraction=0.02, exclude=STDLIB_EXCLUDE, log=log)
    return data


def tokens_to_reach(curve: list[tuple[int, float]], target: float) -> int | None:
    """First training-token count at which a validation curve is at or below `target` (linear interpolation)."""
    for (t0, l0), (t1, l1) in zip(curve, curve[1:], strict=False):
        if l1 <= target:
            return int(t0 + (t1 - t0) * (l0 - target) / (l0 - l1)) if l0 > target else t0
    return None


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default="runs/kd")
    ap.add_argument("--cache-tokens", type=int, default=262144)
    ap.add_argument("--top-k", type=int, default=16)
    ap.add_argument("--epochs", type=float, default=1.0)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--alpha", type=float, default=0.5)
    ap.add_argument("--prompt-tokens", type=int, default=32)
    ap.add_argument("--seqkd-tokens", type=int, default=131072, help="windows of teacher text (CPU generation is "
                    "~140 tokens/s, so fewer than the cache; the student still trains for the same token budget)")
    ap.add_argument("--eval-every", type=int, default=16)
    ap.add_argument("--eval-tokens", type=int, default=16384)
    ap.add_argument("--variants", nargs="+", default=["scratch", "kd-fkl"])
    ap.add_argument("--log", default="runs/kd/results.jsonl")
    args = ap.parse_args()

    from slmkit.distill.teacher_text import write_teacher_text
    from slmkit.distill.topk_cache import build_topk_cache
    from slmkit.train.loop import TrainConfig, train
    from slmkit.train.metrics import read_metrics
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    data = prepare(out, print)
    cache = out / f"cache-top{args.top_k}-{args.cache_tokens}"
    if not (cache / "meta.json").exists():
        build_topk_cache(TEACHER, data, cache, seq_len=args.seq_len, top_k=args.top_k,
                         max_tokens=args.cache_tokens)
    cache_meta = json.loads((cache / "meta.json").read_text())
    log_path = Path(args.log)
    done = {r["variant"]: r for r in map(json.loads, log_path.read_text().splitlines())} \
        if log_path.exists() else {}

    for variant in args.variants:
        if variant in done:
            continue
        run = out / variant
        train_data, distill, teacher_speed = data, None, cache_meta["teacher_tokens_per_s"]
        if variant == "seqkd":
            train_data = out / f"teacher-text-{args.seqkd_tokens}"
            if not (train_data / "meta.json").exists():
                write_teacher_text(TEACHER, data, train_data, prompt_tokens=args.prompt_tokens, seq_len=args.seq_len,
                                   max_tokens=args.seqkd_tokens, batch_size=32)
            teacher_speed = json.loads((train_data / "meta.json").read_text())["teacher_text"]["teacher_tokens_per_s"]
        else:
            loss = "fkl" if variant == "scratch" else variant.split("-", 1)[1]
            distill = {"cache": str(cache), "loss": loss, "alpha": 0.0 if variant == "scratch" else args.alpha}
        cfg = TrainConfig(data=str(train_data), out=str(run), preset="micro", model_overrides=STUDENT,
                          seq_len=args.seq_len, batch_size=args.batch_size, lr=args.lr, warmup_steps=20,
                          max_tokens=int(args.epochs * cache_meta["tokens"]), eval_every=args.eval_every,
                          eval_tokens=args.eval_tokens, save_every=0, precision="fp32", seed=0, distill=distill)
        t0 = time.perf_counter()
        summary = train(cfg, resume=(run / "checkpoint").exists())
        curve = [(r["tokens"], r["val_loss"]) for r in read_metrics(run / "metrics.jsonl") if "val_loss" in r]
        rec = {"variant": variant, "distill": distill, "parameters": summary["parameters"],
               "train_tokens": summary["tokens"], "final_val_loss": summary["val_loss"],
               "final_val_bpb": summary["val_bpb"], "student_tokens_per_s": round(summary["tokens_per_s"], 1),
               "seconds": round(time.perf_counter() - t0, 1), "curve": curve,
               "teacher": TEACHER, "teacher_tokens_per_s": teacher_speed,
               "cache_tokens": cache_meta["tokens"], "top_k": cache_meta["top_k"],
               "cache_bytes_per_token": cache_meta["bytes_per_token"]}
        with open(log_path, "a") as f:
            f.write(json.dumps(rec) + "\n")
        done[variant] = rec

    if "scratch" not in done:
        return
    # The periodic checks use the first --eval-tokens of val; the loop's final check uses all of it. Score each
    # final model on the same subset too, so "tokens to reach" compares like with like.
    for r in done.values():
        r["curve"] = r["curve"] + [(r["train_tokens"], subset_loss(out / r["variant"], data, args))]
    target = done["scratch"]["curve"][-1][1]
    print(f"\nteacher {TEACHER}: {cache_meta['teacher_tokens_per_s']:,.0f} tokens/s building the cache "
          f"({cache_meta['tokens']:,} positions, top-{cache_meta['top_k']}, {cache_meta['bytes_per_token']} "
          "bytes/token)")
    print(f"{'variant':8} {'val loss':>9} {'bits/byte':>9} {'subset':>7} {'tok/s':>6} {'teacher tok/s':>13}  "
          "tokens to reach scratch's final subset loss")
    for name, r in done.items():
        reach = tokens_to_reach(r["curve"], target)
        teacher = r["teacher_tokens_per_s"] if r["distill"] is None or r["distill"]["alpha"] else "-"
        print(f"{name:8} {r['final_val_loss']:9.4f} {r['final_val_bpb']:9.4f} {r['curve'][-1][1]:7.3f} "
              f"{r['student_tokens_per_s']:6.0f} {teacher:>13}  "
              + (f"{reach:,} ({reach / r['train_tokens']:.0%} of the budget)" if reach else "not reached"))


def subset_loss(run: Path, data: Path, args) -> float:
    import torch

    from slmkit.data.tokens import TokenDataset
    from slmkit.formats.hf_dir import load_model_dir
    from slmkit.train.loop import evaluate
    model = load_model_dir(run / "model")
    return evaluate(model, TokenDataset(data), args.seq_len, args.batch_size, torch.device("cpu"), "fp32",
                    args.eval_tokens)["val_loss"]

if __name__ == "__main__":
    main()
