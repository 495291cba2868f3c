"""Aggregate generation throughput through an OpenAI-compatible HTTP server at 1, 4, 16, 32 concurrent clients:
`slm serve` (continuous batching over llama.cpp and over slmkit's torch model, and fronting llama.cpp's C++
server) vs llama.cpp's own `llama-server` (the anchor: what a user would run instead) and llama-cpp-python's
server, on the same weights.

    python benchmarks/serve.py                                 # stories15m-shaped random model, every server
    python benchmarks/serve.py --preset smollm2-135m-instruct --gguf q8_0 --clients 1 4 16 32
    python benchmarks/serve.py --servers llama-server slmkit-llama-server slmkit-torch-int8
    python benchmarks/serve.py --servers slmkit-torch-int8 slmkit-torch-int8@before --before /tmp/old/src --rounds 5

Each server runs in its own process on 127.0.0.1 (slmkit's with its default threads: all cores but one for the
model; llama.cpp's with `--threads`); llama-server is built once from the llama.cpp sources llama-cpp-python's
sdist vendors (`slm build-llama-server`, cached) and runs with `--parallel` = the most clients, one unified KV
pool, continuous batching. This script's clients use the official `openai` async client, each sending
`--requests-per-client` completions in turn. Reported per concurrency level: aggregate completion tokens/s (the
usage the servers report / wall time), the ratio to the same server's 1-client figure, and the median and p99
time to first token of one streamed request per client sent all at once, after a warm-up per server (2 clients
x 2 requests, not counted). Greedy, `ignore_eos`. Results are
written after every level (`--json`), so a run cut short keeps what it measured.
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


def llama_server_binary() -> Path:
    """The llama-server binary `slm serve --backend llama-server` would run, built once when there is none."""
    from slmkit.serve.llama_server import build_llama_server, find_llama_server
    try:
        return find_llama_server()
    except FileNotFoundError:
        return build_llama_server()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start(cmd: list[str], port: int, env: dict, timeout: float = 120) -> subprocess.Popen:
    import urllib.request
    # The log goes to a file: a pipe nobody reads fills up (64 KB) and the server blocks writing to it, which
    # hung llama-server at 32 clients (and is likely why llama-cpp-python's server "did not finish" at 16 before).
    log = tempfile.NamedTemporaryFile(prefix="serve-bench-", suffix=".log", delete=False)
    proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT)
    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited: {Path(log.name).read_text(errors='replace')[-2000:]}")
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
    ttfts = sorted(await asyncio.gather(*(first_token() for _ in range(clients))))
    await client.close()
    return {"clients": clients, "tokens": tokens, "wall_s": wall, "tok_s": tokens / wall,
            "ttft_median_s": statistics.median(ttfts), "ttft_p99_s": ttfts[min(len(ttfts) - 1,
                                                                               int(0.99 * len(ttfts)))]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="stories15m")
    ap.add_argument("--clients", nargs="+", type=int, default=[1, 4, 16, 32])
    ap.add_argument("--requests-per-client", type=int, default=3)
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    ap.add_argument("--servers", nargs="+", default=["llama-server", "slmkit-llama-server", "slmkit-llamacpp",
                                                      "slmkit-torch", "slmkit-torch-int8", "llama-cpp-python"],
                    help="slmkit-torch-ngram: slmkit-torch with --draft ngram (speculative decoding in the batch)")
    ap.add_argument("--gguf", default="f32", choices=["f32", "q8_0"], help="the GGUF the llama.cpp servers load")
    ap.add_argument("--timeout", type=float, default=300, help="seconds per concurrency level")
    ap.add_argument("--prompt", default="import os\nimport sys\n\ndef main(argv):\n    ",
                    help="every request's prompt (\\n: a newline)")
    ap.add_argument("--rounds", type=int, default=1, help="run every server this many times, the order reversed "
                    "each round; the table gives each figure's median over the rounds")
    ap.add_argument("--before", help="the src/ of another slmkit checkout (e.g. a `git worktree` of the last "
                    "commit): a server named NAME@before runs from it, for an A/B of a change")
    ap.add_argument("--json")
    args = ap.parse_args()
    env = _threads_env(args.threads)
    prompt = args.prompt.replace("\\n", "\n")
    results = []
    with tempfile.TemporaryDirectory(prefix="slm-serve-bench-") as tmp:
        paths = make_models(args.preset, Path(tmp))
        order = [(n, name) for n in range(args.rounds) for name in (args.servers if n % 2 == 0
                                                                     else args.servers[::-1])]
        for round_, name in order:
            server, before = name.removesuffix("@before"), name.endswith("@before")
            if before and not args.before:
                raise SystemExit(f"{name} needs --before (the src/ of the checkout to run it from)")
            server_env = {**env, "PYTHONPATH": str(Path(args.before).resolve())} if before else env
            port = free_port()
            most = str(max(args.clients))
            if server == "llama-server":  # the same arguments slm serve --backend llama-server gives it
                from slmkit.serve.llama_server import llama_server_args
                cmd = llama_server_args(llama_server_binary(), paths[args.gguf], port, int(most), args.threads)
            elif server == "slmkit-llama-server":
                cmd = [sys.executable, "-m", "slmkit.cli", "serve", paths[args.gguf], "--port", str(port),
                       "--backend", "llama-server", "--max-batch", most]
            elif server.startswith("slmkit"):  # slmkit-torch[-int8|-ngram]: the model directory; slmkit-llamacpp: GGUF
                backend, _, weights = server.removeprefix("slmkit-").partition("-")
                cmd = [sys.executable, "-m", "slmkit.cli", "serve", paths["dir" if backend == "torch" else args.gguf],
                       "--port", str(port), "--backend", backend, "--max-batch", most,
                       *(["--draft", "ngram"] if weights == "ngram" else ["--weights", weights] if weights else [])]
            else:
                cmd = [sys.executable, "-m", "llama_cpp.server", "--model", paths[args.gguf], "--port", str(port),
                       "--n_threads", str(args.threads), "--n_ctx", "1024"]
            proc = start(cmd, port, server_env)
            try:
                # warm-up, not counted: a server's first requests pay one-time costs (connections to an upstream,
                # first-call paths), which 3 timed requests at one client would otherwise carry
                asyncio.run(run_clients(port, 2, 2, 8, prompt))
                for clients in args.clients:
                    try:
                        r = asyncio.run(asyncio.wait_for(run_clients(port, clients, args.requests_per_client,
                                                                     args.max_tokens, prompt), args.timeout))
                    except Exception as e:  # a server that stalls or fails under load is a result too
                        print(f"{name:<18}{clients:>3} clients failed: {type(e).__name__} {e}", file=sys.stderr)
                        results.append({"server": name, "clients": clients, "round": round_,
                                        "error": f"{type(e).__name__}"})
                        break
                    r.update(server=name, round=round_)
                    results.append(r)
                    print(f"{name:<20}{clients:>3} clients {r['tok_s']:>8.1f} tok/s  ttft {r['ttft_median_s']:.3f}s",
                          file=sys.stderr)
                    if args.json:  # after every level: a run cut short keeps what it measured
                        Path(args.json).write_text(json.dumps({"command": " ".join(sys.argv), "results": results},
                                                              indent=2))
            finally:
                proc.terminate()  # slm serve stops its llama-server on the way out
                try:
                    proc.wait(timeout=20)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait(timeout=30)
    print(f"\n| server ({args.preset}, {args.gguf} GGUF, {args.threads} threads) | clients | aggregate tok/s | "
          "vs 1 client | vs llama-server | TTFT p50 / p99 |")
    print("|---|---:|---:|---:|---:|---:|")
    runs = {}  # (server, clients) -> its results, one a round
    for r in results:
        runs.setdefault((r["server"], r["clients"]), []).append(r)
    medians = {key: {k: statistics.median(r[k] for r in done) for k in ("tok_s", "ttft_median_s", "ttft_p99_s")}
               for key, rs in runs.items() if (done := [r for r in rs if "error" not in r])}
    for (server, clients), rs in runs.items():
        m = medians.get((server, clients))
        if m is None:
            print(f"| {server} | {clients} | did not finish in {args.timeout:.0f} s ({rs[0]['error']}) | | |")
            continue
        base = medians.get((server, min(args.clients)), m)
        anchor = medians.get(("llama-server", clients))
        versus = f"{m['tok_s'] / anchor['tok_s']:.2f}x" if anchor else ""
        print(f"| {server} | {clients} | {m['tok_s']:.1f} | {m['tok_s'] / base['tok_s']:.2f}x | {versus} | "
              f"{m['ttft_median_s'] * 1000:.0f} / {m['ttft_p99_s'] * 1000:.0f} ms |")
    if args.json:
        Path(args.json).write_text(json.dumps({"command": " ".join(sys.argv), "results": results}, indent=2))


if __name__ == "__main__":
    main()
