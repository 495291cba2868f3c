"""How often a seeded answer is right under the model's sampling defaults vs slmkit's old fixed default.

    python benchmarks/sampling_defaults.py --seeds 30 --json sampling_defaults.json

The question is the README's: "What is the capital of France?" to SmolLM2-135M-Instruct through its chat template
(what `slm generate smollm2-135m-instruct "..."` does), one answer per seed, counted right when it says "Paris".
Settings: the model's defaults (`lm.sampling_params()`: SmolLM2's published temperature 0.2 / top-p 0.9 over
llama.cpp's top-k 40 / min-p 0.05), and slmkit's earlier default (temperature 0.8, no top-k / top-p / min-p), for
the torch and llama.cpp backends. The pulled weights are the Q4_1 GGUF: its first token nearly ties "The" (-> Paris)
and "L" (-> "L'Étoile..."), so no sampler makes every seed right; greedy decoding is.
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform

QUESTION = "What is the capital of France?"


def main() -> None:
    from slmkit.lm import load_lm

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--backends", nargs="+", default=["torch", "llamacpp"])
    ap.add_argument("--seeds", type=int, default=30)
    ap.add_argument("--max-new-tokens", type=int, default=24)
    ap.add_argument("--json", help="also write the results here")
    args = ap.parse_args()
    settings = {"model defaults": {},
                "old default (temperature 0.8, no filters)": {"temperature": 0.8, "top_k": 0, "top_p": 1.0,
                                                              "min_p": 0.0}}
    rows = []
    for backend in args.backends:
        lm = load_lm(args.model, backend=backend)
        messages = [{"role": "user", "content": QUESTION}]
        for name, fields in settings.items():
            answers = ["".join(lm.stream_chat(messages, lm.sampling_params(
                seed=seed, max_new_tokens=args.max_new_tokens, **fields))) for seed in range(args.seeds)]
            right = sum("Paris" in a for a in answers)
            params = lm.sampling_params(**fields)
            rows.append({"backend": backend, "setting": name, "right": right, "seeds": args.seeds,
                         "temperature": params.temperature, "top_k": params.top_k, "top_p": params.top_p,
                         "min_p": params.min_p, "first_answers": answers[:3]})
            print(f"{backend:<9} {name:<44} Paris {right}/{args.seeds}  (seeds 0-2: "
                  f"{['Paris' in a for a in answers[:3]]})", flush=True)
        lm.close()
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"date": datetime.datetime.now().isoformat(timespec="seconds"), "cpu": cpu_name(),
                       "question": QUESTION, "rows": rows}, f, indent=2)


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            return next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.machine()


if __name__ == "__main__":
    main()
