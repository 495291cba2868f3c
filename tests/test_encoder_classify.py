"""Classifiers on an encoder (classify/head.py: mean-pooled features, frozen or fine-tuned) and length-adaptive
token pruning (model/length_drop.py, classify/prune.py, `slm classify prune`), on a tiny random BERT."""

import json
import re

import pytest
import torch
from conftest import write_wordpiece
from typer.testing import CliRunner

from slmkit.classify.head import Classifier, train_classifier
from slmkit.cli import app
from slmkit.formats.encoder_dir import is_encoder_dir, load_encoder_dir, save_encoder_dir
from slmkit.model.encoder import Encoder, EncoderConfig
from slmkit.model.length_drop import attention_with_probs, encoder_flops, kept_lengths, significance, smallest_keep
from slmkit.tokenizer import load_tokenizer

COLOURS = ["red", "green", "blue"]
FILLER = ["the", "a", "big", "small", "box", "is", "very", "quite", "my", "old", "car", "hat", "now", "and"]


def tiny_data(n_per_label=6, seed=0):
    """Labelled texts: a few filler words and one colour word that is the label (linearly separable)."""
    g = torch.Generator().manual_seed(seed)
    texts, labels = [], []
    for i in range(n_per_label):
        for colour in COLOURS:
            words = [FILLER[j] for j in torch.randint(0, len(FILLER), (4 + i % 4,), generator=g).tolist()]
            words.insert(int(torch.randint(0, len(words), (1,), generator=g)), colour)
            texts.append(" ".join(words))
            labels.append(colour)
    return texts, labels


def tiny_bert(path, n_layers=2, seed=0):
    """A random BERT directory with a WordPiece tokenizer whose post-processor adds [CLS] ... [SEP]."""
    vocab = {t: i for i, t in enumerate(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *COLOURS, *FILLER])}
    write_wordpiece(path, vocab, pair=False)
    torch.manual_seed(seed)
    model = Encoder(EncoderConfig(vocab_size=len(vocab), dim=32, n_layers=n_layers, n_heads=4, hidden_dim=64,
                                  max_positions=32))
    save_encoder_dir(model, path, tokenizer=load_tokenizer(path / "tokenizer.json"))
    return path


def write_jsonl(path, texts, labels):
    path.write_text("".join(json.dumps({"text": t, "label": y}) + "\n" for t, y in zip(texts, labels, strict=True)))
    return path


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tensors this small gain nothing from a second thread, and on a shared machine two mostly wait for each
    other (this file took 5 minutes instead of 30 s with 2 threads on 2 busy cores)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def bert(tmp_path_factory):
    return tiny_bert(tmp_path_factory.mktemp("enc") / "bert")


@pytest.fixture(scope="module")
def full_clf(bert, tmp_path_factory):
    """A fine-tuned (body trained) encoder classifier directory."""
    texts, labels = tiny_data()
    clf = train_classifier(bert, texts, labels, dev=tiny_data(2, seed=1), train_body=True, epochs=8, lr=1e-3,
                           log=lambda m: None)
    out = tmp_path_factory.mktemp("clf") / "full"
    clf.save(out)
    return out


def accuracy(clf, texts, labels):
    return sum(y == g for (y, _), g in zip(clf.predict(texts), labels, strict=True)) / len(labels)


# --- part A: the classifier on an encoder ---

def test_a_frozen_encoder_head_fits_separable_data_and_round_trips(bert, tmp_path):
    texts, labels = tiny_data()
    before = load_encoder_dir(bert).state_dict()
    clf = train_classifier(bert, texts, labels, dev=tiny_data(2, seed=1), log=lambda m: None)
    assert accuracy(clf, texts, labels) == 1.0
    assert all(torch.equal(v, clf.model.state_dict()[k]) for k, v in before.items())  # frozen
    clf.save(tmp_path / "c")
    assert not (tmp_path / "c" / "model").exists()  # the base encoder is referenced, not copied
    again = Classifier.load(tmp_path / "c")
    assert torch.equal(torch.tensor(again.predict_proba(texts)), torch.tensor(clf.predict_proba(texts)))


def test_fine_tuning_the_encoder_fits_saves_an_encoder_dir_and_predicts_identically(full_clf, bert):
    texts, labels = tiny_data()
    clf = Classifier.load(full_clf)
    assert accuracy(clf, texts, labels) == 1.0
    assert is_encoder_dir(full_clf / "model") and json.loads((full_clf / "classifier.json").read_text())[
        "base"] == "model"
    base = load_encoder_dir(bert).state_dict()
    assert any(not torch.equal(v, clf.model.state_dict()[k]) for k, v in base.items())  # the body moved
    again = Classifier.load(full_clf)
    assert torch.equal(torch.tensor(again.predict_proba(texts)), torch.tensor(clf.predict_proba(texts)))


def test_features_are_the_embedders_mean_pooled_vectors_and_dropout_is_on_while_training(bert):
    from slmkit.classify.head import features
    from slmkit.lm.embedder import Embedder
    model, tok = load_encoder_dir(bert), load_tokenizer(bert)
    texts = tiny_data(1)[0]
    assert torch.allclose(features(model, tok, texts), Embedder(model, tok).embed(texts), atol=1e-6)
    model.train()
    a, b = features(model, tok, texts, grad=True), features(model, tok, texts, grad=True)
    assert a.requires_grad and not torch.allclose(a, b) and model.training  # dropout, mode left as it was


def test_cli_train_predict_eval_cascade_on_an_encoder(bert, full_clf, tmp_path):
    texts, labels = tiny_data()
    data = write_jsonl(tmp_path / "train.jsonl", texts, labels)
    dev = write_jsonl(tmp_path / "dev.jsonl", *tiny_data(2, seed=1))
    run = CliRunner().invoke
    r = run(app, ["classify", "train", str(bert), "--data", str(data), "--dev", str(dev), "-o", str(tmp_path / "c")])
    assert r.exit_code == 0, r.output
    r = run(app, ["classify", "predict", str(tmp_path / "c"), "--data", str(data)])
    assert r.exit_code == 0, r.output
    assert [json.loads(line)["label"] for line in r.stdout.splitlines()] == labels
    r = run(app, ["classify", "eval", str(tmp_path / "c"), "--data", str(data)])
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout)["accuracy"]["value"] == 1.0
    # a cascade takes it like any classifier directory (here escalating to a fine-tuned encoder classifier)
    r = run(app, ["classify", "cascade", str(tmp_path / "c"), "--escalate-to", str(full_clf), "--dev", str(data),
                  "--data", str(dev), "--target-error", "0.2"])
    assert r.exit_code == 0, r.output
    records = [json.loads(line) for line in r.stdout.splitlines()]
    assert len(records) == 6 and {rec["answered_by"] for rec in records} <= {"small", "large"}
    r = run(app, ["classify", "train", str(bert), "--data", str(data), "--method", "pet", "--pattern", "{text} is",
                  "--verbalizer", "red=red", "-o", str(tmp_path / "p")])
    assert r.exit_code == 2 and "is an encoder" in r.output


# --- part B: the pruning mechanics ---

def test_keeping_every_token_is_the_full_forward_and_explicit_attention_matches_sdpa(bert):
    model = load_encoder_dir(bert)
    ids = torch.randint(5, model.cfg.vocab_size, (3, 12))
    mask = torch.ones_like(ids)
    mask[1, 8:] = 0
    mask[2, 3:] = 0
    with torch.no_grad():
        full = model(ids, mask)
        hidden, kept = model.forward_pruned(ids, mask, [1.0, 1.0])
        assert torch.equal(kept, mask.bool()) and torch.allclose(hidden, full, atol=1e-6)
        x = model.embeddings(ids)
        attn = model.encoder.layer[0].attention.self
        out, probs = attention_with_probs(attn, x, mask.bool())
        assert torch.allclose(out, attn(x, mask.bool()), atol=1e-5)
        assert torch.allclose(probs.sum(-1), torch.ones(3, 4, 12))


def test_sequence_lengths_follow_the_schedule_and_flops_fall_as_counted(bert):
    model = load_encoder_dir(bert)
    seen = []  # (tokens into attention, tokens out of the layer) per layer, from hooks on the real modules
    hooks = [layer.attention.self.query.register_forward_hook(lambda m, a, o: seen.append(a[0].shape[1]))
             for layer in model.encoder.layer]
    hooks += [layer.output.register_forward_hook(lambda m, a, o: seen.append(o.shape[1]))
              for layer in model.encoder.layer]
    ids = torch.randint(5, model.cfg.vocab_size, (1, 20))
    keep = [0.5, 0.25]
    with torch.no_grad():
        hidden, mask = model.forward_pruned(ids, None, keep)
    assert kept_lengths(20, keep) == [10, 5] and hidden.shape[1] == 5 and mask.all()
    assert sorted(seen) == sorted([20, 10, 10, 5])
    for h in hooks:
        h.remove()
    cfg = model.cfg
    d, f = cfg.dim, cfg.hidden_dim
    by_hand = 2 * ((3 * 20 * d * d + 2 * 20 * 20 * d + 10 * d * d + 2 * 10 * d * f)
                   + (3 * 10 * d * d + 2 * 10 * 10 * d + 5 * d * d + 2 * 5 * d * f))
    assert encoder_flops(cfg, 20, keep) == by_hand < encoder_flops(cfg, 20) == encoder_flops(cfg, 20, [1.0, 1.0])
    # a batch: each row keeps its own share of its own real tokens, padding never
    ids2 = torch.randint(5, cfg.vocab_size, (2, 20))
    mask2 = torch.ones_like(ids2)
    mask2[1, 8:] = 0
    with torch.no_grad():
        _, kept = model.forward_pruned(ids2, mask2, keep)
    assert kept.sum(1).tolist() == [5, 2]
    assert smallest_keep(3, 0.5) == (0.5, 0.25, 0.125)


def test_significance_keeps_the_first_token_and_drops_padding_first():
    probs = torch.zeros(1, 1, 4, 4)
    probs[0, 0, :, 1] = 0.7  # every query attends mostly to token 1 ...
    probs[0, 0, :, 2] = 0.3
    probs[0, 0, 3, :] = 1.0  # ... except padding's query, which must not count
    mask = torch.tensor([[True, True, True, False]])
    s = significance(probs, mask)
    assert s[0, 0] == float("inf") and s[0, 3] == float("-inf") and s[0, 1] > s[0, 2]
    assert torch.allclose(s[0, 1:3], torch.tensor([2.1, 0.9]))
    assert s.topk(2).indices.tolist() == [[0, 1]]


# --- part B: prune end to end ---

def test_prune_end_to_end_writes_a_schedule_that_predict_and_eval_use(full_clf, tmp_path):
    from slmkit.classify.prune import schedule_flops
    from slmkit.lm.embedder import Embedder
    texts, labels = tiny_data()
    data = write_jsonl(tmp_path / "train.jsonl", texts, labels)
    dev = write_jsonl(tmp_path / "dev.jsonl", *tiny_data(3, seed=1))
    run = CliRunner().invoke
    r = run(app, ["classify", "prune", str(full_clf), "--data", str(data), "--dev", str(dev), "--budget", "0.6",
                  "--epochs", "1", "--generations", "2", "--population", "4", "-o", str(tmp_path / "p")])
    assert r.exit_code == 0, r.output
    assert "stage 1 (distillation) epoch 1/1" in r.output and "search generation 2/2" in r.output
    info = json.loads((tmp_path / "p" / "classifier.json").read_text())
    keep = info["length_schedule"]
    assert len(keep) == 2 and keep != [1.0, 1.0] and info["metrics"]["dev_flops"] <= 0.6
    front = info["pareto"]
    assert front and all(a["flops"] <= b["flops"] and a["accuracy"] < b["accuracy"]
                         for a, b in zip(front, front[1:], strict=False))
    clf = Classifier.load(tmp_path / "p")
    assert clf.info.length_schedule == keep and is_encoder_dir(tmp_path / "p" / "model")
    dev_texts = tiny_data(3, seed=1)[0]
    n_tokens = Embedder(clf.model, clf.tokenizer).encode  # the encoder's own tokens, [CLS] ... [SEP]
    assert schedule_flops(clf, [len(n_tokens(t)) for t in dev_texts], keep) <= 0.6 + 1e-9
    # predict runs pruned: the same as the encoder under the schedule, not the full-length encoder
    seen = []
    hook = clf.model.encoder.layer[-1].output.register_forward_hook(lambda m, a, o: seen.append(o.shape[1]))
    clf.predict(["the big red box is very old now"])
    hook.remove()
    n = len(n_tokens("the big red box is very old now"))
    assert seen == [kept_lengths(n, keep)[-1]] and seen[0] < n
    r = run(app, ["classify", "predict", str(tmp_path / "p"), "--data", str(dev)])
    assert r.exit_code == 0, r.output
    assert [json.loads(line)["label"] for line in r.stdout.splitlines()] == [y for y, _ in clf.predict(dev_texts)]
    r = run(app, ["classify", "eval", str(tmp_path / "p"), "--data", str(dev)])
    assert r.exit_code == 0, r.output
    assert abs(json.loads(r.stdout)["accuracy"]["value"] - info["metrics"]["dev_accuracy"]) < 1e-9


def test_prune_refuses_bad_input_in_one_line(full_clf, bert, tmp_path):
    texts, labels = tiny_data(1)
    data = write_jsonl(tmp_path / "train.jsonl", texts, labels)
    frozen = tmp_path / "frozen"
    train_classifier(bert, texts, labels, log=lambda m: None).save(frozen)
    from conftest import tiny_model_dir, translation_tokenizer
    decoder = tmp_path / "decoder-clf"
    train_classifier(tiny_model_dir(tmp_path / "lm", translation_tokenizer()), texts, labels, epochs=2,
                     log=lambda m: None).save(decoder)
    run = CliRunner().invoke
    base = ["classify", "prune", str(full_clf), "--data", str(data), "--dev", str(data), "-o", str(tmp_path / "o")]
    cases = [(base[:2] + [str(frozen)] + base[3:], "--train-body"),
             (base[:2] + [str(decoder)] + base[3:], "on a decoder"),
             (base + ["--budget", "0"], "in (0, 1]"),
             (base + ["--budget", "1.5"], "in (0, 1]"),
             (base[:2] + [str(tmp_path / "none")] + base[3:], "not a classifier directory"),
             (base[:4] + [str(tmp_path / "missing.jsonl")] + base[5:], "missing.jsonl")]
    for args, message in cases:
        r = run(app, args)
        assert r.exit_code == 2 and message in r.output and "Traceback" not in r.output, (args, r.output)
        assert len(r.output.strip().splitlines()) == 1, r.output
    unlabelled = tmp_path / "u.jsonl"
    unlabelled.write_text('{"text": "red box"}\n')
    r = run(app, base[:6] + [str(unlabelled)] + base[7:])
    assert r.exit_code == 2 and re.search(r"u\.jsonl: needs labelled records", r.output)
