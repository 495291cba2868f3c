"""Synthetic data from a teacher: `slm synth RECIPE --teacher T --seeds FILE -o DIR`.

Recipes (one seed per line of a .txt file, or one JSONL record per line):
- textbook (phi-1.5, Gunasekar et al. / Li et al. 2023): topic -> a textbook-style lesson with exercises and
  solutions; record {"text", "topic"}.
- explain (Orca 2, Mitra et al. 2023): question x strategy system prompt ("think step by step", "answer
  directly", ...) -> the answer; the record is a chat WITHOUT the strategy prompt (prompt erasure: the student
  learns to pick the strategy itself); {"messages", "strategy"}.
- program (TinyGSM, Liu et al. 2023): word problem -> a Python program that prints the answer, run in the
  sandbox (eval/sandbox.py); kept only if it runs to its end (an early sys.exit/os._exit is a failure) and prints a
  final line; when the seed has an "answer", only if that line (or the last number in it) matches it; {"question",
  "program", "answer", "checked"}. The teacher is
  shown one worked problem and its reply starts inside a ```python block, stopping at the closing fence: a small
  teacher asked for code often answers in prose instead (SmolLM2-135M: 0 of 64 programs usable without this).
- instruct: instruction -> response, for supervised fine-tuning; {"messages"}.
- repair (FLAME / SLaDe): no teacher and no seeds: lines of a code corpus (`--corpus DIR`, default the stdlib)
  broken on purpose and kept when the compiler confirms the break; {"prompt", "completion", ...}. See
  distill/repair.py, which also writes heldout.jsonl (held-out files).

Every record passes quality filters (length, repetition, language: the share of ASCII letters), exact +
MinHash near-duplicate removal (data/dedup.py), and decontamination: any record sharing a word n-gram (13 by
default, as in GPT-3's decontamination) with an evaluation set (`--decontaminate gsm8k,humaneval,FILE.jsonl`) is
dropped and listed in report.json with the n-gram and the evaluation item it matched.

Output: records.jsonl (kept), rejected.jsonl (with the reason), report.json (counts, teacher tokens/s,
decontamination hits). Progress is saved after every seed: run the same command again to continue.
"""

from __future__ import annotations

import itertools
import json
import re
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from tqdm import tqdm

from slmkit.files import atomic_write_json, atomic_write_text, iter_jsonl

RECIPES = ("textbook", "explain", "program", "instruct", "repair")
STRATEGIES = {
    "step-by-step": "Think step by step: work through the problem one step at a time, then state the answer.",
    "direct": "Answer directly and concisely, without explanation.",
    "explain-then-answer": "First explain the key idea in one or two sentences, then give the answer.",
}
PROMPTS = {
    "textbook": "Write a short textbook section that teaches {seed} to a student. Explain the idea clearly with a "
                "worked example, then give two exercises with their solutions.",
    "explain": "{seed}",
    "program": "Write a Python program that solves this problem and prints only the final numeric answer.\n\n"
               "Problem: {seed}\n\nReply with one ```python code block.",
    "instruct": "{seed}",
}
# The program recipe's one worked example (a turn before the real problem) and where its reply starts.
PROGRAM_EXAMPLE = ("Anna has 7 apples. She buys 5 more and eats 2. How many apples does she have now?",
                   "apples = 7\nbought = 5\neaten = 2\nresult = apples + bought - eaten\nprint(result)\n")
CODE_FENCE = "```python\n"
WORD = re.compile(r"\w+")
NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?")


@dataclass
class SynthConfig:
    recipe: str
    teacher: str | None = None  # every recipe but repair
    seeds: str | None = None  # .txt (one seed per line) or .jsonl (field `seed_field`, plus "answer" for program)
    out: str = ""
    seed_field: str = "text"
    samples_per_seed: int = 1
    temperature: float = 0.8
    top_p: float = 0.95
    max_new_tokens: int = 512
    strategies: list[str] = field(default_factory=lambda: list(STRATEGIES))  # explain
    min_chars: int = 20
    max_chars: int = 20000
    max_repetition: float = 0.5  # drop texts with more than this share in repeated lines / word 3-grams
    min_ascii_letters: float = 0.0  # language filter: share of letters that are ASCII (0.9 ~ English only)
    near_dup_threshold: float = 0.8
    decontaminate: list[str] = field(default_factory=list)  # eval task names / JSONL / task YAML files
    ngram: int = 13
    timeout_s: float = 10.0  # program: sandbox limit per program
    backend: str = "auto"
    seed: int = 0
    allow_unsandboxed: bool = False  # program: run even without the sandbox's network namespace (not a setting)
    # repair (distill/repair.py)
    corpus: str | None = None  # a directory of .py files (default: this Python's standard library)
    per_file: int = 8
    heldout: float = 0.1
    context_lines: int = 3

    def __post_init__(self):
        if self.recipe not in RECIPES:
            raise ValueError(f"unknown recipe {self.recipe!r}; choose one of {', '.join(RECIPES)}")
        if not self.out:
            raise ValueError("no output directory (-o/--out)")
        if self.recipe != "repair":
            for name in ("teacher", "seeds"):
                if not getattr(self, name):
                    raise ValueError(f"the {self.recipe} recipe needs --{name} (only repair works without one)")
        unknown = [s for s in self.strategies if s not in STRATEGIES]
        if unknown:
            raise ValueError(f"unknown strategies {unknown}; choose from {', '.join(STRATEGIES)}")


def read_seeds(path: str | Path, field_name: str = "text") -> list[dict]:
    """Seeds as {"seed": text, ...the record's other fields}; a bad line is reported as file:line."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path}: seeds file not found")
    if path.suffix != ".jsonl":
        seeds = []
        with open(path, "rb") as f:  # line by line, not the whole file at once
            for n, raw in enumerate(f, 1):
                try:
                    line = raw.decode("utf-8-sig" if n == 1 else "utf-8").strip()
                except UnicodeDecodeError:
                    raise ValueError(f"{path}:{n}: invalid UTF-8; re-encode the file as UTF-8 (e.g. iconv)") from None
                if line:
                    seeds.append({"seed": line})
    else:
        seeds = []
        for n, rec in iter_jsonl(path):
            if not isinstance(rec, dict) or not isinstance(rec.get(field_name), str):
                raise ValueError(f"{path}:{n}: missing text field {field_name!r} (set --seed-field)")
            seeds.append({**rec, "seed": rec[field_name]})
    if not seeds:
        raise ValueError(f"{path}: no seeds")
    return seeds


# ---- quality filters -----------------------------------------------------------------------------------

def repetition(text: str) -> float:
    """Share of the text inside repeats (Gopher's heuristics, Rae et al. 2021): the larger of the share of lines
    that repeat an earlier line and the share of words covered by a word 3-gram that occurs more than once.
    A degenerate loop scores near 1; ordinary prose near 0."""
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    words = WORD.findall(text.lower())
    worst = 0.0
    if len(lines) >= 4:
        worst = 1 - len(set(lines)) / len(lines)
    if len(words) >= 12:
        grams = [tuple(words[i:i + 3]) for i in range(len(words) - 2)]
        counts: dict[tuple, int] = {}
        for g in grams:
            counts[g] = counts.get(g, 0) + 1
        covered = set()
        for i, g in enumerate(grams):
            if counts[g] > 1:
                covered.update((i, i + 1, i + 2))
        worst = max(worst, len(covered) / len(words))
    return worst


def ascii_letter_share(text: str) -> float:
    letters = [c for c in text if c.isalpha()]
    return sum(c.isascii() for c in letters) / len(letters) if letters else 0.0


def quality_problem(text: str, cfg: SynthConfig) -> str | None:
    if len(text.strip()) < cfg.min_chars:
        return "too_short"
    if len(text) > cfg.max_chars:
        return "too_long"
    if repetition(text) > cfg.max_repetition:
        return "repetitive"
    if cfg.min_ascii_letters and ascii_letter_share(text) < cfg.min_ascii_letters:
        return "language"
    return None


# ---- decontamination -----------------------------------------------------------------------------------

class Decontaminator:
    """Word n-grams of evaluation items; a text sharing any of them is contaminated."""

    def __init__(self, specs: list[str], n: int = 13):
        from slmkit.eval.tasks import load_task
        self.n = n
        self.index: dict[tuple, str] = {}
        self.sources = []
        for spec in specs:
            task = load_task(spec)
            for i, item in enumerate(task.items):
                text = " ".join(str(v) for v in item.values() if isinstance(v, (str, list)))
                for g in self.ngrams(text):
                    self.index.setdefault(g, f"{task.name}:{item.get('id', i)}")
            self.sources.append({"task": task.name, "items": len(task.items)})

    def ngrams(self, text: str) -> set[tuple]:
        words = WORD.findall(text.lower())
        return {tuple(words[i:i + self.n]) for i in range(len(words) - self.n + 1)}

    def match(self, text: str) -> dict | None:
        for g in self.ngrams(text):
            if g in self.index:
                return {"ngram": " ".join(g), "eval_item": self.index[g]}
        return None


# ---- the recipes ---------------------------------------------------------------------------------------

def extract_code(text: str) -> str:
    """The first ```python block of a reply (or the whole reply when it has no fence)."""
    m = re.search(r"```(?:python|py)?\s*\n(.*?)(```|$)", text, flags=re.S)
    return (m.group(1) if m else text).strip()


def _same_answer(a: str, b: str) -> bool:
    def norm(s):
        s = s.strip().replace(",", "").rstrip(".")
        try:
            return float(s)
        except ValueError:
            return s.lower()
    return norm(a) == norm(b)


def _ask(lm, prompt: str, cfg: SynthConfig, seed: int, system: str | None = None,
         example: tuple[str, str] | None = None, reply_prefix: str = "", stop: list[str] | None = None
         ) -> tuple[str, int]:
    """(reply, tokens it took): through the chat template when the teacher is a chat model. `example` is one
    (prompt, reply) turn shown first; the teacher's reply starts after `reply_prefix` (returned without it)."""
    from slmkit.sampling import SamplingParams
    params = SamplingParams(max_new_tokens=cfg.max_new_tokens, temperature=cfg.temperature, top_p=cfg.top_p,
                            seed=seed, stop=list(stop or []))
    tok = lm.tokenizer
    turns = [example, (prompt, None)] if example else [(prompt, None)]
    if lm.instruction_tuned and tok is not None and tok.chat_template:
        messages = [{"role": "system", "content": system}] if system else []
        for user, assistant in turns:
            messages.append({"role": "user", "content": user})
            if assistant is not None:
                messages.append({"role": "assistant", "content": reply_prefix + assistant + _closing(stop)})
        text = tok.apply_chat_template(messages, add_generation_prompt=True)
    else:
        text = (system + "\n\n" if system else "") + "".join(
            user + "\n" + (reply_prefix + assistant + _closing(stop) + "\n\n" if assistant is not None else "")
            for user, assistant in turns)
    reply = lm.generate([text + reply_prefix], params)[0]
    return reply, len(tok.encode(reply)) if tok is not None else len(reply) // 4


def _closing(stop: list[str] | None) -> str:
    return stop[0] if stop else ""


def final_answer(line: str) -> str:
    """A printed line's answer: the line itself when it is a number, else the last number in it
    ("There are 96 chairs." -> "96"), else the line."""
    line = line.strip()
    if NUMBER.fullmatch(line.rstrip(".")):
        return line
    numbers = NUMBER.findall(line)
    return numbers[-1].rstrip(".") if numbers else line


def make_records(lm, seed: dict, cfg: SynthConfig, draw: int) -> tuple[list[dict], int]:
    """(candidate records, teacher tokens) for one seed: each still has to pass the filters."""
    records, tokens = [], 0
    prompt = PROMPTS[cfg.recipe].format(seed=seed["seed"])
    if cfg.recipe == "explain":
        for k, name in enumerate(cfg.strategies):
            reply, n = _ask(lm, prompt, cfg, draw * 101 + k, system=STRATEGIES[name])
            tokens += n
            records.append({"messages": [{"role": "user", "content": seed["seed"]},
                                         {"role": "assistant", "content": reply.strip()}], "strategy": name,
                            "_text": reply})
        return records, tokens
    if cfg.recipe == "program":
        example = (PROMPTS["program"].format(seed=PROGRAM_EXAMPLE[0]), PROGRAM_EXAMPLE[1])
        reply, tokens = _ask(lm, prompt, cfg, draw, example=example, reply_prefix=CODE_FENCE, stop=["```"])
        return [_checked_program(CODE_FENCE + reply, seed, cfg)], tokens
    reply, tokens = _ask(lm, prompt, cfg, draw)
    if cfg.recipe == "textbook":
        return [{"text": reply.strip(), "topic": seed["seed"], "_text": reply}], tokens
    if cfg.recipe == "instruct":
        return [{"messages": [{"role": "user", "content": seed["seed"]},
                              {"role": "assistant", "content": reply.strip()}], "_text": reply}], tokens
    raise AssertionError(cfg.recipe)


def _checked_program(reply: str, seed: dict, cfg: SynthConfig) -> dict:
    """The reply's program, run in the sandbox: a record, with "_reject" set when it fails a check."""
    program = extract_code(reply)
    rec = {"question": seed["seed"], "program": program, "_text": program}
    from slmkit.eval.sandbox import run_python
    # as a script: a teacher's `if __name__ == "__main__": print(solve())` is how it prints its answer
    result = run_python(program, timeout_s=cfg.timeout_s, allow_unsandboxed=cfg.allow_unsandboxed, as_main=True)
    lines = [line for line in result.stdout.strip().splitlines() if line.strip()]
    if not result.passed:
        rec["_reject"] = f"program_{result.status}"
    elif not lines:
        rec["_reject"] = "program_no_output"
    else:
        rec["answer"] = final_answer(lines[-1])
        rec["checked"] = "answer" in seed
        if "answer" in seed and not _same_answer(rec["answer"], str(seed["answer"])):
            rec["_reject"] = "program_wrong_answer"
            rec["expected"] = str(seed["answer"])
    return rec


def synthesize(cfg: SynthConfig, lm=None, progress: bool = True, log=print) -> dict:
    """Run a recipe over every seed (resuming an interrupted run in cfg.out); returns report.json's content."""
    if cfg.recipe == "repair":
        from slmkit.distill.repair import RepairConfig, synthesize_repair
        return synthesize_repair(RepairConfig(out=cfg.out, corpus=cfg.corpus, per_file=cfg.per_file,
                                              heldout=cfg.heldout, context_lines=cfg.context_lines, seed=cfg.seed),
                                 progress=progress, log=log)
    from slmkit.data.dedup import Deduplicator
    out = Path(cfg.out)
    seeds = read_seeds(cfg.seeds, cfg.seed_field)
    settings = {k: v for k, v in asdict(cfg).items() if k not in ("out", "allow_unsandboxed")}
    if cfg.recipe == "program":  # before the teacher loads
        from slmkit.eval.sandbox import require_isolation
        require_isolation(cfg.allow_unsandboxed)
    decon = Decontaminator(cfg.decontaminate, cfg.ngram) if cfg.decontaminate else None
    if lm is None:
        # the whole job is decoding: "auto" takes llama.cpp when installed (SmolLM2-135M on 2 cores: ~10 tokens/s
        # batch-1 in torch fp32, several times that through llama.cpp's quantized GGUF)
        from slmkit.lm import generation_backend, load_lm
        backend, model_arg, options = generation_backend(cfg.teacher, cfg.backend, "cpu")
        lm = load_lm(model_arg, backend=backend, **options)
        log(f"teacher: {cfg.teacher} through {type(lm).__name__}")
    state = {"seeds_done": 0, "teacher_tokens": 0, "teacher_seconds": 0.0, "kept": 0, "rejected": {},
             "contaminated": []}
    dedup = Deduplicator(cfg.near_dup_threshold)
    if (out / "progress.json").exists():
        prev = json.loads((out / "progress.json").read_text())
        if prev["settings"] != settings:
            raise ValueError(f"{out} holds an unfinished run with other settings; use another -o")
        state = prev["state"]
        kept = _read_lines(out / "records.jsonl", state["kept"])
        _truncate_lines(out / "records.jsonl", state["kept"])
        _truncate_lines(out / "rejected.jsonl", sum(state["rejected"].values()))
        dedup.check([r.get("text") or r.get("program") or json.dumps(r.get("messages")) for r in kept])
        log(f"resuming at seed {state['seeds_done']:,} of {len(seeds):,} ({state['kept']:,} records kept)")
    elif (out / "report.json").exists():
        raise FileExistsError(f"{out} already holds a finished run; choose another -o")
    else:
        out.mkdir(parents=True, exist_ok=True)
        for name in ("records.jsonl", "rejected.jsonl"):
            (out / name).write_text("")
    bar = tqdm(total=len(seeds), initial=state["seeds_done"], unit="seed", disable=not progress, desc=cfg.recipe)
    try:
        for index in range(state["seeds_done"], len(seeds)):
            for sample in range(cfg.samples_per_seed):
                t0 = time.perf_counter()
                candidates, tokens = make_records(lm, seeds[index], cfg, cfg.seed * 1_000_003 + index * 97 + sample)
                state["teacher_seconds"] += time.perf_counter() - t0
                state["teacher_tokens"] += tokens
                for rec in candidates:
                    _judge(rec, cfg, dedup, decon, state, out)
            state["seeds_done"] = index + 1
            atomic_write_json(out / "progress.json", {"settings": settings, "state": state})
            bar.update(1)
            speed = state["teacher_tokens"] / max(state["teacher_seconds"], 1e-9)
            bar.set_postfix_str(f"kept {state['kept']:,}, {speed:,.0f} teacher tok/s")
    finally:
        bar.close()
    report = {"recipe": cfg.recipe, "teacher": cfg.teacher, "seeds": len(seeds), "kept": state["kept"],
              "rejected": state["rejected"], "teacher_tokens": state["teacher_tokens"],
              "teacher_tokens_per_s": round(state["teacher_tokens"] / max(state["teacher_seconds"], 1e-9), 1),
              "decontamination": {"ngram": cfg.ngram, "sources": decon.sources if decon else [],
                                  "removed": state["contaminated"]}, "settings": settings}
    atomic_write_json(out / "report.json", report)
    (out / "progress.json").unlink(missing_ok=True)
    log(f"{cfg.recipe}: {state['kept']:,} records kept from {len(seeds):,} seeds; rejected {state['rejected']}; "
        f"{len(state['contaminated'])} contaminated -> {out}/records.jsonl")
    return report


def _judge(rec: dict, cfg: SynthConfig, dedup, decon, state: dict, out: Path) -> None:
    text = rec.pop("_text")
    reason = rec.pop("_reject", None) or quality_problem(text, cfg)
    if reason is None:
        key = rec.get("text") or rec.get("program") or json.dumps(rec.get("messages"))
        reason = {"exact": "exact_duplicate", "near": "near_duplicate"}.get(dedup.check([key])[0])
    if reason is None and decon is not None:
        hit = decon.match(text + " " + json.dumps(rec.get("question", "")))
        if hit:
            reason = "contaminated"
            state["contaminated"].append({**hit, "record": text[:200]})
    if reason is None:
        state["kept"] += 1
        _append(out / "records.jsonl", rec)
    else:
        state["rejected"][reason] = state["rejected"].get(reason, 0) + 1
        _append(out / "rejected.jsonl", {**rec, "reason": reason})


def _append(path: Path, rec: dict) -> None:
    with open(path, "a", encoding="utf-8") as f:
        f.write(json.dumps(rec, ensure_ascii=False) + "\n")


def _read_lines(path: Path, n: int) -> list[dict]:
    if not path.exists():
        return []
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in itertools.islice(f, n)]


def _truncate_lines(path: Path, n: int) -> None:
    """Keep the first n lines: a crash between a record and its progress entry must not duplicate it. The file
    is replaced atomically, so a kill during this rewrite cannot lose the records kept so far."""
    if path.exists():
        with open(path, encoding="utf-8") as f:
            lines = list(itertools.islice(f, n))
        atomic_write_text(path, "".join(line if line.endswith("\n") else line + "\n" for line in lines))
