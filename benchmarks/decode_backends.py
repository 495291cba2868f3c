"""Batch-1 decode speed and time to first token of every LM backend on the same model: slmkit torch
fp32/bf16/int8, llama.cpp f32/q8_0, transformers, and the plain eager loop (the model as training code holds it,
through the same sampling loop: what the torch backend's decoding preparation is measured against).

    python benchmarks/decode_backends.py                          # micro + stories15m, every backend
    python benchmarks/decode_backends.py --presets micro --new-tokens 64 --json out.json
    python benchmarks/decode_backends.py --presets smollm2-135m-instruct   # a pulled model (`slm pull`)

For each preset a randomly initialised model (the preset's exact shape; a real tokenizer padded to the preset's
vocabulary) is written once as a slmkit model directory and exported to GGUF f32 and q8_0; a pulled model name
uses its real weights instead. Each backend then runs in a fresh subprocess with the same thread count, through
the same `LM` code path (`LM.stream_ids`, greedy, no eos stop): a warm-up generation, then `--repeats` timed
generations of `--new-tokens` tokens after a 16-token prompt, and `--repeats` times to the first token after a
128-token prompt (prefill + one step). Reported: the MEDIANs, and the decode ratio to llama.cpp f32 measured in
the same run (the anchor). Greedy decoding of a random model is as costly as of a trained one: every step does
the same work.
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

BACKENDS = [  # (label, backend, options)
    # the model straight from its directory, as in training code: no fused projections, no head re-layout
    ("plain eager loop fp32", "plain", {"dtype": "float32"}),
    ("slmkit torch fp32", "torch", {"dtype": "float32"}),
    ("slmkit torch bf16", "torch", {"dtype": "bfloat16"}),
    ("slmkit torch int8", "torch", {"dtype": "float32", "weights": "int8"}),
    ("llama.cpp f32", "llamacpp", {"gguf": "f32"}),
    ("llama.cpp q8_0", "llamacpp", {"gguf": "q8_0"}),
    # llama.cpp's C API in a bare loop (decode one token, greedy sampler, repeat): what slmkit's llama.cpp
    # backend is compared with for its own overhead
    ("raw llama.cpp f32", "llamacpp-raw", {"gguf": "f32"}),
    ("transformers fp32", "hf", {"dtype": "float32"}),
]
ANCHOR = "llama.cpp f32"
PLAIN = "plain eager loop fp32"


def _threads_env(threads: int) -> dict:
    env = dict(os.environ)
    for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
        env[var] = str(threads)
    return env


def make_models(preset: str, root: Path) -> dict:
    """The preset's model directory and its GGUF exports."""
    import torch

    from slmkit.formats.gguf import write_gguf
    from slmkit.formats.hf_dir import save_model_dir
    from slmkit.model.config import PRESETS, model_config
    from slmkit.model.llama import Transformer
    from slmkit.tokenizer import train_tokenizer
    if preset not in PRESETS:  # a pulled model: its own weights and tokenizer
        from slmkit.hub import resolve_model
        d = resolve_model(preset).location
    else:
        texts = [p.read_text(errors="ignore") for p in sorted(Path(os.__file__).parent.glob("*.py"))[:40]]
        tok = train_tokenizer(texts, vocab_size=2048)
        torch.manual_seed(0)
        cfg = model_config(preset, bos_token_id=tok.bos_id, eos_token_id=tok.eos_id, pad_token_id=tok.pad_id)
        d = save_model_dir(Transformer(cfg).eval(), root / preset, tok)
    paths = {"dir": str(d)}
    for quant in ("f32", "q8_0"):
        paths[quant] = str(write_gguf(d, root / f"{preset}-{quant}.gguf", quant=quant))
    return paths


class RawLlamaCpp:
    """Greedy decoding through llama.cpp's C API with nothing else in the loop (no tokenizer, no Python sampler)."""

    def __init__(self, path: str, threads: int, n_ctx: int = 512):
        import llama_cpp as L
        self.L = L
        L.llama_backend_init()
        self.model = L.llama_model_load_from_file(path.encode(), L.llama_model_default_params())
        params = L.llama_context_default_params()
        params.n_ctx = params.n_batch = n_ctx
        params.n_threads = params.n_threads_batch = threads
        self.ctx = L.llama_init_from_model(self.model, params)
        self.sampler = L.llama_sampler_chain_init(L.llama_sampler_chain_default_params())
        L.llama_sampler_chain_add(self.sampler, L.llama_sampler_init_greedy())

    def stream_ids(self, prompt_ids, params, first_allowed):
        L = self.L
        L.llama_memory_clear(L.llama_get_memory(self.ctx), True)
        tokens = (L.llama_token * len(prompt_ids))(*prompt_ids)
        L.llama_decode(self.ctx, L.llama_batch_get_one(tokens, len(prompt_ids)))
        one = (L.llama_token * 1)()
        for _ in range(params.max_new_tokens):
            one[0] = L.llama_sampler_sample(self.sampler, self.ctx, -1)
            yield one[0]
            L.llama_decode(self.ctx, L.llama_batch_get_one(one, 1))


def run_one(conf: dict) -> dict:
    import torch

    from slmkit.lm import load_lm
    from slmkit.sampling import SamplingParams

    torch.set_num_threads(conf["threads"])
    opts = conf["options"]
    t0 = time.perf_counter()
    if conf["backend"] == "plain":
        from slmkit.formats import load_any
        from slmkit.lm.torch_lm import TorchLM
        lm = TorchLM(*load_any(conf["paths"]["dir"]))
    elif conf["backend"] == "llamacpp-raw":
        from slmkit.tokenizer import load_tokenizer
        lm = RawLlamaCpp(conf["paths"][opts["gguf"]], conf["threads"])
        tok = load_tokenizer(conf["paths"]["dir"])
        lm.encode_prompt = lambda text: tok.encode(text, add_bos=tok.add_bos)  # the ids the other rows get
    elif conf["backend"] == "llamacpp":
        lm = load_lm(conf["paths"][opts["gguf"]], backend="llamacpp", n_threads=conf["threads"], logits_all=False)
    else:
        lm = load_lm(conf["paths"]["dir"], backend=conf["backend"], dtype=getattr(torch, opts["dtype"]),
                     weights=opts.get("weights", "fp32"))
    load_s = time.perf_counter() - t0
    source = Path(os.__file__).read_text()
    prompt = lm.encode_prompt("import os\nimport sys\n\ndef main(argv):\n    ")[:16]
    source_ids = lm.encode_prompt(source)
    # a different 128-token prompt each time: llama.cpp reuses the KV of a prompt it has just seen
    long_prompts = [source_ids[64 * i:64 * i + 128] for i in range(conf["repeats"])]
    params = SamplingParams(max_new_tokens=conf["new_tokens"], temperature=0, stop_at_eos=False)

    def one() -> float:
        t = time.perf_counter()
        n = sum(1 for _ in lm.stream_ids(prompt, params, None))
        assert n == conf["new_tokens"], n
        return n / (time.perf_counter() - t)

    def first_token_ms(long_prompt: list[int]) -> float:
        t = time.perf_counter()
        next(iter(lm.stream_ids(long_prompt, params, None)))
        return 1000 * (time.perf_counter() - t)

    one()  # warm-up: first-call allocations, thread-pool start
    rates = [one() for _ in range(conf["repeats"])]
    ttfts = [first_token_ms(p) for p in long_prompts]
    return {"label": conf["label"], "preset": conf["preset"], "tok_s": statistics.median(rates), "all_tok_s": rates,
            "ttft_ms": statistics.median(ttfts), "all_ttft_ms": ttfts, "load_s": load_s,
            "prompt_tokens": len(prompt), "ttft_prompt_tokens": len(long_prompts[0])}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--presets", nargs="+", default=["micro", "stories15m"])
    ap.add_argument("--backends", nargs="+", default=[b[0] for b in BACKENDS], help="labels to run")
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    ap.add_argument("--json", help="also write the results here")
    ap.add_argument("--one", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.one:
        print(json.dumps(run_one(json.loads(args.one))))
        return

    results = []
    with tempfile.TemporaryDirectory(prefix="slm-decode-") as tmp:
        for preset in args.presets:
            paths = make_models(preset, Path(tmp))
            for label, backend, options in BACKENDS:
                if label not in args.backends:
                    continue
                conf = {"label": label, "backend": backend, "options": options, "preset": preset, "paths": paths,
                        "new_tokens": args.new_tokens, "repeats": args.repeats, "threads": args.threads}
                proc = subprocess.run([sys.executable, __file__, "--one", json.dumps(conf)], capture_output=True,
                                      text=True, env=_threads_env(args.threads))
                if proc.returncode != 0:
                    err = (proc.stderr.strip().splitlines() or ["?"])[-1]
                    print(f"{preset:<12}{label:<20} failed: {err}", file=sys.stderr)
                    results.append({"label": label, "preset": preset, "error": err})
                    continue
                r = json.loads(proc.stdout.strip().splitlines()[-1])
                results.append(r)
                print(f"{preset:<12}{label:<20}{r['tok_s']:>9.1f} tok/s  (runs: "
                      f"{', '.join(f'{x:.0f}' for x in r['all_tok_s'])}; TTFT {r['ttft_ms']:.0f} ms; "
                      f"load {r['load_s']:.1f}s)", file=sys.stderr)

    print(f"\n| preset | backend | decode tok/s (median of {args.repeats}) | vs {ANCHOR} | vs {PLAIN} | "
          "TTFT, 128-token prompt |")
    print("|---|---|---:|---:|---:|---:|")
    for preset in args.presets:
        rows = [r for r in results if r["preset"] == preset]
        anchor = next((r["tok_s"] for r in rows if r["label"] == ANCHOR and "tok_s" in r), None)
        plain = next((r["tok_s"] for r in rows if r["label"] == PLAIN and "tok_s" in r), None)
        for r in rows:
            if "tok_s" not in r:
                print(f"| {preset} | {r['label']} | failed: {r['error'][:60]} | | | |")
                continue
            ratios = [f"{r['tok_s'] / a:.2f}x" if a else "n/a" for a in (anchor, plain)]
            print(f"| {preset} | {r['label']} | {r['tok_s']:.1f} | {' | '.join(ratios)} | {r['ttft_ms']:.0f} ms |")
    if args.json:
        meta = {"date": datetime.datetime.now().isoformat(timespec="seconds"), "machine": platform.processor()
                or platform.machine(), "threads": args.threads, "new_tokens": args.new_tokens,
                "command": " ".join(sys.argv)}
        Path(args.json).write_text(json.dumps({"meta": meta, "results": results}, indent=2))


if __name__ == "__main__":
    main()
