"""Aggregate generation throughput through an OpenAI-compatible HTTP server at 1, 4, 16 concurrent clients:
`slm serve` (continuous batching, over llama.cpp and over slmkit's torch model) vs llama-cpp-python's own
server on the same weights.

    python benchmarks/serve.py                                 # stories15m-shaped random model, both servers
    python benchmarks/serve.py --preset micro --clients 1 4 16 --requests-per-client 4 --max-tokens 64

Each server runs in its own process on 127.0.0.1 (slmkit's with its default threads: all cores but one for the
model; llama.cpp's with `--threads`); this script's clients use the official `openai` async client, each
sending `--requests-per-client` completions in turn. Reported per concurrency level: aggregate completion
tokens/s (the usage the servers report / wall time), the ratio to the same server's 1-client figure, and the
median time to first token of one streamed request per client sent all at once. Greedy, `ignore_eos`.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from decode_backends import _threads_env, make_models  # noqa: E402


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start(cmd: list[str], port: int, env: dict, timeout: float = 120) -> subprocess.Popen:
    import urllib.request
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited: {proc.stderr.read()[-2000:]}")
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{port}/v1/models", timeout=2).read()
            return proc
        except OSError:
            time.sleep(0.5)
    proc.kill()
    raise TimeoutError(f"server on port {port} did not start")


async def run_clients(port: int, clients: int, per_client: int, max_tokens: int, prompt: str) -> dict:
    """Throughput from non-streamed requests (tokens = the usage each response reports), then time to first
    token from one streamed request per client, all clients at once."""
    from openai import AsyncOpenAI
    client = AsyncOpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="none", max_retries=0, timeout=600)
    model = (await client.models.list()).data[0].id
    kwargs = dict(model=model, prompt=prompt, max_tokens=max_tokens, temperature=0, extra_body={"ignore_eos": True})
    tokens = 0

    async def one_client():
        nonlocal tokens
        for _ in range(per_client):
            r = await client.completions.create(**kwargs)
            tokens += r.usage.completion_tokens

    async def first_token() -> float:
        t0 = time.perf_counter()
        stream = await client.completions.create(**{**kwargs, "max_tokens": 8}, stream=True)
        first = None
        async for chunk in stream:
            if first is None and chunk.choices and chunk.choices[0].text:
                first = time.perf_counter() - t0
        return first if first is not None else float("nan")

    t = time.perf_counter()
    await asyncio.gather(*(one_client() for _ in range(clients)))
    wall = time.perf_counter() - t
    ttfts = await asyncio.gather(*(first_token() for _ in range(clients)))
    await client.close()
    return {"clients": clients, "tokens": tokens, "wall_s": wall, "tok_s": tokens / wall,
            "ttft_median_s": statistics.median(ttfts)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="stories15m")
    ap.add_argument("--clients", nargs="+", type=int, default=[1, 4, 16])
    ap.add_argument("--requests-per-client", type=int, default=3)
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    ap.add_argument("--servers", nargs="+", default=["slmkit-llamacpp", "slmkit-torch", "slmkit-torch-int8",
                                                      "llama-cpp-python"])
    ap.add_argument("--timeout", type=float, default=300, help="seconds per concurrency level")
    ap.add_argument("--json")
    args = ap.parse_args()
    env = _threads_env(args.threads)
    prompt = "import os\nimport sys\n\ndef main(argv):\n    "
    results = []
    with tempfile.TemporaryDirectory(prefix="slm-serve-bench-") as tmp:
        paths = make_models(args.preset, Path(tmp))
        for server in args.servers:
            port = free_port()
            if server.startswith("slmkit"):  # slmkit-torch[-int8]: the model directory; slmkit-llamacpp: f32 GGUF
                backend, _, weights = server.removeprefix("slmkit-").partition("-")
                cmd = [sys.executable, "-m", "slmkit.cli", "serve", paths["dir" if backend == "torch" else "f32"],
                       "--port", str(port), "--backend", backend, "--max-batch", str(max(args.clients)),
                       *(["--weights", weights] if weights else [])]
            else:
                cmd = [sys.executable, "-m", "llama_cpp.server", "--model", paths["f32"], "--port", str(port),
                       "--n_threads", str(args.threads), "--n_ctx", "1024"]
            proc = start(cmd, port, env)
            try:
                for clients in args.clients:
                    try:
                        r = asyncio.run(asyncio.wait_for(run_clients(port, clients, args.requests_per_client,
                                                                     args.max_tokens, prompt), args.timeout))
                    except Exception as e:  # a server that stalls or fails under load is a result too
                        print(f"{server:<18}{clients:>3} clients failed: {type(e).__name__} {e}", file=sys.stderr)
                        results.append({"server": server, "clients": clients, "error": f"{type(e).__name__}"})
                        break
                    r["server"] = server
                    results.append(r)
                    print(f"{server:<18}{clients:>3} clients {r['tok_s']:>8.1f} tok/s  ttft {r['ttft_median_s']:.3f}s",
                          file=sys.stderr)
            finally:
                proc.kill()
                proc.wait(timeout=30)
    print(f"\n| server ({args.preset}, {args.threads} threads) | clients | aggregate tok/s | vs 1 client | "
          "median TTFT |")
    print("|---|---:|---:|---:|---:|")
    for r in results:
        if "error" in r:
            print(f"| {r['server']} | {r['clients']} | did not finish in {args.timeout:.0f} s ({r['error']}) | | |")
            continue
        base = next(x["tok_s"] for x in results if x["server"] == r["server"] and x["clients"] == min(args.clients))
        print(f"| {r['server']} | {r['clients']} | {r['tok_s']:.1f} | {r['tok_s'] / base:.2f}x | "
              f"{r['ttft_median_s'] * 1000:.0f} ms |")
    if args.json:
        Path(args.json).write_text(json.dumps({"command": " ".join(sys.argv), "results": results}, indent=2))


if __name__ == "__main__":
    main()
