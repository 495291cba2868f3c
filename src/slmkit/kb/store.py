"""Where a knowledge base keeps its chunks: the `Store` interface, and `SQLiteStore`, one SQLite file with an
FTS5 table (BM25) and a sqlite-vec `vec0` table (cosine k-nearest-neighbours) beside the documents and chunks.

Why SQLite + FTS5 + sqlite-vec: one file a user can copy, open with any SQLite tool and back up; transactions,
so an interrupted re-index leaves every document either fully old or fully new; BM25 ranking that SQLite ships;
and sqlite-vec's vector search inside the same file and the same transactions (no second index to keep in
step). The standard library's sqlite3 cannot load extensions in many Python builds (this project's included),
so the store talks to SQLite through apsw, which bundles a current SQLite with FTS5 and extension loading.
LanceDB was the other candidate: it brings its own full-text index and a columnar format that pays off far
beyond the size of a team's documents, at the price of a pyarrow-sized dependency and no transactional update of
text and vectors together. Measurements are in BENCHMARKS.md ("knowledge base").

A team that outgrows one machine implements `Store` for its server (Postgres + pgvector, OpenSearch, ...):
everything above it (indexing, hybrid retrieval, ask, eval) only calls these methods. Only `SQLiteStore` is
implemented and tested here (tests/test_kb.py runs the store contract against it).
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import numpy as np

from slmkit.kb.chunk import Chunk

# Words that carry no topic: dropped from the BM25 query (FTS5 has no stop-word list of its own, and a question's
# "what", "does", "the" would otherwise match every chunk).
STOPWORDS = frozenset("""a about above after again all also am an and any are as at be because been before being
below between both but by can could did do does doing down during each few for from further had has have having he
her here hers him his how i if in into is it its itself just me more most my no nor not now of off on once only or
other our out over own same she should so some such than that the their them then there these they this those
through to too under until up very was we were what when where which while who whom why will with would you your
yours""".split())


@dataclass
class StoredChunk:
    id: int
    path: str
    chunk: Chunk


class Store(Protocol):
    """What indexing and retrieval need from a store; ids are the store's own chunk ids."""

    def documents(self) -> dict[str, str]: ...  # path -> sha256 of every indexed document

    def put_document(self, path: str, sha256: str, chunks: list[Chunk], vectors: np.ndarray) -> None: ...

    def delete_document(self, path: str) -> None: ...

    def keyword_search(self, query: str, k: int) -> list[tuple[int, float]]: ...  # best first; higher is better

    def vector_search(self, vector: np.ndarray, k: int) -> list[tuple[int, float]]: ...  # (id, cosine similarity)

    def similarities(self, vector: np.ndarray, ids: list[int]) -> dict[int, float]: ...

    def get_chunks(self, ids: list[int]) -> list[StoredChunk]: ...

    def chunk_ids(self) -> list[int]: ...  # every chunk's id, in document order

    def get_meta(self) -> dict: ...

    def set_meta(self, meta: dict) -> None: ...

    def stats(self) -> dict: ...

    def close(self) -> None: ...


def fts_query(text: str) -> str:
    """A question as an FTS5 query: its content words, each quoted (so no word is read as FTS5 syntax), OR-ed."""
    words = [w for w in re.findall(r"\w+", text.lower()) if w not in STOPWORDS]
    return " OR ".join(f'"{w}"' for w in dict.fromkeys(words))


class SQLiteStore:
    """`Store` in one SQLite file (apsw + FTS5 + sqlite-vec); `dim` is the embedding width, fixed at creation."""

    def __init__(self, path: str | Path, dim: int | None = None):
        try:
            import apsw
            import sqlite_vec
        except ImportError as e:
            raise ImportError("the knowledge base needs apsw and sqlite-vec: pip install 'slmkit[kb]'") from e
        self.path = Path(path)
        exists = self.path.exists()
        if not exists and dim is None:
            raise FileNotFoundError(f"{self.path}: no knowledge base here; build one with `slm kb index`")
        self.path.parent.mkdir(parents=True, exist_ok=True)
        try:
            self.db = apsw.Connection(str(self.path))
            self.db.enable_load_extension(True)
            self.db.load_extension(sqlite_vec.loadable_path())
            self.db.enable_load_extension(False)
            self.db.execute("PRAGMA foreign_keys = ON")
            tables = {r[0] for r in self.db.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
        except apsw.Error as e:
            raise ValueError(f"{self.path}: not a knowledge base ({e}); give the file `slm kb index` wrote") from None
        if exists and "chunks" not in tables:
            raise ValueError(f"{self.path}: not a knowledge base (no chunks table); give the file `slm kb index` "
                             "wrote")
        if "chunks" not in tables:
            with self.db:
                self.db.execute(f"""
                    CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
                    CREATE TABLE documents (id INTEGER PRIMARY KEY, path TEXT UNIQUE NOT NULL,
                                            sha256 TEXT NOT NULL);
                    CREATE TABLE chunks (id INTEGER PRIMARY KEY,
                                         doc_id INTEGER NOT NULL REFERENCES documents(id) ON DELETE CASCADE,
                                         ord INTEGER NOT NULL, heading TEXT NOT NULL, start_line INTEGER NOT NULL,
                                         end_line INTEGER NOT NULL, text TEXT NOT NULL);
                    CREATE INDEX chunks_doc ON chunks(doc_id);
                    CREATE VIRTUAL TABLE chunks_fts USING fts5(heading, text, tokenize = 'porter unicode61');
                    CREATE VIRTUAL TABLE chunks_vec USING vec0(embedding float[{int(dim)}] distance_metric=cosine);
                """)
                self.db.execute("INSERT INTO meta VALUES ('dim', ?)", (str(int(dim)),))
        self.dim = int(self.get_meta()["dim"])
        if dim is not None and int(dim) != self.dim:
            raise ValueError(f"{self.path}: its vectors have {self.dim} dimensions, the embedder gives {dim}; "
                             "index into a new knowledge base (or use the embedder it was built with)")

    def documents(self) -> dict[str, str]:
        return dict(self.db.execute("SELECT path, sha256 FROM documents"))

    def put_document(self, path: str, sha256: str, chunks: list[Chunk], vectors: np.ndarray) -> None:
        vectors = np.ascontiguousarray(vectors, dtype=np.float32)
        if vectors.shape != (len(chunks), self.dim):
            raise ValueError(f"{path}: {len(chunks)} chunks but vectors of shape {vectors.shape}")
        with self.db:  # one transaction: the old version or the new one, never half of each
            self._delete(path)
            self.db.execute("INSERT INTO documents (path, sha256) VALUES (?, ?)", (path, sha256))
            doc_id = self.db.last_insert_rowid()
            for i, (c, v) in enumerate(zip(chunks, vectors, strict=True)):
                self.db.execute("INSERT INTO chunks (doc_id, ord, heading, start_line, end_line, text) "
                                "VALUES (?, ?, ?, ?, ?, ?)", (doc_id, i, c.heading, c.start_line, c.end_line, c.text))
                cid = self.db.last_insert_rowid()
                self.db.execute("INSERT INTO chunks_fts (rowid, heading, text) VALUES (?, ?, ?)",
                                (cid, c.heading, c.text))
                self.db.execute("INSERT INTO chunks_vec (rowid, embedding) VALUES (?, ?)", (cid, v.tobytes()))

    def delete_document(self, path: str) -> None:
        with self.db:
            self._delete(path)

    def _delete(self, path: str) -> None:
        ids = [r[0] for r in self.db.execute(
            "SELECT chunks.id FROM chunks JOIN documents ON documents.id = chunks.doc_id WHERE documents.path = ?",
            (path,))]
        for cid in ids:
            self.db.execute("DELETE FROM chunks_fts WHERE rowid = ?", (cid,))
            self.db.execute("DELETE FROM chunks_vec WHERE rowid = ?", (cid,))
        self.db.execute("DELETE FROM documents WHERE path = ?", (path,))  # chunks go by ON DELETE CASCADE

    def keyword_search(self, query: str, k: int) -> list[tuple[int, float]]:
        match = fts_query(query)
        if not match:
            return []
        # bm25() is lower-is-better (negative); the heading counts as much as the text
        rows = self.db.execute("SELECT rowid, bm25(chunks_fts) AS s FROM chunks_fts WHERE chunks_fts MATCH ? "
                               "ORDER BY s LIMIT ?", (match, k))
        return [(rowid, -score) for rowid, score in rows]

    def vector_search(self, vector: np.ndarray, k: int) -> list[tuple[int, float]]:
        rows = self.db.execute("SELECT rowid, distance FROM chunks_vec WHERE embedding MATCH ? AND k = ? "
                               "ORDER BY distance", (np.asarray(vector, dtype=np.float32).tobytes(), k))
        return [(rowid, 1.0 - distance) for rowid, distance in rows]

    def similarities(self, vector: np.ndarray, ids: list[int]) -> dict[int, float]:
        if not ids:
            return {}
        blob = np.asarray(vector, dtype=np.float32).tobytes()
        marks = ",".join("?" * len(ids))
        rows = self.db.execute(f"SELECT rowid, vec_distance_cosine(embedding, ?) FROM chunks_vec "
                               f"WHERE rowid IN ({marks})", (blob, *ids))
        return {rowid: 1.0 - d for rowid, d in rows}

    def get_chunks(self, ids: list[int]) -> list[StoredChunk]:
        if not ids:
            return []
        marks = ",".join("?" * len(ids))
        rows = self.db.execute(f"SELECT chunks.id, path, text, heading, start_line, end_line FROM chunks "
                               f"JOIN documents ON documents.id = chunks.doc_id WHERE chunks.id IN ({marks})", ids)
        found = {r[0]: StoredChunk(r[0], r[1], Chunk(r[2], r[3], r[4], r[5])) for r in rows}
        return [found[i] for i in ids if i in found]

    def chunk_ids(self) -> list[int]:
        return [r[0] for r in self.db.execute("SELECT id FROM chunks ORDER BY doc_id, ord")]

    def get_meta(self) -> dict:
        meta = dict(self.db.execute("SELECT key, value FROM meta"))
        return {k: (json.loads(v) if k != "dim" else v) for k, v in meta.items()}

    def set_meta(self, meta: dict) -> None:
        with self.db:
            for key, value in meta.items():
                if key != "dim":
                    self.db.execute("INSERT OR REPLACE INTO meta VALUES (?, ?)", (key, json.dumps(value)))

    def stats(self) -> dict:
        docs = self.db.execute("SELECT count(*) FROM documents").fetchall()[0][0]
        chunks = self.db.execute("SELECT count(*) FROM chunks").fetchall()[0][0]
        return {"documents": docs, "chunks": chunks, "bytes": self.path.stat().st_size}

    def close(self) -> None:
        self.db.close()
