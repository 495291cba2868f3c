"""An offline teacher: each position's top-k token ids and log-probabilities, written once, read by any number of
students (`slm teacher-cache`).

    OUT/ids.bin      (positions, k) uint16 or uint32 token ids
    OUT/logp.bin     (positions, k) float16 log-probabilities at the cache's temperature
    OUT/progress.json  while building (resumable); OUT/meta.json once complete
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
from tqdm import tqdm

from slmkit.distill.teacher import TeacherTargets, check_same_tokenizer, open_teacher_lm, teacher_logprobs
from slmkit.files import atomic_write_json

if TYPE_CHECKING:
    from slmkit.distill.kd import DistillConfig

CACHE_FORMAT = "slmkit-topk-cache"


def _cache_arrays(path: Path, n_positions: int, k: int, id_dtype, mode: str):
    ids = np.memmap(path / "ids.bin", dtype=id_dtype, mode=mode, shape=(n_positions, k))
    logp = np.memmap(path / "logp.bin", dtype=np.float16, mode=mode, shape=(n_positions, k))
    return ids, logp


def build_topk_cache(teacher: str, data: str | Path, out: str | Path, *, seq_len: int = 256, top_k: int = 16,
                     temperature: float = 1.0, max_tokens: int | None = None, batch_size: int = 4,
                     backend: str = "auto", device: str = "cpu", progress: bool = True, log=print) -> dict:
    """Run the teacher once over the training windows of token dataset `data` and store, for every position, its
    top-k next-token ids and log-probs (float16) in `out`: ids.bin, logp.bin and meta.json.

    Window w is tokens [w * seq_len, (w + 1) * seq_len] of train.bin, exactly what the training loop reads at
    that seq_len; `max_tokens` covers the first windows only (training then uses just those). Interrupted builds
    continue where they stopped (progress.json); meta.json appears only when the cache is complete.
    """
    from slmkit.data.tokens import TokenDataset, dataset_tokenizer
    out, dataset = Path(out), TokenDataset(data)
    if (out / "meta.json").exists():
        raise FileExistsError(f"{out} already holds a complete cache; choose another -o")
    lm = open_teacher_lm(teacher, backend, device)
    check_same_tokenizer(lm.tokenizer, dataset_tokenizer(data), teacher)
    windows = dataset.num_train_windows(seq_len)
    if max_tokens:
        windows = min(windows, max(1, max_tokens // seq_len))
    if windows < 1:
        raise ValueError(f"{data}: train split is shorter than one window of {seq_len + 1} tokens")
    vocab = lm.tokenizer.vocab_size
    id_dtype = np.uint16 if vocab <= 2 ** 16 else np.uint32
    settings = {"teacher": str(teacher), "backend": backend, "data": str(data), "seq_len": seq_len, "top_k": top_k,
                "temperature": temperature, "windows": windows, "id_dtype": np.dtype(id_dtype).name,
                "data_manifest_sha256": dataset.meta.get("manifest_sha256")}
    done = 0
    if (out / "progress.json").exists():
        prev = json.loads((out / "progress.json").read_text())
        if prev["settings"] != settings:
            raise ValueError(f"{out} holds an unfinished cache built with other settings ({prev['settings']}); "
                             "use another -o or delete it")
        done, elapsed = prev["windows_done"], prev["elapsed_s"]
        log(f"resuming the teacher cache at window {done:,} of {windows:,}")
        ids_arr, logp_arr = _cache_arrays(out, windows * seq_len, top_k, id_dtype, "r+")
    else:
        out.mkdir(parents=True, exist_ok=True)
        elapsed = 0.0
        ids_arr, logp_arr = _cache_arrays(out, windows * seq_len, top_k, id_dtype, "w+")
    bar = tqdm(total=windows * seq_len, initial=done * seq_len, unit="tok", unit_scale=True, disable=not progress,
               desc="teacher top-k")
    t0 = time.perf_counter() - elapsed
    try:
        while done < windows:
            rows = range(done, min(windows, done + batch_size))
            batch = torch.from_numpy(np.stack([dataset.train[w * seq_len:(w + 1) * seq_len + 1] for w in rows])
                                     .astype(np.int64))
            targets = teacher_logprobs(lm, batch, top_k, temperature)
            lo, hi = rows[0] * seq_len, (rows[-1] + 1) * seq_len
            ids_arr[lo:hi] = targets.ids.reshape(-1, top_k).cpu().numpy().astype(id_dtype)
            logp_arr[lo:hi] = targets.logp.reshape(-1, top_k).cpu().numpy().astype(np.float16)
            done = rows[-1] + 1
            bar.update(len(rows) * seq_len)
            ids_arr.flush()  # a teacher batch takes seconds; recording progress after each one costs nothing
            logp_arr.flush()
            atomic_write_json(out / "progress.json", {"settings": settings, "windows_done": done,
                                                      "elapsed_s": time.perf_counter() - t0})
    finally:
        bar.close()
        ids_arr.flush()
        logp_arr.flush()
    seconds = time.perf_counter() - t0
    tokens = windows * seq_len
    meta = {"format": CACHE_FORMAT, **settings, "tokens": tokens,
            "bytes_per_token": top_k * (np.dtype(id_dtype).itemsize + 2),
            "teacher_tokens_per_s": round(tokens / max(seconds, 1e-9), 1), "seconds": round(seconds, 1)}
    atomic_write_json(out / "meta.json", meta)
    (out / "progress.json").unlink(missing_ok=True)
    log(f"teacher cache: {tokens:,} positions x top-{top_k} ({meta['bytes_per_token']} bytes/token, "
        f"{(ids_arr.nbytes + logp_arr.nbytes) / 2**20:.1f} MiB) in {seconds:.0f} s "
        f"({meta['teacher_tokens_per_s']:,.0f} teacher tokens/s) -> {out}")
    return meta


class CachedTeacher:
    """Top-k targets read from a cache: no teacher model in memory, no teacher compute."""

    def __init__(self, path: str | Path, cfg: DistillConfig, seq_len: int):
        path = Path(path)
        if not (path / "meta.json").exists():
            hint = " (its build was interrupted: run `slm teacher-cache` again to finish it)" \
                if (path / "progress.json").exists() else ""
            raise FileNotFoundError(f"{path}/meta.json: not a complete teacher cache{hint}")
        self.meta = json.loads((path / "meta.json").read_text())
        if self.meta.get("format") != CACHE_FORMAT:
            raise ValueError(f"{path}/meta.json: not a teacher top-k cache (format {self.meta.get('format')!r})")
        if self.meta["seq_len"] != seq_len:
            raise ValueError(f"{path} was built with seq_len {self.meta['seq_len']}; train with --seq-len "
                             f"{self.meta['seq_len']} (positions are cached per window)")
        if abs(self.meta["temperature"] - cfg.temperature) > 1e-9:
            raise ValueError(f"{path} holds the teacher at temperature {self.meta['temperature']}; distil with "
                             f"that temperature or build another cache")
        self.seq_len = seq_len
        self.windows = self.meta["windows"]
        self.ids, self.logp = _cache_arrays(path, self.windows * seq_len, self.meta["top_k"],
                                            np.dtype(self.meta["id_dtype"]), "r")

    def targets(self, windows: list[int]) -> TeacherTargets:
        L = self.seq_len
        ids = np.stack([self.ids[w * L:(w + 1) * L] for w in windows]).astype(np.int64)
        logp = np.stack([self.logp[w * L:(w + 1) * L] for w in windows]).astype(np.float32)
        return TeacherTargets(logp=torch.from_numpy(logp), ids=torch.from_numpy(ids))

