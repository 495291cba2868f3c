"""The `slm` commands as a user runs them: prepare -> train -> generate/chat, and their errors."""

import json
import subprocess
import sys

import pytest
from typer.testing import CliRunner

from slmkit.cli import app

runner = CliRunner()
TINY = ["--set", "dim=32", "--set", "n_layers=2", "--set", "n_heads=4", "--set", "n_kv_heads=2",
        "--set", "hidden_dim=64", "--set", "max_seq_len=64"]


def make_corpus(root):
    root.mkdir()
    for i in range(12):
        (root / f"mod{i}.py").write_text(f"def f{i}(x):\n    return x * {i} + {i * 7}\n\n\nclass C{i}:\n"
                                         f"    value = {i}\n    name = 'c{i}'\n" * 3)
    (root / "notes.jsonl").write_text("\n".join(json.dumps({"body": f"note {i}: héllo ✓"}) for i in range(20)))
    return root


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("cli")
    corpus = make_corpus(tmp / "corpus")
    r = runner.invoke(app, ["data", "prepare", str(corpus), "-o", str(tmp / "data"), "--vocab-size", "300",
                            "--jsonl-field", "body", "--val-fraction", "0.2"])
    assert r.exit_code == 0, r.output
    r = runner.invoke(app, ["train", "--data", str(tmp / "data"), "--out", str(tmp / "run"), "--preset", "nano",
                            *TINY, "--seq-len", "32", "--batch-size", "4", "--max-steps", "30", "--eval-every", "10",
                            "--warmup-steps", "3", "--lr", "1e-2"])
    assert r.exit_code == 0, r.output
    return tmp


def test_prepare_train_generate_from_the_command_line(trained_run):
    assert (trained_run / "run" / "model" / "tokenizer.json").exists()
    r = runner.invoke(app, ["generate", str(trained_run / "run"), "def ", "--max-new-tokens", "20",
                            "--temperature", "0", "--seed", "1"])
    assert r.exit_code == 0, r.output
    assert r.output.startswith("def ") and len(r.output) > 5
    cached = r.output
    r = runner.invoke(app, ["generate", str(trained_run / "run"), "def ", "--max-new-tokens", "20",
                            "--temperature", "0", "--no-cache"])
    assert r.output == cached


def test_chat_repl_streams_and_keeps_history(trained_run):
    proc = subprocess.run([sys.executable, "-m", "slmkit.cli", "chat", str(trained_run / "run"),
                           "--max-new-tokens", "8", "--seed", "0"], input="hello\n/reset\nagain\n/exit\n",
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.count("model> ") == 2


def test_presets_lists_every_shape():
    r = runner.invoke(app, ["presets"])
    assert r.exit_code == 0
    for name in ("nano", "micro", "stories15m", "smollm2-135m", "tinyllama-1.1b"):
        assert name in r.output


def test_errors_are_one_clear_line_with_exit_code_2(tmp_path):
    r = runner.invoke(app, ["generate", str(tmp_path / "missing"), "hi"])
    assert r.exit_code == 2 and "not a model directory" in r.output
    r = runner.invoke(app, ["train", "--data", str(tmp_path / "nodata"), "--out", str(tmp_path / "r"),
                            "--max-steps", "1"])
    assert r.exit_code == 2 and "slm data prepare" in r.output
    r = runner.invoke(app, ["train", "--data", str(tmp_path), "--out", str(tmp_path / "r"), "--set", "width=3",
                            "--max-steps", "1"])
    assert r.exit_code == 2 and "unknown model field" in r.output
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "ok"}\n{broken\n')
    r = runner.invoke(app, ["data", "prepare", str(bad), "-o", str(tmp_path / "d")])
    assert r.exit_code == 2 and "bad.jsonl:2" in r.output
    assert not (tmp_path / "d").exists()
