"""SuperICL: the prompt (demos with the small model's labels and confidences), the large LM's choice kept to the
label set, override accounting, a text-only remote LM, and `slm classify supericl`."""

import json
import re
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import numpy as np
import pytest
import torch
from conftest import tiny_model_dir
from typer.testing import CliRunner

from slmkit.classify.head import train_classifier
from slmkit.classify.supericl import (
    Demo,
    SuperICLPrediction,
    format_prompt,
    icl_predict,
    label_with_lm,
    override_counts,
    parse_label,
    select_demos,
    supericl_predict,
)
from slmkit.cli import app
from slmkit.lm.base import LM
from slmkit.lm.remote_lm import RemoteLM
from slmkit.lm.torch_lm import TorchLM
from slmkit.tokenizer import train_tokenizer

FRUIT = ["apple pie", "banana bread", "cherry jam", "apple juice", "banana split", "cherry tart"]
TOOLS = ["hammer nail", "saw wood", "drill hole", "hammer time", "saw dust", "drill bit"]
TEXT = " ".join(f"Input: {t}\nLabel: food\nInput: {u}\nLabel: work\n" for t, u in zip(FRUIT, TOOLS, strict=True))
EXAMPLES = [(t, "food") for t in FRUIT] + [(t, "work") for t in TOOLS]


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("supericl")
    tok = train_tokenizer([TEXT] * 30, vocab_size=300)
    torch.manual_seed(0)
    model = tiny_model_dir(root / "model", tok, train_on=TEXT, steps=20, max_seq_len=256)
    texts, labels = [t for t, _ in EXAMPLES], [y for _, y in EXAMPLES]
    clf = train_classifier(model, texts, labels, dev=(texts, labels), epochs=150, log=lambda m: None)
    clf.save(root / "clf")
    return {"root": root, "model": model, "clf": clf}


class TextOnly(LM):
    """A text-only LM (no tokenizer, no log-probs) that answers `reply(prompt)` and records its prompts."""

    name = "text-only"

    def __init__(self, reply):
        self.reply, self.prompts = reply, []

    def score_many(self, requests):
        raise NotImplementedError("text only")

    def sampling_params(self, **given):
        return given

    def generate(self, prompts, params=None, heal=False):
        self.prompts += list(prompts)
        return [self.reply(p) for p in prompts]


def test_prompt_holds_each_demo_with_the_small_models_label_and_confidence(world):
    clf = world["clf"]
    lm = TextOnly(lambda p: " food")
    preds = supericl_predict(lm, clf, EXAMPLES, ["apple tart", "saw blade"], k=4, seed=1)
    demos = select_demos(EXAMPLES, 4, seed=1)
    assert len(demos) == 4 and {y for _, y in demos} == {"food", "work"}  # round-robin: both labels shown
    small = clf.predict([t for t, _ in demos])
    prompt = lm.prompts[0]
    assert prompt.startswith("Classify each input as one of: food, work.\n")
    for (text, gold), (label, conf) in zip(demos, small, strict=True):
        assert f"Input: {text}\nSmall model: {label} (confidence {conf:.2f})\nLabel: {gold}\n" in prompt
    test_label, test_conf = clf.predict(["apple tart"])[0]
    assert prompt.endswith(f"Input: apple tart\nSmall model: {test_label} (confidence {test_conf:.2f})\nLabel:")
    assert prompt.count("Input:") == 5 and prompt.count("Small model:") == 5
    assert preds[0].small_label == test_label and preds[0].small_confidence == pytest.approx(test_conf)
    # the baseline is the very same prompt without the small model's lines
    icl_predict(lm, EXAMPLES, ["apple tart"], ["food", "work"], k=4, seed=1)
    assert lm.prompts[-1] == re.sub(r"Small model: .*\n", "", prompt)
    with pytest.raises(ValueError, match=r"demo label\(s\) \['fish'\] are not in the label set"):
        label_with_lm(lm, [Demo("cod", "fish")], ["x"], ["food", "work"])


def test_scoring_picks_the_likeliest_label_and_only_labels(world):
    lm = TorchLM.load(world["model"])
    labels = ["food", "work", "zebra crossing"]
    demos = [Demo(t, y) for t, y in EXAMPLES[:2] + EXAMPLES[-2:]]
    answers = label_with_lm(lm, demos, ["cherry pie", "drill press"], labels, method="score")
    for text, answer in zip(["cherry pie", "drill press"], answers, strict=True):
        prompt = format_prompt(demos, text, labels)
        scores = np.array([s.logprob for s in lm.score_many([(prompt, " " + y) for y in labels])])
        assert answer.label == labels[int(scores.argmax())] and answer.method == "score"
        assert answer.confidence == pytest.approx(float(np.exp(scores.max()) / np.exp(scores).sum()), rel=1e-4)
    # generated replies are matched to the label set, never passed through
    assert [parse_label(r, ["get_weather", "play_music", "book_restaurant"]) for r in
            [" play_music", "Get Weather.", "it is to book restaurant, then play music", "get_wether", "xyzzy", ""]
            ] == ["play_music", "get_weather", "book_restaurant", "get_weather", None, None]
    odd = label_with_lm(TextOnly(lambda p: " 'WORK'!"), demos, ["saw"], ["food", "work"])
    assert odd[0].label == "work" and odd[0].method == "generate" and odd[0].reply == " 'WORK'!"
    with pytest.raises(ValueError, match="method must be one of"):
        label_with_lm(lm, demos, ["saw"], labels, method="vote")


def test_overrides_are_counted_right_wrong_and_neither(world):
    clf = world["clf"]
    texts = ["apple pie", "saw wood", "cherry jam"]
    small = [y for y, _ in clf.predict(texts)]
    assert small == ["food", "work", "food"]
    preds = supericl_predict(TextOnly(lambda p: " work"), clf, EXAMPLES, texts, k=2)
    assert [p.label for p in preds] == ["work"] * 3 and [p.overridden for p in preds] == [True, False, True]
    unparsed = supericl_predict(TextOnly(lambda p: " no idea"), clf, EXAMPLES, texts, k=2)
    assert [p.label for p in unparsed] == small and not any(p.overridden for p in unparsed)

    def pred(small_label, final):
        return SuperICLPrediction("t", final, small_label, 0.5, final != small_label)
    golds = ["a", "a", "b", "c", "a"]
    preds = [pred("b", "a"), pred("a", "b"), pred("a", "c"), pred("c", "c"), pred("a", "a")]
    assert override_counts(preds, golds) == {"overridden": 3, "rate": 0.6, "right": 1, "wrong": 1, "neither": 1}


class _Server(BaseHTTPRequestHandler):
    """An OpenAI-compatible endpoint that only generates (no prompt log-probs): it trusts the small model's
    prediction in the prompt, in its own spelling."""

    def log_message(self, *args):
        pass

    def _send(self, obj, status=200):
        data = json.dumps(obj).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def do_GET(self):
        self._send({"object": "list", "data": [{"id": "big", "object": "model"}]})

    def do_POST(self):
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        if body.get("echo"):
            return self._send({"error": {"message": "Only no echo is supported"}}, 400)
        said = re.findall(r"Small model: (\w+)", body["prompt"])
        self._send({"choices": [{"index": 0, "text": f" {said[-1].upper()}." if said else " Work"}]})


def test_a_text_only_remote_lm_generates_and_its_reply_is_parsed(world):
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Server)
    threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
    try:
        lm = RemoteLM(f"http://127.0.0.1:{server.server_address[1]}")
        texts = ["banana split", "hammer time"]  # training texts: the small model gets them right
        preds = supericl_predict(lm, world["clf"], EXAMPLES, texts, k=4)
        assert [p.method for p in preds] == ["generate"] * 2
        assert [p.label for p in preds] == [p.small_label for p in preds] == ["food", "work"]
        alone = icl_predict(lm, EXAMPLES, texts, ["food", "work"], k=4)
        assert [a.label for a in alone] == ["work", "work"] and alone[0].confidence is None
    finally:
        server.shutdown()
        server.server_close()


def test_cli_prints_records_and_metrics_and_bad_input_is_one_line(world, tmp_path):
    demos, data = tmp_path / "demos.jsonl", tmp_path / "data.jsonl"
    demos.write_text("".join(json.dumps({"text": t, "label": y}) + "\n" for t, y in EXAMPLES))
    data.write_text(json.dumps({"text": "apple tart", "label": "food"}) + "\n"
                    + json.dumps({"text": "saw blade", "label": "work"}) + "\n")
    runner = CliRunner()
    base = ["classify", "supericl", str(world["root"] / "clf"), "--large", str(world["model"]), "--demos",
            str(demos), "--data", str(data), "--k", "4"]
    r = runner.invoke(app, base + ["--explain"])
    assert r.exit_code == 0, r.output
    records = [json.loads(line) for line in r.stdout.splitlines()]
    assert [rec["text"] for rec in records] == ["apple tart", "saw blade"]
    for rec in records:
        assert rec["label"] in ("food", "work") and rec["method"] == "score" and isinstance(rec["explanation"], str)
        assert rec["overridden"] == (rec["label"] != rec["small_label"]) and 0 < rec["small_confidence"] <= 1
    metrics = json.loads(r.stderr.strip().splitlines()[-1])
    correct = sum(rec["label"] == gold for rec, gold in zip(records, ["food", "work"], strict=True))
    assert metrics["accuracy"]["value"] == correct / 2 and metrics["overrides"]["overridden"] == sum(
        rec["overridden"] for rec in records)
    r = runner.invoke(app, base + ["--baseline"])
    assert r.exit_code == 0, r.output
    assert all("small_label" not in json.loads(line) for line in r.stdout.splitlines())

    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"text": "a", "label": "food"}) + "\n" + json.dumps({"text": "b", "label": "fish"}))
    nameless = tmp_path / "nameless.jsonl"
    nameless.write_text(json.dumps({"body": "saw"}) + "\n")
    for args, message in [(["--demos", str(bad)], f"error: {bad}:2: label 'fish' is not one of the classifier's"),
                          (["--data", str(nameless)], f"error: {nameless}:1: needs a string field 'text'"),
                          (["--method", "vote"], "error: method must be one of auto, score, generate")]:
        r = runner.invoke(app, base + args)
        assert r.exit_code == 2 and r.stderr.startswith(message) and len(r.stderr.strip().splitlines()) == 1, \
            r.output
