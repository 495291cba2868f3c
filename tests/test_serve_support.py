"""`slm serve MODEL --support TICKETS.sqlite` (serve/support.py): the ticket routes and the agent page, where a
person reads a hand-off, edits the assistant's draft, sends it (the ticket closes) or closes the ticket, in
headless Chromium (the screenshot is agent_page.png in $SLMKIT_TEST_ARTIFACTS)."""

from __future__ import annotations

import json
import urllib.request

import pytest
import torch
from browser import page_errors, save_screenshot
from conftest import live_server, tiny_model_dir
from test_chat_page import api

from slmkit.lm.handoff import TicketStore
from slmkit.serve.support import Support

MODEL = "tiny-support"
KEY = "agent-key"
REFUND = [{"role": "user", "content": "I want my money back for order KB-1001, the kettle leaks."},
          {"role": "assistant", "content": "Sorry to hear that. Do you still have the box?"},
          {"role": "user", "content": "Yes. Let me talk to a person please."}]
SAFETY = [{"role": "user", "content": "My toaster is sparking and smells of smoke!"}]


@pytest.fixture
def served(tmp_path):
    from slmkit.lm import load_lm
    from slmkit.serve.app import create_app
    from slmkit.serve.engine import Engine
    from slmkit.tokenizer import train_tokenizer

    torch.manual_seed(0)
    tok = train_tokenizer(["the kettle and the toaster"] * 20, vocab_size=280)
    lm = load_lm(str(tiny_model_dir(tmp_path / "m", tok)))
    store = TicketStore(tmp_path / "tickets.sqlite")
    first = store.submit(messages=REFUND, intent="refund", reason="asks_for_person", articles=["returns.md"],
                         draft="Refunds reach your card within five working days of the return.")
    second = store.submit(messages=SAFETY, intent="product_fault", reason="safety", articles=["safety.md"],
                          draft="Please unplug the toaster now.")
    engine = Engine(lm, max_batch=2, max_queue=4)
    try:
        with live_server(create_app(engine, MODEL, api_key=KEY, support=Support(store))) as base:
            yield {"base": base, "store": store, "tickets": [first, second]}
    finally:
        engine.close()
        store.close_store()


def call(base: str, path: str, body: dict | None = None, key: str | None = KEY) -> tuple[int, dict]:
    return api(base, path, body, key)


def test_ticket_routes(served):
    base, (first, second) = served["base"], served["tickets"]
    assert call(base, "/v1/support/tickets", key=None)[0] == 401
    status, listed = call(base, "/v1/support/tickets")
    assert status == 200 and [t["ticket"] for t in listed["data"]] == [first, second]
    t = listed["data"][0]
    assert (t["intent"], t["reason"], t["articles"], t["messages"], t["status"]) == \
        ("refund", "asks_for_person", ["returns.md"], REFUND, "open")
    assert call(base, f"/v1/support/tickets/{second}")[1]["draft"] == "Please unplug the toaster now."

    status, err = call(base, f"/v1/support/tickets/{first}/answer", {"text": "   "})
    assert status == 400 and err["error"]["message"] == "the answer is empty"
    status, err = call(base, "/v1/support/tickets/nope/answer", {"text": "hi"})
    assert status == 404 and "no ticket 'nope'" in err["error"]["message"]
    assert call(base, f"/v1/support/tickets/{first}/answer", {})[0] == 400
    assert call(base, "/v1/support/tickets?status=pending")[0] == 400

    status, answered = call(base, f"/v1/support/tickets/{first}/answer", {"text": "Refund sent today."})
    assert status == 200 and answered["status"] == "closed" and answered["answer"] == "Refund sent today."
    assert served["store"].get(first)["answer"] == "Refund sent today."  # in the store `slm support tickets` reads
    assert [t["ticket"] for t in call(base, "/v1/support/tickets")[1]["data"]] == [second]
    assert call(base, f"/v1/support/tickets/{second}/close", {})[1]["status"] == "closed"
    assert call(base, "/v1/support/tickets")[1]["data"] == []
    assert len(call(base, "/v1/support/tickets?status=closed")[1]["data"]) == 2
    assert len(call(base, "/v1/support/tickets?status=all")[1]["data"]) == 2


def test_support_option_needs_a_sqlite_store(tmp_path):
    from typer.testing import CliRunner

    from slmkit.cli import app
    result = CliRunner().invoke(app, ["serve", "no-such-model", "--support", str(tmp_path / "tickets.jsonl")])
    assert result.exit_code == 2 and "give the ticket store a .sqlite file" in result.output, result.output


def test_agent_page_answers_and_closes_tickets(browser, served, tmp_path):
    page, base, store = browser, served["base"], served["store"]
    first, second = served["tickets"]
    page.call("Page.navigate", url=base + "/agent")
    page.wait_for(f"location.href.startsWith({json.dumps(base)}) && document.readyState === 'complete'",
                  what="the page to load")
    page.wait_for("document.querySelector('#error').textContent.length > 0", what="the 401 shown")
    page.set_value("#api-key", KEY)
    cards = "[...document.querySelectorAll('[data-testid=ticket]')]"
    page.wait_for(f"{cards}.length === 2", what="two open tickets")
    assert page.js(f"{cards}.map(c => c.dataset.ticket)") == [first, second]
    card = f"document.querySelector('[data-ticket=\"{first}\"]')"
    shown = page.js(f"{card}.textContent")
    assert all(m["content"] in shown for m in REFUND) and "asks for person" in shown and "returns.md" in shown
    assert page.js(f"{card}.querySelector('textarea').value") == store.get(first)["draft"]
    assert page.js(f"{card}.querySelector('.turn').children.length") == 1  # the role label; the text is text
    save_screenshot(page, "agent_page.png", tmp_path)

    # a person edits the draft and sends it: the ticket closes with that answer, and leaves the open list
    page.set_value(f"[data-ticket=\"{first}\"] textarea", "We have refunded order KB-1001 today.")
    page.js(f"{card}.querySelector('[data-testid=send]').click()")
    page.wait_for(f"{cards}.length === 1", what="the answered ticket gone from the open list")
    assert store.get(first)["answer"] == "We have refunded order KB-1001 today."
    assert store.get(first)["status"] == "closed"

    # a ticket opened meanwhile (the assistant, another process) appears on refresh; one is closed unanswered
    third = store.submit(messages=[{"role": "user", "content": "Where is my parcel?"}], reason="account_action")
    page.js("document.querySelector('#refresh').click()")
    page.wait_for(f"{cards}.length === 2", what="the new ticket")
    page.js(f"document.querySelector('[data-ticket=\"{second}\"] [data-testid=close]').click()")
    page.wait_for(f"{cards}.map(c => c.dataset.ticket).join() === {json.dumps(third)}", what="the closed ticket gone")
    assert store.get(second)["status"] == "closed" and store.get(second)["answer"] is None

    # an empty reply is refused on the page, not sent
    page.set_value(f"[data-ticket=\"{third}\"] textarea", "")
    page.js(f"document.querySelector('[data-ticket=\"{third}\"] [data-testid=send]').click()")
    page.wait_for("document.querySelector('#error').textContent.includes('write a reply first')", what="the refusal")
    assert store.get(third)["status"] == "open"

    page.set_value("#status", "closed")
    page.wait_for(f"{cards}.length === 2", what="the closed tickets")
    assert "We have refunded order KB-1001 today." in page.js(f"{card}.textContent")
    assert not page_errors(page)


def test_the_support_assistant_answers_chat_completions_and_hands_off_to_the_agent_page(tmp_path):
    pytest.importorskip("apsw")
    from test_kb import WordEmbedder, open_words, write_docs
    from test_support import HELP

    from slmkit.kb.ask import build_messages
    from slmkit.kb.index import index_kb
    from slmkit.kb.retrieve import search
    from slmkit.lm import load_lm
    from slmkit.serve.app import create_app
    from slmkit.serve.engine import Engine
    from slmkit.serve.support import EngineChat, open_support, open_tickets
    from slmkit.tokenizer import train_tokenizer

    index_kb([write_docs(tmp_path / "help", HELP)], tmp_path / "kb", embedder_model=WordEmbedder(), embedder="words")
    kb = open_words(tmp_path / "kb")
    (tmp_path / "intents.json").write_text(json.dumps({"shipping": "shipping delivery parcels Norway costs",
                                                       "returns": "return a product refund"}))
    torch.manual_seed(0)
    tok = train_tokenizer(list(HELP.values()) * 10, vocab_size=300)
    lm = load_lm(str(tiny_model_dir(tmp_path / "m", tok, max_seq_len=1024)))
    engine = Engine(lm, max_batch=2, max_queue=4)
    support = open_support(open_tickets(tmp_path / "tickets.sqlite"), engine, kb, intents=tmp_path / "intents.json")
    assert isinstance(support.assistant.lm, EngineChat)
    question = "How much is shipping to Norway?"
    try:
        with live_server(create_app(engine, MODEL, api_key=KEY, support=support)) as base, \
                live_server(create_app(engine, MODEL, api_key=KEY)) as plain:
            body = {"messages": [{"role": "user", "content": question}], "temperature": 0}
            status, answered = call(base, "/v1/chat/completions", body)
            assert status == 200, answered
            turn = answered["slmkit"]["support"]
            reply = answered["choices"][0]["message"]["content"]
            assert not turn["handoff"] and turn["intent"] == "shipping" and reply == turn["draft"]
            assert "€19.95" in reply and turn["articles"][0] == "shipping.md"
            # the model's part of the reply came from the engine: the same prompt asked directly answers the same
            shown = search(kb, question, k=5)[:3]
            status, direct = call(plain, "/v1/chat/completions", {"messages": build_messages(question, shown),
                                                                  "temperature": 0, "max_tokens": 160})
            assert reply.startswith(direct["choices"][0]["message"]["content"].strip())

            status, raw = 0, None
            req = urllib.request.Request(base + "/v1/chat/completions", data=json.dumps({**body, "stream": True})
                                         .encode(), headers={"Authorization": f"Bearer {KEY}",
                                                             "Content-Type": "application/json"})
            with urllib.request.urlopen(req, timeout=60) as r:
                assert r.headers["X-Slmkit-Handoff"] == "false"
                raw = r.read().decode()
            parts = [json.loads(x[6:]) for x in raw.split("\n") if x.startswith("data: {")]
            assert "".join(p["choices"][0]["delta"].get("content") or "" for p in parts if p["choices"]) == reply

            person = {"messages": [{"role": "user", "content": "Can I talk to a real person please"}]}
            status, handed = call(base, "/v1/chat/completions", person)
            turn = handed["slmkit"]["support"]
            assert status == 200 and turn["handoff"] and turn["reason"] == "asks_for_human"
            assert turn["ticket"] in handed["choices"][0]["message"]["content"]
            status, listed = call(base, "/v1/support/tickets")
            assert [(t["ticket"], t["reason"], t["messages"]) for t in listed["data"]] == \
                [(turn["ticket"], "asks_for_human", person["messages"])]

            status, err = call(base, "/v1/chat/completions", {"messages": [{"role": "assistant", "content": "hi"}]})
            assert status == 400 and "end with the customer's (user) message" in err["error"]["message"]
    finally:
        engine.close()
        support.tickets.close_store()
        support.assistant.queue.close()
        kb.close()
