"""Quoting the sources: the passages of the retrieved chunks that best answer a question, verbatim, each chunk's
passages followed by its [n] (`slm kb ask --answer quote|model+quote`, `slm serve --kb-answer`; the support
assistant's `quote_sentences` quote uses the same passages and scores).

A passage is a sentence of prose, or a literal block kept whole with its line breaks: a grammar production
(`::=`), an interactive session (`>>>`), a fenced block, or an indented block that does not end a sentence (code).
Headings are dropped (the citation names the section), Markdown tables are read as sentences, one per row with its
header (`untable`), a hyphenated word the line wrapping cut ("pre-" / "existing") is rejoined, and a source's own
footnote markers (" [2]") are dropped so they do not read as the answer's citations.

Which passages (`select`), chosen on kb-python dev (BENCHMARKS.md, "Quoting the sources"):
- each candidate is scored by the question's content words it holds (lower-cased words that are not stopwords,
  their common suffixes cut: "raises" matches "raise"), each weighted by its rarity among the candidates (an IDF
  over them, so `__cause__` counts and "exception" in a reference about exceptions barely does), as a share of the
  question's total weight; plus the embedder's cosine similarity of passage and question; plus its chunk's
  (`priors`: the retrieved chunk's own similarity to the question, which judges the passage by its context);
- the quote keeps to one document: the one holding the best passage. On dev, passages from a second document
  were mostly near misses, and a quoted near miss is a wrong citation (citation_precision about 0.7 without this
  rule, over 0.8 with it, for about the same answer_correct);
- the best `sentences` passages are taken, each with `context` passages on either side in its chunk (a sentence
  of a reference often needs the one before or after: "If there isn't ..." follows the rule it qualifies); a code
  block is quoted only as a best passage itself, not as context. A passage sharing no content word with the
  question is never a best passage, unless none does.
A passage repeated in two chunks (neighbouring chunks overlap; pydoc's `compound` contains `try`) is one
candidate, from the better-ranked chunk.

The quote (`render`) has one paragraph per chunk: its passages in the chunk's order, then its [n]; the chunks in
order of their best passage. Only quoted chunks are cited.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

from slmkit.kb.store import STOPWORDS

SENTENCES = 3
CONTEXT = 1
_WORD = re.compile(r"\w+")
_SUFFIXES = ("ing", "ed", "es", "s", "e")
_SENTENCE_END = re.compile(r"(?<=[.!?])\s+(?=[\"'`*(\[A-Z0-9])")
_ABBREVIATION = re.compile(r"(?:\be\.g|\bi\.e|\betc|\bvs|\bcf)\.$")


@dataclass
class Passage:
    text: str
    n: int  # the [n] of its chunk: 1-based position among the texts quoted from
    position: int  # its place in the chunk
    literal: bool = False  # a code block or grammar production, kept with its line breaks
    paragraph: int = 0  # which paragraph of the chunk: the quote starts a line where the paragraph changes


def _stem(word: str) -> str:
    for suffix in _SUFFIXES:
        if word.endswith(suffix) and len(word) - len(suffix) >= 3:
            return word[:-len(suffix)]
    return word


def content_words(text: str) -> set[str]:
    """The words that can say what a passage is about: not stopwords, a common suffix cut ("costs" -> "cost")."""
    return {_stem(w) for w in _WORD.findall(text.lower()) if w not in STOPWORDS}


def untable(text: str) -> str:
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


def split_sentences(text: str) -> list[str]:
    """Prose as sentences, its lines joined (see the module docstring); a full stop after "e.g.", "i.e." or
    "etc." ends no sentence."""
    flat = " ".join(re.sub(r"(?<=\w-)\n\s*(?=\w)", "", text).split())
    flat = re.sub(r"(?:^|(?<=\s))\[\d+\](?:\s+|$)", "", flat)
    pieces: list[str] = []
    for piece in _SENTENCE_END.split(flat):
        if pieces and _ABBREVIATION.search(pieces[-1]):
            pieces[-1] += " " + piece
        elif piece:
            pieces.append(piece)
    return pieces


def _is_literal(lines: list[str], first: bool) -> bool:
    """Whether a paragraph is a block to keep whole. `first`: the chunk's first paragraph, whose first line lost
    its indentation when the chunk was stripped (so only the lines after it can show the indent)."""
    text = "\n".join(lines)
    if "::=" in text or lines[0].lstrip().startswith((">>>", "```", "~~~")):
        return True
    if first and len(lines) == 1:
        return False
    indented = all(line[:1].isspace() for line in (lines[1:] if first else lines))
    return indented and not text.rstrip().endswith((".", "?", "!", ":"))


def _dedent(lines: list[str], first: bool) -> str:
    """A literal block without its common indentation. In the chunk's first paragraph the first line has none
    left: the others are cut to 4 spaces under it when it opens a block (ends with ":"), else to it."""
    measured = [line for line in (lines[1:] if first else lines) if line.strip()]
    cut = min((len(line) - len(line.lstrip()) for line in measured), default=0)
    if first and lines[0].rstrip().endswith(":"):
        cut = max(0, cut - 4)
    return "\n".join(line if first and i == 0 else line[cut:] for i, line in enumerate(lines)).rstrip()


def passages(text: str, n: int = 1) -> list[Passage]:
    """The passages of one chunk's (or article's) `text`, in order; `n`: the chunk's [n]."""
    body = untable("\n".join(line for line in text.splitlines() if not line.lstrip().startswith("#")))
    out: list[Passage] = []
    for i, para in enumerate(re.split(r"\n[ \t]*\n", body.strip("\n"))):
        lines = [line.rstrip() for line in para.splitlines() if line.strip()]
        if not lines:
            continue
        first = i == 0 and not lines[0][:1].isspace()  # a chunk's text starts stripped of its indentation
        if _is_literal(lines, first):
            out.append(Passage(_dedent(lines, first), n, len(out), True, i))
        else:
            out += [Passage(s, n, len(out) + j, False, i) for j, s in enumerate(split_sentences("\n".join(lines)))]
    return out


def score(question: str, candidates: list[Passage], embedder=None, priors: list[float] | None = None) -> list[float]:
    """How well each passage answers `question`: the IDF-weighted share of the question's content words it holds,
    plus its cosine similarity to the question by `embedder` (anything with `embed(texts)`), plus `priors[n - 1]`
    (its chunk's)."""
    words = [content_words(p.text) for p in candidates]
    wanted = content_words(question)
    idf = {w: math.log((len(words) + 1) / (sum(w in ws for ws in words) + 0.5)) for w in wanted}
    total = sum(idf.values()) or 1.0
    scores = [sum(idf[w] for w in wanted & ws) / total + (priors[p.n - 1] if priors else 0.0)
              for p, ws in zip(candidates, words, strict=True)]
    if embedder is not None and candidates:
        import numpy as np
        vectors = np.asarray(embedder.embed([question, *(p.text for p in candidates)]), dtype=np.float32)
        vectors /= np.maximum(np.linalg.norm(vectors, axis=1, keepdims=True), 1e-9)
        scores = [s + float(vectors[0] @ v) for s, v in zip(scores, vectors[1:], strict=True)]
    return scores


def select(question: str, texts: list[str], sentences: int = SENTENCES, context: int = CONTEXT, embedder=None,
           priors: list[float] | None = None, documents: list[str] | None = None) -> list[Passage]:
    """The passages of `texts` (the retrieved chunks' texts, best first: text i is [i + 1]) to quote for
    `question`, best first (see the module docstring). `documents[i]`: text i's document, to keep the quote to
    the best passage's; `priors[i]`: text i's own score (its similarity to the question)."""
    check_sentences(sentences)
    if context < 0:
        raise ValueError(f"context is {context} passages; give 0 or more")
    seen: set[str] = set()
    candidates = []
    for n, text in enumerate(texts, 1):
        for p in passages(text, n):
            key = " ".join(p.text.split()).lower()
            if key not in seen:
                seen.add(key)
                candidates.append(p)
    if not candidates:
        return []
    scores = score(question, candidates, embedder, priors)
    wanted = content_words(question)
    answers = [bool(content_words(p.text) & wanted) for p in candidates]
    order = sorted(range(len(candidates)), key=lambda i: (not answers[i], -scores[i]))
    document = documents[candidates[order[0]].n - 1] if documents else None
    at = {(p.n, p.position): p for p in candidates}
    chosen: list[Passage] = []
    best = 0
    for i in order:
        p = candidates[i]
        if best == sentences or (best and not answers[i]):
            break
        if document is not None and documents[p.n - 1] != document:
            continue
        best += 1
        for offset in (0, *(d for k in range(1, context + 1) for d in (-k, k))):
            q = at.get((p.n, p.position + offset))
            if q is not None and q not in chosen and (offset == 0 or not q.literal):
                chosen.append(q)
    return chosen


def render(chosen: list[Passage], cite: bool = True) -> str:
    """The chosen passages as the quote: one paragraph per chunk (its passages in the chunk's order, a line per
    paragraph of the source, "…" where the text between them is left out, then [n]), the chunks in the order of
    their best passage; a literal block on lines of its own, indented by 4."""
    groups: dict[int, list[Passage]] = {}
    for p in chosen:
        groups.setdefault(p.n, []).append(p)
    paragraphs = []
    for n, group in groups.items():
        lines: list[str] = []
        prose = False  # whether the last line is prose the next sentence continues
        last = None
        for p in sorted(group, key=lambda p: p.position):
            gap = last is not None and p.position > last.position + 1
            prose = prose and p.paragraph == last.paragraph
            last = p
            if p.literal:
                if gap:
                    lines.append("…")
                lines += ["    " + line for line in p.text.splitlines()]
                prose = False
            elif prose:
                lines[-1] += (" … " if gap else " ") + p.text
            else:
                lines.append(("… " if gap else "") + p.text)
                prose = True
        if cite and prose:
            lines[-1] += f" [{n}]"
        elif cite:  # after a code block: on a line of its own, so it does not read as code
            lines.append(f"[{n}]")
        paragraphs.append("\n".join(lines))
    return "\n\n".join(paragraphs)


def check_sentences(n: int) -> None:
    if n < 1:
        raise ValueError(f"the quote's budget is {n} sentences (--quote-sentences); quote at least 1")
