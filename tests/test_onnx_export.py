"""ONNX export: onnxruntime logits match PyTorch for several batch sizes and lengths (dynamic axes), GQA and tied."""

import dataclasses
import json

import numpy as np
import pytest
import torch

pytest.importorskip("onnxruntime")
pytest.importorskip("onnxscript")
onnx = pytest.importorskip("onnx")

from slmkit.formats.hf_dir import save_model_dir  # noqa: E402
from slmkit.formats.onnx import export_onnx, onnx_logits  # noqa: E402
from slmkit.model.llama import Transformer  # noqa: E402
from slmkit.tokenizer import train_tokenizer  # noqa: E402


@pytest.fixture(scope="module")
def tok():
    return train_tokenizer(["def foo(x):\n    return x + 1\n", "héllo wörld ✓ 你好"] * 20, vocab_size=300)


def _assert_parity(model, onnx_path, vocab):
    # Shapes unlike the export's example (2 x 8) in both axes, including seq 1 and the full max_seq_len.
    rng = np.random.default_rng(0)
    for batch, seq in [(1, 1), (3, 13), (2, model.cfg.max_seq_len)]:
        ids = rng.integers(0, vocab, size=(batch, seq), dtype=np.int64)
        with torch.no_grad():
            ref = model(torch.from_numpy(ids)).numpy()
        out = onnx_logits(onnx_path, ids)
        assert out.shape == (batch, seq, vocab) and out.dtype == np.float32
        assert np.abs(out - ref).max() <= 1e-4, (batch, seq)


def test_gqa_untied_to_directory_with_tokenizer(tmp_path, tiny_cfg, tok):
    cfg = dataclasses.replace(tiny_cfg, vocab_size=tok.vocab_size, tie_embeddings=False)
    assert cfg.n_kv_heads < cfg.n_heads
    model = Transformer(cfg).eval()
    save_model_dir(model, tmp_path / "run" / "model", tokenizer=tok)

    out = export_onnx(tmp_path / "run", tmp_path / "export")  # a run directory resolves to run/model
    assert out == tmp_path / "export" / "model.onnx"
    files = {p.name for p in out.parent.iterdir()}
    assert {"model.onnx", "config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
            "special_tokens_map.json"} <= files
    assert not any(f.endswith((".tmp", ".data")) or f.startswith(".") for f in files)
    assert json.loads((out.parent / "config.json").read_text())["num_key_value_heads"] == cfg.n_kv_heads

    graph = onnx.load(str(out)).graph
    assert [i.name for i in graph.input] == ["input_ids"] and [o.name for o in graph.output] == ["logits"]
    dims = [d.dim_param or d.dim_value for d in graph.output[0].type.tensor_type.shape.dim]
    assert dims[2] == cfg.vocab_size and all(isinstance(d, str) for d in dims[:2])
    _assert_parity(model, out.parent, cfg.vocab_size)  # onnx_logits also takes the directory

    one = onnx_logits(out, np.array([5, 6, 7]))  # 1-D ids -> (seq, vocab)
    assert one.shape == (3, cfg.vocab_size)
    with pytest.raises(ValueError, match="max_seq_len"):
        onnx_logits(out, np.zeros((1, cfg.max_seq_len + 1), dtype=np.int64))


def test_mha_tied_to_onnx_file_with_external_data(tmp_path, tiny_cfg):
    # One layer: export time grows with depth, and the multi-layer path is covered above.
    cfg = dataclasses.replace(tiny_cfg, n_layers=1, n_kv_heads=tiny_cfg.n_heads, tie_embeddings=True)
    model = Transformer(cfg).eval()
    save_model_dir(model, tmp_path / "m")

    out = export_onnx(tmp_path / "m", tmp_path / "out" / "tiny.onnx", external_data=True)
    assert out == tmp_path / "out" / "tiny.onnx"
    assert sorted(p.name for p in out.parent.iterdir()) == ["tiny.onnx", "tiny.onnx.data"]  # no config/tokenizer
    _assert_parity(model, out, cfg.vocab_size)


def test_not_a_model_or_bad_opset_is_a_clear_error(tmp_path, tiny_cfg):
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="no model here"):
        export_onnx(tmp_path / "empty", tmp_path / "out")
    assert not (tmp_path / "out").exists()
    with pytest.raises(FileNotFoundError, match="no ONNX model"):
        onnx_logits(tmp_path / "empty", np.zeros((1, 2), dtype=np.int64))
    save_model_dir(Transformer(tiny_cfg), tmp_path / "m")
    with pytest.raises(ValueError, match="opset 17 is not supported"):
        export_onnx(tmp_path / "m", tmp_path / "m.onnx", opset=17)
