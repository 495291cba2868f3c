import pytest
import torch

from slmkit.lm.torch_lm import complete, generate_ids, generate_text
from slmkit.model.llama import Transformer
from slmkit.sampling import SamplingParams, sample_next
from slmkit.tokenizer import train_tokenizer


def test_greedy_with_and_without_kv_cache_is_identical(tiny_cfg):
    model = Transformer(tiny_cfg)
    p = SamplingParams(max_new_tokens=150, temperature=0.0, stop_at_eos=False)  # runs past max_seq_len=64
    prompt = [1, 5, 9, 13, 40]
    with_cache = list(generate_ids(model, prompt, p, use_cache=True))
    without = list(generate_ids(model, prompt, p, use_cache=False))
    assert len(with_cache) == 150
    assert with_cache == without


def test_seeded_sampling_is_reproducible_and_seeds_differ(tiny_cfg):
    model = Transformer(tiny_cfg)
    p = SamplingParams(max_new_tokens=30, temperature=1.5, seed=7, stop_at_eos=False)
    a = list(generate_ids(model, [1, 2, 3], p))
    assert a == list(generate_ids(model, [1, 2, 3], p))
    p.seed = 8
    assert a != list(generate_ids(model, [1, 2, 3], p))


def test_top_k_one_is_greedy_and_top_p_keeps_the_head():
    logits = torch.tensor([0.1, 3.0, 2.9, -1.0])
    g = torch.Generator().manual_seed(0)
    assert all(sample_next(logits, SamplingParams(temperature=1.0, top_k=1), g) == 1 for _ in range(20))
    # top_p tiny: only the most likely token survives
    assert all(sample_next(logits, SamplingParams(temperature=1.0, top_p=0.01), g) == 1 for _ in range(20))
    seen = {sample_next(logits, SamplingParams(temperature=1.0, top_p=0.9), g) for _ in range(200)}
    assert seen <= {1, 2} and seen == {1, 2}


def test_bad_sampling_params_are_refused():
    with pytest.raises(ValueError):
        SamplingParams(temperature=-1)
    with pytest.raises(ValueError):
        SamplingParams(top_p=0)


@pytest.fixture(scope="module")
def tok():
    return train_tokenizer(["def foo(x):\n    return x + 1\n", "héllo wörld ✓ 你好"] * 20, vocab_size=300)


def test_stop_strings_cut_the_text_and_streaming_equals_full(tok, tiny_cfg):
    import dataclasses
    model = Transformer(dataclasses.replace(tiny_cfg, vocab_size=tok.vocab_size))
    p = SamplingParams(max_new_tokens=60, temperature=1.0, seed=3, stop_at_eos=False)
    full = complete(model, tok, "def ", p)
    pieces = list(generate_text(model, tok, "def ", p))
    assert "".join(pieces) == full
    assert len(full) > 2
    stop = full[len(full) // 2: len(full) // 2 + 2]
    p.stop = [stop]
    cut = complete(model, tok, "def ", p)
    assert stop not in cut and full.startswith(cut)


def test_token_healing_backs_off_the_trailing_space_and_constrains_the_first_token(tok, tiny_cfg):
    import dataclasses

    from slmkit.sampling import heal_prompt
    ids = tok.encode("def ", add_bos=True)
    healed_ids, prefix, allowed = heal_prompt(tok, ids)
    assert prefix == tok.decode(ids[-1:]) and healed_ids == ids[:-1] and prefix.endswith(" ")
    assert allowed.sum() >= 1 and all(tok.decode([i]).startswith(prefix) for i in allowed.nonzero().flatten())
    model = Transformer(dataclasses.replace(tiny_cfg, vocab_size=tok.vocab_size))
    p = SamplingParams(max_new_tokens=1, temperature=1.0, seed=0, stop_at_eos=False)
    first = list(generate_ids(model, healed_ids, p, first_allowed=allowed))
    assert allowed[first[0]]
    # The prompt text is never repeated: prompt + healed completion reads as one continuous text.
    p.max_new_tokens = 20
    out = complete(model, tok, "def ", p, heal=True)
    assert ("def " + out).startswith(tok.decode(healed_ids + first, skip_special_tokens=True))
