"""One customer message in, one decision out: reply automatically, or hand the conversation to a person.

    assistant = SupportAssistant(open_kb("help-kb/"), intents, queue=HandoffQueue("tickets.sqlite"), lm=lm)
    turn = assistant.handle([{"role": "user", "content": "How much is shipping to Norway?"}])
    turn.reply, turn.handoff, turn.reason, turn.ticket

For each message: the intent (any `predict(texts) -> [(label, confidence)]`: a trained classifier, or
intents.DescribedIntents), the hand-off rules (rules.py), retrieval from the help-center knowledge base (the
conversation's last user turns, so a follow-up keeps its context), and a grounded reply: the model's answer from
the retrieved articles (kb/ask.py's numbered sources and [n] citations) followed by the help center's own words,
quoted with the article named, so the customer sees the source and the facts are right even when a small model
paraphrases badly. The quote is the whole of the `quote_articles` best articles (tables read as sentences, one
per row): an article's facts are spread over its sections, and on the support dev set quoting the nearest five
sentences missed a keyword the article holds in a fifth of the replies (BENCHMARKS.md). `quote_sentences=N`
keeps the old, shorter quote. A product the catalogue knows (`catalogue=`) adds its facts.

A person takes over when a rule fires, when retrieval finds nothing similar enough (`not_in_kb`), or when the
confidence is below `min_confidence` (`low_confidence`). The confidence that an automatic reply is right is the
mean of two signals in [0, 1]: the best chunk's cosine similarity to the message, and whether the two retrievers
agree (1 when the article BM25 ranks first and the one the embedder ranks first are both among the quoted
articles, else 0; in a single-retriever mode only the similarity counts). Two retrievers that read the message
differently and land on the same article are what a wrong quote rarely has: on support dev the similarity alone
could not separate right from wrong replies (BENCHMARKS.md), the agreement could. A hand-off opens a ticket in
the queue with the conversation, intent, reason, retrieved articles and the draft reply a person can send or
edit; the customer is told a person will answer (and, in a safety case, first to unplug the appliance).
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass, field
from pathlib import Path

from slmkit.kb.ask import build_messages, parse_citations
from slmkit.kb.quote import passages, score, untable
from slmkit.kb.retrieve import Hit, search
from slmkit.support.rules import handoff_reasons

MIN_SIMILARITY = 0.35
# Chosen on support dev (BENCHMARKS.md): the largest automatic share whose wrong_reply_rate stays <= 5%. With
# agreement the confidence is >= 0.5, so 0.26 hands off only a reply the retrievers disagree on whose best
# similarity is under 0.52.
MIN_CONFIDENCE = 0.26
HOLDING = {
    "safety": "For your safety, please unplug the appliance now and do not use it until we have looked at it. "
              "A person from our team is taking over and will contact you shortly (ticket {ticket}).",
    "default": "Thank you for your message. A person from our team will take this over and answer you shortly "
               "(ticket {ticket}).",
}



@dataclass
class SupportTurn:
    message: str
    reply: str
    intent: str
    intent_confidence: float
    handoff: bool
    reason: str  # "" when answered automatically; else one of rules.REASONS
    evidence: str  # what triggered the hand-off (the matched words, or the similarity)
    confidence: float  # that the automatic reply is right: mean of the best similarity and the retrievers' agreement
    ticket: str | None
    draft: str  # the grounded reply (sent when not handed off; a suggestion for the person otherwise)
    articles: list[str] = field(default_factory=list)  # the best retrieved articles' names (quoted / shown), best first
    citations: list[dict] = field(default_factory=list)
    similarity: float = 0.0  # the best chunk's cosine similarity to the message
    agreement: bool | None = None  # BM25's and the embedder's best articles are both quoted (None: one retriever)

    def to_dict(self) -> dict:
        return asdict(self)


class SupportAssistant:
    def __init__(self, kb, intents, queue=None, lm=None, catalogue=None, k: int = 20, sources: int = 3,
                 mode: str = "hybrid", min_similarity: float = MIN_SIMILARITY, min_confidence: float = MIN_CONFIDENCE,
                 quote_articles: int = 2, quote_sentences: int | None = None, max_new_tokens: int = 160,
                 rerank=None):
        """`k` chunks are retrieved: their articles, best first, are what is quoted (and where the retrievers' best
        chunks are looked for: 20 holds both almost always); the model is shown the first `sources` of them.
        `rerank`: a cross-encoder (`slmkit.lm.reranker.load_reranker`) reordering the fused chunks first."""
        check_quote_articles(quote_articles)
        self.kb, self.intents, self.queue, self.lm, self.catalogue = kb, intents, queue, lm, catalogue
        self.k, self.mode, self.min_similarity, self.min_confidence = k, mode, min_similarity, min_confidence
        self.sources, self.quote_sentences, self.max_new_tokens = sources, quote_sentences, max_new_tokens
        self.quote_articles, self.rerank = quote_articles, rerank
        self._articles: dict[str, list[int]] | None = None  # path -> its chunk ids in order, read once

    def handle(self, messages: list[dict]) -> SupportTurn:
        """The assistant's turn after `messages` ([{"role", "content"}, ...], the last one the customer's)."""
        if not messages or messages[-1].get("role") != "user" or not str(messages[-1].get("content", "")).strip():
            raise ValueError("the conversation must end with the customer's (user) message")
        text = messages[-1]["content"]
        earlier = [m["content"] for m in messages[:-1] if m.get("role") == "user"][-1:]
        intent, intent_conf = self.intents.predict([text])[0]
        hits = search(self.kb, " ".join([*earlier, text]), k=self.k, mode=self.mode, rerank=self.rerank)
        paths = list(dict.fromkeys(h.path for h in hits))
        similarity = max((h.similarity for h in hits), default=0.0)
        agreement = retrievers_agree(hits, paths[:self.quote_articles]) if self.mode == "hybrid" else None
        confidence = similarity if agreement is None else (similarity + agreement) / 2
        rules = handoff_reasons(text)
        reason, evidence = rules[0] if rules else ("", "")
        if not reason and similarity < self.min_similarity:
            reason, evidence = "not_in_kb", f"best similarity {similarity:.2f} < {self.min_similarity}"
        elif not reason and confidence < self.min_confidence:
            reason, evidence = "low_confidence", (f"confidence {confidence:.2f} < {self.min_confidence} (similarity "
                                                  f"{similarity:.2f}, retrievers {'' if agreement else 'dis'}agree)")
        draft, citations = self._draft(text, hits, paths) if hits else ("", [])
        # what the person (and the client) is pointed to: the articles quoted and shown to the model, not every
        # article the 20 retrieved chunks touch (about 10)
        articles = [Path(p).name for p in paths[:max(self.quote_articles, self.sources)]]
        ticket = None
        if reason:
            if self.queue is None:
                raise ValueError("this message needs a person, and the assistant has no hand-off queue")
            ticket = self.queue.submit(messages=messages, intent=intent, reason=reason, articles=articles,
                                       draft=draft)
            reply = HOLDING.get(reason, HOLDING["default"]).format(ticket=ticket)
        else:
            reply = draft
        return SupportTurn(text, reply, intent, round(intent_conf, 4), bool(reason), reason, evidence,
                           round(confidence, 4), ticket, draft, articles, citations, round(similarity, 4), agreement)

    def _draft(self, text: str, hits: list[Hit], paths: list[str]) -> tuple[str, list[dict]]:
        parts, citations = [], []
        if self.lm is not None:
            params = self.lm.sampling_params(temperature=0.0, max_new_tokens=self.max_new_tokens)
            shown = hits[:self.sources]
            answer = "".join(self.lm.stream_chat(build_messages(text, shown), params)).strip()
            if answer:
                parts.append(answer)
                citations = [asdict(c) for c in parse_citations(answer, shown)]
        for path in paths[:self.quote_articles]:
            title = next((h.heading.split(" > ")[0] for h in hits if h.path == path and h.heading), Path(path).stem)
            if self.quote_sentences:  # the sentences nearest the message, from the article's retrieved chunks
                body = quote("\n\n".join(h.text for h in hits if h.path == path), text, self.quote_sentences,
                             getattr(self.kb, "embedder", None))
            else:
                body = article_text(self._article_chunks(path))
            parts.append(f"From our help center ({title}): {body}")
        if self.catalogue is not None:
            parts += [p.facts() for p in self.catalogue.mentioned(text)]
        return "\n\n".join(parts), citations

    def _article_chunks(self, path: str) -> list[str]:
        """The chunks of the article at `path`, in order. Which chunks make which article is read once, and again
        when the knowledge base was re-indexed since (the article unknown, or a chunk id no longer there)."""
        for fresh in (self._articles is None, True):
            if fresh:
                ids, self._articles = self.kb.store.chunk_ids(), {}
                for start in range(0, len(ids), 500):
                    for c in self.kb.store.get_chunks(ids[start:start + 500]):
                        self._articles.setdefault(c.path, []).append(c.id)
            ids = self._articles.get(path, [])
            chunks = self.kb.store.get_chunks(ids)
            if ids and len(chunks) == len(ids):
                break
        return [c.chunk.text for c in chunks]


def check_quote_articles(n: int) -> None:
    if n < 1:
        raise ValueError(f"quote_articles (--quote-articles) is {n}; it must be at least 1 (the best article)")


def retrievers_agree(hits: list[Hit], quoted: list[str]) -> bool:
    """Whether the chunk BM25 ranks first and the chunk the embedder ranks first both come from `quoted` articles
    (a best chunk not among `hits` counts as disagreement: its article is not known to be quoted)."""
    def first(rank: str) -> str | None:
        return next((h.path for h in hits if getattr(h, rank) == 1), None)
    return first("bm25_rank") in quoted and first("dense_rank") in quoted


def article_text(chunks: list[str]) -> str:
    """An article's chunks as one quote: headings dropped, tables as sentences, the paragraphs consecutive chunks
    share (their overlap) once."""
    paragraphs = []
    for chunk in chunks:
        body = untable("\n".join(line for line in chunk.splitlines() if not line.lstrip().startswith("#")))
        paragraphs += [" ".join(p.split()) for p in re.split(r"\n\s*\n", body) if p.strip()]
    return " ".join(dict.fromkeys(paragraphs))


def quote(passage: str, question: str, n: int = 3, embedder=None) -> str:
    """The `n` passages of `passage` nearest `question`, in passage order: kb/quote.py's passages (sentences,
    tables as one sentence per row) and scores (the content words they share, IDF-weighted, plus the embedder's
    cosine similarity when given)."""
    candidates = passages(passage)
    if len(candidates) <= n:
        return " ".join(p.text for p in candidates)
    scores = score(question, candidates, embedder)
    best = sorted(range(len(candidates)), key=lambda i: -scores[i])[:n]
    return " ".join(candidates[i].text for i in sorted(best))
