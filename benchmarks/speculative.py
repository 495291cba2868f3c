"""Greedy decoding speed, plain vs speculative (lm/speculative.py), on prompts whose answer copies the prompt.

    python benchmarks/speculative.py --json docs/benchmark-logs/speculative.json
    python benchmarks/speculative.py --backend llamacpp --drafts ngram \
        --json docs/benchmark-logs/speculative_llamacpp.json
    python benchmarks/speculative.py --engine --draft-k 4 --json docs/benchmark-logs/speculative_engine.json

Target: SmolLM2-135M-Instruct on slmkit's torch backend (fp32), or through llama.cpp (`--backend llamacpp`: the
GGUF `slm pull` gives; plain decoding is then `LlamaCppLM.stream_ids`, llama.cpp's own loop), each prompt
through its chat template, greedy, up to 128 new tokens, ending at the end of the turn. Drafts (`--drafts`):
`ngram` (prompt lookup, no model), and a small model with the same tokenizer: SmolLM2 with every
`--layer-step`-th block kept (`distill.student_from_teacher`, untrained: the only same-tokenizer draft at hand;
`--draft DIR` takes another). Each configuration decodes every prompt once after a warm-up, in `--repeats`
rounds over all configurations; tokens/s counts generated tokens over the median wall time of `stream_ids` for
all prompts. The speculative outputs are compared with plain decoding token by token.

`--engine`: all prompts at once through the serving engine (serve/engine.py, `slm serve`'s continuous batching,
the draft model's rows beside the target's), plus "one at a time", the draft model through `stream_ids` prompt
after prompt (how `slm serve --draft MODEL` served before the engine batched draft models); tokens/s is then
all generated tokens over the wall time of the whole batch (no per-prompt rates).
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import json
import statistics
import tempfile
import time

import torch

CODE = '''def moving_average(values, window):
    total = 0.0
    out = []
    for i, value in enumerate(values):
        total += value
        if i >= window:
            total -= values[i - window]
        if i >= window - 1:
            out.append(total / window)
    return out
'''
TEXT = ("The comittee met on Tuesday to discuss the new budjet. After a long debate, the members agreed to "
        "increase the funding for the libary and to reduce the spending on office suplies. The decision will be "
        "anounced to the public next week.")
PROMPTS = [
    f"Rename the variable `total` to `running_sum` in this function. Reply with the whole function.\n\n{CODE}",
    f"Add a docstring to this function. Reply with the whole function.\n\n{CODE}",
    f"Fix the spelling mistakes in this paragraph and reply with the corrected paragraph only.\n\n{TEXT}",
    f"Repeat this paragraph word for word.\n\n{TEXT}",
]


def run(lm, prompts: list[list[int]], params) -> tuple[list[list[int]], list[float]]:
    """The outputs and the seconds each took."""
    outputs, seconds = [], []
    for ids in prompts:
        start = time.perf_counter()
        outputs.append(list(lm.stream_ids(ids, params, None)))
        seconds.append(time.perf_counter() - start)
    return outputs, seconds


def run_engine(lm, prompts: list[list[int]], params) -> tuple[list[list[int]], list[float]]:
    """The outputs of all prompts decoded together by the serving engine, and the wall time split evenly."""
    from slmkit.lm.base import end_ids
    from slmkit.serve.engine import Engine, GenerationRequest
    engine = Engine(lm, max_batch=len(prompts), max_queue=len(prompts))

    ends = end_ids(params, lm.eos_id, lm.bos_id)  # the engine reports the end token, stream_ids does not

    async def one(ids):
        return [ev.token_id async for ev in engine.generate(GenerationRequest(ids, params))
                if ev.token_id is not None and ev.token_id not in ends]

    async def together():
        return await asyncio.gather(*map(one, prompts))

    try:
        start = time.perf_counter()
        outputs = asyncio.run(together())
        wall = time.perf_counter() - start
    finally:
        engine.close()
    if "drafted_tokens" in engine.stats.extra:  # the engine counts per step, not per target forward
        lm.stats.drafted += engine.stats.extra["drafted_tokens"]
        lm.stats.accepted += engine.stats.extra["accepted_tokens"]
    return outputs, [wall / len(prompts)] * len(prompts)


def main() -> None:
    from slmkit.lm import load_lm
    from slmkit.lm.speculative import SpeculativeLM, SpeculativeStats

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--draft", help="a draft model directory (default: the target with every --layer-step-th block)")
    ap.add_argument("--layer-step", type=int, default=3)
    ap.add_argument("--draft-k", type=int, nargs="+", default=[4, 8])
    ap.add_argument("--backend", default="torch", choices=["torch", "llamacpp"], help="the target's (and draft's)")
    ap.add_argument("--drafts", nargs="+", default=["ngram", "model"], choices=["ngram", "model"])
    ap.add_argument("--max-new-tokens", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=3, help="timed rounds; the median is reported")
    ap.add_argument("--engine", action="store_true", help="all prompts at once through the serving engine")
    ap.add_argument("--json", help="also write the results here")
    args = ap.parse_args()
    target = load_lm(args.model, backend=args.backend)
    tok = target.tokenizer
    prompts = [target.encode_prompt(tok.apply_chat_template([{"role": "user", "content": p}]))
               for p in PROMPTS]
    params = target.sampling_params(temperature=0, max_new_tokens=args.max_new_tokens)
    params.stop = []  # stream_ids ends at eos (SmolLM2's <|im_end|>); stop strings are a text-level matter

    with tempfile.TemporaryDirectory() as tmp:
        configs = [("plain", None, 0)]
        if "ngram" in args.drafts:
            configs += [(f"ngram, k<={k}", "ngram", k) for k in args.draft_k]
        if "model" in args.drafts:
            draft_dir = args.draft
            if draft_dir is None:
                from slmkit.distill.student_init import student_from_teacher
                draft_dir = str(student_from_teacher(args.model, f"{tmp}/draft", layer_step=args.layer_step))
            draft = load_lm(draft_dir, backend=args.backend)
            configs += [(f"draft {draft_dir}, k<={k}", draft, k) for k in args.draft_k]
            if args.engine:
                configs += [(f"draft {draft_dir}, k<={k}, one at a time", draft, k) for k in args.draft_k]
        lms = {name: target if drafter is None else SpeculativeLM(target, drafter, max_draft=k)
               for name, drafter, k in configs}

        def decode(name, lm, ids):
            batched = args.engine and not name.endswith("one at a time")
            return (run_engine if batched else run)(lm, ids, params)

        for name, lm in lms.items():
            decode(name, lm, prompts[:1])  # warm-up
        # rounds over every configuration, so a busy moment of a shared machine slows all of them alike
        seconds = {name: [] for name in lms}
        outputs = {}
        for _ in range(args.repeats):
            for name, lm in lms.items():
                if isinstance(lm, SpeculativeLM):
                    lm.stats = SpeculativeStats()
                outputs[name], took = decode(name, lm, prompts)
                seconds[name].append(took)
        rows = []
        for name, lm in lms.items():
            n, took = sum(map(len, outputs[name])), statistics.median(map(sum, seconds[name]))
            by_prompt = zip(*seconds[name], strict=True)  # each prompt's seconds over the rounds
            per_prompt = [] if args.engine else [len(out) / statistics.median(s)
                                                 for out, s in zip(outputs[name], by_prompt, strict=True)]
            row = {"config": name, "tokens": n, "median_seconds": took, "seconds": seconds[name],
                   "tokens_per_s": n / took, "tokens_per_s_per_prompt": per_prompt}
            line = f"{name:<28} {n / took:6.1f} tokens/s (per prompt {', '.join(f'{x:.1f}' for x in per_prompt)})"
            if isinstance(lm, SpeculativeLM):
                same = sum(o == r for o, r in zip(outputs[name], outputs["plain"], strict=True))
                row.update(speedup=row["tokens_per_s"] / rows[0]["tokens_per_s"], identical=f"{same}/{len(prompts)}",
                           acceptance_rate=lm.stats.acceptance_rate, tokens_per_forward=lm.stats.tokens_per_forward)
                line += f"  {row['speedup']:.2f}x  identical {same}/{len(prompts)}  {lm.stats}"
            else:
                line += f"  ({n} tokens)"
            rows.append(row)
            print(line, flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"date": datetime.datetime.now().isoformat(timespec="seconds"), "cpu": cpu_name(),
                       "threads": torch.get_num_threads(), "torch": torch.__version__, "model": args.model,
                       "backend": args.backend, "engine": args.engine,
                       "rows": rows}, f, indent=2)


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            return next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        return "unknown"


if __name__ == "__main__":
    main()
