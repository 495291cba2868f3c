"""Masked-LM pretraining (`slm train --objective mlm`, train/mlm.py): RoBERTa's dynamic masking, full-sentence
windows, the extended tokenizer, learning, exact resume, DDP, transformers parity and the embedder on the result."""

import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from slmkit.cli import app
from slmkit.data.tokens import TokenDataset, dataset_tokenizer
from slmkit.formats.encoder_dir import load_encoder_dir
from slmkit.model.encoder import ENCODER_PRESETS, Encoder, encoder_config
from slmkit.train import mlm
from slmkit.train.loop import TrainConfig, train
from slmkit.train.metrics import read_metrics
from slmkit.train.optim import Optimizers, make_optimizer

runner = CliRunner()
TINY_ENC = {"dim": 32, "n_layers": 2, "n_heads": 4, "hidden_dim": 64}
TINY_SET = [f"{k}={v}" for k, v in TINY_ENC.items()]


def mlm_config(data, out, **kw):
    base = dict(data=str(data), out=str(out), objective="mlm", preset="enc-tiny", model_overrides=dict(TINY_ENC),
                seq_len=32, batch_size=8, warmup_steps=5, eval_every=0, save_every=8, log_every=1, lr=3e-3,
                progress=False, precision="fp32")
    return TrainConfig(**{**base, **kw})


@pytest.fixture(scope="module")
def text_data(tmp_path_factory):
    """A token dataset with a tokenizer (bos <s>, eos </s>, pad, no <mask>), as `slm data prepare` writes it."""
    from slmkit.data.prepare import prepare_dataset
    tmp = tmp_path_factory.mktemp("mlm")
    corpus = tmp / "corpus"
    corpus.mkdir()
    words = "the cat sat on the mat while a dog ran in the park and birds sang over the old house".split()
    rng = np.random.default_rng(0)
    for i in range(40):
        start = int(rng.integers(0, len(words) - 8))
        (corpus / f"doc{i}.txt").write_text(" ".join(words[start:]) + f". note {i}.\n")
    prepare_dataset([str(corpus / "*.txt")], tmp / "data", vocab_size=300, val_fraction=0.2, log=lambda *_: None)
    return tmp / "data"


# ---- masking ---------------------------------------------------------------------------------------------

def vocab_of(base=100, bos=1, eos=2, pad=0):
    special = np.array([pad, bos, eos, base])
    return mlm.MLMVocab(vocab_size=base + 1, mask_id=base, pad_id=pad, bos_id=bos, eos_id=eos, special_ids=special,
                        random_ids=np.setdiff1d(np.arange(base), special), token_bytes=None, mean_bytes=3.0,
                        tokenizer=None)


def test_dynamic_masking_is_15_percent_with_80_10_10_never_on_specials_and_fixed_by_sample_index():
    vocab = vocab_of()
    rng = np.random.default_rng(1)
    ids = rng.integers(3, 100, size=(400, 128))
    ids[:, ::16] = 1  # document separators
    ids[:, 5::16] = 2
    inputs, labels = (t.numpy() for t in mlm.mask_tokens(ids, list(range(400)), seed=7, vocab=vocab))
    chosen = labels != -100
    real = ~np.isin(ids, vocab.special_ids)
    assert not chosen[~real].any() and (inputs[~real] == ids[~real]).all()  # specials never masked or replaced
    assert (labels[chosen] == ids[chosen]).all()
    rate = chosen.sum() / real.sum()
    assert abs(rate - 0.15) < 0.005, rate
    masked = inputs[chosen] == vocab.mask_id
    changed = ~masked & (inputs[chosen] != ids[chosen])
    assert abs(masked.mean() - 0.8) < 0.01 and abs(changed.mean() - 0.1) < 0.01  # 80% <mask>, ~10% random
    assert abs((inputs[chosen] == ids[chosen]).mean() - 0.1) < 0.01  # 10% kept (+ random draws of the same id)
    assert not np.isin(inputs[chosen & ~(inputs == vocab.mask_id)], vocab.special_ids).any()
    # a sample's mask depends on (seed, sample index) only, not on the batch it is drawn in ...
    again_in, again_lab = (t.numpy() for t in mlm.mask_tokens(ids[[3, 0]], [3, 0], seed=7, vocab=vocab))
    assert (again_in == inputs[[3, 0]]).all() and (again_lab == labels[[3, 0]]).all()
    # ... and is fresh for another index (the same window drawn in a later epoch) or another seed
    other = mlm.mask_tokens(ids[:1], [400], seed=7, vocab=vocab)[1].numpy()
    assert (other != labels[:1]).any()
    assert (mlm.mask_tokens(ids[:1], [0], seed=8, vocab=vocab)[1].numpy() != labels[:1]).any()


def test_full_sentence_windows_open_with_bos_and_close_documents_with_eos():
    vocab = vocab_of()
    rows = np.array([[1, 10, 11, 1, 12, 13, 14, 15],     # starts at a document: <s> a b <s> c ...
                     [20, 21, 1, 22, 23, 24, 25, 26]])   # starts mid-document
    out = mlm.full_sentence_windows(rows, vocab)
    assert out.tolist() == [[1, 10, 11, 2, 1, 12, 13, 14], [1, 20, 21, 2, 1, 22, 23, 24]]
    gpt2 = vocab_of(bos=5, eos=5)  # one separator token for both: the window just opens with it
    assert mlm.full_sentence_windows(np.array([[7, 5, 8]]), gpt2).tolist() == [[5, 7, 5]]


def test_the_extended_tokenizer_adds_mask_and_wraps_texts_like_training_windows(text_data, tmp_path):
    tok = dataset_tokenizer(text_data)
    assert tok.mask_token is None
    data = TokenDataset(text_data)
    vocab = mlm.mlm_vocab(data, tok)
    ext = vocab.tokenizer
    assert ext.mask_id == tok.vocab_size == data.vocab_size and vocab.vocab_size == data.vocab_size + 1
    assert ext.pad_id == tok.pad_id == 0  # slmkit's tokenizers have a pad already
    assert tok.encode("the cat") == ext.encode("the cat")  # every id of the data means what it meant
    wrapped = ext.hf.encode("the cat").ids
    assert wrapped[0] == ext.bos_id and wrapped[-1] == ext.eos_id and wrapped[1:-1] == tok.encode("the cat")
    assert set(vocab.special_ids.tolist()) >= {ext.bos_id, ext.eos_id, ext.pad_id, ext.mask_id}
    # bytes per masked token: exact for the byte-level BPE
    ids = tok.encode("the cat sat on the mat")
    assert vocab.token_bytes[ids].sum() == len(b"the cat sat on the mat")
    ext.save(tmp_path)
    transformers = pytest.importorskip("transformers")
    hf = transformers.AutoTokenizer.from_pretrained(tmp_path)
    assert hf.mask_token == "<mask>" and hf.mask_token_id == ext.mask_id
    assert hf("the cat")["input_ids"] == wrapped


# ---- training ----------------------------------------------------------------------------------------------

def test_mlm_learns_and_its_model_loads_in_transformers_and_the_embedder(text_data, tmp_path):
    run = tmp_path / "run"
    r = runner.invoke(app, ["train", "--objective", "mlm", "--data", str(text_data), "-o", str(run),
                            "--preset", "enc-tiny", *sum((["--set", s] for s in TINY_SET), []), "--seq-len", "32",
                            "--batch-size", "16", "--max-steps", "80", "--lr", "3e-3", "--warmup-steps", "10",
                            "--eval-every", "40", "--log-every", "1", "--precision", "fp32"])
    assert r.exit_code == 0, r.output
    assert "masked-token accuracy" in r.output
    recs = read_metrics(run / "metrics.jsonl")
    vals = [rec for rec in recs if "val_loss" in rec]
    assert len(vals) == 2 and vals[-1]["final"]
    assert all(0 <= rec["masked_acc"] <= 1 for rec in recs if "loss" in rec)
    train_losses = [rec["loss"] for rec in recs if "loss" in rec]
    uniform = np.log(TokenDataset(text_data).vocab_size + 1)  # nats of a uniform guess over the vocabulary
    assert train_losses[0] == pytest.approx(uniform, abs=0.3)
    assert np.mean(train_losses[-10:]) < train_losses[0] - 1.5
    assert vals[-1]["val_loss"] < uniform - 1.5 and vals[-1]["val_masked_acc"] > 0.05
    assert vals[-1]["val_bpb"] > 0 and vals[-1]["val_masked_tokens"] > 0
    assert json.loads((run / "train_config.json").read_text())["objective"] == "mlm"

    model_dir = run / "model"
    config = json.loads((model_dir / "config.json").read_text())
    assert config["architectures"] == ["RobertaForMaskedLM"] and config["model_type"] == "roberta"
    ours = load_encoder_dir(model_dir)
    assert ours.cfg.max_positions == 32 and ours.cfg.vocab_size == TokenDataset(text_data).vocab_size + 1
    transformers = pytest.importorskip("transformers")
    theirs = transformers.AutoModelForMaskedLM.from_pretrained(model_dir).eval()
    assert type(theirs).__name__ == "RobertaForMaskedLM"
    hf_tok = transformers.AutoTokenizer.from_pretrained(model_dir)
    batch = hf_tok(["the cat sat on the <mask>.", "a dog ran"], padding=True, return_tensors="pt")
    with torch.no_grad():
        want = theirs(**batch).logits
        got = ours.mlm_logits(ours(batch["input_ids"], batch["attention_mask"]))
    real = batch["attention_mask"].bool()
    assert (got[real] - want[real]).abs().max().item() <= 1e-4
    # the checkpoint is the same encoder, resumable
    assert torch.equal(load_encoder_dir(run / "checkpoint").embeddings.word_embeddings.weight,
                       ours.embeddings.word_embeddings.weight)

    # continued pretraining (--init-from the encoder) starts where it ended, with its tokenizer
    more = train(mlm_config(text_data, tmp_path / "more", init_from=str(model_dir), model_overrides={}, max_steps=2))
    assert more["parameters"] == ours.num_params()
    assert read_metrics(tmp_path / "more" / "metrics.jsonl")[0]["loss"] < uniform - 1.0
    with pytest.raises(ValueError, match="the shape of a continued encoder"):
        train(mlm_config(text_data, tmp_path / "more2", init_from=str(model_dir), max_steps=2))

    from slmkit.lm.embedder import Embedder, load_embedder
    emb = load_embedder(str(model_dir))
    assert isinstance(emb, Embedder)
    ids = emb.encode("the cat")
    assert ids[0] == hf_tok.bos_token_id and ids[-1] == hf_tok.eos_token_id  # <s> ... </s>, as in training
    v = emb.embed(["the cat sat", "the cat sat", "birds sang"])
    assert v.shape == (3, 32) and torch.allclose(v.norm(dim=1), torch.ones(3))
    assert torch.allclose(v[0], v[1])
    r = runner.invoke(app, ["embed", str(run), "the cat sat"])  # a run directory names its model
    assert r.exit_code == 0, r.output
    assert np.allclose(json.loads(r.output.strip()), v[0].numpy(), atol=1e-5)


def test_interrupted_and_resumed_mlm_run_equals_the_uninterrupted_one(token_data, tmp_path):
    """Dropout on (0.1, RoBERTa's): the checkpoint's RNG state must carry it; the masks come from the sample index."""
    steps = 24
    reference = train(mlm_config(token_data, tmp_path / "ref", max_steps=steps))
    run = tmp_path / "run"
    state = run / "checkpoint" / "trainer_state.json"

    def interrupt():  # Ctrl-C as soon as a checkpoint exists: the run saves one at the step it stops
        deadline = time.time() + 60
        while time.time() < deadline:
            if state.exists() and json.loads(state.read_text())["step"] >= 8:
                os.kill(os.getpid(), signal.SIGINT)
                return
            time.sleep(0.005)

    watcher = threading.Thread(target=interrupt)
    watcher.start()
    first = train(mlm_config(token_data, run, max_steps=steps))
    watcher.join()
    assert first["interrupted"] and first["steps"] < steps and not (run / "model").exists()
    resumed = train(mlm_config(token_data, run, max_steps=steps), resume=True)
    assert resumed["steps"] == steps

    def losses(r):
        return {x["step"]: (x["loss"], x["masked_acc"]) for x in read_metrics(r / "metrics.jsonl") if "loss" in x}
    assert losses(run) == losses(tmp_path / "ref")
    assert resumed["val_loss"] == reference["val_loss"] and resumed["val_masked_acc"] == reference["val_masked_acc"]
    a, b = load_encoder_dir(run / "model"), load_encoder_dir(tmp_path / "ref" / "model")
    for (name, p), q in zip(a.state_dict().items(), b.state_dict().values(), strict=True):
        assert torch.equal(p, q), name


def test_muon_takes_the_encoder_blocks_matrices_only_and_trains(token_data, tmp_path):
    model = Encoder(encoder_config("enc-tiny", **TINY_ENC, vocab_size=98, pad_token_id=97))
    opt = make_optimizer(model, mlm_config(token_data, tmp_path / "x", max_steps=1, optimizer="muon"))
    assert isinstance(opt, Optimizers)
    muon = {id(p) for g in opt.optimizers[0].param_groups for p in g["params"]}
    names = {n for n, p in model.named_parameters() if id(p) in muon}
    assert names == {n for n, p in model.named_parameters() if n.startswith("encoder.layer.") and p.dim() == 2}
    assert not any(n.startswith(("embeddings.", "lm_head.")) for n in names) and len(names) == 2 * 6
    train(mlm_config(token_data, tmp_path / "run", max_steps=30, optimizer="muon", lr=1e-2))
    losses = [r["loss"] for r in read_metrics(tmp_path / "run" / "metrics.jsonl") if "loss" in r]
    assert np.mean(losses[-5:]) < losses[0] - 0.5


def test_bad_mlm_inputs_are_one_line_errors(token_data, tmp_path):
    with pytest.raises(ValueError, match="preset 'micro' is a decoder preset; --objective mlm trains an encoder"):
        mlm_config(token_data, tmp_path / "r", preset="micro", max_steps=1)
    with pytest.raises(ValueError, match="preset 'enc-tiny' is an encoder; train it with --objective mlm"):
        TrainConfig(data="d", out="o", preset="enc-tiny", max_steps=1)
    with pytest.raises(ValueError, match="unknown objective 'span'"):
        TrainConfig(data="d", out="o", objective="span", max_steps=1)
    assert TrainConfig(data="d", out="o", objective="mlm", max_steps=1).preset == "enc-tiny"
    assert TrainConfig(data="d", out="o", max_steps=1).preset == "micro"
    from slmkit.distill.kd import DistillConfig
    with pytest.raises(ValueError, match="objective mlm pretrains an encoder; distill is for causal LMs"):
        mlm_config(token_data, tmp_path / "r", distill=DistillConfig(teacher="t"), max_steps=1)
    with pytest.raises(ValueError, match="masked-LM pretraining reads a token dataset"):
        train(mlm_config(tmp_path / "sft.jsonl", tmp_path / "r", max_steps=1))
    with pytest.raises(ValueError, match="seq_len 64 exceeds the encoder's 32 positions"):
        train(mlm_config(token_data, tmp_path / "r", seq_len=64,
                         model_overrides={**TINY_ENC, "max_positions": 32}, max_steps=1))
    with pytest.raises(ValueError, match="unknown encoder preset"):
        encoder_config("enc-huge")
    assert set(ENCODER_PRESETS) == {"enc-tiny", "enc-micro", "enc-mini", "roberta-base"}
    assert (encoder_config("enc-mini").dim, encoder_config("roberta-base").n_layers) == (384, 12)
    # resuming an MLM run as a causal one (or the reverse) names the objective
    train(mlm_config(token_data, tmp_path / "run", max_steps=2))
    with pytest.raises(ValueError, match="holds a masked-LM encoder; resume with the run's original --objective"):
        train(TrainConfig(data=str(token_data), out=str(tmp_path / "run"), preset="nano", max_steps=2,
                          seq_len=32, batch_size=4, progress=False), resume=True)
    # the CLI: encoder fields for --set, and the errors in one line
    base = ["train", "--objective", "mlm", "--data", str(token_data), "--max-steps", "1", "--seq-len", "16"]
    for extra, message in [(["--set", "n_kv_heads=2"], "unknown model field 'n_kv_heads'"),
                           (["--set", "dim=30"], "encoder dim 30 is not divisible by n_heads 4"),
                           (["--preset", "nano"], "preset 'nano' is a decoder preset"),
                           (["--objective", "xlm"], "unknown objective 'xlm'")]:
        r = runner.invoke(app, [*base, "-o", str(tmp_path / f"cli{len(extra[1])}"), *extra])
        assert r.exit_code == 2 and message in r.output and "Traceback" not in r.output, r.output


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("torchrun", path=os.path.dirname(sys.executable)) is None, reason="no torchrun")
def test_ddp_mlm_two_processes_match_one_process_at_the_same_global_batch(token_data, tmp_path):
    """dropout=0: each rank draws its own dropout masks, so only a dropout-free run can match bit for bit."""
    overrides = {**TINY_ENC, "dropout": 0.0}
    single = tmp_path / "single"
    train(mlm_config(token_data, single, max_steps=8, batch_size=4, grad_accum=2, model_overrides=overrides))
    args = ["train", "--objective", "mlm", "--data", str(token_data), "--out", str(tmp_path / "ddp"),
            "--preset", "enc-tiny", "--seq-len", "32", "--batch-size", "4", "--max-steps", "8", "--lr", "3e-3",
            "--warmup-steps", "5", "--eval-every", "0", "--save-every", "10", "--log-every", "1",
            "--precision", "fp32", *sum((["--set", f"{k}={v}"] for k, v in overrides.items()), [])]
    torchrun = os.path.join(os.path.dirname(sys.executable), "torchrun")
    subprocess.run([torchrun, "--standalone", "--nproc_per_node", "2", "-m", "slmkit.cli", *args], check=True,
                   env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, timeout=300)

    def losses(r):
        return {x["step"]: x for x in read_metrics(r / "metrics.jsonl") if "loss" in x}
    a, b = losses(single), losses(tmp_path / "ddp")
    assert a.keys() == b.keys() and len(a) == 8
    for step in a:
        assert b[step]["loss"] == pytest.approx(a[step]["loss"], rel=1e-4, abs=1e-5), step
        assert b[step]["masked_acc"] == pytest.approx(a[step]["masked_acc"], abs=1e-6), step
    assert json.loads((tmp_path / "ddp" / "model" / "slmkit.json").read_text())["world_size"] == 2


def test_a_gpt2_style_tokenizer_gets_pad_and_mask_appended_and_one_separator_around_texts():
    from conftest import pulled

    from slmkit.tokenizer import load_tokenizer
    gpt2 = load_tokenizer(pulled("gpt2-tokenizer"))  # <|endoftext|> is bos and eos; no pad, no mask
    ext = mlm.mlm_tokenizer(gpt2)
    assert (ext.pad_id, ext.mask_id) == (gpt2.vocab_size, gpt2.vocab_size + 1)
    eot = gpt2.bos_id
    assert ext.hf.encode("hello world").ids == [eot, *gpt2.encode("hello world"), eot]
    assert ext.hf.encode("say <mask>").ids[-2] == ext.mask_id  # lstrip: the space goes into the mask
