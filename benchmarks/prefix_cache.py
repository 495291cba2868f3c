"""Time to first token with a long shared system prompt, with and without the engine's prefix cache.

    nice python benchmarks/prefix_cache.py --model smollm2-135m-instruct --system-tokens 1000 --requests 8 \
        --json docs/benchmark-logs/prefix_cache.json
    nice python benchmarks/prefix_cache.py --backend llamacpp --json docs/benchmark-logs/prefix_cache_llamacpp.json
    python benchmarks/prefix_cache.py --backend llamacpp --through lm --json docs/benchmark-logs/prefix_cache_lm.json

Each request is the same ~N-token system prompt plus a different short question (chat template), sent one after
another to the serving engine (slmkit.serve.engine.Engine, as `slm serve` runs it: the torch backend's PrefixCache, or
llama.cpp's kept sequences with --backend llamacpp) so that
TTFT is prefill time, not queueing: first with --prefix-cache-mb 0, then with the cache on (the first request
fills it and is reported apart). TTFT is measured from submission to the first token event, in-process (no HTTP);
medians and the ratio, measured in one run.

`--through lm` times the LM's own generation instead (`lm.stream_ids`: what `slm chat`, `slm generate`, `slm kb
ask` and the recipes run, one request at a time): for llama.cpp, `LlamaCppLM(reuse_prefix=False)` against the
default, which keeps the last generation's KV cells and evaluates only what follows the shared prefix.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import platform
import statistics
import time

from slmkit.files import atomic_write_json
from slmkit.lm import load_lm
from slmkit.sampling import SamplingParams
from slmkit.serve.engine import Engine, GenerationRequest

QUESTIONS = ["How do I reset my password?", "Where is my parcel?", "Can I pay by invoice?", "Do you ship to Norway?",
             "How do I descale the machine?", "What is the warranty?", "Can I return a used grinder?",
             "How do I cancel my subscription?", "Is the kettle in stock?", "What does E3 mean?"]


def system_prompt(lm, n_tokens: int) -> str:
    rule = ("You are the support assistant of an online coffee-equipment shop. Answer politely and briefly, cite "
            "the help-center article you used, never invent prices, and hand over to a person when asked. ")
    text = ""
    while len(lm.tokenizer.encode(text)) < n_tokens:
        text += rule
    return text


def lm_ttft(lm, ids) -> float:
    start = time.perf_counter()
    for _ in lm.stream_ids(ids, SamplingParams(max_new_tokens=1, temperature=0), None):
        return time.perf_counter() - start
    raise RuntimeError("no token")


async def ttft(engine, ids) -> float:
    start = time.perf_counter()
    async for _ in engine.generate(GenerationRequest(ids, SamplingParams(max_new_tokens=1, temperature=0))):
        return time.perf_counter() - start
    raise RuntimeError("no token")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--system-tokens", type=int, default=1000)
    ap.add_argument("--requests", type=int, default=8)
    ap.add_argument("--backend", default="torch", choices=["torch", "llamacpp"])
    ap.add_argument("--through", default="engine", choices=["engine", "lm"],
                    help="engine: the serving engine (slm serve); lm: the LM's stream_ids (llamacpp only)")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    lm = load_lm(args.model, backend=args.backend)
    system = system_prompt(lm, args.system_tokens)
    prompts = [lm.tokenizer.apply_chat_template([{"role": "system", "content": system},
                                                 {"role": "user", "content": q}], add_generation_prompt=True)
               for q in (QUESTIONS * 10)[:args.requests + 1]]
    ids = [lm.encode_prompt(p) for p in prompts]
    out = {"model": args.model, "backend": args.backend, "through": args.through,
           "prompt_tokens": [len(i) for i in ids][:3], "cpu": platform.processor(), "requests": args.requests}
    if args.through == "lm":
        if args.backend != "llamacpp":
            raise SystemExit("--through lm measures LlamaCppLM's prefix reuse: use --backend llamacpp")
        for label, reuse in (("uncached", False), ("cached", True)):
            lm.reuse_prefix = reuse
            times = [lm_ttft(lm, i) for i in ids]
            out[label] = {"first_s": round(times[0], 4), "median_ttft_s": round(statistics.median(times[1:]), 4),
                          "all_s": [round(t, 4) for t in times]}
            print(label, out[label], flush=True)
        return finish(out, args.json)
    for label, mb in (("uncached", 0), ("cached", 512)):
        engine = Engine(lm, max_batch=4, prefix_cache_mb=mb)
        try:
            times = [asyncio.run(ttft(engine, i)) for i in ids]
        finally:
            engine.close()
        out[label] = {"first_s": round(times[0], 4), "median_ttft_s": round(statistics.median(times[1:]), 4),
                      "all_s": [round(t, 4) for t in times]}
        if mb:
            out[label]["tokens_reused"] = engine.stats.prefix_tokens_reused
        print(label, out[label], flush=True)
    finish(out, args.json)


def finish(out: dict, path: str | None) -> None:
    out["speedup"] = round(out["uncached"]["median_ttft_s"] / out["cached"]["median_ttft_s"], 2)
    print(json.dumps(out, indent=2))
    if path:
        atomic_write_json(path, out)


if __name__ == "__main__":
    main()
