"""Ingest: turn files, folders and globs into a deterministic stream of text documents.

By extension: `.jsonl` gives one document per line (field `jsonl_field`), `.csv` one per row (column
`csv_column`), anything else is one UTF-8 text document per file (a file over LARGE_TEXT_BYTES: streamed as
documents of about TEXT_CHUNK_BYTES, cut at blank lines). Every problem is a `DataError` whose
message reads `path:line: reason — what to do`; the caller decides (via `on_problem`) whether it stops
the run or is logged and skipped. Nothing is dropped without a report.
"""

from __future__ import annotations

import csv
import fnmatch
import glob
import os
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

from slmkit.files import JsonlError, iter_jsonl

BINARY_SNIFF_BYTES = 8192
# A text file larger than this is streamed as documents of about TEXT_CHUNK_BYTES (cut at blank lines) instead of
# being read whole: a many-gigabyte dump as one string would exhaust memory long before tokenizing.
LARGE_TEXT_BYTES = 64 * 1024 * 1024
TEXT_CHUNK_BYTES = 8 * 1024 * 1024
# Folders that are never source data: VCS metadata and Python bytecode caches. Hidden entries
# (".git", ".venv", ".DS_Store") are skipped for the same reason.
SKIPPED_DIR_NAMES = {"__pycache__"}


class DataError(ValueError):
    """A problem with one input item, located as precisely as we can (file, line)."""

    def __init__(self, source: str, line: int | None, reason: str, hint: str):
        self.source, self.line, self.reason, self.hint = str(source), line, reason, hint
        where = f"{self.source}:{line}" if line is not None else self.source
        super().__init__(f"{where}: {reason} — {hint}")


@dataclass(frozen=True)
class Document:
    text: str
    source: str  # the file path as found
    line: int | None  # 1-based line where the record starts (JSONL/CSV); None for whole-file documents
    doc_id: str  # path relative to the source root (+ ":line"); independent of where the data lives


@dataclass(frozen=True)
class SourceFile:
    path: Path
    rel: str  # POSIX path relative to the source root; the stable part of doc_id

    @property
    def kind(self) -> str:
        suffix = self.path.suffix.lower()
        return {".jsonl": "jsonl", ".csv": "csv"}.get(suffix, "text")


def raise_problem(err: DataError) -> None:
    raise err


# ----------------------------------------------------------------------------------------------------
# Finding files


def is_excluded(rel: str, full: str, patterns: Iterable[str]) -> bool:
    """fnmatch on the relative and the full path; a pattern without '/' also matches any one path
    component (like .gitignore), so `site-packages` or `*.pyc` work without wildcards around them."""
    parts = rel.split("/")
    for pat in patterns:
        if fnmatch.fnmatch(rel, pat) or fnmatch.fnmatch(full, pat):
            return True
        if "/" not in pat and any(fnmatch.fnmatch(part, pat) for part in parts):
            return True
    return False


def _keep_dir(rel: str, full: str, name: str, exclude: list[str]) -> bool:
    if name.startswith(".") or name in SKIPPED_DIR_NAMES:
        return False
    # prune whole excluded folders early; the trailing "/" lets patterns such as */test/* match them
    return not is_excluded(rel + "/", full + "/", exclude)


def _walk(root: Path, exclude: list[str]) -> list[SourceFile]:
    found = []
    for dirpath, dirnames, filenames in os.walk(root):
        here = Path(dirpath)
        rel_dir = here.relative_to(root).as_posix()
        rel_dir = "" if rel_dir == "." else rel_dir + "/"
        dirnames[:] = sorted(d for d in dirnames if _keep_dir(rel_dir + d, (here / d).as_posix(), d, exclude))
        for name in filenames:
            path = here / name
            if name.startswith(".") or not path.is_file():
                continue
            if not is_excluded(rel_dir + name, path.as_posix(), exclude):
                found.append(SourceFile(path, rel_dir + name))
    return sorted(found, key=lambda f: f.rel)


def _glob_root(pattern: str) -> Path:
    """The folder part of a glob before its first wildcard: what matches are made relative to."""
    parts = Path(pattern).parts
    fixed = []
    for part in parts:
        if glob.has_magic(part):
            break
        fixed.append(part)
    return Path(*fixed) if fixed else Path(".")


def find_files(
    sources: Iterable[str | Path],
    exclude: list[str] | None = None,
    on_problem: Callable[[DataError], None] = raise_problem,
) -> list[SourceFile]:
    """Expand every source (file, folder searched recursively, or glob) into files, in order: sources
    as given, files inside one source sorted. A file reached twice is read once."""
    exclude = list(exclude or [])
    files: list[SourceFile] = []
    seen: set[Path] = set()
    for source in sources:
        text = str(source)
        path = Path(text).expanduser()
        if path.is_file():
            matched = [SourceFile(path, path.name)]
        elif path.is_dir():
            matched = _walk(path, exclude)
        elif glob.has_magic(text):
            root = _glob_root(text)
            matched = []
            for hit in sorted(glob.glob(str(Path(text).expanduser()), recursive=True)):
                p = Path(hit)
                if not p.is_file():
                    continue
                rel = os.path.relpath(p, root).replace(os.sep, "/")
                if not is_excluded(rel, p.as_posix(), exclude):
                    matched.append(SourceFile(p, rel))
        else:
            on_problem(DataError(text, None, "no such file or directory", "check the path or the glob"))
            continue
        if not matched:
            what = "folder has no files" if path.is_dir() else "glob matched no files"
            on_problem(DataError(text, None, f"{what} (after --exclude)", "check the path, glob and excludes"))
            continue
        for f in matched:
            key = f.path.resolve()
            if key not in seen:
                seen.add(key)
                files.append(f)
    return files


# ----------------------------------------------------------------------------------------------------
# Reading documents


def _check_not_binary(data: bytes, path: str) -> None:
    nul = data.find(b"\0", 0, BINARY_SNIFF_BYTES)
    if nul >= 0:
        raise DataError(
            path,
            None,
            f"binary file (NUL byte at offset {nul})",
            "exclude it (e.g. --exclude '*" + (Path(path).suffix or Path(path).name) + "') or convert it to text",
        )


def _decode(data: bytes, path: str, line_offset: int = 0) -> str:
    try:
        # utf-8-sig: a leading byte-order mark is an encoding artefact, not text
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line = line_offset + data.count(b"\n", 0, e.start) + 1
        raise DataError(
            path, line, f"invalid UTF-8 (byte 0x{data[e.start]:02x})", "re-encode the file as UTF-8 (e.g. iconv)"
        ) from None


def _read_text(f: SourceFile) -> Iterator[Document]:
    if f.path.stat().st_size > LARGE_TEXT_BYTES:
        yield from _read_large_text(f)
        return
    data = f.path.read_bytes()
    _check_not_binary(data, str(f.path))
    yield Document(_decode(data, str(f.path)), str(f.path), None, f.rel)


def _read_large_text(f: SourceFile) -> Iterator[Document]:
    """A text file over LARGE_TEXT_BYTES, streamed: documents of about TEXT_CHUNK_BYTES each, cut at a blank line
    (else at a line end), so memory stays bounded; each knows the line it starts on (doc_id `rel:line`)."""
    path = str(f.path)
    line, eof, size = 1, False, TEXT_CHUNK_BYTES
    with open(f.path, "rb") as fh:
        buffer = fh.read(size)
        _check_not_binary(buffer, path)
        while True:
            while len(buffer) <= size and not eof:
                more = fh.read(size)
                eof, buffer = not more, buffer + more
            if not buffer:
                return
            if len(buffer) <= size:
                cut = len(buffer)
            else:
                cut = buffer.rfind(b"\n\n", 0, size - 1)
                cut = cut + 2 if cut > 0 else buffer.rfind(b"\n", 0, size) + 1
                if cut <= 0:  # one line longer than a chunk: cut it at a character boundary
                    cut = size
                    while cut > 0 and buffer[cut] & 0xC0 == 0x80:
                        cut -= 1
            chunk, buffer = buffer[:cut], buffer[cut:]
            yield Document(_decode(chunk, path, line_offset=line - 1), path, line, f"{f.rel}:{line}")
            line += chunk.count(b"\n")


def _read_jsonl(f: SourceFile, field: str, on_problem: Callable[[DataError], None]) -> Iterator[Document]:
    path = str(f.path)
    with open(f.path, "rb") as fh:
        _check_not_binary(fh.read(BINARY_SNIFF_BYTES), path)

    def bad_line(err: JsonlError) -> None:
        on_problem(DataError(err.path, err.line, err.reason, err.hint))

    for lineno, obj in iter_jsonl(f.path, on_error=bad_line):
        try:
            if field not in obj:
                keys = ", ".join(list(obj)[:5]) or "none"
                raise DataError(path, lineno, f"missing field {field!r} (fields: {keys})",
                                "choose the field with --jsonl-field")
            value = obj[field]
            if not isinstance(value, str):
                raise DataError(path, lineno, f"field {field!r} is {type(value).__name__}, not a string",
                                "store the text as a JSON string")
            if not value.isascii() and not _encodable(value):
                raise DataError(path, lineno, f"field {field!r} holds a lone surrogate escape (\\ud800-\\udfff)",
                                "write the character itself or a valid surrogate pair")
        except DataError as err:
            on_problem(err)
            continue
        yield Document(value, path, lineno, f"{f.rel}:{lineno}")


def _encodable(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _read_csv(f: SourceFile, column: str, on_problem: Callable[[DataError], None]) -> Iterator[Document]:
    path = str(f.path)
    with open(f.path, "rb") as fh:
        _check_not_binary(fh.read(BINARY_SNIFF_BYTES), path)
    # cells may hold whole documents; the default limit (128 KiB) is for spreadsheets
    csv.field_size_limit(2**31 - 1)
    with open(f.path, "rb") as fh:  # streamed line by line: a large CSV is never read whole
        yield from _csv_rows(csv.reader(_decoded_lines(fh, path)), f, column, on_problem)


def _decoded_lines(fh, path: str) -> Iterator[str]:
    for n, raw in enumerate(fh):
        yield _decode(raw, path, line_offset=n)


def _csv_rows(reader, f: SourceFile, column: str, on_problem: Callable[[DataError], None]) -> Iterator[Document]:
    path = str(f.path)
    try:
        header = next(reader, None)
    except csv.Error as e:
        raise DataError(path, reader.line_num, f"malformed CSV header ({e})", "fix the first row") from None
    if header is None:
        return  # an empty file: no rows, no documents
    if column not in header:
        shown = ", ".join(header[:8])
        raise DataError(path, 1, f"no column {column!r} (columns: {shown})", "choose the column with --csv-column")
    index = header.index(column)
    while True:
        start = reader.line_num + 1  # a row with quoted newlines spans several lines; report its first
        try:
            row = next(reader)
        except StopIteration:
            return
        except csv.Error as e:
            on_problem(DataError(path, start, f"malformed CSV row ({e})", "fix the quoting of this row"))
            return  # the reader cannot resynchronise after a quoting error
        if not row:
            continue  # a blank line is not a row
        if index >= len(row):
            on_problem(DataError(path, start, f"row has {len(row)} fields, the header has {len(header)}",
                                 "fix the row (missing separators?)"))
            continue
        yield Document(row[index], path, start, f"{f.rel}:{start}")


def read_documents(
    f: SourceFile,
    *,
    jsonl_field: str = "text",
    csv_column: str = "text",
    on_problem: Callable[[DataError], None] = raise_problem,
) -> Iterator[Document]:
    """Documents of one file. A problem with one record skips that record; a problem with the file as a
    whole (binary, undecodable text, missing column) skips the file. Either way `on_problem` hears it."""
    try:
        if f.kind == "jsonl":
            yield from _read_jsonl(f, jsonl_field, on_problem)
        elif f.kind == "csv":
            yield from _read_csv(f, csv_column, on_problem)
        else:
            yield from _read_text(f)
    except DataError as err:
        on_problem(err)
    except OSError as e:
        on_problem(DataError(str(f.path), None, f"cannot read ({e.strerror or e})", "check permissions"))
