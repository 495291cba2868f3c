"""People as an escalation target: a queue of hand-off tickets that speaks the `LM` interface.

A `Cascade` (or `slm serve --escalate-to queue:FILE.jsonl`) escalates to it exactly as to a larger model: the
request becomes one JSON line in FILE ({"ticket", "created", "prompt" | "messages"}) and the caller gets `reply`,
telling the user a person will answer. Appending one line (flushed and fsynced) is atomic enough for a queue a
person works through; the customer-service assistant's ticket store can replace it behind the same interface.
"""

from __future__ import annotations

import json
import os
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

from slmkit.lm.base import LM

REPLY = "A person from our team will answer this shortly (ticket {ticket})."


class HandoffQueue(LM):
    name = "handoff"

    def __init__(self, path: str | Path, reply: str = REPLY):
        self.path, self.reply = Path(path), reply
        if self.path.is_dir():
            raise ValueError(f"{self.path}: is a directory; give the hand-off queue a .jsonl file")
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        self.name = f"queue:{self.path}"

    def submit(self, **request) -> str:
        """Append a ticket holding `request`; its id."""
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
