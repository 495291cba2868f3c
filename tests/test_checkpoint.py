import dataclasses
import json

import pytest
import torch

from slmkit.formats.hf_dir import find_model_dir, load_model_dir, save_model_dir
from slmkit.model.llama import Transformer

transformers = pytest.importorskip("transformers")


@pytest.mark.parametrize("tie", [True, False])
def test_transformers_loads_our_directory_with_identical_logits(tmp_path, tiny_cfg, tie):
    cfg = dataclasses.replace(tiny_cfg, tie_embeddings=tie, rope_theta=500.0)
    model = Transformer(cfg).eval()
    save_model_dir(model, tmp_path / "m", provenance={"note": "test"})
    files = {p.name for p in (tmp_path / "m").iterdir()}
    assert {"config.json", "model.safetensors", "generation_config.json", "slmkit.json"} <= files
    assert not any(f.endswith((".bin", ".pt", ".tmp")) for f in files)
    hf = transformers.LlamaForCausalLM.from_pretrained(tmp_path / "m").eval()
    x = torch.randint(0, cfg.vocab_size, (2, 30))
    with torch.no_grad():
        diff = (hf(x).logits - model(x)).abs().max().item()
    assert diff <= 1e-4
    assert json.loads((tmp_path / "m" / "slmkit.json").read_text())["note"] == "test"


def test_transformers_saved_llama_loads_into_slmkit(tmp_path):
    hf_cfg = transformers.LlamaConfig(vocab_size=80, hidden_size=48, intermediate_size=96, num_hidden_layers=2,
                                      num_attention_heads=6, num_key_value_heads=2, max_position_embeddings=64,
                                      rope_theta=1000.0, rms_norm_eps=1e-6, tie_word_embeddings=False)
    hf = transformers.LlamaForCausalLM(hf_cfg).eval()
    hf.save_pretrained(tmp_path / "hf", safe_serialization=True)
    ours = load_model_dir(tmp_path / "hf")
    assert ours.cfg.n_kv_heads == 2 and ours.cfg.rope_theta == 1000.0 and ours.cfg.norm_eps == 1e-6
    x = torch.randint(0, 80, (1, 40))
    with torch.no_grad():
        assert (hf(x).logits - ours(x)).abs().max().item() <= 1e-4


def test_pickle_only_directory_is_refused(tmp_path, tiny_cfg):
    save_model_dir(Transformer(tiny_cfg), tmp_path / "m")
    (tmp_path / "m" / "model.safetensors").unlink()
    (tmp_path / "m" / "pytorch_model.bin").write_bytes(b"not loaded")
    with pytest.raises(ValueError, match="never loads pickle"):
        load_model_dir(tmp_path / "m")


def test_find_model_dir_resolves_run_directories(tmp_path, tiny_cfg):
    save_model_dir(Transformer(tiny_cfg), tmp_path / "run" / "model")
    assert find_model_dir(tmp_path / "run") == tmp_path / "run" / "model"
    with pytest.raises(FileNotFoundError, match="no model here"):
        find_model_dir(tmp_path / "nothing")


def test_save_is_atomic_and_replaces_existing(tmp_path, tiny_cfg):
    m = Transformer(tiny_cfg)
    save_model_dir(m, tmp_path / "m")
    save_model_dir(m, tmp_path / "m")
    assert [p.name for p in tmp_path.iterdir()] == ["m"]  # no temp or .old leftovers
