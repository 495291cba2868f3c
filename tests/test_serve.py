"""`slm serve`: a real server on loopback (uvicorn in a thread), driven by the official OpenAI client."""

import asyncio
import base64
import http.client
import json
import time

import numpy as np
import pytest
import torch
from conftest import live_server, tiny_model_dir

openai = pytest.importorskip("openai")
uvicorn = pytest.importorskip("uvicorn")

from slmkit.lm import load_lm  # noqa: E402
from slmkit.sampling import SamplingParams  # noqa: E402
from slmkit.serve import guard  # noqa: E402
from slmkit.serve.app import create_app, sampling  # noqa: E402
from slmkit.serve.engine import Engine  # noqa: E402
from slmkit.serve.protocol import APIError, ChatBody, CompletionBody  # noqa: E402
from slmkit.tokenizer import train_tokenizer  # noqa: E402

TEXT = "def area(r):\n    return 3.14159 * r * r\n\nfor r in range(5):\n    print(r, area(r))\n"
MODEL = "tiny"
KEY = "sk-test-123"
CHAT_STOP = ["<|im_end|>", "</s>"]
PROMPTS = ["def area", "for r in", "print(", "    return 3", "d", "café ✓", "r * r", "area(r))\n"]


@pytest.fixture(scope="module")
def lm(tmp_path_factory):
    tok = train_tokenizer([TEXT, "café ✓ naïve"] * 30, vocab_size=300)
    d = tiny_model_dir(tmp_path_factory.mktemp("serve") / "m", tok, train_on=TEXT, max_seq_len=128)
    return load_lm(str(d))


@pytest.fixture(scope="module")
def server(lm):
    engine = Engine(lm, max_batch=8, max_queue=64)
    try:
        with live_server(create_app(engine, MODEL, api_key=KEY, max_body_bytes=200_000)) as url:
            yield url, engine
    finally:
        engine.close()


@pytest.fixture(scope="module")
def url(server):
    return server[0]


def client(url, key=KEY, **kw):
    return openai.OpenAI(base_url=url + "/v1", api_key=key, max_retries=0, **kw)


def raw(url, method, path, body: bytes | None = None, headers=None, key=KEY):
    """(status, headers, parsed JSON or text) of one plain HTTP request."""
    host, port = url.removeprefix("http://").split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=30)
    headers = {"Content-Type": "application/json", **(headers or {})}
    if key:
        headers["Authorization"] = f"Bearer {key}"
    conn.request(method, path, body=body, headers=headers)
    resp = conn.getresponse()
    data = resp.read().decode()
    conn.close()
    try:
        data = json.loads(data)
    except ValueError:
        pass
    return resp.status, dict(resp.getheaders()), data


def greedy(lm, prompt, max_tokens, stop=()):
    return lm.generate(prompt, SamplingParams(max_new_tokens=max_tokens, temperature=0, stop=list(stop)))[0]


def chat_prompt(lm, messages):
    return lm.tokenizer.apply_chat_template(messages, add_generation_prompt=True)


def assert_error_shape(body, status_type="invalid_request_error"):
    assert set(body) == {"error"} and set(body["error"]) == {"message", "type", "param", "code"}
    assert body["error"]["type"] == status_type and body["error"]["message"]


# --- the API -------------------------------------------------------------------------------------------------


def test_models_health_and_chat_page(url):
    models = client(url).models.list()
    assert [m.id for m in models.data] == [MODEL] and models.data[0].object == "model"
    assert client(url).models.retrieve(MODEL).id == MODEL
    status, _, body = raw(url, "GET", "/health", key=None)  # no key needed
    assert status == 200 and body["status"] == "ok" and body["model"] == MODEL and body["queue_depth"] == 0
    status, headers, page = raw(url, "GET", "/", key=None)
    assert status == 200 and "<html" in page.lower() and headers["cache-control"] == "no-store"


def test_completions_equal_local_greedy_decoding_streamed_or_not(lm, url):
    c = client(url)
    for prompt in PROMPTS[:3]:
        want = greedy(lm, prompt, 12)
        out = c.completions.create(model=MODEL, prompt=prompt, max_tokens=12, temperature=0)
        assert out.choices[0].text == want and out.object == "text_completion" and out.model == MODEL
        assert out.usage.prompt_tokens == len(lm.encode_prompt(prompt))
        assert out.usage.completion_tokens == 12 and out.choices[0].finish_reason == "length"
        chunks = list(c.completions.create(model=MODEL, prompt=prompt, max_tokens=12, temperature=0, stream=True))
        assert "".join(ch.choices[0].text for ch in chunks) == want
        assert chunks[-1].choices[0].finish_reason == "length"
    # a list of prompts: one choice each, in order; stop strings end a choice early
    out = c.completions.create(model=MODEL, prompt=PROMPTS[:2], max_tokens=10, temperature=0)
    assert [ch.text for ch in out.choices] == [greedy(lm, p, 10) for p in PROMPTS[:2]]
    assert [ch.index for ch in out.choices] == [0, 1]
    want = greedy(lm, "for r in", 30)
    stop = want[5:7]
    out = c.completions.create(model=MODEL, prompt="for r in", max_tokens=30, temperature=0, stop=stop)
    assert out.choices[0].text == want[:want.find(stop)] and out.choices[0].finish_reason == "stop"
    stream = c.completions.create(model=MODEL, prompt="for r in", max_tokens=30, temperature=0, stop=[stop],
                                  stream=True, stream_options={"include_usage": True})
    chunks = list(stream)
    assert "".join(ch.choices[0].text for ch in chunks if ch.choices) == want[:want.find(stop)]
    assert chunks[-1].usage.prompt_tokens == len(lm.encode_prompt("for r in"))


def test_chat_equals_local_greedy_decoding_through_the_template(lm, url):
    c = client(url)
    messages = [{"role": "system", "content": "You write Python."}, {"role": "user", "content": "def area"}]
    want = greedy(lm, chat_prompt(lm, messages), 10, CHAT_STOP)
    out = c.chat.completions.create(model=MODEL, messages=messages, max_tokens=10, temperature=0)
    assert out.choices[0].message.content == want and out.choices[0].message.role == "assistant"
    assert out.usage.prompt_tokens == len(lm.encode_prompt(chat_prompt(lm, messages)))
    chunks = list(c.chat.completions.create(model=MODEL, messages=messages, max_tokens=10, temperature=0,
                                            stream=True))
    assert chunks[0].choices[0].delta.role == "assistant" and chunks[0].object == "chat.completion.chunk"
    assert "".join(ch.choices[0].delta.content or "" for ch in chunks) == want
    assert chunks[-1].choices[0].finish_reason in ("length", "stop")
    # the default max_tokens is the rest of the context
    out = c.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "print("}], temperature=0)
    assert out.choices[0].message.content == greedy(lm, chat_prompt(lm, [{"role": "user", "content": "print("}]),
                                                    128 - out.usage.prompt_tokens, CHAT_STOP)


def test_async_clients_concurrently_and_a_bad_request_among_them(lm, url):
    c = openai.AsyncOpenAI(base_url=url + "/v1", api_key=KEY, max_retries=0)
    wants = [greedy(lm, p, 6 + i) for i, p in enumerate(PROMPTS)]

    async def one(i, p):
        if i % 2:
            out = await c.completions.create(model=MODEL, prompt=p, max_tokens=6 + i, temperature=0)
            return out.choices[0].text
        stream = await c.completions.create(model=MODEL, prompt=p, max_tokens=6 + i, temperature=0, stream=True)
        return "".join([ch.choices[0].text async for ch in stream])

    async def main():
        bad = c.completions.create(model=MODEL, prompt=TEXT * 4, max_tokens=8, temperature=0)
        results = await asyncio.gather(bad, *(one(i, p) for i, p in enumerate(PROMPTS)), return_exceptions=True)
        await c.close()
        return results

    bad, *texts = asyncio.run(main())
    assert isinstance(bad, openai.BadRequestError)
    assert texts == wants


def test_n_choices_with_a_seed_are_reproducible(url):
    c = client(url)
    # every filter off (a request that leaves them out gets the model's top-k/top-p/min-p, as llama-server does)
    kw = dict(model=MODEL, prompt="for r in", max_tokens=16, temperature=1.2, n=3, seed=5, top_p=1.0,
              extra_body={"top_k": 0, "min_p": 0.0})
    a, b = c.completions.create(**kw), c.completions.create(**kw)
    assert [ch.index for ch in a.choices] == [0, 1, 2]
    assert [ch.text for ch in a.choices] == [ch.text for ch in b.choices]
    assert len({ch.text for ch in a.choices}) > 1  # choices use seeds 5, 6, 7
    chunks = list(c.completions.create(**kw, stream=True))
    streamed = ["".join(ch.choices[0].text for ch in chunks if ch.choices[0].index == i) for i in range(3)]
    assert streamed == [ch.text for ch in a.choices]
    chat = c.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hi"}], max_tokens=8,
                                     temperature=1.0, n=2, seed=1)
    assert [ch.index for ch in chat.choices] == [0, 1]


def test_logprobs_in_both_formats(lm, url):
    c = client(url)
    out = c.completions.create(model=MODEL, prompt="def area", max_tokens=6, temperature=0, logprobs=3)
    lp = out.choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == len(lp.text_offset) == 6
    assert "".join(lp.tokens) == out.choices[0].text
    assert lp.text_offset == [sum(len(t) for t in lp.tokens[:i]) for i in range(6)]
    for tok, logprob, top in zip(lp.tokens, lp.token_logprobs, lp.top_logprobs, strict=True):
        assert len(top) == 3 and max(top.values()) == pytest.approx(logprob, abs=1e-5) and top[tok] == logprob
        assert logprob <= 0
    # the values are the model's: score the greedy continuation locally
    ids = lm.encode_prompt("def area")
    new = lm.tokenizer.encode(out.choices[0].text)
    local = lm.logprobs(ids + new, top_k=1)
    if len(new) == 6:  # the text re-encodes to the same tokens
        np.testing.assert_allclose(lp.token_logprobs, local.token_logprobs[len(ids) - 1:], atol=1e-4)
    chat = c.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "def area"}],
                                     max_tokens=5, temperature=0, logprobs=True, top_logprobs=2)
    content = chat.choices[0].logprobs.content
    assert len(content) == 5 and all(len(e.top_logprobs) == 2 for e in content)
    assert all(e.logprob == pytest.approx(e.top_logprobs[0].logprob, abs=1e-5) for e in content)
    assert all(bytes(e.bytes) == e.token.encode() for e in content)
    chunks = list(c.completions.create(model=MODEL, prompt="def area", max_tokens=6, temperature=0, logprobs=2,
                                       stream=True))
    assert [t for ch in chunks if ch.choices[0].logprobs for t in ch.choices[0].logprobs.tokens] == lp.tokens


def test_embeddings_are_normalised_mean_pooled_hidden_states(lm, url):
    inputs = ["def area(r):", "print(r, area(r))", "café"]
    out = client(url).embeddings.create(model=MODEL, input=inputs)
    vectors = np.array([d.embedding for d in out.data])
    assert vectors.shape == (3, lm.model.cfg.dim) and [d.index for d in out.data] == [0, 1, 2]
    np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-5)
    with torch.no_grad():
        h = lm.model.hidden_states(torch.tensor([lm.encode_prompt(inputs[1])]))[0].mean(0)
    np.testing.assert_allclose(vectors[1], (h / h.norm()).numpy(), atol=1e-5)
    assert out.usage.prompt_tokens == sum(len(lm.encode_prompt(t)) for t in inputs)
    status, _, body = raw(url, "POST", "/v1/embeddings",
                          json.dumps({"model": MODEL, "input": inputs[1], "encoding_format": "base64"}).encode())
    decoded = np.frombuffer(base64.b64decode(body["data"][0]["embedding"]), dtype="<f4")
    assert status == 200 and np.allclose(decoded, vectors[1], atol=1e-6)


# --- errors ----------------------------------------------------------------------------------------------------


def test_api_key_is_required_on_v1_routes(url):
    with pytest.raises(openai.AuthenticationError) as e:
        client(url, key="sk-wrong").models.list()
    assert e.value.status_code == 401 and "API key" in e.value.message
    with pytest.raises(openai.AuthenticationError):
        client(url, key="sk-wrong").completions.create(model=MODEL, prompt="x", max_tokens=1)
    status, headers, body = raw(url, "GET", "/v1/models", key=None)
    assert status == 401 and headers["www-authenticate"] == "Bearer"
    assert_error_shape(body) and body["error"]["code"] == "invalid_api_key"
    # unauthenticated requests are refused before their body is read or parsed
    status, _, body = raw(url, "POST", "/v1/completions", b"{not json", key=None)
    assert status == 401


def test_prompt_beyond_the_context_is_a_400_naming_the_limit(url):
    c = client(url)
    with pytest.raises(openai.BadRequestError) as e:
        c.completions.create(model=MODEL, prompt=TEXT * 4, max_tokens=8)
    assert "context of 128 tokens" in e.value.message and e.value.code == "context_length_exceeded"
    with pytest.raises(openai.BadRequestError, match="context of 128"):
        c.completions.create(model=MODEL, prompt="def", max_tokens=200, stream=True)
    with pytest.raises(openai.BadRequestError, match="context of 128"):
        c.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": TEXT * 4}])


def test_malformed_requests_get_openai_error_shapes(url):
    status, _, body = raw(url, "POST", "/v1/completions", b'{"model": "tiny", "prompt": ')
    assert status == 400 and "JSON" in body["error"]["message"]
    assert_error_shape(body)
    for bad, param in [({"model": MODEL, "prompt": "x", "max_tokens": "many"}, "max_tokens"),
                       ({"model": MODEL, "prompt": 5}, "prompt"),
                       ({"model": MODEL, "prompt": "x", "temperature": -1}, "temperature"),
                       ({"model": MODEL, "prompt": "x", "n": 0}, "n"),
                       ({"model": MODEL, "prompt": "x", "echo": True}, "echo"),
                       ({"model": MODEL}, "prompt"),
                       ({"model": MODEL, "messages": "hello"}, "messages"),
                       ({"model": MODEL, "messages": [{"content": "no role"}]}, "messages.0.role"),
                       ({"model": MODEL, "messages": [{"role": "user", "content": "x"}], "top_logprobs": 2},
                        "top_logprobs")]:
        path = "/v1/chat/completions" if "messages" in bad else "/v1/completions"
        status, _, body = raw(url, "POST", path, json.dumps(bad).encode())
        assert status == 400, (bad, body)
        assert_error_shape(body) and body["error"]["param"].startswith(param), (bad, body)
    status, _, body = raw(url, "POST", "/v1/completions", b"[1, 2]")
    assert status == 400 and "error" in body
    status, _, body = raw(url, "GET", "/v1/nothing-here")
    assert status == 404 and "error" in body
    with pytest.raises(openai.NotFoundError):
        client(url).models.retrieve("other-model")


def test_a_body_over_the_limit_is_a_413(url):
    big = json.dumps({"model": MODEL, "prompt": "x" * 300_000}).encode()
    status, _, body = raw(url, "POST", "/v1/completions", big)
    assert status == 413 and "200000 bytes" in body["error"]["message"]
    assert_error_shape(body)
    with pytest.raises(openai.APIStatusError) as e:
        client(url).completions.create(model=MODEL, prompt="x" * 300_000, max_tokens=1)
    assert e.value.status_code == 413


def test_request_limits_refuse_with_the_field_they_name():
    assert guard.authorized(b"Bearer sk-1", "sk-1") and guard.authorized(b"bearer  sk-1", "sk-1")
    assert not any(guard.authorized(h, "sk-1") for h in (None, b"Basic sk-1", b"Bearer sk-12", b"Bearer sk-"))
    assert guard.check_n(None) == 1 and guard.check_n(guard.MAX_N) == guard.MAX_N
    assert guard.stop_list("a") == ["a"] and guard.stop_list(["", "a"], ["a", "b"]) == ["a", "b"]
    refused = [(lambda: guard.check_n(guard.MAX_N + 1), "n", None),
               (lambda: guard.check_logprobs(guard.MAX_LOGPROBS + 1, "top_logprobs"), "top_logprobs", None),
               (lambda: guard.stop_list(["x"] * (guard.MAX_STOP + 1)), "stop", None),
               (lambda: guard.check_embedding_inputs([[1], []], 8), "input", None),
               (lambda: guard.check_embedding_inputs([[1] * 9], 8), "input", "context_length_exceeded")]
    for call, param, code in refused:
        with pytest.raises(APIError) as e:
            call()
        assert (e.value.status, e.value.param, e.value.code) == (400, param, code)
    with pytest.raises(APIError, match="context of 8 tokens"):
        guard.check_embedding_inputs([[1] * 9], 8)


def test_sampling_fields_left_out_take_the_models_defaults(lm, monkeypatch):
    monkeypatch.setattr(lm, "generation_defaults", {"temperature": 0.3, "top_k": 7, "top_p": 0.9})
    p = sampling(lm, CompletionBody(prompt="x"), 16)
    assert (p.temperature, p.top_k, p.top_p, p.max_new_tokens, p.stop, p.stop_at_eos) == (0.3, 7, 0.9, 16, [], True)
    p = sampling(lm, ChatBody(messages=[{"role": "user", "content": "hi"}], temperature=1e-6, top_k=0, seed=3,
                              stop="\n", ignore_eos=True), 5, CHAT_STOP)
    assert (p.temperature, p.top_k, p.top_p, p.seed, p.stop, p.stop_at_eos) == (0.0, 0, 0.9, 3, ["\n", *CHAT_STOP],
                                                                                False)


def test_a_full_queue_answers_429_with_retry_after(lm, monkeypatch):
    engine = Engine(lm, max_batch=1, max_queue=1)
    monkeypatch.setattr(engine._queue, "qsize", lambda: 1)  # every request finds the queue full
    try:
        with live_server(create_app(engine, MODEL)) as url:
            c = client(url, key="unused")
            for stream in (False, True):
                with pytest.raises(openai.RateLimitError) as e:
                    c.completions.create(model=MODEL, prompt="def", max_tokens=4, stream=stream)
                assert e.value.response.headers["retry-after"] == "1"
                assert e.value.body["code"] == "rate_limit_exceeded"
    finally:
        engine.close()


def test_metrics_count_the_requests(url):
    def scrape():
        status, headers, text = raw(url, "GET", "/metrics")  # the key: /metrics is not public here
        assert status == 200 and headers["content-type"].startswith("text/plain")
        return text

    def value(text, line_start):
        lines = [ln for ln in text.splitlines() if ln.startswith(line_start + " ")]
        return float(lines[0].split()[-1]) if lines else 0.0

    before = scrape()
    c = client(url)
    for _ in range(3):
        c.models.list()
    c.completions.create(model=MODEL, prompt="def area", max_tokens=5, temperature=0)
    with pytest.raises(openai.AuthenticationError):
        client(url, key="nope").models.list()
    after = scrape()
    for name in ("slmkit_requests_total", "slmkit_prompt_tokens_total", "slmkit_completion_tokens_total",
                 "slmkit_request_seconds_bucket", "slmkit_time_to_first_token_seconds_bucket",
                 "slmkit_queue_depth", "slmkit_requests_active"):
        assert f"\n{name}" in after, name
    ok_models = 'slmkit_requests_total{route="/v1/models",status="200"}'
    assert value(after, ok_models) - value(before, ok_models) == 3
    denied = 'slmkit_requests_total{route="/v1/models",status="401"}'
    assert value(after, denied) - value(before, denied) == 1
    done = 'slmkit_requests_total{route="/v1/completions",status="200"}'
    assert value(after, done) - value(before, done) == 1
    assert value(after, "slmkit_completion_tokens_total") - value(before, "slmkit_completion_tokens_total") == 5
    ttft = "slmkit_time_to_first_token_seconds_count"
    assert value(after, ttft) - value(before, ttft) == 1
    lat = 'slmkit_request_seconds_bucket{route="/v1/completions",le="+Inf"}'
    assert value(after, lat) >= 1
    assert value(after, "slmkit_requests_active") == 0


# --- cancellation and timeouts, on a deliberately slow model --------------------------------------------------


@pytest.fixture(scope="module")
def slow(lm):
    """A server whose model takes 20 ms a forward pass, with a 1.5 s request timeout."""
    slow_lm = load_lm(lm.name)
    slow_lm.model.register_forward_pre_hook(lambda module, args: time.sleep(0.02))
    engine = Engine(slow_lm, max_batch=4)
    try:
        with live_server(create_app(engine, MODEL, request_timeout_s=1.5)) as url:
            yield url, engine
    finally:
        engine.close()


def wait_idle(engine, timeout=5.0):
    """Seconds until the engine has generated nothing for 0.2 s (its rows are free)."""
    start = time.monotonic()
    last = engine.stats.completion_tokens_total
    while time.monotonic() - start < timeout:
        time.sleep(0.2)
        now = engine.stats.completion_tokens_total
        if now == last:
            return
        last = now
    raise AssertionError("the engine kept generating")


def test_a_client_leaving_cancels_its_generation(slow):
    url, engine = slow
    c = client(url, key="unused")
    wait_idle(engine)
    before = engine.stats.completion_tokens_total
    stream = c.completions.create(model=MODEL, prompt="def area", max_tokens=60, temperature=0, stream=True)
    for i, _ in enumerate(stream):
        if i == 1:
            break
    stream.close()  # the client disconnects mid-stream
    wait_idle(engine)
    assert engine.stats.completion_tokens_total - before < 30  # not the 60 it asked for
    # a non-streaming client that gives up (its read timeout) cancels too
    before = engine.stats.completion_tokens_total
    with pytest.raises(openai.APITimeoutError):
        client(url, key="unused", timeout=0.3).completions.create(model=MODEL, prompt="def", max_tokens=60)
    wait_idle(engine)
    assert engine.stats.completion_tokens_total - before < 30


def test_a_request_past_the_timeout_ends(slow):
    url, engine = slow
    c = client(url, key="unused")
    with pytest.raises(openai.APIStatusError) as e:
        c.completions.create(model=MODEL, prompt="def", max_tokens=100)
    assert e.value.status_code == 504 and "1.5 s" in e.value.message
    with pytest.raises(openai.APIError, match="1.5 s"):
        for _ in c.completions.create(model=MODEL, prompt="def", max_tokens=100, stream=True):
            pass
    wait_idle(engine)
    out = c.completions.create(model=MODEL, prompt="def", max_tokens=3, temperature=0)  # still serving
    assert out.choices[0].finish_reason == "length"


# --- the command ---------------------------------------------------------------------------------------------


def test_slm_serve_builds_the_app_with_the_key_from_the_environment(lm, monkeypatch):
    from typer.testing import CliRunner

    from slmkit.cli import app as cli
    seen = {}
    monkeypatch.setattr(uvicorn, "run", lambda app, **kw: seen.update(app=app, **kw))
    monkeypatch.setenv("SLM_API_KEY", "sk-env")
    result = CliRunner().invoke(cli, ["serve", lm.name, "--port", "8123", "--max-batch", "2", "--backend", "torch"])
    assert result.exit_code == 0, result.output
    assert seen["port"] == 8123 and seen["host"] == "127.0.0.1"
    guard = seen["app"].user_middleware[0]
    assert guard.kwargs["api_key"] == "sk-env"
    result = CliRunner().invoke(cli, ["serve", "no/such/model"])
    assert result.exit_code == 2 and "error" in result.output


# --- load ------------------------------------------------------------------------------------------------------


def rss_mb() -> float:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmRSS:")) / 1024


@pytest.mark.slow
def test_load_many_concurrent_streams(lm, url):
    """256 short streamed requests from 32 concurrent clients: every one right, memory bounded."""
    wants = {p: greedy(lm, p, 8) for p in PROMPTS}

    async def run(total: int, concurrency: int = 32) -> list[tuple[str, str]]:
        c = openai.AsyncOpenAI(base_url=url + "/v1", api_key=KEY, max_retries=0, timeout=120)
        sem = asyncio.Semaphore(concurrency)

        async def one(i: int) -> tuple[str, str]:
            p = PROMPTS[i % len(PROMPTS)]
            async with sem:
                stream = await c.completions.create(model=MODEL, prompt=p, max_tokens=8, temperature=0, stream=True)
                return p, "".join([ch.choices[0].text async for ch in stream])

        try:
            return await asyncio.gather(*(one(i) for i in range(total)))
        finally:
            await c.close()

    asyncio.run(run(32))  # warm up: connections, allocator
    start_rss = rss_mb()
    t0 = time.perf_counter()
    results = asyncio.run(run(256))
    elapsed = time.perf_counter() - t0
    assert len(results) == 256 and all(text == wants[p] for p, text in results)
    growth = rss_mb() - start_rss
    assert growth < 200, f"RSS grew by {growth:.0f} MB"
    print(f"256 streamed requests in {elapsed:.1f} s; RSS growth {growth:.1f} MB")


@pytest.mark.download
@pytest.mark.slow
def test_smollm2_answers_the_openai_client_streaming_and_not():
    from conftest import pulled
    pulled("smollm2-135m-instruct")
    smol = load_lm("smollm2-135m-instruct")
    engine = Engine(smol, max_batch=4)
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    try:
        with live_server(create_app(engine, "smollm2-135m-instruct")) as base:
            c = openai.OpenAI(base_url=base + "/v1", api_key="none", max_retries=0)
            r = c.chat.completions.create(model="smollm2-135m-instruct", messages=messages, temperature=0,
                                          max_tokens=24)
            answer = r.choices[0].message.content
            assert "Paris" in answer and r.choices[0].finish_reason == "stop"
            stream = c.chat.completions.create(model="smollm2-135m-instruct", messages=messages, temperature=0,
                                               max_tokens=24, stream=True)
            assert "".join(ch.choices[0].delta.content or "" for ch in stream if ch.choices) == answer
    finally:
        engine.close()
