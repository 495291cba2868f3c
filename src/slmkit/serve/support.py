"""`slm serve MODEL --support TICKETS.sqlite`: the agent page and the ticket routes people work from.

The tickets are the ones the customer-service assistant (`slm support reply|chat|eval`) and the server's own
cascade (`--escalate-to queue:TICKETS.sqlite`) open when they hand a conversation to a person
(lm/handoff.py's TicketStore: one SQLite file, safe across processes, so `slm support tickets` works on it
while the server runs).

    GET  /agent                                 the agent page (agent.html beside this file)
    GET  /v1/support/tickets?status=open        the tickets (open | closed | all), oldest first
    GET  /v1/support/tickets/{ticket}           one ticket
    POST /v1/support/tickets/{ticket}/answer    {"text": "..."}: a person's reply; the ticket closes
    POST /v1/support/tickets/{ticket}/close     close it unanswered

A ticket is {"ticket", "created", "status", "intent", "reason", "articles", "draft", "answer", "closed",
"messages" (the conversation) or "prompt"}. The routes need the API key like every /v1 route; the page asks
for it. An unknown ticket is a 404, an empty answer a 400, in OpenAI's error shape.
"""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Literal

from fastapi import FastAPI
from fastapi.responses import FileResponse
from pydantic import Field

from slmkit.lm.handoff import TicketStore
from slmkit.serve.protocol import APIError, _Body

AGENT_PAGE = Path(__file__).with_name("agent.html")


class AnswerBody(_Body):
    text: str = Field(min_length=1, max_length=100_000)


def open_tickets(path: str | Path) -> TicketStore:
    """The ticket store at `path` (created empty when missing: the first hand-off fills it)."""
    path = Path(path)
    if path.suffix not in (".sqlite", ".db"):
        raise ValueError(f"--support {path}: give the ticket store a .sqlite file (the one --escalate-to "
                         "queue:FILE.sqlite and `slm support` write)")
    return TicketStore(path)


def add_routes(app: FastAPI, store: TicketStore) -> None:
    """The agent page and the ticket routes (see the module docstring) on `app`."""

    async def call(method, *args):
        try:  # off the event loop: a write waits for SQLite's lock while another process writes
            return await asyncio.to_thread(method, *args)
        except ValueError as e:
            status = 404 if "no ticket" in str(e) else 400
            raise APIError(status, str(e), param="ticket" if status == 404 else "text",
                           code="not_found" if status == 404 else None) from None

    @app.get("/agent", include_in_schema=False)
    async def agent_page():
        if not AGENT_PAGE.exists():
            raise APIError(404, "the agent page is not installed", code="not_found")
        return FileResponse(AGENT_PAGE, media_type="text/html", headers={"Cache-Control": "no-store"})

    @app.get("/v1/support/tickets")
    async def list_tickets(status: Literal["open", "closed", "all"] = "open"):
        tickets = await call(store.tickets, None if status == "all" else status)
        return {"object": "list", "data": tickets}

    @app.get("/v1/support/tickets/{ticket}")
    async def get_ticket(ticket: str):
        return await call(store.get, ticket)

    @app.post("/v1/support/tickets/{ticket}/answer")
    async def answer_ticket(ticket: str, body: AnswerBody):
        if not body.text.strip():
            raise APIError(400, "the answer is empty", param="text")
        return await call(store.answer, ticket, body.text)

    @app.post("/v1/support/tickets/{ticket}/close")
    async def close_ticket(ticket: str):
        return await call(store.close, ticket)
