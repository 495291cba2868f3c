"""Batches from a token dataset (train.bin / val.bin + meta.json), deterministic by step.

Training samples are non-overlapping windows of seq_len+1 tokens, visited in a seeded random order, epoch
after epoch. Sample i of the run is fully determined by (seed, i), so a resumed run — or the same global
batch split over several DDP ranks — sees exactly the data an uninterrupted single process would.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import torch


class TokenDataset:
    def __init__(self, path: str | Path):
        self.path = Path(path)
        meta_path = self.path / "meta.json"
        if not meta_path.exists():
            raise FileNotFoundError(f"{meta_path}: not found; create a token dataset with `slm data prepare`")
        self.meta = json.loads(meta_path.read_text())
        dtype = np.dtype(self.meta["dtype"])
        self.train = self._open("train", dtype)
        self.val = self._open("val", dtype)
        self._epoch, self._perm = -1, None
        self.max_windows: int | None = None  # train on the first N windows only (e.g. those a teacher cache covers)

    def _open(self, split: str, dtype) -> np.ndarray:
        f = self.path / f"{split}.bin"
        if not f.exists():
            raise FileNotFoundError(f"{f}: missing from the token dataset")
        if f.stat().st_size == 0:
            return np.zeros(0, dtype=dtype)
        return np.memmap(f, dtype=dtype, mode="r")

    @property
    def vocab_size(self) -> int:
        return int(self.meta["vocab_size"])

    def bytes_per_token(self, split: str = "val") -> float:
        s = self.meta["splits"][split]
        return s["bytes"] / max(1, s["tokens"])

    def num_train_windows(self, seq_len: int) -> int:
        n = (len(self.train) - 1) // seq_len
        return min(n, self.max_windows) if self.max_windows is not None else n

    def _window_start(self, sample: int, seq_len: int, seed: int) -> int:
        n = self.num_train_windows(seq_len)
        if n < 1:
            raise ValueError(f"{self.path}: train split has {len(self.train)} tokens, fewer than seq_len+1 = "
                             f"{seq_len + 1}; use more data or a smaller --seq-len")
        epoch, i = divmod(sample, n)
        if epoch != self._epoch:
            self._perm = np.random.default_rng([seed, epoch]).permutation(n)
            self._epoch = epoch
        return int(self._perm[i]) * seq_len

    def train_windows(self, first_sample: int, batch_size: int, seq_len: int, seed: int = 0) -> list[int]:
        """Window indices of samples first_sample .. first_sample+batch_size-1 (window w starts at w*seq_len)."""
        return [self._window_start(first_sample + j, seq_len, seed) // seq_len for j in range(batch_size)]

    def train_batch(self, first_sample: int, batch_size: int, seq_len: int, seed: int = 0):
        """Samples first_sample .. first_sample+batch_size-1 as (inputs, targets) int64 tensors (B, T)."""
        rows = [w * seq_len for w in self.train_windows(first_sample, batch_size, seq_len, seed)]
        buf = np.stack([self.train[r:r + seq_len + 1] for r in rows]).astype(np.int64)
        t = torch.from_numpy(buf)
        return t[:, :-1], t[:, 1:]

    def val_batches(self, batch_size: int, seq_len: int, max_tokens: int | None = None):
        """Consecutive non-overlapping windows over val.bin (each token predicted once), in batches."""
        n = (len(self.val) - 1) // seq_len
        if max_tokens:
            n = min(n, max(1, math.ceil(max_tokens / seq_len)))
        for start in range(0, n, batch_size):
            rows = range(start, min(n, start + batch_size))
            buf = np.stack([self.val[r * seq_len:r * seq_len + seq_len + 1] for r in rows]).astype(np.int64)
            t = torch.from_numpy(buf)
            yield t[:, :-1], t[:, 1:]


def dataset_tokenizer(data_dir: str | Path):
    """The tokenizer a token dataset was made with (its tokenizer/ folder), or None when it has none."""
    tok_dir = Path(data_dir) / "tokenizer"
    if not tok_dir.exists():
        return None
    from slmkit.tokenizer import load_tokenizer
    return load_tokenizer(tok_dir)
