"""`slm serve` under hostile conditions (issue 22, items 2-7): auth by route, admission everywhere, input edge
cases, incremental detokenisation, a dead engine, clients that stop reading. Each test failed before its fix."""

import asyncio
import json
import pathlib
import socket
import time

import pytest
from conftest import live_server, tiny_model_dir

uvicorn = pytest.importorskip("uvicorn")

from starlette.applications import Starlette  # noqa: E402
from starlette.routing import Mount  # noqa: E402
from test_serve import KEY, MODEL, TEXT, assert_error_shape, raw  # noqa: E402

from slmkit.lm import load_lm  # noqa: E402
from slmkit.sampling import SamplingParams, TextStream  # noqa: E402
from slmkit.serve import guard  # noqa: E402
from slmkit.serve.app import create_app  # noqa: E402
from slmkit.serve.engine import (  # noqa: E402
    EmbeddingRequest,
    Engine,
    EngineStopped,
    GenerationRequest,
    SlowReader,
)
from slmkit.tokenizer import load_tokenizer, train_tokenizer  # noqa: E402


@pytest.fixture(scope="module")
def lm(tmp_path_factory):
    tok = train_tokenizer([TEXT, "café ✓ naïve"] * 30, vocab_size=300)
    d = tiny_model_dir(tmp_path_factory.mktemp("harden") / "m", tok, train_on=TEXT, max_seq_len=128)
    return load_lm(str(d))


@pytest.fixture()
def served(lm):
    """A server factory: `served(**create_app options, engine=dict(...), server=dict(...))` -> (url, engine)."""
    engines, stack = [], []

    def start(engine=None, server=None, **options):
        e = Engine(lm, **{"max_batch": 4, **(engine or {})})
        engines.append(e)
        cm = live_server(create_app(e, MODEL, **options), **(server or {}))
        stack.append(cm)
        return cm.__enter__(), e

    yield start
    for cm in reversed(stack):
        cm.__exit__(None, None, None)
    for e in engines:
        e.close()


def post(url, path, body, key=KEY):
    return raw(url, "POST", path, json.dumps(body).encode() if isinstance(body, dict) else body, key=key)


# --- 2. auth by route ------------------------------------------------------------------------------------------


def test_auth_is_by_route_under_a_mount_prefix_and_a_root_path(lm, served):
    engine = Engine(lm, max_batch=2)
    try:
        mounted = Starlette(routes=[Mount("/api", app=create_app(engine, MODEL, api_key=KEY))])
        with live_server(mounted) as url:
            assert raw(url, "GET", "/api/v1/models", key=None)[0] == 401  # was open: the check was "/v1/"...
            assert raw(url, "GET", "/api/v1/models")[0] == 200
            assert raw(url, "GET", "/api/health", key=None)[0] == 200
            status, _, body = post(url, "/api/v1/completions", {"prompt": "x", "max_tokens": 1}, key=None)
            assert status == 401 and body["error"]["code"] == "invalid_api_key"
    finally:
        engine.close()
    # behind a proxy that strips its prefix (uvicorn --root-path): the path uvicorn sees starts with the prefix
    url, _ = served(api_key=KEY, server={"root_path": "/proxy"})
    assert raw(url, "GET", "/v1/models", key=None)[0] == 401  # was open: scope["path"] is /proxy/v1/models
    assert raw(url, "GET", "/v1/models")[0] == 200
    assert raw(url, "GET", "/health", key=None)[0] == 200
    # deny by default: an unknown path, /metrics (not configured public) and the docs paths need the key too
    for path in ("/metrics", "/nothing", "/docs", "/openapi.json", "//v1/models", "/health/../v1/models"):
        status, _, body = raw(url, "GET", path, key=None)
        assert status == 401, path
        assert_error_shape(body)


def test_metrics_are_open_only_when_configured(served):
    url, _ = served(api_key=KEY, public_metrics=True)
    status, _, text = raw(url, "GET", "/metrics", key=None)
    assert status == 200 and "slmkit_requests_total" in text
    assert raw(url, "GET", "/v1/models", key=None)[0] == 401
    assert guard.open_route("/", False) and guard.open_route("/health", False)
    assert not guard.open_route("/metrics", False) and guard.open_route("/metrics", True)


# --- 3. admission ----------------------------------------------------------------------------------------------


def test_embeddings_are_admitted_like_generations(served, monkeypatch):
    url, engine = served(engine={"max_queue": 2})
    status, _, body = post(url, "/v1/embeddings", {"input": ["def area", "print("]})
    assert status == 200 and len(body["data"]) == 2
    monkeypatch.setattr(engine._queue, "qsize", lambda: 2)  # the queue is full
    status, headers, body = post(url, "/v1/embeddings", {"input": "def area"})
    assert status == 429 and headers["retry-after"] == "1"  # was 200: embeddings bypassed the queue
    assert_error_shape(body, "rate_limit_error")


def test_an_embedding_request_past_its_timeout_stops_computing(lm, served):
    slow = load_lm(lm.name)
    forwards = []

    def hook(module, args):
        forwards.append(1)
        time.sleep(0.02)

    slow.model.layers[0].register_forward_pre_hook(hook)
    engine = Engine(slow, max_batch=2)
    try:
        with live_server(create_app(engine, MODEL, request_timeout_s=0.5)) as url:
            status, _, body = post(url, "/v1/embeddings", {"input": ["def area(r)"] * 300})
            assert status == 504 and body["error"]["code"] == "timeout"
            time.sleep(0.5)
            after = len(forwards)
            time.sleep(1.0)
            assert len(forwards) == after, "the embeddings kept computing after the 504"
            assert len(forwards) < 100  # not the 300 it asked for
            status, _, body = post(url, "/v1/embeddings", {"input": "def"})  # still serving
            assert status == 200
    finally:
        engine.close()


def test_prompt_lists_and_choices_are_capped_with_400(served):
    url, _ = served(engine={"max_queue": 4})
    status, _, body = post(url, "/v1/completions", {"prompt": ["def"] * 5, "max_tokens": 1})
    assert status == 400 and body["error"]["param"] == "prompt"  # was 429, which retrying could never fix
    assert "1 to 4" in body["error"]["message"]
    assert_error_shape(body)
    url, _ = served(engine={"max_queue": 64})
    status, _, body = post(url, "/v1/completions", {"prompt": ["def"] * 16, "n": 16, "max_tokens": 1})
    assert status == 400 and body["error"]["param"] == "n" and "128 choices" in body["error"]["message"]
    status, _, body = post(url, "/v1/completions", {"prompt": ["def"] * 65, "max_tokens": 1})
    assert status == 400 and body["error"]["param"] == "prompt"
    status, _, body = post(url, "/v1/completions", {"prompt": ["def"] * 8, "n": 16, "max_tokens": 1})
    assert status == 200 and len(body["choices"]) == 128


# --- 4. input edge cases ---------------------------------------------------------------------------------------


def test_lone_surrogates_are_a_400_naming_the_field(served):
    url, _ = served()
    cases = [("/v1/completions", b'{"prompt": "def \\ud800", "max_tokens": 2}', "prompt"),
             ("/v1/completions", b'{"prompt": ["ok", "\\udfff"], "max_tokens": 2}', "prompt.1"),
             ("/v1/completions", b'{"prompt": "x", "stop": ["\\ud83d"], "max_tokens": 2}', "stop.0"),
             ("/v1/chat/completions", b'{"messages": [{"role": "user", "content": "hi \\udc00"}]}',
              "messages.0.content"),
             ("/v1/chat/completions", b'{"messages": [{"role": "user", "content": "hi", "name": "\\ud800"}]}',
              "messages.0.name"),
             ("/v1/embeddings", b'{"input": ["fine", "bad \\ud800"]}', "input.1")]
    for path, body, param in cases:
        status, _, answer = post(url, path, body)
        assert status == 400, (body, answer)  # was 500 (the tokenizer's ValueError)
        assert_error_shape(answer) and answer["error"]["param"] == param
    # a proper surrogate pair is one character, and fine
    assert post(url, "/v1/completions", b'{"prompt": "def \\ud83d\\ude00", "max_tokens": 2}')[0] == 200


def test_stop_strings_have_a_length_cap(served):
    url, _ = served()
    status, _, body = post(url, "/v1/completions", {"prompt": "x", "stop": "s" * 257, "max_tokens": 2})
    assert status == 400 and body["error"]["param"] == "stop" and "256 characters" in body["error"]["message"]
    assert post(url, "/v1/completions", {"prompt": "x", "stop": "s" * 256, "max_tokens": 2})[0] == 200


def test_nonsense_server_limits_are_refused_at_start(lm, monkeypatch):
    from typer.testing import CliRunner

    from slmkit.cli import app as cli
    started = []
    monkeypatch.setattr(uvicorn, "run", lambda app, **kw: started.append(kw))
    for option, value in [("--max-batch", "0"), ("--max-queue", "-1"), ("--max-concurrency", "0"),
                          ("--write-timeout", "0"), ("--write-timeout", "nan"), ("--port", "70000")]:
        result = CliRunner().invoke(cli, ["serve", lm.name, option, value])
        assert result.exit_code == 2, (option, value, result.output)
        assert f"error: {option} is" in result.output and "Traceback" not in result.output, result.output
        assert len(result.output.strip().splitlines()) == 1, result.output
    assert not started  # was: --max-batch 0 started a server whose engine never answered
    with pytest.raises(ValueError, match="max_batch is 0"):
        Engine(lm, max_batch=0)


# --- 5. incremental detokenisation -----------------------------------------------------------------------------


class CountingTokenizer:
    """The tokenizer, recording how many ids each decode call was given."""

    def __init__(self, tok):
        self.tok, self.lengths = tok, []

    def decode(self, ids):
        self.lengths.append(len(ids))
        return self.tok.decode(ids)


def test_text_streams_decode_a_bounded_window_per_token(lm):
    tok = CountingTokenizer(lm.tokenizer)
    ids = lm.tokenizer.encode("café ✓ naïve " * 60)
    stream = TextStream(tok, stop=["zzz"])
    text = "".join(stream.push(t) for t in ids) + stream.finish()
    assert text == lm.tokenizer.decode(ids)
    assert len(ids) > 300 and max(tok.lengths) <= 8  # was len(ids): the whole sequence again per token


def test_a_character_completed_after_an_emitted_space_is_not_doubled():
    """A token holding a whole character and the first bytes of the next ("Ġâľ": ' ' + 2 of ✞'s 3 bytes), then
    the token that completes it: the space goes out at once, and must not come out again with the ✞ (it did:
    "O  ✞" for "O ✞", in structured output's strings and every stream)."""
    from slmkit.tokenizer import train_tokenizer
    tok = train_tokenizer(["café ✓ naïve O ✞ ✞ ✞"] * 30, vocab_size=300)
    pairs = []
    for t in range(tok.vocab_size):
        head = tok.decode([t])
        if len(head) >= 2 and head.endswith("\ufffd") and "\ufffd" not in head[:-1]:
            pairs += [(t, u) for u in range(tok.vocab_size) if "\ufffd" not in tok.decode([t, u])][:3]
    assert pairs, "the tokenizer has no token ending inside a character"
    for t, u in pairs:
        ids = tok.encode("O") + [t, u] + tok.encode("!")
        stream = TextStream(tok)
        assert "".join(stream.push(i) for i in ids) + stream.finish() == tok.decode(ids)


def reference_pieces(tokenizer, ids, stop, healed=""):
    """What TextStream emitted before it was incremental (decode everything per token): the semantics kept."""
    emitted, pieces, hold = "", [], max((len(s) for s in stop), default=0)
    for n in range(1, len(ids) + 1):
        text = tokenizer.decode(ids[:n])[len(healed):]
        for s in stop:
            cut = text.find(s, max(0, len(emitted) - len(s)))
            if cut != -1:
                pieces.append(text[len(emitted):cut] if cut > len(emitted) else "")
                return pieces, True
        safe = len(text) - hold
        while safe > len(emitted) and text[safe - 1] == "\ufffd":
            safe -= 1
        pieces.append(text[len(emitted):safe] if safe > len(emitted) else "")
        emitted = text[:max(safe, len(emitted))]
    text = tokenizer.decode(ids)[len(healed):]
    pieces.append(text[len(emitted):] if len(text) > len(emitted) else "")
    return pieces, False


def test_incremental_text_equals_decoding_everything_each_time(lm):
    from hypothesis import given, settings
    from hypothesis import strategies as st

    tokenizers = [lm.tokenizer]
    for name in ("gpt2-tokenizer", "smollm2-135m-instruct"):  # pulled ones, where this machine has them
        d = pathlib.Path.home() / ".cache" / "slmkit" / "models" / name
        if (d / "tokenizer.json").exists():
            tokenizers.append(load_tokenizer(d))

    @settings(max_examples=150, deadline=None)
    @given(st.integers(0, len(tokenizers) - 1), st.data())
    def check(which, data):
        tok = tokenizers[which]
        ids = data.draw(st.lists(st.integers(0, tok.vocab_size - 1), max_size=40))
        text = tok.decode(ids)
        stops = data.draw(st.lists(st.sampled_from([text[i:i + k] for i in range(len(text)) for k in (1, 3)]
                                                   or ["x"]) | st.text(max_size=3), max_size=2))
        stops = [s for s in stops if s]
        healed = data.draw(st.sampled_from(["", text[:1], text[:3]]))
        stream = TextStream(tok, stops, healed)
        pieces = [stream.push(t) for t in ids]
        if not stream.stopped:
            pieces.append(stream.finish())
        want, stopped = reference_pieces(tok, ids, stops, healed)
        assert (pieces[:len(want)], stream.stopped) == (want, stopped)

    check()


# --- 6. engine death -------------------------------------------------------------------------------------------


def test_a_dead_engine_is_reported_and_fails_requests_at_once(served, monkeypatch):
    url, engine = served(request_timeout_s=30)
    assert raw(url, "GET", "/health", key=None)[2]["status"] == "ok"

    def broken(rows, batch):
        raise RuntimeError("a bug outside any one request")

    monkeypatch.setattr(engine, "_drop_finished", broken)
    start = time.monotonic()
    status, _, body = post(url, "/v1/completions", {"prompt": "def", "max_tokens": 20})
    assert status == 503 and body["error"]["code"] == "engine_stopped", body  # was: waited for its 504
    assert "a bug outside" in body["error"]["message"] and time.monotonic() - start < 5
    status, _, body = raw(url, "GET", "/health", key=None)
    assert status == 503 and body["status"] == "unhealthy" and "a bug outside" in body["error"]["message"]
    start = time.monotonic()
    for path, req in [("/v1/completions", {"prompt": "def", "max_tokens": 2, "stream": True}),
                      ("/v1/embeddings", {"input": "def"})]:
        status, _, body = post(url, path, req)
        assert status == 503 and body["error"]["code"] == "engine_stopped"
    assert time.monotonic() - start < 5 and not engine.alive

    async def submit():
        return engine.submit(GenerationRequest([1, 2], SamplingParams(max_new_tokens=2)))

    with pytest.raises(EngineStopped):
        asyncio.run(submit())


# --- 7. slow readers -------------------------------------------------------------------------------------------


def test_unread_events_are_bounded_and_cancel_the_request(lm):
    engine = Engine(lm, max_batch=2, max_events=8)
    try:
        async def main():
            pending = engine.submit(GenerationRequest(lm.encode_prompt("def"), SamplingParams(
                max_new_tokens=100, temperature=0, stop_at_eos=False)))
            await asyncio.sleep(2.0)  # nobody reads
            events = []
            while not pending.events.empty():
                events.append(pending.events.get_nowait())
            return pending, events

        before = engine.stats.completion_tokens_total
        pending, events = asyncio.run(main())
        assert isinstance(events[-2], SlowReader) and events[-1] is None  # was: all 100 tokens queued
        assert len(events) <= 10 and pending.cancelled
        assert engine.stats.completion_tokens_total - before < 20
    finally:
        engine.close()


def test_a_client_that_stops_reading_is_dropped(served):
    url, engine = served(write_timeout_s=1.0, server={"send_buffer": 4096})
    host, port = url.removeprefix("http://").split(":")
    # two prompts x 8 choices: the events pass through the stream's merge of several requests
    body = json.dumps({"prompt": ["def", "for"], "max_tokens": 100, "n": 8, "logprobs": 5, "ignore_eos": True,
                       "stream": True}).encode()
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.connect((host, int(port)))
    sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                 b"Authorization: Bearer x\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body))
    assert sock.recv(64).startswith(b"HTTP/1.1 200")
    time.sleep(6)  # read nothing more: the stream stalls, then the write timeout drops it
    sock.settimeout(5)
    received, closed = 0, False
    try:
        while chunk := sock.recv(65536):
            received += len(chunk)
        closed = True
    except ConnectionResetError:
        closed = True
    except TimeoutError:
        pass
    sock.close()
    assert closed, "the server kept the stalled connection open"
    assert received < 2_000_000  # a fraction of the stream: it was cut, not delivered
    tokens = engine.stats.completion_tokens_total
    time.sleep(0.5)
    assert engine.stats.completion_tokens_total == tokens  # nothing runs on for it
    # a second client is answered normally
    assert post(url, "/v1/completions", {"prompt": "def", "max_tokens": 2}, key="x")[0] == 200


def test_a_client_that_stalls_sending_its_body_gets_a_408(served):
    url, _ = served(write_timeout_s=0.5)
    host, port = url.removeprefix("http://").split(":")
    sock = socket.create_connection((host, int(port)))
    sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                 b"Content-Length: 100\r\n\r\n{\"prompt\": ")
    sock.settimeout(5)
    answer = b""
    while b'"request_timeout"' not in answer and (chunk := sock.recv(4096)):
        answer += chunk
    sock.close()
    assert answer.startswith(b"HTTP/1.1 408") and b'"request_timeout"' in answer


def test_requests_past_the_concurrency_limit_get_a_503(served):
    url, _ = served(max_concurrency=1, write_timeout_s=5.0)
    host, port = url.removeprefix("http://").split(":")
    hold = socket.create_connection((host, int(port)))  # one request in flight: its body never finishes
    hold.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Length: 50\r\n\r\n{")
    time.sleep(0.3)
    status, headers, body = post(url, "/v1/completions", {"prompt": "def", "max_tokens": 1})
    assert status == 503 and headers["retry-after"] == "1" and body["error"]["code"] == "server_overloaded"
    assert raw(url, "GET", "/health")[0] == 200  # monitoring is not counted
    hold.close()
    time.sleep(0.3)
    assert post(url, "/v1/completions", {"prompt": "def", "max_tokens": 1})[0] == 200


def test_embedding_requests_go_through_the_engine(lm):
    engine = Engine(lm, max_batch=2)
    try:
        async def main():
            pending = engine.submit(EmbeddingRequest(["def area", "print("]))
            return await pending.events.get(), await pending.events.get()

        vectors, end = asyncio.run(main())
        assert end is None and vectors.shape == (2, lm.model.cfg.dim)
        assert (vectors - lm.embed(["def area", "print("])).abs().max() < 1e-5
    finally:
        engine.close()
