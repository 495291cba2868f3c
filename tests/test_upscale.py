"""Up-scaling / emulated fine-tuning (lm/upscale.py): beta 0 is the large model exactly; the combination is
log p_large + beta (log p_tuned - log p_base), renormalised, checked by hand on an 8-token vocabulary (also on
the union of top-k lists a remote endpoint gives); incremental decoding equals the whole-context computation
on every local backend; mismatched tokenizers are refused; `slm generate --large` and the JSON spec."""

import dataclasses
import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import numpy as np
import pytest
import torch
from conftest import PAIRS, TINY, tiny_model_dir, translation_tokenizer
from typer.testing import CliRunner

from slmkit.cli import app
from slmkit.lm import generation_backend, load_lm
from slmkit.lm.remote_lm import RemoteLM
from slmkit.lm.torch_lm import TorchLM
from slmkit.lm.upscale import NextTokens, UpscaledLM, combine, floor_logprob, read_spec, sequence_scores, stepper
from slmkit.model.config import model_config
from slmkit.model.llama import Transformer
from slmkit.sampling import SamplingParams, sample_next

TEXT = " ".join(f"Translate {a}: {b}." for a, b in PAIRS)
# what the small model is tuned to write instead: the English word again
TUNED_TEXT = " ".join(f"Translate {a}: {a}." for a, _ in PAIRS)


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("eft")
    tok = translation_tokenizer()
    torch.manual_seed(0)
    large = tiny_model_dir(tmp / "large", tok, train_on=TEXT)
    base = tiny_model_dir(tmp / "base", tok, train_on=TEXT, steps=40, n_layers=1)
    tuned = tiny_model_dir(tmp / "tuned", tok, train_on=TUNED_TEXT, steps=60, n_layers=1)
    return {"tok": tok, "large": large, "base": base, "tuned": tuned, "tmp": tmp}


def opened(world, dtype=torch.float64):
    return [TorchLM.load(world[k], dtype=dtype) for k in ("large", "base", "tuned")]


def prompts(tok, n=6, seed=0):
    rng = np.random.default_rng(seed)
    ids = tok.encode(TEXT * 2)
    out = []
    for _ in range(n):
        length = int(rng.integers(1, 25))
        start = int(rng.integers(0, len(ids) - length))
        out.append(ids[start:start + length])
    return out


def test_beta_zero_is_the_large_model_exactly(world):
    large, base, tuned = opened(world)
    up = UpscaledLM(large, base, tuned, beta=0.0)
    for i, prompt in enumerate(prompts(world["tok"])):
        params = SamplingParams(max_new_tokens=30, temperature=0, stop_at_eos=i % 2 == 0,
                                repetition_penalty=1.3 if i % 3 == 0 else 1.0)
        assert list(up.stream_ids(prompt, params, None)) == list(large.stream_ids(prompt, params, None)), i
        sampled = SamplingParams(max_new_tokens=20, temperature=0.9, top_k=20, top_p=0.9, min_p=0.02,
                                 repetition_penalty=1.2, seed=i)
        assert list(up.stream_ids(prompt, sampled, None)) == list(large.stream_ids(prompt, sampled, None)), i
    ids = world["tok"].encode(TEXT)[:40]
    a, b = up.logprobs(ids, top_k=5), large.logprobs(ids, top_k=5)
    assert np.array_equal(a.token_logprobs, b.token_logprobs) and np.array_equal(a.top_ids, b.top_ids)
    assert np.array_equal(a.top_logprobs, b.top_logprobs)
    assert up.score("Translate cat:", " chat.") == large.score("Translate cat:", " chat.")
    # beta 1 is something else: the tuned model's habit shows through
    assert UpscaledLM(large, base, tuned, beta=1.0).logprobs(ids).token_logprobs.tolist() != \
        b.token_logprobs.tolist()


# --- the combination by hand on an 8-token vocabulary -------------------------------------------------------

def vocab8(seed: int, n_layers: int = 2) -> TorchLM:
    cfg = dataclasses.replace(model_config("nano", **TINY), vocab_size=8, n_layers=n_layers, bos_token_id=None,
                              eos_token_id=None, tie_embeddings=False)
    torch.manual_seed(seed)
    model = Transformer(cfg)
    with torch.no_grad():  # peaked, different distributions (a random init is nearly uniform)
        model.lm_head.weight.mul_(30)
    return TorchLM(model.double().eval(), None, name=f"vocab8-{seed}")


def full_logprobs(lm: TorchLM, ids: list[int]) -> torch.Tensor:
    with torch.no_grad():
        return torch.log_softmax(lm.model(torch.tensor([ids]))[0].double(), -1)


@pytest.mark.parametrize("beta", [1.0, 0.5, 2.0])
def test_the_combination_is_the_hand_computed_renormalised_sum(beta):
    large, base, tuned = vocab8(0), vocab8(1, 1), vocab8(2, 1)
    up = UpscaledLM(large, base, tuned, beta=beta)
    ids = [1, 5, 2, 7, 3, 3, 0, 6]
    lp = {name: full_logprobs(m, ids) for name, m in (("L", large), ("B", base), ("T", tuned))}
    expected = torch.log_softmax(lp["L"] + beta * (lp["T"] - lp["B"]), -1)  # (n, 8), row i after ids[:i + 1]
    got = up.logprobs(ids, top_k=8)
    want = expected[:-1].gather(1, torch.tensor(ids[1:])[:, None])[:, 0]
    assert np.allclose(got.token_logprobs, want.numpy(), atol=1e-5)
    assert np.allclose(got.top_logprobs, expected[:-1].sort(-1, descending=True).values.numpy(), atol=1e-5)
    # the differences really moved the distribution
    assert (expected - lp["L"]).abs().max() > 0.5
    # decoding: greedy follows the combined argmax step by step, sampling draws from the combined distribution
    greedy = list(up.stream_ids(ids, SamplingParams(max_new_tokens=6, temperature=0, stop_at_eos=False), None))
    ctx = list(ids)
    for tok in greedy:
        row = (full_logprobs(large, ctx)[-1] + beta * (full_logprobs(tuned, ctx)[-1] - full_logprobs(base, ctx)[-1]))
        assert tok == int(row.argmax())
        ctx.append(tok)
    # sampling: seeded draws are the shared sampler's own draws from the combined logits, which are the large
    # model's raw logits plus the difference (the repetition penalty then acts as on the large model alone)
    with torch.no_grad():
        raw = large.model(torch.tensor([ids]))[0, -1].double()
    z = (raw + beta * (lp["T"][-1] - lp["B"][-1])).float()
    chain = SamplingParams(max_new_tokens=1, temperature=0.9, top_k=6, repetition_penalty=1.3, stop_at_eos=False)
    for seed in range(8):
        params = dataclasses.replace(chain, seed=seed)
        first = next(iter(up.stream_ids(ids, params, None)))
        assert first == sample_next(z, params, torch.Generator().manual_seed(seed), ids)


def test_top_k_members_combine_on_the_union_with_the_documented_floor():
    listed = torch.tensor([[-0.5, -1.5, float("-inf")]])
    # the k-th listed (-1.5) bounds a missing token, and so does the mass left over: 1 - e^-0.5 - e^-1.5
    left = np.log(1 - np.exp(-0.5) - np.exp(-1.5))
    assert floor_logprob(listed).item() == pytest.approx(min(-1.5, left), abs=1e-6)
    v = 6
    large_vals = torch.full((1, v), float("-inf"))
    large_vals[0, [0, 1]] = torch.tensor([-0.3, -1.6])
    large = NextTokens(large_vals, torch.isfinite(large_vals))
    base = NextTokens(torch.log_softmax(torch.tensor([[0.0, 2.0, 0.5, 1.0, -1.0, -2.0]]), -1))
    tuned = NextTokens(torch.log_softmax(torch.tensor([[0.0, 0.0, 3.0, 1.0, -1.0, -2.0]]), -1))
    z = combine(large, base, tuned, beta=1.0, top_k=2)
    floor = floor_logprob(large_vals).item()
    support = [0, 1, 2, 3]  # large's two, base's top 2 (1, 3), tuned's top 2 (2, 3)
    for t in range(v):
        if t in support:
            lp_large = large_vals[0, t].item() if t in (0, 1) else floor
            assert z[0, t].item() == pytest.approx(lp_large + tuned.values[0, t].item() - base.values[0, t].item(),
                                                   abs=1e-5)
        else:
            assert z[0, t].item() == float("-inf")
    include = torch.zeros(1, v, dtype=torch.bool)
    include[0, 5] = True  # a scored token outside every list still gets a value
    assert np.isfinite(combine(large, base, tuned, 1.0, top_k=2, include=include)[0, 5].item())


def test_incremental_decoding_equals_the_whole_context_computation(world):
    large, base, tuned = opened(world)
    up = UpscaledLM(large, base, tuned, beta=1.0)
    steppers = [stepper(m, world["tok"], 64, 20) for m in (large, base, tuned)]
    ids = world["tok"].encode("Translate cat:")
    for _ in range(20):
        step = up._combine([s(ids) for s in steppers])[0]
        whole = up._combine([sequence_scores(m, ids, world["tok"], 20) for m in (large, base, tuned)])[-1]
        assert torch.allclose(step, whole, atol=1e-5)
        ids = ids + [int(step.argmax())]
    # and stream_ids emits exactly those tokens
    prompt = world["tok"].encode("Translate cat:")
    got = list(up.stream_ids(prompt, SamplingParams(max_new_tokens=20, temperature=0, stop_at_eos=False), None))
    assert got == ids[len(prompt):]
    # a prompt longer than the 64-token context slides the window like plain decoding and keeps going
    long = world["tok"].encode(TEXT * 2)[:100]
    assert len(list(up.stream_ids(long, SamplingParams(max_new_tokens=30, temperature=0, stop_at_eos=False),
                                  None))) == 30


def test_transformers_and_llamacpp_members_step_incrementally_to_the_same_tokens(world, tmp_path):
    torch_up = UpscaledLM(*opened(world, torch.float32), beta=1.0)
    params = SamplingParams(max_new_tokens=24, temperature=0, stop_at_eos=False)
    prompt = world["tok"].encode("Translate dog:")
    want = list(torch_up.stream_ids(prompt, params, None))
    others = []
    if _has("transformers"):
        from slmkit.lm.hf_lm import HFLM
        others.append(HFLM(world["large"]))
    if _has("llama_cpp"):
        from slmkit.formats.gguf import write_gguf
        from slmkit.lm.llamacpp_lm import LlamaCppLM
        others.append(LlamaCppLM(write_gguf(world["large"], tmp_path / "large.gguf", quant="f32")))
    if not others:
        pytest.skip("neither transformers nor llama-cpp-python is installed")
    for large in others:
        up = UpscaledLM(large, torch_up.small_base, torch_up.small_tuned, beta=1.0)
        assert list(up.stream_ids(prompt, params, None)) == want, type(large).__name__
        ids = prompt + want
        step = stepper(large, world["tok"], 64, 20)
        whole = sequence_scores(large, ids, world["tok"], 20).values
        for i in range(len(prompt), len(ids)):
            assert torch.allclose(step(ids[:i]).values[0], whole[i - 1], atol=1e-3)
        assert np.allclose(up.logprobs(ids).token_logprobs, torch_up.logprobs(ids).token_logprobs, atol=1e-2)
        large.close()


def _has(module: str) -> bool:
    import importlib.util
    return importlib.util.find_spec(module) is not None


# --- a remote large model that gives top-k log-probs ----------------------------------------------------------

class TopKServer(BaseHTTPRequestHandler):
    """An OpenAI-compatible /v1/completions that answers `logprobs=k` with a local model's top k next tokens."""

    def log_message(self, *args):
        pass

    def _send(self, obj):
        data = json.dumps(obj).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def do_GET(self):
        self._send({"data": [{"id": "topk", "max_model_len": 64}]})

    def do_POST(self):
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        lm = self.server.lm
        self.server.requests.append(body)
        ids = lm.encode_prompt(body["prompt"])
        with torch.no_grad():
            lp = torch.log_softmax(lm.model(torch.tensor([ids]))[0, -1].double(), -1)
        top = lp.topk(body["logprobs"])
        tops = {lm.tokenizer.decode([int(i)]): float(v) for v, i in zip(top.values, top.indices, strict=True)}
        self._send({"choices": [{"text": next(iter(tops)), "logprobs": {"top_logprobs": [tops]}}]})


@pytest.fixture
def remote(world):
    srv = ThreadingHTTPServer(("127.0.0.1", 0), TopKServer)
    srv.lm, srv.requests = TorchLM.load(world["large"], dtype=torch.float64), []
    thread = threading.Thread(target=srv.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    yield srv
    srv.shutdown()
    srv.server_close()


def test_a_remote_large_model_is_combined_on_its_top_k(world, remote, monkeypatch):
    for var in ("http_proxy", "HTTP_PROXY", "all_proxy", "ALL_PROXY"):
        monkeypatch.delenv(var, raising=False)
    large_local, base, tuned = opened(world)
    large = RemoteLM(f"http://127.0.0.1:{remote.server_address[1]}")
    k = 5
    up = UpscaledLM(large, base, tuned, beta=1.0, top_logprobs=k)
    assert up.tokenizer is base.tokenizer and up.max_length == 64
    ids = world["tok"].encode("Translate red:")
    # by hand: the large model's top 5 (a floor elsewhere) + the small pair's full difference, on the union of
    # the three top-5 sets
    lp = {name: full_logprobs(m, ids)[-1] for name, m in (("L", large_local), ("B", base), ("T", tuned))}
    listed = lp["L"].topk(k)
    floor = floor_logprob(listed.values[None].float()).item()
    support = set(listed.indices.tolist()) | set(lp["B"].topk(k).indices.tolist()) | \
        set(lp["T"].topk(k).indices.tolist())
    lp_large = torch.full_like(lp["L"], floor)
    lp_large[listed.indices] = listed.values
    z = torch.full_like(lp["L"], float("-inf"))
    for t in support:
        z[t] = lp_large[t] + lp["T"][t] - lp["B"][t]
    expected = torch.log_softmax(z, -1)
    greedy = list(up.stream_ids(ids, SamplingParams(max_new_tokens=1, temperature=0, stop_at_eos=False), None))
    assert greedy == [int(expected.argmax())]
    assert remote.requests[-1]["logprobs"] == k and remote.requests[-1]["max_tokens"] == 1
    t = int(expected.argmax())
    assert up.logprobs(ids + [t]).token_logprobs[-1] == pytest.approx(expected[t].item(), abs=1e-4)
    # a whole generation runs through the endpoint, one request per token
    before = len(remote.requests)
    text = up.generate("Translate cat:", SamplingParams(max_new_tokens=8, temperature=0, stop_at_eos=False))[0]
    assert text and len(remote.requests) - before == 8


# --- refusals, loading, the CLI -------------------------------------------------------------------------------

def test_a_model_with_another_tokenizer_is_refused_in_one_line_naming_both(world):
    from slmkit.tokenizer import TokenizerMismatch, train_tokenizer
    other = tiny_model_dir(world["tmp"] / "stranger", train_tokenizer(["other words entirely " * 40],
                                                                      vocab_size=280))
    large, base, _ = opened(world)
    with pytest.raises(TokenizerMismatch) as e:
        UpscaledLM(large, base, TorchLM.load(other), beta=1.0)
    message = str(e.value)
    assert "\n" not in message and str(world["large"]) in message and str(other) in message
    assert "different tokenizers" in message and "small tuned" in message
    with pytest.raises(ValueError, match="no tokenizer"):
        UpscaledLM(large, base, vocab8(0))
    with pytest.raises(ValueError, match="beta"):
        UpscaledLM(large, base, large, beta=float("nan"))


def test_a_json_spec_opens_through_load_lm_and_serve(world, tmp_path):
    spec = tmp_path / "eft.json"
    spec.write_text(json.dumps({"large": str(world["large"]), "small_base": str(world["base"]),
                                "small_tuned": {"model": str(world["tuned"]), "backend": "torch"}, "beta": 0.5}))
    lm = load_lm(str(spec))
    assert isinstance(lm, UpscaledLM) and lm.beta == 0.5 and isinstance(lm.small_tuned, TorchLM)
    assert generation_backend(str(spec), "auto", "cpu") == ("auto", str(spec), {})
    assert lm.score("Translate cat:", " chat.").n_tokens > 0
    # slm eval's efficiency card counts the weights of all three models
    from slmkit.eval.efficiency import weights_bytes
    assert weights_bytes(lm, str(spec)) == sum((world[k] / "model.safetensors").stat().st_size
                                               for k in ("large", "base", "tuned"))
    # the server's engine serves it (its one-request-at-a-time path) with the LM's own output
    import asyncio

    from slmkit.serve.engine import Engine, GenerationRequest
    params = SamplingParams(max_new_tokens=12, temperature=0, stop_at_eos=False)
    engine = Engine(lm, max_batch=2)

    async def served():
        return "".join([ev.text async for ev in engine.generate(GenerationRequest(lm.encode_prompt("Translate dog:"),
                                                                                  params))])
    try:
        assert asyncio.run(served()) == lm.generate("Translate dog:", params)[0]
    finally:
        engine.close()
    # relative paths are read from the spec's folder
    rel = world["tmp"] / "rel.json"
    rel.write_text(json.dumps({"large": "large", "small_base": "base", "small_tuned": "tuned"}))
    assert read_spec(rel)["large"] == {"model": str(world["tmp"] / "large"), "backend": None}
    assert read_spec(rel)["beta"] == 1.0
    for bad, field in [({"large": "x", "small_base": "y"}, "small_tuned"),
                       ({"large": "x", "small_base": "y", "small_tuned": "z", "betta": 1}, "betta"),
                       ({"large": "x", "small_base": "y", "small_tuned": "z", "beta": "high"}, "beta")]:
        spec.write_text(json.dumps(bad))
        with pytest.raises(ValueError, match=field) as e:
            load_lm(str(spec))
        assert str(spec) in str(e.value)
    spec.write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        load_lm(str(spec))


def test_cli_generate_with_large_small_base_small_tuned(world, tmp_path):
    runner = CliRunner()
    common = ["--temperature", "0", "--max-new-tokens", "16", "--no-heal"]
    members = ["--large", str(world["large"]), "--small-base", str(world["base"]), "--small-tuned",
               str(world["tuned"])]
    plain = runner.invoke(app, ["generate", str(world["large"]), "Translate dog:", *common])
    zero = runner.invoke(app, ["generate", *members, "--beta", "0", "Translate dog:", *common])
    one = runner.invoke(app, ["generate", *members, "Translate dog:", *common])
    assert plain.exit_code == 0 and zero.exit_code == 0 and one.exit_code == 0, one.output
    assert zero.stdout == plain.stdout and one.stdout.startswith("Translate dog:")
    both = runner.invoke(app, ["generate", str(world["large"]), "Translate dog:", *members])
    assert both.exit_code == 2 and "not both" in both.stderr
    half = runner.invoke(app, ["generate", "--large", str(world["large"]), "Translate dog:"])
    assert half.exit_code == 2 and "--small-base and --small-tuned" in half.stderr
    neither = runner.invoke(app, ["generate"])
    assert neither.exit_code == 2 and "give MODEL and PROMPT" in neither.stderr
    spec = tmp_path / "eft.json"
    spec.write_text(json.dumps({"large": str(world["large"]), "small_base": str(world["base"]),
                                "small_tuned": str(world["tuned"])}))
    via_spec = runner.invoke(app, ["generate", str(spec), "Translate dog:", *common])
    assert via_spec.exit_code == 0 and via_spec.stdout == one.stdout
