"""`slm serve` as a real process, under load and faults: a soak of mixed traffic from many clients (zero
unexpected failures, the server's memory bounded), and kill -9 mid-stream (clients get an error, not a hang or a
truncated "success"; a restart serves again). The counts go to docs/reliability-server.md.

SLM_SOAK_SECONDS sets the soak's length (60 s by default; the recorded run used 150).
"""

import asyncio
import collections
import json
import os
import random
import signal
import socket
import subprocess
import sys
import threading
import time

import pytest
from conftest import stop_process, tiny_model_dir

openai = pytest.importorskip("openai")
pytest.importorskip("uvicorn")

from test_serve import KEY, MODEL, TEXT, raw  # noqa: E402

from slmkit.tokenizer import train_tokenizer  # noqa: E402

PROMPTS = ["def area", "for r in", "print(", "    return 3", "café ✓", "r * r"]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    tok = train_tokenizer([TEXT, "café ✓ naïve"] * 30, vocab_size=300)
    return tiny_model_dir(tmp_path_factory.mktemp("faults") / "m", tok, train_on=TEXT, max_seq_len=512, steps=20)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(model_dir, port: int, *options: str) -> subprocess.Popen:
    """`slm serve` in a child process; returns once /health answers."""
    proc = subprocess.Popen([sys.executable, "-m", "slmkit.cli", "serve", str(model_dir), "--port", str(port),
                             "--api-key", KEY, "--backend", "torch", "--max-batch", "8", *options],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=os.environ.copy())
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        assert proc.poll() is None, proc.stderr.read().decode()[-2000:]
        try:
            if raw(f"http://127.0.0.1:{port}", "GET", "/health")[0] == 200:
                return proc
        except OSError:
            pass
        time.sleep(0.2)
    proc.kill()
    raise AssertionError("the server did not start")


def rss_mb(pid: int) -> float:
    with open(f"/proc/{pid}/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmRSS:")) / 1024


# --- soak ------------------------------------------------------------------------------------------------------


async def one_client(url: str, until: float, rng: random.Random, counts: collections.Counter, unexpected: list):
    """Requests of every kind, one after another, until `until`; each kind's expected answer checked."""
    c = openai.AsyncOpenAI(base_url=url + "/v1", api_key=KEY, max_retries=0, timeout=120)
    while time.monotonic() < until:
        kind = rng.choice(["stream", "complete", "chat", "cancel", "embed", "too_long", "too_many", "too_big",
                           "prompt_list"])
        prompt = rng.choice(PROMPTS)
        try:
            if kind == "stream":
                chunks = [ch async for ch in await c.completions.create(
                    model=MODEL, prompt=prompt, max_tokens=rng.randint(1, 40), stream=True)]
                assert chunks[-1].choices[0].finish_reason in ("stop", "length")
            elif kind == "complete":
                out = await c.completions.create(model=MODEL, prompt=prompt, max_tokens=rng.randint(1, 40),
                                                 n=rng.randint(1, 3))
                assert all(ch.finish_reason in ("stop", "length") for ch in out.choices)
            elif kind == "chat":
                out = await c.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": prompt}],
                                                      max_tokens=rng.randint(1, 30), stream=rng.random() < 0.5)
                if not isinstance(out, openai.types.chat.ChatCompletion):
                    _ = [ch async for ch in out]
            elif kind == "cancel":  # read a little, then hang up
                stream = await c.completions.create(model=MODEL, prompt=prompt, max_tokens=200, stream=True,
                                                    extra_body={"ignore_eos": True})
                async for i, _ in _enumerate(stream):
                    if i == 2:
                        break
                await stream.close()
            elif kind == "embed":
                out = await c.embeddings.create(model=MODEL, input=[prompt] * rng.randint(1, 20))
                assert len(out.data) >= 1
            elif kind == "prompt_list":
                out = await c.completions.create(model=MODEL, prompt=[prompt] * rng.randint(1, 4), max_tokens=5)
                assert len(out.choices) >= 1
            else:  # oversized: past the context, past the choice cap, past the body limit: each a 4xx
                try:
                    if kind == "too_long":
                        await c.completions.create(model=MODEL, prompt=TEXT * 40, max_tokens=8)
                    elif kind == "too_many":
                        await c.completions.create(model=MODEL, prompt=[prompt] * 16, n=16, max_tokens=1)
                    else:
                        await c.completions.create(model=MODEL, prompt="x" * 1_200_000, max_tokens=1)
                    unexpected.append((kind, "accepted"))
                except (openai.BadRequestError, openai.APIStatusError) as e:
                    if e.status_code not in (400, 413):
                        raise
            counts[kind] += 1
        except openai.RateLimitError:  # the queue was full: an answer the client is told to retry
            counts["429"] += 1
            await asyncio.sleep(float(1))
        except Exception as e:
            unexpected.append((kind, f"{type(e).__name__}: {e}"[:300]))
    await c.close()


async def _enumerate(aiter):
    i = 0
    async for x in aiter:
        yield i, x
        i += 1


@pytest.mark.slow
def test_soak_mixed_traffic_from_many_clients(model_dir):
    seconds = float(os.environ.get("SLM_SOAK_SECONDS", "60"))
    port = free_port()
    proc = start_server(model_dir, port, "--max-queue", "64")
    url = f"http://127.0.0.1:{port}"
    samples: list[float] = []
    stop = threading.Event()

    def sample():
        while not stop.wait(1.0):
            samples.append(rss_mb(proc.pid))

    sampler = threading.Thread(target=sample, daemon=True)
    counts, unexpected = collections.Counter(), []
    try:
        start_rss = rss_mb(proc.pid)
        sampler.start()

        async def main():
            until = time.monotonic() + seconds
            await asyncio.gather(*(one_client(url, until, random.Random(i), counts, unexpected) for i in range(24)))

        t0 = time.monotonic()
        asyncio.run(main())
        elapsed = time.monotonic() - t0
        stop.set()
        sampler.join()
        status, _, health = raw(url, "GET", "/health")
        assert status == 200 and health["status"] == "ok"
    finally:
        stop.set()
        stop_process(proc)
    total = sum(counts.values())
    quarter = samples[len(samples) // 4] if samples else start_rss
    report = {"seconds": round(elapsed), "clients": 24, "requests": total, "by_kind": dict(counts),
              "unexpected": len(unexpected), "rss_mb_start": round(start_rss), "rss_mb_at_quarter": round(quarter),
              "rss_mb_peak": round(max(samples, default=start_rss)), "rss_mb_end": round(samples[-1])}
    print("\nsoak:", json.dumps(report))
    assert not unexpected, unexpected[:10]
    assert total > 24 * 3 and all(counts[k] for k in ("stream", "complete", "cancel", "embed", "too_big"))
    # memory bounded: after warming up (a quarter in), it grows by no more than a small margin
    assert max(samples[len(samples) // 4:]) < quarter + 150, report


# --- kill -9 mid-stream ------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_kill_9_mid_stream_gives_clients_an_error_and_a_restart_serves(model_dir):
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    rounds, errors = 3, collections.Counter()
    for _ in range(rounds):
        proc = start_server(model_dir, port)
        try:
            outcomes = []

            def stream_one(outcomes: list):
                c = openai.OpenAI(base_url=url + "/v1", api_key=KEY, max_retries=0, timeout=30)
                got = 0
                try:
                    for _ in c.completions.create(model=MODEL, prompt="def area", max_tokens=480, stream=True,
                                                  extra_body={"ignore_eos": True}):
                        got += 1
                    outcomes.append(("completed", got))
                except Exception as e:
                    outcomes.append((type(e).__name__, got))

            clients = [threading.Thread(target=stream_one, args=(outcomes,)) for _ in range(6)]
            for t in clients:
                t.start()
            deadline = time.monotonic() + 30
            while raw(url, "GET", "/metrics")[2].count('slmkit_requests_active 6') == 0 \
                    and time.monotonic() < deadline:
                time.sleep(0.05)
            time.sleep(0.3)  # mid-stream: every client has had some chunks
            os.kill(proc.pid, signal.SIGKILL)
            for t in clients:
                t.join(timeout=30)
            assert not any(t.is_alive() for t in clients), "a client hung after the server died"
            assert len(outcomes) == 6 and not any(kind == "completed" for kind, _ in outcomes), outcomes
            errors.update(kind for kind, _ in outcomes)
        finally:
            proc.kill()
            proc.wait()
    proc = start_server(model_dir, port)  # the restart serves again, on the same port
    try:
        c = openai.OpenAI(base_url=url + "/v1", api_key=KEY, max_retries=0, timeout=30)
        out = c.completions.create(model=MODEL, prompt="def area", max_tokens=5)
        assert out.choices[0].finish_reason in ("stop", "length")
    finally:
        stop_process(proc)
    print(f"\nkill -9: {rounds} rounds x 6 streams, client errors: {dict(errors)}")
    assert sum(errors.values()) == rounds * 6
