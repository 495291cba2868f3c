"""Heading-aware chunking: a document's blocks become chunks of at most `max_chars` characters that never cross
a heading, each keeping its heading path ("Title > Section > Subsection") and the source lines it spans.
Consecutive chunks of one section share their last paragraphs (up to `overlap` characters), so a passage cut at
a chunk boundary is whole in one of them.

Why these defaults: MiniLM reads 256 word pieces (about 1,000 characters of English prose, less of code), so a
chunk of 1,000 characters is embedded whole; 200 characters of overlap is one short paragraph.
"""

from __future__ import annotations

from dataclasses import dataclass

from slmkit.kb.sources import Block

MAX_CHARS = 1000
OVERLAP = 200


@dataclass
class Chunk:
    text: str
    heading: str  # the heading path, " > "-joined; "" before the first heading
    start_line: int
    end_line: int

    def indexed_text(self) -> str:
        """What BM25 and the embedder see: the heading path tells them what the passage is about."""
        return f"{self.heading}\n{self.text}" if self.heading else self.text


def chunk_blocks(blocks: list[Block], max_chars: int = MAX_CHARS, overlap: int = OVERLAP) -> list[Chunk]:
    if max_chars < 50 or not 0 <= overlap < max_chars:
        raise ValueError(f"chunk size {max_chars} / overlap {overlap}: need a size >= 50 and 0 <= overlap < size")
    chunks: list[Chunk] = []
    path: list[tuple[int, str]] = []  # (level, title) of the open headings
    section: list[list[tuple[int, str]]] = []  # paragraphs (as line lists) under the current heading

    def emit_section():
        heading = " > ".join(t for _, t in path)
        for piece in _pack([p for para in section for p in _split_long(para, max_chars)], max_chars, overlap):
            lines = [line for para in piece for line in para]
            chunks.append(Chunk("\n\n".join("\n".join(t for _, t in para) for para in piece).strip(), heading,
                                lines[0][0], lines[-1][0]))
        section.clear()

    for block in blocks:
        if block.level:
            emit_section()
            while path and path[-1][0] >= block.level:
                path.pop()
            path.append((block.level, block.text.strip()))
        elif block.text.strip():
            section.append(block.lines)
    emit_section()
    return chunks


def _size(paras) -> int:
    return sum(len(t) + 1 for para in paras for _, t in para) + 2 * max(0, len(paras) - 1)


def _split_long(para: list[tuple[int, str]], max_chars: int) -> list[list[tuple[int, str]]]:
    """A paragraph longer than max_chars, cut between lines (a single over-long line is cut within itself)."""
    if _size([para]) <= max_chars:
        return [para]
    pieces, current = [], []
    for n, text in para:
        while len(text) > max_chars:
            if current:
                pieces.append(current)
                current = []
            pieces.append([(n, text[:max_chars])])
            text = text[max_chars:]
        if current and _size([current + [(n, text)]]) > max_chars:
            pieces.append(current)
            current = []
        current.append((n, text))
    if current:
        pieces.append(current)
    return pieces


def _pack(paras, max_chars: int, overlap: int):
    """Paragraphs greedily into chunks of <= max_chars; each next chunk starts with the trailing paragraphs of the
    previous one that fit in `overlap` characters."""
    piece: list = []
    fresh = 0  # paragraphs in `piece` not already emitted
    for para in paras:
        if piece and _size(piece + [para]) > max_chars:
            if fresh:
                yield piece
            carry = []
            for old in reversed(piece):
                if _size([old] + carry) > overlap or _size([old] + carry + [para]) > max_chars:
                    break
                carry.insert(0, old)
            piece, fresh = carry, 0
        piece.append(para)
        fresh += 1
    if piece and fresh:
        yield piece
