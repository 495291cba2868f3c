"""Cascades: calibration and threshold selection, the generation `Cascade` (an LM), the hand-off queue, the
classifier cascade, and `slm serve --escalate-to` (field, header, metrics)."""

import json
import math
import re

import numpy as np
import pytest
from conftest import live_server, tiny_model_dir
from typer.testing import CliRunner

from slmkit.classify.cascade import ClassifierCascade, label_word_labeler, label_word_probabilities
from slmkit.classify.pet import PET
from slmkit.cli import app as cli_app
from slmkit.lm import load_lm
from slmkit.lm.base import LM
from slmkit.lm.calibration import Calibration, fit_calibration, load_calibration, risk_coverage, select_threshold
from slmkit.lm.cascade import Cascade, calibrate, confidence, is_correct, token_entropy
from slmkit.lm.handoff import HandoffQueue
from slmkit.sampling import SamplingParams
from slmkit.tokenizer import train_tokenizer

TEXT = "the cat sat on the mat. the dog ran in the park. a bird sang in the tree.\n"
GREEDY = SamplingParams(max_new_tokens=8, temperature=0.0)


@pytest.fixture(scope="module")
def small_dir(tmp_path_factory):
    tok = train_tokenizer([TEXT] * 40, vocab_size=300)
    return tiny_model_dir(tmp_path_factory.mktemp("cascade") / "small", tok, train_on=TEXT, max_seq_len=32, steps=40)


@pytest.fixture(scope="module")
def small(small_dir):
    return load_lm(str(small_dir))


class Fixed(LM):
    """A stand-in large model that always says the same thing (and counts its calls)."""

    name = "large"

    def __init__(self, reply="LARGE ANSWER"):
        self.reply, self.calls = reply, 0

    def stream(self, prompt, params=None, heal=False):
        self.calls += 1
        yield self.reply

    def stream_chat(self, messages, params=None):
        self.calls += 1
        yield self.reply


# --- calibration and thresholds ---

def test_threshold_selection_hits_the_target_on_calibrated_data():
    rng = np.random.default_rng(0)

    def sample(n):
        conf = rng.uniform(0.5, 1.0, n)
        return conf, rng.random(n) < conf  # calibrated: P(correct | conf) = conf
    conf, correct = sample(20000)
    for target in (0.05, 0.1, 0.2):
        t = select_threshold(conf, correct, target)
        answered = conf >= t
        assert 1 - correct[answered].mean() <= target + 1e-12  # on dev, by construction
        held_conf, held_correct = sample(20000)
        held = held_conf >= t
        assert abs((1 - held_correct[held].mean()) - target) < 0.01  # and on fresh data, within a point
        # the lowest such threshold: one dev point lower breaks the target
        lower = np.unique(conf)[np.unique(conf) < t].max()
        assert 1 - correct[conf >= lower].mean() > target


def test_threshold_selection_exact_cases():
    conf, correct = np.array([0.9, 0.8, 0.7, 0.6]), np.array([True, True, False, True])
    assert select_threshold(conf, correct, 0.25) == 0.6  # all four: one wrong in four
    assert select_threshold(conf, correct, 0.2) == 0.8  # 0.7 would answer one wrong in three
    assert select_threshold(np.array([0.9, 0.5]), np.array([False, True]), 0.0) == math.inf  # escalate all
    rows = risk_coverage(conf, correct)
    assert [(r["coverage"], round(r["risk"], 3)) for r in rows] == [(0.25, 0), (0.5, 0), (0.75, 0.333), (1.0, 0.25)]


def test_platt_recovers_a_logistic_and_orders_scores(tmp_path):
    rng = np.random.default_rng(1)
    s = rng.normal(0, 2, 5000)
    correct = rng.random(5000) < 1 / (1 + np.exp(-(1.5 * s - 0.5)))
    cal = fit_calibration(s, correct, "mean_logprob")
    assert abs(cal.a - 1.5) < 0.15 and abs(cal.b + 0.5) < 0.15
    p = cal(np.sort(s))
    assert np.all(np.diff(p) >= 0)  # monotone: calibration never reorders items
    cal.save(tmp_path / "cal.json")
    again = load_calibration(tmp_path / "cal.json")
    assert again.a == cal.a and again.threshold(0.1) == cal.threshold(0.1)


def test_bad_calibration_input_is_one_line(tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(ValueError, match=r"bad.json: not JSON .*slm cascade calibrate"):
        load_calibration(bad)
    bad.write_text(json.dumps({"feature": "x"}))
    with pytest.raises(ValueError, match=r"not a calibration file"):
        load_calibration(bad)
    with pytest.raises(FileNotFoundError, match=r"no such calibration file"):
        load_calibration(tmp_path / "missing.json")
    with pytest.raises(ValueError, match=r"one correctness flag per score"):
        fit_calibration([0.1, 0.2], [True], "mean_logprob")
    with pytest.raises(ValueError, match=r"target error must be between 0 and 1"):
        select_threshold(np.array([0.5]), np.array([True]), 5)
    with pytest.raises(ValueError, match=r"unknown confidence feature 'vibes'"):
        confidence("vibes", [0.0])


def test_confidence_features():
    assert confidence("mean_logprob", [-1.0, -3.0]) == -2.0
    assert token_entropy(np.log([0.5, 0.5])) == pytest.approx(math.log(2))
    assert token_entropy(np.log([0.5])) == pytest.approx(math.log(2))  # the missing half is one more outcome
    assert confidence("neg_entropy", None, np.log([[1.0, 1e-12], [0.5, 0.5]])) == pytest.approx(-math.log(2) / 2,
                                                                                                 abs=1e-6)
    assert confidence("agreement", answer="Paris.", samples=["paris", "Lyon", " Paris "]) == pytest.approx(2 / 3)
    assert is_correct("It is Paris, of course.", "paris") and not is_correct("Parisian", "Paris")


# --- the generation cascade ---

def test_cascade_routes_on_both_sides_of_the_threshold(small):
    prompt = "the cat"
    cal = Calibration(feature="mean_logprob", a=1.0, b=0.0, scores=[0.0], correct=[True])
    probe = Cascade(small, Fixed(), cal, threshold=0.0)
    small_text = small.generate(prompt, GREEDY)[0]
    p = cal(probe.score_answer(prompt, small_text))
    assert 0 < p < 1
    below, above = Fixed(), Fixed()
    answers_itself = Cascade(small, below, cal, threshold=p - 1e-6)
    assert answers_itself.generate([prompt], GREEDY) == [small_text] and below.calls == 0
    escalates = Cascade(small, above, cal, threshold=p + 1e-6)
    assert escalates.generate([prompt], GREEDY) == ["LARGE ANSWER"] and above.calls == 1
    a, b = answers_itself.answers[-1], escalates.answers[-1]
    assert (a.answered_by, b.answered_by) == ("small", "large")
    assert a.confidence == pytest.approx(p) and b.confidence == pytest.approx(p)
    assert escalates.counts == {"small": 0, "large": 1}


def test_cascade_agreement_of_samples(small):
    cal = Calibration(feature="agreement", method="identity", scores=[1.0], correct=[True])
    cascade = Cascade(small, Fixed(), cal, threshold=0.0, n_samples=3)
    text = cascade.generate("the cat", GREEDY)[0]
    samples = [small.generate("the cat", SamplingParams(max_new_tokens=8, temperature=0.8, seed=1 + i))[0]
               for i in range(3)]
    expected = confidence("agreement", answer=text, samples=samples)
    assert cascade.answers[-1].score == pytest.approx(expected) and cascade.answers[-1].answered_by == "small"


def test_cascade_is_an_lm(small, tmp_path):
    from slmkit.eval.harness import evaluate
    from slmkit.eval.tasks import load_task
    items = tmp_path / "qa.jsonl"
    items.write_text("".join(json.dumps({"question": q, "answer": "mat"}) + "\n" for q in ["the cat sat on the",
                                                                                          "a bird"]))
    cal = Calibration(feature="mean_logprob", scores=[0.0], correct=[True])
    large = Fixed("mat")
    cascade = Cascade(small, large, cal, threshold=math.inf)  # everything escalates: the large answers "mat"
    result = evaluate(cascade, load_task(items), progress=False)
    assert result.metrics["exact_match"].value == 1.0
    assert cascade.counts == {"small": 0, "large": 2}
    # scoring is the small model's
    assert cascade.score("the cat", " sat").logprob == pytest.approx(small.score("the cat", " sat").logprob)
    with pytest.raises(ValueError, match=r"a target error or a threshold"):
        Cascade(small, large, cal)
    with pytest.raises(ValueError, match=r"not a generation confidence"):
        Cascade(small, large, Calibration(feature="probability", scores=[1.0], correct=[True]), threshold=0.5)


def test_cascade_escalates_to_a_handoff_queue(small, tmp_path):
    queue = HandoffQueue(tmp_path / "tickets.jsonl")
    cal = Calibration(feature="mean_logprob", scores=[0.0], correct=[True])
    cascade = Cascade(small, queue, cal, threshold=math.inf)
    reply = "".join(cascade.stream_chat([{"role": "user", "content": "my parcel is lost"}], GREEDY))
    ticket = json.loads((tmp_path / "tickets.jsonl").read_text())
    assert ticket["ticket"] in reply and ticket["messages"][0]["content"] == "my parcel is lost"
    assert cascade.answers[-1].answered_by == "large"


def test_calibrate_and_the_cli(small, small_dir, tmp_path):
    completion = small.generate("the cat", GREEDY)[0]
    items = [{"prompt": "the cat", "answer": completion.strip().split()[0]}, {"prompt": "a bird", "answer": "zebra"},
             {"prompt": "the dog", "answer": "zebra"}]
    cal = calibrate(small, items, max_new_tokens=8)
    assert cal.correct == [True, False, False] and cal.feature == "mean_logprob" and len(cal.scores) == 3
    with pytest.raises(ValueError, match=r"dev:2: needs a string \"prompt\""):
        calibrate(small, [items[0], {"prompt": "x"}])
    dev = tmp_path / "dev.jsonl"
    dev.write_text("".join(json.dumps(i) + "\n" for i in items))
    runner = CliRunner()
    model_dir = str(small_dir)
    r = runner.invoke(cli_app, ["cascade", "calibrate", model_dir, "--dev", str(dev), "-o", str(tmp_path / "c.json"),
                                "--max-tokens", "8"])
    assert r.exit_code == 0, r.output
    assert json.loads(r.output)["small_accuracy"] == pytest.approx(1 / 3)
    assert load_calibration(tmp_path / "c.json").correct == [True, False, False]
    r = runner.invoke(cli_app, ["serve", model_dir, "--escalate-to", "queue:x.jsonl"])
    assert r.exit_code == 2 and "error: --escalate-to needs --calibration FILE" in r.output


# --- the classifier cascade ---

class Probs:
    """A stand-in small classifier with fixed calibrated probabilities."""

    class info:
        labels = ["a", "b"]

    def __init__(self, table):
        self.table = table

    def predict_proba(self, texts):
        return np.array([self.table[t] for t in texts])


def test_classifier_cascade_threshold_and_routing():
    small = Probs({"x": [0.95, 0.05], "y": [0.4, 0.6], "z": [0.7, 0.3], "w": [0.8, 0.2]})
    calls = []

    def large(texts):
        calls.append(list(texts))
        return ["b"] * len(texts)
    # dev: x right (a), w right (a), z wrong (gold b), y right (b): error 1/4 at 0.6, 1/3 at 0.7, 0 at 0.8
    cascade = ClassifierCascade.for_target(small, large, ["x", "y", "z", "w"], ["a", "b", "b", "a"], 0.2)
    assert cascade.threshold == 0.8
    out = cascade.predict(["x", "z", "w", "y"])
    assert [(p.label, p.answered_by) for p in out] == [("a", "small"), ("b", "large"), ("a", "small"),
                                                       ("b", "large")]
    assert calls == [["z", "y"]] and cascade.counts == {"small": 2, "large": 2}
    # a large LM whose reply names no label (None) leaves the small model's answer, counted as the small's
    unsure = ClassifierCascade(small, lambda texts: [None] * len(texts), threshold=0.8)
    assert [(p.label, p.answered_by) for p in unsure.predict(["x", "z"])] == [("a", "small"), ("a", "small")]
    assert unsure.counts == {"small": 2, "large": 0}
    broken = ClassifierCascade(small, lambda texts: [], threshold=1.0)
    with pytest.raises(ValueError, match=r"returned 0 labels for 1 texts"):
        broken.predict(["x"])


def test_label_word_labeler_agrees_with_scores(small):
    pet = PET(["{text}"], {"cat": " sat", "dog": " ran"})
    probs = label_word_probabilities(small, pet, ["the cat", "the dog"])
    lp = np.array([[small.score(t, w).logprob for w in (" sat", " ran")] for t in ["the cat", "the dog"]])
    expected = np.exp(lp) / np.exp(lp).sum(1, keepdims=True)
    assert np.allclose(probs, expected, atol=1e-5)
    assert label_word_labeler(small, pet)(["the cat", "the dog"]) == [pet.labels[i] for i in expected.argmax(1)]


# --- serving ---

def post_chat(url: str, body: dict) -> tuple[int, dict, str]:
    """POST a chat completion to a live server: (status, headers, body text)."""
    import http.client
    host, port = url.removeprefix("http://").split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=60)
    conn.request("POST", "/v1/chat/completions", body=json.dumps(body), headers={"Content-Type": "application/json"})
    r = conn.getresponse()
    return r.status, dict(r.getheaders()), r.read().decode()


def test_serve_escalation_field_header_and_metrics(small, tmp_path):
    pytest.importorskip("fastapi")
    import http.client

    from slmkit.serve.app import create_app
    from slmkit.serve.engine import Engine
    from slmkit.serve.escalate import Escalation, load_escalation
    cal = Calibration(feature="mean_logprob", scores=[0.0], correct=[True])
    large = Fixed("from the large model")
    escalation = Escalation(large, cal, threshold=0.0)  # every p > 0: the small model answers
    engine = Engine(small, max_batch=4, max_queue=8)

    chat = {"messages": [{"role": "user", "content": "the cat"}], "max_tokens": 6, "temperature": 0}
    try:
        with live_server(create_app(engine, "tiny", escalation=escalation)) as url:
            status, headers, data = post_chat(url, chat)
            body = json.loads(data)
            assert status == 200 and headers["x-slmkit-answered-by"] == "small"
            assert body["slmkit"]["answered_by"] == "small" and 0 < body["slmkit"]["confidence"] < 1
            small_text = body["choices"][0]["message"]["content"]
            assert small_text != "from the large model" and body["choices"][0]["logprobs"] is None
            # the server scores the reply as calibration (Cascade.score_answer) does
            prompt = small.tokenizer.apply_chat_template(chat["messages"], add_generation_prompt=True)
            expected = cal(Cascade(small, large, cal, threshold=0.0).score_answer(prompt, small_text))
            assert body["slmkit"]["confidence"] == pytest.approx(expected, abs=1e-4)
            escalation.threshold = math.inf
            status, headers, data = post_chat(url, chat)
            body = json.loads(data)
            assert headers["x-slmkit-answered-by"] == "large" and body["slmkit"]["answered_by"] == "large"
            assert body["choices"][0]["message"]["content"] == "from the large model" and large.calls == 1
            status, headers, data = post_chat(url, {**chat, "stream": True})
            chunks = [json.loads(line[6:]) for line in data.splitlines() if line.startswith("data: {")]
            assert headers["x-slmkit-answered-by"] == "large" and chunks[0]["slmkit"]["answered_by"] == "large"
            assert "".join(c["choices"][0]["delta"].get("content", "") for c in chunks) == "from the large model"
            status, _, data = post_chat(url, {**chat, "n": 2})
            assert status == 400 and "one choice" in json.loads(data)["error"]["message"]
            host, port = url.removeprefix("http://").split(":")
            conn = http.client.HTTPConnection(host, int(port), timeout=30)
            conn.request("GET", "/metrics")
            metrics = conn.getresponse().read().decode()
            assert 'slmkit_cascade_answers_total{answered_by="small"} 1' in metrics
            assert 'slmkit_cascade_answers_total{answered_by="large"} 2' in metrics
    finally:
        engine.close()
    cal_file = tmp_path / "cal.json"
    Calibration(feature="agreement", scores=[1.0], correct=[True]).save(cal_file)
    with pytest.raises(ValueError, match=r"feature 'agreement' cannot be served"):
        load_escalation("queue:" + str(tmp_path / "q.jsonl"), cal_file)


def test_serve_escalation_with_tools(tmp_path):
    """Tools under the cascade: the small model's call keeps to the schema; the target's <tool_call> parses,
    streamed and not."""
    pytest.importorskip("fastapi")
    from slmkit.serve.app import create_app
    from slmkit.serve.engine import Engine
    from slmkit.serve.escalate import Escalation
    tok = train_tokenizer([TEXT] * 40, vocab_size=300)
    small = load_lm(str(tiny_model_dir(tmp_path / "m", tok, max_seq_len=2048)))  # room for the tools' message
    escalation = Escalation(Fixed(), Calibration(feature="mean_logprob", scores=[0.0], correct=[True]), 0.0)
    engine = Engine(small, max_batch=2, max_queue=8)
    tool = {"type": "function", "function": {"name": "get_order", "parameters": {
        "type": "object", "properties": {"order_id": {"type": "string", "pattern": "^KB-[0-9]{3}$"}},
        "required": ["order_id"], "additionalProperties": False}}}
    ask = {"messages": [{"role": "user", "content": "where is KB-204?"}], "tools": [tool], "tool_choice": "required",
           "max_tokens": 400, "temperature": 1.0, "seed": 0}

    try:
        with live_server(create_app(engine, "tiny", escalation=escalation)) as url:
            status, headers, data = post_chat(url, ask)  # a random model: only the grammar makes its call parse
            assert status == 200 and headers["x-slmkit-answered-by"] == "small", data
            choice = json.loads(data)["choices"][0]
            assert "tool_calls" in choice["message"], choice
            (call,) = choice["message"]["tool_calls"]
            assert choice["finish_reason"] == "tool_calls" and call["function"]["name"] == "get_order"
            assert re.fullmatch(r"KB-[0-9]{3}", json.loads(call["function"]["arguments"])["order_id"])
            escalation.threshold = math.inf
            escalation.large = Fixed('<tool_call>{"name": "get_order", "arguments": {"order_id": "KB-204"}}'
                                     '</tool_call>')
            for streamed in (False, True):
                status, headers, data = post_chat(url, {**ask, "stream": streamed})
                assert status == 200 and headers["x-slmkit-answered-by"] == "large", data
                if streamed:
                    chunks = [json.loads(line[6:]) for line in data.splitlines() if line.startswith("data: {")]
                    (call,) = [c for ch in chunks for c in ch["choices"][0]["delta"].get("tool_calls") or []]
                    assert chunks[-1]["choices"][0]["finish_reason"] == "tool_calls" and call["index"] == 0
                else:
                    (call,) = json.loads(data)["choices"][0]["message"]["tool_calls"]
                assert json.loads(call["function"]["arguments"]) == {"order_id": "KB-204"}
    finally:
        engine.close()


def test_classify_cascade_cli(small_dir, tmp_path):
    from slmkit.classify.head import train_classifier
    texts = ["the cat sat", "the cat ran", "a bird sang", "the bird sat", "the dog ran", "a cat sang"]
    labels = ["cat", "cat", "bird", "bird", "dog", "cat"]
    clf = train_classifier(small_dir, texts, labels, epochs=20, log=lambda m: None)
    clf.save(tmp_path / "clf")
    rows = lambda ts, ys: "".join(json.dumps({"text": t, "label": y}) + "\n" for t, y in zip(ts, ys, strict=True))  # noqa: E731
    (tmp_path / "dev.jsonl").write_text(rows(texts, labels))
    (tmp_path / "new.jsonl").write_text(rows(texts[:3], labels[:3]))
    runner = CliRunner()
    for large in (str(tmp_path / "clf"), str(small_dir)):  # a classifier, or an LM scoring the label names
        r = runner.invoke(cli_app, ["classify", "cascade", str(tmp_path / "clf"), "--escalate-to", large,
                                    "--dev", str(tmp_path / "dev.jsonl"), "--data", str(tmp_path / "new.jsonl"),
                                    "--target-error", "0"])
        assert r.exit_code == 0, r.output
        records = [json.loads(line) for line in r.stdout.splitlines() if line.startswith("{\"text\"")]
        assert len(records) == 3 and {x["label"] for x in records} <= {"cat", "bird", "dog"}
        assert all(x["answered_by"] in ("small", "large") for x in records)
    (tmp_path / "bad.jsonl").write_text(rows(["x"], ["zebra"]))
    r = runner.invoke(cli_app, ["classify", "cascade", str(tmp_path / "clf"), "--escalate-to", str(tmp_path / "clf"),
                                "--dev", str(tmp_path / "bad.jsonl"), "--data", str(tmp_path / "new.jsonl")])
    assert r.exit_code == 2 and "labels ['zebra'] are not the classifier's" in r.output


def test_risk_coverage_plot(tmp_path):
    from slmkit.eval.risk_coverage import plot_risk_coverage
    rows = risk_coverage(np.array([0.9, 0.8, 0.7, 0.6]), np.array([True, True, False, True]))
    path = plot_risk_coverage({"small": rows}, tmp_path / "rc.png", target_error=0.05, points={"chosen": (0.5, 0.0)})
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and not list(tmp_path.glob("*.tmp*"))
