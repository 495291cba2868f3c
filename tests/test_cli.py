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


def test_presets_prints_each_shapes_size_and_cost_as_built():
    import re

    import torch

    from slmkit.model.config import PRESETS, model_config
    from slmkit.model.llama import Transformer
    r = runner.invoke(app, ["presets"])
    assert r.exit_code == 0, r.output
    rows = {m[1]: m for m in re.finditer(r"^(\S+)\s+([\d,]+)\s+([\d,]+)\s+([\d.]+)\s+dim (\d+), (\d+) layers",
                                         r.output, re.M)}
    from slmkit.model.encoder import ENCODER_PRESETS, Encoder, encoder_config
    assert set(rows) == set(PRESETS) | set(ENCODER_PRESETS)
    for name in ENCODER_PRESETS:  # the encoders: every weight, and all but the word/position/type embeddings
        cfg, row = encoder_config(name), rows.pop(name)
        with torch.device("meta"):
            params = dict(Encoder(cfg).named_parameters())
        total = sum(p.numel() for p in params.values())
        assert int(row[2].replace(",", "")) == total, name
        assert int(row[3].replace(",", "")) == total - sum(p.numel() for k, p in params.items()
                                                           if k.startswith("embeddings.") and p.dim() == 2), name
        assert (int(row[5]), int(row[6])) == (cfg.dim, cfg.n_layers)
    for name, row in rows.items():
        cfg = model_config(name)
        with torch.device("meta"):  # the model as built, counted without allocating it
            params = dict(Transformer(cfg).named_parameters())
        total = sum(p.numel() for p in params.values())
        embedding = sum(params[k].numel() for k in ("embed_tokens.weight", "lm_head.weight") if k in params)
        assert int(row[2].replace(",", "")) == total, name
        assert int(row[3].replace(",", "")) == total - embedding, name
        # training FLOPs per token at the full context: 6 x (non-embedding + LM head) + attention
        flops = 6 * (total - embedding + cfg.vocab_size * cfg.dim) + 12 * cfg.n_layers * cfg.dim * cfg.max_seq_len
        assert float(row[4]) == pytest.approx(flops / 1e9, abs=5e-4), name
        assert (int(row[5]), int(row[6])) == (cfg.dim, cfg.n_layers)


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


def test_sampling_options_left_out_come_from_the_model(trained_run, tmp_path):
    import json
    import shutil
    run = str(trained_run / "run")
    greedy = runner.invoke(app, ["generate", run, "def ", "--max-new-tokens", "20", "--temperature", "0"]).output
    model = tmp_path / "greedy-by-default"
    shutil.copytree(trained_run / "run" / "model", model)
    config = json.loads((model / "generation_config.json").read_text())
    (model / "generation_config.json").write_text(json.dumps({**config, "do_sample": False}))  # the model says: greedy
    for seed in ("1", "2"):
        r = runner.invoke(app, ["generate", str(model), "def ", "--max-new-tokens", "20", "--seed", seed])
        assert r.exit_code == 0, r.output
        assert r.output == greedy
    r = runner.invoke(app, ["generate", str(model), "def ", "--max-new-tokens", "20", "--seed", "1",
                            "--temperature", "5"])
    assert r.output != greedy  # what the user gives wins over the model's default


def test_a_run_that_exists_is_one_error_line_not_a_traceback(trained_run):
    r = runner.invoke(app, ["train", "--data", str(trained_run / "data"), "-o", str(trained_run / "run"),
                            "--max-steps", "1"])
    assert r.exit_code == 2, r.output
    assert r.output.startswith("error: ") and r.output.count("\n") == 1 and "--resume" in r.output


def test_train_continues_from_a_run_directory(trained_run):
    r = runner.invoke(app, ["train", "--data", str(trained_run / "data"), "-o", str(trained_run / "more"),
                            "--init-from", str(trained_run / "run"), "--seq-len", "32", "--batch-size", "4",
                            "--max-steps", "2", "--eval-every", "0"])
    assert r.exit_code == 0, r.output
    config = json.loads((trained_run / "more" / "train_config.json").read_text())
    assert config["init_from"] == str(trained_run / "run" / "model")  # resolved to the run's model directory


# --- every command, given bad input: one `error:` line, exit code 2, never a traceback (issue 22, item 9) ---------

NO_INPUT = {"models", "presets"}  # they take no arguments or options a user could get wrong


def _bad_inputs(tmp):
    """(command, arguments) pairs of bad input, at least one for every command."""
    from conftest import write_token_dataset
    data = write_token_dataset(tmp / "tokens", n_train=2000, n_val=500)
    missing = str(tmp / "missing")
    huge = tmp / "huge.jsonl"
    huge.write_text('{"text": "fine"}\n{"text": "x", "n": ' + "1" * 5000 + "}\n")
    deep = tmp / "deep.jsonl"
    deep.write_text('{"text": "x", "n": ' + "[" * 100_000 + "]" * 100_000 + "}\n")
    bad_yaml = tmp / "mix.yaml"
    bad_yaml.write_text("sources: [unclosed\n")
    out = ["-o", str(tmp / "out")]
    runs = iter(range(100))

    def train(*bad):  # each in its own run directory, so one that wrongly starts cannot mask the next
        return ["train", "--data", str(data), "-o", str(tmp / f"run{next(runs)}"), "--preset", "nano",
                "--max-steps", "2", "--seq-len", "16", *bad]
    return [
        (["data", "prepare", str(huge), *out], "huge.jsonl:2: a number Python cannot read"),
        (["data", "prepare", str(deep), *out], "deep.jsonl:1: nested too deeply"),
        (["data", "prepare", missing, *out], "missing"),
        (["mixture", str(bad_yaml), *out], "mix.yaml"),
        (["build-llama-server", "--jobs", "0"], "--jobs is 0; it must be at least 1"),
        (["eval-fim", missing], "missing: not a model directory"),
        (["plan", "poetry"], "unknown task 'poetry'"),
        (["plan", "generation", "--data", missing], "missing: no such file or folder"),
        (train("--grad-accum", "0"), "grad_accum=0: must be a positive integer"),
        (train("--log-every", "0"), "log_every=0: must be a positive integer"),
        (train("--batch-size", "0"), "batch_size=0: must be a positive integer"),
        (train("--max-tokens", "-5"), "max_tokens=-5: must be positive"),
        (train("--eval-every", "-1"), "eval_every=-1"),
        (train("--set", "n_heads=0"), "n_heads=0: must be a positive integer"),
        (train("--set", "n_layers=-2"), "n_layers=-2: must be a positive integer"),
        (train("--set", "dim=30"), "dim=30 must be divisible by n_heads=4"),
        (train("--set", "dim=wide"), "dim='wide': expected an integer"),
        (train("--objective", "xlm"), "unknown objective 'xlm'; choose one of clm, mlm"),
        (train("--objective", "mlm"), "preset 'nano' is a decoder preset; --objective mlm trains an encoder"),
        (["finetune", missing, *out, "--data", str(huge), "--max-steps", "1"], "missing"),
        (["merge", missing, missing, *out], "missing"),
        (["distill", "--data", str(data), *out, "--teacher", missing, "--max-steps", "1"], "missing"),
        (["teacher-cache", missing, "--data", str(data), *out], "missing"),
        (["teacher-text", missing, "--data", str(huge), *out], "meta.json: not found"),
        (["synth", "program", "--teacher", missing, "--seeds", str(huge), *out], "huge.jsonl:2"),
        (["synth", "textbook", "--teacher", missing, "--seeds", missing, *out], "seeds file not found"),
        (["quickstart", "--out", str(tmp / "qs"), "--preset", "nope"], "unknown preset 'nope'"),
        (["quickstart", "--out", str(tmp / "qs"), "--minutes", "0"], "must be positive"),
        (["quickstart", "--out", str(tmp / "qs"), "--optimizer", "sgd"], "--optimizer sgd: choose one of adamw, muon"),
        (["generate", missing, "hi"], "not a model directory"),
        (["chat", missing], "missing"),
        (["serve", missing], "missing"),
        (["embed", missing, "hi"], "missing"),
        (["embed-train", missing, "--pairs", str(huge), *out], "huge.jsonl:1: \"query\" must be a non-empty string"),
        (["embed-train", missing, "--pairs", missing, *out], "no such pairs file"),
        (["embed-train", missing, "--pairs", str(huge), *out, "--batch-size", "1"], "at least 2 pairs per batch"),
        (["rerank-train", missing, "--pairs", missing, *out], "no such pairs file"),
        (["rerank-train", missing, "--pairs", str(huge), *out, "--negatives", "0"], "at least 1 negative"),
        (["rerank", missing, "q", "passage"], "no such reranker directory"),
        (["serve", missing, "--embedder", missing], "not an encoder"),
        (["eval", missing, "--tasks", "nosuchtask"], "nosuchtask"),
        (["eval", missing, "--tasks", str(huge)], "huge.jsonl:2"),
        (["pull", "no-such-model"], "no-such-model"),
        (["import", missing, *out], "missing"),
        (["export", missing, *out], "missing"),
        (["classify", "train", missing, "--data", str(huge), *out], "not a model directory"),
        (["classify", "predict", missing, "--data", str(huge)], "missing"),
        (["classify", "eval", missing, "--data", str(huge)], "missing"),
        (["classify", "cascade", missing, "--escalate-to", missing, "--dev", str(huge), "--data", str(huge)],
         "not a classifier directory"),
        (["classify", "supericl", missing, "--large", missing, "--demos", str(huge), "--data", str(huge)],
         "not a classifier directory"),
        (["classify", "prune", missing, "--data", str(huge), "--dev", str(huge), *out],
         "not a classifier directory"),
        (["cascade", "calibrate", missing, "--dev", str(huge), *out], "huge.jsonl:2"),
        (["kb", "index", missing, *out], "no such file or folder"),
        (["kb", "search", missing, "q"], "no knowledge base here"),
        (["kb", "search", missing, "q", "--reranker", missing], "no knowledge base here"),
        (["kb", "pairs", missing, *out], "no knowledge base here"),
        (["kb", "synth", missing, "-o", str(tmp / "synth.jsonl"), "--teacher", missing], "no knowledge base here"),
        (["kb", "synth", missing, "-o", str(tmp / "synth.jsonl"), "--teacher", missing, "--n", "0"],
         "--n must be > 0"),
        (["kb", "ask", missing, "q", "--model", missing], "no knowledge base here"),
        (["kb", "ask", missing, "q", "--answer", "quote"], "no knowledge base here"),
        (["kb", "ask", missing, "q"], "no knowledge base here"),  # no --model: it quotes
        (["kb", "ask", missing, "q", "--answer", "model"], "--answer model needs a model (--model)"),
        (["kb", "ask", missing, "q", "--answer", "cite"], "unknown answer mode 'cite'"),
        (["kb", "eval", missing, "--questions", str(huge), *out, "--answer", "model+quote"], "needs a model"),
        (["serve", missing, "--kb", missing, "--kb-answer", "cite"], "unknown answer mode 'cite' (--kb-answer)"),
        (["kb", "eval", missing, "--questions", str(huge), *out], "huge.jsonl:1"),
        (["write", missing, "--model", missing, "--sku", "KB-1"], "no such catalogue file"),
        (["recommend", missing, "--history", "KB-1"], "no such catalogue file"),
        (["brand-records", missing, missing, *out], "no such catalogue file"),
        (["support", "reply", missing, "hi", "--intents", missing], "no knowledge base here"),
        (["support", "chat", missing, "--intents", missing], "no knowledge base here"),
        (["support", "chat", missing, "--quote-articles", "0"], "--quote-articles) is 0; it must be at least 1"),
        (["support", "tickets", missing], "no ticket store here"),
        (["support", "eval", missing, "--messages", str(huge), *out], "huge.jsonl:1: missing field"),
    ]


def _all_commands():
    import typer.main
    found = []

    def walk(cmd, prefix):
        if hasattr(cmd, "commands"):
            for name, sub in cmd.commands.items():
                walk(sub, prefix + [name])
        else:
            found.append(" ".join(prefix))
    walk(typer.main.get_command(app), [])
    return found


def test_every_command_answers_bad_input_with_one_error_line_and_exit_2(tmp_path):
    cases = _bad_inputs(tmp_path)
    groups = ("data", "classify", "kb", "cascade", "support")  # commands with subcommands
    covered = {" ".join(args[:2]) if args[0] in groups else args[0] for args, _ in cases}
    assert set(_all_commands()) - NO_INPUT <= covered, "a command without a bad-input case"
    failures = []
    for args, expected in cases:
        r = runner.invoke(app, args)
        lines = r.output.strip().splitlines()
        ok = (r.exit_code == 2 and "Traceback" not in r.output and lines and lines[-1].startswith("error: ")
              and sum(line.startswith("error: ") for line in lines) == 1 and expected in lines[-1])
        if not ok:
            failures.append(f"slm {' '.join(args)}\n  exit {r.exit_code}: {r.output.strip()[-300:]!r} "
                            f"{r.exception!r}")
    assert not failures, "\n".join(failures)
