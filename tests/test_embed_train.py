"""Sentence-embedding heads: contrastive fine-tuning (train/contrastive.py, `slm embed-train`), training pairs from
a knowledge base (kb/pairs.py, `slm kb pairs`), and /v1/embeddings answered by an encoder (`slm serve MODEL
--embedder ENCODER`, `slm serve ENCODER`), driven by the official OpenAI client."""

import asyncio
import json
import threading

import numpy as np
import pytest
import torch
from conftest import live_server, pulled, tiny_encoder_dir, tiny_model_dir
from typer.testing import CliRunner

from slmkit.cli import app
from slmkit.lm.embedder import Embedder, load_embedder
from slmkit.train.contrastive import contrastive_loss, pair_accuracy, read_pairs, train_embedder

COLOURS = ["red", "blue", "green", "black", "white", "yellow", "orange", "purple"]
ANIMALS = ["cat", "dog", "horse", "mouse", "bird", "fish", "sheep", "goat"]
# query: a colour; its positive: an animal paired with it. Nothing in the words links them: the encoder has to
# learn each pairing, which a random encoder's mean pooling does not know.
PAIRS = [{"query": f"{c} please", "positive": f"the {a} here"} for c, a in zip(COLOURS, ANIMALS, strict=True)]


def write(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py


@pytest.fixture
def encoder(tmp_path):
    torch.manual_seed(0)
    return tiny_encoder_dir(tmp_path / "enc", [p["query"] + " " + p["positive"] for p in PAIRS])


def test_contrastive_loss_is_infonce_over_in_batch_and_hard_negatives():
    q = torch.nn.functional.normalize(torch.randn(4, 8), dim=-1)
    p = torch.nn.functional.normalize(torch.randn(4, 8), dim=-1)
    n = torch.nn.functional.normalize(torch.randn(2, 8), dim=-1)
    logits = 20 * q @ torch.cat([p, n]).T
    want = -(logits.log_softmax(-1).diagonal()).mean()
    assert torch.allclose(contrastive_loss(q, p, n), want, atol=1e-6)
    sym = (want + torch.nn.functional.cross_entropy(20 * p @ q.T, torch.arange(4))) / 2
    assert torch.allclose(contrastive_loss(q, p, n, symmetric=True), sym, atol=1e-6)
    assert contrastive_loss(p, p) < contrastive_loss(q, p)  # the own positive on the diagonal scores best


def test_training_lowers_the_loss_and_raises_in_batch_recall(tmp_path, encoder):
    pairs = write(tmp_path / "pairs.jsonl", PAIRS)
    before = pair_accuracy(load_embedder(str(encoder)), read_pairs(pairs))
    result = train_embedder(str(encoder), pairs, tmp_path / "out", dev=pairs, epochs=40, batch_size=8, lr=3e-3,
                            warmup=0.0, device="cpu", log=lambda m: None)
    assert result["dev_before"] == before
    assert result["last_loss"] < 0.5 * result["first_loss"]
    assert result["dev_after"]["recall_at_1"] >= 0.75 > before["recall_at_1"]
    # the result is an encoder directory that load_embedder, `slm embed` and the kb read, with its provenance
    trained = load_embedder(str(tmp_path / "out"))
    assert isinstance(trained, Embedder)
    assert pair_accuracy(trained, read_pairs(pairs)) == result["dev_after"]
    meta = json.loads((tmp_path / "out" / "slmkit.json").read_text())
    assert meta["kind"] == "sentence-embedder" and meta["contrastive"]["dev_after"] == result["dev_after"]
    st = json.loads((tmp_path / "out" / "sentence_bert_config.json").read_text())
    assert st["max_seq_length"] == trained.max_length == 64


def test_slm_embed_train_cli_and_bad_pairs(tmp_path, encoder):
    pairs = write(tmp_path / "pairs.jsonl", [{**p, "negative": "the cow there"} for p in PAIRS])
    r = CliRunner().invoke(app, ["embed-train", str(encoder), "--pairs", str(pairs), "-o", str(tmp_path / "o"),
                                 "--max-steps", "2", "--batch-size", "4", "--symmetric", "--device", "cpu"])
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout)["steps"] == 2
    r = CliRunner().invoke(app, ["embed", str(tmp_path / "o"), "red please"])
    assert r.exit_code == 0 and len(json.loads(r.stdout)) == 32
    bad = write(tmp_path / "bad.jsonl", [PAIRS[0], {"query": "x", "positive": ""}])
    with pytest.raises(ValueError, match=r"bad.jsonl:2: \"positive\" must be a non-empty string"):
        read_pairs(bad)
    with pytest.raises(ValueError, match="in-batch negatives need at least 2"):
        train_embedder(str(encoder), pairs, tmp_path / "x", batch_size=1)


def test_kb_pairs_from_an_indexed_knowledge_base(tmp_path, encoder):
    from slmkit.kb.index import index_kb
    from slmkit.kb.pairs import kb_pairs
    docs = tmp_path / "docs"
    docs.mkdir()
    (docs / "colours.md").write_text("# Red cats\n\nThe red cat sleeps here. It is a very sleepy and happy cat.\n\n"
                                     "# Blue dogs\n\nThe blue dog runs there. It is a very quick and happy dog.\n")
    (docs / "animals.md").write_text("# Green birds\n\nA green bird sings loudly in spring. Red cats and blue dogs "
                                     "watch birds from the window.\n")
    index_kb([docs], tmp_path / "kb", embedder=str(encoder))
    summary = kb_pairs(tmp_path / "kb", tmp_path / "pairs.jsonl")
    records = [json.loads(line) for line in (tmp_path / "pairs.jsonl").read_text().splitlines()]
    assert summary["pairs"] == len(records) == summary["heading"] + summary["sentence"]
    by_query = {r["query"]: r for r in records}
    assert by_query["Red cats"]["positive"].startswith("The red cat sleeps")  # heading -> text without heading
    ict = [r for r in records if r["kind"] == "sentence"]
    assert ict and all(r["query"] not in r["positive"] for r in ict)  # the sentence is cut out of its chunk
    with_neg = [r for r in records if "negative" in r]
    assert len(with_neg) == summary["with_negative"] > 0
    read_pairs(tmp_path / "pairs.jsonl")  # what the trainers read
    r = CliRunner().invoke(app, ["kb", "pairs", str(tmp_path / "kb"), "-o", str(tmp_path / "p2.jsonl"),
                                 "--kinds", "heading", "--no-negatives"])
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout)["sentence"] == 0 and json.loads(r.stdout)["with_negative"] == 0
    with pytest.raises(ValueError, match="unknown pair kind question"):
        kb_pairs(tmp_path / "kb", tmp_path / "p3.jsonl", kinds=("question",))


# --- /v1/embeddings from an encoder ----------------------------------------------------------------------------

openai = pytest.importorskip("openai")


def served(engine, name):
    from slmkit.serve.app import create_app
    return live_server(create_app(engine, name, api_key="k"))


def client(url):
    return openai.OpenAI(base_url=url + "/v1", api_key="k", max_retries=0)


def test_serve_an_encoder_alone_answers_embeddings_and_refuses_completions(encoder):
    from slmkit.serve.engine import Engine
    emb = load_embedder(str(encoder))
    engine = Engine(None, embedder=emb)
    texts = ["red please", "the cat here", "blue please " * 3]
    try:
        with served(engine, "enc") as url:
            c = client(url)
            out = c.embeddings.create(model="enc", input=texts)
            got = np.array([d.embedding for d in out.data])
            assert np.abs(got - emb.embed(texts).numpy()).max() <= 1e-5
            assert out.model == "enc"
            assert out.usage.prompt_tokens == sum(len(emb.token_ids(t)) for t in texts)  # the encoder's tokens
            with pytest.raises(openai.BadRequestError, match="32 dimensions"):
                c.embeddings.create(model="enc", input="red", dimensions=8)
            with pytest.raises(openai.BadRequestError, match="more than the model's context of 64"):
                c.embeddings.create(model="enc", input="red " * 80)
            with pytest.raises(openai.NotFoundError, match="no generator"):
                c.completions.create(model="enc", prompt="red")
            with pytest.raises(openai.NotFoundError, match="no generator"):
                c.chat.completions.create(model="enc", messages=[{"role": "user", "content": "hi"}])
    finally:
        engine.close()


def test_serve_a_decoder_with_an_encoder_for_embeddings(tmp_path, encoder):
    from slmkit.lm import load_lm
    from slmkit.serve.engine import Engine
    from slmkit.tokenizer import train_tokenizer
    tok = train_tokenizer(["red please the cat here"] * 30, vocab_size=280)
    lm = load_lm(str(tiny_model_dir(tmp_path / "dec", tok, steps=1)))
    emb = load_embedder(str(encoder))
    engine = Engine(lm, max_batch=2, embedder=emb)
    try:
        with served(engine, "dec") as url:
            c = client(url)
            out = c.embeddings.create(model="dec", input=["red please"])
            assert out.model == str(encoder)  # who embedded: the encoder, by its name
            assert np.abs(np.array(out.data[0].embedding) - emb.embed(["red please"]).numpy()[0]).max() <= 1e-5
            assert c.completions.create(model="dec", prompt="red", max_tokens=2).choices[0].text is not None
            assert {m.id for m in c.models.list().data} == {"dec", str(encoder)}
    finally:
        engine.close()


class SlowEmbedder:
    """An Embedder that waits for `go` before embedding, so requests pile up behind it."""

    def __init__(self, emb):
        self.emb, self.go = emb, threading.Event()
        self.tokenizer, self.max_length, self.dim, self.name = emb.tokenizer, emb.max_length, emb.dim, "slow"

    def token_ids(self, text):
        return self.emb.token_ids(text)

    def embed(self, texts):
        self.go.wait(20)
        return self.emb.embed(texts)


def test_encoder_embeddings_keep_the_engines_admission_control(encoder):
    from slmkit.serve import guard
    from slmkit.serve.engine import EmbeddingRequest, Engine
    from slmkit.serve.protocol import APIError
    slow = SlowEmbedder(load_embedder(str(encoder)))
    engine = Engine(None, max_queue=1, embedder=slow)

    async def run():
        (first,) = guard.submit_all(engine, [EmbeddingRequest(["red"])], "input")
        while engine.queue_depth:  # the engine thread took it and waits in embed
            await asyncio.sleep(0.01)
        (second,) = guard.submit_all(engine, [EmbeddingRequest(["blue"])], "input")  # waits in the queue
        with pytest.raises(APIError) as refused:
            guard.submit_all(engine, [EmbeddingRequest(["green"])], "input")
        slow.go.set()
        return refused.value, await first.events.get(), await second.events.get()
    try:
        refused, a, b = asyncio.run(run())
    finally:
        slow.go.set()
        engine.close()
    assert refused.status == 429
    assert a.shape == b.shape == (1, 32)


def test_minilm_served_equals_load_embedder():
    pulled("minilm-l6-v2")
    from slmkit.serve.engine import Engine
    emb = load_embedder("minilm-l6-v2")
    engine = Engine(None, embedder=emb)
    texts = ["How do I return an item?", "What is your refund policy?"]
    try:
        with served(engine, "minilm-l6-v2") as url:
            out = client(url).embeddings.create(model="minilm-l6-v2", input=texts)
    finally:
        engine.close()
    got = np.array([d.embedding for d in out.data])
    assert got.shape == (2, 384) and np.abs(got - emb.embed(texts).numpy()).max() <= 1e-5
