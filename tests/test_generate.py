import pytest
import torch

from slmkit.lm.torch_lm import TorchLM, generate_batch, generate_ids
from slmkit.model.llama import Transformer
from slmkit.sampling import DEFAULTS, SamplingParams, argmax, sample_next
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


def test_argmax_is_torchs_including_ties_and_other_dtypes():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(16, 3000, generator=g)
    logits[3, [7, 1500, 2999]] = 50.0  # a tie: the first one wins, as in torch
    logits[5] = 0.0
    best = argmax(logits)
    assert torch.equal(best, logits.argmax(-1)) and int(best[3]) == 7 and int(best[5]) == 0
    assert argmax(logits).dtype == torch.long
    half = logits.bfloat16()  # not the numpy path
    assert torch.equal(argmax(half), half.argmax(-1))
    assert torch.equal(argmax(logits[2:3, ::2]), logits[2:3, ::2].argmax(-1))  # a strided view


def test_bad_sampling_params_are_refused():
    for bad in ({"temperature": -1}, {"top_p": 0}, {"min_p": 1.5}, {"repetition_penalty": 0}, {"repeat_last_n": -1}):
        with pytest.raises(ValueError):
            SamplingParams(**bad)


@pytest.fixture(scope="module")
def tok():
    return train_tokenizer(["def foo(x):\n    return x + 1\n", "héllo wörld ✓ 你好"] * 20, vocab_size=300)


def test_stop_strings_cut_the_text_and_streaming_equals_full(tok, tiny_cfg):
    import dataclasses
    model = Transformer(dataclasses.replace(tiny_cfg, vocab_size=tok.vocab_size))
    lm = TorchLM(model, tok)
    p = SamplingParams(max_new_tokens=60, temperature=1.0, seed=3, stop_at_eos=False)
    full = lm.generate("def ", p)[0]
    pieces = list(lm.stream("def ", p))
    assert "".join(pieces) == full
    assert len(full) > 2
    stop = full[len(full) // 2: len(full) // 2 + 2]
    p.stop = [stop]
    cut = lm.generate("def ", p)[0]
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
    out = TorchLM(model, tok).generate("def ", p, heal=True)[0]
    assert ("def " + out).startswith(tok.decode(healed_ids + first, skip_special_tokens=True))


def test_min_p_keeps_tokens_at_least_that_fraction_of_the_top_one():
    # probabilities 0.5, 0.3, 0.15, 0.05: min_p 0.5 keeps p >= 0.25 (the first two), min_p 0.1 three
    logits = torch.tensor([0.5, 0.3, 0.15, 0.05]).log()
    g = torch.Generator().manual_seed(0)
    assert {sample_next(logits, SamplingParams(temperature=1.0, min_p=0.5), g) for _ in range(300)} == {0, 1}
    assert {sample_next(logits, SamplingParams(temperature=1.0, min_p=0.1), g) for _ in range(300)} == {0, 1, 2}
    assert {sample_next(logits, SamplingParams(temperature=1.0, min_p=1.0), g) for _ in range(50)} == {0}


def test_repetition_penalty_divides_positive_and_multiplies_negative_logits_of_recent_tokens():
    from slmkit.sampling import sample
    logits = torch.tensor([[4.0, 3.0, -1.0, -1.5]])
    greedy = SamplingParams(temperature=0, repetition_penalty=2.0)
    # token 0 was seen (twice: penalised once): 4 / 2 = 2 < 3, so token 1 wins
    assert sample(logits, greedy, None, torch.tensor([[0, 0]])).tolist() == [1]
    # tokens 0 and 1 seen: 2 and 1.5; a negative logit is multiplied (-1 -> -2), never raised above -1.5
    assert sample(logits, greedy, None, torch.tensor([[1, 0, 2]])).tolist() == [0]
    logits = torch.tensor([[-1.0, -1.2, -5.0]])
    assert sample(logits, greedy, None, torch.tensor([[0]])).tolist() == [1]  # -2 < -1.2
    assert sample(logits, SamplingParams(temperature=0), None, torch.tensor([[0]])).tolist() == [0]  # 1 = off
    # sample_next looks at the last repeat_last_n ids only
    p = SamplingParams(temperature=0, repetition_penalty=2.0, repeat_last_n=1)
    assert sample_next(torch.tensor([4.0, 3.0, 0.0]), p, None, [0, 2]) == 0
    assert sample_next(torch.tensor([4.0, 3.0, 0.0]), p, None, [2, 0]) == 1


def test_the_penalty_reaches_generation_over_prompt_and_output(tiny_cfg):
    model = Transformer(tiny_cfg)
    plain = SamplingParams(max_new_tokens=40, temperature=0, stop_at_eos=False)
    loops = list(generate_ids(model, [1, 2, 3], plain))
    assert len(set(loops)) < 20  # a random tiny model repeats itself greedily
    strong = SamplingParams(max_new_tokens=40, temperature=0, stop_at_eos=False, repetition_penalty=1e6,
                            repeat_last_n=16)
    out = list(generate_ids(model, [1, 2, 3], strong))
    window = [1, 2, 3] + out
    # every token differs from the 16 before it (prompt included): a huge penalty bans them
    assert all(window[i] not in window[max(0, i - 16):i] for i in range(3, len(window)))


def test_batched_decoding_equals_one_sequence_at_a_time(tiny_cfg):
    model = Transformer(tiny_cfg)
    prompts = torch.tensor([[1, 5, 9, 13], [2, 7, 7, 30], [4, 4, 4, 4]])
    p = SamplingParams(max_new_tokens=80, temperature=0, stop_at_eos=False)  # past max_seq_len=64: slides
    batched = torch.stack(list(generate_batch(model, prompts, p)), dim=1)
    for row, prompt in zip(batched, prompts, strict=True):
        assert row.tolist() == list(generate_ids(model, prompt.tolist(), p))
    # seeded sampling draws the batch's rows together: reproducible with the same generator
    hot = SamplingParams(max_new_tokens=10, temperature=1.0, stop_at_eos=False)
    a = torch.stack(list(generate_batch(model, prompts, hot, torch.Generator().manual_seed(1))), dim=1)
    b = torch.stack(list(generate_batch(model, prompts, hot, torch.Generator().manual_seed(1))), dim=1)
    assert torch.equal(a, b)


def test_generation_stops_at_eos_and_at_bos(tiny_cfg):
    model = Transformer(tiny_cfg)
    for end in (tiny_cfg.eos_token_id, tiny_cfg.bos_token_id):
        only = torch.zeros(tiny_cfg.vocab_size, dtype=torch.bool)
        only[end] = True  # the first token can only be `end`
        p = SamplingParams(max_new_tokens=5, temperature=0)
        assert list(generate_ids(model, [5, 6], p, first_allowed=only)) == []
        p.stop_at_eos = False
        assert list(generate_ids(model, [5, 6], p, first_allowed=only))[0] == end


def test_sampling_defaults_request_over_generation_config_over_llama_cpp_defaults(tmp_path, tok, tiny_cfg):
    import dataclasses
    import json

    from slmkit.formats.hf_dir import generation_defaults, save_model_dir
    from slmkit.lm import load_lm
    model = Transformer(dataclasses.replace(tiny_cfg, vocab_size=tok.vocab_size))
    d = save_model_dir(model, tmp_path / "m", tok, sampling={"temperature": 0.2, "top_p": 0.9})
    lm = load_lm(str(d))
    assert lm.generation_defaults == {"temperature": 0.2, "top_p": 0.9}
    p = lm.sampling_params()
    assert (p.temperature, p.top_p) == (0.2, 0.9)  # the model's own
    assert (p.top_k, p.min_p) == (DEFAULTS["top_k"], DEFAULTS["min_p"])  # what it leaves out: llama.cpp's
    p = lm.sampling_params(temperature=1.1, top_k=None, seed=4)
    assert (p.temperature, p.top_k, p.seed) == (1.1, DEFAULTS["top_k"], 4)  # None means "not given"
    assert lm.sampling_params(temperature=0).temperature == 0
    # slmkit's own models get llama.cpp's defaults written out; do_sample: false means greedy
    plain = save_model_dir(model, tmp_path / "plain", tok)
    assert generation_defaults(plain) == DEFAULTS
    gen = json.loads((plain / "generation_config.json").read_text())
    assert gen["do_sample"] is True and gen["eos_token_id"] == tiny_cfg.eos_token_id
    (plain / "generation_config.json").write_text(json.dumps({**gen, "do_sample": False, "max_new_tokens": 7}))
    assert load_lm(str(plain)).sampling_params().temperature == 0
    assert load_lm(str(plain)).sampling_params().max_new_tokens == 7
    (plain / "generation_config.json").write_text(json.dumps({"top_p": 0}))
    with pytest.raises(ValueError, match="generation_config.json: top_p"):
        load_lm(str(plain))
    # a model without any generation_config.json samples with llama.cpp's defaults
    (plain / "generation_config.json").unlink()
    p = load_lm(str(plain)).sampling_params()
    assert {k: getattr(p, k) for k in DEFAULTS} == DEFAULTS
