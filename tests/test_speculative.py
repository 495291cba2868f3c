"""Speculative decoding (lm/speculative.py): greedy output is the target's own, token for token; sampled output
has the target's distribution (chi-square against the target's exact probabilities); mismatched tokenizers are
refused; `slm generate --draft`."""

import dataclasses

import numpy as np
import pytest
import torch
from conftest import PAIRS, TINY, tiny_model_dir, translation_tokenizer
from typer.testing import CliRunner

from slmkit.cli import app
from slmkit.lm import load_lm
from slmkit.lm.speculative import CachedWindow, SpeculativeLM, prompt_lookup
from slmkit.lm.torch_lm import TorchLM
from slmkit.model.config import model_config
from slmkit.model.llama import Transformer
from slmkit.sampling import SamplingParams, sample_next, token_probs

TEXT = " ".join(f"Translate {a}: {b}." for a, b in PAIRS)


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("spec")
    tok = translation_tokenizer()
    torch.manual_seed(0)
    target = tiny_model_dir(tmp / "target", tok, train_on=TEXT)
    draft = tiny_model_dir(tmp / "draft", tok, train_on=TEXT, steps=40, n_layers=1)
    return {"tok": tok, "target": target, "draft": draft, "tmp": tmp}


def greedy_prompts(tok, n=32, seed=0):
    """Token-id prompts: pieces of the training text, random ids, and ones longer than the 64-token context."""
    rng = np.random.default_rng(seed)
    text_ids = tok.encode(TEXT * 3)
    prompts = []
    for i in range(n):
        if i % 4 == 3:
            prompts.append(rng.integers(3, tok.vocab_size, size=int(rng.integers(1, 20))).tolist())
        else:
            length = int(rng.integers(90, 120)) if i % 8 == 0 else int(rng.integers(1, 30))
            start = int(rng.integers(0, len(text_ids) - length))
            prompts.append(text_ids[start:start + length])
    return prompts


@pytest.mark.parametrize("draft", ["model", "ngram"])
def test_greedy_output_is_the_targets_own(world, draft):
    # float64: the target's one-token steps and its k-token verification passes then agree to ~1e-15, so an
    # argmax near-tie cannot flip between them on any CPU
    target = TorchLM.load(world["target"], dtype=torch.float64)
    drafter = "ngram" if draft == "ngram" else TorchLM.load(world["draft"], dtype=torch.float64)
    spec = SpeculativeLM(target, drafter, max_draft=4)
    prompts = greedy_prompts(world["tok"])
    assert len(prompts) >= 30 and any(len(p) > TINY["max_seq_len"] for p in prompts)
    for i, prompt in enumerate(prompts):
        # 50 new tokens past a long prompt slide the 64-token window; every third prompt adds the penalty
        params = SamplingParams(max_new_tokens=50, temperature=0, stop_at_eos=i % 2 == 0,
                                repetition_penalty=1.3 if i % 3 == 0 else 1.0)
        assert list(spec.stream_ids(prompt, params, None)) == list(target.stream_ids(prompt, params, None)), i
    # token healing (the first token masked) goes through the same path
    texts = ["Translate red: ro", "Translate cat", "Translate water: e"]
    params = SamplingParams(max_new_tokens=20, temperature=0)
    assert spec.generate(texts, params, heal=True) == target.generate(texts, params, heal=True)
    # it really drafted: more than one token per target forward on this repetitive text
    assert spec.stats.accepted > 0 and spec.stats.tokens_per_forward > 1.3, spec.stats


def test_prompt_lookup_proposes_what_followed_the_latest_match():
    ids = [5, 6, 7, 8, 9, 1, 6, 7, 3, 4, 6, 7]
    assert prompt_lookup(ids, 2) == [3, 4]  # "6 7" last seen before "3 4"; the longer "4 6 7" never was
    assert prompt_lookup([1, 2, 3, 9, 2, 3], 3) == [9, 2, 3]  # n = 2 matches
    assert prompt_lookup([1, 2, 3], 2) == []
    assert prompt_lookup(ids, 0) == []


def test_cached_window_follows_any_token_list_it_is_given(tiny_cfg):
    model = Transformer(tiny_cfg).double().eval()
    window = CachedWindow(model, 64)

    def fresh(ids, n):
        with torch.no_grad():
            return model(torch.tensor([ids]))[0, -n:].float()
    ids = list(range(3, 40))
    for ids_now, n in [(ids, 4), (ids + [7, 8], 3), (ids[:20] + [9] + ids[21:], 2), (ids[:10], 1)]:
        assert torch.allclose(window.logits(ids_now, n), fresh(ids_now, n), atol=1e-6)
    assert window.room(64) == 1 and window.room(65) == 33 and window.start == 33  # slid to the recent half


# --- sampling exactness on an 8-token vocabulary ---------------------------------------------------------------

def tiny_vocab_lm(seed: int, n_layers: int = 2) -> TorchLM:
    cfg = dataclasses.replace(model_config("nano", **TINY), vocab_size=8, n_layers=n_layers, bos_token_id=None,
                              eos_token_id=None, tie_embeddings=False)
    torch.manual_seed(seed)
    model = Transformer(cfg)
    with torch.no_grad():  # peaked, different distributions (a random init is nearly uniform)
        model.lm_head.weight.mul_(60)
    return TorchLM(model.eval(), None, name=f"vocab8-{seed}")


def chi_square_p(counts: np.ndarray, probs: np.ndarray) -> float:
    """p-value of observed `counts` under `probs` (cells expecting fewer than 5 merged into one)."""
    expected = probs * counts.sum()
    small = expected < 5
    obs = np.append(counts[~small], counts[small].sum())
    exp = np.append(expected[~small], expected[small].sum())
    if exp[-1] == 0:
        obs, exp = obs[:-1], exp[:-1]
    stat = float(((obs - exp) ** 2 / exp).sum())
    df = len(exp) - 1
    return float(torch.special.gammaincc(torch.tensor(df / 2, dtype=torch.float64),
                                         torch.tensor(stat / 2, dtype=torch.float64)))


def exact_pair_probs(lm: TorchLM, prompt: list[int], params: SamplingParams) -> np.ndarray:
    """P(first two tokens = (a, b)) when `lm` samples alone, (8, 8), from the sampler's own distributions."""
    def probs(ids):
        logits = lm.model(torch.tensor([ids]))[0, -1:].float()
        recent = torch.tensor([ids[-params.repeat_last_n:]]) if params.repetition_penalty != 1 else None
        return token_probs(logits, params, recent)[0].double().numpy()
    with torch.no_grad():
        first = probs(prompt)
        return np.stack([first[a] * probs(prompt + [a]) for a in range(8)])


FULL_CHAIN = dict(temperature=0.8, top_k=6, top_p=0.9, repetition_penalty=1.5)


@pytest.mark.parametrize(("draft", "chain"), [("model", dict(temperature=1.0)), ("model", FULL_CHAIN),
                                              ("ngram", FULL_CHAIN)])
def test_sampled_output_has_the_targets_distribution(draft, chain):
    target = tiny_vocab_lm(0)
    drafter = tiny_vocab_lm(1, n_layers=1) if draft == "model" else "ngram"
    spec = SpeculativeLM(target, drafter, max_draft=3)
    # the target's own greedy text repeats itself, so prompt lookup proposes tokens the target finds likely
    prompt = [1, 2] + list(target.stream_ids([1, 2], SamplingParams(max_new_tokens=10, temperature=0), None))
    params = SamplingParams(max_new_tokens=3, stop_at_eos=False, **chain)
    exact = exact_pair_probs(target, prompt, params)
    n = 2000
    pairs = np.zeros((8, 8))
    for seed in range(n):
        a, b, _ = spec.stream_ids(prompt, dataclasses.replace(params, seed=seed), None)
        pairs[a, b] += 1
    p_first = chi_square_p(pairs.sum(1), exact.sum(1))
    p_pairs = chi_square_p(pairs.ravel(), exact.ravel())
    assert p_first > 1e-3 and p_pairs > 1e-3, (p_first, p_pairs)
    # both kinds of step happened: kept drafts and rejections
    assert 0 < spec.stats.accepted < spec.stats.drafted, spec.stats
    if draft == "model":  # the test has the power to see a wrong distribution: the draft's own fails it
        own = np.zeros((8, 8))
        for seed in range(500):
            a, b, _ = drafter.stream_ids(prompt, dataclasses.replace(params, seed=seed), None)
            own[a, b] += 1
        assert chi_square_p(own.ravel(), exact.ravel()) < 1e-6


@pytest.mark.parametrize("draft", ["ngram", "llamacpp", "torch"])
def test_a_llama_cpp_target_gives_its_own_greedy_output(world, draft):
    pytest.importorskip("llama_cpp")
    from slmkit.formats.gguf import write_gguf
    from slmkit.lm.llamacpp_lm import LlamaCppLM
    path = world["tmp"] / "target.gguf"
    if not path.exists():
        write_gguf(world["target"], path, quant="f32")
    plain, target = LlamaCppLM(path, n_ctx=64), LlamaCppLM(path, n_ctx=64)  # the model's own context
    drafter = {"ngram": lambda: "ngram", "torch": lambda: TorchLM.load(world["draft"]),
               "llamacpp": lambda: LlamaCppLM(write_gguf(world["draft"], world["tmp"] / "d.gguf", quant="f32"),
                                              n_ctx=64)}
    spec = SpeculativeLM(target, drafter[draft](), max_draft=4)
    prompts = [p for p in greedy_prompts(world["tok"], n=24, seed=1) if len(p) <= 30]
    for i, prompt in enumerate(prompts):  # (64-token context: 30 + 30 fit)
        params = SamplingParams(max_new_tokens=30, temperature=0, stop_at_eos=i % 2 == 0)
        assert list(spec.stream_ids(prompt, params, None)) == list(plain.stream_ids(prompt, params, None)), i
    assert spec.stats.accepted > 0 and spec.stats.tokens_per_forward > 1.1, spec.stats
    # at the context's end it stops where plain llama.cpp decoding stops
    long = greedy_prompts(world["tok"], n=1)[0][:60]
    params = SamplingParams(max_new_tokens=30, temperature=0, stop_at_eos=False)
    assert list(spec.stream_ids(long, params, None)) == list(plain.stream_ids(long, params, None))
    spec.close()
    plain.close()
    if draft == "ngram":  # `slm serve --backend llamacpp --draft ngram` opens its llama.cpp target to verify drafts
        from slmkit.serve.app import _load_generator
        served, _ = _load_generator(str(path), "llamacpp", "cpu", "fp32", None, {}, "ngram", 4, None, None, 0.05)
        assert isinstance(served, SpeculativeLM) and isinstance(served.target, LlamaCppLM)
        assert served.target.logits_all
        served.close()


@pytest.mark.parametrize("draft", ["ngram", "hf", "torch"])
def test_a_transformers_target_gives_its_own_greedy_output(world, draft):
    pytest.importorskip("transformers")
    from slmkit.lm.hf_lm import HFLM
    plain, target = HFLM(world["target"]), HFLM(world["target"])
    drafter = {"ngram": lambda: "ngram", "torch": lambda: TorchLM.load(world["draft"]),
               "hf": lambda: HFLM(world["draft"])}[draft]()
    spec = SpeculativeLM(target, drafter, max_draft=4)
    # prompts past the 64-token context too: the window slides where HFLM's own decoding slides it
    for i, prompt in enumerate(greedy_prompts(world["tok"], n=16, seed=2)):
        params = SamplingParams(max_new_tokens=40, temperature=0, stop_at_eos=i % 2 == 0)
        assert list(spec.stream_ids(prompt, params, None)) == list(plain.stream_ids(prompt, params, None)), i
    assert spec.stats.accepted > 0 and spec.stats.tokens_per_forward > 1.1, spec.stats
    if draft == "hf":  # load_lm opens a model draft on the target's backend
        lm = load_lm(str(world["target"]), backend="hf", draft=str(world["draft"]))
        assert isinstance(lm, SpeculativeLM) and isinstance(lm.target, HFLM) and isinstance(lm.draft, HFLM)
        prompt = greedy_prompts(world["tok"], n=1)[0]
        params = SamplingParams(max_new_tokens=20, temperature=0)
        assert list(lm.stream_ids(prompt, params, None)) == list(plain.stream_ids(prompt, params, None))


# --- loading, refusals, the CLI ----------------------------------------------------------------------------------

def test_a_draft_with_another_tokenizer_is_refused_in_one_line_naming_both(world):
    from slmkit.tokenizer import TokenizerMismatch, train_tokenizer
    other = tiny_model_dir(world["tmp"] / "stranger", train_tokenizer(["other words entirely " * 40],
                                                                      vocab_size=280))
    with pytest.raises(TokenizerMismatch) as e:
        load_lm(str(world["target"]), draft=str(other))
    message = str(e.value)
    assert "\n" not in message and str(world["target"]) in message and str(other) in message
    assert "different tokenizers" in message and "ngram" in message


def test_load_lm_builds_it_and_refuses_what_it_cannot_run(world):
    lm = load_lm(str(world["target"]), draft=str(world["draft"]), draft_k=3)
    assert isinstance(lm, SpeculativeLM) and lm.max_draft == 3 and lm.tokenizer is lm.target.tokenizer
    with pytest.raises(ValueError, match="unknown draft"):
        SpeculativeLM(lm.target, "bigram")
    with pytest.raises(ValueError, match="no-cache"):
        load_lm(str(world["target"]), draft="ngram", use_cache=False)


def test_cli_generate_with_an_ngram_draft_prints_the_targets_greedy_text(world):
    runner = CliRunner()
    args = ["generate", str(world["target"]), "Translate cat: chat. Translate dog:", "--temperature", "0",
            "--max-new-tokens", "24", "--no-heal"]
    plain = runner.invoke(app, args)
    spec = runner.invoke(app, args + ["--draft", "ngram", "--draft-k", "5"])
    assert plain.exit_code == 0 and spec.exit_code == 0, spec.output
    assert spec.stdout == plain.stdout
    assert "speculative decoding:" in spec.stderr and "tokens per target forward" in spec.stderr


def test_token_probs_is_the_distribution_sample_draws_from():
    logits = torch.tensor([2.0, 1.5, 1.4, 0.3, -0.5, 0.9, 1.8, -2.0])
    params = SamplingParams(**FULL_CHAIN)
    recent = [0, 6, 6]
    probs = token_probs(logits[None], params, torch.tensor([recent]))[0].double().numpy()
    g = torch.Generator().manual_seed(0)
    counts = np.bincount([sample_next(logits, params, g, recent) for _ in range(4000)], minlength=8)
    assert chi_square_p(counts, probs) > 1e-3 and (counts[probs == 0] == 0).all()
    assert token_probs(logits[None], SamplingParams(temperature=0))[0].tolist() == [1.0] + [0.0] * 7


def test_draft_length_follows_the_acceptance_rate_and_only_windowed_targets_are_taken():
    from slmkit.lm.base import LM
    spec = SpeculativeLM(tiny_vocab_lm(0), "ngram", max_draft=8)
    assert spec.draft_length() == 4  # the prior: 0.8 per token
    for _ in range(30):
        spec._count(drafted=spec.draft_length(), new=1)  # every draft rejected
    assert spec.draft_length() == 1
    for _ in range(30):
        k = spec.draft_length()
        spec._count(drafted=k, new=k + 1)  # every draft kept
    assert spec.draft_length() == 8
    with pytest.raises(ValueError, match="torch backend, llama.cpp or transformers for the target"):
        SpeculativeLM(LM(), "ngram")


def test_slm_serve_with_a_draft_answers_the_openai_client_with_the_targets_greedy_text(world, monkeypatch):
    openai = pytest.importorskip("openai")
    uvicorn = pytest.importorskip("uvicorn")
    from conftest import live_server

    prompt = "Translate cat: chat. Translate dog:"
    want = TorchLM.load(world["target"]).generate(prompt, SamplingParams(temperature=0, max_new_tokens=20))[0]
    answers = []

    def serve_and_ask(served, **_):  # stands in for uvicorn.run: slm serve has built the app and the engine
        with live_server(served) as url:
            c = openai.OpenAI(base_url=url + "/v1", api_key="none", max_retries=0)
            out = c.completions.create(model="m", prompt=prompt, max_tokens=20, temperature=0)
            streamed = c.completions.create(model="m", prompt=prompt, max_tokens=20, temperature=0, stream=True)
            answers.extend([out.choices[0].text, "".join(ch.choices[0].text for ch in streamed)])

    monkeypatch.setattr(uvicorn, "run", serve_and_ask)
    from slmkit.serve.engine import Engine
    drafted = set()
    real_step = Engine._speculate_with_model

    def counting(self, rows, batch):
        drafted.add(self.lm.max_draft)
        return real_step(self, rows, batch)

    monkeypatch.setattr(Engine, "_speculate_with_model", counting)
    result = CliRunner().invoke(app, ["serve", str(world["target"]), "--draft", str(world["draft"]),
                                      "--draft-k", "3"])
    assert result.exit_code == 0, result.output
    assert answers == [want, want] and want
    assert drafted == {3}  # decoded speculatively in the batched engine, with --draft-k
