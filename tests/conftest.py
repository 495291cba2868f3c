"""Shared fixtures: tiny models and a tiny synthetic token dataset, so tests run in seconds on a CPU."""

import json

import numpy as np
import pytest
import torch

from slmkit.config import model_config

TINY = dict(vocab_size=96, dim=32, n_layers=2, n_heads=4, n_kv_heads=2, hidden_dim=64, max_seq_len=64)


@pytest.fixture
def tiny_cfg():
    return model_config("nano", **TINY)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def write_token_dataset(path, n_train=20000, n_val=2000, vocab=96, seed=0):
    """A learnable synthetic corpus: noisy repeated patterns, in the format `slm data prepare` writes."""
    rng = np.random.default_rng(seed)
    pattern = rng.integers(3, vocab, size=37)
    stream = np.tile(pattern, (n_train + n_val) // len(pattern) + 1)[: n_train + n_val].copy()
    noise = rng.random(len(stream)) < 0.1
    stream[noise] = rng.integers(3, vocab, size=int(noise.sum()))
    path.mkdir(parents=True, exist_ok=True)
    stream[:n_train].astype(np.uint16).tofile(path / "train.bin")
    stream[n_train:].astype(np.uint16).tofile(path / "val.bin")
    meta = {"format": "slmkit-tokens", "version": 1, "dtype": "uint16", "vocab_size": vocab,
            "splits": {"train": {"tokens": n_train, "documents": 1, "bytes": 3 * n_train},
                       "val": {"tokens": n_val, "documents": 1, "bytes": 3 * n_val}}}
    (path / "meta.json").write_text(json.dumps(meta))
    return path


@pytest.fixture
def token_data(tmp_path):
    return write_token_dataset(tmp_path / "data")
