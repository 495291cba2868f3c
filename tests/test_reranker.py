"""The cross-encoder reranker: model/cross_encoder.py and formats/reranker_dir.py give transformers'
BertForSequenceClassification / RobertaForSequenceClassification logits (num_labels=1) both ways; pairs encode as
transformers' tokenizer does; train/rerank.py learns to put positives first; the knowledge base reranks with it
(`slm kb search|eval --reranker`); `slm rerank-train`, `slm rerank`."""

import json

import pytest
import torch
from conftest import tiny_encoder_dir
from typer.testing import CliRunner

from slmkit.cli import app
from slmkit.formats.encoder_dir import load_encoder_dir
from slmkit.formats.reranker_dir import cross_encoder_from, load_reranker_dir, read_pooler, save_reranker_dir
from slmkit.lm.reranker import Reranker, load_reranker
from slmkit.model.cross_encoder import CrossEncoder
from slmkit.model.encoder import EncoderConfig
from slmkit.tokenizer import load_tokenizer
from slmkit.train.rerank import group_loss, groups, train_reranker

transformers = pytest.importorskip("transformers")

TINY = dict(vocab_size=120, dim=32, n_layers=2, n_heads=4, hidden_dim=64, max_positions=24)
COLOURS = ["red", "blue", "green", "black", "white", "yellow"]
ANIMALS = ["cat", "dog", "horse", "mouse", "bird", "fish"]
PAIRS = [{"query": f"{c} please", "positive": f"the {a} here", "negative": f"the {b} there"}
         for c, a, b in zip(COLOURS, ANIMALS, ANIMALS[1:] + ANIMALS[:1], strict=True)]


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py


@pytest.fixture
def encoder(tmp_path):
    torch.manual_seed(0)
    words = [p["query"] + " " + p["positive"] + " " + p["negative"] for p in PAIRS]
    return tiny_encoder_dir(tmp_path / "enc", words + ["alpha beta gamma delta the"], std=0.3)


def write(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


@pytest.mark.parametrize("flavour", ["bert", "roberta"])
def test_reranker_directory_has_transformers_sequence_classifier_logits_both_ways(tmp_path, flavour):
    torch.manual_seed(0)
    pad = 1 if flavour == "roberta" else 0
    cfg = EncoderConfig(**TINY, flavour=flavour, pad_token_id=pad, type_vocab_size=2 if flavour == "bert" else 1)
    ours = CrossEncoder(cfg).eval()
    with torch.no_grad():
        ours.head.out.bias.fill_(0.3)  # not zero, so a bias that went missing shows
    save_reranker_dir(ours, tmp_path / "r")
    theirs = transformers.AutoModelForSequenceClassification.from_pretrained(tmp_path / "r").eval()
    assert theirs.config.num_labels == 1
    assert type(theirs).__name__ == {"bert": "BertForSequenceClassification",
                                     "roberta": "RobertaForSequenceClassification"}[flavour]
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(pad + 1, 120, (3, 20), generator=g)
    mask = torch.ones_like(ids)
    mask[1, 9:], ids[1, 9:] = 0, pad
    types = torch.zeros_like(ids)
    if flavour == "bert":
        types[:, 8:] = 1
    with torch.no_grad():
        want = theirs(input_ids=ids, attention_mask=mask, token_type_ids=types).logits.squeeze(-1)
        got = ours(ids, mask, types)
        assert (got - want).abs().max().item() <= 1e-4
        # and a transformers classifier, saved by transformers, loads into ours with the same logits
        theirs.save_pretrained(tmp_path / "t")
        again = load_reranker_dir(tmp_path / "t")
        assert (again(ids, mask, types) - want).abs().max().item() <= 1e-4


def test_pairs_encode_as_transformers_tokenizer_does_and_scores_rank_hits(tmp_path, encoder):
    from dataclasses import dataclass
    model = cross_encoder_from(load_encoder_dir(encoder))
    save_reranker_dir(model, tmp_path / "r", tokenizer=load_tokenizer(encoder))
    rr = load_reranker(tmp_path / "r")
    ids, types = rr.encode("red please", "the cat here")
    tok = transformers.PreTrainedTokenizerFast(tokenizer_file=str(encoder / "tokenizer.json"))
    want = tok("red please", "the cat here", return_token_type_ids=True)
    assert ids == want["input_ids"] and types == want["token_type_ids"] and types.count(1) == 4
    long_ids, _ = rr.encode("red " * 30, "cat " * 60)  # truncated longest-first to the positions, [SEP] kept
    assert len(long_ids) == 64 and long_ids[-1] == 3

    @dataclass
    class Hit:
        text: str
        score: float
    hits = [Hit("the dog there", 0.0), Hit("the cat here", 0.0), Hit("alpha beta", 0.0)]
    scores = rr.score("red please", [h.text for h in hits])
    reranked = rr("red please", hits)
    assert [h.score for h in reranked] == sorted(scores, reverse=True)
    assert [h.text for h in reranked] == [hits[i].text for i in sorted(range(3), key=lambda i: -scores[i])]
    # batched scores equal one at a time
    rr.batch_size = 1
    assert rr.score("red please", [h.text for h in hits]) == pytest.approx(scores, abs=1e-5)


def test_training_puts_positives_first(tmp_path, encoder):
    pairs = write(tmp_path / "pairs.jsonl", PAIRS)
    result = train_reranker(str(encoder), pairs, tmp_path / "rr", dev=pairs, negatives=2, epochs=30, batch_size=6,
                            lr=3e-3, head_lr=3e-3, warmup=0.0, max_length=24, device="cpu", log=lambda m: None)
    assert result["last_loss"] < 0.5 * result["first_loss"]
    assert result["dev_after"]["accuracy"] == 1.0 > result["dev_before"]["accuracy"]
    rr = load_reranker(tmp_path / "rr")
    assert isinstance(rr, Reranker)
    for p in PAIRS:  # the positive above its hard negative
        pos, neg = rr.score(p["query"], [p["positive"], p["negative"]])
        assert pos > neg
    meta = json.loads((tmp_path / "rr" / "slmkit.json").read_text())
    assert meta["kind"] == "reranker" and meta["reranker"]["dev_after"] == result["dev_after"]
    assert transformers.AutoConfig.from_pretrained(tmp_path / "rr").architectures == ["BertForSequenceClassification"]


def test_groups_losses_and_the_pooler_start():
    import random
    pairs = [{"query": "q", "positive": f"p{i}", "negatives": [f"n{i}"]} for i in range(4)]
    for i, g in enumerate(groups(pairs, 3, random.Random(0))):
        assert g[0] == f"p{i}" and g[1] == f"n{i}" and len(set(g)) == 4 and f"p{i}" not in g[1:]
    with pytest.raises(ValueError, match="fewer than 1 \\+ 9 negatives"):
        groups(pairs, 9, random.Random(0))
    scores = torch.tensor([[2.0, 0.0, -1.0]])
    assert torch.allclose(group_loss(scores), -scores.log_softmax(-1)[:, 0])
    assert group_loss(torch.tensor([[2.0, 0.5]]), pairwise=True) == 0  # past the margin of 1
    assert group_loss(torch.tensor([[0.5, 0.0]]), pairwise=True) == pytest.approx(0.5)


def test_minilm_pooler_starts_the_head():
    from conftest import pulled
    path = pulled("minilm-l6-v2")
    pooler = read_pooler(path)
    bert = transformers.AutoModel.from_pretrained(path)
    assert torch.equal(pooler["weight"], bert.pooler.dense.weight.detach())


def test_kb_search_and_eval_rerank_with_a_reranker(tmp_path, encoder):
    from slmkit.kb.index import index_kb
    from slmkit.recipes.kb import kb_eval, kb_search
    pairs = write(tmp_path / "pairs.jsonl", PAIRS)
    train_reranker(str(encoder), pairs, tmp_path / "rr", negatives=2, epochs=30, batch_size=6, lr=3e-3, head_lr=3e-3,
                   warmup=0.0, max_length=24, device="cpu", log=lambda m: None)
    docs = tmp_path / "docs"
    docs.mkdir()
    for p in PAIRS:  # one document per animal
        (docs / f"{p['positive'].split()[1]}.md").write_text(p["positive"] + "\n")
    index_kb([docs], tmp_path / "kb", embedder=str(encoder))
    plain = kb_search(tmp_path / "kb", "red please", k=6, mode="dense")
    reranked = kb_search(tmp_path / "kb", "red please", k=6, mode="dense", reranker=tmp_path / "rr")
    assert reranked[0]["path"].endswith("cat.md")  # what the reranker learnt: red -> cat
    assert [h["path"] for h in reranked] != [h["path"] for h in plain]
    assert sorted(h["path"] for h in reranked) == sorted(h["path"] for h in plain)  # the same pool, reordered
    scores = [h["score"] for h in reranked]
    assert scores == sorted(scores, reverse=True)
    questions = write(tmp_path / "q.jsonl", [{"question": f"{c} please", "topics": [a]}
                                             for c, a in zip(COLOURS, ANIMALS, strict=True)])
    results = kb_eval(tmp_path / "kb", questions, tmp_path / "eval", mode="dense", reranker=tmp_path / "rr")
    assert results["hit_at_5"] == 1.0 and results["mrr"] == 1.0
    assert results["settings"]["reranker"] == str(tmp_path / "rr") and results["settings"]["rerank_pool"] == 20
    r = CliRunner().invoke(app, ["kb", "search", str(tmp_path / "kb"), "blue please", "--reranker",
                                 str(tmp_path / "rr"), "--rerank-pool", "6", "--json"])
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout)[0]["path"].endswith("dog.md")
    r = CliRunner().invoke(app, ["rerank", str(tmp_path / "rr"), "blue please", "the cat here", "the dog here"])
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout.splitlines()[0])["text"] == "the dog here"


def test_rerank_train_cli_and_bad_input(tmp_path, encoder):
    pairs = write(tmp_path / "pairs.jsonl", PAIRS)
    r = CliRunner().invoke(app, ["rerank-train", str(encoder), "--pairs", str(pairs), "-o", str(tmp_path / "rr"),
                                 "--max-steps", "1", "--negatives", "1", "--pairwise", "--device", "cpu"])
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout)["steps"] == 1
    with pytest.raises(ValueError, match="not a reranker directory"):
        load_reranker(encoder)  # an encoder has no score head
    with pytest.raises(FileNotFoundError, match="no such reranker directory"):
        load_reranker(tmp_path / "missing")
    with pytest.raises(ValueError, match="lower --negatives"):
        train_reranker(str(encoder), pairs, tmp_path / "x", negatives=50)
