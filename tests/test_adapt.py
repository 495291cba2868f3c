"""Classification head with calibrated confidence, and PET (patterns + verbalisers) on a tiny model."""

import numpy as np
import pytest
import torch
from conftest import tiny_model_dir

from slmkit.classify.head import Classifier, expected_calibration_error, features, fit_temperature, train_classifier
from slmkit.classify.pet import PET, predict, slot_logprobs, train_pet
from slmkit.formats.hf_dir import load_model_dir
from slmkit.tokenizer import train_tokenizer

FRUIT = ["apple pie", "banana bread", "cherry jam", "apple juice", "banana split", "cherry tart"]
TOOLS = ["hammer nail", "saw wood", "drill hole", "hammer time", "saw dust", "drill bit"]
TEXT = " ".join(f"{t} is food. {u} is work." for t, u in zip(FRUIT, TOOLS, strict=True))


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    tok = train_tokenizer([TEXT] * 30, vocab_size=300)
    torch.manual_seed(0)  # a module fixture runs before the per-test seed: seed its initialisation here
    return tiny_model_dir(tmp_path_factory.mktemp("m") / "model", tok, train_on=TEXT, steps=100)


def test_features_are_the_last_real_token_whatever_the_padding(base):
    from slmkit.tokenizer import load_tokenizer
    model, tok = load_model_dir(base), load_tokenizer(base)
    together = features(model, tok, ["apple pie", "a much longer text about banana bread"])
    alone = features(model, tok, ["apple pie"])
    assert torch.allclose(together[0], alone[0], atol=1e-5)


def test_head_classifier_trains_calibrates_saves_and_loads(base, tmp_path):
    texts, labels = FRUIT + TOOLS, ["food"] * 6 + ["work"] * 6
    clf = train_classifier(base, texts, labels, dev=(texts, labels), epochs=300, log=lambda m: None)
    assert clf.info.metrics["dev_accuracy"] == 1.0 and clf.info.temperature > 0
    assert [label for label, _ in clf.predict(["apple pie", "saw wood"])] == ["food", "work"]
    clf.save(tmp_path / "clf")
    again = Classifier.load(tmp_path / "clf")
    assert np.allclose(again.predict_proba(texts), clf.predict_proba(texts), atol=1e-5)
    with pytest.raises(FileNotFoundError, match="not a classifier directory"):
        Classifier.load(tmp_path)


def test_temperature_scaling_and_ece():
    torch.manual_seed(0)
    golds = torch.randint(0, 3, (400,))
    logits = torch.randn(400, 3)
    logits[torch.arange(400), golds] += 1.0  # right 60% of the time ...
    overconfident = logits * 8  # ... but claims ~100%
    t = fit_temperature(overconfident, golds)
    assert 5 < t < 12  # recovers the scale that was put in
    probs = lambda z: torch.softmax(z, -1).numpy()  # noqa: E731
    assert expected_calibration_error(probs(overconfident / t), golds.numpy()) < \
        expected_calibration_error(probs(overconfident), golds.numpy()) / 2


def test_pet_zero_shot_training_and_ensemble(base):
    from slmkit.tokenizer import load_tokenizer
    model, tok = load_model_dir(base), load_tokenizer(base)
    pet = PET(patterns=["{text} is", "{text} is"], verbalizers={"food": " food", "work": " work"})
    logp = slot_logprobs(model, tok, pet, FRUIT[:2], pet.patterns[0])
    assert logp.shape == (2, 2) and torch.allclose(logp.exp().sum(-1), torch.ones(2), atol=1e-5)
    texts, labels = FRUIT + TOOLS, ["food"] * 6 + ["work"] * 6
    train_pet(model, tok, pet, texts, labels, epochs=8, lr=3e-3, log=lambda m: None)
    probs = predict(model, tok, pet, texts)
    assert (probs.argmax(1) == np.array([0] * 6 + [1] * 6)).mean() == 1.0
    with pytest.raises(ValueError, match="start with the same token"):
        PET(["{text} is"], {"a": " food", "b": " food court"}).slot_tokens(tok)


def test_classify_cli_train_predict_eval(base, tmp_path):
    import json

    from typer.testing import CliRunner

    from slmkit.cli import app
    data = tmp_path / "train.jsonl"
    rows = [{"text": t, "label": "food"} for t in FRUIT] + [{"text": t, "label": "work"} for t in TOOLS]
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    runner = CliRunner()
    for method, extra in [("head", []), ("pet", ["--pattern", "{text} is", "--verbalizer", "food= food",
                                                 "--verbalizer", "work= work", "--epochs", "8", "--lr", "3e-3"])]:
        out = tmp_path / method
        r = runner.invoke(app, ["classify", "train", str(base), "--data", str(data), "--dev", str(data), "-o", str(out),
                                "--method", method, *extra])
        assert r.exit_code == 0, r.output
        predicted = [json.loads(line) for line in runner.invoke(
            app, ["classify", "predict", str(out), "--data", str(data)]).output.splitlines()]
        assert [p["label"] for p in predicted] == [r["label"] for r in rows]
        assert all(0 < p["confidence"] <= 1 for p in predicted)
        report = json.loads(runner.invoke(app, ["classify", "eval", str(out), "--data", str(data)]).output)
        assert report["accuracy"]["value"] == 1.0 and len(report["confusion"]) == 2
    bad = runner.invoke(app, ["classify", "train", str(base), "--data", str(data), "-o", str(tmp_path / "x"),
                              "--method", "pet", "--pattern", "{text} is", "--verbalizer", "food= food"])
    assert bad.exit_code == 2 and "no --verbalizer for label(s) work" in bad.output
