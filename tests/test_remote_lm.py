"""RemoteLM against a fake OpenAI-compatible server (stdlib, in a thread), and against llama-cpp-python's."""

import dataclasses
import json
import re
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
from conftest import stop_process

from slmkit.lm.remote_lm import RemoteLM
from slmkit.sampling import SamplingParams

# --- the fake server ------------------------------------------------------------------------------------------


def words(text):
    """The fake server's tokenizer: a word with its leading whitespace."""
    return re.findall(r"\s*\S+|\s+", text)


def reply_for(prompt):
    return f" {len(prompt)} chars: once upon a time, the end."


def fake_logprob(token):
    return -0.25 * len(token.strip()) - 0.1


def fake_is_greedy(token):
    return token.strip()[:1].isupper()  # the fake model's favourite tokens are capitalised


class Fake:
    """What the fake server does, and what it was asked."""

    def __init__(self):
        self.requests = []
        self.models = [{"id": "fake-model", "object": "model", "max_model_len": 512}]
        self.fail = None  # (status, body) for every POST
        self.logprobs = "openai"  # "openai" | "vllm" (a leading <s> token) | "none" | "refuse"
        self.apply_stop = True  # False: ignore `stop` like a careless server
        self.stream_error = False  # an error event after the first chunk
        self.delay = 0.0


def tokens_until_stop(pieces, max_tokens, stop):
    out = []
    for p in pieces[:max_tokens]:
        out.append(p)
        text = "".join(out)
        cuts = [text.find(s) for s in stop or [] if s in text]
        if cuts:
            return text[:min(cuts)]
    return "".join(out)


class Handler(BaseHTTPRequestHandler):
    def log_message(self, *args):
        pass

    @property
    def fake(self) -> Fake:
        return self.server.fake

    def _record(self, body=None):
        self.fake.requests.append({"method": self.command, "path": self.path, "body": body,
                                   "headers": {k.lower(): v for k, v in self.headers.items()}})

    def _send_json(self, obj, status=200):
        data = json.dumps(obj).encode() if not isinstance(obj, bytes) else obj
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def do_GET(self):
        self._record()
        if self.path == "/v1/models":
            self._send_json({"object": "list", "data": self.fake.models})
        else:
            self._send_json({"error": {"message": f"no route {self.path}"}}, 404)

    def do_POST(self):
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        self._record(body)
        fake = self.fake
        if fake.delay:
            time.sleep(fake.delay)
        try:
            if fake.fail:
                status, err = fake.fail
                return self._send_json(err, status)
            if self.path == "/v1/completions" and body.get("echo"):
                return self._echo(body)
            if self.path == "/v1/completions":
                text = tokens_until_stop(words(reply_for(body["prompt"])), body["max_tokens"],
                                         body.get("stop") if fake.apply_stop else None)
                return self._answer(body, words(text), chat=False)
            if self.path == "/v1/chat/completions":
                text = "You said: " + body["messages"][-1]["content"]
                text = tokens_until_stop(words(text), body["max_tokens"], body.get("stop"))
                return self._answer(body, words(text), chat=True)
            self._send_json({"error": {"message": f"no route {self.path}"}}, 404)
        except (BrokenPipeError, ConnectionResetError):  # the client gave up (timeout test)
            pass

    def _answer(self, body, pieces, chat):
        if not body.get("stream"):
            text = "".join(pieces)
            choice = {"message": {"role": "assistant", "content": text}} if chat else {"text": text}
            return self._send_json({"object": "text_completion", "choices": [{"index": 0, **choice}]})
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.end_headers()

        def event(obj):
            self.wfile.write(b"data: " + json.dumps(obj).encode() + b"\n\n")
            self.wfile.flush()

        self.wfile.write(b": keep-alive\n\n")
        if chat:
            event({"choices": [{"index": 0, "delta": {"role": "assistant"}}]})
        for i, piece in enumerate(pieces):
            event({"choices": [{"index": 0, "delta": {"content": piece}} if chat else {"index": 0, "text": piece}]})
            if i == 0 and self.fake.stream_error:
                event({"error": {"message": "context overflow", "code": 400}})
                return
        event({"choices": [{"index": 0, "delta": {}, "finish_reason": "stop"} if chat
                           else {"index": 0, "text": "", "finish_reason": "stop"}]})
        event({"choices": [], "usage": {"completion_tokens": len(pieces)}})
        self.wfile.write(b"data: [DONE]\n\n")

    def _echo(self, body):
        mode = self.fake.logprobs
        if mode == "refuse":
            return self._send_json({"error": {"message": "Only no echo is supported", "type": "invalid_request_error"}},
                                   400)
        prompt = body["prompt"]
        tokens = words(prompt)
        lps = [None] + [fake_logprob(t) for t in tokens[1:]]
        tops = [None] + [{t: fake_logprob(t)} if fake_is_greedy(t) else {" The": fake_logprob(t) + 0.5,
                                                                       t: fake_logprob(t)} for t in tokens[1:]]
        if body["max_tokens"] >= 1:  # the generated token, which scoring must ignore
            tokens, lps, tops = tokens + [" End"], lps + [-0.01], tops + [{" End": -0.01}]
        if mode == "vllm":  # vLLM: the bos token is in tokens/offsets but not in the echoed text
            tokens, lps, tops = ["<s>"] + tokens, [None] + lps, [None] + tops
            if lps[1] is None:
                lps[1], tops[1] = fake_logprob(tokens[1]), {tokens[1]: fake_logprob(tokens[1])}
        offsets = [sum(len(t) for t in tokens[:i]) for i in range(len(tokens))]
        logprobs = {"tokens": tokens, "token_logprobs": lps, "top_logprobs": tops, "text_offset": offsets}
        text = prompt + (" End" if body["max_tokens"] >= 1 else "")
        choice = {"index": 0, "text": text, "logprobs": None if mode == "none" else logprobs}
        self._send_json({"object": "text_completion", "choices": [choice]})


@pytest.fixture(scope="module")
def server():
    srv = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    srv.fake = Fake()
    thread = threading.Thread(target=srv.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    yield srv
    srv.shutdown()
    srv.server_close()


@pytest.fixture
def fake(server, monkeypatch):
    for var in ("http_proxy", "HTTP_PROXY", "https_proxy", "HTTPS_PROXY", "all_proxy", "ALL_PROXY",
                "SLMKIT_API_KEY", "OPENAI_API_KEY"):
        monkeypatch.delenv(var, raising=False)
    server.fake = Fake()
    return server.fake


@pytest.fixture
def url(server, fake):
    return f"http://127.0.0.1:{server.server_address[1]}"


def posts(fake):
    return [r for r in fake.requests if r["method"] == "POST"]


# --- tests ----------------------------------------------------------------------------------------------------


def test_model_comes_from_v1_models_and_the_url_is_normalised(url, fake):
    lm = RemoteLM(url + "/v1/")
    assert lm.model == lm.name == "fake-model" and lm.max_length == 512 and lm.tokenizer is None
    assert lm.root == url and fake.requests[0]["path"] == "/v1/models"
    assert RemoteLM(url.removeprefix("http://"), model="other").model == "other"
    assert len(fake.requests) == 1  # an explicit model needs no request
    fake.models = []
    with pytest.raises(RuntimeError, match="lists no models"):
        RemoteLM(url)


def test_stream_sends_the_sampling_params_and_yields_the_pieces(url, fake):
    lm = RemoteLM(url, api_key="sk-test")
    p = SamplingParams(max_new_tokens=5, temperature=0.7, top_p=0.9, top_k=20, seed=3, stop=["zzz"])
    pieces = list(lm.stream("Hi there", p))
    assert len(pieces) > 1 and "".join(pieces) == "".join(words(reply_for("Hi there"))[:5])
    req = posts(fake)[-1]
    assert req["path"] == "/v1/completions" and req["headers"]["authorization"] == "Bearer sk-test"
    assert req["body"] == {"model": "fake-model", "prompt": "Hi there", "stream": True, "max_tokens": 5,
                           "temperature": 0.7, "top_p": 0.9, "top_k": 20, "seed": 3, "stop": ["zzz"]}
    # top_k 0 (off), no seed, no stop: those fields are not sent at all (OpenAI itself refuses top_k)
    list(lm.stream("Hi", SamplingParams(max_new_tokens=3, temperature=0)))
    body = posts(fake)[-1]["body"]
    assert not {"top_k", "seed", "stop", "ignore_eos"} & body.keys() and body["temperature"] == 0
    assert not {"min_p", "repetition_penalty", "repeat_penalty", "repeat_last_n"} & body.keys()
    # min-p and the repetition penalty, when on: vLLM's and llama.cpp's names
    list(lm.stream("Hi", SamplingParams(max_new_tokens=3, min_p=0.05, repetition_penalty=1.1, repeat_last_n=32)))
    body = posts(fake)[-1]["body"]
    assert (body["min_p"], body["repetition_penalty"], body["repeat_penalty"], body["repeat_last_n"]) == (
        0.05, 1.1, 1.1, 32)


def test_generate_is_one_plain_request_per_prompt_in_order(url, fake):
    lm = RemoteLM(url, model="m", concurrency=3, extra={"repeat_penalty": 1.0})
    p = SamplingParams(max_new_tokens=100, temperature=0, stop_at_eos=False)
    prompts = ["a", "bb", "ccc", "dddd", "eeeee"]
    assert lm.generate(prompts, p) == [reply_for(x) for x in prompts]
    assert lm.generate("a", p) == [reply_for("a")]
    bodies = [r["body"] for r in posts(fake)]
    assert len(bodies) == 6 and not any(b.get("stream") for b in bodies)
    assert all(b["ignore_eos"] is True and b["repeat_penalty"] == 1.0 for b in bodies)
    assert "authorization" not in posts(fake)[0]["headers"]
    assert lm.generate("a", SamplingParams(max_new_tokens=0)) == [""] and len(posts(fake)) == 6


def test_stop_strings_are_applied_even_when_the_server_ignores_them(url, fake):
    lm = RemoteLM(url, model="m")
    full = reply_for("xy")
    p = SamplingParams(max_new_tokens=50, stop=["pon a", "nothing"])
    for apply_stop in (True, False):
        fake.apply_stop = apply_stop
        assert lm.generate("xy", p) == [full[:full.index("pon a")]]
        assert "".join(lm.stream("xy", p)) == full[:full.index("pon a")]


def test_api_key_defaults_to_the_environment(url, fake, monkeypatch):
    monkeypatch.setenv("OPENAI_API_KEY", "sk-openai")
    RemoteLM(url)
    assert fake.requests[-1]["headers"]["authorization"] == "Bearer sk-openai"
    monkeypatch.setenv("SLMKIT_API_KEY", "sk-slm")
    RemoteLM(url)
    assert fake.requests[-1]["headers"]["authorization"] == "Bearer sk-slm"


def test_chat_mode_sends_each_prompt_as_one_user_message(url, fake):
    lm = RemoteLM(url, model="m", chat=True)
    p = SamplingParams(max_new_tokens=20, temperature=0)
    assert lm.generate(["hello bot"], p) == ["You said: hello bot"]
    assert "".join(lm.stream("hello bot", p)) == "You said: hello bot"
    for req in posts(fake):
        assert req["path"] == "/v1/chat/completions"
        assert req["body"]["messages"] == [{"role": "user", "content": "hello bot"}] and "prompt" not in req["body"]
    assert posts(fake)[-1]["body"]["stream"] is True
    plain = RemoteLM(url, model="m")
    msgs = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"}]
    assert plain.generate_chat(msgs, p) == "You said: hi"
    assert "".join(plain.stream_chat(msgs, p)) == "You said: hi"
    assert posts(fake)[-1]["body"]["messages"] == msgs


def test_heal_and_token_ids_are_refused(url):
    lm = RemoteLM(url, model="m")
    with pytest.raises(ValueError, match="heal"):
        lm.stream("x", heal=True)
    with pytest.raises(ValueError, match="heal"):
        lm.generate(["x"], heal=True)
    with pytest.raises(NotImplementedError, match="text only"):
        lm.logprobs([1, 2, 3])


@pytest.mark.parametrize("mode", ["openai", "vllm"])
def test_score_sums_only_the_continuation_and_reports_greedy(url, fake, mode):
    fake.logprobs = mode
    lm = RemoteLM(url, model="m")
    s = lm.score("The capital of France is", " Paris")
    assert s.n_tokens == 1 and s.is_greedy and s.logprob == pytest.approx(fake_logprob(" Paris"))
    s = lm.score("The capital of France is", " the city of Paris")
    assert s.n_tokens == 4 and not s.is_greedy
    assert s.logprob == pytest.approx(sum(fake_logprob(t) for t in [" the", " city", " of", " Paris"]))
    body = posts(fake)[-1]["body"]
    assert body["echo"] is True and body["logprobs"] == 1
    assert body["prompt"] == "The capital of France is the city of Paris"
    assert body["max_tokens"] == 1  # max_tokens=0 means "no limit" to llama.cpp; the extra token is ignored
    # a server token merged across the boundary ("Fra" + "nce") is the continuation's first token
    s = lm.score("The capital of Fra", "nce Is")
    assert s.n_tokens == 2 and s.is_greedy and s.logprob == pytest.approx(fake_logprob(" France") + fake_logprob(" Is"))
    assert lm.score("anything", "").n_tokens == 0


def test_score_of_an_empty_context_needs_a_first_token_logprob(url, fake):
    lm = RemoteLM(url, model="m")
    with pytest.raises(ValueError, match="empty context"):
        lm.score("", "Hello world")
    fake.logprobs = "vllm"  # the bos token gives the first word a log-prob
    assert lm.score("", "Hello world").n_tokens == 2


@pytest.mark.parametrize("mode", ["none", "refuse"])
def test_score_without_prompt_logprobs_is_not_implemented(url, fake, mode):
    fake.logprobs = mode
    with pytest.raises(NotImplementedError, match=re.escape(url) + ".*does not return prompt log-probs"):
        RemoteLM(url, model="m").score("a b", " c")


def test_http_errors_carry_the_status_and_the_servers_message(url, fake):
    lm = RemoteLM(url, model="m")
    fake.fail = (500, {"error": {"message": "kaboom: CUDA out of memory", "type": "server_error"}})
    with pytest.raises(RuntimeError, match=r"HTTP 500.*kaboom: CUDA out of memory"):
        lm.generate("x")
    with pytest.raises(RuntimeError, match=r"HTTP 500.*kaboom"):
        list(lm.stream("x"))
    with pytest.raises(RuntimeError, match=r"HTTP 500.*kaboom"):
        lm.score("x", " y")
    fake.fail = (503, b"<html>" + b"busy " * 2000 + b"</html>")
    with pytest.raises(RuntimeError, match="HTTP 503") as e:
        lm.generate("x")
    assert "busy" in str(e.value) and len(str(e.value)) < 700
    fake.fail = (401, {"error": {"message": "Incorrect API key provided"}})
    with pytest.raises(RuntimeError, match=r"401.*OPENAI_API_KEY.*Incorrect API key"):
        lm.generate("x")


def test_an_error_event_mid_stream_is_raised(url, fake):
    fake.stream_error = True
    with pytest.raises(RuntimeError, match="context overflow"):
        list(RemoteLM(url, model="m").stream("x", SamplingParams(max_new_tokens=5)))


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_a_refused_connection_names_the_url():
    url = f"http://127.0.0.1:{free_port()}"
    with pytest.raises(ConnectionError, match=re.escape(url) + ".*is the server running"):
        RemoteLM(url)
    lm = RemoteLM(url, model="m")
    with pytest.raises(ConnectionError, match=re.escape(url)):
        lm.generate("x")
    with pytest.raises(ConnectionError, match=re.escape(url)):
        list(lm.stream("x"))


def test_a_slow_server_times_out_as_a_connection_error(url, fake):
    fake.delay = 0.5
    with pytest.raises(ConnectionError, match=re.escape(url) + ".*did not answer within 0.1 s"):
        RemoteLM(url, model="m", timeout=0.1).generate("x")


# --- integration: llama-cpp-python's OpenAI server on a GGUF written by slmkit -------------------------------


@pytest.mark.slow
def test_greedy_completion_through_llama_cpp_server_matches_torch(tmp_path, tiny_cfg):
    pytest.importorskip("llama_cpp.server")
    import torch

    from slmkit.formats.gguf import write_gguf
    from slmkit.formats.hf_dir import save_model_dir
    from slmkit.lm.torch_lm import TorchLM
    from slmkit.model.llama import Transformer
    from slmkit.tokenizer import train_tokenizer

    tok = train_tokenizer(["def foo(x):\n    return x + 1\n", "the cat sat on the mat. the end."] * 20, vocab_size=300)
    cfg = dataclasses.replace(tiny_cfg, vocab_size=tok.vocab_size, bos_token_id=tok.bos_id, eos_token_id=tok.eos_id,
                              pad_token_id=tok.pad_id, tie_embeddings=False)
    model = Transformer(cfg).eval()
    # A random model would emit special tokens and lone UTF-8 bytes, which servers render differently from
    # Tokenizer.decode; zeroing their output rows makes them (practically) never the argmax.
    def plain(text):
        return text.isascii() and all(c.isprintable() or c in " \n" for c in text)

    bad = [i for i in range(tok.vocab_size) if i in (tok.bos_id, tok.eos_id, tok.pad_id)
           or not plain(tok.decode([i])) or tok.decode([i]) in ("<|im_start|>", "<|im_end|>")]
    with torch.no_grad():
        model.lm_head.weight[bad] = 0
    save_model_dir(model, tmp_path / "model", tokenizer=tok)
    gguf = tmp_path / "model.gguf"
    write_gguf(tmp_path / "model", gguf, quant="f32")

    port = free_port()
    log = open(tmp_path / "server.log", "w")
    cmd = [sys.executable, "-m", "llama_cpp.server", "--model", str(gguf), "--host", "127.0.0.1", "--port", str(port),
           "--n_ctx", str(cfg.max_seq_len)]
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)
    try:
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 120
        while True:
            if proc.poll() is not None:
                pytest.fail(f"llama_cpp.server exited ({proc.returncode}):\n{(tmp_path / 'server.log').read_text()}")
            try:
                urllib.request.urlopen(url + "/v1/models", timeout=2).close()
                break
            except OSError:
                if time.monotonic() > deadline:
                    pytest.fail("llama_cpp.server did not come up in 120 s")
                time.sleep(0.5)
        # llama.cpp's default repeat_penalty (1.1) would change greedy decoding
        lm = RemoteLM(url, timeout=60, extra={"repeat_penalty": 1.0})
        ref = TorchLM(model, tok)
        p = SamplingParams(max_new_tokens=12, temperature=0.0)
        for prompt in ["def foo(x):", "the cat"]:
            expected = ref.generate(prompt, p)[0]
            assert expected, "the reference produced nothing to compare"
            assert lm.generate(prompt, p) == [expected]
            assert "".join(lm.stream(prompt, p)) == expected
    finally:
        stop_process(proc)
        log.close()
