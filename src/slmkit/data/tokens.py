"""The token dataset: what `slm data prepare` and `slm teacher-text` write and training reads.

A token dataset is a folder:

    train.bin, val.bin   flat arrays of token ids, `dtype` (uint16 when the vocabulary fits, else uint32), in the
                         machine's byte order (numpy's default). `slm data prepare` writes each document as
                         `[bos] + tokens` (eos when the tokenizer has no bos), so a model sees where documents
                         start; `slm teacher-text` writes windows that begin with the source's real tokens.
    meta.json            written last: a folder without it is not a complete dataset. Fields:
                           format "slmkit-tokens", version 1, dtype "uint16" | "uint32", vocab_size,
                           bos_id, eos_id, tokenizer_sha256 (`Tokenizer.sha256` of tokenizer/),
                           splits: {"train": {tokens, documents, bytes}, "val": {...}} where bytes is the UTF-8
                             length of the text the tokens encode (bits per byte divides by it),
                         and what the writer adds: `sources` (per-file sha256 manifest), `cleaning`, `config`,
                         `manifest_sha256` (prepare), `teacher_text` (teacher-text settings and speed).
    tokenizer/           the tokenizer the ids come from (`dataset_tokenizer`).
    val.txt              prepare only: the raw validation text, byte for byte what val.bin encodes.

`SplitWriter` appends ids to one split and counts them, `write_meta` checks the .bin files against the counts and
writes meta.json, `load_meta` checks a dataset when it is opened: every problem is one line naming the file, the
field and what to do.

`TokenDataset` serves batches, deterministic by step. Training samples are non-overlapping windows of seq_len+1
tokens, visited in a seeded random order, epoch after epoch. Sample i of the run is fully determined by
(seed, i), so a resumed run — or the same global batch split over several DDP ranks — sees exactly the data an
uninterrupted single process would.
"""

from __future__ import annotations

import itertools
import json
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from slmkit.data.ingest import DataError
from slmkit.files import atomic_write_json

FORMAT, VERSION = "slmkit-tokens", 1
SPLITS = ("train", "val")
REMAKE = "re-run `slm data prepare`"


def token_dtype(vocab_size: int) -> np.dtype:
    """The narrowest dtype that holds every id of a `vocab_size` vocabulary."""
    return np.dtype(np.uint16 if vocab_size <= 65535 else np.uint32)


@dataclass
class SplitCounts:
    """One split's entry in meta.json."""

    tokens: int = 0
    documents: int = 0
    bytes: int = 0


class SplitWriter:
    """Appends token ids to one split's .bin file, counting what meta.json records for it.

    Given the counts of an earlier, interrupted write, it continues that file: first cut back to
    `counts.tokens`, dropping whatever the interruption left after the last complete record.
    """

    def __init__(self, path: str | Path, dtype, counts: SplitCounts | None = None):
        self.path, self.dtype = Path(path), np.dtype(dtype)
        self.counts = counts if counts is not None else SplitCounts()
        size = self.counts.tokens * self.dtype.itemsize
        if counts is not None and (not self.path.is_file() or self.path.stat().st_size < size):
            raise DataError(str(self.path), None, f"holds fewer than the {self.counts.tokens} tokens already written",
                            "the unfinished dataset is damaged; delete the folder and start again")
        self._f = open(self.path, "r+b" if counts is not None else "wb")
        self._f.truncate(size)
        self._f.seek(0, 2)

    def write(self, ids: Sequence[int] | np.ndarray, n_bytes: int, documents: int = 1) -> None:
        """Append `ids`, the tokens of `documents` documents whose text is `n_bytes` UTF-8 bytes long."""
        arr = np.asarray(ids, dtype=self.dtype)
        self._f.write(arr.tobytes())
        self.counts.tokens += len(arr)
        self.counts.documents += documents
        self.counts.bytes += n_bytes

    def write_documents(self, docs: Sequence[Sequence[int]], n_bytes: int, sep: int) -> None:
        """Append documents in the dataset layout, each as `[sep] + ids` (sep: the tokenizer's bos)."""
        n_tokens = sum(len(ids) + 1 for ids in docs)
        flat = np.fromiter(itertools.chain.from_iterable((sep, *ids) for ids in docs), dtype=self.dtype,
                           count=n_tokens)
        self.write(flat, n_bytes, documents=len(docs))

    def flush(self) -> None:
        """Make everything written so far durable (before recording progress that counts on it)."""
        self._f.flush()
        os.fsync(self._f.fileno())

    def close(self) -> None:
        self._f.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def write_meta(directory: str | Path, *, dtype, vocab_size: int, bos_id: int | None, eos_id: int | None,
               tokenizer_sha256: str | None, splits: dict[str, SplitCounts | dict], **extra) -> dict:
    """Write `directory`/meta.json, which marks the dataset complete; returns the meta dict.

    The .bin files are checked against `splits` first, so a dataset never claims more (or fewer) tokens than
    it holds. `extra` fields (sources, cleaning, config, ...) follow the format's own.
    """
    meta = {"format": FORMAT, "version": VERSION, "dtype": np.dtype(dtype).name, "vocab_size": int(vocab_size),
            "bos_id": bos_id, "eos_id": eos_id, "tokenizer_sha256": tokenizer_sha256,
            "splits": {name: vars(s).copy() if isinstance(s, SplitCounts) else dict(s) for name, s in splits.items()},
            **extra}
    directory = Path(directory)
    _check(directory, meta)
    atomic_write_json(directory / "meta.json", meta)
    return meta


def load_meta(directory: str | Path) -> dict:
    """Read and check a token dataset folder: meta.json present and of this format, the .bins matching its counts."""
    directory = Path(directory)
    meta_path = directory / "meta.json"
    if not meta_path.is_file():
        if (directory / "progress.json").exists():
            raise DataError(str(meta_path), None, "not written yet: the folder holds an unfinished dataset",
                            "run the `slm teacher-text` command that made it again to finish it")
        raise DataError(str(meta_path), None, "not found", "create a token dataset with `slm data prepare`")
    try:
        meta = json.loads(meta_path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise DataError(str(meta_path), None, f"not valid JSON ({e})", REMAKE) from None
    _check(directory, meta)
    return meta


def _check(directory: Path, meta) -> None:
    meta_path = str(directory / "meta.json")

    def bad(reason: str, hint: str = REMAKE):
        return DataError(meta_path, None, reason, hint)

    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        found = meta.get("format") if isinstance(meta, dict) else type(meta).__name__
        raise bad(f"not a {FORMAT} dataset (format {found!r})", "point at a `slm data prepare` output")
    if meta.get("version") != VERSION:
        raise bad(f"field 'version' is {meta.get('version')!r}, expected {VERSION}",
                  "re-run `slm data prepare` with this slmkit")
    if meta.get("dtype") not in ("uint16", "uint32"):
        raise bad(f"field 'dtype' is {meta.get('dtype')!r}, expected 'uint16' or 'uint32'")
    vocab = meta.get("vocab_size")
    if not isinstance(vocab, int) or isinstance(vocab, bool) or vocab < 1:
        raise bad(f"field 'vocab_size' is {vocab!r}, expected a positive integer")
    if vocab > np.iinfo(meta["dtype"]).max + 1:
        raise bad(f"field 'vocab_size' is {vocab:,}, more ids than dtype {meta['dtype']} holds")
    itemsize = np.dtype(meta["dtype"]).itemsize
    splits = meta.get("splits")
    for split in SPLITS:
        counts = splits.get(split) if isinstance(splits, dict) else None
        for key in ("tokens", "bytes"):
            value = counts.get(key) if isinstance(counts, dict) else None
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                raise bad(f"field 'splits.{split}.{key}' is {value!r}, expected a count (integer >= 0)")
        tokens = counts["tokens"]
        path = directory / f"{split}.bin"
        if not path.is_file():
            raise DataError(str(path), None, "missing", REMAKE)
        size = path.stat().st_size
        if size != tokens * itemsize:
            raise DataError(str(path), None, f"{size} bytes, but meta.json says {tokens} {meta['dtype']} tokens "
                            f"({tokens * itemsize} bytes) in 'splits.{split}.tokens'",
                            "the dataset is damaged or mixed; " + REMAKE)


class TokenDataset:
    """A token dataset folder, checked on open (`load_meta`); train/val are read-only memory maps."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.meta = load_meta(self.path)
        dtype = np.dtype(self.meta["dtype"])
        self.train = self._open("train", dtype)
        self.val = self._open("val", dtype)
        self._epoch, self._perm = -1, None
        self.max_windows: int | None = None  # train on the first N windows only (e.g. those a teacher cache covers)

    def _open(self, split: str, dtype) -> np.ndarray:
        f = self.path / f"{split}.bin"
        if f.stat().st_size == 0:
            return np.zeros(0, dtype=dtype)  # numpy cannot map an empty file
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

    def val_documents(self) -> list[list[int]]:
        """The validation split cut into its documents, each a list of ids starting with its separator (bos)."""
        sep = self.meta.get("bos_id") if self.meta.get("bos_id") is not None else self.meta.get("eos_id")
        if sep is None:
            raise DataError(str(self.path / "meta.json"), None, "fields 'bos_id' and 'eos_id' are both null, so "
                            "documents cannot be told apart", REMAKE)
        starts = np.flatnonzero(self.val == sep).tolist()
        return [self.val[a:b].tolist() for a, b in zip(starts, [*starts[1:], len(self.val)], strict=True)]


def dataset_tokenizer(data_dir: str | Path):
    """The tokenizer a token dataset was made with (its tokenizer/ folder), or None when it has none.

    It must be the one meta.json names (`tokenizer_sha256`): ids read with another tokenizer are garbage.
    """
    tok_dir = Path(data_dir) / "tokenizer"
    if not tok_dir.exists():
        return None
    from slmkit.tokenizer import load_tokenizer
    tok = load_tokenizer(tok_dir)
    meta_path = Path(data_dir) / "meta.json"
    want = json.loads(meta_path.read_text(encoding="utf-8")).get("tokenizer_sha256") if meta_path.is_file() else None
    if want and tok.sha256 != want:
        raise DataError(str(meta_path), None, f"field 'tokenizer_sha256' is {want[:12]}…, but {tok_dir} is "
                        f"{tok.sha256[:12]}…", "the dataset is mixed; " + REMAKE)
    return tok
