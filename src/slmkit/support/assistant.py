"""One customer message in, one decision out: reply automatically, or hand the conversation to a person.

    assistant = SupportAssistant(open_kb("help-kb/"), intents, queue=HandoffQueue("tickets.sqlite"), lm=lm)
    turn = assistant.handle([{"role": "user", "content": "How much is shipping to Norway?"}])
    turn.reply, turn.handoff, turn.reason, turn.ticket

For each message: the intent (any `predict(texts) -> [(label, confidence)]`: a trained classifier, or
intents.DescribedIntents), the hand-off rules (rules.py), retrieval from the help-center knowledge base (the
conversation's last user turns, so a follow-up keeps its context), and a grounded reply: the model's answer from
the retrieved articles (kb/ask.py's numbered sources and [n] citations) followed by the article's most relevant
sentences, quoted, with the article named, so the customer sees the source and the facts are the help center's
own words even when a small model paraphrases badly. A product the catalogue knows (`catalogue=`) adds its facts.

A person takes over when a rule fires, when retrieval finds nothing similar enough (`not_in_kb`), or when the
confidence is below `min_confidence` (`low_confidence`). The confidence of an automatic reply is the best chunk's
cosine similarity to the message (a retrieval that found the article is what makes a reply right here; measured
in BENCHMARKS.md against the intent classifier's confidence). A hand-off opens a ticket in the queue with the
conversation, intent, reason, retrieved articles and the draft reply a person can send or edit; the customer is
told a person will answer (and, in a safety case, first to unplug the appliance).
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass, field
from pathlib import Path

from slmkit.kb.ask import build_messages, parse_citations
from slmkit.kb.retrieve import Hit, search
from slmkit.support.rules import handoff_reasons

MIN_SIMILARITY = 0.35
HOLDING = {
    "safety": "For your safety, please unplug the appliance now and do not use it until we have looked at it. "
              "A person from our team is taking over and will contact you shortly (ticket {ticket}).",
    "default": "Thank you for your message. A person from our team will take this over and answer you shortly "
               "(ticket {ticket}).",
}
_WORD = re.compile(r"[a-z0-9€]+")
_STOP = set("a an and are at be but by can do does for from have how i if in is it its me my of on or our so that "
            "the this to was we what when where which who why will with you your".split())


@dataclass
class SupportTurn:
    message: str
    reply: str
    intent: str
    intent_confidence: float
    handoff: bool
    reason: str  # "" when answered automatically; else one of rules.REASONS
    evidence: str  # what triggered the hand-off (the matched words, or the similarity)
    confidence: float  # of answering automatically (the best chunk's similarity)
    ticket: str | None
    draft: str  # the grounded reply (sent when not handed off; a suggestion for the person otherwise)
    articles: list[str] = field(default_factory=list)  # retrieved article paths, best first
    citations: list[dict] = field(default_factory=list)

    def to_dict(self) -> dict:
        return asdict(self)


class SupportAssistant:
    def __init__(self, kb, intents, queue=None, lm=None, catalogue=None, k: int = 5, sources: int = 3,
                 mode: str = "hybrid", min_similarity: float = MIN_SIMILARITY, min_confidence: float = 0.0,
                 quote_sentences: int = 5, max_new_tokens: int = 160):
        """`k` chunks are retrieved (the quote is drawn from those of the best article), the model is shown the
        first `sources` of them."""
        self.kb, self.intents, self.queue, self.lm, self.catalogue = kb, intents, queue, lm, catalogue
        self.k, self.mode, self.min_similarity, self.min_confidence = k, mode, min_similarity, min_confidence
        self.sources, self.quote_sentences, self.max_new_tokens = sources, quote_sentences, max_new_tokens

    def handle(self, messages: list[dict]) -> SupportTurn:
        """The assistant's turn after `messages` ([{"role", "content"}, ...], the last one the customer's)."""
        if not messages or messages[-1].get("role") != "user" or not str(messages[-1].get("content", "")).strip():
            raise ValueError("the conversation must end with the customer's (user) message")
        text = messages[-1]["content"]
        earlier = [m["content"] for m in messages[:-1] if m.get("role") == "user"][-1:]
        intent, intent_conf = self.intents.predict([text])[0]
        hits = search(self.kb, " ".join([*earlier, text]), k=self.k, mode=self.mode)
        confidence = max((h.similarity for h in hits), default=0.0)
        rules = handoff_reasons(text)
        reason, evidence = rules[0] if rules else ("", "")
        if not reason and confidence < self.min_similarity:
            reason, evidence = "not_in_kb", f"best similarity {confidence:.2f} < {self.min_similarity}"
        elif not reason and confidence < self.min_confidence:
            reason, evidence = "low_confidence", f"confidence {confidence:.2f} < {self.min_confidence}"
        draft, citations = self._draft(text, hits) if hits else ("", [])
        articles = list(dict.fromkeys(Path(h.path).name for h in hits))
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
                           round(confidence, 4), ticket, draft, articles, citations)

    def _draft(self, text: str, hits: list[Hit]) -> tuple[str, list[dict]]:
        parts, citations = [], []
        if self.lm is not None:
            params = self.lm.sampling_params(temperature=0.0, max_new_tokens=self.max_new_tokens)
            shown = hits[:self.sources]
            answer = "".join(self.lm.stream_chat(build_messages(text, shown), params)).strip()
            if answer:
                parts.append(answer)
                citations = [asdict(c) for c in parse_citations(answer, shown)]
        # the quote comes from the best article: all its retrieved chunks, the sentences nearest the question
        top = hits[0]
        same = "\n\n".join(h.text for h in hits if h.path == top.path)
        parts.append(f"From our help center ({top.heading.split(' > ')[0] if top.heading else Path(top.path).stem}): "
                     + quote(same, text, self.quote_sentences, getattr(self.kb, "embedder", None)))
        if self.catalogue is not None:
            parts += [p.facts() for p in self.catalogue.mentioned(text)]
        return "\n\n".join(parts), citations


def _untable(text: str) -> str:
    """Markdown tables as sentences, each row with its header ("| Code | Meaning |" then "| E3 | Overheating |"
    -> "Code E3, Meaning Overheating."), so a row can be quoted on its own."""
    out, header = [], None
    for line in text.splitlines():
        if not line.lstrip().startswith("|"):
            out.append(line)
            header = None
            continue
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if all(set(c) <= set("-: ") for c in cells):
            continue
        if header is None:
            header = cells
            continue
        out.append("\n\n" + ", ".join(f"{h} {c}".strip() for h, c in zip(header, cells, strict=False) if c)
                   .rstrip(".") + ".\n\n")
    return "\n".join(out)


def quote(passage: str, question: str, n: int = 3, embedder=None) -> str:
    """The `n` sentences of `passage` nearest `question`, in passage order: by the embedder's cosine similarity
    plus the content words they share (the words alone without an embedder)."""
    body = _untable("\n".join(line for line in passage.splitlines() if not line.lstrip().startswith("#")))
    sentences = list(dict.fromkeys(" ".join(s.split()) for s in re.split(r"(?<=[.!?])\s+|\n{2,}", body) if s.strip()))
    if len(sentences) <= n:
        return " ".join(sentences)
    wanted = {w for w in _WORD.findall(question.lower()) if w not in _STOP}
    score = [len(wanted & set(_WORD.findall(s.lower()))) / max(len(wanted), 1) for s in sentences]
    if embedder is not None:
        vectors = embedder.embed([question, *sentences])
        score = [w + float(vectors[0] @ v) for w, v in zip(score, vectors[1:], strict=True)]
    best = sorted(range(len(sentences)), key=lambda i: -score[i])[:n]
    return " ".join(sentences[i] for i in sorted(best))
