"""Small file helpers shared by every stage: atomic writes, hashing and the one JSONL reader.

Everything slmkit writes goes to a temporary name first and is renamed into place, so an interrupted
run never leaves a half-written file or directory behind.
"""

from __future__ import annotations

import contextlib
import glob
import gzip
import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

# mkstemp/mkdtemp create private (0600/0700) entries; outputs should get the usual umask-based modes instead.
_UMASK = os.umask(0)
os.umask(_UMASK)


@contextlib.contextmanager
def atomic_path(path: str | Path):
    """Yield a temporary sibling file name to write; on success it is renamed to `path`, else removed."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        yield Path(tmp)
        os.chmod(tmp, 0o666 & ~_UMASK)
        os.replace(tmp, path)
        fsync_dir(path.parent)  # the rename itself survives a power cut
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def fsync_dir(path: str | Path) -> None:
    """Flush a directory's entries (creations, renames) to disk; a no-op where directories cannot be opened."""
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass  # some file systems refuse fsync on a directory
    finally:
        os.close(fd)


def make_readable(path: str | Path) -> None:
    """Give a file written by a library that creates private files the usual umask-based mode."""
    os.chmod(path, 0o666 & ~_UMASK)


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def atomic_write_text(path: str | Path, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | Path, obj) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, ensure_ascii=False) + "\n")


@contextlib.contextmanager
def atomic_dir(path: str | Path):
    """Yield a temporary sibling directory; on success it replaces `path` (old contents removed).

    Crash-safe: the new directory is complete and on disk (every file fsynced) before `path` moves aside to
    `.NAME.old` and the new one takes its place. A kill between those two renames leaves `.NAME.old`, which
    `recover_dir` (run here first, and by readers such as resume) renames back; temporaries of killed writers
    are swept.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    recover_dir(path)
    # The writer's pid is in the name, so a later recover_dir can tell a dead writer's leftovers from a live one's.
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.{os.getpid()}.", suffix=".tmp", dir=path.parent))
    os.chmod(tmp, 0o777 & ~_UMASK)
    try:
        yield tmp
        _fsync_tree(tmp)
        old = _old_name(path)
        if path.exists():
            os.replace(path, old)
            fsync_dir(path.parent)
        os.replace(tmp, path)
        fsync_dir(path.parent)
        shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def recover_dir(path: str | Path) -> bool:
    """Repair what a writer of `atomic_dir(path)` killed mid-way left: bring `path` back from `.NAME.old` when
    the kill came between the two renames, and delete the old copy and dead writers' temporaries. True if
    `path` had to be brought back."""
    path = Path(path)
    old = _old_name(path)
    restored = False
    if old.is_dir() and not path.exists():
        try:
            os.replace(old, path)
            fsync_dir(path.parent)
            restored = True
        except FileNotFoundError:
            pass  # another process (a DDP rank) brought it back first
    elif old.exists():
        shutil.rmtree(old, ignore_errors=True)
    for tmp in path.parent.glob(f".{glob.escape(path.name)}.*.tmp"):
        pid = tmp.name[len(path.name) + 2:].split(".", 1)[0]
        if tmp.is_dir() and pid.isdigit() and not _alive(int(pid)):
            shutil.rmtree(tmp, ignore_errors=True)
    return restored


def _old_name(path: Path) -> Path:
    return path.with_name(f".{path.name}.old")


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # someone else's process
    return True


def _fsync_tree(root: Path) -> None:
    """fsync every file and directory under `root` (the libraries that wrote them, e.g. safetensors, do not)."""
    for parent, _, files in os.walk(root):
        for name in files:
            fd = os.open(os.path.join(parent, name), os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        fsync_dir(parent)


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def sha256_file(path: str | Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


class JsonlError(ValueError):
    """A bad line of a JSONL file. The message reads `file:line: reason — what to do`."""

    def __init__(self, path: str | Path, line: int, reason: str, hint: str):
        self.path, self.line, self.reason, self.hint = str(path), line, reason, hint
        super().__init__(f"{self.path}:{line}: {reason} — {hint}")


def iter_jsonl(path: str | Path, on_error: Callable[[JsonlError], None] | None = None) -> Iterator[tuple[int, dict]]:
    """(line number, record) for each non-blank line of a JSONL file, read gzip-decompressed when its name ends
    in .gz. Every JSONL file slmkit reads goes through here, so every bad line is reported the same way.

    A line that is not UTF-8, not valid JSON or not a JSON object raises `JsonlError`; with `on_error`, the error
    is passed to it instead and the line skipped (e.g. to skip and count bad records, or ignore a torn last line).
    """
    path = Path(path)
    with (gzip.open(path, "rb") if path.suffix == ".gz" else open(path, "rb")) as f:
        for n, raw in enumerate(f, 1):
            try:
                record = _jsonl_record(raw, path, n)
            except JsonlError as err:
                if on_error is None:
                    raise
                on_error(err)
                continue
            if record is not None:
                yield n, record


def read_jsonl(path: str | Path) -> list[dict]:
    """Every record of a JSONL file (see `iter_jsonl`)."""
    return [record for _, record in iter_jsonl(path)]


def _jsonl_record(raw: bytes, path: Path, n: int) -> dict | None:
    """The record on one line; None for a blank line (e.g. a trailing newline pair), which is not a record."""
    try:
        # utf-8-sig on the first line: a leading byte-order mark is an encoding artefact, not text
        line = raw.decode("utf-8-sig" if n == 1 else "utf-8").rstrip("\r\n")  # so JSON errors give this line's column
    except UnicodeDecodeError as e:
        raise JsonlError(path, n, f"invalid UTF-8 (byte 0x{raw[e.start]:02x} at column {e.start + 1})",
                         "re-encode the file as UTF-8 (e.g. iconv)") from None
    if not line.strip():
        return None
    try:
        record = json.loads(line)
    except json.JSONDecodeError as e:
        raise JsonlError(path, n, f"not valid JSON ({e.msg}, column {e.colno})",
                         "fix or remove the line (one JSON object per line)") from None
    except ValueError as e:  # valid JSON Python refuses: an integer of more than 4,300 digits
        raise JsonlError(path, n, f"a number Python cannot read ({str(e).split(':')[0]})",
                         "write it as a string or drop it") from None
    except RecursionError:
        raise JsonlError(path, n, "nested too deeply for Python's JSON reader",
                         "flatten the record (a few levels of objects and lists)") from None
    if not isinstance(record, dict):
        raise JsonlError(path, n, f"expected a JSON object, got {type(record).__name__}",
                         "write one object per line, e.g. {\"text\": \"...\"}")
    return record
