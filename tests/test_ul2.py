"""UL2R (`slm train --objective ul2 --init MODEL`, train/ul2.py) and fill-in-the-middle evaluation (eval/fim.py):
deterministic corruption that reconstructs the text, the loss on targets only, training and exact resume, the FIM
score, and the errors."""

import json
import os
import signal
import threading
import time

import numpy as np
import pytest
import torch
from conftest import tiny_encoder_dir, tiny_model_dir
from typer.testing import CliRunner

from slmkit.cli import app
from slmkit.data.tokens import TokenDataset, dataset_tokenizer
from slmkit.eval import fim
from slmkit.formats.hf_dir import load_model_dir
from slmkit.lm.torch_lm import TorchLM
from slmkit.tokenizer import load_tokenizer
from slmkit.train import ul2
from slmkit.train.loop import TrainConfig, train
from slmkit.train.metrics import read_metrics

runner = CliRunner()
CODE = "def add(a, b):\n    return a + b\n\n\ndef sub(a, b):\n    return a - b\n\n\nclass Box:\n    size = 3\n"


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """A code dataset with its own small tokenizer, and a tiny decoder over that tokenizer fitted to the code."""
    from slmkit.data.prepare import prepare_dataset
    tmp = tmp_path_factory.mktemp("ul2")
    corpus = tmp / "corpus"
    corpus.mkdir()
    for i in range(30):
        (corpus / f"m{i}.py").write_text(CODE.replace("Box", f"Box{i}").replace("3", str(i)))
    prepare_dataset([str(corpus / "*.py")], tmp / "data", vocab_size=300, val_fraction=0.2, dedup=False,
                    log=lambda *_: None)
    tok = dataset_tokenizer(tmp / "data")
    torch.manual_seed(0)
    tiny_model_dir(tmp / "base", tok, train_on=CODE, steps=150)
    return tmp


def vocab_for(tok_vocab=300):
    return ul2.UL2Vocab(mode_ids={"R": tok_vocab, "X": tok_vocab + 1, "S": tok_vocab + 2},
                        sentinel_ids=list(range(tok_vocab + 3, tok_vocab + 3 + ul2.NUM_SENTINELS)),
                        vocab_size=tok_vocab + 3 + ul2.NUM_SENTINELS, tokenizer=None)


# ---- corruption ----------------------------------------------------------------------------------------------

def test_corruption_is_deterministic_reconstructs_the_text_and_has_ul2s_span_statistics():
    vocab, seq_len = vocab_for(), 256
    stats = {m: {"spans": [], "noise": [], "mean_span": [], "seen": 0} for m in ul2.MODES}
    for sample in range(600):
        window = np.random.default_rng(sample).integers(3, 300, seq_len + 1)
        mode, seq, is_target = ul2.corrupt(window, sample, 7, vocab, ul2.DEFAULT_MIXTURE)
        again = ul2.corrupt(window, sample, 7, vocab, ul2.DEFAULT_MIXTURE)
        assert mode == again[0] and np.array_equal(seq, again[1]) and np.array_equal(is_target, again[2])
        assert len(seq) == seq_len + 1  # every sequence fills the window exactly
        source = ul2.reconstruct(seq, vocab)
        assert source == window[:len(source)].tolist()  # input + spans give back the text, in order
        stats[mode]["seen"] += 1
        if mode == "C":
            assert np.array_equal(seq, window) and is_target.all()
            continue
        assert seq[0] == vocab.mode_ids[mode]
        sentinels = np.isin(seq, vocab.sentinel_ids)
        n = int(sentinels[~is_target].sum()) - 1  # input sentinels, less the first target one (context)
        assert sentinels[is_target].sum() == n  # targets: sentinels 1..n (the closing one), one per span boundary
        assert seq[-1] == vocab.sentinel_ids[n]
        assert len(source) == seq_len + 1 - 2 * n - 2
        stats[mode]["spans"].append(n)
        stats[mode]["noise"].append((int(is_target.sum()) - n) / len(source))
        stats[mode]["mean_span"].append((int(is_target.sum()) - n) / n)
    assert all(s["seen"] > 100 for s in stats.values())  # 25% each by default
    assert set(stats["S"]["spans"]) == {1}
    assert 0.13 < np.mean(stats["R"]["noise"]) < 0.17
    assert 2.5 < np.mean(stats["R"]["mean_span"]) < 3.5
    assert 0.25 < np.mean(stats["X"]["noise"]) < 0.40  # half long spans at 15%, half short ones at 50%
    # another sample index, or another seed, draws another corruption
    window = np.arange(3, 260)
    a, b, c = (ul2.corrupt(window, s, seed, vocab, {"R": 1.0, "X": 0, "S": 0, "C": 0})[1]
               for s, seed in [(0, 0), (1, 0), (0, 1)])
    assert not np.array_equal(a, b) and not np.array_equal(a, c)


def test_the_loss_mask_covers_the_targets_only(setup):
    data, vocab = TokenDataset(setup / "data"), vocab_for()
    x, y = ul2.train_batch(data, 0, 16, 32, 3, vocab, ul2.DEFAULT_MIXTURE)
    assert x.shape == y.shape == (16, 32)
    for r in range(16):
        window = np.concatenate([data.train_batch(r, 1, 32, 3)[0][0].numpy(), data.train_batch(r, 1, 32, 3)[1][0, -1:]])
        mode, seq, is_target = ul2.corrupt(window, r, 3, vocab, ul2.DEFAULT_MIXTURE)
        assert torch.equal(x[r], torch.from_numpy(seq[:-1]))
        labelled = (y[r] != -100).numpy()
        assert np.array_equal(labelled, is_target[1:])
        assert torch.equal(y[r][labelled], torch.from_numpy(seq[1:][labelled]))
        if mode != "C":  # nothing of the input (mode token, kept text, input sentinels) is a target
            first_target = int(np.flatnonzero(seq == vocab.sentinel_ids[0])[1])
            assert not labelled[:first_target].any() and labelled[first_target:].all()


def test_mixture_parsing_and_bad_modes():
    assert ul2.parse_mixture("R=1,X=1,S=2") == {"R": 0.25, "X": 0.25, "S": 0.5, "C": 0.0}
    assert ul2.parse_mixture(None) == ul2.DEFAULT_MIXTURE
    for spec, message in [("R=1,Q=1", "unknown mode 'Q'"), ("R=-1", "weight of R must be a number >= 0"),
                          ("R=x", "weight of R"), ("C=1", "at least one denoiser")]:
        with pytest.raises(ValueError, match=message):
            ul2.parse_mixture(spec)


# ---- training ------------------------------------------------------------------------------------------------

def ul2_config(setup, out, **kw):
    base = dict(data=str(setup / "data"), out=str(out), objective="ul2", init_from=str(setup / "base"),
                seq_len=32, batch_size=4, warmup_steps=2, eval_every=0, save_every=3, log_every=1, lr=1e-3,
                progress=False, precision="fp32", max_steps=8)
    return TrainConfig(**{**base, **kw})


def test_cli_trains_with_init_grows_the_vocabulary_and_saves_the_tokens(setup, tmp_path):
    out = tmp_path / "run"
    r = runner.invoke(app, ["train", "--data", str(setup / "data"), "-o", str(out), "--objective", "ul2",
                            "--init", str(setup / "base"), "--ul2-mixture", "R=1,X=1,S=1,C=1", "--seq-len", "32",
                            "--batch-size", "4", "--max-steps", "4", "--eval-every", "0", "--precision", "fp32"])
    assert r.exit_code == 0, r.output
    base_tok = load_tokenizer(setup / "base")
    tok = load_tokenizer(out / "model")
    assert ul2.has_ul2_tokens(tok) and not ul2.has_ul2_tokens(base_tok)
    assert tok.hf.token_to_id("<|R|>") == base_tok.vocab_size  # appended after the last id
    assert tok.encode("x = a[S]", add_bos=False) == base_tok.encode("x = a[S]", add_bos=False)  # text unchanged
    model, base = load_model_dir(out / "model"), load_model_dir(setup / "base")
    assert model.cfg.vocab_size == tok.vocab_size == base.cfg.vocab_size + 3 + ul2.NUM_SENTINELS
    summary = json.loads((out / "model" / "slmkit.json").read_text())
    assert summary["train_config"]["objective"] == "ul2" and summary["metrics"]["val_bpb"] > 0
    # the FIM prompt runs on the result (its score on so short a run is not the point here)
    res = fim.evaluate_fim(str(out / "model"), fim.fim_items([setup / "corpus" / "m1.py"], per_file=2), fmt="fim",
                           context=24, max_new_tokens=8)
    assert res["n"] == 2 and res["format"] == "fim"
    # continuing the UL2 model reuses its sentinels instead of appending more
    again = ul2.ul2_vocab(tok, model.cfg.vocab_size)
    assert again.vocab_size == model.cfg.vocab_size and again.mode_ids["R"] == tok.hf.token_to_id("<|R|>")


def test_interrupted_and_resumed_ul2_run_equals_the_uninterrupted_one(setup, tmp_path):
    reference = train(ul2_config(setup, tmp_path / "ref"))
    run = tmp_path / "run"
    state = run / "checkpoint" / "trainer_state.json"

    def interrupt():  # Ctrl-C once a checkpoint exists: the run saves one at the step it stops
        deadline = time.time() + 60
        while time.time() < deadline:
            if state.exists() and json.loads(state.read_text())["step"] >= 3:
                os.kill(os.getpid(), signal.SIGINT)
                return
            time.sleep(0.005)

    watcher = threading.Thread(target=interrupt)
    watcher.start()
    first = train(ul2_config(setup, run))
    watcher.join()
    assert first["interrupted"] and first["steps"] < 8
    resumed = train(ul2_config(setup, run), resume=True)
    assert resumed["steps"] == 8

    def losses(r):
        return {x["step"]: x["loss"] for x in read_metrics(r / "metrics.jsonl") if "loss" in x}
    assert losses(run) == losses(tmp_path / "ref")
    assert resumed["val_loss"] == reference["val_loss"]
    a, b = load_model_dir(run / "model"), load_model_dir(tmp_path / "ref" / "model")
    for (name, p), q in zip(a.state_dict().items(), b.state_dict().values(), strict=True):
        assert torch.equal(p, q), name


# ---- fill in the middle --------------------------------------------------------------------------------------

def test_fim_scores_a_known_right_and_a_known_wrong_middle(setup):
    lm = TorchLM.load(setup / "base")  # fitted to CODE: from the left context it writes CODE's next line
    prefix, middle, suffix = "def add(a, b):", "\n    return a + b", "\n\n\ndef sub(a, b):"
    right = {"id": "right", "prefix": prefix, "middle": middle, "suffix": suffix}
    wrong = {"id": "wrong", "prefix": prefix, "middle": "\n    return a * b", "suffix": suffix}
    res = fim.evaluate_fim(lm, [right, wrong], fmt="prefix", context=32, max_new_tokens=16)
    assert [r["prediction"] for r in res["records"]] == [middle, middle]
    assert [r["correct"] for r in res["records"]] == [True, False] and res["exact_match"] == 0.5
    assert fim.first_line("\n    x = 1\n    y = 2") == "\n    x = 1"
    assert fim.exact_match("\n    x = 1  ", "\n    x = 1") and not fim.exact_match("\nx = 1", "\n    x = 1")


def test_fim_items_cut_at_line_ends_and_rebuild_the_file(tmp_path):
    f = tmp_path / "a.py"
    f.write_text(CODE)
    items = fim.fim_items([f], per_file=3)
    assert len(items) == 3 and items == fim.fim_items([f], per_file=3)
    for it in items:
        assert it["prefix"] + it["middle"] + it["suffix"] == CODE
        assert it["middle"].startswith("\n") and "\n" not in it["middle"][1:]
    test, dev = fim.heldout_fim_items("test"), fim.heldout_fim_items("dev")
    assert len(test) == 100 and not {i["id"].split(":")[0] for i in test} & {i["id"].split(":")[0] for i in dev}


# ---- errors ------------------------------------------------------------------------------------------------

def test_bad_ul2_inputs_are_one_line_errors(setup, tmp_path):
    enc = tiny_encoder_dir(tmp_path / "enc", ["def add a b return"])
    base = ["train", "--data", str(setup / "data"), "--objective", "ul2", "--max-steps", "1", "--seq-len", "32"]
    for extra, message in [(["--init", str(enc)], "is an encoder (BERT/RoBERTa); --objective ul2 continues"),
                           ([], "objective ul2 continues training an existing decoder: pass --init MODEL"),
                           (["--init", str(setup / "base"), "--ul2-mixture", "R=1,Z=2"], "unknown mode 'Z'"),
                           (["--init", str(setup / "base"), "--seq-len", "8"], "needs at least 16 tokens")]:
        r = runner.invoke(app, [*base, "-o", str(tmp_path / f"r{len(extra)}{len(message)}"), *extra])
        assert r.exit_code == 2 and message in r.output and "Traceback" not in r.output, r.output
    with pytest.raises(ValueError, match="ul2_mixture is the mixture of --objective ul2"):
        TrainConfig(data="d", out="o", ul2_mixture="R=1", max_steps=1)
    item = {"id": "x", "prefix": "def f():", "middle": "\n    pass", "suffix": "\n"}
    with pytest.raises(ValueError, match="format 'fim' needs a model trained with"):
        fim.evaluate_fim(str(setup / "base"), [item], fmt="fim")
    with pytest.raises(ValueError, match="unknown FIM format 'middle'"):
        fim.evaluate_fim(str(setup / "base"), [item], fmt="middle")
    r = runner.invoke(app, ["eval-fim", str(setup / "base"), "--format", "fim", "--limit", "1"])
    assert r.exit_code == 2 and "format 'fim' needs a model trained with" in r.output, r.output
