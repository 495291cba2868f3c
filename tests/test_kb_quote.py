"""Quoting the sources (kb/quote.py, `slm kb ask --answer quote|model+quote`): passages (sentences, code blocks
and grammar productions whole), the passage that answers chosen, citations only for the quoted chunks, the
model's answer followed by the quote, and the answer modes through evaluation and the command line."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

pytest.importorskip("apsw")
pytest.importorskip("sqlite_vec")

from test_kb import DOCS, ScriptedLM, WordEmbedder, _tiny_bert, open_words, write_docs  # noqa: E402

from slmkit.kb import quote  # noqa: E402
from slmkit.kb.ask import ABSTAIN, SOURCES_SAY, ask  # noqa: E402
from slmkit.kb.evaluate import evaluate_kb, read_questions  # noqa: E402
from slmkit.kb.index import index_kb  # noqa: E402

REFERENCE = """# The raise statement

   raise_stmt ::= "raise" [expression ["from" expression]]

If no expressions are present, "raise" re-raises the exception that is
currently being handled. If there is no active exception, a
"RuntimeError" is raised, e.g. inside a plain function. See the note [2] below.

The "from" clause is used for exception chaining, like so:

   >>> try:
   ...     print(1 / 0)
   ... except Exception as exc:
   ...     raise RuntimeError("bad") from exc

   for i in range(3):
       print(i)

A name must not collide with pre-
existing bindings.
"""


def test_passages_are_sentences_and_whole_code_blocks():
    found = quote.passages(REFERENCE)
    texts = [p.text for p in found]
    assert texts[0] == 'raise_stmt ::= "raise" [expression ["from" expression]]' and found[0].literal
    # sentences of prose, the heading dropped, "e.g." no sentence end, the source's footnote marker [2] gone
    assert texts[1] == 'If no expressions are present, "raise" re-raises the exception that is currently being handled.'
    assert texts[2] == 'If there is no active exception, a "RuntimeError" is raised, e.g. inside a plain function.'
    assert texts[3] == "See the note below."
    session = next(p for p in found if p.text.startswith(">>>"))
    assert session.literal and session.text.splitlines()[3] == '...     raise RuntimeError("bad") from exc'
    loop = next(p for p in found if p.text.startswith("for i"))
    assert loop.literal and loop.text == "for i in range(3):\n    print(i)"  # its own indentation kept
    assert texts[-1] == "A name must not collide with pre-existing bindings."  # cut at its hyphen, rejoined
    assert [p.position for p in found] == list(range(len(found)))


def test_select_quotes_the_passage_that_answers_with_its_neighbours_from_one_document():
    other = "Exceptions are raised by the interpreter. An exception can be handled."
    chosen = quote.select("What happens when raise runs with no active exception?", [other, REFERENCE],
                          sentences=1, context=1, documents=["execmodel.md", "raise.md"])
    assert [p.n for p in chosen] == [2, 2, 2]  # the best passage is in [2]; [1], another document, is left out
    text = quote.render(chosen)
    assert "RuntimeError" in text and text.endswith("[2]") and "[1]" not in text
    assert text.startswith("If no expressions are present")  # the sentence before it, as context
    assert quote.render(quote.select("RuntimeError", [REFERENCE], sentences=1, context=0)) == \
        'If there is no active exception, a "RuntimeError" is raised, e.g. inside a plain function. [1]'
    # a code block is quoted on lines of its own, its [n] after it; passages left out between are marked
    block = quote.render(quote.select("raise_stmt grammar", [REFERENCE], sentences=1, context=0))
    assert block == '    raise_stmt ::= "raise" [expression ["from" expression]]\n[1]'
    apart = quote.render([quote.passages(REFERENCE)[1], quote.passages(REFERENCE)[3]])
    assert apart == ('If no expressions are present, "raise" re-raises the exception that is currently being '
                     "handled. … See the note below. [1]")
    with pytest.raises(ValueError, match="budget is 0 sentences"):
        quote.select("x", [REFERENCE], sentences=0)


@pytest.fixture
def kb(tmp_path):
    index_kb([write_docs(tmp_path / "docs")], tmp_path / "kb", embedder_model=WordEmbedder(), embedder="words")
    kb = open_words(tmp_path / "kb")
    yield kb
    kb.close()


def test_ask_quote_needs_no_model_and_cites_only_what_it_quotes(kb):
    answer = ask(kb, "How do I descale the kettle?", None, k=3, min_similarity=0.1, answer="quote")
    assert not answer.abstained and answer.ttft_s is None and answer.quote == answer.text
    assert "Descale the kettle monthly with citric acid." in answer.text
    quoted = [int(n) for n in __import__("re").findall(r"\[(\d)\]", answer.text)]
    assert [c.n for c in answer.citations] == quoted  # each cited chunk is one the quote shows, in its order
    assert {Path(c.path).name for c in answer.citations} == {"kettle.md"}  # kept to the best passage's document
    assert len(answer.sources) == 3 and len(answer.citations) < 3
    assert ask(kb, "How do I descale the kettle?", k=3, min_similarity=0.1).text == answer.text  # no model: quote
    weak = ask(kb, "Which telescope sees quasars?", None, min_similarity=0.3, answer="quote")
    assert weak.abstained and weak.reason == "retrieval" and weak.quote == ""


def test_ask_model_then_quote_and_no_quote_when_the_model_declines(kb):
    lm = ScriptedLM("Monthly [2].")
    answer = ask(kb, "How do I descale the kettle?", lm, k=3, min_similarity=0.1, answer="model+quote")
    model_part, quoted = answer.text.split(f"\n\n{SOURCES_SAY}\n")
    assert model_part == "Monthly [2]." and quoted == answer.quote and "citric acid" in quoted
    # the model's [2] first, then the quoted chunks it did not cite
    assert answer.citations[0].n == 2 and len({c.n for c in answer.citations}) == len(answer.citations)
    assert {c.n for c in answer.citations} >= {int(quoted.rsplit("[", 1)[1].rstrip("]"))}
    declined = ask(kb, "How do I descale the kettle?", ScriptedLM(f"That is {ABSTAIN}."), min_similarity=0.1,
                   answer="model+quote")
    assert declined.abstained and declined.reason == "model" and SOURCES_SAY not in declined.text
    assert declined.citations == []


def test_answer_modes_refuse_bad_values(kb):
    with pytest.raises(ValueError, match="unknown answer mode 'cite'.*model, quote, model\\+quote"):
        ask(kb, "kettle?", None, answer="cite")
    with pytest.raises(ValueError, match="--answer model\\+quote needs a model"):
        ask(kb, "kettle?", None, answer="model+quote")
    with pytest.raises(ValueError, match="budget is 0 sentences"):
        ask(kb, "kettle?", None, answer="quote", quote_sentences=0)


def test_evaluate_quotes_without_a_model(kb, tmp_path):
    questions = tmp_path / "q.jsonl"
    questions.write_text("\n".join(json.dumps(q) for q in [
        {"id": "a", "question": "How do I descale the kettle?", "answer_keywords": ["citric acid"],
         "topics": ["kettle"], "answerable": True},
        {"id": "b", "question": "When do refunds reach my card?", "answer_keywords": ["five working days"],
         "topics": ["returns"], "answerable": True}]) + "\n")
    results = evaluate_kb(kb, read_questions(questions), None, k=3, min_similarity=0.1, answer="quote",
                          out=tmp_path / "out")
    assert results["answer_correct"] == 1.0 and results["citation_precision"] == 1.0
    assert results["settings"]["answer"] == "quote" and results["settings"]["quote_sentences"] == 3
    rows = [json.loads(x) for x in (tmp_path / "out" / "answers.jsonl").read_text().splitlines()]
    assert results["median_answer_chars"] == sorted(len(r["answer"]) for r in rows)[1]
    assert all(r["citations"] and r["citations"][0].startswith("[") for r in rows)
    retrieval = evaluate_kb(kb, read_questions(questions), None, min_similarity=0.1)  # the default: no answers
    assert retrieval["answer_correct"] is None and retrieval["settings"]["answer"] is None
    with pytest.raises(ValueError, match="needs a model"):
        evaluate_kb(kb, read_questions(questions), None, answer="model+quote")
    with pytest.raises(ValueError, match="mode none retrieves nothing to quote"):
        evaluate_kb(None, read_questions(questions), ScriptedLM("x"), mode="none", answer="quote")


def test_cli_ask_and_eval_quote_without_a_model(tmp_path):
    from typer.testing import CliRunner

    from slmkit.cli import app
    docs = write_docs(tmp_path / "docs")
    bert = _tiny_bert(tmp_path / "bert", list(DOCS.values()) + ["how descale the kettle"])
    kb_dir = tmp_path / "kb"
    run = CliRunner().invoke
    assert run(app, ["kb", "index", str(docs), "-o", str(kb_dir), "--embedder", str(bert)]).exit_code == 0
    r = run(app, ["kb", "ask", str(kb_dir), "How do I descale the kettle?", "--answer", "quote",
                  "--min-similarity", "-1", "--json"])
    assert r.exit_code == 0, r.output
    answer = json.loads(r.stdout)
    assert answer["quote"] == answer["text"] and answer["citations"] and answer["ttft_s"] is None
    r = run(app, ["kb", "ask", str(kb_dir), "How do I descale the kettle?",  # no --model: quotes
                  "--min-similarity", "-1", "--quote-sentences", "1"])
    assert r.exit_code == 0 and "kettle.md:" in r.stdout  # the answer, then its citations with path and lines
    questions = tmp_path / "q.jsonl"
    questions.write_text(json.dumps({"question": "How do I descale the kettle?", "answer_keywords": ["citric"],
                                     "topics": ["kettle"], "answerable": True}) + "\n")
    r = run(app, ["kb", "eval", str(kb_dir), "--questions", str(questions), "-o", str(tmp_path / "out"),
                  "--answer", "quote", "--min-similarity", "-1"])
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout)["settings"]["answer"] == "quote"
    r = run(app, ["kb", "ask", str(kb_dir), "kettle?", "--answer", "quote", "--quote-sentences", "0"])
    assert r.exit_code == 2 and r.output.strip().splitlines()[-1].startswith("error: ") and "at least 1" in r.output
