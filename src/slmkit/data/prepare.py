"""`slm data prepare`: sources → clean, deduplicated, split, tokenized dataset (train.bin, val.bin, meta.json).

Reads top to bottom as the pipeline runs:
  1. ingest   files, folders, globs → documents (ingest.py)
  2. clean    NFC, line endings, control characters, optional PII redaction (clean.py)
  3. dedup    exact (sha256) and near (MinHash + LSH) duplicates, first one wins (dedup.py)
  4. split    document-level, by a seeded hash of the document id (stable across machines)
  5. tokenizer  train a byte-level BPE on the train split, or load one
  6. tokenize   [bos] + ids per document, appended to train.bin / val.bin; val.txt is the raw val text
  7. meta.json  written last, after checking the .bin files against its counts
The format of what it writes, and the reader: data/tokens.py.
Everything is built in a temporary sibling folder that replaces `out_dir` only on success. Documents kept
after step 4 are staged on disk (not in RAM), so corpora larger than memory work.
"""

from __future__ import annotations

import hashlib
import itertools
import struct
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from tqdm import tqdm

from slmkit.data.clean import PII_KINDS, clean_text
from slmkit.data.dedup import Deduplicator
from slmkit.data.ingest import DataError, SourceFile, find_files, read_documents
from slmkit.data.tokens import SPLITS, SplitCounts, SplitWriter, token_dtype, write_meta
from slmkit.files import atomic_dir, sha256_file

DEDUP_BATCH_DOCS, DEDUP_BATCH_CHARS = 1024, 8_000_000
ENCODE_BATCH_DOCS, ENCODE_BATCH_CHARS = 4096, 8_000_000
MAX_SKIPPED_LISTED = 1000  # meta lists this many skipped items; skipped_count is always exact
MAX_SKIPPED_LOGGED = 20
_STAGE_HEADER = struct.Struct("<QB")  # text length in bytes, is_val


@dataclass
class Report:
    """Everything counted along the way; becomes meta["cleaning"]."""

    documents_in: int = 0
    empty: int = 0
    too_long: int = 0
    exact_duplicates: int = 0
    near_duplicates: int = 0
    pii: Counter = field(default_factory=Counter)
    skipped: list[dict] = field(default_factory=list)
    skipped_count: int = 0


def split_score(seed: int, doc_id: str) -> float:
    """A uniform number in [0, 1) from (seed, doc_id): the same on every machine and every run."""
    digest = hashlib.blake2b(f"{seed}\0{doc_id}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") / 2**64


def _batches(items: Iterator, max_items: int, max_chars: int, text=lambda x: x) -> Iterator[list]:
    batch, chars = [], 0
    for item in items:
        batch.append(item)
        chars += len(text(item))
        if len(batch) >= max_items or chars >= max_chars:
            yield batch
            batch, chars = [], 0
    if batch:
        yield batch


# ----------------------------------------------------------------------------------------------------
# Steps 1-4: documents → staged file of kept, cleaned documents with their split


@dataclass
class Staged:
    path: Path
    count: int = 0
    flip: int | None = None  # index of one document whose split is overridden (see _guarantee_splits)

    def write(self, f, text: str, is_val: bool) -> None:
        data = text.encode("utf-8")
        f.write(_STAGE_HEADER.pack(len(data), is_val))
        f.write(data)
        self.count += 1

    def read(self, only: str | None = None) -> Iterator[tuple[bool, str]]:
        """(is_val, text) of every staged document in order; `only` = "train" or "val" filters."""
        with open(self.path, "rb") as f:
            for index in itertools.count():
                header = f.read(_STAGE_HEADER.size)
                if not header:
                    return
                size, is_val = _STAGE_HEADER.unpack(header)
                text = f.read(size).decode("utf-8")
                is_val = bool(is_val) != (index == self.flip)
                if only is None or (only == "val") == is_val:
                    yield is_val, text


def _stage_documents(files: list[SourceFile], staged: Staged, report: Report, sources_meta: list[dict], *,
                     jsonl_field, csv_column, val_fraction, seed, dedup, near_dup_threshold, redact_pii,
                     max_doc_chars, on_problem, progress) -> None:
    dedupe = Deduplicator(near_dup_threshold, near=True) if dedup else None
    # the split guarantee needs the extreme-scored documents of each side
    best = {"val_max": (-1.0, None), "train_min": (2.0, None)}
    counts = {"train": 0, "val": 0}

    def cleaned_documents() -> Iterator[tuple[int, str, str]]:
        """(source index, doc_id, cleaned text) of every non-empty document, counting the rest."""
        bar = tqdm(files, desc="ingest", unit="file", disable=not progress)
        for index, f in enumerate(bar):
            sources_meta.append({"path": str(f.path), "sha256": sha256_file(f.path), "bytes": f.path.stat().st_size,
                                 "documents": 0, "kept": 0})
            for doc in read_documents(f, jsonl_field=jsonl_field, csv_column=csv_column, on_problem=on_problem):
                report.documents_in += 1
                sources_meta[index]["documents"] += 1
                cleaned = clean_text(doc.text, redact_pii=redact_pii)
                report.pii.update(cleaned.pii)
                if not cleaned.text.strip():
                    report.empty += 1
                elif max_doc_chars is not None and len(cleaned.text) > max_doc_chars:
                    report.too_long += 1
                else:
                    yield index, doc.doc_id, cleaned.text

    with open(staged.path, "wb") as out:
        for batch in _batches(cleaned_documents(), DEDUP_BATCH_DOCS, DEDUP_BATCH_CHARS, text=lambda x: x[2]):
            verdicts = dedupe.check([text for _, _, text in batch]) if dedupe else [None] * len(batch)
            for (source_index, doc_id, text), verdict in zip(batch, verdicts, strict=True):
                if verdict is not None:
                    continue
                score = split_score(seed, doc_id)
                is_val = score < val_fraction
                side = "val" if is_val else "train"
                if is_val and score > best["val_max"][0]:
                    best["val_max"] = (score, staged.count)
                if not is_val and score < best["train_min"][0]:
                    best["train_min"] = (score, staged.count)
                counts[side] += 1
                sources_meta[source_index]["kept"] += 1
                staged.write(out, text, is_val)
    if dedupe:
        report.exact_duplicates, report.near_duplicates = dedupe.stats.exact, dedupe.stats.near
    # with >= 2 documents each split gets at least one (val_fraction 0 means: no validation split)
    if staged.count >= 2 and val_fraction > 0:
        if counts["val"] == 0:
            staged.flip = best["train_min"][1]  # the train document that came closest to val
        elif counts["train"] == 0:
            staged.flip = best["val_max"][1]


# ----------------------------------------------------------------------------------------------------
# Steps 5-6: tokenizer and token files


def _get_tokenizer(tokenizer, staged: Staged, vocab_size: int, progress: bool):
    from slmkit.tokenizer import load_tokenizer, train_tokenizer

    if tokenizer is not None:
        return load_tokenizer(tokenizer)
    texts = (text for _, text in staged.read(only="train"))
    return train_tokenizer(texts, vocab_size=vocab_size, show_progress=progress)


def _tokenize(staged: Staged, tok, work: Path, dtype: np.dtype, progress: bool) -> dict[str, SplitCounts]:
    # every document starts with bos, so a model sees document boundaries (GPT-2 style tokenizers have
    # <|endoftext|> as both bos and eos)
    sep = tok.bos_id if tok.bos_id is not None else tok.eos_id
    if sep is None:
        raise ValueError("the tokenizer has neither a bos nor an eos token to separate documents")
    bar = tqdm(total=staged.count, desc="tokenize", unit="doc", disable=not progress)
    with (SplitWriter(work / "train.bin", dtype) as train_w, SplitWriter(work / "val.bin", dtype) as val_w,
          open(work / "val.txt", "wb") as val_txt):
        writers = {"train": train_w, "val": val_w}
        for batch in _batches(staged.read(), ENCODE_BATCH_DOCS, ENCODE_BATCH_CHARS, text=lambda x: x[1]):
            encoded = tok.encode_batch([text for _, text in batch])
            for side in SPLITS:
                picked = [(text, ids) for (is_val, text), ids in zip(batch, encoded, strict=True)
                          if is_val == (side == "val")]
                if not picked:
                    continue
                raw = [text.encode("utf-8") for text, _ in picked]
                writers[side].write_documents([ids for _, ids in picked], sum(map(len, raw)), sep)
                if side == "val":
                    val_txt.write(b"".join(raw))
            bar.update(len(batch))
    bar.close()
    return {side: w.counts for side, w in writers.items()}


# ----------------------------------------------------------------------------------------------------
# The entry point


def prepare_dataset(
    sources: list[str | Path],
    out_dir: str | Path,
    *,
    tokenizer: str | Path | None = None,
    vocab_size: int = 8192,
    jsonl_field: str = "text",
    csv_column: str = "text",
    val_fraction: float = 0.01,
    seed: int = 0,
    dedup: bool = True,
    near_dup_threshold: float = 0.7,
    redact_pii: bool = False,
    on_error: str = "fail",
    exclude: list[str] | None = None,
    max_doc_chars: int | None = None,
    progress: bool = True,
    log=print,
) -> dict:
    """Build a token dataset in `out_dir` from `sources`; returns the meta dict written to meta.json.

    on_error="fail" stops at the first bad input (nothing is written); "skip" logs it, skips that item
    (a line, a row, or a whole file) and lists it in meta["cleaning"]["skipped"]. Documents longer than
    `max_doc_chars` (after cleaning) are dropped and counted as `too_long`.
    """
    if on_error not in ("fail", "skip"):
        raise ValueError(f"on_error must be 'fail' or 'skip', got {on_error!r}")
    if not 0.0 <= val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction}")
    if isinstance(sources, (str, Path)):
        sources = [sources]
    out_dir = Path(out_dir)
    exclude = list(exclude or [])
    config = {
        "sources": [str(s) for s in sources], "out_dir": str(out_dir),
        "tokenizer": None if tokenizer is None else str(tokenizer), "vocab_size": vocab_size,
        "jsonl_field": jsonl_field, "csv_column": csv_column, "val_fraction": val_fraction, "seed": seed,
        "dedup": dedup, "near_dup_threshold": near_dup_threshold, "redact_pii": redact_pii,
        "on_error": on_error, "exclude": exclude, "max_doc_chars": max_doc_chars,
    }
    report = Report()

    def on_problem(err: DataError) -> None:
        if on_error == "fail":
            raise err
        report.skipped_count += 1
        if len(report.skipped) < MAX_SKIPPED_LISTED:
            report.skipped.append({"source": err.source, "line": err.line, "reason": err.reason})
        if report.skipped_count <= MAX_SKIPPED_LOGGED:
            log(f"skipped: {err}")
        elif report.skipped_count == MAX_SKIPPED_LOGGED + 1:
            log("skipped: ... (more; all are listed in meta.json)")

    files = find_files(sources, exclude, on_problem)
    # never read our own output (a previous dataset, or the folder being built) as input
    out_resolved = out_dir.resolve()
    files = [f for f in files if not f.path.resolve().is_relative_to(out_resolved)]
    if not files:
        raise DataError(", ".join(map(str, sources)) or "(no sources)", None, "no input files",
                        "give files, folders or globs that exist")

    started = time.perf_counter()
    with atomic_dir(out_dir) as work:
        staged = Staged(work / ".documents.tmp")
        sources_meta: list[dict] = []
        _stage_documents(files, staged, report, sources_meta, jsonl_field=jsonl_field, csv_column=csv_column,
                         val_fraction=val_fraction, seed=seed, dedup=dedup, near_dup_threshold=near_dup_threshold,
                         redact_pii=redact_pii, max_doc_chars=max_doc_chars, on_problem=on_problem,
                         progress=progress)
        if staged.count == 0:
            raise DataError(", ".join(map(str, sources)), None,
                            f"no documents left ({report.documents_in} read, {report.empty} empty, "
                            f"{report.skipped_count} skipped, {report.exact_duplicates + report.near_duplicates} "
                            "duplicates)", "check the sources, --jsonl-field / --csv-column and --exclude")

        # timings go to the log only: meta.json stays identical between identical runs
        timings = {"read+clean+dedup": time.perf_counter() - started}
        if tokenizer is None:
            log(f"training a {vocab_size}-token BPE tokenizer on the train split ...")
        tok = _get_tokenizer(tokenizer, staged, vocab_size, progress)
        tok.save(work / "tokenizer")
        timings["tokenizer"] = time.perf_counter() - started - sum(timings.values())
        dtype = token_dtype(tok.vocab_size)
        splits = _tokenize(staged, tok, work, dtype, progress)
        timings["tokenize"] = time.perf_counter() - started - sum(timings.values())
        staged.path.unlink()

        meta = write_meta(
            work, dtype=dtype, vocab_size=tok.vocab_size, bos_id=tok.bos_id, eos_id=tok.eos_id,
            tokenizer_sha256=tok.sha256, splits=splits, sources=sources_meta,
            cleaning={
                "documents_in": report.documents_in,
                "documents_out": staged.count,
                "empty": report.empty,
                "too_long": report.too_long,
                "exact_duplicates": report.exact_duplicates,
                "near_duplicates": report.near_duplicates,
                "pii": {kind: report.pii.get(kind, 0) for kind in PII_KINDS} if redact_pii else {},
                "skipped": report.skipped,
                "skipped_count": report.skipped_count,
            },
            config=config,
            manifest_sha256=hashlib.sha256("\n".join(sorted(s["sha256"] for s in sources_meta)).encode()).hexdigest(),
        )

    _log_summary(meta, out_dir, timings, log)
    return meta


def _log_summary(meta: dict, out_dir: Path, timings: dict[str, float], log) -> None:
    c, tr, va = meta["cleaning"], meta["splits"]["train"], meta["splits"]["val"]
    pii = sum(c["pii"].values())
    log(f"{len(meta['sources'])} files, {c['documents_in']:,} documents read; removed {c['empty']:,} empty, "
        f"{c['exact_duplicates']:,} exact + {c['near_duplicates']:,} near duplicates"
        + (f", {c['too_long']:,} too long" if c["too_long"] else "")
        + (f"; skipped {c['skipped_count']:,} bad inputs" if c["skipped_count"] else "")
        + (f"; {pii:,} PII redactions ({', '.join(f'{k} {v}' for k, v in c['pii'].items() if v)})" if pii else ""))
    for name, s in (("train", tr), ("val", va)):
        log(f"{name}: {s['documents']:,} documents, {s['tokens']:,} tokens, {s['bytes']:,} bytes "
            f"({s['bytes'] / max(1, s['tokens']):.2f} bytes/token)")
    log(f"wrote {out_dir} (vocab {meta['vocab_size']:,}, {meta['dtype']}) in {sum(timings.values()):.1f} s ("
        + ", ".join(f"{name} {seconds:.1f} s" for name, seconds in timings.items()) + ")")
