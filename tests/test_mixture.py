"""FLAN-style instruction mixtures: sampling, templates, chain of thought, held-out tasks, `slm mixture`/`finetune`."""

import json

import pytest
import yaml
from conftest import tiny_model_dir

from slmkit.data.mixture import build_mixture, load_mixture
from slmkit.eval.tasks import load_task

COLOURS = [("red", "rouge"), ("blue", "bleu"), ("green", "vert"), ("black", "noir"), ("white", "blanc")]


def source_records():
    records = []
    for a, b in COLOURS * 4:  # 20 per task
        records.append({"task": "translate", "instruction": "Translate to French.", "input": a, "output": b})
        records.append({"task": "reverse", "instruction": "Spell it backwards.", "input": a, "output": a[::-1],
                        "explanation": f"{a} read from the end is {a[::-1]}."})
    for a, b in COLOURS:
        records.append({"task": "colour_qa", "instruction": "Name the colour.", "input": b, "output": a})
    return records


@pytest.fixture
def mixture_file(tmp_path):
    src = tmp_path / "data" / "ni.jsonl"
    src.parent.mkdir()
    src.write_text("".join(json.dumps(r) + "\n" for r in source_records()))
    spec = {"source": "data/ni.jsonl", "templates": ["{instruction}\n{input}", "{input}\n{instruction}"],
            "cap": 10, "tasks": [{"match": "rev*", "weight": 2.0}], "holdout": ["colour_*"],
            "cot_fraction": 1.0, "seed": 3}
    path = tmp_path / "mix.yaml"
    path.write_text(yaml.safe_dump(spec))
    return path


def read_jsonl(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_mixture_caps_weights_templates_cot_and_holds_tasks_out(mixture_file, tmp_path):
    summary = build_mixture(load_mixture(mixture_file), tmp_path / "out", log=lambda m: None)
    train = read_jsonl(tmp_path / "out" / "train.jsonl")
    tasks = [r["task"] for r in train]
    assert tasks.count("translate") == 10 and tasks.count("reverse") == 20  # cap 10; weight 2 repeats
    assert "colour_qa" not in tasks and summary["heldout"] == ["colour_qa"]
    assert {r["template"] for r in train} == {0, 1}
    for r in train:
        user, answer = r["messages"][0]["content"], r["messages"][1]["content"]
        assert r["messages"][0]["role"] == "user" and r["messages"][1]["role"] == "assistant"
        word = user.replace("Translate to French.", "").replace("Spell it backwards.", "").strip()
        if r["task"] == "reverse":  # every reverse record has a rationale and cot_fraction is 1
            assert answer == f"{word} read from the end is {word[::-1]}. So the answer is {word[::-1]}"
        else:
            assert answer == dict(COLOURS)[word]
    assert summary["tasks"]["reverse"]["cot"] == 20
    # the held-out task is an `slm eval` task: zero-shot, prompted with the first template
    task = load_task(tmp_path / "out" / "heldout" / "colour_qa.yaml")
    assert task.kind == "generate" and task.main_metric == "rouge_l" and len(task.items) == 5
    assert all(it["question"].startswith("Name the colour.\n") for it in task.items)
    assert {it["answer"] for it in task.items} == {a for a, _ in COLOURS}
    # seeded: the same file twice gives the same mixture
    build_mixture(load_mixture(mixture_file), tmp_path / "again", log=lambda m: None)
    assert (tmp_path / "again" / "train.jsonl").read_text() == (tmp_path / "out" / "train.jsonl").read_text()


def test_holdout_globs_from_the_command_line_add_to_the_file(mixture_file, tmp_path):
    summary = build_mixture(load_mixture(mixture_file, holdout=["trans*"]), tmp_path / "o", log=lambda m: None)
    assert summary["heldout"] == ["colour_qa", "translate"]
    assert {r["task"] for r in read_jsonl(tmp_path / "o" / "train.jsonl")} == {"reverse"}


@pytest.mark.parametrize("change, message", [
    ({"holdout": ["nope*"]}, r"holdout pattern\(s\) \['nope\*'\] match no task"),
    ({"holdout": ["*"]}, "every task is held out"),
    ({"templates": ["{question}"]}, "templates may use only"),
    ({"tasks": [{"weight": 2}]}, r"tasks\[0\] must be"),
    ({"colour": 1}, "unknown mixture field"),
])
def test_bad_mixtures_say_what_is_wrong(mixture_file, tmp_path, change, message):
    spec = {**yaml.safe_load(mixture_file.read_text()), **change}
    mixture_file.write_text(yaml.safe_dump(spec))
    with pytest.raises(ValueError, match=message):
        build_mixture(load_mixture(mixture_file), tmp_path / "out", log=lambda m: None)
    assert not (tmp_path / "out").exists()  # nothing half-written


def test_a_bad_source_line_is_named(mixture_file, tmp_path):
    src = tmp_path / "data" / "ni.jsonl"
    src.write_text(src.read_text() + json.dumps({"task": "x", "instruction": "i", "input": 3, "output": "o"}) + "\n")
    with pytest.raises(ValueError, match=r"ni.jsonl:46: needs a string field 'input'"):
        build_mixture(load_mixture(mixture_file), tmp_path / "out", log=lambda m: None)


def test_finetune_on_a_mixture_then_eval_the_heldout_task(mixture_file, tmp_path):
    from typer.testing import CliRunner

    from slmkit.cli import app
    from slmkit.tokenizer import train_tokenizer
    text = " ".join(f"{i} {a} {b} {a[::-1]} So the answer is read from the end" for i in
                    ["Translate to French.", "Spell it backwards.", "Name the colour."] for a, b in COLOURS)
    tok = train_tokenizer([text] * 20, vocab_size=320)
    base = tiny_model_dir(tmp_path / "base", tok)
    out = tmp_path / "run"
    runner = CliRunner()
    result = runner.invoke(app, ["finetune", str(base), "--mixture", str(mixture_file), "--holdout-tasks", "trans*",
                                 "--out", str(out), "--seq-len", "64", "--max-steps", "3", "--precision", "fp32"])
    assert result.exit_code == 0, result.output
    assert json.loads((out / "mixture" / "mixture.json").read_text())["heldout"] == ["colour_qa", "translate"]
    assert (out / "model" / "config.json").exists()
    result = runner.invoke(app, ["eval", str(out), "--tasks", str(out / "mixture" / "heldout" / "translate.yaml"),
                                 "--limit", "3", "--no-efficiency", "-o", str(tmp_path / "eval")])
    assert result.exit_code == 0, result.output
    scores = json.loads((tmp_path / "eval" / "results.json").read_text())
    assert "rouge_l" in json.dumps(scores)
    both = runner.invoke(app, ["finetune", str(base), "--mixture", str(mixture_file), "--data", "x.jsonl",
                               "--out", str(tmp_path / "r2")])
    assert both.exit_code == 2 and "exactly one of --data" in both.output


def test_rouge_l():
    from slmkit.eval.metrics import rouge_l
    assert rouge_l("The cat sat.", "the cat sat") == 1.0
    assert rouge_l("a b c d", "a c") == pytest.approx(2 * 0.5 * 1.0 / 1.5)  # LCS "a c": P 2/4, R 2/2
    assert rouge_l("x y", "a b") == 0.0 and rouge_l("", "") == 1.0 and rouge_l("", "a") == 0.0
