"""`slm serve MODEL --kb KB`: chat completions grounded in a knowledge base, with the citations in the response.

Each chat completion retrieves from the KB (kb/retrieve.py, hybrid by default) with the conversation's last user
turn (and the one before it, so a follow-up such as "and in Python 2?" keeps its subject), then answers exactly
as `slm kb ask` does (kb/ask.py): the sources numbered in the last user message, kb/ask.py's instruction first
in the system message (the client's own system message follows it), with the request's sampling fields as
without --kb (kb ask is greedy: send temperature 0 for its answers). When no retrieved chunk is similar
enough (`min_similarity`), the model is not called: the reply is kb/ask.py's abstention, so the server does not
invent what the KB lacks.

The response says what the answer rests on, in a field OpenAI's clients ignore:

    "slmkit": {"kb": {"sources":   [{"n", "path", "name", "heading", "lines", "start_line", "end_line", "text",
                                     "similarity"}, ...],      path: the document as indexed (absolute);
                                                               name: from the indexed folder (what to show)
                      "citations": [{"n", "path", "heading", "lines", ...}, ...],  the [n] the answer uses
                      "abstained": false, "reason": "" | "retrieval" | "model"}}

A streamed request carries `{"kb": {"sources": [...]}}` in its first chunk (before any text, so a page can show
the sources while the answer streams) and the whole field in the chunk with the finish reason. The chat page
(chat.html) shows the sources beside the answer, the cited ones marked. One choice per request (n=1), no tools,
no images: the sources are one answer's.
"""

from __future__ import annotations

import asyncio
import threading
from dataclasses import asdict, dataclass, field

from fastapi.responses import JSONResponse, Response

from slmkit.kb.ask import ABSTAIN_TEXT, MIN_SIMILARITY, SYSTEM, TOP_K, declines, parse_citations, source_block
from slmkit.kb.index import KnowledgeBase
from slmkit.kb.retrieve import Hit, search
from slmkit.serve import stream
from slmkit.serve.protocol import APIError, Choices

SOURCE_TEXT_CHARS = 600  # of each source's text in the response: enough to show, not the whole chunk twice


@dataclass
class Grounding:
    kb: KnowledgeBase
    k: int = TOP_K
    mode: str = "hybrid"
    min_similarity: float = MIN_SIMILARITY
    # one search at a time: the store's connection and the embedder are not shared between threads
    lock: threading.Lock = field(default_factory=threading.Lock)

    async def retrieve(self, messages: list[dict]) -> list[Hit]:
        """The `k` best chunks for the conversation's last user turns (off the event loop: it embeds)."""
        users = [m["content"] for m in messages if m.get("role") == "user" and isinstance(m.get("content"), str)]
        if not users or messages[-1].get("role") != "user" or not users[-1].strip():
            raise APIError(400, "with --kb the conversation must end with a user message (the question)",
                           param="messages")
        query = " ".join(users[-2:])

        def run() -> list[Hit]:
            with self.lock:
                return search(self.kb, query, k=self.k, mode=self.mode)
        return await asyncio.to_thread(run)

    @staticmethod
    def check_request(body) -> None:
        """What a grounded request cannot ask for (see the module docstring)."""
        if (body.n or 1) != 1:
            raise APIError(400, "with --kb each request gets one choice (its sources are one answer's); send n=1",
                           param="n")
        if body.tools:
            raise APIError(400, "tools are not served with --kb; serve without --kb for tool calls", param="tools")

    def answerable(self, hits: list[Hit]) -> bool:
        return bool(hits) and max(h.similarity for h in hits) >= self.min_similarity

    @staticmethod
    def prompt(messages: list[dict], hits: list[Hit]) -> list[dict]:
        """`messages` with kb/ask.py's instruction leading the system message and the numbered sources in the
        last user message (kb/ask.py's build_messages, for a whole conversation)."""
        system, rest = SYSTEM, list(messages)
        if rest and rest[0].get("role") == "system":
            if str(rest[0].get("content", "")).strip():
                system += "\n\n" + rest[0]["content"]
            rest = rest[1:]
        question = rest[-1]["content"]
        last = {**rest[-1], "content": f"Sources:\n\n{source_block(hits)}\n\nQuestion: {question}"}
        return [{"role": "system", "content": system}, *rest[:-1], last]

    def info(self, hits: list[Hit], text: str | None, abstained_by_retrieval: bool = False) -> dict:
        """The "slmkit" field: the sources, and once the answer `text` is known, its citations and whether it
        abstained."""
        sources = [{"n": n, "path": h.path, "name": self.kb.display_path(h.path), "heading": h.heading,
                    "lines": h.lines, "start_line": h.start_line,
                    "end_line": h.end_line, "text": h.text[:SOURCE_TEXT_CHARS], "similarity": round(h.similarity, 4)}
                   for n, h in enumerate(hits, 1)]
        kb = {"sources": sources}
        if text is not None:
            declined = abstained_by_retrieval or declines(text)
            kb["citations"] = [] if declined else [{**asdict(c), "lines": c.lines}
                                                   for c in parse_citations(text, hits)]
            kb["abstained"] = declined
            kb["reason"] = "retrieval" if abstained_by_retrieval else "model" if declined else ""
        return {"kb": kb}

    def abstention(self, tokenizer, model_name: str, body, hits: list[Hit]) -> Response:
        """The reply when retrieval found nothing similar enough: kb/ask.py's abstention, the model not called."""
        include_usage = bool(body.stream and body.stream_options and body.stream_options.include_usage)
        choices = Choices(tokenizer, model_name, True, 1, 1, False, 0, include_usage,
                          annotate=lambda text: self.info(hits, text, abstained_by_retrieval=True))
        choices.texts[0], choices.finish[0] = ABSTAIN_TEXT, "stop"
        return stream.whole_reply(choices) if body.stream else JSONResponse(choices.response())
