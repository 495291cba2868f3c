"""`slm serve --backend llama-server`: slmkit's front (proxy.py) over an OpenAI-compatible upstream, and the
managed llama-server process (llama_server.py) when a binary is available."""

import asyncio
import os
import time

import pytest
from conftest import live_server, needs_llama_server, tiny_model_dir

openai = pytest.importorskip("openai")
httpx = pytest.importorskip("httpx")

from fastapi import FastAPI  # noqa: E402
from fastapi.responses import JSONResponse  # noqa: E402
from typer.testing import CliRunner  # noqa: E402

from slmkit.cli import app as cli  # noqa: E402
from slmkit.lm import load_lm  # noqa: E402
from slmkit.serve.app import create_app  # noqa: E402
from slmkit.serve.engine import Engine  # noqa: E402
from slmkit.serve.proxy import create_proxy_app  # noqa: E402
from slmkit.tokenizer import train_tokenizer  # noqa: E402

TEXT = "def area(r):\n    return 3.14159 * r * r\n\nfor r in range(5):\n    print(r, area(r))\n"
KEY = "sk-front"


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    tok = train_tokenizer([TEXT] * 30, vocab_size=300)
    return tiny_model_dir(tmp_path_factory.mktemp("proxy") / "m", tok, train_on=TEXT, max_seq_len=128, steps=40)


@pytest.fixture(scope="module")
def upstream(model_dir):
    """slmkit's own server as the upstream: a real OpenAI-compatible server (no key: the front holds it)."""
    engine = Engine(load_lm(str(model_dir)), max_batch=4)
    try:
        with live_server(create_app(engine, "tiny")) as url:
            yield url
    finally:
        engine.close()


def test_the_front_forwards_completions_and_chat_streamed_or_not(upstream):
    direct = openai.OpenAI(base_url=upstream + "/v1", api_key="none", max_retries=0)
    with live_server(create_proxy_app(upstream, "tiny", max_requests=8, api_key=KEY)) as url:
        front = openai.OpenAI(base_url=url + "/v1", api_key=KEY, max_retries=0)
        kw = dict(model="tiny", prompt="def area", max_tokens=8, temperature=0)
        want = direct.completions.create(**kw).choices[0].text
        r = front.completions.create(**kw)
        assert r.choices[0].text == want and r.usage.completion_tokens == 8
        assert "".join(c.choices[0].text for c in front.completions.create(stream=True, **kw) if c.choices) == want
        chat = dict(model="tiny", messages=[{"role": "user", "content": "area"}], max_tokens=6, temperature=0)
        want = direct.chat.completions.create(**chat).choices[0].message.content
        assert front.chat.completions.create(**chat).choices[0].message.content == want
        streamed = "".join(c.choices[0].delta.content or "" for c in front.chat.completions.create(stream=True, **chat)
                           if c.choices)
        assert streamed == want
        assert [m.id for m in front.models.list()] == ["tiny"]
        # the front's key, limits and validation answer before the upstream is asked
        with pytest.raises(openai.AuthenticationError):
            openai.OpenAI(base_url=url + "/v1", api_key="wrong", max_retries=0).completions.create(**kw)
        with pytest.raises(openai.BadRequestError, match="greater than or equal to 1"):
            front.completions.create(**{**kw, "n": 0})
        with pytest.raises(openai.BadRequestError, match="not served by the llama-server backend without an encoder"):
            front.embeddings.create(model="tiny", input="x")
        # an upstream error keeps its status and OpenAI shape
        with pytest.raises(openai.BadRequestError, match="context"):
            front.completions.create(**{**kw, "max_tokens": 10_000})
        metrics = httpx.get(url + "/metrics", headers={"Authorization": f"Bearer {KEY}"}).text
        assert "slmkit_completion_tokens_total 14" in metrics  # 8 + 6: streams report usage only when asked
        assert 'slmkit_requests_total{route="/v1/completions",status="200"} 2' in metrics


def test_the_front_embeds_with_an_encoder_beside_the_upstream(upstream, tmp_path):
    from conftest import tiny_encoder_dir

    from slmkit.lm.embedder import load_embedder
    texts = ["the kettle boils water", "a grinder grinds beans", "returns within thirty days"]
    encoder = load_embedder(str(tiny_encoder_dir(tmp_path / "enc", texts)))
    embeddings = Engine(None, max_batch=2, max_queue=1, embedder=encoder)
    try:
        with live_server(create_proxy_app(upstream, "tiny", max_requests=8, api_key=KEY,
                                          embeddings=embeddings)) as url:
            front = openai.OpenAI(base_url=url + "/v1", api_key=KEY, max_retries=0)
            r = front.embeddings.create(model="tiny", input=texts)
            got = [d.embedding for d in r.data]
            want = encoder.embed(texts).tolist()
            assert len(got) == 3 and all(abs(a - b) < 1e-5 for g, w in zip(got, want, strict=True)
                                         for a, b in zip(g, w, strict=True))
            assert r.usage.prompt_tokens == sum(len(encoder.token_ids(t)) for t in texts)
            # generations still go to the upstream
            assert front.completions.create(model="tiny", prompt="def area", max_tokens=4).choices[0].text
    finally:
        embeddings.close()


def slow_upstream(seconds: float) -> FastAPI:
    app = FastAPI()

    @app.post("/v1/completions")
    async def completions():
        await asyncio.sleep(seconds)
        return {"id": "x", "object": "text_completion", "created": 0, "model": "m",
                "choices": [{"index": 0, "text": "ok", "finish_reason": "stop", "logprobs": None}],
                "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2}}

    @app.get("/health")
    async def health():
        return JSONResponse({"status": "ok"})
    return app


def test_admission_timeout_and_a_dead_upstream():
    with live_server(slow_upstream(1.5)) as slow:
        with live_server(create_proxy_app(slow, "m", max_requests=1, request_timeout_s=1.0)) as url:
            client = openai.AsyncOpenAI(base_url=url + "/v1", api_key="none", max_retries=0)

            async def two():
                kw = dict(model="m", prompt="x", max_tokens=1)
                return await asyncio.gather(client.completions.create(**kw), client.completions.create(**kw),
                                            return_exceptions=True)
            first, second = asyncio.run(two())
            errors = sorted(type(e).__name__ for e in (first, second))
            assert errors == ["InternalServerError", "RateLimitError"]  # one past max_requests: 429; one: 504
            assert any(getattr(e, "status_code", None) == 504 for e in (first, second))
            assert httpx.get(url + "/health").status_code == 200
    # the upstream is gone now: /health says so and requests get a 503 in OpenAI's shape
    with live_server(create_proxy_app(slow, "m", max_requests=1)) as url:
        r = httpx.get(url + "/health")
        assert r.status_code == 503 and r.json()["status"] == "unhealthy"
        r = httpx.post(url + "/v1/completions", json={"prompt": "x"})
        assert r.status_code == 503 and r.json()["error"]["code"] == "engine_stopped"


def test_serve_refuses_what_the_llama_server_backend_cannot_do(model_dir, tmp_path, monkeypatch):
    import uvicorn

    def never(app, **kw):  # a refusal that wrongly started a server would otherwise serve until killed
        raise AssertionError("a server was started")
    monkeypatch.setattr(uvicorn, "run", never)
    runner = CliRunner()
    r = runner.invoke(cli, ["serve", str(model_dir), "--backend", "llama-server", "--llama-server-bin",
                            str(tmp_path / "none")])
    assert r.exit_code == 2 and "--llama-server-bin" in r.output and "no executable there" in r.output
    r = runner.invoke(cli, ["serve", str(model_dir), "--backend", "llama-server", "--draft", "ngram"])
    assert r.exit_code == 2 and "--draft need slmkit's own engine" in r.output



@needs_llama_server
def test_a_managed_llama_server_answers_like_llama_cpp(model_dir, tmp_path):
    pytest.importorskip("llama_cpp")
    from slmkit.formats.gguf import write_gguf
    from slmkit.lm.llamacpp_lm import LlamaCppLM
    from slmkit.sampling import SamplingParams
    from slmkit.serve.llama_server import start_llama_server
    gguf = write_gguf(model_dir, tmp_path / "m.gguf", quant="f32")
    want = LlamaCppLM(gguf).generate("def area", SamplingParams(max_new_tokens=8, temperature=0))[0]
    server = start_llama_server(gguf, parallel=2, threads=1, alias="tiny")
    try:
        with live_server(create_proxy_app(server.url, "tiny", max_requests=4, upstream_alive=server.alive)) as url:
            front = openai.OpenAI(base_url=url + "/v1", api_key="none", max_retries=0)
            r = front.completions.create(model="tiny", prompt="def area", max_tokens=8, temperature=0)
            assert r.choices[0].text == want and r.model == "tiny"
            server.close()
            deadline = time.monotonic() + 10
            while httpx.get(url + "/health").status_code != 503 and time.monotonic() < deadline:
                time.sleep(0.1)
            assert httpx.get(url + "/health").status_code == 503
    finally:
        server.close()
    assert not server.alive() and os.path.exists(server.log_file)


@needs_llama_server
def test_slm_llama_server_args_reach_llama_servers_command_line(model_dir, tmp_path, monkeypatch):
    from slmkit.formats.gguf import write_gguf
    from slmkit.serve.llama_server import start_llama_server
    gguf = write_gguf(model_dir, tmp_path / "m.gguf", quant="f32")
    monkeypatch.setenv("SLM_LLAMA_SERVER_ARGS", "--no-such-flag 1")
    with pytest.raises(RuntimeError, match="llama-server exited with code"):
        start_llama_server(gguf, parallel=1, threads=1)
    monkeypatch.setenv("SLM_LLAMA_SERVER_ARGS", "--poll '0")
    with pytest.raises(ValueError, match=r"\$SLM_LLAMA_SERVER_ARGS: No closing quotation"):
        start_llama_server(gguf, parallel=1, threads=1)
    monkeypatch.setenv("SLM_LLAMA_SERVER_ARGS", "--poll 0 --alias 'from the env'")
    server = start_llama_server(gguf, parallel=1, threads=1, alias="tiny")
    try:  # the last --alias wins: the variable's flags come after slmkit's
        assert httpx.get(server.url + "/v1/models").json()["data"][0]["id"] == "from the env"
    finally:
        server.close()


@needs_llama_server
def test_llama_server_dies_with_a_killed_slm_serve(model_dir, tmp_path):
    import signal
    import subprocess
    import sys

    from slmkit.formats.gguf import write_gguf
    gguf = write_gguf(model_dir, tmp_path / "m.gguf", quant="f32")
    script = ("import sys, time; from slmkit.serve.llama_server import start_llama_server; "
              f"s = start_llama_server({str(gguf)!r}, parallel=1, threads=1); print(s.proc.pid, flush=True); "
              "time.sleep(600)")
    parent = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    try:
        child = int(parent.stdout.readline())
        os.kill(parent.pid, signal.SIGKILL)  # no finally, no atexit: only the kernel can stop the child now
        parent.wait(timeout=10)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                with open(f"/proc/{child}/stat") as f:
                    if f.read().rsplit(")", 1)[1].split()[0] == "Z":  # exited, waiting for init to reap it
                        break
            except FileNotFoundError:
                break
            time.sleep(0.1)
        else:
            os.kill(child, signal.SIGKILL)
            pytest.fail("llama-server outlived the process that started it")
    finally:
        parent.kill()


def test_auto_picks_llama_server_only_when_it_can_serve(model_dir, tmp_path, monkeypatch):
    from slmkit.serve.app import auto_backend
    monkeypatch.delenv("SLM_LLAMA_SERVER", raising=False)
    monkeypatch.setenv("SLMKIT_CACHE", str(tmp_path / "cache"))  # no built binary there
    monkeypatch.setenv("PATH", str(tmp_path / "nothing"))
    assert auto_backend(str(model_dir)) == "auto"  # no binary: the in-process engines decide
    fake = tmp_path / "llama-server"
    fake.write_text("#!/bin/sh\n")
    fake.chmod(0o755)
    monkeypatch.setenv("SLM_LLAMA_SERVER", str(fake))
    assert auto_backend(str(model_dir)) == "llama-server"
    assert auto_backend(str(model_dir), engine_only=True) == "auto"  # --adapter, --draft, --escalate-to, ...
    assert auto_backend(str(model_dir), weights="int8") == "auto"
    assert auto_backend(str(model_dir), device="cuda") == "auto"
    assert auto_backend("http://127.0.0.1:9/v1") == "auto"
