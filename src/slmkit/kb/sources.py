"""Reading documents for the knowledge base: Markdown, text, HTML, PDF and JSONL, each as a list of `Block`s
(a heading or a paragraph) that remember the source lines they came from, so every chunk can cite path and lines.

Line numbers are the file's own (1-based) for Markdown, text, HTML and JSONL (one record a line). A PDF has no
lines of its own: its blocks carry the line numbers of the text pypdf extracts, page after page, and each page is
a heading ("page N"), so a citation names the page too.

The built-in source `pydoc-topics` writes one `KEY.md` per topic of the running Python's `pydoc_data.topics`
(the language reference that ships with every Python), its reST-style underlined titles turned into Markdown
headings; kb-python's gold `topics` are then the files' stems.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from html.parser import HTMLParser
from pathlib import Path

from slmkit.files import atomic_write_text, iter_jsonl

SUFFIXES = {".md": "markdown", ".markdown": "markdown", ".txt": "text", ".rst": "text", ".html": "html",
            ".htm": "html", ".pdf": "pdf", ".jsonl": "jsonl"}
BUILTIN_SOURCES = ("pydoc-topics",)
JSONL_TEXT_FIELDS = ("text", "content", "body")
JSONL_TITLE_FIELDS = ("title", "heading", "id")


@dataclass
class Block:
    """A heading (level 1-6) or a paragraph (level 0) with its lines: (line number, text) pairs."""
    level: int
    lines: list[tuple[int, str]] = field(default_factory=list)

    @property
    def text(self) -> str:
        return "\n".join(t for _, t in self.lines)


def find_files(sources: list[str | Path]) -> list[Path]:
    """Every indexable file under `sources` (files, or folders searched recursively), sorted, without duplicates.
    Hidden files and folders are skipped."""
    files: dict[Path, None] = {}
    for source in sources:
        path = Path(source)
        if path.is_dir():
            for f in sorted(path.rglob("*")):
                rel = f.relative_to(path).parts
                if f.is_file() and f.suffix.lower() in SUFFIXES and not any(p.startswith(".") for p in rel):
                    files[f.resolve()] = None
        elif path.is_file():
            if path.suffix.lower() not in SUFFIXES:
                raise ValueError(f"{path}: unsupported file type {path.suffix!r}; the knowledge base reads "
                                 f"{', '.join(sorted(SUFFIXES))}")
            files[path.resolve()] = None
        else:
            raise FileNotFoundError(f"{path}: no such file or folder (or built-in source: "
                                    f"{', '.join(BUILTIN_SOURCES)})")
    return sorted(files)


def read_blocks(path: Path) -> list[Block]:
    """The blocks of one file, by its suffix."""
    kind = SUFFIXES.get(path.suffix.lower())
    if kind == "pdf":
        return _pdf_blocks(path)
    if kind == "jsonl":
        return _jsonl_blocks(path)
    try:
        text = path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as e:
        raise ValueError(f"{path}: not UTF-8 text (byte 0x{e.object[e.start]:02x} at offset {e.start}); "
                         "re-encode it as UTF-8") from None
    if kind == "html":
        return html_blocks(text)
    return markdown_blocks(text) if kind == "markdown" else text_blocks(text)


def markdown_blocks(text: str) -> list[Block]:
    """ATX (`# Title`) and setext (underlined) headings, and blank-line separated paragraphs; lines inside
    ``` / ~~~ fences stay in their paragraph, so a `#` comment in code is no heading."""
    blocks: list[Block] = []
    para: list[tuple[int, str]] = []
    fence = None

    def flush():
        if para:
            blocks.append(Block(0, list(para)))
            para.clear()

    lines = text.splitlines()
    for i, line in enumerate(lines, 1):
        stripped = line.strip()
        if fence:
            para.append((i, line))
            if stripped.startswith(fence):
                fence = None
            continue
        if stripped.startswith(("```", "~~~")):
            fence = stripped[:3]
            para.append((i, line))
            continue
        atx = re.match(r"^ {0,3}(#{1,6})\s+(.*?)\s*#*\s*$", line)
        if atx:
            flush()
            blocks.append(Block(len(atx.group(1)), [(i, atx.group(2))]))
            continue
        if len(para) == 1 and re.fullmatch(r"(=+|-+)\s*", line) and para[0][1].strip():
            n, title = para.pop()
            blocks.append(Block(1 if line.startswith("=") else 2, [(n, title.strip())]))
            continue
        if not stripped:
            flush()
        else:
            para.append((i, line))
    flush()
    return blocks


def text_blocks(text: str) -> list[Block]:
    """Plain text: paragraphs only (a .txt file has no markup to trust for headings)."""
    return _paragraphs(enumerate(text.splitlines(), 1))


def _paragraphs(numbered_lines) -> list[Block]:
    """(line number, text) pairs cut into paragraph blocks at blank lines."""
    blocks, para = [], []
    for i, line in numbered_lines:
        if line.strip():
            para.append((i, line))
        elif para:
            blocks.append(Block(0, para))
            para = []
    if para:
        blocks.append(Block(0, para))
    return blocks


class _HTMLBlocks(HTMLParser):
    """Headings h1-h6 and the text between them, each piece with the source line it started on."""
    SKIP = {"script", "style", "noscript", "template", "head"}
    BREAK = {"p", "div", "li", "tr", "pre", "br", "section", "article", "blockquote", "table", "ul", "ol", "dd",
             "dt", "hr", "main", "header", "footer", "nav", "aside", "h1", "h2", "h3", "h4", "h5", "h6", "title"}

    def __init__(self):
        super().__init__(convert_charrefs=True)
        self.blocks: list[Block] = []
        self.skip = 0
        self.heading = 0
        self.parts: list[str] = []
        self.start = 1

    def flush(self):
        text = re.sub(r"\s+", " ", "".join(self.parts)).strip()
        if text:
            self.blocks.append(Block(self.heading, [(self.start, text)]))
        self.parts = []

    def handle_starttag(self, tag, attrs):
        if tag in self.SKIP:
            self.skip += 1
        elif tag in self.BREAK:
            self.flush()
            self.heading = int(tag[1]) if re.fullmatch(r"h[1-6]", tag) else 0

    def handle_endtag(self, tag):
        if tag in self.SKIP:
            self.skip = max(0, self.skip - 1)
        elif tag in self.BREAK:
            self.flush()
            self.heading = 0

    def handle_data(self, data):
        if self.skip:
            return
        if data.strip() and not "".join(self.parts).strip():  # the block starts at its first visible character
            self.start = self.getpos()[0] + data[:len(data) - len(data.lstrip())].count("\n")
        self.parts.append(data)


def html_blocks(text: str) -> list[Block]:
    parser = _HTMLBlocks()
    parser.feed(text)
    parser.close()
    parser.flush()
    return parser.blocks


def _pdf_blocks(path: Path) -> list[Block]:
    try:
        import pypdf
    except ImportError as e:
        raise ImportError("reading PDF needs pypdf: pip install 'slmkit[kb]'") from e
    try:
        reader = pypdf.PdfReader(str(path))
        pages = [page.extract_text() or "" for page in reader.pages]
    except Exception as e:  # pypdf raises its own error classes for broken files
        raise ValueError(f"{path}: not a readable PDF ({type(e).__name__}: {e})") from None
    blocks, line = [], 0
    for n, page in enumerate(pages, 1):
        lines = page.splitlines()
        blocks.append(Block(1, [(line + 1, f"page {n}")]))
        blocks += _paragraphs(enumerate(lines, line + 1))
        line += len(lines)
    return blocks


def _jsonl_blocks(path: Path) -> list[Block]:
    """One record a line: its text field (`text`, `content` or `body`) under a heading from `title`/`heading`/`id`
    (empty when it has none)."""
    blocks = []
    for n, record in iter_jsonl(path):
        text = next((record[f] for f in JSONL_TEXT_FIELDS if isinstance(record.get(f), str)), None)
        if text is None:
            raise ValueError(f"{path}:{n}: no text field; give each record one of "
                             f"{', '.join(JSONL_TEXT_FIELDS)} (a string)")
        title = next((str(record[f]) for f in JSONL_TITLE_FIELDS if record.get(f) not in (None, "")), None)
        blocks.append(Block(1, [(n, title or "")]))  # a record is its own section, titled or not
        blocks.append(Block(0, [(n, line) for line in text.splitlines() if line.strip()] or [(n, "")]))
    return blocks


def write_pydoc_topics(out: Path) -> Path:
    """One `KEY.md` per topic of this Python's `pydoc_data.topics` in `out` (rewritten only when its text
    changed, so a re-index skips it); a file of a topic this Python lacks is removed."""
    from pydoc_data.topics import topics
    out.mkdir(parents=True, exist_ok=True)
    for key, text in sorted(topics.items()):
        path = out / f"{key}.md"
        md = rst_titles_to_markdown(text)
        if not path.exists() or path.read_text(encoding="utf-8") != md:
            atomic_write_text(path, md)
    for path in out.glob("*.md"):
        if path.stem not in topics:
            path.unlink()
    return out


_UNDERLINES = {"*": 1, "=": 2, "-": 3, "~": 4, "^": 5}


def rst_titles_to_markdown(text: str) -> str:
    """pydoc's plain text marks titles by underlining them (`****` over a chapter, `====`, `----` below): make
    those Markdown headings, keeping every other line (and the line count) as it is."""
    lines = text.splitlines()
    out = list(lines)
    for i in range(1, len(lines)):
        under, title = lines[i].rstrip(), lines[i - 1].strip()
        if (title and under and under[0] in _UNDERLINES and set(under) == {under[0]}
                and len(under) == len(lines[i - 1].rstrip()) and not lines[i - 1].startswith(" ")):
            out[i - 1] = "#" * _UNDERLINES[under[0]] + " " + title
            out[i] = ""
    return "\n".join(out) + "\n"
