import dataclasses
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch

from slmkit.formats.hf_dir import load_model_dir
from slmkit.model.config import parse_overrides
from slmkit.train.loop import TrainConfig, budget_progress, lr_at, train
from slmkit.train.metrics import read_metrics

TINY_SET = ["vocab_size=96", "dim=32", "n_layers=2", "n_heads=4", "n_kv_heads=2", "hidden_dim=64", "max_seq_len=64"]


def tiny_train_config(data, out, **kw):
    overrides = parse_overrides(TINY_SET)
    base = dict(data=str(data), out=str(out), preset="nano", model_overrides=overrides, seq_len=32, batch_size=4,
                warmup_steps=5, eval_every=0, save_every=10, log_every=1, progress=False)
    return TrainConfig(**{**base, **kw})


def cli_train_args(data, out, **kw):
    args = [sys.executable, "-m", "slmkit.cli", "train", "--data", str(data), "--out", str(out), "--preset", "nano",
            "--seq-len", "32", "--warmup-steps", "5", "--eval-every", "0", "--save-every", "10", "--log-every", "1"]
    for s in TINY_SET:
        args += ["--set", s]
    for k, v in kw.items():
        args += [f"--{k.replace('_', '-')}", str(v)]
    return args


def losses(run):
    return {r["step"]: r["loss"] for r in read_metrics(run / "metrics.jsonl") if "loss" in r}


def test_training_learns_and_writes_a_complete_run(token_data, tmp_path):
    s = train(tiny_train_config(token_data, tmp_path / "run", max_steps=60, eval_every=20, lr=1e-2))
    run = tmp_path / "run"
    assert s["steps"] == 60 and s["tokens"] == 60 * 4 * 32
    assert {"metrics.jsonl", "loss.png", "train_config.json", "model", "checkpoint"} <= {p.name for p in run.iterdir()}
    recs = read_metrics(run / "metrics.jsonl")
    first, last = recs[0]["loss"], [r for r in recs if "loss" in r][-1]["loss"]
    assert last < first - 1.0  # the synthetic corpus is very learnable
    assert any("val_bpb" in r for r in recs) and recs[-1].get("final")
    model = load_model_dir(run / "model")
    assert model.cfg.dim == 32
    prov = json.loads((run / "model" / "slmkit.json").read_text())
    assert prov["train_config"]["max_steps"] == 60 and prov["metrics"]["val_loss"] == s["val_loss"]


def test_existing_run_needs_resume_and_resume_needs_a_checkpoint(token_data, tmp_path):
    train(tiny_train_config(token_data, tmp_path / "run", max_steps=3))
    with pytest.raises(FileExistsError, match="--resume"):
        train(tiny_train_config(token_data, tmp_path / "run", max_steps=3))
    with pytest.raises(FileNotFoundError, match="nothing to resume"):
        train(tiny_train_config(token_data, tmp_path / "other", max_steps=3), resume=True)


def test_budget_requires_a_limit_and_token_budget_stops_on_time(token_data, tmp_path):
    with pytest.raises(ValueError, match="budget"):
        TrainConfig(data="d", out="o")
    s = train(tiny_train_config(token_data, tmp_path / "run", max_tokens=10 * 4 * 32))
    assert s["steps"] == 10


def test_lr_schedule_warms_up_then_decays_to_the_floor():
    cfg = TrainConfig(data="d", out="o", lr=1e-3, warmup_steps=10, min_lr_ratio=0.1, max_steps=100)
    assert lr_at(cfg, 0, 0.0) == pytest.approx(1e-4)
    assert lr_at(cfg, 9, 0.09) == pytest.approx(1e-3)
    assert lr_at(cfg, 50, 0.5) == pytest.approx(1e-3 * (0.1 + 0.9 * 0.5))
    assert lr_at(cfg, 100, 1.0) == pytest.approx(1e-4)
    assert budget_progress(TrainConfig(data="d", out="o", max_steps=10, max_minutes=1), 5, 0, 45.0) == 0.75


@pytest.mark.parametrize("native,bf16_gflops,fp32_gflops,want", [
    (False, 0, 0, "fp32"),      # emulated bf16 (AVX2): never timed
    (True, 836, 189, "bf16"),   # an AMD EPYC with AVX512-BF16
    (True, 155, 243, "fp32"),   # an Intel Xeon with AVX512-BF16 and no AMX: native but slower
    (True, 200, 180, "fp32"),   # not clearly faster: autocast's casts would eat the gain
])
def test_auto_precision_on_a_cpu_takes_bf16_only_where_it_multiplies_faster(monkeypatch, native, bf16_gflops,
                                                                            fp32_gflops, want):
    from slmkit.train import perf
    monkeypatch.setattr(perf, "bf16_supported", lambda device: native)
    monkeypatch.setattr(perf, "matmul_peak_flops", lambda dev, precision: 1e9 * (
        bf16_gflops if precision == "bf16" else fp32_gflops))
    assert perf.resolve_precision("auto", torch.device("cpu")) == want
    assert perf.resolve_precision("bf16", torch.device("cpu")) == "bf16"  # asked for: given


def test_train_config_json_round_trips_and_old_dicts_become_the_typed_configs(token_data, tmp_path):
    from slmkit.distill.kd import DistillConfig
    from slmkit.model.lora import LoRAConfig
    cfg = TrainConfig(data="d.jsonl", out="o", init_from="m", max_steps=1, base_dtype="bfloat16",
                      lora=LoRAConfig(r=4, target_modules="all-linear"), distill=DistillConfig(teacher="t", loss="jsd"))
    back = TrainConfig(**json.loads(json.dumps(dataclasses.asdict(cfg))))  # what train_config.json holds
    assert back == cfg and isinstance(back.lora, LoRAConfig) and isinstance(back.distill, DistillConfig)
    assert back.lora.alpha == 8.0  # 2 x rank by default
    # train_config.json of a run written before the two were typed: the CLI's dicts, targets a comma string
    old = {**json.loads(json.dumps(dataclasses.asdict(cfg))),
           "lora": {"r": 4, "alpha": 8.0, "dropout": 0.05, "target_modules": "q_proj,v_proj"},
           "distill": {"teacher": "t", "cache": None, "loss": "fkl", "beta": 0.5, "temperature": 1.0, "alpha": 0.5,
                       "top_k": 0, "teacher_backend": "auto", "on_policy": 0.0, "on_policy_tokens": 64}}
    assert TrainConfig(**old).lora == LoRAConfig(r=4, alpha=8.0, target_modules=["q_proj", "v_proj"])
    assert TrainConfig(**old).distill == DistillConfig(teacher="t")
    # and the file a run writes reads back into the config it ran with
    run_cfg = tiny_train_config(token_data, tmp_path / "run", max_steps=2)
    train(run_cfg)
    assert TrainConfig(**json.loads((tmp_path / "run" / "train_config.json").read_text())) == run_cfg


def test_continued_training_extends_the_context_and_refuses_a_new_shape(token_data, tmp_path):
    train(tiny_train_config(token_data, tmp_path / "base", max_steps=2))  # max_seq_len 64
    base = str(tmp_path / "base" / "model")
    with pytest.raises(ValueError, match="exceeds the model's context of 64.*--set max_seq_len"):
        train(TrainConfig(data=str(token_data), out=str(tmp_path / "x"), init_from=base, seq_len=128, max_steps=1))
    longer = TrainConfig(data=str(token_data), out=str(tmp_path / "long"), init_from=base, seq_len=128, batch_size=2,
                         model_overrides={"max_seq_len": 128, "rope_theta": 20000.0}, max_steps=2, eval_every=0,
                         progress=False)
    assert train(longer)["steps"] == 2
    cfg = load_model_dir(tmp_path / "long" / "model").cfg
    assert (cfg.max_seq_len, cfg.rope_theta, cfg.dim) == (128, 20000.0, 32)
    with pytest.raises(ValueError, match="--set dim: a model continued from .* keeps its shape"):
        train(dataclasses.replace(longer, out=str(tmp_path / "y"), model_overrides={"dim": 64}))


@pytest.mark.slow
def test_kill_and_resume_continues_exactly_like_an_uninterrupted_run(token_data, tmp_path):
    steps = 150
    reference = train(tiny_train_config(token_data, tmp_path / "ref", max_steps=steps))

    run = tmp_path / "killed"
    proc = subprocess.Popen(cli_train_args(token_data, run, max_steps=steps, batch_size=4),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    state = run / "checkpoint" / "trainer_state.json"
    deadline = time.time() + 120
    while time.time() < deadline:
        if state.exists() and json.loads(state.read_text())["step"] >= 40:
            break
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, "the run finished before it could be killed"
    assert not (run / "model").exists()
    killed_at = json.loads(state.read_text())["step"]
    assert killed_at < steps

    subprocess.run(cli_train_args(token_data, run, max_steps=steps, batch_size=4) + ["--resume"], check=True,
                   capture_output=True)
    assert losses(run) == losses(tmp_path / "ref")
    final = [r for r in read_metrics(run / "metrics.jsonl") if r.get("final")]
    assert len(final) == 1 and final[0]["val_loss"] == reference["val_loss"]
    a, b = load_model_dir(run / "model"), load_model_dir(tmp_path / "ref" / "model")
    for (name, p), q in zip(a.state_dict().items(), b.state_dict().values(), strict=True):
        assert torch.equal(p, q), name


@pytest.mark.slow
def test_ctrl_c_saves_a_checkpoint_that_resumes(token_data, tmp_path):
    run = tmp_path / "run"
    proc = subprocess.Popen(cli_train_args(token_data, run, max_steps=100000, batch_size=4, save_every=100000),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.time() + 120
    while time.time() < deadline and not (run / "metrics.jsonl").exists():
        time.sleep(0.05)
    time.sleep(1.0)
    proc.send_signal(signal.SIGINT)
    out, _ = proc.communicate(timeout=60)
    assert proc.returncode == 0, out
    assert "interrupted at step" in out
    assert json.loads((run / "checkpoint" / "trainer_state.json").read_text())["step"] > 0


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("torchrun", path=os.path.dirname(sys.executable)) is None, reason="no torchrun")
@pytest.mark.parametrize("optimizer", ["adamw", "muon"])
def test_ddp_two_processes_match_one_process_at_the_same_global_batch(token_data, tmp_path, optimizer):
    single = tmp_path / "single"
    train(tiny_train_config(token_data, single, max_steps=12, batch_size=4, grad_accum=2, optimizer=optimizer))
    torchrun = os.path.join(os.path.dirname(sys.executable), "torchrun")
    args = cli_train_args(token_data, tmp_path / "ddp", max_steps=12, batch_size=4, optimizer=optimizer)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    subprocess.run([torchrun, "--standalone", "--nproc_per_node", "2", *args[1:]], check=True, env=env,
                   capture_output=True, timeout=300)
    a, b = losses(single), losses(tmp_path / "ddp")
    assert a.keys() == b.keys() and len(a) == 12
    for step in a:
        assert b[step] == pytest.approx(a[step], rel=1e-4, abs=1e-5), step
    meta = json.loads((tmp_path / "ddp" / "model" / "slmkit.json").read_text())
    assert meta["world_size"] == 2


def _torchrun(args: list[str], what: str) -> None:
    torchrun = os.path.join(os.path.dirname(sys.executable), "torchrun")
    done = subprocess.run([torchrun, "--standalone", "--nproc_per_node", "2", *args[1:]], capture_output=True,
                          text=True, env={**os.environ, "OMP_NUM_THREADS": "1"}, timeout=300)
    assert done.returncode == 0, f"{what}:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"


def _tensors(path):
    from safetensors.torch import load_file
    return load_file(str(path))


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("torchrun", path=os.path.dirname(sys.executable)) is None, reason="no torchrun")
def test_fsdp_two_processes_match_one_process_and_checkpoints_are_interchangeable(token_data, tmp_path):
    """FSDP2 on 2 CPU processes (gloo): the same losses as one process at the same global batch, a checkpoint in the
    single-process format (the same weights and AdamW state), and resuming a checkpoint sharded continues as one
    process does from it."""
    single, sharded = tmp_path / "single", tmp_path / "fsdp"
    # fp32: the ranks' gradient sums are then equal to float rounding (bf16 autocast adds its own differences)
    train(tiny_train_config(token_data, single, max_steps=12, batch_size=4, grad_accum=2, eval_every=6,
                            precision="fp32"))
    _torchrun(cli_train_args(token_data, sharded, max_steps=12, batch_size=4, eval_every=6, parallel="fsdp",
                             precision="fp32"), "fsdp training")
    a, b = losses(single), losses(sharded)
    assert a.keys() == b.keys() and len(a) == 12
    for step in a:
        assert b[step] == pytest.approx(a[step], rel=1e-4, abs=1e-5), step
    vals = [[r["val_loss"] for r in read_metrics(run / "metrics.jsonl") if "val_loss" in r]
            for run in (single, sharded)]
    assert len(vals[0]) == 2 and vals[1] == pytest.approx(vals[0], rel=1e-4)  # periodic and final, all ranks
    for name in ("checkpoint/optimizer.safetensors", "checkpoint/model.safetensors", "model/model.safetensors"):
        want, got = _tensors(single / name), _tensors(sharded / name)
        assert want.keys() == got.keys(), name
        for key in want:
            if key != "rng.torch":
                scale = float(want[key].float().abs().max()) or 1.0
                torch.testing.assert_close(got[key], want[key], rtol=1e-4, atol=1e-5 * scale)
    assert json.loads((sharded / "model" / "slmkit.json").read_text())["world_size"] == 2
    load_model_dir(sharded / "model")  # a plain model directory

    # the single run's checkpoint, resumed two more steps: sharded on 2 processes, and on one
    shutil.copytree(single, tmp_path / "resumed-1")
    shutil.copytree(single, tmp_path / "resumed-2")
    train(tiny_train_config(token_data, tmp_path / "resumed-1", max_steps=14, batch_size=4, grad_accum=2,
                            precision="fp32"), resume=True)
    _torchrun(cli_train_args(token_data, tmp_path / "resumed-2", max_steps=14, batch_size=4, parallel="fsdp",
                             precision="fp32") + ["--resume"], "fsdp resume")
    a, b = losses(tmp_path / "resumed-1"), losses(tmp_path / "resumed-2")
    assert len(a) == 14 and b[13] == pytest.approx(a[13], rel=1e-4) and b[14] == pytest.approx(a[14], rel=1e-4)


def test_fsdp_refuses_what_it_does_not_shard():
    for kw, word in [({"optimizer": "muon"}, "muon"), ({"objective": "mlm", "preset": "enc-tiny"}, "mlm"),
                     ({"parallel": "zero3"}, "unknown parallel")]:
        with pytest.raises(ValueError, match=word):
            TrainConfig(data="d", out="o", max_steps=1, **{"parallel": "fsdp", **kw})
