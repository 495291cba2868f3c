"""The customer-service assistant: hand-off rules, the ticket store (the hand-off queue's SQLite form), replies
grounded in the help center, hand-offs with tickets, context over turns, the metrics, and the `slm support`
commands."""

import json
import threading

import pytest
from test_kb import ScriptedLM, WordEmbedder, _tiny_bert, open_words, write_docs
from typer.testing import CliRunner

from slmkit.cli import app
from slmkit.kb.index import index_kb
from slmkit.lm.handoff import HandoffQueue, TicketStore
from slmkit.support.assistant import SupportAssistant, quote
from slmkit.support.evaluate import auto_share_at_error, read_messages, support_metrics
from slmkit.support.intents import DescribedIntents, read_descriptions
from slmkit.support.rules import handoff_reasons

HELP = {
    "shipping.md": "# Shipping\n\nShipping to the Netherlands costs €4.95. Orders over €79 ship free.\n\n"
                   "## Norway\n\nParcels to Norway cost €19.95 and take 5-8 working days.\n",
    "returns.md": "# Returns\n\nYou can return a product within 30 days. Unused products get a full refund.\n\n"
                  "| Case | Refund |\n|---|---|\n| Unused | 100% |\n| Used | 80% |\n",
    "kettle.md": "# KT-1 kettle\n\nDescale the kettle monthly with citric acid. Rinse it twice afterwards.\n",
}


class Intents:
    """Intent by a keyword: enough to test that the assistant reports what its intent model says."""

    def predict(self, texts):
        return [("shipping" if "ship" in t.lower() or "norway" in t.lower() else "other", 0.9) for t in texts]


@pytest.fixture
def help_kb(tmp_path):
    index_kb([write_docs(tmp_path / "help", HELP)], tmp_path / "kb", embedder_model=WordEmbedder(), embedder="words")
    kb = open_words(tmp_path / "kb")
    yield kb
    kb.close()


@pytest.mark.parametrize("message,reason", [
    ("There were sparks from the back and it smells burnt", "safety"),
    ("Water is leaking underneath, right next to the socket", "safety"),
    ("If this isn't fixed I'll be contacting my lawyer.", "angry_or_legal"),
    ("I'm filing a chargeback with my bank", "angry_or_legal"),
    ("Can I talk to a real person please", "asks_for_human"),
    ("Is there a phone number I can call?", "asks_for_human"),
    ("Where is my order KB-204877?", "needs_account_action"),
    ("I've been charged twice for my order", "needs_account_action"),
    ("How much is shipping to Norway?", None),
])
def test_rules(message, reason):
    found = handoff_reasons(message)
    assert (found[0][0] if found else None) == reason
    if reason:
        assert found[0][1].lower() in message.lower()  # the evidence is the customer's own words


def test_safety_comes_first():
    assert [r for r, _ in handoff_reasons("It caught fire and I want a real person NOW, I'll call my lawyer")] == \
        ["safety", "angry_or_legal", "asks_for_human"]


def test_ticket_store(tmp_path):
    store = TicketStore(tmp_path / "t.sqlite")
    a = store.submit(messages=[{"role": "user", "content": "help"}], intent="other", reason="asks_for_human",
                     articles=["contact.md"], draft="Call us.")
    b = store.submit(prompt="plain")
    assert [t["ticket"] for t in store.tickets()] == [a, b]
    t = store.get(a)
    assert (t["status"], t["reason"], t["articles"], t["draft"], t["messages"][0]["content"]) == \
        ("open", "asks_for_human", ["contact.md"], "Call us.", "help")
    done = store.answer(a, "We called you back.")
    assert done["status"] == "closed" and done["answer"] == "We called you back." and done["closed"]
    assert [t["ticket"] for t in store.tickets()] == [b]
    assert [t["ticket"] for t in store.tickets("closed")] == [a] and len(store.tickets(None)) == 2
    store.close(b)
    assert store.tickets() == []
    with pytest.raises(ValueError, match="no ticket 'nope'"):
        store.answer("nope", "x")
    with pytest.raises(ValueError, match="the answer is empty"):
        store.answer(b, " ")
    with pytest.raises(ValueError, match="status must be one of open, closed"):
        store.tickets("pending")
    store.close_store()
    # concurrent writers (the server's threads): every ticket lands
    store = TicketStore(tmp_path / "t.sqlite")
    threads = [threading.Thread(target=lambda: [store.submit(prompt="x") for _ in range(10)]) for _ in range(4)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    assert len(store.tickets(None)) == 42
    (tmp_path / "junk.sqlite").write_bytes(b"not a database at all" * 100)
    with pytest.raises(ValueError, match="not a ticket store"):
        TicketStore(tmp_path / "junk.sqlite").tickets()


def test_handoff_queue_is_one_mechanism_for_cascades_and_support(tmp_path):
    queue = HandoffQueue(tmp_path / "q.sqlite")  # what `slm serve --escalate-to queue:q.sqlite` uses
    reply = "".join(queue.stream_chat([{"role": "user", "content": "refund me"}]))
    [ticket] = queue.store.tickets()
    assert ticket["ticket"] in reply and ticket["messages"][0]["content"] == "refund me"
    queue.close()


def test_assistant_answers_from_the_help_center(help_kb):
    assistant = SupportAssistant(help_kb, Intents(), queue=None, min_similarity=0.1)
    turn = assistant.handle([{"role": "user", "content": "How much does shipping to Norway cost?"}])
    assert not turn.handoff and turn.ticket is None and turn.intent == "shipping"
    assert turn.articles[0] == "shipping.md" and "€19.95" in turn.reply and turn.reply.startswith(
        "From our help center (Shipping)")
    assert len(turn.articles) == 3  # every article the retrieved chunks touch, up to max(quote_articles, sources)
    narrow = SupportAssistant(help_kb, Intents(), queue=None, min_similarity=0.1, sources=1, quote_articles=1)
    assert narrow.handle([{"role": "user", "content": "How much does shipping to Norway cost?"}]).articles == [
        "shipping.md"]
    # with a model: its answer (and citations) come first, the quote after it
    lm = ScriptedLM("It costs €19.95 [1].")
    turn = SupportAssistant(help_kb, Intents(), lm=lm, min_similarity=0.1, sources=2).handle(
        [{"role": "user", "content": "What does shipping to Norway cost?"}])
    assert turn.reply.startswith("It costs €19.95 [1].") and turn.citations[0]["path"].endswith("shipping.md")
    assert lm.prompts[0][-1]["content"].count("\n[") <= 2  # the model saw `sources` chunks


def test_assistant_hands_off_with_a_ticket(help_kb, tmp_path):
    queue = HandoffQueue(tmp_path / "tickets.sqlite")
    assistant = SupportAssistant(help_kb, Intents(), queue=queue, min_similarity=0.3)
    turn = assistant.handle([{"role": "user", "content": "My kettle sparks and smells burnt"}])
    assert turn.handoff and turn.reason == "safety" and "unplug the appliance" in turn.reply
    assert turn.ticket in turn.reply and "citric acid" in turn.draft  # the person gets a draft
    unknown = assistant.handle([{"role": "user", "content": "Are you hiring baristas?"}])
    assert unknown.handoff and unknown.reason == "not_in_kb" and "similarity" in unknown.evidence
    tickets = queue.store.tickets()
    assert [(t["reason"], t["articles"][0]) for t in tickets][0] == ("safety", "kettle.md")
    assert len(tickets) == 2
    strict = SupportAssistant(help_kb, Intents(), queue=queue, min_similarity=0.0, min_confidence=0.99)
    assert strict.handle([{"role": "user", "content": "shipping Norway"}]).reason == "low_confidence"
    with pytest.raises(ValueError, match="no hand-off queue"):
        SupportAssistant(help_kb, Intents(), queue=None).handle([{"role": "user", "content": "a real person!"}])
    with pytest.raises(ValueError, match="must end with the customer"):
        assistant.handle([{"role": "assistant", "content": "hi"}])
    queue.close()


def test_context_is_kept_over_turns(help_kb):
    assistant = SupportAssistant(help_kb, Intents(), min_similarity=0.0)
    follow_up = [{"role": "user", "content": "Tell me about Norway parcels"}, {"role": "assistant", "content": "..."},
                 {"role": "user", "content": "how long does it take?"}]
    assert assistant.handle(follow_up).articles[0] == "shipping.md"
    assert "5-8 working days" in assistant.handle(follow_up).reply


def test_quote_picks_the_nearest_sentences_and_reads_tables():
    passage = "# T\n\nA is red. B costs €5. C is blue.\n\n| Case | Refund |\n|---|---|\n| Used | 80% |\n"
    assert quote(passage, "what does B cost?", n=1) == "B costs €5."
    assert quote(passage, "refund for used products", n=1) == "Case Used, Refund 80%."
    assert quote(passage, "anything", n=10).count(".") == 4  # the header row is not a sentence


def test_described_intents(tmp_path):
    intents = DescribedIntents(WordEmbedder(), {"shipping": "delivery costs zones parcels",
                                                "returns": "send back refund"})
    assert [label for label, _ in intents.predict(["how much are parcels to zones", "refund please"])] == \
        ["shipping", "returns"]
    bad = tmp_path / "i.json"
    bad.write_text('{"a": 1}')
    with pytest.raises(ValueError, match="mapping each intent to its description"):
        read_descriptions(bad)
    bad.write_text("{\n oops")
    with pytest.raises(ValueError, match="i.json:2: not JSON"):
        read_descriptions(bad)


def _record(handoff, gold, reason="", gold_reason="", keywords=1, found=1, confidence=0.5, rule=False,
            intent="a", gold_intent="a"):
    return {"handoff": handoff, "gold_escalate": gold, "reason": reason, "gold_reason": gold_reason,
            "keywords": keywords, "keywords_found": found, "all_keywords": found == keywords, "confidence": confidence,
            "rule": rule, "intent": intent, "gold_intent": gold_intent, "gold_articles": ["x.md"],
            "retrieved_5": ["y.md", "x.md"]}


def test_metrics_on_a_hand_made_case():
    records = [_record(True, True, "safety", "safety", rule=True),   # right hand-off
               _record(True, False, "not_in_kb"),                     # needless hand-off
               _record(False, True, gold_reason="not_in_kb", confidence=0.4),  # missed hand-off
               _record(False, False, found=0, confidence=0.6, intent="b"),     # auto, misses its keyword
               _record(False, False, confidence=0.9)]                          # auto, right
    m = support_metrics(records)
    assert (m["handoff_precision"], m["handoff_recall"], m["auto_resolved"]) == (0.5, 0.5, 0.6)
    assert m["wrong_reply_rate"] == round(1 / 3, 4) and m["auto_error_rate"] == round(2 / 3, 4)
    assert m["intent_accuracy"] == 0.8 and m["recall_by_reason"] == {"not_in_kb": 0.0, "safety": 1.0}
    assert m["article_hit_at_1"] == 0.0 and m["article_hit_at_3"] == 1.0 and m["safety_auto_answered"] == 0
    # the sweep: by confidence 0.9 (right), 0.6 (wrong), 0.5 (needless hand-off but right reply), 0.4 (wrong)
    assert auto_share_at_error(records, 0.05) == {"auto_resolved": 0.2, "threshold": 0.9, "error_rate": 0.0}
    assert auto_share_at_error(records, 0.5) == {"auto_resolved": 0.8, "threshold": 0.4, "error_rate": 0.5}


def test_message_file_errors(tmp_path):
    path = tmp_path / "m.jsonl"
    path.write_text(json.dumps({"message": "hi", "intent": "other"}) + "\n")
    with pytest.raises(ValueError, match="m.jsonl:1: missing field"):
        read_messages(path)


def test_cli_reply_tickets_eval(tmp_path):
    help_dir = write_docs(tmp_path / "help", HELP)
    bert = _tiny_bert(tmp_path / "bert", list(HELP.values()) + ["how much is shipping to norway"])
    kb = tmp_path / "kb"
    run = CliRunner().invoke
    assert run(app, ["kb", "index", str(help_dir), "-o", str(kb), "--embedder", str(bert)]).exit_code == 0
    intents = tmp_path / "intents.json"
    intents.write_text(json.dumps({"shipping": "shipping costs", "other": "anything else"}))
    queue = tmp_path / "tickets.sqlite"
    common = ["--intents", str(intents), "--queue", str(queue)]
    r = run(app, ["support", "reply", str(kb), "I want to talk to a real person", *common, "--json"])
    assert r.exit_code == 0, r.output
    turn = json.loads(r.stdout)
    assert turn["handoff"] and turn["reason"] == "asks_for_human"
    r = run(app, ["support", "reply", str(kb), "shipping to Norway?", *common, "--min-similarity", "-1"])
    assert r.exit_code == 0 and "From our help center" in r.stdout, r.output
    r = run(app, ["support", "chat", str(kb), *common], input="shipping to Norway?\nplease get me a human\n")
    assert r.exit_code == 0 and "A person from our team" in r.stdout, r.output
    r = run(app, ["support", "tickets", str(queue), "--json"])
    tickets = [json.loads(line) for line in r.stdout.splitlines()]
    assert len(tickets) == 2 and len(tickets[1]["messages"]) == 3  # the chat's hand-off carries the conversation
    r = run(app, ["support", "tickets", str(queue), "--answer", tickets[0]["ticket"], "We will call you."])
    assert r.exit_code == 0 and "closed" in r.stdout
    assert len(run(app, ["support", "tickets", str(queue)]).stdout.splitlines()) == 1
    messages = tmp_path / "m.jsonl"
    messages.write_text("".join(json.dumps(m) + "\n" for m in [
        {"id": "1", "message": "How much is shipping to Norway?", "intent": "shipping",
         "answer_articles": ["shipping.md"], "answer_keywords": ["€19.95"], "escalate": False},
        {"id": "2", "message": "Get me a real person", "intent": "other", "answer_articles": [],
         "answer_keywords": [], "escalate": True, "escalate_reason": "asks_for_human"}]))
    r = run(app, ["support", "eval", str(help_dir), "--messages", str(messages), "--intents", str(intents),
                  "-o", str(tmp_path / "out")])
    assert r.exit_code == 0, r.output
    results = json.loads((tmp_path / "out" / "results.json").read_text())
    assert results["handoff_recall"] == 1.0 and results["handoff_precision"] == 1.0  # the KB was indexed on the way
    assert (tmp_path / "out" / "kb" / "kb.sqlite").exists() and (tmp_path / "out" / "replies.jsonl").exists()
