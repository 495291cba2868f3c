"""Fault injection for what must survive a crash (issue 22, item 8): the atomic directory swap behind checkpoints
and model directories, resume, metrics.jsonl, `slm synth`'s rewrite of records.jsonl. The counts of the random
kill test are in docs/reliability.md."""

import errno
import json
import os
import pathlib
import signal
import subprocess
import sys
import textwrap

import pytest
from test_train import tiny_train_config

from slmkit import files
from slmkit.files import atomic_dir, recover_dir
from slmkit.train.loop import train

# --- atomic_dir: a kill at every point of the swap ---------------------------------------------------------------

# A writer of version 2 over version 1 that SIGKILLs itself at its Nth os.replace (0: while writing the files).
KILLED_WRITER = textwrap.dedent("""
    import os, signal, sys
    from pathlib import Path
    from slmkit import files
    target, kill_at = Path(sys.argv[1]), int(sys.argv[2])
    calls = [0]
    real_replace = os.replace
    def replace(src, dst):
        calls[0] += 1
        if calls[0] == kill_at:
            os.kill(os.getpid(), signal.SIGKILL)
        real_replace(src, dst)
    files.os.replace = replace
    with files.atomic_dir(target) as tmp:
        (tmp / "a.txt").write_text("version 2")
        if kill_at == 0:
            os.kill(os.getpid(), signal.SIGKILL)
        (tmp / "b.txt").write_text("version 2")
""")


@pytest.mark.parametrize("kill_at", [0, 1, 2])  # while writing; before moving the old aside; between the renames
def test_atomic_dir_survives_a_kill_at_every_step_of_the_swap(tmp_path, kill_at):
    target = tmp_path / "checkpoint"
    with atomic_dir(target) as tmp:
        (tmp / "a.txt").write_text("version 1")
        (tmp / "b.txt").write_text("version 1")
    proc = subprocess.run([sys.executable, "-c", KILLED_WRITER, str(target), str(kill_at)], capture_output=True)
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    assert len(list(tmp_path.iterdir())) > 1  # the kill left something behind: a temporary or the old copy
    assert recover_dir(target) == (kill_at == 2)
    # the previous complete version, never a mix, and nothing else left
    assert {p.name: p.read_text() for p in target.iterdir()} == {"a.txt": "version 1", "b.txt": "version 1"}
    assert [p.name for p in tmp_path.iterdir()] == ["checkpoint"]


def test_a_live_writers_temporary_is_not_swept(tmp_path):
    target = tmp_path / "model"
    with atomic_dir(target) as tmp:
        (tmp / "x").write_text("1")
        recover_dir(target)  # e.g. another reader starting up while this save runs
        assert tmp.exists()
    assert (target / "x").read_text() == "1"


# --- resume -------------------------------------------------------------------------------------------------------

def _trained(token_data, run, steps=4, **kw):
    train(tiny_train_config(token_data, run, max_steps=steps, save_every=2, **kw), log=lambda *a: None)
    return json.loads((run / "checkpoint" / "trainer_state.json").read_text())["step"]


def test_resume_recovers_a_checkpoint_killed_between_its_renames_and_sweeps_temporaries(token_data, tmp_path):
    run = tmp_path / "run"
    _trained(token_data, run, steps=4)
    # what a kill -9 between atomic_dir's two renames leaves: the checkpoint moved aside, a complete new one in
    # a temporary, plus a temporary of an earlier killed save
    os.replace(run / "checkpoint", run / ".checkpoint.old")
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    (run / f".checkpoint.{dead.stdout.strip()}.abcd1234.tmp").mkdir()
    s = train(tiny_train_config(token_data, run, max_steps=6, save_every=2), resume=True, log=lambda *a: None)
    assert s["steps"] == 6
    assert sorted(p.name for p in run.iterdir() if p.name.startswith(".checkpoint")) == []


def test_resume_with_another_model_shape_is_a_clear_error(token_data, tmp_path):
    run = tmp_path / "run"
    _trained(token_data, run)
    wider = tiny_train_config(token_data, run, max_steps=6)
    wider.model_overrides = {**wider.model_overrides, "dim": 48}
    with pytest.raises(ValueError, match=r"saved for another model: dim 32 \(now 48\).*--preset/--set"):
        train(wider, resume=True, log=lambda *a: None)


def test_resume_on_other_data_is_a_clear_error(token_data, tmp_path):
    from conftest import write_token_dataset
    run = tmp_path / "run"
    _trained(token_data, run)
    other = write_token_dataset(tmp_path / "other", n_train=12000, seed=1)
    with pytest.raises(ValueError, match="was trained on other data.*original --data"):
        train(tiny_train_config(other, run, max_steps=6), resume=True, log=lambda *a: None)


def test_a_torn_last_metrics_line_does_not_crash_resume(token_data, tmp_path):
    run = tmp_path / "run"
    _trained(token_data, run)
    with open(run / "metrics.jsonl", "a") as f:
        f.write('{"step": 5, "tokens": 6')  # killed mid-write
    with open(run / "metrics.jsonl", "a") as f:
        f.write('\n[1, 2]\n{"tokens": 3}\n')  # and lines that parse but are no records
    s = train(tiny_train_config(token_data, run, max_steps=6, save_every=2), resume=True, log=lambda *a: None)
    assert s["steps"] == 6
    steps = [json.loads(line).get("step") for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3, 4, 5, 6, 6]  # every step once, then the final validation


def test_synth_resume_rewrite_cannot_lose_kept_records(tmp_path, monkeypatch):
    from test_synth import ScriptedTeacher, _seeds

    from slmkit.distill import synth as S
    seeds = _seeds(tmp_path, [{"text": f"topic {i}: a lesson"} for i in range(3)])
    replies = {f"topic {i}": f"Lesson {i}: " + " ".join(f"word{i}x{j}" for j in range(30)) for i in range(3)}
    cfg = S.SynthConfig(recipe="textbook", teacher="scripted", seeds=seeds, out=str(tmp_path / "out"))
    with pytest.raises(KeyboardInterrupt):
        S.synthesize(cfg, lm=ScriptedTeacher(replies, fail_on_call=3), progress=False, log=lambda m: None)
    records = tmp_path / "out" / "records.jsonl"
    before = records.read_text()
    assert len(before.splitlines()) == 2

    # the disk fills up while resume rewrites the file: the rewrite must fail without touching the original
    def disk_full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    def truncating_write_text(self, *args, **kwargs):  # what a non-atomic rewrite would do before failing
        open(self, "w").close()
        disk_full()
    monkeypatch.setattr(files.os, "fsync", disk_full)
    monkeypatch.setattr(pathlib.Path, "write_text", truncating_write_text)
    with pytest.raises(OSError, match="No space left"):
        S.synthesize(cfg, lm=ScriptedTeacher(replies), progress=False, log=lambda m: None)
    assert records.read_text() == before
    assert not [p for p in records.parent.iterdir() if p.name.endswith(".tmp")]


# --- kill -9 of a training process at random moments of its checkpoint saves --------------------------------------

KILLS = 20

# Imports torch once, then forks one training process per round (no torch work happens in this parent before a
# fork, so the children start clean) and, once it has saved a new checkpoint, SIGKILLs it 0-30 ms into its next
# save (the save of this tiny model takes about that long). Each child
# first checks the checkpoint the previous one left: it must load (model, optimizer, RNG) and be self-consistent.
KILLER = textwrap.dedent("""
    import json, os, random, signal, sys, time
    from pathlib import Path
    import torch._dynamo  # imported lazily by the first optimizer (seconds): once here, not in every child
    from test_train import tiny_train_config
    from slmkit.files import recover_dir
    from slmkit.model.config import model_config
    from slmkit.model.llama import Transformer
    from slmkit.train.checkpoint import load_checkpoint
    from slmkit.train.loop import make_optimizer, train
    data, run, kills = sys.argv[1], Path(sys.argv[2]), int(sys.argv[3])
    cfg = tiny_train_config(data, run, max_steps=10**6, batch_size=2, save_every=1, log_every=1000)
    rng = random.Random(0)

    def saved_step():
        try:
            return json.loads((run / "checkpoint" / "trainer_state.json").read_text())["step"]
        except (OSError, ValueError, KeyError):
            return 0

    def child(resume):
        if resume:
            leftovers = sorted(p.name for p in run.iterdir() if p.name.startswith(".checkpoint."))
            recover_dir(run / "checkpoint")
            model = Transformer(model_config(cfg.preset, **cfg.model_overrides))
            opt = make_optimizer(model, cfg)
            state = load_checkpoint(run, model, opt)  # raises on a missing or half-written file
            steps = {float(s["step"]) for s in opt.state_dict()["state"].values()}
            # the optimizer and the trainer state come from the same save
            assert steps == {float(state["step"])}, (steps, state["step"])
            print(json.dumps({"step": state["step"], "leftovers": leftovers}), flush=True)
        train(cfg, resume=resume, log=lambda *a: None)

    last = 0
    for kill in range(kills + 1):
        pid = os.fork()
        if pid == 0:
            try:
                child(resume=kill > 0)
            except BaseException as e:
                print(json.dumps({"error": repr(e)}), flush=True)
                os._exit(1)
            os._exit(0)
        deadline = time.monotonic() + 60
        while saved_step() <= last:
            done, status = os.waitpid(pid, os.WNOHANG)
            if done:
                sys.exit(f"round {kill}: the training process ended (status {status})")
            if time.monotonic() > deadline:
                sys.exit(f"round {kill}: no checkpoint saved")
            time.sleep(0.005)
        # then aim at the next save: kill a random few milliseconds after its temporary directory appears. Only this
        # child's (the writer's pid is in the name): a killed save's leftover is there from the start, and a
        # checkpoint recovered from .old can end the wait above before this child has even checked it.
        while not any(run.glob(f".checkpoint.{pid}.*.tmp")) and time.monotonic() < deadline:
            time.sleep(0.001)
        time.sleep(rng.uniform(0, 0.03))
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
        last = saved_step() or last
""")


@pytest.mark.slow
def test_kill_9_during_checkpoint_saves_never_loses_or_half_loads_a_checkpoint(token_data, tmp_path):
    run = tmp_path / "run"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([os.path.dirname(__file__), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.run([sys.executable, "-c", KILLER, str(token_data), str(run), str(KILLS)], env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    checks = [json.loads(line) for line in proc.stdout.splitlines()]
    assert not [c for c in checks if "error" in c], checks
    assert len(checks) == KILLS  # every kill was followed by a successful check and resume
    steps = [c["step"] for c in checks]
    assert steps == sorted(steps) and steps[-1] >= KILLS  # never went back, always progressed
    in_save = sum(bool(c["leftovers"]) for c in checks)
    between = sum(".checkpoint.old" in c["leftovers"] for c in checks)
    print(f"{KILLS} kills: {in_save} interrupted a save (temporary left), {between} between its two renames")
    assert (run / "checkpoint" / "trainer_state.json").exists()


# --- validation: configurations, JSONL Python refuses, large files (issue 22, item 9) ---------------------------

@pytest.mark.parametrize("fields, message", [
    ({"n_heads": 0}, "n_heads=0: must be a positive integer"),
    ({"dim": 0}, "dim=0: must be a positive integer"),
    ({"n_layers": -1}, "n_layers=-1: must be a positive integer"),
    ({"vocab_size": 0}, "vocab_size=0"),
    ({"hidden_dim": 0}, "hidden_dim=0"),
    ({"max_seq_len": 0}, "max_seq_len=0"),
    ({"n_kv_heads": 0}, "n_kv_heads=0"),
    ({"dim": 30, "n_heads": 4}, "dim=30 must be divisible by n_heads=4"),
    ({"n_heads": 4, "n_kv_heads": 3}, "multiple of n_kv_heads=3"),
    ({"norm_eps": 0.0}, "norm_eps=0.0: must be a positive number"),
    ({"rope_theta": -1.0}, "rope_theta=-1.0"),
    ({"bos_token_id": -3}, "bos_token_id=-3"),
])
def test_model_config_rejects_impossible_shapes(fields, message):
    from slmkit.model.config import model_config
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        model_config("nano", **fields)


@pytest.mark.parametrize("fields, message", [
    ({"grad_accum": 0}, "grad_accum=0: must be a positive integer"),  # was: a budget that never ends
    ({"batch_size": 0}, "batch_size=0"),
    ({"seq_len": 0}, "seq_len=0"),
    ({"log_every": 0}, "log_every=0"),  # was: ZeroDivisionError
    ({"eval_every": -5}, "eval_every=-5"),
    ({"save_every": -1}, "save_every=-1"),
    ({"eval_tokens": 0}, "eval_tokens=0"),
    ({"max_steps": -1}, "max_steps=-1: must be positive"),
    ({"max_tokens": 0, "max_steps": None, "max_minutes": 1.0}, None),  # 0 = unset, like None
    ({"lr": 0.0}, "lr=0.0: must be positive"),
    ({"min_lr_ratio": 1.5}, "min_lr_ratio=1.5"),
    ({"beta2": 2.0}, "beta2=2.0"),
    ({"grad_clip": float("nan")}, "grad_clip=nan"),
    ({"threads": -1}, "threads=-1"),
    ({"max_minutes": float("nan")}, "max_minutes=nan"),
])
def test_train_config_rejects_what_would_crash_or_never_end(tmp_path, fields, message):
    if message is None:
        tiny_train_config(tmp_path, tmp_path / "run", **fields)  # accepted
        return
    with pytest.raises(ValueError, match=message):
        tiny_train_config(tmp_path, tmp_path / "run", **{"max_steps": 5, **fields})


def test_jsonl_that_python_refuses_is_a_file_line_error(tmp_path):
    from slmkit.files import JsonlError, read_jsonl
    path = tmp_path / "x.jsonl"
    path.write_text('{"a": 1}\n{"n": ' + "9" * 5000 + "}\n")
    with pytest.raises(JsonlError, match=r"x\.jsonl:2: a number Python cannot read \(Exceeds the limit"):
        read_jsonl(path)
    path.write_text('{"a": 1}\n\n{"a": ' + "[" * 50_000 + "]" * 50_000 + "}\n")
    with pytest.raises(JsonlError, match=r"x\.jsonl:3: nested too deeply"):
        read_jsonl(path)


def test_a_large_text_file_is_streamed_in_chunks_with_its_line_numbers(tmp_path, monkeypatch):
    from slmkit.data import ingest
    monkeypatch.setattr(ingest, "LARGE_TEXT_BYTES", 1000)
    monkeypatch.setattr(ingest, "TEXT_CHUNK_BYTES", 300)
    paragraphs = [f"paragraph {i}: " + "héllo wörld " * (i % 7 + 1) + "\nsecond line\n" for i in range(60)]
    text = "\n".join(paragraphs) + "x" * 700 + "\nend\n"  # and one line longer than a chunk
    path = tmp_path / "big.txt"
    path.write_text(text, encoding="utf-8")
    docs = list(ingest.read_documents(ingest.SourceFile(path, "big.txt")))
    assert len(docs) > 5 and "".join(d.text for d in docs) == text
    assert all(len(d.text.encode()) <= 300 for d in docs)
    for d in docs:  # each document knows the line it starts on
        assert text.splitlines(keepends=True)[d.line - 1].startswith(d.text.splitlines(keepends=True)[0][:20])
        assert d.doc_id == f"big.txt:{d.line}"
    assert sum(d.text.endswith("\n\n") for d in docs) >= len(docs) // 2  # cut at blank lines where it can
    # an encoding error deep in the file still names its line
    path.write_bytes(text.encode() + b"ok\n\xff\xfe broken\n")
    problems = []
    list(ingest.read_documents(ingest.SourceFile(path, "big.txt"), on_problem=problems.append))
    assert problems and f"big.txt:{text.count(chr(10)) + 2}: invalid UTF-8" in str(problems[0])


def test_csv_is_streamed_and_a_bad_byte_names_its_line(tmp_path):
    from slmkit.data import ingest
    path = tmp_path / "t.csv"
    path.write_bytes(b'text,label\n"multi\nline",a\nfine,b\nbad \xff,c\n')
    problems = []
    docs = list(ingest.read_documents(ingest.SourceFile(path, "t.csv"), on_problem=problems.append))
    assert [d.text for d in docs] == ["multi\nline", "fine"] and [d.line for d in docs] == [2, 4]
    assert "t.csv:5: invalid UTF-8" in str(problems[0])
