"""`slm synth repair` (distill/repair.py) and the repair evaluation kind (eval/repair.py, harness)."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
from typer.testing import CliRunner

from slmkit.cli import app
from slmkit.distill import repair as R
from slmkit.eval.harness import evaluate
from slmkit.eval.repair import compiles, put_back, repair_line
from slmkit.eval.tasks import Task, load_task

REPO = Path(__file__).resolve().parents[1]
SRC = '''import os


def area(width, height):
    if width > 0 and height >= 0:
        total = (width * height) ** 2
        return os.path.join(str(total), "x")
    return None


class Box:
    def size(self, items):
        for item in items:
            print(item)
        return len(items)
'''
LINES = SRC.split("\n")


def _file(tmp_path, text=SRC, name="mod.py"):
    path = tmp_path / name
    path.write_text(text)
    return R._read(path)


def _line(text):
    return LINES.index(text) + 1


@pytest.mark.parametrize("kind, line, broken, kept", [
    ("drop_bracket", "        total = (width * height) ** 2", "        total = (width * height ** 2", True),
    ("duplicate_bracket", "        total = (width * height) ** 2", "        total = ((width * height) ** 2", True),
    ("wrong_operator", "    if width > 0 and height >= 0:", "    if width > 0 and height => 0:", True),
    ("missing_colon", "    if width > 0 and height >= 0:", "    if width > 0 and height >= 0", True),
    ("wrong_indentation", "            print(item)", "        print(item)", True),  # expected an indented block
    ("wrong_indentation", "        return len(items)", "    return len(items)", True),  # return outside function
    ("wrong_indentation", "            print(item)", "                print(item)", False),  # a deeper block: legal
    ("wrong_indentation", "        return len(items)", "            return len(items)", False),  # into the loop
])
def test_filter_keeps_only_corruptions_that_break_compilation(tmp_path, kind, line, broken, kept):
    f = _file(tmp_path)
    reason = R._check(f, _line(line), broken, kind)
    assert (reason is None) is kept
    if not kept:
        assert reason == "corruption_compiles"


@pytest.mark.parametrize("kind", R.KINDS)
def test_each_kind_makes_a_pair_that_the_filter_judges(tmp_path, kind):
    f = _file(tmp_path)
    records, _ = R.file_pairs(tmp_path / "mod.py", "mod.py", R.RepairConfig(out="", kinds=(kind,), per_file=50))
    assert records, f"no {kind} pair from the sample file"
    for rec in records:
        assert rec["kind"] == kind and rec["broken"] != rec["completion"]
        assert rec["completion"] == LINES[rec["line"] - 1]
        assert rec["unit"].split("\n")[rec["unit_line"]] == rec["completion"]
        assert compiles(put_back(rec["unit"], rec["unit_line"], rec["completion"]))
        assert rec["prompt"].split("### Broken line\n")[1].split("\n")[0] == rec["broken"]
        if kind == "misspelled_name":  # compiles, but names nothing the file (or builtins) defines
            assert compiles(put_back(rec["unit"], rec["unit_line"], rec["broken"]))
            new = set(rec["broken"].replace("(", " ").replace(")", " ").replace(".", " ").split()) - f.names
            assert new and not any(n in dir(__builtins__) for n in new)
        else:
            assert not compiles(put_back(rec["unit"], rec["unit_line"], rec["broken"]))


def test_misspelled_name_skips_files_with_star_imports(tmp_path):
    f = _file(tmp_path, "from os import *\n" + SRC)
    assert R._corrupt(f, _line("        return os.path.join(str(total), \"x\")") + 1, "misspelled_name",
                      random.Random(0)) is None


def _corpus(tmp_path, n=8):
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    for i in range(n):
        (corpus / f"m{i}.py").write_text(SRC.replace("area", f"area{i}").replace("Box", f"Box{i}"))
    (corpus / "copy.py").write_text((corpus / "m0.py").read_text())  # the same content: the same side
    (corpus / "broken.py").write_text("def f(:\n    pass\n")  # the original must compile
    return corpus


def _read_jsonl(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_deterministic_and_split_by_file(tmp_path):
    corpus = _corpus(tmp_path)
    runs = [R.synthesize_repair(R.RepairConfig(out=str(tmp_path / name), corpus=str(corpus), heldout=0.5, seed=s),
                                progress=False, log=lambda m: None) for name, s in (("a", 0), ("b", 0), ("c", 1))]
    assert runs[0]["rejected"]["original_does_not_compile"] == 1
    a, b, c = ((tmp_path / n / "records.jsonl").read_text() + (tmp_path / n / "heldout.jsonl").read_text()
               for n in "abc")
    assert a == b and a != c
    train, held = _read_jsonl(tmp_path / "a" / "records.jsonl"), _read_jsonl(tmp_path / "a" / "heldout.jsonl")
    assert train and held and runs[0]["heldout"] == len(held)
    train_files, held_files = {r["source"] for r in train}, {r["source"] for r in held}
    assert not train_files & held_files
    assert {"m0.py", "copy.py"} <= train_files or {"m0.py", "copy.py"} <= held_files


def test_resumes_and_refuses_other_settings(tmp_path):
    corpus = _corpus(tmp_path)
    cfg = R.RepairConfig(out=str(tmp_path / "full"), corpus=str(corpus))
    R.synthesize_repair(cfg, progress=False, log=lambda m: None)
    part = tmp_path / "part"
    files = R.corpus_files(str(corpus))[1]
    cut = R.RepairConfig(out=str(part), corpus=str(corpus))
    R.synthesize_repair(cut, progress=False, log=lambda m: None)
    # an interruption after 3 files, with a torn extra line that the resumed run must drop
    report = json.loads((part / "report.json").read_text())
    (part / "report.json").unlink()
    kept = [R.file_pairs(p, p.relative_to(corpus).as_posix(), cut)[0] for p in files[:3]]
    n_train = sum(len(k) for k, p in zip(kept, files[:3], strict=True) if not R.is_heldout(p, cut.heldout, cut.seed))
    n_held = sum(len(k) for k in kept) - n_train
    lines = (part / "records.jsonl").read_text().splitlines()
    (part / "records.jsonl").write_text("\n".join(lines[:n_train] + ['{"torn'])  + "\n")
    held = (part / "heldout.jsonl").read_text().splitlines()
    (part / "heldout.jsonl").write_text("".join(x + "\n" for x in held[:n_held]))
    state = {"files_done": 3, "train": n_train, "heldout": n_held, "train_files": 0, "heldout_files": 0,
             "rejected": {}, "kinds": {}}
    (part / "progress.json").write_text(json.dumps({"settings": report["settings"], "state": state}))
    R.synthesize_repair(cut, progress=False, log=lambda m: None)
    for name in ("records.jsonl", "heldout.jsonl"):
        assert (part / name).read_text() == (tmp_path / "full" / name).read_text()
    with pytest.raises(FileExistsError):
        R.synthesize_repair(cut, progress=False, log=lambda m: None)
    (part / "report.json").unlink()
    (part / "progress.json").write_text(json.dumps({"settings": {"other": 1}, "state": state}))
    with pytest.raises(ValueError, match="other settings"):
        R.synthesize_repair(cut, progress=False, log=lambda m: None)


class Scripted:
    """An LM that answers each prompt from a table (a perfect answer, a wrong one)."""
    name = "scripted"
    tokenizer = None
    instruction_tuned = False

    def __init__(self, answers):
        self.answers = answers

    def generate(self, prompts, params):
        return [next(v for k, v in self.answers.items() if k in p) + "\n" for p in prompts]


def test_repair_metric_scores_a_perfect_and_a_wrong_prediction(tmp_path):
    f = _file(tmp_path)
    items = []
    for kind, line, broken in (("missing_colon", "        for item in items:", "        for item in items"),
                               ("drop_bracket", "            print(item)", "            print(item")):
        rec = R._record(f, _line(line), broken, kind, "mod.py", R.RepairConfig(out=""))
        items.append(rec)
    task = Task(name="repair", kind="repair", items=items, prompt="{prompt}", target_delimiter="", stop=["\n"])
    lm = Scripted({"for item in items\n### Fixed": "        for item in items:",  # perfect
                   "print(item\n### Fixed": "            print(item]"})  # wrong, does not compile
    result = evaluate(lm, task, progress=False, allow_unsandboxed=True)
    assert result.metrics["exact_fix"].value == 0.5 and result.metrics["compiles"].value == 0.5
    assert [r["exact_fix"] for r in result.records] == [True, False]
    assert result.details["exact_fix_by_kind"]["missing_colon"]["exact_fix"] == 1.0
    assert repair_line("Sure:\n```python\n    x = 1\n```", chat=True) == "    x = 1"


def test_cli_on_a_tiny_corpus_and_bad_input(tmp_path):
    corpus = _corpus(tmp_path, n=3)
    r = CliRunner().invoke(app, ["synth", "repair", "-o", str(tmp_path / "out"), "--corpus", str(corpus)])
    assert r.exit_code == 0, r.output
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    assert report["kept"] == report["train"] + report["heldout"] > 0
    task = load_task(str(tmp_path / "out" / "records.jsonl"))  # the records are a repair task as they are
    assert task.kind == "repair" and task.stop == ["\n"] and task.render(task.items[0]) == task.items[0]["prompt"]
    example = tmp_path / "examples" / "tasks"  # the example task file, where it expects the data
    example.mkdir(parents=True)
    (example / "repair.yaml").write_text((REPO / "examples" / "tasks" / "repair.yaml").read_text())
    (tmp_path / "out").rename(tmp_path / "repair-data")
    (tmp_path / "repair-data" / "heldout.jsonl").write_text((tmp_path / "repair-data" / "records.jsonl").read_text())
    yaml_task = load_task(str(example / "repair.yaml"))
    assert yaml_task.kind == "repair" and yaml_task.num_fewshot == 3 and yaml_task.fewshot_items
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({**task.items[0], "unit_line": 999, "_source": None}) + "\n")
    with pytest.raises(ValueError, match="bad.jsonl:1: `unit_line` must be the index"):
        load_task(str(bad))
    for args, message in ((["repair", "--corpus", str(tmp_path / "nope")], "corpus directory not found"),
                          (["repair", "--corpus", str(corpus), "--heldout", "1.5"], "held-out share"),
                          (["textbook"], "needs --teacher")):
        r = CliRunner().invoke(app, ["synth", *args, "-o", str(tmp_path / "bad")])
        assert r.exit_code == 2 and message in r.output and "Traceback" not in r.output, r.output


def test_a_kind_without_a_place_does_not_starve_the_others(tmp_path):
    text = "".join(f"class C{i}:\n    value = {i}\n\n\n" for i in range(20))  # no brackets, operators or reads
    (tmp_path / "tools.py").write_text(text)
    records, rejected = R.file_pairs(tmp_path / "tools.py", "tools.py", R.RepairConfig(out="", per_file=6))
    assert len(records) + sum(rejected.values()) == 6
    assert {r["kind"] for r in records} <= {"missing_colon", "wrong_indentation"}
