"""The knowledge base (slmkit.kb, `slm kb`): chunking, the store, incremental indexing, hybrid retrieval,
citations, abstention and the evaluation numbers, on a few tiny documents with tiny embedders and models."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("apsw")
pytest.importorskip("sqlite_vec")

from slmkit.kb.ask import ABSTAIN, ask, parse_citations  # noqa: E402
from slmkit.kb.chunk import chunk_blocks  # noqa: E402
from slmkit.kb.evaluate import evaluate_kb, read_questions, score  # noqa: E402
from slmkit.kb.index import index_kb, open_kb  # noqa: E402
from slmkit.kb.retrieve import rrf, search  # noqa: E402
from slmkit.kb.sources import markdown_blocks, read_blocks, rst_titles_to_markdown  # noqa: E402
from slmkit.kb.store import fts_query  # noqa: E402


class WordEmbedder:
    """Bag of words hashed into 512 dimensions, L2-normalised: cosine similarity = shared words, so the tests can
    say which chunk is nearest (a random tiny BERT could not)."""

    def embed(self, texts):
        import torch
        out = np.zeros((len(texts), 512), dtype=np.float32)
        for i, t in enumerate(texts):
            for w in re.findall(r"[a-z]+", t.lower()):
                out[i, sum(map(ord, w)) % 512] += 1
        out /= np.maximum(np.linalg.norm(out, axis=1, keepdims=True), 1e-9)
        return torch.from_numpy(out)


class ScriptedLM:
    """An LM that answers with a fixed text (the interface `ask` uses: sampling_params + stream_chat)."""
    name = "scripted"

    def __init__(self, reply):
        self.reply = reply
        self.prompts = []

    def sampling_params(self, **given):
        return given

    def stream_chat(self, messages, params):
        self.prompts.append(messages)
        yield from self.reply.split(" ")[:1] + [" " + w for w in self.reply.split(" ")[1:]]


DOCS = {
    "kettle.md": "# Kettle\n\nThe KT-1 kettle boils one litre in three minutes.\n\n## Descaling\n\n"
                 "Descale the kettle monthly with citric acid.\nRinse it twice afterwards.\n",
    "returns.md": "# Returns\n\nYou can return any product within 30 days for a full refund.\n\n"
                  "## Refunds\n\nRefunds reach your card within five working days.\n",
    "notes.txt": "Opening hours are nine to five on weekdays.\n\nThe shop is closed on Sundays.\n",
}


def write_docs(root: Path, docs=DOCS) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    for name, text in docs.items():
        (root / name).write_text(text, encoding="utf-8")
    return root


@pytest.fixture
def kb_dir(tmp_path):
    index_kb([write_docs(tmp_path / "docs")], tmp_path / "kb", embedder_model=WordEmbedder(), embedder="words")
    return tmp_path / "kb"


def open_words(kb_dir):
    return open_kb(kb_dir, embedder=WordEmbedder())


# ---- reading and chunking -------------------------------------------------------------------------------

def test_chunks_keep_heading_path_and_line_span():
    text = ("# Guide\n\nIntro line.\n\n## Setup\n\nStep one.\nStep two.\n\n```\n# not a heading\n```\n\n"
            "### Deep\n\nEnd.\n")
    chunks = chunk_blocks(markdown_blocks(text))
    assert [(c.heading, c.start_line, c.end_line) for c in chunks] == [
        ("Guide", 3, 3), ("Guide > Setup", 7, 12), ("Guide > Setup > Deep", 16, 16)]
    assert "# not a heading" in chunks[1].text
    lines = text.splitlines()
    assert chunks[1].text.splitlines()[0] == lines[6] and lines[11] == "```"


def test_long_sections_split_with_overlap_and_never_cross_headings():
    paras = [f"Paragraph {i} " + "word " * 20 for i in range(12)]
    text = "# A\n\n" + "\n\n".join(paras) + "\n\n# B\n\nShort.\n"
    chunks = chunk_blocks(markdown_blocks(text), max_chars=300, overlap=120)
    a = [c for c in chunks if c.heading == "A"]
    assert len(a) > 2 and all(len(c.text) <= 300 for c in a)
    for prev, nxt in zip(a, a[1:], strict=False):  # each chunk starts with the previous one's last paragraph
        assert nxt.text.split("\n\n")[0].strip() == prev.text.split("\n\n")[-1].strip()
        assert nxt.start_line <= prev.end_line
    assert chunks[-1].heading == "B" and chunks[-1].text == "Short."
    with pytest.raises(ValueError, match="overlap"):
        chunk_blocks(markdown_blocks(text), max_chars=300, overlap=300)


def test_html_jsonl_and_pydoc_titles(tmp_path):
    html = tmp_path / "page.html"
    html.write_text("<html><head><title>x</title><style>p{}</style></head><body>\n<h1>Warranty</h1>\n"
                    "<p>Two years on\nevery machine.</p>\n<script>var a;</script>\n<h2>Repairs</h2>\n<p>Send it in.</p>"
                    "\n</body></html>\n")
    chunks = chunk_blocks(read_blocks(html))
    assert [(c.heading, c.start_line, c.text) for c in chunks] == [
        ("Warranty", 3, "Two years on every machine."), ("Warranty > Repairs", 7, "Send it in.")]
    records = tmp_path / "faq.jsonl"
    records.write_text(json.dumps({"title": "Gift cards", "text": "Valid for two years."}) + "\n\n"
                       + json.dumps({"text": "No title here."}) + "\n")
    assert [(c.heading, c.start_line) for c in chunk_blocks(read_blocks(records))] == [("Gift cards", 1), ("", 3)]
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"body": 3}\n')
    with pytest.raises(ValueError, match=r"bad.jsonl:1: no text field"):
        read_blocks(bad)
    assert rst_titles_to_markdown('The "raise" statement\n*********************\n\nText.\n\nSub\n===\n') == \
        '# The "raise" statement\n\n\nText.\n\n## Sub\n\n'


def test_pdf(tmp_path):
    pypdf = pytest.importorskip("pypdf")
    writer = pypdf.PdfWriter()
    writer.add_blank_page(width=200, height=200)
    path = tmp_path / "blank.pdf"
    with open(path, "wb") as f:
        writer.write(f)
    assert [b.text for b in read_blocks(path)] == ["page 1"]  # a page with no text: only its heading
    (tmp_path / "broken.pdf").write_bytes(b"%PDF-1.4 not really")
    with pytest.raises(ValueError, match="broken.pdf: not a readable PDF"):
        read_blocks(tmp_path / "broken.pdf")


# ---- the store and incremental indexing -------------------------------------------------------------------

def test_index_is_incremental(tmp_path):
    docs = write_docs(tmp_path / "docs")
    kb = tmp_path / "kb"
    first = index_kb([docs], kb, embedder_model=WordEmbedder(), embedder="words")
    assert (first["added"], first["documents"], first["chunks"]) == (3, 3, 5)
    again = index_kb([docs], kb, embedder_model=WordEmbedder())
    assert (again["unchanged"], again["chunks_written"]) == (3, 0)
    (docs / "kettle.md").write_text("# Kettle\n\nThe KT-2 kettle is new.\n")
    (docs / "notes.txt").unlink()
    (docs / "extra.md").write_text("# Extra\n\nGift cards never expire.\n")
    third = index_kb([docs], kb, embedder_model=WordEmbedder())
    assert {k: third[k] for k in ("added", "updated", "removed", "unchanged", "chunks_written", "documents")} == \
        {"added": 1, "updated": 1, "removed": 1, "unchanged": 1, "chunks_written": 2, "documents": 3}
    opened = open_words(kb)
    paths = {Path(p).name for p in opened.store.documents()}
    assert paths == {"kettle.md", "returns.md", "extra.md"}
    texts = [h.text for h in search(opened, "kettle", k=10)]
    assert "The KT-2 kettle is new." in texts and not any("KT-1" in t for t in texts)
    assert not search(opened, "opening hours weekdays Sundays", k=10, mode="bm25")  # notes.txt is gone
    assert opened.store.get_meta()["embedder"] == "words"
    opened.close()


def test_store_contract(kb_dir):
    """What a server store replacing SQLiteStore must do (the Store protocol in kb/store.py)."""
    kb = open_words(kb_dir)
    store = kb.store
    assert len(store.documents()) == 3 and all(len(sha) == 64 for sha in store.documents().values())
    hits = store.keyword_search("refund card", 10)
    assert hits and all(a[1] >= b[1] for a, b in zip(hits, hits[1:], strict=False))
    best = store.get_chunks([hits[0][0]])[0]
    assert Path(best.path).name == "returns.md"
    vec = kb.embed([best.chunk.indexed_text()])[0]
    top_id, top_sim = store.vector_search(vec, 3)[0]
    assert top_id == best.id and top_sim == pytest.approx(1.0, abs=1e-5)
    assert store.similarities(vec, [best.id])[best.id] == pytest.approx(1.0, abs=1e-5)
    assert store.keyword_search("the of and", 5) == []  # stop words only: no FTS5 query at all
    assert fts_query('what is "NOT" OR near(x)?') == '"near" OR "x"'
    kb.close()


def test_store_refuses_a_foreign_file(tmp_path):
    (tmp_path / "kb").mkdir()
    (tmp_path / "kb" / "kb.sqlite").write_text("hello")
    with pytest.raises(ValueError, match="not a knowledge base"):
        open_kb(tmp_path / "kb")
    with pytest.raises(FileNotFoundError, match="slm kb index"):
        open_kb(tmp_path / "nothing")


# ---- retrieval ----------------------------------------------------------------------------------------------

def test_rrf_and_hybrid_search(kb_dir):
    assert rrf([[1, 2, 3], [3, 1]], k=60) == pytest.approx({1: 1 / 61 + 1 / 62, 2: 1 / 62, 3: 1 / 63 + 1 / 61})
    kb = open_words(kb_dir)
    hits = search(kb, "How do I descale the kettle?", k=3)
    assert hits[0].heading == "Kettle > Descaling" and hits[0].lines == "7-8"
    assert hits[0].bm25_rank == 1 and hits[0].dense_rank is not None
    # the fused score is exactly the sum of the reciprocal ranks in the two lists
    assert hits[0].score == pytest.approx(1 / 61 + 1 / (60 + hits[0].dense_rank))
    assert [h.id for h in search(kb, "descale kettle", k=2, mode="bm25")][0] == hits[0].id
    with pytest.raises(ValueError, match="unknown retrieval mode 'fuzzy'"):
        search(kb, "x", mode="fuzzy")
    reversed_ = search(kb, "How do I descale the kettle?", k=3, rerank=lambda q, hs: hs[::-1])
    assert reversed_[0].id != hits[0].id  # the reranker saw the candidates and reordered them
    kb.close()


# ---- answering ----------------------------------------------------------------------------------------------

def test_ask_cites_sources_by_path_and_lines(kb_dir):
    kb = open_words(kb_dir)
    lm = ScriptedLM("Descale it monthly with citric acid [1], see also [7].")
    answer = ask(kb, "How do I descale the kettle?", lm, k=2, min_similarity=0.1)
    assert not answer.abstained
    assert [(c.n, Path(c.path).name, c.lines, c.heading) for c in answer.citations] == \
        [(1, "kettle.md", "7-8", "Kettle > Descaling")]  # [7] names no shown source: dropped
    prompt = lm.prompts[0][-1]["content"]
    assert "[1] Kettle > Descaling\nDescale the kettle monthly" in prompt and "Question: How do I descale" in prompt
    assert [c.n for c in parse_citations("a [2, 1] b [1]", answer.sources)] == [2, 1]
    kb.close()


def test_ask_abstains_on_weak_retrieval_or_a_declining_model(kb_dir):
    kb = open_words(kb_dir)
    lm = ScriptedLM("It is blue [1].")
    weak = ask(kb, "Which telescope sees quasars?", lm, min_similarity=0.3)
    assert weak.abstained and weak.reason == "retrieval" and ABSTAIN in weak.text and not lm.prompts
    declined = ask(kb, "How do I descale the kettle?", ScriptedLM(f"Sorry, this is {ABSTAIN}."), min_similarity=0.1)
    assert declined.abstained and declined.reason == "model" and declined.citations == []
    kb.close()


# ---- evaluation -------------------------------------------------------------------------------------------------

def test_metrics_on_a_hand_made_case():
    records = [  # two answerable (gold at rank 2; no gold), two unanswerable (one declined)
        {"answerable": True, "gold_ranks": [2, 4], "abstained": False, "correct": True,
         "citations_gold": [True, False]},
        {"answerable": True, "gold_ranks": [], "abstained": True, "correct": False, "citations_gold": []},
        {"answerable": False, "gold_ranks": [], "abstained": True, "correct": None, "citations_gold": []},
        {"answerable": False, "gold_ranks": [], "abstained": False, "correct": None, "citations_gold": [False]},
    ]
    assert score(records) == {"hit_at_5": 0.5, "mrr": 0.25, "answer_correct": 0.5, "citation_precision": 0.3333,
                              "abstain_recall": 0.5, "false_abstain_rate": 0.5}


def test_evaluate_kb_end_to_end(kb_dir, tmp_path):
    questions = tmp_path / "q.jsonl"
    questions.write_text("\n".join(json.dumps(q) for q in [
        {"id": "a", "question": "How do I descale the kettle?", "answer_keywords": ["citric ACID"],
         "topics": ["kettle"], "answerable": True},
        {"id": "b", "question": "When do refunds reach my card?", "answer_keywords": ["five working days"],
         "topics": ["returns"], "answerable": True},
        {"id": "c", "question": "Which telescope sees quasars?", "answer_keywords": [], "topics": [],
         "answerable": False}]) + "\n")
    kb = open_words(kb_dir)
    lm = ScriptedLM("Use citric   acid [1].")
    results = evaluate_kb(kb, read_questions(questions), lm, k=2, min_similarity=0.3, out=tmp_path / "out")
    assert {k: results[k] for k in ("hit_at_5", "answer_correct", "citation_precision", "abstain_recall",
                                    "false_abstain_rate")} == \
        {"hit_at_5": 1.0, "answer_correct": 0.5, "citation_precision": 1.0, "abstain_recall": 1.0,
         "false_abstain_rate": 0.0}
    written = json.loads((tmp_path / "out" / "results.json").read_text())
    assert list(written)[:6] == ["hit_at_5", "mrr", "answer_correct", "citation_precision", "abstain_recall",
                                 "false_abstain_rate"]
    rows = [json.loads(x) for x in (tmp_path / "out" / "answers.jsonl").read_text().splitlines()]
    assert [r["id"] for r in rows] == ["a", "b", "c"] and rows[2]["abstained"]
    retrieval = evaluate_kb(kb, read_questions(questions), None, mode="bm25", min_similarity=0.3)
    assert retrieval["answer_correct"] is None and retrieval["hit_at_5"] == 1.0 and retrieval["abstain_recall"] == 1.0
    closed = evaluate_kb(None, read_questions(questions), ScriptedLM("No idea."), mode="none")
    assert closed["hit_at_5"] is None and closed["answer_correct"] == 0.0
    kb.close()


def test_question_file_errors(tmp_path):
    bad = tmp_path / "q.jsonl"
    bad.write_text('{"question": "x?", "answerable": true}\n')
    with pytest.raises(ValueError, match=r"q.jsonl:1: an answerable question needs its gold \"topics\""):
        read_questions(bad)
    bad.write_text('{"id": 1}\n')
    with pytest.raises(ValueError, match=r"q.jsonl:1: no \"question\""):
        read_questions(bad)


# ---- the commands ---------------------------------------------------------------------------------------------

def _tiny_bert(path: Path, texts: list[str]) -> Path:
    from conftest import write_wordpiece

    from slmkit.formats.encoder_dir import save_encoder_dir
    from slmkit.model.encoder import Encoder, EncoderConfig
    from slmkit.tokenizer import load_tokenizer
    words = sorted({w for t in texts for w in re.findall(r"[a-z0-9]+", t.lower())})
    vocab = {t: i for i, t in enumerate(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *words])}
    write_wordpiece(path, vocab, pair=False)
    model = Encoder(EncoderConfig(vocab_size=len(vocab), dim=16, n_layers=1, n_heads=2, hidden_dim=32,
                                  max_positions=64))
    save_encoder_dir(model, path, tokenizer=load_tokenizer(path / "tokenizer.json"))
    return path


def test_cli_index_search_ask_eval(tmp_path):
    from conftest import tiny_model_dir, translation_tokenizer
    from typer.testing import CliRunner

    from slmkit.cli import app
    docs = write_docs(tmp_path / "docs")
    bert = _tiny_bert(tmp_path / "bert", list(DOCS.values()) + ["how descale the kettle"])
    model = tiny_model_dir(tmp_path / "lm", translation_tokenizer())
    kb = tmp_path / "kb"
    run = CliRunner().invoke
    r = run(app, ["kb", "index", str(docs), "-o", str(kb), "--embedder", str(bert), "--chunk-chars", "400"])
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout)["chunks"] == 5
    r = run(app, ["kb", "search", str(kb), "descale kettle", "--mode", "bm25", "--json", "-k", "2"])
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout)[0]["heading"] == "Kettle > Descaling"
    r = run(app, ["kb", "search", str(kb), "descale kettle"])
    assert r.exit_code == 0 and "kettle.md:" in r.stdout
    r = run(app, ["kb", "ask", str(kb), "How do I descale the kettle?", "--model", str(model), "--backend", "torch",
                  "--min-similarity", "-1", "--max-new-tokens", "4", "--json"])
    assert r.exit_code == 0, r.output
    answer = json.loads(r.stdout)
    assert len(answer["sources"]) == 3 and answer["sources"][0]["lines"]
    questions = tmp_path / "q.jsonl"
    questions.write_text(json.dumps({"question": "How do I descale the kettle?", "answer_keywords": ["citric"],
                                     "topics": ["kettle"], "answerable": True}) + "\n")
    r = run(app, ["kb", "eval", str(kb), "--questions", str(questions), "-o", str(tmp_path / "out"),
                  "--mode", "bm25"])
    assert r.exit_code == 0, r.output
    assert json.loads((tmp_path / "out" / "results.json").read_text())["hit_at_5"] == 1.0
    r = run(app, ["kb", "eval", str(kb), "--questions", str(questions), "-o", str(tmp_path / "out2"),
                  "--model", str(model), "--backend", "torch", "--max-new-tokens", "4"])
    assert r.exit_code == 0, r.output
    assert set(json.loads(r.stdout)) >= {"answer_correct", "citation_precision"}


def test_cli_errors_are_one_line(tmp_path):
    from typer.testing import CliRunner

    from slmkit.cli import app
    run = CliRunner().invoke
    r = run(app, ["kb", "search", str(tmp_path / "nope"), "x"])
    assert r.exit_code == 2 and r.output.strip().startswith("error: ") and "slm kb index" in r.output
    assert len(r.output.strip().splitlines()) == 1
    (tmp_path / "a.docx").write_text("x")
    r = run(app, ["kb", "index", str(tmp_path / "a.docx"), "-o", str(tmp_path / "kb")])
    assert r.exit_code == 2 and "unsupported file type '.docx'" in r.output
    r = run(app, ["kb", "index", str(tmp_path / "missing"), "-o", str(tmp_path / "kb")])
    assert r.exit_code == 2 and "no such file or folder" in r.output
    (tmp_path / "q.jsonl").write_text('{"question": "x?", "topics": ["a"]}\n')
    r = run(app, ["kb", "eval", "--questions", str(tmp_path / "q.jsonl"), "-o", str(tmp_path / "out")])
    assert r.exit_code == 2 and "--mode hybrid retrieves: name the knowledge base folder" in r.output
