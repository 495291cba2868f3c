"""Up-scaling (emulated fine-tuning, lm/upscale.py): large alone vs large + the small pair's delta vs the tuned
small model alone, on a task only the tuned small model was trained for.

    python benchmarks/upscale.py --out runs/eft --json docs/benchmark-logs/upscale.json

Task: intent recognition (`../shared/data/intent`, 7 intents), rendered as text: a prompt naming the seven labels,
the utterance, then "Intent:"; the answer is the label written out (" play_music"). Train on train.jsonl (210),
measure on all of dev.jsonl (183): dev numbers.

- large: SmolLM2-135M-Instruct (`slm pull smollm2-135m-instruct`), never trained on this task.
- small base: SmolLM2 with every `--layer-step`-th block kept (`distill.student_from_teacher`; same tokenizer,
  untrained after the cut).
- small tuned: the small base fine-tuned on the train prompts (`slm finetune`, full, `--steps` steps).

Measured per condition: greedy generation exact match (the completion's first line equals the label), with
`--score` also the accuracy of choosing the label with the highest total log-prob (`LM.score_many`: the combined
distribution's `logprobs`), 95% Wilson intervals; and batch-1 greedy decode tokens/s (32 tokens after a fixed
prompt, median of `--repeats`). The same prompt for every model.
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import statistics
import subprocess
import sys
import time
from pathlib import Path

DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "intent"  # ../shared/data from the repo
LABELS = ["add_to_playlist", "book_restaurant", "get_weather", "play_music", "rate_book", "search_creative_work",
          "search_screening_event"]


def prompt(text: str) -> str:
    return (f"Classify the request into one of: {', '.join(LABELS)}.\n"
            f"Request: {text}\nIntent:")


def read(split: str, data: Path = DATA) -> list[dict]:
    with open(data / f"{split}.jsonl", encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def prepare(out: Path, layer_step: int, steps: int, data_dir: Path = DATA) -> tuple[Path, Path]:
    """The small base (cut from SmolLM2) and the small tuned model (its fine-tune on train.jsonl); skipped when
    already there."""
    from slmkit.distill.student_init import student_from_teacher
    base = out / "small-base"
    if not (base / "model.safetensors").exists():
        student_from_teacher("smollm2-135m-instruct", base, layer_step=layer_step)
    data = out / "intent-train.jsonl"
    with open(data, "w", encoding="utf-8") as f:
        for r in read("train", data_dir):
            f.write(json.dumps({"prompt": prompt(r["text"]), "completion": " " + r["label"]}) + "\n")
    tuned = out / "small-tuned"
    if not (tuned / "model" / "model.safetensors").exists():
        subprocess.run([sys.executable, "-m", "slmkit.cli", "finetune", str(base), "-o", str(tuned),
                        "--data", str(data), "--max-steps", str(steps), "--batch-size", "8", "--lr", "3e-4",
                        "--seq-len", "128",
                        "--eval-every", "1000", "--save-every", "1000"], check=True)
    return base, tuned / "model"


def wilson(k: int, n: int, z: float = 1.96) -> tuple[float, float]:
    if n == 0:
        return (0.0, 0.0)
    p = k / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return centre - half, centre + half


def evaluate(lm, dev: list[dict], max_new_tokens: int, score: bool, generate: bool = True) -> dict:
    """Greedy generation exact match (and, with `score`, the label with the highest total log-prob)."""
    from slmkit.sampling import SamplingParams
    n = len(dev)
    out = {"n": n}
    if score:
        pairs = [(prompt(r["text"]), " " + label) for r in dev for label in LABELS]
        start = time.perf_counter()
        scores = lm.score_many(pairs)
        out["score_seconds"] = time.perf_counter() - start
        chosen = [max(range(len(LABELS)), key=lambda j: scores[i * len(LABELS) + j].logprob) for i in range(n)]
        right = sum(LABELS[c] == r["label"] for c, r in zip(chosen, dev, strict=True))
        out.update(scored_correct=right, scored_accuracy=right / n, scored_ci95=wilson(right, n))
    if not generate:
        return out
    params = SamplingParams(max_new_tokens=max_new_tokens, temperature=0.0, stop=["\n"])
    generated = []
    for r in dev:
        ids = lm.encode_prompt(prompt(r["text"]))
        generated.append(lm.tokenizer.decode(list(lm.stream_ids(ids, params, None))).split("\n")[0].strip())
    right = sum(g == r["label"] for g, r in zip(generated, dev, strict=True))
    out.update(generated_correct=right, generated_accuracy=right / n, generated_ci95=wilson(right, n),
               examples=[{"text": r["text"], "label": r["label"], "generated": g}
                         for r, g in list(zip(dev, generated, strict=True))[:20]])
    return out


def decode_speed(lm, repeats: int, new_tokens: int = 32) -> dict:
    """Batch-1 greedy decode tokens/s after a fixed prompt: tokens after the first over the time they took
    (prefill excluded), median of `repeats` after a warm-up."""
    from slmkit.sampling import SamplingParams
    params = SamplingParams(max_new_tokens=new_tokens, temperature=0.0, stop_at_eos=False)
    ids = lm.encode_prompt(prompt("Play the latest album by Nina Simone on Spotify."))
    rates = []
    for _ in range(repeats + 1):
        times = [time.perf_counter() for _ in lm.stream_ids(ids, params, None)]
        rates.append((len(times) - 1) / (times[-1] - times[0]))
    return {"decode_tokens_per_s": statistics.median(rates[1:]), "rounds": rates[1:]}


def main() -> None:
    import torch

    from slmkit.lm import load_lm
    from slmkit.lm.upscale import UpscaledLM

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=Path("runs/eft"))
    ap.add_argument("--data", type=Path, default=DATA, help="the intent data folder")
    ap.add_argument("--layer-step", type=int, default=5, help="keep every N-th of SmolLM2's 30 blocks")
    ap.add_argument("--steps", type=int, default=30, help="fine-tuning steps of the small model")
    ap.add_argument("--betas", type=float, nargs="+", default=[1.0])
    ap.add_argument("--limit", type=int, default=None, help="only the first N dev examples")
    ap.add_argument("--max-new-tokens", type=int, default=8)
    ap.add_argument("--score", action="store_true", help="also choose the label by total log-prob (7 scored "
                                                          "sequences per example: slow on 2 cores)")
    ap.add_argument("--repeats", type=int, default=3, help="rounds of the decode-speed measurement")
    ap.add_argument("--only-score", action="store_true", help="with --score: no generation, no speed probe")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    args.out.mkdir(parents=True, exist_ok=True)
    base_dir, tuned_dir = prepare(args.out, args.layer_step, args.steps, args.data)
    dev = read("dev", args.data)[:args.limit]
    large = load_lm("smollm2-135m-instruct", backend="torch")
    base = load_lm(str(base_dir), backend="torch")
    tuned = load_lm(str(tuned_dir), backend="torch")
    conditions = [("large alone", large), ("tuned small alone", tuned)]
    conditions += [(f"large + delta (beta {b:g})", UpscaledLM(large, base, tuned, beta=b)) for b in args.betas]
    results = {"date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
               "command": " ".join(sys.argv), "threads": args.threads, "torch": torch.__version__,
               "layer_step": args.layer_step, "steps": args.steps, "conditions": {}}
    for name, lm in conditions:
        r = evaluate(lm, dev, args.max_new_tokens, args.score, generate=not args.only_score)
        results["conditions"][name] = r
        scored = (f"  scored {r['scored_accuracy']:.1%} [{r['scored_ci95'][0]:.1%}, {r['scored_ci95'][1]:.1%}] "
                  f"({r['scored_correct']}/{r['n']})" if args.score else "")
        if args.only_score:
            print(f"{name:28s}{scored}", flush=True)
            continue
        r.update(decode_speed(lm, args.repeats))
        print(f"{name:28s} generated {r['generated_accuracy']:.1%} [{r['generated_ci95'][0]:.1%}, "
              f"{r['generated_ci95'][1]:.1%}] ({r['generated_correct']}/{r['n']}){scored}  "
              f"decode {r['decode_tokens_per_s']:.1f} tokens/s", flush=True)
    if args.json:
        from slmkit.files import atomic_write_json
        atomic_write_json(args.json, results)


if __name__ == "__main__":
    main()
