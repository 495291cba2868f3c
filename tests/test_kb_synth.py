"""`slm kb synth` (slmkit.kb.synth): RAFT records from a tiny knowledge base, with a scripted teacher (so the
records' structure can be asserted) and a tiny random model (the CLI end to end, where the filters reject)."""

from __future__ import annotations

import json
import re

import pytest

pytest.importorskip("apsw")
pytest.importorskip("sqlite_vec")

from test_kb import WordEmbedder, write_docs  # noqa: E402

from slmkit.kb.ask import ABSTAIN, SYSTEM, build_messages  # noqa: E402
from slmkit.kb.index import index_kb, open_kb  # noqa: E402
from slmkit.kb.synth import answer_problem, clean_question, extractive_answer, kb_synth, question_problem  # noqa: E402

BODIES = {
    "kettle": "boils one litre in three minutes and draws 2000 watts; descale it monthly with citric acid, then "
              "rinse twice before brewing tea again.",
    "toaster": "browns two slices of bread evenly at 800 watts, has a crumb tray that slides out, and a defrost "
               "button for frozen bagels.",
    "blender": "crushes ice with stainless blades spinning at 1200 watts; the glass jug is dishwasher safe and holds "
               "enough soup for six people.",
    "fridge": "keeps vegetables crisp in humid drawers, uses about 150 watts on average, and beeps when somebody "
              "leaves its door open overnight.",
    "oven": "roasts chicken with a convection fan at 3000 watts, self-cleans through pyrolysis, and locks its door "
            "while hot for children's safety.",
    "mixer": "kneads heavy dough with a planetary hook at 600 watts; attachments include whisks, paddles and a "
             "pasta roller sold separately.",
    "grill": "sears steaks on ridged cast plates heated by 1800 watts, drains fat into a removable cup, and folds "
             "flat for storage in cupboards.",
    "juicer": "presses oranges and carrots slowly at 150 watts to keep vitamins, separating pulp into a bin that "
              "empties under running water.",
}
TOPICS = list(BODIES)
DOCS = {f"{t}.md": f"# {t.title()}\n\nThe {t} {body}\n" for t, body in BODIES.items()}


class ScriptedTeacher:
    """Asks about the first topic word of the passage it is shown; `fail_after` raises to simulate a crash."""
    name = "scripted-teacher"
    tokenizer = None

    def __init__(self, reply=None, fail_after=None):
        self.reply, self.fail_after, self.calls = reply, fail_after, 0

    def sampling_params(self, **given):
        return given

    def generate(self, prompts, params):
        self.calls += 1
        if self.fail_after is not None and self.calls > self.fail_after:
            raise KeyboardInterrupt
        if self.reply is not None:
            return [self.reply]
        topic = next(t for t in TOPICS if t in prompts[0].lower())
        asks = ["How many watts does the {} use?", "What does the {} do?", "How do I clean the {}?",
                "What is special about the {}?", "Which parts does the {} have?"]
        return [f"Question: {asks[params['seed'] % len(asks)].format(topic)}\nSome more text."]


@pytest.fixture
def kb(tmp_path):
    index_kb([write_docs(tmp_path / "docs", DOCS)], tmp_path / "kb", embedder_model=WordEmbedder(), embedder="words")
    return tmp_path / "kb"


def synth(kb, out, **kw):
    kw.setdefault("lm", ScriptedTeacher())
    return kb_synth(kb, out, embedder=WordEmbedder(), progress=False, log=lambda *_: None, **kw)


def test_records_are_the_ask_prompt_with_gold_among_distractors(kb, tmp_path):
    out = tmp_path / "r.jsonl"
    report = synth(kb, out, n=40, distractors=2, p_no_gold=0.25, seed=3)
    records = [json.loads(line) for line in out.read_text().splitlines()]
    assert report["kept"] == len(records) and report["tried"] == 40
    assert report["kept"] + sum(report["rejected"].values()) == 40
    assert json.loads(out.with_suffix(".report.json").read_text())["kept"] == len(records)
    with_gold = [r for r in records if r["gold"] is not None]
    no_gold = [r for r in records if r["gold"] is None]
    assert 0.1 <= len(no_gold) / len(records) <= 0.45  # p_no_gold 0.25 of 40 draws
    assert {r["gold"] for r in with_gold} == {1, 2, 3}  # the gold chunk moves
    kb_open = open_kb(kb, embedder=WordEmbedder())
    try:
        for r in records:
            system, user, assistant = r["messages"]
            assert system == {"role": "system", "content": SYSTEM}
            sources = re.findall(r"^\[(\d)\] ", user["content"], flags=re.M)
            assert sources == ["1", "2", "3"]  # distractors + gold, or distractors + 1 without the gold
            topic = next(t for t in TOPICS if f"the {t}" in r["question"])
            # the prompt is build_messages' own: rebuild it from the chunks named in `sources`
            blocks = re.split(r"^\[\d\] ", user["content"].split("\n\nQuestion: ")[0], flags=re.M)[1:]
            assert len(blocks) == 3 and user["content"].endswith(f"Question: {r['question']}")
            gold_blocks = [i + 1 for i, b in enumerate(blocks) if b.startswith(topic.title())]
            if r["gold"] is None:
                assert assistant["content"] == ABSTAIN and gold_blocks == []
            else:
                assert gold_blocks == [r["gold"]]  # exactly one gold chunk, where the record says
                assert assistant["content"].endswith(f"[{r['gold']}]")
                assert f"The {topic} " in assistant["content"]  # the extractive answer quotes the gold sentence
                assert r["gold_chunk"]["path"].endswith(f"{topic}.md")
            # the distractors are retrieved near misses: other appliances' chunks, never the gold's document
            assert all(not b.startswith(topic.title()) for i, b in enumerate(blocks) if i + 1 != r["gold"])
            # and it is build_messages' own rendering of those chunks
            assert r["messages"][:2] == build_messages(r["question"], _hits(kb_open, r["sources"]))
    finally:
        kb_open.close()


def _hits(kb, sources):
    from slmkit.kb.synth import _hit
    chunks = kb.store.get_chunks(kb.store.chunk_ids())
    by_name = {f"{c.path.rsplit('/', 1)[-1]}:{c.chunk.start_line}-{c.chunk.end_line}": c for c in chunks}
    return [_hit(by_name[s]) for s in sources]


def test_filters():
    chunk = "The kettle uses 12 watts of power. Clean it weekly."
    assert clean_question("Q1: How many watts does the kettle use? Because.\nmore") == \
        "How many watts does the kettle use?"
    assert clean_question("1. What does the kettle do?") == "What does the kettle do?"
    assert question_problem("How many watts does the kettle use?", chunk) is None
    assert question_problem("", chunk) == "question_empty"
    assert question_problem("The kettle uses power", chunk) == "question_not_a_question"
    assert question_problem("Why?", chunk) == "question_too_short"
    assert question_problem("What is the capital of France?", chunk) == "question_not_from_chunk"
    assert question_problem("What does the passage say about the kettle?", chunk) == "question_about_the_passage"
    assert question_problem("The kettle uses 12 watts of power?", chunk) == "question_copies_chunk"
    q = "How many watts does the kettle use?"
    assert answer_problem("It uses 12 watts [1].", q, chunk) is None
    assert answer_problem(" [1] ", q, chunk) == "answer_empty"
    assert answer_problem(f"{q} The answer is", q, chunk) == "answer_copies_prompt"
    assert answer_problem(SYSTEM, q, chunk) == "answer_copies_prompt"
    assert answer_problem("Paris is in France.", q, chunk) == "answer_not_from_chunk"
    assert extractive_answer(q, chunk, 2) == "The kettle uses 12 watts of power. [2]"


def test_bad_teacher_output_is_rejected_and_counted(kb, tmp_path):
    report = synth(kb, tmp_path / "a.jsonl", n=6, lm=ScriptedTeacher("What is the capital of France?"))
    assert report["kept"] == 0 and report["rejected"] == {"question_not_from_chunk": 6}
    assert (tmp_path / "a.jsonl").read_text() == ""
    # teacher answers: one that repeats the question copies the prompt
    report = synth(kb, tmp_path / "b.jsonl", n=6, p_no_gold=0.0, answer="teacher",
                   lm=ScriptedTeacher("How many watts does the kettle use?"))
    assert report["rejected"].get("answer_copies_prompt", 0) >= 1
    # the same question from one chunk twice: the second is a duplicate
    report = synth(kb, tmp_path / "c.jsonl", n=4, p_no_gold=0.0, lm=ScriptedTeacher("How many watts does it use?"))
    assert report["kept"] == 1 and report["rejected"] == {"duplicate_question": 3}


def test_resume_gives_what_one_run_gives(kb, tmp_path):
    whole = tmp_path / "whole.jsonl"
    synth(kb, whole, n=12, seed=1)
    part = tmp_path / "part.jsonl"
    with pytest.raises(KeyboardInterrupt):
        synth(kb, part, n=12, seed=1, lm=ScriptedTeacher(fail_after=7), save_every=5)
    assert not part.exists() and (tmp_path / "part.jsonl.progress").exists()  # nothing half-written
    teacher = ScriptedTeacher()
    synth(kb, part, n=12, seed=1, lm=teacher, save_every=5)
    assert teacher.calls == 7  # chunks 5..11: the first 5 were saved
    assert part.read_text() == whole.read_text()
    assert not (tmp_path / "part.jsonl.progress").exists()
    # a resumed run may stop early: --n at or below what is done writes the first n items' records
    short = tmp_path / "short.jsonl"
    with pytest.raises(KeyboardInterrupt):
        synth(kb, short, n=12, seed=1, lm=ScriptedTeacher(fail_after=11), save_every=5)
    report = synth(kb, short, n=6, seed=1, lm=ScriptedTeacher(fail_after=0), save_every=5)  # no teacher call
    first = [json.loads(line) for line in whole.read_text().splitlines()]
    assert [json.loads(line) for line in short.read_text().splitlines()] == [r for r in first if r["item"] < 6]
    assert report["tried"] == 6


@pytest.mark.parametrize("kw, message", [
    ({"n": 0}, "--n must be > 0, not 0"),
    ({"p_no_gold": 1.5}, "--p-no-gold must be between 0 and 1"),
    ({"distractors": 0, "p_no_gold": 0.2}, "--p-no-gold needs --distractors >= 1"),
    ({"answer": "abstractive"}, "unknown --answer 'abstractive'"),
])
def test_bad_settings(kb, tmp_path, kw, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        synth(kb, tmp_path / "r.jsonl", **kw)


def test_cli_with_a_tiny_random_teacher(kb, tmp_path):
    from conftest import tiny_model_dir, translation_tokenizer
    from typer.testing import CliRunner

    from slmkit.cli import app
    model = tiny_model_dir(tmp_path / "lm", translation_tokenizer())
    # the KB's embedder is the test's word hasher, which load_embedder cannot open: re-index with a tiny BERT
    from test_kb import _tiny_bert
    bert = _tiny_bert(tmp_path / "bert", list(DOCS.values()))
    index_kb([tmp_path / "docs"], tmp_path / "kb2", embedder=str(bert))
    run = CliRunner().invoke
    out = tmp_path / "r.jsonl"
    r = run(app, ["kb", "synth", str(tmp_path / "kb2"), "-o", str(out), "--teacher", str(model), "--backend", "torch",
                  "--n", "3", "--max-new-tokens", "8"])
    assert r.exit_code == 0, r.output
    report = json.loads(out.with_suffix(".report.json").read_text())
    assert report["tried"] == 3 and report["kept"] + sum(report["rejected"].values()) == 3
    assert len(out.read_text().splitlines()) == report["kept"]
    r = run(app, ["kb", "synth", str(tmp_path / "kb2"), "-o", str(out), "--teacher", str(model)])
    assert r.exit_code == 2 and "exists; choose another -o" in r.output
    r = run(app, ["kb", "synth", str(tmp_path / "kb2"), "-o", str(tmp_path / "x.txt"), "--teacher", str(model)])
    assert r.exit_code == 2 and "must end in .jsonl" in r.output
    r = run(app, ["kb", "synth", str(tmp_path / "nokb"), "-o", str(tmp_path / "y.jsonl"), "--teacher", str(model)])
    assert r.exit_code == 2 and "no knowledge base here" in r.output
