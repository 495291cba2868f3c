"""RAFT-style training records from a knowledge base (`slm kb synth KB -o FILE.jsonl --teacher MODEL`), for
`slm finetune`: retrieval-augmented fine-tuning (RAFT, Zhang et al. 2024) teaches a small model to answer from
the one source that holds the answer among near misses, cite it, and decline when none does.

For each sampled chunk (the "gold" chunk) the teacher writes a question the chunk answers. The record's prompt is
exactly what `slm kb ask` shows the model (`kb.ask.build_messages`: the system instruction, numbered sources, the
question), with the gold chunk at a random position among `distractors` chunks retrieved for that question (the
KB's own hybrid search: near misses that share its words, not random chunks, so the model has to pick), and the
target answer cites the gold chunk's [n]. A share `p_no_gold` of records leaves the gold chunk out (its place
taken by one more near miss, so the prompt has the same number of sources) and the target is `kb.ask`'s
abstention, `ABSTAIN`, word for word.

The answer (`answer=`):
- `extractive` (the default): the gold chunk's sentences that share the most content words with the question
  (at most `answer_sentences`, in the chunk's order), followed by [n]. A 135M teacher asked to answer from a
  passage mostly repeats the question or the instruction (measured in BENCHMARKS.md), so the quoting is done here;
- `teacher`: the teacher answers from the gold chunk alone; [n] is appended when it cites nothing.

Filters (a rejected candidate is counted by reason in the report): a question that is empty, not a question
(no "?"), too short or long, about "the passage" rather than its subject, sharing no content word with its chunk
(it cannot be answered from it), or copying a whole sentence of the chunk; an answer that is empty, repeats the
question or the instruction (copies the prompt), or shares no content word with the chunk; and repeats (an exact
duplicate question).

A chunk nested inside another document (pydoc-topics: `compound` holds the text of `try`) could answer the
question too, so a retrieved chunk is not used as a distractor when it shares over half its words with the gold
one (as kb/pairs.py picks its hard negatives).

Resumable: progress (records so far, counters, settings) is saved atomically every `save_every` chunks in
FILE.jsonl.progress; run the same command again to continue. Item i (its chunk, its draws) does not depend on
`n`, so a resumed run may change `--n`: a larger one goes on, one at or below the chunks already done stops
there and writes what it has (the rejection counts then still cover every chunk tried). The records file itself
is written once, at the end, atomically, with FILE.report.json (kept, rejected by reason, teacher tokens/s).
"""

from __future__ import annotations

import json
import random
import re
import time
from pathlib import Path

from tqdm import tqdm

from slmkit.files import atomic_write_json, atomic_write_text
from slmkit.kb.ask import ABSTAIN, SYSTEM, build_messages
from slmkit.kb.index import KnowledgeBase, open_kb
from slmkit.kb.pairs import _overlap  # the share of words two chunks have in common, as pairs' hard negatives use
from slmkit.kb.retrieve import Hit, search
from slmkit.kb.store import STOPWORDS

ANSWERS = ("extractive", "teacher")
QUESTION_PROMPT = ("Here is a passage from a reference manual.\n\n{passage}\n\nWrite one question that a reader "
                   "could answer from this passage. Reply with the question only.")
ANSWER_PROMPT = ("Passage:\n{passage}\n\nAnswer the question using only the passage; quote the passage's words."
                 "\n\nQuestion: {question}")
MIN_CHUNK_WORDS = 20
MIN_QUESTION_WORDS, MAX_QUESTION_WORDS = 4, 40
SENTENCE_END = re.compile(r"(?<=[.!?:])\s+")
WORD = re.compile(r"\w+")
META = re.compile(r"\b(?:the|this|following) (?:passage|text|manual|reference manual|excerpt)\b|\bthe answer to this\b",
                  re.I)


def content_words(text: str) -> set[str]:
    return {w for w in WORD.findall(text.lower()) if w not in STOPWORDS and len(w) > 1}


def clean_question(reply: str) -> str:
    """The teacher's question: the first line with a "?" (cut after it), without a "Question:" label, a list number
    ("1.") or quotes."""
    for line in reply.strip().splitlines():
        line = re.sub(r"^\s*(?:\*\*)?(?:(?:question|q)\s*\d*|\d+)\s*[:.)]\s*(?:\*\*)?\s*", "", line.strip(),
                      flags=re.I)
        if "?" in line:
            return line[:line.index("?") + 1].strip(" \"'*`")
    return reply.strip()


def question_problem(question: str, chunk_text: str) -> str | None:
    """Why the question is unusable for this chunk, or None."""
    if not question:
        return "question_empty"
    if not question.endswith("?"):
        return "question_not_a_question"
    n = len(question.split())
    if n < MIN_QUESTION_WORDS:
        return "question_too_short"
    if n > MAX_QUESTION_WORDS:
        return "question_too_long"
    if META.search(question):
        return "question_about_the_passage"  # "What does the passage say?": no user asks that of a KB
    if not content_words(question) & content_words(chunk_text):
        return "question_not_from_chunk"  # shares no content word: the chunk cannot be what answers it
    if question.rstrip("?").strip().lower() in " ".join(chunk_text.split()).lower():
        return "question_copies_chunk"
    return None


def answer_problem(answer: str, question: str, chunk_text: str) -> str | None:
    """Why the answer is unusable, or None."""
    stripped = re.sub(r"\[\d+\]", "", answer).strip()
    if not stripped:
        return "answer_empty"
    flat = " ".join(stripped.split()).lower()
    if " ".join(question.split()).lower() in flat or SYSTEM.lower()[:60] in flat or "sources:" in flat:
        return "answer_copies_prompt"
    if not content_words(stripped) & content_words(chunk_text):
        return "answer_not_from_chunk"
    return None


def extractive_answer(question: str, chunk_text: str, n: int, max_sentences: int = 2) -> str:
    """The chunk's sentences that share the most content words with the question (ties: the earlier one), at most
    `max_sentences`, in the chunk's order, then the citation [n]."""
    flat = " ".join(chunk_text.split())
    sentences = [s for s in SENTENCE_END.split(flat) if len(s.split()) >= 3] or [flat]
    wanted = content_words(question)
    scored = sorted(range(len(sentences)), key=lambda i: (-len(content_words(sentences[i]) & wanted), i))
    best = sorted(i for i in scored[:max_sentences] if content_words(sentences[i]) & wanted) or [scored[0]]
    return " ".join(sentences[i] for i in best) + f" [{n}]"


def _hit(stored) -> Hit:
    c = stored.chunk
    return Hit(stored.id, stored.path, c.heading, c.start_line, c.end_line, c.text, 0.0, 0.0)


def near_misses(kb: KnowledgeBase, question: str, gold, count: int, other_documents: bool = False,
                mode: str = "hybrid") -> list[Hit]:
    """The `count` best chunks for `question` other than the gold one, chunks that share its lines (neighbours
    overlap) and chunks that nearly copy it; with `other_documents`, none from the gold's document at all (a
    record whose target is to abstain must not show the answer in a neighbouring chunk)."""
    hits = search(kb, question, k=count + 10, mode=mode)
    g = gold.chunk

    def unrelated(h: Hit) -> bool:
        if h.path == gold.path and (other_documents or (h.start_line <= g.end_line and g.start_line <= h.end_line)):
            return False
        return _overlap(h.text, g.text) <= 0.5
    return [h for h in hits if h.id != gold.id and unrelated(h)][:count]


def _teacher_reply(lm, prompt: str, max_new_tokens: int, temperature: float, seed: int) -> tuple[str, int]:
    """(reply, tokens it took), through the teacher's chat template when it has one."""
    params = lm.sampling_params(max_new_tokens=max_new_tokens, temperature=temperature, top_p=0.95, seed=seed)
    if lm.tokenizer is not None and lm.tokenizer.chat_template:
        reply = "".join(lm.stream_chat([{"role": "user", "content": prompt}], params))
    else:
        reply = lm.generate([prompt + "\n"], params)[0]
    return reply, len(lm.tokenizer.encode(reply)) if lm.tokenizer is not None else len(reply) // 4


def make_record(kb: KnowledgeBase, lm, gold, rng: random.Random, distractors: int, no_gold: bool,
                answer: str, answer_sentences: int, max_new_tokens: int, temperature: float,
                seed: int) -> tuple[dict | None, str | None, int]:
    """(record or None, rejection reason or None, teacher tokens) for one gold chunk."""
    reply, tokens = _teacher_reply(lm, QUESTION_PROMPT.format(passage=gold.chunk.indexed_text()), max_new_tokens,
                                   temperature, seed)
    question = clean_question(reply)
    reason = question_problem(question, gold.chunk.text)
    if reason:
        return None, reason, tokens
    others = near_misses(kb, question, gold, distractors + (1 if no_gold else 0), other_documents=no_gold)
    if len(others) < distractors + (1 if no_gold else 0):
        return None, "too_few_distractors", tokens
    if no_gold:
        hits, n, target = others, None, ABSTAIN
    else:
        n = rng.randrange(distractors + 1) + 1
        hits = others[:n - 1] + [_hit(gold)] + others[n - 1:]
        if answer == "extractive":
            target = extractive_answer(question, gold.chunk.text, n, answer_sentences)
        else:
            reply, more = _teacher_reply(lm, ANSWER_PROMPT.format(passage=gold.chunk.text, question=question),
                                         max_new_tokens, temperature, seed + 1)
            tokens += more
            target = " ".join(reply.split())
            reason = answer_problem(target, question, gold.chunk.text)
            if reason:
                return None, reason, tokens
            target = re.sub(r"\[\d+\]", f"[{n}]", target) if re.search(r"\[\d+\]", target) else f"{target} [{n}]"
    record = {"messages": [*build_messages(question, hits), {"role": "assistant", "content": target}],
              "question": question, "gold": n, "gold_chunk": {"path": gold.path, "lines":
                                                               f"{gold.chunk.start_line}-{gold.chunk.end_line}"},
              "sources": [f"{Path(h.path).name}:{h.lines}" for h in hits]}
    return record, None, tokens


def _without_n(settings: dict) -> dict:
    return {k: v for k, v in settings.items() if k != "n"}


def kb_synth(kb_dir: str | Path, out: str | Path, teacher: str | None = None, n: int = 200, distractors: int = 2,
             p_no_gold: float = 0.2, seed: int = 0, answer: str = "extractive", answer_sentences: int = 2,
             max_new_tokens: int = 64, temperature: float = 0.7, backend: str = "auto", lm=None, embedder=None,
             save_every: int = 10, progress: bool = True, log=print) -> dict:
    """Write about `n` RAFT records (chat `messages`, for `slm finetune --data`) made from the chunks of the
    knowledge base in `kb_dir` to `out`, with `teacher` (a model name or directory; or an `LM` as `lm`) writing
    the questions. `n` chunks are tried; the report says how many records were kept and why others were not."""
    out = Path(out)
    if n <= 0:
        raise ValueError(f"--n must be > 0, not {n}")
    if distractors < 0:
        raise ValueError(f"--distractors must be >= 0, not {distractors}")
    if not 0.0 <= p_no_gold <= 1.0:
        raise ValueError(f"--p-no-gold must be between 0 and 1, not {p_no_gold}")
    if p_no_gold > 0 and distractors == 0:
        raise ValueError("--p-no-gold needs --distractors >= 1 (a record without its gold chunk shows near misses)")
    if answer not in ANSWERS:
        raise ValueError(f"unknown --answer {answer!r}; choose one of {', '.join(ANSWERS)}")
    if out.suffix != ".jsonl":
        raise ValueError(f"{out}: the records file must end in .jsonl (-o FILE.jsonl)")
    if out.exists():
        raise FileExistsError(f"{out} exists; choose another -o (an unfinished run resumes from {out}.progress)")
    if lm is None and not teacher:
        raise ValueError("no teacher: give --teacher MODEL (a model name or directory)")
    kb = open_kb(kb_dir, embedder=embedder)
    try:
        chunks = [c for c in kb.store.get_chunks(kb.store.chunk_ids()) if len(c.chunk.text.split()) >= MIN_CHUNK_WORDS]
        if not chunks:
            raise ValueError(f"{kb_dir}: no chunk of at least {MIN_CHUNK_WORDS} words to ask about")
        order = random.Random(seed).sample(range(len(chunks)), len(chunks))
        picks = [order[i % len(order)] for i in range(n)]  # each chunk once before any twice
        settings = {"kb": str(Path(kb_dir).resolve()), "teacher": teacher or getattr(lm, "name", None), "n": n,
                    "distractors": distractors, "p_no_gold": p_no_gold, "seed": seed, "answer": answer,
                    "answer_sentences": answer_sentences, "max_new_tokens": max_new_tokens,
                    "temperature": temperature}
        progress_path = Path(f"{out}.progress")
        state = {"done": 0, "records": [], "rejected": {}, "teacher_tokens": 0, "teacher_seconds": 0.0}
        if progress_path.exists():
            saved = json.loads(progress_path.read_text())
            if _without_n(saved["settings"]) != _without_n(settings):
                raise ValueError(f"{progress_path} holds an unfinished run with other settings; delete it or use "
                                 "another -o")
            state = saved["state"]
            if state["done"] > n:  # item i is the same whatever n is: keep the first n items' records
                state["records"] = [r for r in state["records"] if r["item"] < n]
                state["done"] = n
            log(f"resuming at chunk {state['done']:,} of {n:,} ({len(state['records']):,} records kept)")
        if lm is None and state["done"] < n:  # a run cut short with a smaller --n needs no teacher
            from slmkit.lm.resolve import generation_backend, load_lm
            backend, spec, options = generation_backend(teacher, backend, "cpu")
            lm = load_lm(spec, backend=backend, **options)
            log(f"teacher: {teacher} through {type(lm).__name__}")
        seen = {r["question"].lower() for r in state["records"]}
        bar = tqdm(total=n, initial=state["done"], unit="chunk", disable=not progress, desc="kb synth")
        try:
            for i in range(state["done"], n):
                rng = random.Random(seed * 1_000_003 + i)  # per item: a resumed run draws what this one would
                no_gold = rng.random() < p_no_gold
                t0 = time.perf_counter()
                record, reason, tokens = make_record(kb, lm, chunks[picks[i]], rng, distractors, no_gold, answer,
                                                     answer_sentences, max_new_tokens, temperature,
                                                     seed * 1_000_003 + i * 7)
                state["teacher_seconds"] += time.perf_counter() - t0
                state["teacher_tokens"] += tokens
                if record is not None and record["question"].lower() in seen:
                    record, reason = None, "duplicate_question"
                if record is None:
                    state["rejected"][reason] = state["rejected"].get(reason, 0) + 1
                else:
                    seen.add(record["question"].lower())
                    state["records"].append({**record, "item": i})
                state["done"] = i + 1
                if state["done"] % save_every == 0:
                    atomic_write_json(progress_path, {"settings": settings, "state": state})
                bar.update(1)
                bar.set_postfix_str(f"kept {len(state['records']):,}, "
                                    f"{state['teacher_tokens'] / max(state['teacher_seconds'], 1e-9):,.0f} teacher "
                                    "tok/s")
        finally:
            bar.close()
        records = state["records"]
        report = {"tried": n, "kept": len(records), "rejected": state["rejected"],
                  "with_gold": sum(r["gold"] is not None for r in records),
                  "no_gold": sum(r["gold"] is None for r in records),
                  "teacher_tokens": state["teacher_tokens"],
                  "teacher_tokens_per_s": round(state["teacher_tokens"] / max(state["teacher_seconds"], 1e-9), 1),
                  "items_per_s": round(n / max(state["teacher_seconds"], 1e-9), 3), "out": str(out),
                  "settings": settings}
        atomic_write_text(out, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))
        atomic_write_json(out.with_suffix(".report.json"), report)
        progress_path.unlink(missing_ok=True)
        log(f"kb synth: {len(records):,} records kept of {n:,} chunks tried; rejected {state['rejected']} -> {out}")
        return report
    finally:
        kb.close()
