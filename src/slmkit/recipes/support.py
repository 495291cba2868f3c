"""The customer-service assistant as plain functions (`slm support reply | chat | tickets | eval`).

The help center is a knowledge base (`slm kb index help-center/ -o help-kb/`); a folder of articles works too and
is indexed on the way (into OUT/kb for `eval`). Intents come from a trained classifier directory (`slm classify
train`) or, with no labelled messages, from a JSON file of intent descriptions (examples/support-intents.json is
the help center of ../shared/data/support's). Hand-offs go to a ticket store (`tickets.sqlite`), which people
work from with `slm support tickets`.
"""

from __future__ import annotations

from pathlib import Path

from slmkit.lm.handoff import HandoffQueue
from slmkit.recipes.kb import _open_lm, _open_reranker
from slmkit.support.assistant import MIN_CONFIDENCE, MIN_SIMILARITY, SupportAssistant, check_quote_articles


def _open_kb(kb_dir: str | Path, index_into: str | Path | None = None, embedder: str | None = None):
    from slmkit.kb.index import index_kb, open_kb
    kb_dir = Path(kb_dir)
    if (kb_dir / "kb.sqlite").exists():
        return open_kb(kb_dir)
    if kb_dir.is_dir() and index_into is not None:  # a folder of articles: index it first
        index_kb([kb_dir], index_into, embedder=embedder)
        return open_kb(index_into)
    return open_kb(kb_dir)  # the knowledge base's own error: what is missing and how to make one


def open_assistant(kb_dir: str | Path, model: str | None = None, intents: str | Path | None = None,
                   queue: str | Path | None = "tickets.sqlite", catalogue: str | Path | None = None,
                   backend: str = "auto", min_similarity: float = MIN_SIMILARITY,
                   min_confidence: float = MIN_CONFIDENCE, index_into: str | Path | None = None,
                   quote_articles: int = 2, reranker: str | Path | None = None) -> SupportAssistant:
    """A SupportAssistant over the help-center KB, with `model` writing the replies (none: quoted articles only),
    `intents` (a classifier directory or a descriptions JSON, e.g. examples/support-intents.json), hand-offs to
    the `queue` (.sqlite ticket store or .jsonl log), the `catalogue` CSV for product facts and a `reranker`
    (a cross-encoder directory, `slm rerank-train`) reordering the retrieved chunks."""
    check_quote_articles(quote_articles)
    from slmkit.kb.catalogue import load_catalogue
    from slmkit.support.intents import load_intents
    kb = _open_kb(kb_dir, index_into)
    lm = _open_lm(model, backend) if model else None
    return SupportAssistant(kb, load_intents(intents, kb.embedder), queue=HandoffQueue(queue) if queue else None, lm=lm,
                            catalogue=load_catalogue(catalogue) if catalogue else None, min_similarity=min_similarity,
                            min_confidence=min_confidence, quote_articles=quote_articles,
                            rerank=_open_reranker(reranker))


def close_assistant(assistant: SupportAssistant) -> None:
    for part in (assistant.lm, assistant.queue, assistant.kb):
        if part is not None:
            part.close()


def support_eval(kb_dir: str | Path, messages: str | Path, out: str | Path, model: str | None = None,
                 intents: str | Path | None = None, catalogue: str | Path | None = None, backend: str = "auto",
                 min_similarity: float = MIN_SIMILARITY, min_confidence: float = MIN_CONFIDENCE,
                 limit: int | None = None, quote_articles: int = 2, reranker: str | Path | None = None,
                 log=None) -> dict:
    """`evaluate_support` on a messages file: OUT/results.json, OUT/replies.jsonl, the hand-offs in
    OUT/tickets.sqlite."""
    from slmkit.support.evaluate import evaluate_support, read_messages
    items = read_messages(messages)[:limit]
    out = Path(out)
    assistant = open_assistant(kb_dir, model, intents, queue=out / "tickets.sqlite", catalogue=catalogue,
                               backend=backend, min_similarity=min_similarity, min_confidence=min_confidence,
                               index_into=out / "kb", quote_articles=quote_articles, reranker=reranker)
    try:
        return evaluate_support(assistant, items, out=out, log=log)
    finally:
        close_assistant(assistant)


def support_tickets(queue: str | Path, status: str | None = "open", answer: tuple[str, str] | None = None,
                    close: str | None = None) -> list[dict]:
    """The tickets in `queue` (a .sqlite store) with `status` (open, closed, None: all); `answer` (ticket, text)
    records a person's reply and closes the ticket, `close` closes one; returns the tickets listed (or changed)."""
    from slmkit.lm.handoff import TicketStore
    path = Path(queue)
    if not path.is_file():
        raise ValueError(f"{path}: no ticket store here (the assistant creates it at its first hand-off)")
    store = TicketStore(path)
    try:
        if answer:
            return [store.answer(*answer)]
        if close:
            return [store.close(close)]
        return store.tickets(status)
    finally:
        store.close_store()
