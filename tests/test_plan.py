"""`slm plan` (slmkit.plan): the cost model's formulas on a given calibration, the calibration itself (quick: a few
tiny shapes) and its cache, the approach rules, and the command's table and JSON. How close the estimates come to
real runs is benchmarks/plan.py's job (BENCHMARKS.md), not a timed unit test's."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from slmkit.cli import app
from slmkit.model.config import model_config
from slmkit.plan import machine as machine_mod
from slmkit.plan.advise import TOKENS_PER_PARAM, _lora_params, plan
from slmkit.plan.estimate import estimate_run
from slmkit.plan.machine import Machine, activation_terms, decode_terms, serve_terms, train_terms


def given(**kw) -> Machine:
    """A calibration with round numbers, so each estimate can be checked by hand."""
    base = dict(cpu="test CPU", cores=2, threads=2, ram_gb=16.0, gpu=None, torch="x", precision="fp32",
                matmul_fp32_gflops=100.0, matmul_bf16_gflops=200.0, bandwidth_gbs=20.0, baseline_rss_mb=500.0,
                train_fit=[0.01, 0.002, 1e-9, 1e-11], decode_fit=[1e-3, 1e-4, 5e-11],
                serve_fit=[2e-3, 1e-4, 5e-11, 1e-4, 2e-11],
                activation_fit=[40.0, 8.0, 4.0, 12.0], kd_fit=[2e-9, 16.0])
    return Machine(**{**base, **kw})


def test_the_cost_model_is_its_formulas():
    m, cfg = given(), model_config("nano")
    est = estimate_run(m, cfg, batch=8, seq=128, clients=4, prompt_tokens=64)
    t = train_terms(cfg, 8, 128)
    step = 0.01 + 0.002 * t[1] + 1e-9 * t[2] + 1e-11 * t[3]
    assert est.train_step_s == pytest.approx(step) and est.train_tokens_per_s == pytest.approx(8 * 128 / step)
    p = cfg.num_params()
    act = sum(c * x for c, x in zip(m.activation_fit, activation_terms(cfg, 8, 128), strict=True))
    assert est.peak_rss_mb == pytest.approx(500 + (16 * p + act + 8 * 8 * 128 * cfg.vocab_size) / 2**20)
    d1 = sum(c * x for c, x in zip(m.decode_fit, decode_terms(cfg), strict=True))
    d4 = sum(c * x for c, x in zip(m.serve_fit, serve_terms(cfg, 4), strict=True))
    assert est.decode_tokens_per_s == pytest.approx(1 / d1) and est.serve_tokens_per_s == pytest.approx(4 / d4)
    assert est.ttft_s > d1

    # bf16 autocast keeps bf16 weight copies; LoRA trains (and stores AdamW moments for) the adapters only
    assert estimate_run(given(precision="bf16"), cfg, 8, 128).peak_rss_mb == pytest.approx(
        est.peak_rss_mb + 2 * p / 2**20)
    lora = estimate_run(m, cfg, 8, 128, lora_params=1000)
    assert lora.trainable_params == 1000 and lora.peak_rss_mb < est.peak_rss_mb
    # without LoRA steps in the calibration: the full step's fit with 4/6 of its FLOPs; with them, their own fit
    assert lora.train_step_s == pytest.approx(0.01 + 0.002 * t[1] + 1e-9 * t[2] + 1e-11 * t[3] * 4 / 6)
    fitted = estimate_run(given(lora_fit=[0.02, 0.003, 2e-9, 8e-12]), cfg, 8, 128, lora_params=1000)
    assert fitted.train_step_s == pytest.approx(0.02 + 0.003 * t[1] + 2e-9 * t[2] + 8e-12 * t[3])
    assert estimate_run(given(lora_fit=[0.02, 0.003, 2e-9, 8e-12]), cfg, 8, 128).train_step_s == pytest.approx(step)
    teacher = model_config("micro")
    distil = estimate_run(m, cfg, 8, 128, teacher=teacher)
    tt = train_terms(teacher, 8, 128)
    teacher_forward = 0.002 * tt[1] + 1e-9 * tt[2] / 3 + 1e-11 * tt[3] / 3
    kd_elements = 8 * 128 * teacher.vocab_size
    assert distil.train_step_s == pytest.approx(step + teacher_forward + 2e-9 * kd_elements)
    assert distil.peak_rss_mb == pytest.approx(est.peak_rss_mb + (4 * teacher.num_params() + 16 * kd_elements) / 2**20)
    # more layers, more tokens, more clients: never cheaper
    bigger = estimate_run(m, model_config("nano", n_layers=8), batch=8, seq=128, clients=4)
    assert bigger.train_step_s > est.train_step_s and bigger.decode_tokens_per_s < est.decode_tokens_per_s


def test_calibration_fits_its_measurements_and_is_cached(tmp_path, monkeypatch):
    monkeypatch.setenv("SLMKIT_CACHE", str(tmp_path))
    m = machine_mod.calibrate(quick=True, log=lambda *_: None)
    assert m.matmul_fp32_gflops > 0 and m.bandwidth_gbs > 0 and m.baseline_rss_mb > 50 and m.threads >= 1
    for fit in (m.train_fit, m.lora_fit, m.decode_fit, m.serve_fit, m.activation_fit, m.kd_fit):
        assert all(c >= 0 for c in fit) and any(c > 0 for c in fit)
    # distillation's loss holds several fp32 tensors of the logits' size at its peak: 4 bytes each
    (batch, seq, vocab, extra_s, extra_bytes), = m.measured["kd"]
    # (its time over CE is noise-prone on a shared machine, 0 when clamped: timing is the benchmark's job)
    assert extra_s >= 0 and extra_bytes >= 4 * batch * seq * vocab, m.measured["kd"]
    assert machine_mod._nnls([[1.0], [2.0]], [0.0, 4.0]) == pytest.approx([2.0])  # a zero measurement is left out
    assert machine_mod._nnls([[1.0, 1.0]], [0.0]) == [0.0, 0.0]
    # the fit reproduces what it was fitted to (within the noise of a shared machine), shape by shape
    for *shape, seconds in m.measured["train"]:
        batch, seq, dim, layers, hidden, vocab = shape
        cfg = machine_mod._cfg(dim, layers, hidden, vocab, seq)
        predicted = sum(c * x for c, x in zip(m.train_fit, train_terms(cfg, batch, seq), strict=True))
        assert seconds / 3 < predicted < seconds * 3, (shape, seconds, predicted)
    assert len(m.measured["lora"]) == 2  # LoRA steps (adapters on a frozen base), fitted on their own
    for *shape, seconds in m.measured["lora"]:
        batch, seq, dim, layers, hidden, vocab = shape
        cfg = machine_mod._cfg(dim, layers, hidden, vocab, seq)
        predicted = sum(c * x for c, x in zip(m.lora_fit, train_terms(cfg, batch, seq), strict=True))
        assert seconds / 3 < predicted < seconds * 3, (shape, seconds, predicted)

    path = machine_mod.cache_path()
    assert str(path).startswith(str(tmp_path))
    monkeypatch.setattr(machine_mod, "calibrate", lambda **kw: m)
    assert machine_mod.load_machine(log=lambda *_: None) == m and path.exists()
    monkeypatch.setattr(machine_mod, "calibrate", lambda **kw: pytest.fail("measured again"))
    assert machine_mod.load_machine(log=lambda *_: None) == m  # from the cache
    path.write_text("{not json")
    monkeypatch.setattr(machine_mod, "calibrate", lambda **kw: m)
    assert machine_mod.load_machine(log=lambda *_: None) == m  # a damaged cache is measured again


def test_the_approach_follows_the_task_and_the_data(tmp_path):
    m = given()
    assert plan("qa", m).approach == "retrieval over an existing model"
    assert any(c.startswith("slm kb index") for c in plan("qa", m).commands)
    assert plan("classification", m, labelled=500).approach == "fine-tune an encoder classifier"
    assert plan("classification", m, labelled=30).approach == "few-shot (PET)"
    assert plan("classification", m).approach.startswith("zero-shot")
    chat = plan("chat", m)
    assert chat.approach == "fine-tune or LoRA a pretrained small model"
    assert chat.estimate.trainable_params == _lora_params(model_config("smollm2-135m"))
    assert plan("generation", m, teacher="micro").commands[0].startswith("slm distill --teacher micro")

    # from scratch: the largest preset whose compute-optimal tokens fit the hours, given the data
    (tmp_path / "corpus").mkdir()
    (tmp_path / "corpus" / "a.py").write_text("x = 1\n" * 2_000_000)  # 12 MB: ~3.4M tokens
    small = plan("generation", m, data=tmp_path / "corpus", hours=1)
    assert small.approach == "train from scratch" and small.data_tokens == int(12_000_000 / 3.5)
    cfg = model_config(small.model)
    assert small.train_tokens >= TOKENS_PER_PARAM * cfg.num_params() or small.model == "nano"
    more = plan("generation", m, hours=1000)
    assert model_config(more.model).num_params() >= cfg.num_params()
    little = plan("generation", m, data=tmp_path / "corpus" / "a.py", hours=1, latency_ms=0.001, memory_gb=0.1)
    assert little.warnings and "latency" in little.warnings[0]


def test_the_command_prints_a_table_and_the_json_fields(tmp_path, monkeypatch):
    monkeypatch.setenv("SLMKIT_CACHE", str(tmp_path))
    m = given()
    machine_mod.cache_path().parent.mkdir(parents=True)
    machine_mod.cache_path().write_text(json.dumps(m.to_dict()))
    runner = CliRunner()
    r = runner.invoke(app, ["plan", "generation", "--preset", "nano", "--set", "n_layers=6", "--json"])
    assert r.exit_code == 0, r.output
    got = json.loads(r.output)
    want = estimate_run(m, model_config("nano", n_layers=6), batch=16, seq=256)
    for key in ("train_tokens_per_s", "peak_rss_mb", "decode_tokens_per_s"):
        assert got[key] == pytest.approx(getattr(want, key)), key
    assert got["shape"]["n_layers"] == 6 and "--set n_layers=6" in got["commands"][0]
    r = runner.invoke(app, ["plan", "qa"])
    assert r.exit_code == 0 and "retrieval over an existing model" in r.output and "slm kb index" in r.output
    for args, message in [(["plan", "chat", "--hours", "0"], "must be positive"),
                          (["plan", "generation", "--preset", "huge"], "unknown preset 'huge'")]:
        r = runner.invoke(app, args)
        assert r.exit_code == 2 and message in r.output and "Traceback" not in r.output, r.output


def test_interleaved_measures_in_alternating_order():
    seen = []

    def measure(item):
        seen.append(item)
        return len(seen)
    got = machine_mod._interleaved(["a", "b", "c"], measure, rounds=3)
    assert seen == ["a", "b", "c", "c", "b", "a", "a", "b", "c"]
    assert got == [[1, 6, 7], [2, 5, 8], [3, 4, 9]]  # each item's own measurements, in the order taken
