"""People as an escalation target: a queue of hand-off tickets that speaks the `LM` interface.

A `Cascade` (or `slm serve --escalate-to queue:FILE`) escalates to it exactly as to a larger model, and the
customer-service assistant (`slm support`) hands off to the same queue: the request becomes a ticket and the
caller gets `reply`, telling the user a person will answer. Two stores, chosen by FILE's suffix:

- `.jsonl`: one JSON line per ticket ({"ticket", "created", "prompt" | "messages", ...}), appended, flushed and
  fsynced: a log a person reads, or a script forwards.
- `.sqlite` / `.db`: a `TicketStore`, a table people work from (`slm support tickets`, the agent page): each
  ticket has a status (open / closed), and the support assistant's intent, reason, retrieved articles and
  suggested draft, and the person's answer. SQLite (the standard library's `sqlite3`, WAL journal) because a
  queue must survive crashes and concurrent writers (the server and a person's `slm support tickets --answer`)
  without a server to run.
"""

from __future__ import annotations

import json
import os
import sqlite3
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

from slmkit.lm.base import LM

REPLY = "A person from our team will answer this shortly (ticket {ticket})."


SQLITE_SUFFIXES = (".sqlite", ".db")
STATUSES = ("open", "closed")


class TicketStore:
    """Hand-off tickets in a SQLite file. `submit` opens one, `tickets` lists them, `answer` records a person's
    reply (and closes it), `close` closes one unanswered. Safe across threads and processes (WAL)."""

    FIELDS = ("intent", "reason", "articles", "draft")  # what the support assistant adds to a request

    def __init__(self, path: str | Path):
        self.path = Path(path)
        if self.path.is_dir():
            raise ValueError(f"{self.path}: is a directory; give the ticket store a .sqlite file")
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        try:
            self._db = sqlite3.connect(self.path, check_same_thread=False, timeout=30, isolation_level=None)
            self._db.row_factory = sqlite3.Row
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("""CREATE TABLE IF NOT EXISTS tickets (
                id TEXT PRIMARY KEY, created REAL NOT NULL, status TEXT NOT NULL DEFAULT 'open',
                intent TEXT, reason TEXT, request TEXT NOT NULL, articles TEXT, draft TEXT,
                answer TEXT, closed REAL)""")
        except sqlite3.DatabaseError as e:
            raise ValueError(f"{self.path}: not a ticket store ({e})") from None

    def submit(self, **request) -> str:
        """Open a ticket holding `request` (its `intent`, `reason`, `articles` and `draft` get columns of their
        own, the rest, e.g. `messages`, is kept as JSON); its id."""
        ticket = uuid.uuid4().hex[:12]
        columns = {k: request.pop(k, None) for k in self.FIELDS}
        columns["articles"] = json.dumps(columns["articles"]) if columns["articles"] is not None else None
        with self._lock:
            self._db.execute("INSERT INTO tickets (id, created, intent, reason, request, articles, draft) "
                             "VALUES (?, ?, ?, ?, ?, ?, ?)",
                             (ticket, time.time(), columns["intent"], columns["reason"],
                              json.dumps(request, ensure_ascii=False), columns["articles"], columns["draft"]))
        return ticket

    def tickets(self, status: str | None = "open") -> list[dict]:
        """Tickets, oldest first; `status` open, closed or None (all)."""
        if status is not None and status not in STATUSES:
            raise ValueError(f"status must be one of {', '.join(STATUSES)}, got {status!r}")
        with self._lock:
            rows = self._db.execute("SELECT * FROM tickets" + (" WHERE status = ?" if status else "")
                                    + " ORDER BY created", (status,) if status else ()).fetchall()
        return [self._record(r) for r in rows]

    def get(self, ticket: str) -> dict:
        with self._lock:
            row = self._db.execute("SELECT * FROM tickets WHERE id = ?", (ticket,)).fetchone()
        if row is None:
            raise ValueError(f"{self.path}: no ticket {ticket!r}")
        return self._record(row)

    def answer(self, ticket: str, text: str) -> dict:
        """A person's reply: stored with the ticket, which closes."""
        if not text.strip():
            raise ValueError("the answer is empty")
        return self._update(ticket, "UPDATE tickets SET answer = ?, status = 'closed', closed = ? WHERE id = ?",
                            (text, time.time(), ticket))

    def close(self, ticket: str) -> dict:
        return self._update(ticket, "UPDATE tickets SET status = 'closed', closed = ? WHERE id = ?",
                            (time.time(), ticket))

    def _update(self, ticket: str, sql: str, args: tuple) -> dict:
        with self._lock:
            changed = self._db.execute(sql, args).rowcount
        if not changed:
            raise ValueError(f"{self.path}: no ticket {ticket!r}")
        return self.get(ticket)

    @staticmethod
    def _record(row: sqlite3.Row) -> dict:
        d = dict(row)
        d["ticket"] = d.pop("id")
        d.update(json.loads(d.pop("request")))
        d["articles"] = json.loads(d["articles"]) if d["articles"] else []
        return d

    def close_store(self) -> None:
        self._db.close()


class HandoffQueue(LM):
    name = "handoff"

    def __init__(self, path: str | Path, reply: str = REPLY):
        self.path, self.reply = Path(path), reply
        if self.path.is_dir():
            raise ValueError(f"{self.path}: is a directory; give the hand-off queue a .jsonl or .sqlite file")
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        self.store = TicketStore(self.path) if self.path.suffix in SQLITE_SUFFIXES else None
        self.name = f"queue:{self.path}"

    def submit(self, **request) -> str:
        """Open a ticket holding `request`; its id."""
        if self.store is not None:
            return self.store.submit(**request)
        ticket = uuid.uuid4().hex[:12]
        line = json.dumps({"ticket": ticket, "created": time.time(), **request}, ensure_ascii=False) + "\n"
        with self._lock, self.path.open("a", encoding="utf-8") as f:
            f.write(line)
            f.flush()
            os.fsync(f.fileno())
        return ticket

    def stream(self, prompt: str, params=None, heal: bool = False) -> Iterator[str]:
        yield self.reply.format(ticket=self.submit(prompt=prompt))

    def stream_chat(self, messages: list[dict], params=None) -> Iterator[str]:
        yield self.reply.format(ticket=self.submit(messages=messages))

    def stream_ids(self, prompt_ids, params, first_allowed):
        raise NotImplementedError("a hand-off queue answers text: use stream / stream_chat")

    def close(self) -> None:
        if self.store is not None:
            self.store.close_store()
