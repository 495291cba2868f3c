"""Distillation: the divergences, the teacher top-k cache, online / offline / on-policy training, student-from-
teacher, and the tokenizer check."""

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import tiny_model_dir
from typer.testing import CliRunner

from slmkit.cli import app
from slmkit.data.prepare import prepare_dataset
from slmkit.distill import kd as D
from slmkit.distill import student_init, topk_cache
from slmkit.distill import teacher as T
from slmkit.train.loop import TrainConfig, train

TEXT = ("the cat sat on the mat. the dog sat on the log. a cat and a dog met on a mat by a log. "
        "the sun rose over the hill and the birds sang in the trees. ")


def _dist(*shape, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.log_softmax(torch.randn(*shape, generator=g) * 2, dim=-1)


def test_divergences_are_zero_on_equal_and_positive_on_different_distributions():
    p, q = _dist(5, 11, seed=1), _dist(5, 11, seed=2)
    for kind in D.LOSSES:
        assert D.divergence(p, p, kind).abs().max() < 1e-5
        assert (D.divergence(p, q, kind) > 0).all()
    # forward KL matches torch's; reverse KL is forward KL with the roles swapped
    ref = F.kl_div(q, p, log_target=True, reduction="none").sum(-1)
    assert torch.allclose(D.divergence(p, q, "fkl"), ref, atol=1e-5)
    assert torch.allclose(D.divergence(p, q, "rkl"), D.divergence(q, p, "fkl"), atol=1e-5)
    # JSD(0.5) is symmetric and bounded by log 2
    assert torch.allclose(D.divergence(p, q, "jsd"), D.divergence(q, p, "jsd"), atol=1e-5)
    assert (D.divergence(p, q, "jsd") <= np.log(2) + 1e-6).all()


def test_top_k_with_the_rest_is_exact_for_k_equal_vocab_and_a_lower_bound_below():
    t, s = _dist(4, 50, seed=3), torch.randn(4, 50)
    full = D.kd_loss(s, T.TeacherTargets(logp=t), torch.ones(4), "fkl", 0.5, 1.0)
    for k, exact in [(50, True), (8, False)]:
        top = t.topk(k, dim=-1)
        approx = D.kd_loss(s, T.TeacherTargets(logp=top.values, ids=top.indices), torch.ones(4), "fkl", 0.5, 1.0)
        if exact:
            assert abs(approx - full) < 1e-4
        else:  # coarsening both distributions can only lose information (data processing inequality)
            assert 0 < approx < full


@pytest.mark.parametrize("kind", D.LOSSES)
def test_minimising_each_loss_moves_the_student_to_the_teacher(kind):
    teacher = _dist(3, 20, seed=4)
    logits = torch.zeros(3, 20, requires_grad=True)
    opt = torch.optim.Adam([logits], lr=0.1)
    for _ in range(400):
        loss = D.kd_loss(logits, T.TeacherTargets(logp=teacher), torch.ones(3), kind, 0.5, 1.0)
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert (torch.softmax(logits, -1) - teacher.exp()).abs().max() < 0.02


def test_masked_positions_do_not_count_and_temperature_scales_by_t_squared():
    t, s = _dist(2, 3, 10, seed=5), torch.randn(2, 3, 10)
    mask = torch.tensor([[1.0, 1.0, 0.0], [1.0, 0.0, 0.0]])
    s2 = s.clone()
    s2[0, 2] += 100  # a masked position's logits cannot change the loss
    s2[1, 1:] -= 50
    a = D.kd_loss(s, T.TeacherTargets(logp=t), mask, "fkl", 0.5, 1.0)
    b = D.kd_loss(s2, T.TeacherTargets(logp=t), mask, "fkl", 0.5, 1.0)
    assert torch.allclose(a, b)
    t2 = torch.log_softmax(t / 2, -1)
    manual = D.divergence(t2, torch.log_softmax(s / 2, -1), "fkl")
    assert torch.allclose(D.kd_loss(s, T.TeacherTargets(logp=t2), mask, "fkl", 0.5, 2.0),
                          (manual * mask).sum() / mask.sum() * 4)


def test_config_rejects_bad_settings():
    with pytest.raises(ValueError, match="exactly one"):
        D.DistillConfig()
    with pytest.raises(ValueError, match="unknown distillation loss"):
        D.DistillConfig(teacher="t", loss="kl")
    with pytest.raises(ValueError, match="beta"):
        D.DistillConfig(teacher="t", loss="jsd", beta=1.0)
    with pytest.raises(ValueError, match="online teacher"):
        D.DistillConfig(cache="c", on_policy=0.5)


# ---- with real (tiny) models and data ------------------------------------------------------------------

@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """A token dataset with its own tokenizer, and a teacher fitted to that text (same tokenizer)."""
    from slmkit.tokenizer import train_tokenizer
    root = tmp_path_factory.mktemp("distill")
    docs = root / "docs"
    docs.mkdir()
    rng = np.random.default_rng(0)
    sentences = TEXT.split(". ")
    for i in range(150):
        (docs / f"d{i}.txt").write_text(". ".join(rng.choice(sentences, size=12)) + ".")
    tok = train_tokenizer([TEXT] * 30, vocab_size=300)
    tok.save(root / "tok")
    data = root / "data"
    prepare_dataset([str(docs / "*.txt")], data, tokenizer=str(root / "tok"), val_fraction=0.1, dedup=False,
                    progress=False, log=lambda m: None)
    run = train(_cfg({"data": data}, root / "teacher-run", max_steps=150, lr=1e-2,
                     model_overrides=dict(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, hidden_dim=128,
                                          max_seq_len=64)), log=lambda m: None)
    # the students see little of this text (the teacher saw it all): where distillation pays
    small = root / "small"
    prepare_dataset([str(docs / f"d{i}.txt") for i in range(24)], small, tokenizer=str(root / "tok"),
                    val_fraction=0.5, dedup=False, progress=False, log=lambda m: None)
    return {"root": root, "data": data, "small": small, "teacher": run["model_dir"], "tok": tok,
            "teacher_val": run["val_loss"]}


def _cfg(world, out, **kw):
    base = dict(data=str(world["data"]), out=str(out), preset="nano", seq_len=32, batch_size=4, lr=3e-3,
                warmup_steps=5, max_steps=30, eval_every=0, save_every=0, progress=False, precision="fp32",
                model_overrides=dict(dim=32, n_layers=1, n_heads=4, n_kv_heads=2, hidden_dim=64, max_seq_len=64))
    base.update(kw)
    return TrainConfig(**base)


def test_cache_holds_the_teachers_top_k_and_resumes_after_an_interruption(world, tmp_path, monkeypatch):
    meta = topk_cache.build_topk_cache(str(world["teacher"]), world["small"], tmp_path / "full", seq_len=32, top_k=4,
                              batch_size=2, progress=False, log=lambda m: None)
    assert meta["top_k"] == 4 and meta["bytes_per_token"] == 4 * (2 + 2) and meta["teacher_tokens_per_s"] > 0
    cache = topk_cache.CachedTeacher(tmp_path / "full", D.DistillConfig(cache="x"), seq_len=32)
    # the cache equals the online teacher's top-k at the same windows (up to fp16)
    lm = T.open_teacher_lm(str(world["teacher"]))
    from slmkit.data.tokens import TokenDataset
    ds = TokenDataset(world["small"])
    windows = [0, 3]
    batch = torch.from_numpy(np.stack([ds.train[w * 32:w * 32 + 33] for w in windows]).astype(np.int64))
    online = T.teacher_logprobs(lm, batch, 4, 1.0)
    cached = cache.targets(windows)
    assert torch.equal(cached.ids, online.ids)
    assert torch.allclose(cached.logp, online.logp, atol=2e-2)

    # interrupt a second build after two batches: no meta.json, progress kept; the rerun finishes it identically
    real, calls = T.teacher_logprobs, {"n": 0}

    def flaky(*a, **k):
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt
        return real(*a, **k)

    monkeypatch.setattr(topk_cache, "teacher_logprobs", flaky)
    with pytest.raises(KeyboardInterrupt):
        topk_cache.build_topk_cache(str(world["teacher"]), world["small"], tmp_path / "resumed", seq_len=32, top_k=4,
                           batch_size=2, progress=False, log=lambda m: None)
    assert not (tmp_path / "resumed" / "meta.json").exists()
    with pytest.raises(FileNotFoundError, match="interrupted"):
        topk_cache.CachedTeacher(tmp_path / "resumed", D.DistillConfig(cache="x"), seq_len=32)
    assert json.loads((tmp_path / "resumed" / "progress.json").read_text())["windows_done"] == 4
    monkeypatch.setattr(topk_cache, "teacher_logprobs", real)
    logs = []
    topk_cache.build_topk_cache(str(world["teacher"]), world["small"], tmp_path / "resumed", seq_len=32, top_k=4,
                       batch_size=2, progress=False, log=logs.append)
    assert any("resuming" in m for m in logs)
    for f in ("ids.bin", "logp.bin"):
        assert (tmp_path / "resumed" / f).read_bytes() == (tmp_path / "full" / f).read_bytes()
    with pytest.raises(ValueError, match="seq_len 32"):
        topk_cache.CachedTeacher(tmp_path / "full", D.DistillConfig(cache="x"), seq_len=16)


def test_distilled_student_beats_the_same_student_from_scratch(world, tmp_path):
    # The students see 12 documents; the teacher learnt from all of them. Same steps, same data, same seed.
    topk_cache.build_topk_cache(str(world["teacher"]), world["small"], tmp_path / "cache", seq_len=32, top_k=8,
                       progress=False, log=lambda m: None)
    common = dict(data=str(world["small"]), max_steps=60, lr=1e-2)
    scratch = train(_cfg(world, tmp_path / "scratch", **common), log=lambda m: None)
    offline = train(_cfg(world, tmp_path / "offline", distill=D.DistillConfig(cache=str(tmp_path / "cache"),
                                                                              alpha=0.9), **common), log=lambda m: None)
    online = train(_cfg(world, tmp_path / "online", distill=D.DistillConfig(teacher=str(world["teacher"]), alpha=0.9),
                        **common), log=lambda m: None)
    assert world["teacher_val"] < 0.5  # a teacher worth learning from
    assert offline["val_loss"] < scratch["val_loss"] - 0.04
    assert online["val_loss"] < scratch["val_loss"] - 0.04
    rec = [json.loads(line) for line in (tmp_path / "offline" / "metrics.jsonl").read_text().splitlines()]
    assert all("kd" in r and "ce" in r for r in rec if "loss" in r)
    assert json.loads((tmp_path / "offline" / "train_config.json").read_text())["distill"]["cache"]


def test_on_policy_batches_train_on_the_students_own_samples(world, tmp_path):
    summary = train(_cfg(world, tmp_path / "gkd", max_steps=4, log_every=1,
                         distill=D.DistillConfig(teacher=str(world["teacher"]), loss="jsd", on_policy=1.0,
                                                 on_policy_tokens=8)), log=lambda m: None)
    assert np.isfinite(summary["val_loss"])
    rec = [json.loads(line) for line in (tmp_path / "gkd" / "metrics.jsonl").read_text().splitlines()]
    assert all("kd" in r and "ce" not in r for r in rec if "loss" in r)  # no ground truth for sampled tokens

    from slmkit.formats.hf_dir import load_model_dir
    model = load_model_dir(world["teacher"])
    windows = torch.randint(3, 300, (2, 33))
    out = D.sample_continuations(model, windows, 8, torch.Generator().manual_seed(0))
    assert out.shape == windows.shape and torch.equal(out[:, :25], windows[:, :25])


def test_student_from_teacher_keeps_every_nth_block_and_the_embeddings(world, tmp_path):
    from slmkit.formats.hf_dir import load_model_dir
    student_init.student_from_teacher(str(world["teacher"]), tmp_path / "student", layer_step=2)
    teacher, student = load_model_dir(world["teacher"]), load_model_dir(tmp_path / "student")
    assert student.cfg.n_layers == 1 and teacher.cfg.n_layers == 2
    assert torch.equal(student.embed_tokens.weight, teacher.embed_tokens.weight)
    assert torch.equal(student.layers[0].mlp.up_proj.weight, teacher.layers[0].mlp.up_proj.weight)
    assert (tmp_path / "student" / "tokenizer.json").exists()


def test_mismatched_tokenizers_are_refused_with_a_way_out(world, tmp_path):
    from slmkit.tokenizer import train_tokenizer
    other = train_tokenizer(["completely different words here " * 40], vocab_size=280)
    stranger = tiny_model_dir(tmp_path / "stranger", other)
    with pytest.raises(T.TokenizerMismatch, match="different tokenizers.*sequence level"):
        train(_cfg(world, tmp_path / "run", distill=D.DistillConfig(teacher=str(stranger))), log=lambda m: None)
    with pytest.raises(T.TokenizerMismatch, match="different tokenizers"):
        topk_cache.build_topk_cache(str(stranger), world["data"], tmp_path / "c", seq_len=32, progress=False)
    T.check_same_tokenizer(world["tok"], world["tok"], "self")  # the same tokenizer passes


def test_cli_teacher_cache_and_distill(world, tmp_path):
    runner = CliRunner()
    r = runner.invoke(app, ["teacher-cache", str(world["teacher"]), "--data", str(world["small"]), "-o",
                            str(tmp_path / "cache"), "--top-k", "4", "--seq-len", "32"])
    assert r.exit_code == 0, r.output
    r = runner.invoke(app, ["distill", "--data", str(world["small"]), "--out", str(tmp_path / "run"), "--cache",
                            str(tmp_path / "cache"), "--student", "nano", "--set", "dim=32", "--set", "n_layers=1",
                            "--set", "n_heads=4", "--set", "n_kv_heads=2", "--set", "hidden_dim=64", "--seq-len",
                            "32", "--max-steps", "3", "--precision", "fp32", "--loss", "rkl"])
    assert r.exit_code == 0, r.output
    assert (tmp_path / "run" / "model" / "model.safetensors").exists()
    r = runner.invoke(app, ["distill", "--data", str(world["small"]), "--out", str(tmp_path / "run2"), "--teacher",
                            str(world["teacher"]), "--student-from-teacher", "2", "--seq-len", "32", "--max-steps",
                            "2", "--precision", "fp32", "--top-k", "4"])
    assert r.exit_code == 0, r.output
    r = runner.invoke(app, ["distill", "--data", str(world["small"]), "--out", str(tmp_path / "run3"),
                            "--max-steps", "2"])
    assert r.exit_code == 2 and "exactly one" in r.output


# ---- sequence-level distillation -----------------------------------------------------------------------

def test_teacher_text_keeps_real_prompts_and_val_and_resumes(world, tmp_path, monkeypatch):
    from slmkit.data.tokens import TokenDataset
    from slmkit.distill import teacher_text as TT
    src = TokenDataset(world["small"])
    meta = TT.write_teacher_text(str(world["teacher"]), world["small"], tmp_path / "full", prompt_tokens=8,
                                 seq_len=32, batch_size=4, progress=False, log=lambda m: None)
    out = TokenDataset(tmp_path / "full")
    n = src.num_train_windows(32)
    assert meta["splits"]["train"]["tokens"] == n * 32 and meta["teacher_text"]["batched"]
    for w in (0, n - 1):  # each window starts with the source's real prompt
        assert np.array_equal(out.train[w * 32:w * 32 + 8], src.train[w * 32:w * 32 + 8])
    assert np.array_equal(np.asarray(out.val), np.asarray(src.val))
    # the teacher's text is like the text it learnt: a student's loss on it is finite and it trains
    summary = train(_cfg(world, tmp_path / "student", data=str(tmp_path / "full"), max_steps=5), log=lambda m: None)
    assert np.isfinite(summary["val_loss"])

    real, calls = TT._sample_batch, {"n": 0}

    def flaky(*a, **k):
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt
        return real(*a, **k)

    monkeypatch.setattr(TT, "_sample_batch", flaky)
    with pytest.raises(KeyboardInterrupt):
        TT.write_teacher_text(str(world["teacher"]), world["small"], tmp_path / "resumed", prompt_tokens=8,
                              seq_len=32, batch_size=4, progress=False, log=lambda m: None)
    assert not (tmp_path / "resumed" / "meta.json").exists()
    monkeypatch.setattr(TT, "_sample_batch", real)
    TT.write_teacher_text(str(world["teacher"]), world["small"], tmp_path / "resumed", prompt_tokens=8,
                          seq_len=32, batch_size=4, progress=False, log=lambda m: None)
    assert (tmp_path / "resumed" / "train.bin").read_bytes() == (tmp_path / "full" / "train.bin").read_bytes()


def test_teacher_text_crosses_tokenizers(world, tmp_path):
    from slmkit.tokenizer import train_tokenizer
    other = train_tokenizer([TEXT.upper() + TEXT] * 30, vocab_size=280)
    stranger = tiny_model_dir(tmp_path / "stranger", other, train_on=TEXT, steps=100)
    r = CliRunner().invoke(app, ["teacher-text", str(stranger), "--data", str(world["small"]), "-o",
                                 str(tmp_path / "out"), "--prompt-tokens", "8", "--seq-len", "32", "--max-tokens",
                                 "128"])
    assert r.exit_code == 0, r.output
    assert "another tokenizer" in r.output
    meta = json.loads((tmp_path / "out" / "meta.json").read_text())
    assert not meta["teacher_text"]["batched"] and meta["splits"]["train"]["documents"] == 4
