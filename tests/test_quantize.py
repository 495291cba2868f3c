"""int8 weight-only quantization: per-channel rounding error, the fallback kernel, a trained model's loss,
and `--weights int8` from the Python API and the CLI."""

import pytest
import torch
import torch.nn as nn
from conftest import tiny_model_dir
from typer.testing import CliRunner

from slmkit.cli import app
from slmkit.lm import load_lm
from slmkit.model import quantize
from slmkit.model.quantize import Int8Linear, decode_bytes, quantize_int8
from slmkit.tokenizer import train_tokenizer

TEXT = "def add(a, b):\n    return a + b\n\nclass Point:\n    x: int\n    y: int\n"


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    tok = train_tokenizer([TEXT] * 30, vocab_size=300)
    return tiny_model_dir(tmp_path_factory.mktemp("q") / "m", tok, train_on=TEXT, steps=120)


def test_int8_linear_rounds_each_row_to_its_own_scale(monkeypatch):
    monkeypatch.setattr(quantize, "_CPU_KERNEL", False)  # the weight-only path: the bound below is exact
    w = torch.randn(48, 32) * torch.logspace(-3, 1, 48)[:, None]  # rows of very different magnitudes
    x = torch.randn(5, 3, 32)
    q = Int8Linear(w)
    assert q.weight.dtype == torch.int8 and q.weight.abs().max() == 127
    want = x @ w.T
    got = q(x)
    assert got.shape == (5, 3, 48)
    # per-row error is bounded by half a step of that row's scale, whatever the row's magnitude
    step = w.abs().amax(1) / 127
    bound = 0.5 * step * x.abs().sum(-1, keepdim=True)  # |x . err| <= sum|x| * max|err|
    assert ((got - want).abs() <= bound + 1e-5).all()


def test_cpu_kernel_agrees_with_the_weight_only_path(monkeypatch):
    q = Int8Linear(torch.randn(40, 24))
    x = torch.randn(2, 7, 24)
    fast = q(x)  # the CPU kernel also rounds each activation row to 7-8 bits
    monkeypatch.setattr(quantize, "_CPU_KERNEL", False)
    slow = q(x)
    assert fast.shape == slow.shape == (2, 7, 40)
    assert ((fast - slow).abs().max() / slow.abs().max()) < 0.03


def test_quantized_model_keeps_its_loss_and_shrinks(model_dir):
    from slmkit.formats import load_any
    model, tok = load_any(model_dir)
    ids = torch.tensor([tok.encode(TEXT * 3)])[:, :64]
    with torch.no_grad():
        before = model(ids[:, :-1], targets=ids[:, 1:]).item()
        size = decode_bytes(model)
        quantize_int8(model)
        after = model(ids[:, :-1], targets=ids[:, 1:]).item()
    assert not any(type(m) is nn.Linear for m in model.modules())
    assert model.embed_tokens.weight.dtype == torch.float32  # the tied embedding stays a float lookup table
    assert abs(after - before) / before < 0.02
    assert decode_bytes(model) < 0.35 * size  # a quarter, plus one fp32 scale per row of 32 weights
    with pytest.raises(ValueError, match="no nn.Linear"):
        quantize_int8(model)


def test_a_failed_calibration_check_falls_back_to_weight_only(model_dir):
    from slmkit.formats import load_any
    from slmkit.model.quantize import calibration_ids
    model, tok = load_any(model_dir)
    check = calibration_ids(tok, 64)
    ok = quantize_int8(model, check)
    assert ok["kernel"] == "dynamic" and abs(ok["loss_int8"] / ok["loss_fp32"] - 1) < 0.01
    model, _ = load_any(model_dir)
    strict = quantize_int8(model, check, max_loss_increase=-0.5)  # no int8 model can pass this
    assert strict["kernel"] == "weight-only" and "loss_int8_dynamic" in strict
    assert all(not m.dynamic for m in model.modules() if isinstance(m, Int8Linear))


def test_load_lm_with_int8_weights_generates_like_fp32(model_dir):
    from slmkit.sampling import SamplingParams
    p = SamplingParams(max_new_tokens=12, temperature=0)
    fp32, int8 = load_lm(str(model_dir)), load_lm(str(model_dir), weights="int8")
    assert any(isinstance(m, Int8Linear) for m in int8.model.modules())
    assert int8.generate(["def add"], p) == fp32.generate(["def add"], p)
    bf16 = load_lm(str(model_dir), weights="bf16")
    assert next(bf16.model.parameters()).dtype == torch.bfloat16
    with pytest.raises(ValueError, match="q8_0"):
        load_lm(str(model_dir), backend="llamacpp", weights="int8")
    with pytest.raises(ValueError, match="unknown weights"):
        load_lm(str(model_dir), weights="int4")


def test_cli_generate_with_int8_weights(model_dir):
    r = CliRunner().invoke(app, ["generate", str(model_dir), "def add", "--weights", "int8", "--temperature", "0",
                                 "--max-new-tokens", "8"])
    assert r.exit_code == 0, r.output
    assert r.output.startswith("def add")
    r = CliRunner().invoke(app, ["generate", str(model_dir), "x", "--weights", "int8", "--backend", "hf"])
    assert r.exit_code != 0 and "torch backend" in r.output
