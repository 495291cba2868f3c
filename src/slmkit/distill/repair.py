"""`slm synth repair`: line-repair pairs made by corrupting real code (FLAME, Joshi et al. 2023; SLaDe,
Armengol-Estapé et al. 2024: small domain models trained on pairs that a checker, not a teacher, vouches for).

No teacher: each line is broken on purpose and the compiler is the judge. From every .py file of a corpus (this
Python's standard library by default, or a directory the user names) a few lines are corrupted, one corruption
kind each:

    drop_bracket       one ( ) [ ] { } removed
    duplicate_bracket  one ( ) [ ] { } doubled
    wrong_operator     == -> =, != -> =!, <= -> =<, >= -> =>, -> -> =>, ** -> ^^, and/or/not -> && || !
    misspelled_name    a name that is read (not assigned) gets two letters swapped, one dropped or one doubled
    missing_colon      the colon that ends an if/for/def/... header removed
    wrong_indentation  the line indented one level (4 spaces) more or less

A pair is kept only if the original file compiles and the corrupted one does not (`compile()`); the same holds
for the line's unit (its innermost def/class, at most `max_unit_lines` long), which the record carries so that an
evaluation can put a predicted line back and compile it without the whole file. A misspelled name still compiles,
so that kind is checked by name resolution instead: the new name must occur nowhere in the file (no assignment,
import, parameter or attribute could bind it) and not be a builtin, and files with `from m import *` are skipped
(a star import could bind anything). Such a name is unbound in every scope, so running the line raises NameError.

Records (records.jsonl: training files; heldout.jsonl: the held-out files, split by file, and by a hash of the
file's content so that no copy of a held-out file leaks into training):

    {"prompt": the broken line in its context (a few lines before/after) and the broken line again,
     "completion": the fixed (original) line, "kind", "source" (file, relative to the corpus), "line" (1-based),
     "broken", "unit" (the original unit's text), "unit_line" (0-based index of the line in the unit)}

`prompt` / `completion` are what `slm finetune` reads; heldout.jsonl is a `repair` evaluation task's items
(eval/tasks.py). Everything is deterministic from --seed: each file draws its corruptions from its own
Random(seed, path), so the output does not depend on the order or number of files read before it. Progress is
saved after every file: run the same command again to continue.
"""

from __future__ import annotations

import builtins
import hashlib
import io
import json
import keyword
import random
import tokenize
from dataclasses import dataclass
from pathlib import Path

from tqdm import tqdm

from slmkit.eval.repair import compiles, unit_source
from slmkit.files import atomic_write_json

KINDS = ("drop_bracket", "duplicate_bracket", "wrong_operator", "misspelled_name", "missing_colon",
         "wrong_indentation")
BRACKETS = set("()[]{}")
WRONG_OPERATORS = {"==": "=", "!=": "=!", "<=": "=<", ">=": "=>", "->": "=>", "**": "^^", "and": "&&",
                   "or": "||", "not": "!"}
HEADERS = {"if", "elif", "else", "for", "while", "def", "class", "try", "except", "finally", "with", "async"}
PROMPT = "### Code\n{context}\n### Broken line\n{broken}\n### Fixed line\n"
INDENT = "    "


@dataclass
class RepairConfig:
    out: str
    corpus: str | None = None  # a directory of .py files (default: this Python's standard library)
    per_file: int = 8  # corruptions tried per file (one line each; the kinds in turn, each on a line it fits)
    heldout: float = 0.1  # share of files held out
    context_lines: int = 3  # lines before and after the broken line in the prompt
    max_line_chars: int = 100
    max_prompt_chars: int = 800  # the quickstart model reads 256 tokens
    max_unit_lines: int = 80
    kinds: tuple[str, ...] = KINDS
    seed: int = 0

    def __post_init__(self):
        unknown = [k for k in self.kinds if k not in KINDS]
        if unknown:
            raise ValueError(f"unknown corruption kinds {unknown}; choose from {', '.join(KINDS)}")
        if not self.kinds:
            raise ValueError("no corruption kinds given")
        if not 0 <= self.heldout < 1:
            raise ValueError(f"heldout {self.heldout}: the held-out share of files must be in [0, 1)")
        if self.per_file < 1 or self.context_lines < 0:
            raise ValueError("per_file must be >= 1 and context_lines >= 0")


def corpus_files(corpus: str | None) -> tuple[Path, list[Path]]:
    """(root, its .py files in a fixed order); the stdlib without its tests when corpus is None."""
    if corpus is None:
        from slmkit.data.stdlib import STDLIB_EXCLUDE, stdlib_dir
        root = stdlib_dir()
        excluded = [g.strip("*/") for g in STDLIB_EXCLUDE]
        files = [p for p in root.rglob("*.py") if not set(p.relative_to(root).parts[:-1]) & set(excluded)]
    else:
        root = Path(corpus)
        if not root.is_dir():
            raise FileNotFoundError(f"{root}: corpus directory not found (a directory of .py files)")
        files = list(root.rglob("*.py"))
    files = sorted(p for p in files if p.is_file())
    if not files:
        raise ValueError(f"{root}: no .py files in the corpus directory")
    return root, files


def is_heldout(path: Path, share: float, seed: int) -> bool:
    """Whether a file is held out: by a hash of its content, so that copies of one file (the stdlib has a few)
    land on the same side of the split."""
    digest = hashlib.sha256(str(seed).encode() + b"/" + path.read_bytes()).digest()
    return int.from_bytes(digest[:8], "big") / 2 ** 64 < share


# ---- one file ------------------------------------------------------------------------------------------

@dataclass
class _File:
    text: str
    lines: list[str]
    tokens: dict[int, list[tokenize.TokenInfo]]  # 1-based line -> its tokens (a line's first token starts it)
    loads: set[tuple[int, int]]  # (line, col) of names that are read
    names: set[str]  # every NAME token of the file
    units: dict[int, tuple[int, int]]  # 1-based line -> its innermost def/class (first, last line)
    string_lines: set[int]  # lines inside a multi-line string (docstrings): never corrupted
    star_import: bool


def _read(path: Path) -> _File | str:
    """The parsed file, or why it was skipped."""
    import ast
    try:
        text = path.read_text(encoding="utf-8")
    except (UnicodeDecodeError, OSError):
        return "unreadable"
    if not compiles(text):
        return "original_does_not_compile"
    tree = ast.parse(text)
    toks: dict[int, list[tokenize.TokenInfo]] = {}
    names, string_lines = set(), set()
    try:
        for tok in tokenize.generate_tokens(io.StringIO(text).readline):
            if tok.type == tokenize.NAME:
                names.add(tok.string)
            if tok.type == tokenize.STRING and tok.end[0] > tok.start[0]:
                string_lines.update(range(tok.start[0], tok.end[0] + 1))
            if tok.type not in (tokenize.NL, tokenize.NEWLINE, tokenize.INDENT, tokenize.DEDENT,
                                tokenize.COMMENT, tokenize.ENDMARKER):
                toks.setdefault(tok.start[0], []).append(tok)
    except (tokenize.TokenError, SyntaxError):
        return "untokenizable"
    loads = {(n.lineno, n.col_offset) for n in ast.walk(tree)
             if isinstance(n, ast.Name) and isinstance(n.ctx, ast.Load)}
    star = any(isinstance(n, ast.ImportFrom) and any(a.name == "*" for a in n.names) for n in ast.walk(tree))
    units: dict[int, tuple[int, int]] = {}
    defs = [n for n in ast.walk(tree) if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef))]
    for node in sorted(defs, key=lambda n: n.end_lineno - n.lineno, reverse=True):  # inner defs overwrite
        first = min([node.lineno] + [d.lineno for d in node.decorator_list])
        for line in range(first, node.end_lineno + 1):
            units[line] = (first, node.end_lineno)
    return _File(text, text.split("\n"), toks, loads, names, units, string_lines, star)


def _replace(line: str, start: int, end: int, new: str) -> str:
    return line[:start] + new + line[end:]


def _corrupt(f: _File, lineno: int, kind: str, rng: random.Random) -> str | None:
    """The line broken in this way, or None when the line offers no place for it."""
    line = f.lines[lineno - 1]
    toks = [t for t in f.tokens.get(lineno, []) if t.start[0] == t.end[0] == lineno]
    if kind in ("drop_bracket", "duplicate_bracket"):
        spots = [t for t in toks if t.type == tokenize.OP and t.string in BRACKETS]
        if not spots:
            return None
        t = rng.choice(spots)
        return _replace(line, t.start[1], t.end[1], "" if kind == "drop_bracket" else t.string * 2)
    if kind == "wrong_operator":
        spots = [t for t in toks if t.string in WRONG_OPERATORS and t.type in (tokenize.OP, tokenize.NAME)]
        if not spots:
            return None
        t = rng.choice(spots)
        return _replace(line, t.start[1], t.end[1], WRONG_OPERATORS[t.string])
    if kind == "misspelled_name":
        if f.star_import:
            return None
        spots = [t for t in toks if t.type == tokenize.NAME and (lineno, t.start[1]) in f.loads and len(t.string) >= 4]
        rng.shuffle(spots)
        for t in spots:
            name = _misspell(t.string, rng)
            if name and name not in f.names and not hasattr(builtins, name):
                return _replace(line, t.start[1], t.end[1], name)
        return None
    if kind == "missing_colon":
        if not toks or toks[0].string not in HEADERS or toks[-1].string != ":":
            return None
        t = toks[-1]
        return _replace(line, t.start[1], t.end[1], "")
    if kind == "wrong_indentation":
        body = line.lstrip(" ")
        if "\t" in line[: len(line) - len(body)]:
            return None
        indent = len(line) - len(body)
        if indent >= len(INDENT) and rng.random() < 0.5:
            return line[len(INDENT):]
        return INDENT + line
    raise AssertionError(kind)


def _misspell(name: str, rng: random.Random) -> str | None:
    i = rng.randrange(1, len(name) - 1)  # never the first letter: the name stays recognisable
    how = rng.choice(("swap", "drop", "double"))
    if how == "swap":
        new = name[:i] + name[i + 1] + name[i] + name[i + 2:]
    elif how == "drop":
        new = name[:i] + name[i + 1:]
    else:
        new = name[:i] + name[i] + name[i:]
    return new if new != name and new.isidentifier() and not keyword.iskeyword(new) else None


def file_pairs(path: Path, relpath: str, cfg: RepairConfig) -> tuple[list[dict], dict[str, int]]:
    """(kept records, rejection counts) for one file."""
    parsed = _read(path)
    if isinstance(parsed, str):
        return [], {parsed: 1}
    f = parsed
    rng = random.Random(f"{cfg.seed}/{relpath}")
    candidates = [n for n in sorted(f.units) if n not in f.string_lines and f.lines[n - 1].strip()
                  and not f.lines[n - 1].lstrip().startswith("#") and len(f.lines[n - 1]) <= cfg.max_line_chars
                  and f.units[n][1] - f.units[n][0] < cfg.max_unit_lines]
    rng.shuffle(candidates)
    kept, rejected, tried, absent = [], {}, set(), set()
    attempts, turn = 0, rng.randrange(len(cfg.kinds))  # the kinds in turn, from a random first one
    while attempts < cfg.per_file and len(absent) < len(cfg.kinds):
        kind = cfg.kinds[turn % len(cfg.kinds)]
        turn += 1
        if kind in absent:
            continue
        # the next untried line that has a place for this kind; none left: the kind is done for this file
        found = next(((n, b) for n in candidates if n not in tried
                      for b in [_corrupt(f, n, kind, rng)] if b is not None), None)
        if found is None:
            absent.add(kind)
            continue
        lineno, broken = found
        tried.add(lineno)
        attempts += 1
        reason = _check(f, lineno, broken, kind)
        if reason:
            rejected[reason] = rejected.get(reason, 0) + 1
            continue
        record = _record(f, lineno, broken, kind, relpath, cfg)
        if len(record["prompt"]) > cfg.max_prompt_chars:
            rejected["prompt_too_long"] = rejected.get("prompt_too_long", 0) + 1
            continue
        kept.append(record)
    return kept, rejected


def _check(f: _File, lineno: int, broken: str, kind: str) -> str | None:
    first, last = f.units[lineno]
    unit = f.lines[first - 1:last]
    if not compiles(unit_source(unit)):
        return "unit_does_not_compile_alone"
    corrupted = f.lines[:lineno - 1] + [broken] + f.lines[lineno:]
    broken_unit = unit_source(unit[:lineno - first] + [broken] + unit[lineno - first + 1:])
    if kind == "misspelled_name":  # compiles; _corrupt checked that the new name resolves nowhere
        return None
    if compiles("\n".join(corrupted)) or compiles(broken_unit):
        return "corruption_compiles"
    return None


def _record(f: _File, lineno: int, broken: str, kind: str, relpath: str, cfg: RepairConfig) -> dict:
    first, last = f.units[lineno]
    before = f.lines[max(0, lineno - 1 - cfg.context_lines):lineno - 1]
    after = f.lines[lineno:lineno + cfg.context_lines]
    context = "\n".join(before + [broken] + after)
    return {"prompt": PROMPT.format(context=context, broken=broken), "completion": f.lines[lineno - 1],
            "kind": kind, "source": relpath, "line": lineno, "broken": broken,
            "unit": "\n".join(f.lines[first - 1:last]), "unit_line": lineno - first}


# ---- the whole corpus ----------------------------------------------------------------------------------

def synthesize_repair(cfg: RepairConfig, progress: bool = True, log=print) -> dict:
    """Corrupt every file of the corpus (resuming an interrupted run in cfg.out); returns report.json's content."""
    out = Path(cfg.out)
    root, files = corpus_files(cfg.corpus)
    settings = {"recipe": "repair", "corpus": str(root), "per_file": cfg.per_file, "heldout": cfg.heldout,
                "context_lines": cfg.context_lines, "max_line_chars": cfg.max_line_chars,
                "max_prompt_chars": cfg.max_prompt_chars, "max_unit_lines": cfg.max_unit_lines,
                "kinds": list(cfg.kinds), "seed": cfg.seed}
    state = {"files_done": 0, "train": 0, "heldout": 0, "train_files": 0, "heldout_files": 0, "rejected": {},
             "kinds": {}}
    names = ("records.jsonl", "heldout.jsonl")
    if (out / "progress.json").exists():
        prev = json.loads((out / "progress.json").read_text())
        if prev["settings"] != settings:
            raise ValueError(f"{out} holds an unfinished run with other settings; use another -o")
        state = prev["state"]
        from slmkit.distill.synth import _truncate_lines
        _truncate_lines(out / names[0], state["train"])
        _truncate_lines(out / names[1], state["heldout"])
        log(f"resuming at file {state['files_done']:,} of {len(files):,}")
    elif (out / "report.json").exists():
        raise FileExistsError(f"{out} already holds a finished run; choose another -o")
    else:
        out.mkdir(parents=True, exist_ok=True)
        for name in names:
            (out / name).write_text("")
    bar = tqdm(total=len(files), initial=state["files_done"], unit="file", disable=not progress, desc="repair")
    try:
        for index in range(state["files_done"], len(files)):
            relpath = files[index].relative_to(root).as_posix()
            kept, rejected = file_pairs(files[index], relpath, cfg)
            split = "heldout" if is_heldout(files[index], cfg.heldout, cfg.seed) else "train"
            with open(out / names[split == "heldout"], "a", encoding="utf-8") as fh:
                for rec in kept:
                    fh.write(json.dumps(rec, ensure_ascii=False) + "\n")
                fh.flush()
            state[split] += len(kept)
            state[split + "_files"] += bool(kept)
            for rec in kept:
                state["kinds"][rec["kind"]] = state["kinds"].get(rec["kind"], 0) + 1
            for reason, n in rejected.items():
                state["rejected"][reason] = state["rejected"].get(reason, 0) + n
            state["files_done"] = index + 1
            atomic_write_json(out / "progress.json", {"settings": settings, "state": state})
            bar.update(1)
            bar.set_postfix_str(f"train {state['train']:,}, held out {state['heldout']:,}")
    finally:
        bar.close()
    report = {"recipe": "repair", "files": len(files), "kept": state["train"] + state["heldout"],
              "train": state["train"], "heldout": state["heldout"], "train_files": state["train_files"],
              "heldout_files": state["heldout_files"], "kinds": state["kinds"], "rejected": state["rejected"],
              "settings": settings}
    atomic_write_json(out / "report.json", report)
    (out / "progress.json").unlink(missing_ok=True)
    log(f"repair: {state['train']:,} training pairs -> {out}/records.jsonl, {state['heldout']:,} held-out pairs "
        f"-> {out}/heldout.jsonl (from {len(files):,} files); rejected {state['rejected']}")
    return report
