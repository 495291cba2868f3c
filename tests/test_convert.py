"""`slm import` / `slm export`: round trips through the formats other tools read, from the command line."""

import pytest
import torch
from conftest import tiny_model_dir
from typer.testing import CliRunner

from slmkit.cli import app
from slmkit.formats import load_any
from slmkit.lm import load_lm
from slmkit.tokenizer import load_tokenizer, train_tokenizer

runner = CliRunner()
TEXT = "for i in range(10):\n    print(i * i)\n"


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    tok = train_tokenizer([TEXT, "naïve café ✓"] * 30, vocab_size=300)
    return tiny_model_dir(tmp_path_factory.mktemp("convert") / "m", tok, tie=False, train_on=TEXT)


def logits(model, tok, text=TEXT):
    with torch.no_grad():
        return model(torch.tensor([tok.encode(text, add_bos=True)]))


def test_export_hf_loads_in_transformers_with_identical_logits(model_dir, tmp_path):
    transformers = pytest.importorskip("transformers")
    r = runner.invoke(app, ["export", str(model_dir), "--format", "hf", "-o", str(tmp_path / "hf")])
    assert r.exit_code == 0, r.output
    ours, tok = load_any(model_dir)
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()
    hf_tok = transformers.AutoTokenizer.from_pretrained(tmp_path / "hf")
    ids = tok.encode(TEXT, add_bos=True)
    assert hf_tok(TEXT, add_special_tokens=False)["input_ids"] == ids[1:]
    with torch.no_grad():
        assert (hf(torch.tensor([ids])).logits - logits(ours, tok)).abs().max().item() <= 1e-4
    r = runner.invoke(app, ["export", str(model_dir), "--format", "hf", "--dtype", "bfloat16", "-o",
                            str(tmp_path / "hf16")])
    assert r.exit_code == 0, r.output
    size = (tmp_path / "hf16" / "model.safetensors").stat().st_size
    assert size < 0.6 * (tmp_path / "hf" / "model.safetensors").stat().st_size


def test_import_a_transformers_directory_keeps_tokenizer_and_template(model_dir, tmp_path):
    transformers = pytest.importorskip("transformers")
    ours, tok = load_any(model_dir)
    hf = transformers.LlamaForCausalLM(transformers.LlamaConfig(
        vocab_size=tok.vocab_size, hidden_size=48, intermediate_size=96, num_hidden_layers=2, num_attention_heads=6,
        num_key_value_heads=2, max_position_embeddings=128, tie_word_embeddings=True)).eval()
    hf.generation_config.update(do_sample=True, temperature=0.3, top_p=0.7)  # the publisher's sampling defaults
    hf.save_pretrained(tmp_path / "src", safe_serialization=True)
    tok.save(tmp_path / "src")
    r = runner.invoke(app, ["import", str(tmp_path / "src"), "-o", str(tmp_path / "imported")])
    assert r.exit_code == 0, r.output
    model, tok2 = load_any(tmp_path / "imported")
    assert tok2.chat_template == tok.chat_template and tok2.eos_token == tok.eos_token
    kept = load_lm(str(tmp_path / "imported")).sampling_params()
    assert (kept.temperature, kept.top_p) == (0.3, 0.7)
    r = runner.invoke(app, ["export", str(tmp_path / "imported"), "--format", "hf", "-o", str(tmp_path / "out")])
    assert r.exit_code == 0, r.output
    assert transformers.GenerationConfig.from_pretrained(tmp_path / "out").temperature == 0.3
    ids = torch.tensor([tok.encode(TEXT, add_bos=True)])
    with torch.no_grad():
        assert (hf(ids).logits - model(ids)).abs().max().item() <= 1e-4


def test_import_gguf_gives_back_the_model(model_dir, tmp_path):
    r = runner.invoke(app, ["export", str(model_dir), "-o", str(tmp_path / "m.gguf"), "--quant", "f32"])
    assert r.exit_code == 0, r.output
    r = runner.invoke(app, ["import", str(tmp_path / "m.gguf"), "-o", str(tmp_path / "back")])
    assert r.exit_code == 0, r.output
    (a, tok), (b, _) = load_any(model_dir), load_any(tmp_path / "back")
    assert torch.equal(logits(a, tok), logits(b, tok))
    assert load_tokenizer(tmp_path / "back").sha256 == tok.sha256


@pytest.mark.slow
def test_export_onnx_from_the_command_line(model_dir, tmp_path):
    pytest.importorskip("onnxruntime")
    from slmkit.formats.onnx import onnx_logits
    r = runner.invoke(app, ["export", str(model_dir), "--format", "onnx", "-o", str(tmp_path / "onnx")])
    assert r.exit_code == 0, r.output
    model, tok = load_any(model_dir)
    ids = torch.tensor([tok.encode(TEXT, add_bos=True)])
    got = torch.from_numpy(onnx_logits(tmp_path / "onnx" / "model.onnx", ids.numpy()))
    assert (got - logits(model, tok)).abs().max().item() <= 1e-4


def test_bad_arguments_are_explained(model_dir, tmp_path):
    (tmp_path / "weights.txt").write_text("x")
    cases = [
        (["import", str(tmp_path / "weights.txt"), "-o", str(tmp_path / "o")], "not a .gguf file"),
        (["import", str(tmp_path / "missing"), "-o", str(tmp_path / "o")], "nothing to import"),
        (["export", str(model_dir), "--format", "tflite", "-o", str(tmp_path / "o")], "gguf, hf, onnx"),
        (["export", str(model_dir), "--quant", "q2_k", "-o", str(tmp_path / "o.gguf")], "f32, f16, bf16, q8_0, q5_1"),
        (["generate", str(tmp_path / "missing"), "hi"], "not a model directory"),
    ]
    for args, message in cases:
        r = runner.invoke(app, args)
        assert r.exit_code == 2 and message in r.output, (args, r.output)
    assert not (tmp_path / "o").exists() and not (tmp_path / "o.gguf").exists()
