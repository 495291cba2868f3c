"""`slm serve MODEL --kb KB` (serve/kb.py): chat completions grounded in a knowledge base, with their sources and
citations in the response, an abstention when retrieval finds nothing, and the chat page showing the sources
beside the answer in headless Chromium (the screenshot is kb_sources.png in $SLMKIT_TEST_ARTIFACTS)."""

from __future__ import annotations

import json
import re
import urllib.error
import urllib.request
from pathlib import Path

import pytest

pytest.importorskip("apsw")
pytest.importorskip("sqlite_vec")

import torch  # noqa: E402
from browser import page_errors, save_screenshot  # noqa: E402
from conftest import live_server, tiny_model_dir  # noqa: E402
from test_kb import DOCS, WordEmbedder, write_docs  # noqa: E402

from slmkit.kb.ask import ABSTAIN_TEXT, SOURCES_SAY, SYSTEM, quote_sources  # noqa: E402
from slmkit.kb.index import index_kb, open_kb  # noqa: E402
from slmkit.kb.retrieve import search  # noqa: E402
from slmkit.serve.kb import Grounding, Quote  # noqa: E402

MODEL = "tiny-kb"
KEY = "kb-key"
QUESTION = "How do I descale the kettle?"
OFF_TOPIC = "Which telescope sees quasars?"  # no word in common with the documents
ANSWER = "Descale the kettle monthly with citric acid [1]."


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """A grounded app and a plain one over the same engine: the plain one answers the grounded prompt directly."""
    from slmkit.lm import load_lm
    from slmkit.serve.app import create_app
    from slmkit.serve.engine import Engine
    from slmkit.tokenizer import train_tokenizer

    root = tmp_path_factory.mktemp("serve-kb")
    index_kb([write_docs(root / "docs")], root / "kb", embedder_model=WordEmbedder(), embedder="words")
    kb = open_kb(root / "kb", embedder=WordEmbedder())
    torch.manual_seed(0)
    tok = train_tokenizer(list(DOCS.values()) * 10 + [ANSWER, SYSTEM] * 10, vocab_size=400)
    # fitted to the grounded conversation and a citing answer, so its greedy reply carries [n]
    prompt = Grounding.prompt([{"role": "user", "content": QUESTION}], search(kb, QUESTION, k=2))
    conversation = tok.apply_chat_template([*prompt, {"role": "assistant", "content": ANSWER}])
    lm = load_lm(str(tiny_model_dir(root / "m", tok, train_on=conversation, steps=60, max_seq_len=384)))
    grounding = Grounding(kb, k=2, min_similarity=0.2)
    quoting = Grounding(kb, k=2, min_similarity=0.2, answer="quote", lock=grounding.lock)
    both = Grounding(kb, k=2, min_similarity=0.2, answer="model+quote", lock=grounding.lock)
    engine = Engine(lm, max_batch=4, max_queue=8)
    try:
        with live_server(create_app(engine, MODEL, api_key=KEY, grounding=grounding)) as grounded, \
                live_server(create_app(engine, MODEL, api_key=KEY)) as plain, \
                live_server(create_app(engine, MODEL, api_key=KEY, grounding=quoting)) as quoted, \
                live_server(create_app(engine, MODEL, api_key=KEY, grounding=both)) as model_quote:
            yield {"grounded": grounded, "plain": plain, "grounding": grounding, "quote": quoted,
                   "model+quote": model_quote}
    finally:
        engine.close()
        kb.close()


def post(base: str, body: dict, path: str = "/v1/chat/completions") -> tuple[int, dict | str]:
    req = urllib.request.Request(base + path, data=json.dumps(body).encode(),
                                 headers={"Content-Type": "application/json", "Authorization": f"Bearer {KEY}"})
    try:
        with urllib.request.urlopen(req, timeout=120) as r:
            raw = r.read().decode()
            return r.status, json.loads(raw) if not body.get("stream") else raw
    except urllib.error.HTTPError as e:
        return e.code, json.load(e)


def chunks(raw: str) -> list[dict]:
    events = [line[len("data: "):] for line in raw.split("\n") if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    return [json.loads(e) for e in events[:-1]]


def ask_body(question: str = QUESTION, **extra) -> dict:
    return {"model": MODEL, "messages": [{"role": "user", "content": question}], "temperature": 0,
            "max_tokens": 24, **extra}


def test_a_grounded_reply_is_the_model_answering_from_the_numbered_sources(served):
    status, body = post(served["grounded"], ask_body())
    assert status == 200, body
    kb = body["slmkit"]["kb"]
    assert [(Path(s["path"]).name, s["heading"], s["lines"]) for s in kb["sources"]][0] == \
        ("kettle.md", "Kettle > Descaling", "7-8")
    assert Path(kb["sources"][0]["path"]).is_absolute() and kb["sources"][0]["name"] == "docs/kettle.md"
    assert kb["abstained"] is False and kb["reason"] == ""
    # the same engine, asked directly with kb/ask.py's prompt over those chunks, answers the same
    hits = search(served["grounding"].kb, QUESTION, k=2)
    prompt = Grounding.prompt([{"role": "user", "content": QUESTION}], hits)
    assert prompt[0]["content"] == SYSTEM and "[1] Kettle > Descaling" in prompt[1]["content"]
    status, direct = post(served["plain"], {**ask_body(), "messages": prompt})
    assert status == 200
    text = body["choices"][0]["message"]["content"]
    assert text == direct["choices"][0]["message"]["content"] and "slmkit" not in direct
    assert "[1]" in text or "[2]" in text  # the fitted model cites, so the citations below are not vacuous
    cited = sorted({int(n) for n in re.findall(r"\[(\d)\]", text) if 1 <= int(n) <= 2})
    assert [c["n"] for c in sorted(kb["citations"], key=lambda c: c["n"])] == cited
    assert all(c["path"] == kb["sources"][c["n"] - 1]["path"] for c in kb["citations"])


def test_streamed_sources_come_first_and_citations_with_the_finish(served):
    status, whole = post(served["grounded"], ask_body())
    status, raw = post(served["grounded"], ask_body(stream=True))
    assert status == 200
    parts = chunks(raw)
    first, finish = parts[0], next(c for c in parts if c["choices"] and c["choices"][0]["finish_reason"])
    assert first["slmkit"]["kb"]["sources"] == whole["slmkit"]["kb"]["sources"]
    assert "citations" not in first["slmkit"]["kb"]  # not known before the text
    assert finish["slmkit"] == whole["slmkit"]
    text = "".join(c["choices"][0]["delta"].get("content") or "" for c in parts if c["choices"])
    assert text == whole["choices"][0]["message"]["content"]


def test_nothing_relevant_is_an_abstention_without_the_model(served):
    status, body = post(served["grounded"], ask_body(OFF_TOPIC))
    assert status == 200
    assert body["choices"][0]["message"]["content"] == ABSTAIN_TEXT and body["usage"]["completion_tokens"] == 0
    kb = body["slmkit"]["kb"]
    assert kb["abstained"] is True and kb["reason"] == "retrieval" and kb["citations"] == []
    status, raw = post(served["grounded"], ask_body(OFF_TOPIC, stream=True))
    parts = chunks(raw)
    assert "".join(c["choices"][0]["delta"].get("content") or "" for c in parts if c["choices"]) == ABSTAIN_TEXT
    assert parts[-1]["slmkit"]["kb"]["reason"] == "retrieval"


def test_follow_ups_keep_the_subject_and_the_client_system_message_follows_the_instruction(served):
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": QUESTION},
                {"role": "assistant", "content": "Monthly."}, {"role": "user", "content": "With what?"}]
    status, body = post(served["grounded"], {**ask_body(), "messages": messages})
    assert status == 200 and not body["slmkit"]["kb"]["abstained"]  # "With what?" alone shares nothing
    assert Path(body["slmkit"]["kb"]["sources"][0]["path"]).name == "kettle.md"
    prompt = Grounding.prompt(messages, [])
    assert prompt[0]["content"] == SYSTEM + "\n\nBe brief." and prompt[1:3] == messages[1:3]
    assert prompt[3]["content"].endswith("Question: With what?")


def test_what_a_grounded_request_cannot_ask(served):
    for extra, param in [({"n": 2}, "n"), ({"tools": [{"type": "function", "function": {"name": "f"}}]}, "tools")]:
        status, body = post(served["grounded"], ask_body(**extra))
        assert status == 400 and body["error"]["param"] == param, body
    status, body = post(served["grounded"], {**ask_body(), "messages": [{"role": "user", "content": QUESTION},
                                                                        {"role": "assistant", "content": "x"}]})
    assert status == 400 and "end with a user message" in body["error"]["message"]


def test_citations_and_model_abstention_from_the_text(served):
    hits = search(served["grounding"].kb, QUESTION, k=2)
    info = served["grounding"].info(hits, "Monthly [2], with citric acid [1] [9].")["kb"]
    assert [c["n"] for c in info["citations"]] == [2, 1] and not info["abstained"]  # [9] names no source
    declined = served["grounding"].info(hits, "That is not in the knowledge base.")["kb"]
    assert declined["abstained"] and declined["reason"] == "model" and declined["citations"] == []


def test_the_openai_client_reads_the_reply_and_the_sources(served):
    openai = pytest.importorskip("openai")
    client = openai.OpenAI(base_url=served["grounded"] + "/v1", api_key=KEY)
    reply = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": QUESTION}],
                                           temperature=0, max_tokens=24)
    assert reply.choices[0].message.content
    assert Path(reply.model_extra["slmkit"]["kb"]["sources"][0]["path"]).name == "kettle.md"


def test_kb_answer_quote_replies_with_the_sources_words_without_the_model(served):
    status, body = post(served["quote"], ask_body())
    assert status == 200, body
    text, kb = body["choices"][0]["message"]["content"], body["slmkit"]["kb"]
    assert "Descale the kettle monthly with citric acid." in text and body["usage"]["completion_tokens"] == 0
    hits = search(served["grounding"].kb, QUESTION, k=2)
    assert text == quote_sources(QUESTION, hits, served["grounding"].kb)[0]  # what `slm kb ask --answer quote` says
    assert [c["n"] for c in kb["citations"]] == [int(n) for n in re.findall(r"\[(\d)\]", text)]
    assert kb["abstained"] is False and kb["reason"] == ""
    status, raw = post(served["quote"], ask_body(stream=True))
    parts = chunks(raw)
    assert "".join(c["choices"][0]["delta"].get("content") or "" for c in parts if c["choices"]) == text
    assert parts[-1]["slmkit"] == body["slmkit"]
    status, off = post(served["quote"], ask_body(OFF_TOPIC))
    assert off["choices"][0]["message"]["content"] == ABSTAIN_TEXT and off["slmkit"]["kb"]["reason"] == "retrieval"


def test_kb_answer_model_quote_appends_the_quote_to_the_models_answer(served):
    status, plain = post(served["grounded"], ask_body())
    status, body = post(served["model+quote"], ask_body())
    assert status == 200, body
    model_text = plain["choices"][0]["message"]["content"]
    text, kb = body["choices"][0]["message"]["content"], body["slmkit"]["kb"]
    hits = search(served["grounding"].kb, QUESTION, k=2)
    quoted, quote_citations = quote_sources(QUESTION, hits, served["grounding"].kb)
    assert text == f"{model_text}\n\n{SOURCES_SAY}\n{quoted}"
    model_cited = [c["n"] for c in plain["slmkit"]["kb"]["citations"]]
    assert [c["n"] for c in kb["citations"]] == model_cited + [c.n for c in quote_citations if c.n not in model_cited]
    status, raw = post(served["model+quote"], ask_body(stream=True))
    parts = chunks(raw)
    deltas = [c["choices"][0]["delta"].get("content") or "" for c in parts if c["choices"]]
    assert "".join(deltas) == text and deltas[-1] == "" and deltas[-2] == f"\n\n{SOURCES_SAY}\n{quoted}"
    assert parts[-1]["slmkit"] == body["slmkit"]
    # a declining model gets no quote, and abstains
    both = Grounding(served["grounding"].kb, answer="model+quote")
    assert both.appender(Quote("\n\nq [1]", []))("That is not in the knowledge base.") == ""
    assert both.info(hits, "That is not in the knowledge base.", quote=Quote("\n\nq [1]", []))["kb"]["abstained"]
    with pytest.raises(ValueError, match="unknown answer mode 'cite' \\(--kb-answer\\)"):
        Grounding(served["grounding"].kb, answer="cite")


def test_serve_refuses_bad_kb_options_before_loading_the_model(tmp_path):
    from typer.testing import CliRunner

    from slmkit.cli import app
    runner = CliRunner()
    for args, message in [(["--kb", str(tmp_path / "nowhere")], "no knowledge base here"),
                          (["--kb", str(tmp_path), "--escalate-to", "x", "--calibration", "c.json"], "--escalate-to"),
                          (["--kb", str(tmp_path), "--kb-k", "0"], "--kb-k"),
                          (["--kb", str(tmp_path), "--kb-answer", "cite"], "--kb-answer"),
                          (["--kb-answer", "quote"], "give --kb"),
                          (["--kb", str(tmp_path), "--kb-answer", "quote", "--kb-quote-sentences", "0"],
                           "at least 1")]:
        result = runner.invoke(app, ["serve", "no-such-model", *args])
        assert result.exit_code == 2, result.output
        assert message in result.output and "Traceback" not in result.output


def test_chat_page_shows_the_sources_beside_the_answer(browser, served, tmp_path):
    page = browser
    base = served["grounded"]
    page.call("Page.navigate", url=base + "/")
    page.wait_for(f"location.href.startsWith({json.dumps(base)}) && document.readyState === 'complete'",
                  what="the page to load")
    page.set_value("#api-key", KEY)
    page.wait_for(f"document.querySelector('#model-name').textContent === {json.dumps(MODEL)}", what="the model")
    page.set_value("#temperature", "0")
    page.set_value("#max-tokens", "24")
    page.set_value("#prompt", QUESTION)
    page.js("document.querySelector('#send').click()")
    done = ("(() => { const m = document.querySelectorAll('#messages .msg.assistant'); return m.length >= {n} && "
            "m[{n} - 1].dataset.state === 'done' && !document.querySelector('#send').disabled; })()")
    page.wait_for(done.replace("{n}", "1"), what="the grounded reply")
    status, direct = post(base, ask_body())
    kb = direct["slmkit"]["kb"]
    reply = "document.querySelectorAll('#messages .msg.assistant')[0]"
    assert page.js(f"{reply}.querySelector('.content').textContent") == direct["choices"][0]["message"]["content"]
    shown = page.js(f"[...{reply}.querySelectorAll('.sources li[data-n]')].map(li => "
                    "[Number(li.dataset.n), li.querySelector('.where').textContent, li.classList.contains('cited')])")
    cited = {c["n"] for c in kb["citations"]}
    assert shown == [[s["n"], f"{s['name']}:{s['lines']}", s["n"] in cited] for s in kb["sources"]]
    assert shown[0][1] == "docs/kettle.md:7-8"  # from the indexed folder: the server's own path stays out
    assert cited and page.js(f"getComputedStyle({reply}).display") == "grid"  # beside the answer, not below
    save_screenshot(page, "kb_sources.png", tmp_path)

    page.js("document.querySelector('#clear').click()")  # else the follow-up rule searches with the kettle too
    page.set_value("#prompt", OFF_TOPIC)
    page.js("document.querySelector('#send').click()")
    page.wait_for(done.replace("{n}", "1"), what="the abstention")
    second = "document.querySelectorAll('#messages .msg.assistant')[0]"
    assert page.js(f"{second}.querySelector('.content').textContent") == ABSTAIN_TEXT
    assert "not enough to answer" in page.js(f"{second}.querySelector('.sources .title').textContent")
    assert not page_errors(page)
