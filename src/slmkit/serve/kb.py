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

`--kb-answer` (kb/ask.py's answer modes): `model` (the default, as above), `quote` (the model is not called: the
reply is the sources' best passages, verbatim, with their [n], as `slm kb ask --answer quote` gives them), or
`model+quote` (the model's answer, then "Sources say:" and the quote, streamed as the last content delta before
the finish; not added when the model declines). The citations are the model's [n] and the quoted chunks'. The
default stays `model` here: a client of an OpenAI-compatible server expects the model's words as the content,
and the sources already come beside it in the "slmkit" field.
"""

from __future__ import annotations

import asyncio
import threading
from dataclasses import asdict, dataclass, field

from fastapi.responses import JSONResponse, Response

from slmkit.kb.ask import (
    ABSTAIN_TEXT,
    ANSWERS,
    MIN_SIMILARITY,
    QUOTE_SENTENCES,
    SOURCES_SAY,
    SYSTEM,
    TOP_K,
    Citation,
    declines,
    merge_citations,
    parse_citations,
    quote_sources,
    source_block,
)
from slmkit.kb.index import KnowledgeBase
from slmkit.kb.quote import check_sentences
from slmkit.kb.retrieve import Hit, search
from slmkit.serve import stream
from slmkit.serve.protocol import APIError, Choices

SOURCE_TEXT_CHARS = 600  # of each source's text in the response: enough to show, not the whole chunk twice


@dataclass
class Quote:
    """What a quote mode adds to the reply: `text` (in model+quote the whole appended part, "Sources say:"
    included; in quote the reply) and the quoted chunks' citations."""
    text: str
    citations: list[Citation]


@dataclass
class Grounding:
    kb: KnowledgeBase
    k: int = TOP_K
    mode: str = "hybrid"
    min_similarity: float = MIN_SIMILARITY
    answer: str = "model"  # not kb ask's default: see the module docstring
    quote_sentences: int = QUOTE_SENTENCES
    # one search at a time: the store's connection and the embedder are not shared between threads
    lock: threading.Lock = field(default_factory=threading.Lock)

    def __post_init__(self):
        if self.answer not in ANSWERS:
            raise ValueError(f"unknown answer mode {self.answer!r} (--kb-answer); choose one of {', '.join(ANSWERS)}")
        check_sentences(self.quote_sentences)

    @staticmethod
    def query(messages: list[dict]) -> str:
        """What is searched (and quoted) for: the conversation's last two user turns."""
        users = [m["content"] for m in messages if m.get("role") == "user" and isinstance(m.get("content"), str)]
        if not users or messages[-1].get("role") != "user" or not users[-1].strip():
            raise APIError(400, "with --kb the conversation must end with a user message (the question)",
                           param="messages")
        return " ".join(users[-2:])

    async def retrieve(self, messages: list[dict]) -> list[Hit]:
        """The `k` best chunks for the conversation's last user turns (off the event loop: it embeds)."""
        query = self.query(messages)

        def run() -> list[Hit]:
            with self.lock:
                return search(self.kb, query, k=self.k, mode=self.mode)
        return await asyncio.to_thread(run)

    async def quote(self, messages: list[dict], hits: list[Hit]) -> Quote | None:
        """In the quote modes, the quote of `hits` for the conversation's question (off the event loop: it embeds
        the passages); None in `model` mode."""
        if self.answer == "model":
            return None
        query = self.query(messages)

        def run() -> tuple[str, list[Citation]]:
            with self.lock:
                return quote_sources(query, hits, self.kb, self.quote_sentences)
        text, citations = await asyncio.to_thread(run)
        if self.answer == "model+quote" and text:
            text = f"\n\n{SOURCES_SAY}\n{text}"
        return Quote(text, citations)

    @staticmethod
    def appender(quote: Quote | None):
        """For model+quote: what the reply's choice gets at its end (protocol.Choices' `append`): the quote,
        unless the model declined."""
        if quote is None or not quote.text:
            return None
        return lambda text: "" if declines(text) else quote.text

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

    def info(self, hits: list[Hit], text: str | None, abstained_by_retrieval: bool = False,
             quote: Quote | None = None) -> dict:
        """The "slmkit" field: the sources, and once the answer `text` is known, its citations and whether it
        abstained. `quote`: the quote the reply holds or ends with (the quote modes)."""
        sources = [{"n": n, "path": h.path, "name": self.kb.display_path(h.path), "heading": h.heading,
                    "lines": h.lines, "start_line": h.start_line,
                    "end_line": h.end_line, "text": h.text[:SOURCE_TEXT_CHARS], "similarity": round(h.similarity, 4)}
                   for n, h in enumerate(hits, 1)]
        kb = {"sources": sources}
        if text is not None:
            quoted = quote is not None and bool(quote.text) and text.endswith(quote.text)
            own = text[:len(text) - len(quote.text)] if quoted else text  # the model's part ("" in quote mode)
            declined = abstained_by_retrieval or (not quoted and declines(own))
            kb["citations"] = [] if declined else [
                {**asdict(c), "lines": c.lines}
                for c in merge_citations(parse_citations(own, hits), quote.citations if quoted else [])]
            kb["abstained"] = declined
            kb["reason"] = "retrieval" if abstained_by_retrieval else "model" if declined else ""
        return {"kb": kb}

    def abstention(self, tokenizer, model_name: str, body, hits: list[Hit]) -> Response:
        """The reply when retrieval found nothing similar enough: kb/ask.py's abstention, the model not called."""
        return self.whole(tokenizer, model_name, body, ABSTAIN_TEXT,
                          lambda text: self.info(hits, text, abstained_by_retrieval=True))

    def quoted(self, tokenizer, model_name: str, body, hits: list[Hit], quote: Quote) -> Response:
        """The reply in quote mode: the quote, the model not called (an abstention when nothing could be quoted)."""
        if not quote.text:
            return self.abstention(tokenizer, model_name, body, hits)
        return self.whole(tokenizer, model_name, body, quote.text, lambda text: self.info(hits, text, quote=quote))

    @staticmethod
    def whole(tokenizer, model_name: str, body, text: str, annotate) -> Response:
        """A reply decided without generating (`text`), whole or as stream chunks as the request asks."""
        include_usage = bool(body.stream and body.stream_options and body.stream_options.include_usage)
        choices = Choices(tokenizer, model_name, True, 1, 1, False, 0, include_usage, annotate=annotate)
        choices.texts[0], choices.finish[0] = text, "stop"
        return stream.whole_reply(choices) if body.stream else JSONResponse(choices.response())
