"""Building a knowledge base (`slm kb index SOURCES... -o KB`) and opening one.

A knowledge base is a folder: `kb.sqlite` (the store: documents, chunks, BM25 and vector indexes, and the
settings it was built with: embedder, chunk size, overlap) and, for built-in sources, `sources/NAME/` (the files
they wrote). Re-indexing is incremental: the KB mirrors the files under the SOURCES given, so a file whose sha256
is unchanged is skipped, a changed or new one is re-chunked and re-embedded (in one transaction), and a file that
is no longer among them is removed.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

import numpy as np

from slmkit.files import sha256_file
from slmkit.kb.chunk import MAX_CHARS, OVERLAP, chunk_blocks
from slmkit.kb.sources import BUILTIN_SOURCES, find_files, read_blocks, write_pydoc_topics
from slmkit.kb.store import SQLiteStore, Store

DB_NAME = "kb.sqlite"
DEFAULT_EMBEDDER = "minilm-l6-v2"


@dataclass
class KnowledgeBase:
    """An open knowledge base: its store and the embedder its vectors came from (loaded on first use)."""
    store: Store
    embedder_spec: str
    path: Path | None = None
    _embedder: object = None

    @property
    def embedder(self):
        if self._embedder is None:
            from slmkit.lm.embedder import load_embedder
            self._embedder = load_embedder(self.embedder_spec)
        return self._embedder

    def embed(self, texts: list[str]) -> np.ndarray:
        if not texts:
            return np.zeros((0, self.store.dim), dtype=np.float32)
        return self.embedder.embed(texts).numpy().astype(np.float32)

    def display_path(self, path: str) -> str:
        """`path` (stored resolved: the document's identity) as a reader wants to see it: from the indexed source
        folder that holds it (`docs/guide.md` for `/srv/x/docs/guide.md` when `docs/` was indexed), else its
        name. What a served page shows: the server's directory layout stays out of it."""
        p = Path(path)
        for root in self.source_roots:
            if p == root:
                return root.name
            if root in p.parents:
                return str(Path(root.name) / p.relative_to(root))
        return p.name

    @cached_property
    def source_roots(self) -> list[Path]:
        """The indexed folders and files, resolved (read once: a served answer asks for every source)."""
        return [Path(r) for r in self.store.get_meta().get("source_roots", [])]

    def close(self) -> None:
        self.store.close()


def open_kb(path: str | Path, embedder=None) -> KnowledgeBase:
    """The knowledge base in folder `path` (written by `index_kb`); `embedder` overrides loading the one it was
    built with (an object with `embed(texts)`, e.g. one already in memory)."""
    path = Path(path)
    db = path / DB_NAME
    if not db.exists():
        raise FileNotFoundError(f"{path}: no knowledge base here ({DB_NAME} missing); build one with "
                                f"`slm kb index SOURCES... -o {path}`")
    store = SQLiteStore(db)
    return KnowledgeBase(store, store.get_meta().get("embedder", DEFAULT_EMBEDDER), path, embedder)


def _expand_sources(sources: list[str], kb_dir: Path) -> list[Path]:
    """Built-in source names become the folder of files they write inside the KB."""
    out = []
    for source in sources:
        if source == "pydoc-topics" and not Path(source).exists():
            out.append(write_pydoc_topics(kb_dir / "sources" / "pydoc-topics"))
        else:
            out.append(Path(source))
    return out


def index_kb(sources: list[str | Path], out: str | Path, embedder: str | None = None, max_chars: int | None = None,
             overlap: int | None = None, embedder_model=None, log=None) -> dict:
    """Index `sources` (files, folders, or the built-in `pydoc-topics`) into the knowledge base folder `out`,
    incrementally. `embedder`, `max_chars` and `overlap` default to the KB's own settings (or minilm-l6-v2, 1000
    and 200 for a new one); changing one re-indexes every document. Returns a summary: documents added, updated,
    removed and unchanged, chunks written, seconds, chunks per second, and the store's size."""
    if not sources:
        raise ValueError(f"no sources given; name files or folders to index, or {', '.join(BUILTIN_SOURCES)}")
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise ValueError(f"{out}: exists and is not a folder; a knowledge base is a folder (-o KB)")
    start = time.perf_counter()
    roots = _expand_sources([str(s) for s in sources], out)
    files = find_files(roots)
    db = out / DB_NAME
    old = SQLiteStore(db).get_meta() if db.exists() else {}
    settings = {"embedder": embedder or old.get("embedder", DEFAULT_EMBEDDER),
                "max_chars": max_chars or old.get("max_chars", MAX_CHARS),
                "overlap": overlap if overlap is not None else old.get("overlap", OVERLAP)}
    kb = KnowledgeBase(None, settings["embedder"], out, embedder_model)
    kb.store = SQLiteStore(db, dim=kb.embed(["the width of this embedder's vectors"]).shape[1])
    try:
        changed_settings = any(old.get(k) != v for k, v in settings.items())
        indexed = kb.store.documents()
        summary = {"added": 0, "updated": 0, "removed": 0, "unchanged": 0, "chunks_written": 0}
        keep = {str(f) for f in files}
        for path in sorted(set(indexed) - keep):
            kb.store.delete_document(path)
            summary["removed"] += 1
        for f in files:
            sha = sha256_file(f)
            if indexed.get(str(f)) == sha and not changed_settings:
                summary["unchanged"] += 1
                continue
            chunks = chunk_blocks(read_blocks(f), settings["max_chars"], settings["overlap"])
            kb.store.put_document(str(f), sha, chunks, kb.embed([c.indexed_text() for c in chunks]))
            summary["updated" if str(f) in indexed else "added"] += 1
            summary["chunks_written"] += len(chunks)
            if log:
                log(f"{f}: {len(chunks)} chunks")
        kb.store.set_meta({**settings, "sources": [str(s) for s in sources],
                           "source_roots": [str(r.resolve()) for r in roots]})
        seconds = time.perf_counter() - start
        stats = kb.store.stats()
        return {**summary, "documents": stats["documents"], "chunks": stats["chunks"], "bytes": stats["bytes"],
                "seconds": round(seconds, 3), "chunks_per_s": round(summary["chunks_written"] / seconds, 1),
                "kb": str(out)}
    finally:
        kb.close()

