"""Dedup: exact duplicates by sha256, near-duplicates by MinHash + LSH, first occurrence wins.

Shingles are character 5-grams (of code points). Word n-grams miss the near-duplicates that matter in
code: CPython's `encodings/cp1250.py` and `cp1251.py` (generated character-map tables) share only 39%
of their word 5-grams but 76% of their character 5-grams, and char shingles work for any script.

MinHash: each shingle is hashed once (a polynomial rolling hash over the 5 code points, then a 64-bit
mixer, vectorised in numpy), reduced to 31 bits, and pushed through 128 universal hash functions
h(x) = (a·x + b) mod (2^31 − 1); the signature is the per-function minimum. LSH splits the signature
into `bands` of `rows` (chosen from the threshold) and only documents sharing a band bucket are compared;
a candidate counts as a duplicate when the estimated Jaccard (fraction of equal signature entries)
reaches the threshold. Only kept documents enter the index, so near-duplicates do not chain.
"""

from __future__ import annotations

import hashlib
import os
from collections import defaultdict
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np

NUM_PERM = 128
SHINGLE = 5
MERSENNE = np.uint64((1 << 31) - 1)
_BLOCK = 4096  # shingles per step of the (NUM_PERM, block) hash matrix: 4 MiB, stays in cache

_M64 = np.uint64(0xFFFFFFFFFFFFFFFF)


def _mix64(x: np.ndarray) -> np.ndarray:
    """splitmix64 finaliser: spreads the bits of a rolling hash over the whole word (wraps mod 2^64)."""
    x = x ^ (x >> np.uint64(30))
    x = x * np.uint64(0xBF58476D1CE4E5B9)
    x = x ^ (x >> np.uint64(27))
    x = x * np.uint64(0x94D049BB133111EB)
    return x ^ (x >> np.uint64(31))


def shingle_hashes(text: str, n: int = SHINGLE) -> np.ndarray:
    """Distinct 31-bit hashes of the character n-grams of `text` (a text shorter than n is one shingle)."""
    cps = np.frombuffer(text.encode("utf-32-le"), dtype=np.uint32).astype(np.uint64)
    if len(cps) < n:
        cps = np.concatenate([cps, np.zeros(n - len(cps), np.uint64)])
    windows = len(cps) - n + 1
    h = np.zeros(windows, np.uint64)
    with np.errstate(over="ignore"):
        for k in range(n):  # h = ((c0·P + c1)·P + c2)… over each window, mod 2^64
            h = h * np.uint64(0x100000001B3) + cps[k : k + windows]
        h = _mix64(h)
    return np.unique(h >> np.uint64(33))  # 31 bits: below the Mersenne prime, a·x + b fits in 62 bits


def choose_bands(threshold: float, num_perm: int = NUM_PERM) -> tuple[int, int]:
    """(bands, rows) minimising false positives below and false negatives above the threshold, for
    P(candidate | Jaccard s) = 1 − (1 − s^rows)^bands (the standard LSH S-curve)."""
    best, best_err = (1, num_perm), float("inf")
    s_lo = np.linspace(0.0, threshold, 200)
    s_hi = np.linspace(threshold, 1.0, 200)
    for bands in range(1, num_perm + 1):
        rows = num_perm // bands
        # areas under/over the curve, as mean height × width
        fp = np.mean(1 - (1 - s_lo**rows) ** bands) * threshold
        fn = np.mean((1 - s_hi**rows) ** bands) * (1 - threshold)
        if fp + fn < best_err:
            best, best_err = (bands, rows), fp + fn
    return best


@dataclass
class MinHasher:
    num_perm: int = NUM_PERM
    seed: int = 1

    def __post_init__(self):
        rng = np.random.default_rng(self.seed)
        p = int(MERSENNE)
        self.a = rng.integers(1, p, size=(self.num_perm, 1), dtype=np.uint64)
        self.b = rng.integers(0, p, size=(self.num_perm, 1), dtype=np.uint64)

    def signatures(self, shingles: list[np.ndarray]) -> np.ndarray:
        """(len(shingles), num_perm) uint32 signatures. All documents' shingles are processed as one
        long array in fixed blocks; per-document minima come from np.minimum.reduceat."""
        sig = np.empty((len(shingles), self.num_perm), np.uint32)
        if not shingles:
            return sig
        lengths = np.array([len(s) for s in shingles])
        starts = np.concatenate([[0], np.cumsum(lengths)[:-1]])
        allsh = np.concatenate(shingles)
        seg_mins, seg_docs = [], []
        y = np.empty((self.num_perm, _BLOCK), np.uint64)
        z = np.empty_like(y)
        for c0 in range(0, len(allsh), _BLOCK):
            x = allsh[c0 : c0 + _BLOCK]
            w = len(x)
            yy, zz = y[:, :w], z[:, :w]
            np.multiply(self.a, x[None, :], out=yy)
            yy += self.b  # < 2^62: no overflow
            np.right_shift(yy, np.uint64(31), out=zz)  # mod 2^31−1 without division: hi + lo …
            yy &= MERSENNE
            yy += zz  # … now < 2^32 and ≡ a·x + b; one conditional subtraction left:
            np.subtract(yy, MERSENNE, out=zz)  # wraps to a huge value where yy < p,
            np.minimum(yy, zz, out=yy)  # so the minimum picks the reduced one
            # segments: pieces of documents inside this block
            first = np.searchsorted(starts, c0, side="right") - 1
            last = np.searchsorted(starts, c0 + w, side="left")
            seg = np.maximum(starts[first:last], c0) - c0
            seg_mins.append(np.minimum.reduceat(yy, seg, axis=1))
            seg_docs.append(np.arange(first, last))
        mins = np.concatenate(seg_mins, axis=1)
        docs = np.concatenate(seg_docs)
        # a document split over blocks has several segments; they are adjacent, reduce them once more
        doc_first = np.flatnonzero(np.r_[True, docs[1:] != docs[:-1]])
        sig[:] = np.minimum.reduceat(mins, doc_first, axis=1).T
        return sig


@dataclass
class DedupStats:
    exact: int = 0
    near: int = 0


class Deduplicator:
    """Stateful filter over a stream of documents, fed in batches: `check(texts)` says, for each text,
    "exact", "near" or None (keep). Earlier batches and earlier texts in a batch win."""

    def __init__(self, threshold: float = 0.7, *, near: bool = True, num_perm: int = NUM_PERM, seed: int = 1):
        if not 0.0 < threshold <= 1.0:
            raise ValueError(f"near_dup_threshold must be in (0, 1], got {threshold}")
        self.threshold = threshold
        self.near = near
        self.hasher = MinHasher(num_perm, seed)
        self.bands, self.rows = choose_bands(threshold, num_perm)
        self.seen: set[bytes] = set()
        self.buckets: list[dict[bytes, list[int]]] = [defaultdict(list) for _ in range(self.bands)]
        self.kept_sigs: list[np.ndarray] = []
        self.stats = DedupStats()
        self.threads = max(1, min(4, os.cpu_count() or 1))

    def _signatures(self, texts: list[str]) -> np.ndarray:
        # numpy releases the GIL in its loops: hashing halves of the batch in threads uses the cores
        parts = np.array_split(np.arange(len(texts)), self.threads)
        parts = [p for p in parts if len(p)]

        def work(idx: np.ndarray) -> np.ndarray:
            return self.hasher.signatures([shingle_hashes(texts[i]) for i in idx])

        if len(parts) <= 1:
            return work(np.arange(len(texts)))
        with ThreadPoolExecutor(len(parts)) as pool:
            return np.concatenate(list(pool.map(work, parts)))

    def check(self, texts: list[str]) -> list[str | None]:
        verdicts: list[str | None] = [None] * len(texts)
        fresh = []
        for i, text in enumerate(texts):
            digest = hashlib.sha256(text.encode("utf-8")).digest()
            if digest in self.seen:
                verdicts[i] = "exact"
                self.stats.exact += 1
            else:
                self.seen.add(digest)
                fresh.append(i)
        if not self.near or not fresh:
            return verdicts
        sigs = self._signatures([texts[i] for i in fresh])
        for i, sig in zip(fresh, sigs, strict=True):
            keys = [sig[b * self.rows : (b + 1) * self.rows].tobytes() for b in range(self.bands)]
            candidates = {j for b, key in enumerate(keys) for j in self.buckets[b].get(key, ())}
            if candidates:
                cand = np.fromiter(candidates, dtype=np.int64, count=len(candidates))
                similarity = (np.stack([self.kept_sigs[j] for j in cand]) == sig).mean(axis=1)
                if similarity.max() >= self.threshold:
                    verdicts[i] = "near"
                    self.stats.near += 1
                    continue
            index = len(self.kept_sigs)
            self.kept_sigs.append(sig)
            for b, key in enumerate(keys):
                self.buckets[b][key].append(index)
        return verdicts
