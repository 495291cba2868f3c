"""The support evaluation as an `slm eval` task (kind support) on a tiny help center, and the reply mechanisms:
whole-article quotes, the retrievers' agreement in the confidence, the threshold sweep on wrong replies."""

import json

import pytest
import yaml
from conftest import tiny_model_dir, translation_tokenizer
from test_kb import ScriptedLM, WordEmbedder, _tiny_bert, open_words, write_docs
from test_support import HELP, Intents

from slmkit.eval import harness
from slmkit.eval.harness import evaluate
from slmkit.eval.report import report_card
from slmkit.eval.tasks import load_task
from slmkit.kb.index import index_kb, open_kb
from slmkit.kb.retrieve import Hit
from slmkit.lm.resolve import load_lm
from slmkit.support.assistant import MIN_CONFIDENCE, MIN_SIMILARITY, SupportAssistant, article_text, retrievers_agree
from slmkit.support.evaluate import auto_share_at_error, evaluate_support, leave_half_out, wrong_reply
from slmkit.support.task import _Tickets

MESSAGES = [
    {"id": "m1", "message": "How much is shipping to Norway?", "intent": "shipping",
     "answer_articles": ["shipping.md"], "answer_keywords": ["€19.95"], "escalate": False, "escalate_reason": ""},
    {"id": "m2", "message": "How do I descale the kettle?", "intent": "other", "answer_articles": ["kettle.md"],
     "answer_keywords": ["citric acid"], "escalate": False, "escalate_reason": ""},
    {"id": "m3", "message": "I want a real person now", "intent": "other", "answer_articles": [],
     "answer_keywords": [], "escalate": True, "escalate_reason": "asks_for_human"},
]


@pytest.fixture
def support_task(tmp_path):
    help_dir = write_docs(tmp_path / "help", HELP)
    bert = _tiny_bert(tmp_path / "bert", list(HELP.values()) + [m["message"] for m in MESSAGES])
    index_kb([help_dir], tmp_path / "kb", embedder=str(bert))
    (tmp_path / "m.jsonl").write_text("".join(json.dumps(m) + "\n" for m in MESSAGES))
    (tmp_path / "intents.json").write_text(json.dumps({"shipping": "shipping costs parcels", "other": "else"}))
    (tmp_path / "task.yaml").write_text(yaml.safe_dump({
        "name": "support-tiny", "kind": "support", "data": "m.jsonl", "kb": "kb", "intents": "intents.json",
        "retrieval": "bm25", "max_new_tokens": 4, "min_similarity": -1.0, "min_confidence": 0.0}))
    return tmp_path


def test_support_task_scores_as_slm_support_eval(support_task):
    task = load_task(support_task / "task.yaml")
    assert task.kind == "support" and task.main_metric == "wrong_reply_rate"
    assert task.intents == str(support_task / "intents.json")  # relative to the YAML file
    lm = load_lm(str(tiny_model_dir(support_task / "lm", translation_tokenizer())), backend="torch")
    result = evaluate(lm, task, progress=False)
    kb = open_kb(support_task / "kb")
    from slmkit.support.intents import load_intents
    direct = evaluate_support(SupportAssistant(kb, load_intents(support_task / "intents.json", kb.embedder),
                                               queue=_Tickets(), lm=lm, mode="bm25", min_similarity=-1.0,
                                               min_confidence=0.0, max_new_tokens=4), MESSAGES)
    for name in ("intent_accuracy", "handoff_precision", "handoff_recall", "auto_resolved", "wrong_reply_rate"):
        assert result.metrics[name].value == pytest.approx(direct[name], abs=1e-4), name
    assert result.metrics["handoff_recall"].value == 1.0 and result.metrics["auto_resolved"].n == 3
    assert result.metrics["wrong_reply_rate"].value == 0.0 and result.metrics["wrong_reply_rate"].n == 2
    assert result.details["recall_by_reason"] == {"asks_for_human": 1.0}
    assert [r["id"] for r in result.records] == ["m1", "m2", "m3"]
    kb.close()
    lm.close()


def test_support_task_on_the_report_card(support_task):
    model = str(tiny_model_dir(support_task / "lm", translation_tokenizer()))
    results = report_card([model], [str(support_task / "task.yaml")], support_task / "report", backend="torch",
                          efficiency=False, log=lambda *_: None)
    [entry] = results["models"][0]["tasks"].values()
    assert entry["kind"] == "support" and entry["main_metric"] == "wrong_reply_rate"
    assert {"intent_accuracy", "handoff_precision", "handoff_recall", "auto_resolved",
            "wrong_reply_rate"} <= set(entry["metrics"])
    report = (support_task / "report" / "report.md").read_text()
    assert "wrong_reply_rate" in report
    assert entry["settings"]["chat"] is True and "chat template" in report and "raw prompt" not in report


def test_support_task_errors(tmp_path, monkeypatch):
    (tmp_path / "m.jsonl").write_text(json.dumps({"message": "hi", "intent": "other"}) + "\n")
    (tmp_path / "t.yaml").write_text(yaml.safe_dump({"kind": "support", "data": "m.jsonl", "kb": "kb",
                                                     "intents": "i.json"}))
    with pytest.raises(ValueError, match="m.jsonl:1: missing field"):
        load_task(tmp_path / "t.yaml")
    (tmp_path / "m.jsonl").write_text(json.dumps(MESSAGES[0]) + "\n")
    (tmp_path / "t.yaml").write_text(yaml.safe_dump({"kind": "support", "data": "m.jsonl", "kb": "kb"}))
    with pytest.raises(ValueError, match="a support task needs `kb:`"):
        load_task(tmp_path / "t.yaml")
    (tmp_path / "t.yaml").write_text(yaml.safe_dump({"kind": "support", "data": "m.jsonl", "kb": "kb",
                                                     "intents": "i.json"}))
    task = load_task(tmp_path / "t.yaml")
    assert task.min_similarity == MIN_SIMILARITY  # the kind's default is the assistant's
    # the harness finds the kind through the "slmkit.task_kinds" entry point (the installed package's metadata)
    from slmkit.support.task import run_support
    monkeypatch.delitem(harness._RUNNERS, "support")
    harness._load_plugged("support")
    assert harness._RUNNERS["support"] is run_support
    monkeypatch.delitem(harness._RUNNERS, "support")  # and a kind nothing registers is a clear error
    monkeypatch.setattr(harness, "_load_plugged", lambda kind: None)
    with pytest.raises(ValueError, match="no runner for kind 'support'.*slmkit.task_kinds"):
        evaluate(ScriptedLM("x"), task, progress=False)


def _hit(path, bm25=None, dense=None):
    return Hit(0, path, "", 1, 1, "", 0.0, 0.5, bm25, dense)


def test_retrievers_agree_on_the_quoted_articles():
    hits = [_hit("a.md", bm25=1), _hit("b.md", dense=1), _hit("c.md")]
    assert retrievers_agree(hits, ["a.md", "b.md"]) and not retrievers_agree(hits, ["a.md"])
    assert not retrievers_agree([_hit("a.md", bm25=1)], ["a.md"])  # the embedder's best was not retrieved


def test_article_text_reads_an_article_whole():
    chunks = ["## Costs\n\nA parcel costs €5.\n\nOrders over €79 ship free.", "Orders over €79 ship free.\n\n"
              "| Zone | Price |\n|---|---|\n| Norway | €19.95 |\n"]
    assert article_text(chunks) == "A parcel costs €5. Orders over €79 ship free. Zone Norway, Price €19.95."


def test_quote_and_confidence(tmp_path):
    index_kb([write_docs(tmp_path / "help", HELP)], tmp_path / "kb", embedder_model=WordEmbedder(),
             embedder="words")
    kb = open_words(tmp_path / "kb")
    turn = SupportAssistant(kb, Intents(), min_similarity=0.0, min_confidence=0.0, quote_articles=1).handle(
        [{"role": "user", "content": "What does a used product refund?"}])
    # the whole best article, its table row as a sentence, although the message names neither "30 days" nor it
    assert turn.articles[0] == "returns.md" and "within 30 days" in turn.reply and "Used, Refund 80%" in turn.reply
    assert turn.reply.count("From our help center") == 1
    assert turn.agreement is True and turn.confidence == pytest.approx((turn.similarity + 1) / 2, abs=1e-3)
    two = SupportAssistant(kb, Intents(), min_similarity=0.0).handle([{"role": "user", "content": "refund"}])
    assert two.reply.count("From our help center") == 2
    short = SupportAssistant(kb, Intents(), min_similarity=0.0, min_confidence=0.0, quote_articles=1,
                             quote_sentences=1).handle([{"role": "user", "content": "What does a used refund?"}])
    assert short.reply == "From our help center (Returns): Case Used, Refund 80%."  # the nearest sentence only
    # re-indexed under the assistant (new chunk ids): the article is read again, not quoted empty
    index_kb([write_docs(tmp_path / "help", {**HELP, "returns.md": HELP["returns.md"] + "\nNew: 14 days.\n"})],
             tmp_path / "kb", embedder_model=WordEmbedder(), embedder="words")
    again = SupportAssistant(kb, Intents(), min_similarity=0.0, min_confidence=0.0, quote_articles=1)
    again._articles = {str(tmp_path / "help" / "returns.md"): [10_000]}  # what an old index said
    assert "14 days" in again.handle([{"role": "user", "content": "What does a used product refund?"}]).reply
    # a reranker reorders what is quoted; one retriever only: the confidence is the similarity
    message = [{"role": "user", "content": "What does a used product refund?"}]
    last_first = SupportAssistant(kb, Intents(), min_similarity=0.0, min_confidence=0.0, quote_articles=1,
                                  rerank=lambda q, hits: hits[::-1])
    assert last_first.handle(message).articles[0] != "returns.md"
    turn = SupportAssistant(kb, Intents(), min_similarity=0.0, min_confidence=0.0, mode="dense").handle(message)
    assert turn.agreement is None and turn.confidence == turn.similarity
    with pytest.raises(ValueError, match="it must be at least 1"):
        SupportAssistant(kb, Intents(), quote_articles=0)
    kb.close()


def test_the_sweep_on_wrong_replies():
    def rec(conf, esc, kw):
        return {"rule": False, "confidence": conf, "gold_escalate": esc, "keywords": 1, "all_keywords": kw}
    records = [rec(0.9, True, True), rec(0.8, False, True), rec(0.7, False, False)]
    # the escalated message answered right counts as an error only for the default error
    assert auto_share_at_error(records, 0.05)["auto_resolved"] == 0.0
    assert auto_share_at_error(records, 0.05, wrong_reply) == {"auto_resolved": round(2 / 3, 4), "threshold": 0.8,
                                                               "error_rate": 0.0}


def test_leave_half_out():
    def rec(conf, kw, esc=False, handoff=False, reason=""):
        return {"confidence": conf, "keywords": 1, "all_keywords": kw, "gold_escalate": esc, "handoff": handoff,
                "reason": reason}
    # right replies are the confident ones: any threshold chosen on one half keeps the other half right
    clean = [rec(0.9 - i / 100, True) for i in range(10)] + [rec(0.1 + i / 100, False) for i in range(10)]
    clean += [rec(0.0, True, esc=True, handoff=True, reason="safety")] * 2  # the rules' hand-offs stay
    out = leave_half_out(clean, 0.05, rounds=20)
    assert out["wrong_reply_rate"] == 0.0 and out["halves_within"] == 1.0 and out["handoff_recall"] == 1.0
    assert 0.2 < out["auto_resolved"] <= 10 / 22
    # confidence says nothing: a threshold tuned on one half is no promise for the other
    noisy = [rec(i / 20, i % 3 != 0) for i in range(20)]
    assert leave_half_out(noisy, 0.05, rounds=20)["halves_within"] < 1.0
    assert leave_half_out(noisy[:3], 0.05) is None


def test_cli_defaults_are_the_assistants():
    import typer.main

    from slmkit.cli import app
    for name in ("reply", "chat", "eval"):
        params = {p.name: p.default for p in typer.main.get_command(app).commands["support"].commands[name].params}
        assert (params["min_confidence"], params["min_similarity"], params["quote_articles"]) == \
            (MIN_CONFIDENCE, MIN_SIMILARITY, 2), name
