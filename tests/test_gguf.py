"""GGUF writing and reading inside slmkit (llama.cpp itself is exercised in test_llamacpp.py)."""

import numpy as np
import pytest
import torch
from conftest import tiny_model_dir

from slmkit.formats import load_any
from slmkit.formats.gguf import _to_halves, _to_pairs, read_gguf, tokenizer_metadata, write_gguf
from slmkit.formats.hf_dir import load_model_dir
from slmkit.tokenizer import train_tokenizer

pytest.importorskip("gguf")

TEXTS = ["def foo(x):\n    return x + 1\n", "héllo wörld ✓ 你好 2024-11-22", "  spaces\t\ttabs\n\n\n"]


@pytest.fixture(scope="module")
def tok():
    return train_tokenizer(TEXTS * 30, vocab_size=320)


def test_pair_permutation_is_invertible():
    w = np.random.default_rng(0).standard_normal((4 * 8, 5)).astype(np.float32)
    assert np.array_equal(_to_halves(_to_pairs(w, 4), 4), w)
    assert not np.array_equal(_to_pairs(w, 4), w)


@pytest.mark.parametrize("tie", [True, False])
def test_f32_round_trip_is_exact(tmp_path, tok, tie):
    d = tiny_model_dir(tmp_path / "m", tok, tie=tie)
    path = write_gguf(d, tmp_path / "m.gguf", quant="f32")
    cfg, tensors, tok2 = read_gguf(path)
    original = load_model_dir(d)
    assert cfg.tie_embeddings == tie and cfg.n_kv_heads == original.cfg.n_kv_heads
    for name, t in original.state_dict().items():
        if name.startswith("rope_") or (tie and name == "lm_head.weight"):
            continue
        assert torch.equal(tensors[name], t), name
    for text in TEXTS + ["<|im_start|>user\nhi<|im_end|>"]:
        assert tok2.encode(text) == tok.encode(text)
    assert (tok2.bos_token, tok2.eos_token, tok2.pad_token, tok2.add_bos) == \
        (tok.bos_token, tok.eos_token, tok.pad_token, tok.add_bos)
    assert tok2.chat_template == tok.chat_template


@pytest.mark.parametrize("quant,tol", [("f16", 2e-2), ("bf16", 1e-1), ("q8_0", 1e-1)])
def test_quantized_gguf_logits_stay_close(tmp_path, tok, quant, tol):
    d = tiny_model_dir(tmp_path / "m", tok)
    path = write_gguf(d, tmp_path / f"m-{quant}.gguf", quant=quant)
    assert path.stat().st_size < (tmp_path / "m" / "model.safetensors").stat().st_size
    ref, _ = load_any(d)
    model, _ = load_any(path)
    x = torch.tensor([tok.encode(TEXTS[0])])
    with torch.no_grad():
        diff = (model(x) - ref(x)).abs().max().item()
    assert 0 < diff <= tol


def test_padded_vocabulary_gets_unused_tokens(tmp_path, tok):
    meta = tokenizer_metadata(tok, tok.vocab_size + 5)
    assert len(meta["tokens"]) == tok.vocab_size + 5 and meta["tokens"][-1].startswith("[PAD")
    assert meta["pre"] == "gpt-2"
    with pytest.raises(ValueError, match="only"):
        tokenizer_metadata(tok, tok.vocab_size - 1)


def test_bad_inputs_are_explained(tmp_path, tok):
    d = tiny_model_dir(tmp_path / "m", tok)
    with pytest.raises(ValueError, match="q3"):
        write_gguf(d, tmp_path / "x.gguf", quant="q3")
    assert not (tmp_path / "x.gguf").exists()
    (tmp_path / "junk.gguf").write_bytes(b"not a gguf file at all")
    with pytest.raises(ValueError, match="junk.gguf"):
        read_gguf(tmp_path / "junk.gguf")
    with pytest.raises(FileNotFoundError):
        read_gguf(tmp_path / "missing.gguf")
