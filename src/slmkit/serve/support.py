"""`slm serve MODEL --support TICKETS.sqlite`: the agent page and the ticket routes people work from, and with
`--kb HELP-CENTER-KB --intents FILE`, the customer-service assistant answering chat completions.

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

With a help-center KB and intents, every chat completion is one turn of support/assistant.py's SupportAssistant:
intent, the hand-off rules, retrieval, and either the grounded reply (the served model's answer, generated
through the engine like any request, then the article quoted) or a hand-off: a ticket in this store and the
holding reply. The response is the reply, with the turn in the "slmkit" field, and says who answers:

    body     "slmkit": {"support": {"intent", "handoff", "reason", "ticket", "articles", "citations", "draft",
                                    "confidence", ...}}    (support.SupportTurn)
    headers  X-Slmkit-Handoff: true | false

So the chat page at / is the customer's side and /agent the people's. One turn at a time (the assistant's
retrieval and intent models are shared; the model's answers still batch with the server's other requests); one
choice, no tools.
"""

from __future__ import annotations

import asyncio
import dataclasses
import threading
from pathlib import Path
from typing import Literal

from fastapi import FastAPI
from fastapi.responses import FileResponse, JSONResponse, Response
from pydantic import Field

from slmkit.chat import with_chat_stops
from slmkit.lm.handoff import TicketStore
from slmkit.serve import guard, stream
from slmkit.serve.engine import Engine, GenerationRequest
from slmkit.serve.protocol import APIError, Choices, _Body

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


class EngineChat:
    """The served model as the support assistant's `lm` (`sampling_params`, `stream_chat`): its answers are
    generated by the engine, batched with the server's other requests, from the worker thread the assistant's
    turn runs in."""

    def __init__(self, engine: Engine, timeout_s: float = 300.0):
        self.engine, self.timeout_s = engine, timeout_s
        self.loop: asyncio.AbstractEventLoop | None = None  # the server's, set by `reply` before a turn
        self.name = engine.lm.name

    def sampling_params(self, **given):
        return self.engine.lm.sampling_params(**given)

    def stream_chat(self, messages: list[dict], params):
        tok = self.engine.tokenizer
        ids = self.engine.lm.encode_prompt(tok.apply_chat_template(messages, add_generation_prompt=True))
        params = dataclasses.replace(params, stop=with_chat_stops(list(params.stop), tok))

        async def generate() -> str:
            pendings = guard.submit_all(self.engine, [GenerationRequest(ids, params)], "messages")
            deadline = asyncio.get_running_loop().time() + self.timeout_s
            return "".join([ev.text async for _, ev in stream.merged(pendings, deadline)])
        yield asyncio.run_coroutine_threadsafe(generate(), self.loop).result()


@dataclasses.dataclass
class Support:
    """What `slm serve --support` serves: the ticket store, and the assistant when a help-center KB is given."""
    tickets: TicketStore
    assistant: object | None = None  # support.assistant.SupportAssistant
    lock: threading.Lock = dataclasses.field(default_factory=threading.Lock)

    async def reply(self, tokenizer, model_name: str, body, messages: list[dict]) -> Response:
        """One chat completion as the assistant's turn (see the module docstring)."""
        if (body.n or 1) != 1:
            raise APIError(400, "the support assistant gives one reply per turn; send n=1", param="n")
        if body.tools:
            raise APIError(400, "tools are not served with the support assistant", param="tools")
        if isinstance(self.assistant.lm, EngineChat):
            self.assistant.lm.loop = asyncio.get_running_loop()

        def turn():
            with self.lock:
                return self.assistant.handle(messages)
        try:
            done = await asyncio.to_thread(turn)
        except ValueError as e:  # e.g. a conversation that does not end with the customer's message
            raise APIError(400, str(e), param="messages") from None
        include_usage = bool(body.stream and body.stream_options and body.stream_options.include_usage)
        choices = Choices(tokenizer, model_name, True, 1, 1, False, 0, include_usage,
                          annotate=lambda text: {"support": done.to_dict()})
        choices.texts[0], choices.finish[0] = done.reply, "stop"
        headers = {"X-Slmkit-Handoff": "true" if done.handoff else "false"}
        if body.stream:
            return stream.whole_reply(choices, headers)
        return JSONResponse(choices.response(), headers=headers)


def open_support(tickets: str | Path, engine: Engine, kb=None, intents: str | Path | None = None,
                 catalogue: str | Path | None = None, timeout_s: float = 300.0) -> Support:
    """The ticket store at `tickets`, and with `kb` (an open help-center KnowledgeBase) the assistant over it:
    `intents` a classifier directory or a descriptions JSON (support/intents.py), the served model writing the
    replies (none when `engine` has no generator: the article quoted alone)."""
    from slmkit.lm.handoff import HandoffQueue
    store = open_tickets(tickets)
    if kb is None:
        return Support(store)
    from slmkit.kb.catalogue import load_catalogue
    from slmkit.support.assistant import SupportAssistant
    from slmkit.support.intents import load_intents
    queue = HandoffQueue(store.path)  # a second connection to the same file (SQLite's WAL: writers queue)
    lm = EngineChat(engine, timeout_s) if engine.lm is not None else None
    assistant = SupportAssistant(kb, load_intents(intents, kb.embedder), queue=queue, lm=lm,
                                 catalogue=load_catalogue(catalogue) if catalogue else None)
    return Support(store, assistant)
