"""Answering from the knowledge base (`slm kb ask`): retrieve, prompt the model with numbered sources, and
return its answer with the [n] citations mapped to path and lines, or abstain.

What the answer is (`answer=`, `--answer`):
- `model`: the model's own answer from the numbered sources;
- `quote`: no model at all: the passages of the retrieved chunks that best answer the question, verbatim, each
  chunk's followed by its [n] (kb/quote.py), so a reader sees the evidence itself;
- `model+quote`: the model's answer, then "Sources say:" and the same quote; the model's [n] and the quoted
  chunks are the citations.
A small model can misstate what a source says; a quote cannot. On kb-python dev with SmolLM2-135M,
answer_correct was 0.08 for `model`, 0.63 for `quote` and 0.71 for `model+quote` (BENCHMARKS.md, "Quoting the
sources"). The default is `model` when a model is given (every recorded `kb ask` / `kb eval` number is of it, and
model+quote answers are twice as long), and `quote` without one (which was an error before).

Two checks decide abstention, so the model is not asked to invent what the KB lacks:
- retrieval: when no retrieved chunk is similar enough to the question (cosine similarity of the best chunk below
  `min_similarity`, tuned on kb-python's dev questions: BENCHMARKS.md), the model is not called at all (and
  nothing is quoted);
- the model (in the modes that call it): when its answer says the sources do not contain the answer (the
  instruction asks it to say ABSTAIN's words), or is empty; then nothing is quoted either.
A citation is a `[n]` in the answer with n one of the sources shown; other numbers are dropped, not guessed.
"""

from __future__ import annotations

import re
import time
from dataclasses import asdict, dataclass, field

from slmkit.kb import quote
from slmkit.kb.index import KnowledgeBase
from slmkit.kb.retrieve import RERANK_POOL, Hit, Reranker, search

ABSTAIN = "not in the knowledge base"
ABSTAIN_TEXT = "Sorry, that is not in the knowledge base."
# Phrases by which a model declines; the instruction asks for ABSTAIN, small models paraphrase it.
_DECLINES = re.compile(r"not in the knowledge base|not (?:mentioned|contained|found|covered|provided|stated) in "
                       r"the (?:sources|knowledge base|context)|(?:sources|context) do(?:es)? not "
                       r"(?:contain|mention|say)|cannot answer|can't answer", re.I)
MIN_SIMILARITY = 0.45
TOP_K = 3
ANSWERS = ("model", "quote", "model+quote")
ANSWER = "model"  # with a model; `quote` without (default_answer)
QUOTE_SENTENCES = quote.SENTENCES
SOURCES_SAY = "Sources say:"
SYSTEM = ("Answer the question using only the numbered sources. Cite the sources you use as [1], [2]. "
          f"If the sources do not answer the question, reply exactly: {ABSTAIN}.")


@dataclass
class Citation:
    n: int
    path: str
    start_line: int
    end_line: int
    heading: str

    @property
    def lines(self) -> str:
        return f"{self.start_line}-{self.end_line}"


@dataclass
class Answer:
    question: str
    text: str
    abstained: bool
    reason: str  # why it abstained ("retrieval" or "model"), or "" when it answered
    citations: list[Citation] = field(default_factory=list)
    sources: list[Hit] = field(default_factory=list)
    ttft_s: float | None = None  # time to the first answer token (None: no model answered)
    total_s: float = 0.0
    quote: str = ""  # the quoted passages with their [n] (part of `text` in the quote modes), "" when none

    def to_dict(self) -> dict:
        d = asdict(self)
        d["citations"] = [{**asdict(c), "lines": c.lines} for c in self.citations]
        d["sources"] = [h.to_dict() for h in self.sources]
        return d


def source_block(hits: list[Hit]) -> str:
    return "\n\n".join(f"[{n}] {h.heading or h.path}\n{h.text}" for n, h in enumerate(hits, 1))


def build_messages(question: str, hits: list[Hit]) -> list[dict]:
    return [{"role": "system", "content": SYSTEM},
            {"role": "user", "content": f"Sources:\n\n{source_block(hits)}\n\nQuestion: {question}"}]


def parse_citations(text: str, hits: list[Hit]) -> list[Citation]:
    """The distinct [n] (and [n, m]) in `text` that name a shown source, in order of first use."""
    seen: dict[int, None] = {}
    for group in re.findall(r"\[(\d+(?:\s*,\s*\d+)*)\]", text):
        for n in (int(x) for x in group.split(",")):
            if 1 <= n <= len(hits):
                seen[n] = None
    return [citation(n, hits) for n in seen]


def citation(n: int, hits: list[Hit]) -> Citation:
    h = hits[n - 1]
    return Citation(n, h.path, h.start_line, h.end_line, h.heading)


def merge_citations(first: list[Citation], then: list[Citation]) -> list[Citation]:
    """`first`, then those of `then` with a number `first` does not cite."""
    cited = {c.n for c in first}
    return first + [c for c in then if c.n not in cited]


def default_answer(lm=None) -> str:
    """The answer mode when none is asked for: the model's answer with a model, else the quote."""
    return ANSWER if lm is not None else "quote"


def check_answer(answer: str, lm=None) -> None:
    """A ValueError unless `answer` is a mode `lm` (None: no model) can give."""
    if answer not in ANSWERS:
        raise ValueError(f"unknown answer mode {answer!r} (--answer); choose one of {', '.join(ANSWERS)}")
    if answer != "quote" and lm is None:
        raise ValueError(f"--answer {answer} needs a model (--model); --answer quote quotes the sources without one")


def quote_sources(question: str, hits: list[Hit], embedder=None,
                  sentences: int = QUOTE_SENTENCES) -> tuple[str, list[Citation]]:
    """The passages of `hits` that best answer `question` (kb/quote.py), as the quote with its [n], and the
    citations of the quoted chunks, in the quote's order. `embedder`: the KB (its `embed`), for the passages'
    similarity."""
    chosen = quote.select(question, [h.text for h in hits], sentences, embedder=embedder,
                          priors=[h.similarity for h in hits], documents=[h.path for h in hits])
    return quote.render(chosen), [citation(n, hits) for n in dict.fromkeys(p.n for p in chosen)]


def declines(text: str) -> bool:
    return not text.strip() or bool(_DECLINES.search(text))


def _generate(lm, messages: list[dict], max_new_tokens: int) -> tuple[str, float | None]:
    params = lm.sampling_params(temperature=0.0, max_new_tokens=max_new_tokens)
    start, first, pieces = time.perf_counter(), None, []
    for piece in lm.stream_chat(messages, params):
        if first is None and piece:
            first = time.perf_counter() - start
        pieces.append(piece)
    return "".join(pieces).strip(), first


def ask(kb: KnowledgeBase, question: str, lm=None, k: int = TOP_K, mode: str = "hybrid",
        min_similarity: float = MIN_SIMILARITY, max_new_tokens: int = 160, rerank: Reranker | None = None,
        hits: list[Hit] | None = None, rerank_pool: int = RERANK_POOL, answer: str | None = None,
        quote_sentences: int = QUOTE_SENTENCES) -> Answer:
    """Answer `question` from the `k` best chunks with `lm` (any slmkit LM with a chat template), by quoting them
    (`answer`: see the module docstring), or abstain. `hits`: already retrieved chunks (best first) to answer from
    instead of searching again. `quote_sentences`: the quote's best sentences (each with its neighbours).
    `answer` None: `model` with an `lm`, `quote` without."""
    answer = answer or default_answer(lm)
    check_answer(answer, lm)
    quote.check_sentences(quote_sentences)
    start = time.perf_counter()
    hits = (hits if hits is not None else search(kb, question, k=k, mode=mode, rerank=rerank,
                                                       rerank_pool=rerank_pool))[:k]
    if not hits or max(h.similarity for h in hits) < min_similarity:
        return Answer(question, ABSTAIN_TEXT, True, "retrieval", [], hits, None, time.perf_counter() - start)
    if answer == "quote":
        quoted, cited = quote_sources(question, hits, kb, quote_sentences)
        if not quoted:  # chunks without a passage (only headings): nothing to say from them
            return Answer(question, ABSTAIN_TEXT, True, "retrieval", [], hits, None, time.perf_counter() - start)
        return Answer(question, quoted, False, "", cited, hits, None, time.perf_counter() - start, quoted)
    text, ttft = _generate(lm, build_messages(question, hits), max_new_tokens)
    if declines(text):
        return Answer(question, text or ABSTAIN_TEXT, True, "model", [], hits, ttft, time.perf_counter() - start)
    citations, quoted = parse_citations(text, hits), ""
    if answer == "model+quote":
        quoted, cited = quote_sources(question, hits, kb, quote_sentences)
        if quoted:
            text, citations = f"{text}\n\n{SOURCES_SAY}\n{quoted}", merge_citations(citations, cited)
    return Answer(question, text, False, "", citations, hits, ttft, time.perf_counter() - start, quoted)


def ask_closed_book(question: str, lm, max_new_tokens: int = 160) -> Answer:
    """The baseline without retrieval: the model answers from what it knows (it may still decline)."""
    start = time.perf_counter()
    messages = [{"role": "system", "content": f"Answer the question. If you do not know, reply exactly: {ABSTAIN}."},
                {"role": "user", "content": question}]
    text, ttft = _generate(lm, messages, max_new_tokens)
    return Answer(question, text or ABSTAIN_TEXT, declines(text), "model" if declines(text) else "", [], [], ttft,
                  time.perf_counter() - start)
