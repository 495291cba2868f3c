"""The knowledge base as an `slm eval` task (kind kb): the report card scores retrieval and answers exactly as
`slm kb eval` does."""

import json

import pytest
import yaml
from conftest import tiny_model_dir, translation_tokenizer
from test_kb import DOCS, _tiny_bert, write_docs

from slmkit.eval.harness import evaluate
from slmkit.eval.report import report_card
from slmkit.eval.tasks import load_task
from slmkit.kb.evaluate import evaluate_kb, read_questions
from slmkit.kb.index import index_kb, open_kb
from slmkit.lm.resolve import load_lm

QUESTIONS = [
    {"id": "q1", "question": "How do I descale the kettle?", "answer_keywords": ["citric"], "topics": ["kettle"],
     "answerable": True},
    {"id": "q2", "question": "When are refunds paid back?", "answer_keywords": ["five"], "topics": ["returns"],
     "answerable": True},
    {"id": "q3", "question": "Which telescope sees quasars?", "answer_keywords": [], "topics": [],
     "answerable": False},
]


@pytest.fixture
def kb_task(tmp_path):
    docs = write_docs(tmp_path / "docs", DOCS)
    bert = _tiny_bert(tmp_path / "bert", list(DOCS.values()) + [q["question"] for q in QUESTIONS])
    index_kb([docs], tmp_path / "kb", embedder=str(bert))
    (tmp_path / "q.jsonl").write_text("".join(json.dumps(q) + "\n" for q in QUESTIONS))
    (tmp_path / "task.yaml").write_text(yaml.safe_dump({"name": "kb-tiny", "kind": "kb", "data": "q.jsonl",
                                                        "kb": "kb", "retrieval": "bm25", "max_new_tokens": 4,
                                                        "min_similarity": -1.0}))
    return tmp_path


def test_kb_task_scores_as_slm_kb_eval(kb_task):
    task = load_task(kb_task / "task.yaml")
    assert task.kind == "kb" and task.main_metric == "answer_correct" and task.kb == str(kb_task / "kb")
    lm = load_lm(str(tiny_model_dir(kb_task / "lm", translation_tokenizer())), backend="torch")
    result = evaluate(lm, task, progress=False)
    direct = evaluate_kb(open_kb(kb_task / "kb"), read_questions(kb_task / "q.jsonl"), lm, mode="bm25", k=3,
                         min_similarity=-1.0, max_new_tokens=4)
    for name in ("hit_at_5", "mrr", "answer_correct", "abstain_recall", "false_abstain_rate"):
        assert result.metrics[name].value == pytest.approx(direct[name], abs=1e-4), name
    assert result.metrics["hit_at_5"].value == 1.0 and result.metrics["hit_at_5"].n == 2
    assert result.metrics["hit_at_5"].low is not None  # a share, with its interval
    assert [r["id"] for r in result.records] == ["q1", "q2", "q3"] and "total_s" in result.records[0]
    lm.close()


def test_kb_task_on_the_report_card(kb_task):
    model = str(tiny_model_dir(kb_task / "lm", translation_tokenizer()))
    results = report_card([model], [str(kb_task / "task.yaml")], kb_task / "report", backend="torch",
                          efficiency=False, log=lambda *_: None)
    [entry] = results["models"][0]["tasks"].values()
    assert entry["kind"] == "kb" and entry["main_metric"] == "answer_correct"
    assert entry["metrics"]["hit_at_5"]["value"] == 1.0 and "answer_correct" in entry["metrics"]
    assert "answer_correct" in (kb_task / "report" / "report.md").read_text()


def test_kb_task_errors(tmp_path):
    (tmp_path / "q.jsonl").write_text(json.dumps({"question": "x?", "answerable": True}) + "\n")
    (tmp_path / "t.yaml").write_text(yaml.safe_dump({"kind": "kb", "data": "q.jsonl", "kb": "kb"}))
    with pytest.raises(ValueError, match="q.jsonl:1: an answerable question needs its gold"):
        load_task(tmp_path / "t.yaml")
    (tmp_path / "t.yaml").write_text(yaml.safe_dump({"kind": "kb", "data": "q.jsonl"}))
    with pytest.raises(ValueError, match="a kb task needs `kb:`"):
        load_task(tmp_path / "t.yaml")
