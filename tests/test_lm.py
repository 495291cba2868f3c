"""The LM interface: TorchLM and HFLM agree with each other; cached and uncached decoding agree."""

import numpy as np
import pytest
from conftest import tiny_model_dir

from slmkit.lm import load_lm
from slmkit.lm.base import split_continuation
from slmkit.lm.torch_lm import TorchLM
from slmkit.sampling import SamplingParams
from slmkit.tokenizer import train_tokenizer

TEXT = "def add(a, b):\n    return a + b\n\nprint(add(2, 3))\n"


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    tok = train_tokenizer([TEXT, "héllo wörld ✓ 你好"] * 30, vocab_size=320)
    return tiny_model_dir(tmp_path_factory.mktemp("lm") / "m", tok, tie=False, train_on=TEXT)


def test_logprobs_are_normalised_and_score_sums_them(model_dir):
    lm = load_lm(str(model_dir))
    assert isinstance(lm, TorchLM)
    ids = lm.encode_prompt(TEXT)
    lp = lm.logprobs(ids, top_k=5)
    assert len(lp) == len(ids) - 1 and lp.top_ids.shape == (len(ids) - 1, 5)
    assert np.all(lp.top_logprobs[:, :-1] >= lp.top_logprobs[:, 1:])  # most likely first
    assert np.all(lp.token_logprobs <= lp.top_logprobs[:, 0] + 1e-6)
    ctx, cont = split_continuation(lm.tokenizer, "def add(a, b):", "\n    return a + b")
    s = lm.score("def add(a, b):", "\n    return a + b")
    full = lm.logprobs(ctx + cont, top_k=1)
    assert s.n_tokens == len(cont) and s.logprob == pytest.approx(float(full.token_logprobs[-len(cont):].sum()),
                                                                    abs=1e-5)
    # the greedy continuation is recognised as greedy
    greedy = lm.generate("def add", SamplingParams(max_new_tokens=5, temperature=0, stop_at_eos=False))[0]
    assert greedy.startswith("(a, b)")  # the fitted model learned the text
    assert lm.score("def add", greedy).is_greedy and not lm.score("def add", "(b, a)").is_greedy


def test_seeded_sampling_is_the_same_with_and_without_the_kv_cache_and_streams(model_dir):
    lm = load_lm(str(model_dir))
    uncached = TorchLM(lm.model, lm.tokenizer, use_cache=False)
    # every sampler stage on, and a context past max_seq_len (64): the window slides the same way in both
    p = SamplingParams(max_new_tokens=90, temperature=1.3, top_k=30, top_p=0.97, min_p=0.01,
                       repetition_penalty=1.2, seed=1, stop_at_eos=False)
    ids = lm.encode_prompt("def ")
    a, b = list(lm.stream_ids(ids, p, None)), list(uncached.stream_ids(ids, p, None))
    assert len(a) == 90 and a == b
    assert lm.generate(["def ", "print"], p) == uncached.generate(["def ", "print"], p)
    assert "".join(lm.stream("def ", p)) == lm.generate("def ", p)[0]
    p.seed = 2
    assert list(lm.stream_ids(ids, p, None)) != a


def test_hf_backend_agrees_with_torch(model_dir):
    pytest.importorskip("transformers")
    ours, hf = load_lm(str(model_dir)), load_lm(str(model_dir), backend="hf")
    ids = ours.encode_prompt(TEXT)
    a, b = ours.logprobs(ids, top_k=3), hf.logprobs(ids, top_k=3)
    assert np.abs(a.token_logprobs - b.token_logprobs).max() <= 1e-4
    p = SamplingParams(max_new_tokens=24, temperature=0, stop_at_eos=False)
    assert ours.generate("def ", p) == hf.generate("def ", p)
    # one sampler: seeded samples agree too (logits within 1e-4 of each other, a fitted model's draws far apart)
    p = SamplingParams(max_new_tokens=24, temperature=0.7, top_k=20, repetition_penalty=1.1, seed=5,
                       stop_at_eos=False)
    assert ours.generate("def ", p) == hf.generate("def ", p)
    assert hf.score("def add", "(a, b)").logprob == pytest.approx(ours.score("def add", "(a, b)").logprob, abs=1e-4)


def test_gguf_files_open_with_the_torch_backend(model_dir, tmp_path):
    pytest.importorskip("gguf")
    from slmkit.formats.gguf import write_gguf
    path = write_gguf(model_dir, tmp_path / "m.gguf")
    a, b = load_lm(str(model_dir)), load_lm(str(path))
    ids = a.encode_prompt(TEXT)
    assert np.array_equal(a.logprobs(ids).token_logprobs, b.logprobs(ids).token_logprobs)
    with pytest.raises(ValueError, match="slm import"):
        load_lm(str(path), backend="hf")


def test_bad_backend_and_bos_handling(model_dir):
    with pytest.raises(ValueError, match="llamacpp"):
        load_lm(str(model_dir), backend="vllm")
    lm = load_lm(str(model_dir))
    bos = lm.tokenizer.bos_token
    assert lm.encode_prompt(bos + "x") == lm.encode_prompt("x")  # a template's own bos is not doubled
    assert lm.encode_prompt("x")[0] == lm.tokenizer.bos_id


def test_torch_embeddings_batched_equal_one_at_a_time(tmp_path):
    """TorchLM.embed pads a batch on the right; causal attention and the masked mean make each vector the one the
    text gets alone."""
    import torch
    tok = train_tokenizer(["the cat sat on the mat and the dog ran far away"] * 20, vocab_size=280)
    lm = load_lm(str(tiny_model_dir(tmp_path / "m", tok)))
    texts = ["the cat", "the dog ran far away on the mat", "sat", "the mat and the dog", "cat sat on the mat"]
    batched = lm.embed(texts, batch_size=3)
    alone = torch.cat([lm.embed([t]) for t in texts])
    assert batched.shape == (5, lm.model.cfg.dim)
    assert (batched - alone).abs().max() < 1e-5
    assert torch.allclose(batched.norm(dim=1), torch.ones(5), atol=1e-5)
