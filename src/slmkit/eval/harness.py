"""Run a `Task` on any `LM` and score it: `evaluate(lm, task)` -> `TaskResult`.

One function per task kind turns a batch of items into per-item records (what was asked, what came back,
whether it was right); metrics are computed from the records only. Records are appended to `records_file`
as they are made, so an interrupted evaluation resumes where it stopped (`--resume`) and every number in a
report can be traced to the items behind it.

Prompting. Raw: [preamble] + k examples ("prompt<delimiter>answer\n\n") + prompt. Chat: the examples become
user/assistant turns and the model's chat template renders them. By default choice, classify and perplexity
tasks are raw (as benchmark papers report them) and generate / code tasks use the chat template when the
model is instruction-tuned; `chat=True/False` overrides.

Multiple choice reports `acc` (the choice with the highest total log-probability) and `acc_norm` (the highest
log-probability per character of the choice text, lm-eval's definition, which stops long choices losing just
for being long).
"""

from __future__ import annotations

import hashlib
import json
import math
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from tqdm import tqdm

from slmkit.chat import with_chat_stops
from slmkit.eval import metrics as M
from slmkit.eval.perplexity import document_nats
from slmkit.eval.tasks import Task, fewshot_examples, select
from slmkit.files import iter_jsonl
from slmkit.sampling import SamplingParams

BEST_OF = (1, 4, 16)
SELECTORS = ("vote", "verifier", "execute", "first")


@dataclass
class TaskResult:
    task: str
    kind: str
    model: str
    metrics: dict[str, M.Metric]
    settings: dict
    details: dict = field(default_factory=dict)  # classification report, best-of-n table, ...
    records: list[dict] = field(default_factory=list)
    seconds: float = 0.0

    def to_dict(self, with_records: bool = False) -> dict:
        out = {"task": self.task, "kind": self.kind, "model": self.model, "settings": self.settings,
               "metrics": {k: m.to_dict() for k, m in self.metrics.items()}, "details": self.details,
               "seconds": self.seconds}
        if with_records:
            out["records"] = self.records
        return out


def evaluate(lm, task: Task, *, limit: int | None = None, seed: int = 0, chat: bool | None = None,
             samples: int = 1, temperature: float = 0.8, select_by: str = "vote", verifier=None,
             records_file: str | Path | None = None, batch: int = 16, progress: bool = True,
             allow_unsandboxed: bool = False) -> TaskResult:
    """Evaluate `lm` on `task` (a seeded subset of `limit` items when given).

    samples > 1 (generate / code): sample that many answers per item at `temperature`; code reports pass@k,
    generate reports accuracy of best-of-n for n in 1, 4, 16 chosen by `select_by`: "vote" (the most common
    final answer), "verifier" (the answer `verifier`, another LM, finds most likely per token), "execute"
    (code: the first sample that passes the examples in the prompt's docstring) or "first".

    Code tasks execute the generated programs in eval/sandbox.py, which refuses to run without its network
    namespace unless `allow_unsandboxed` (checked here, before anything is generated).
    """
    if select_by not in SELECTORS:
        raise ValueError(f"select_by must be one of {', '.join(SELECTORS)}")
    if select_by == "verifier" and verifier is None:
        raise ValueError("select_by='verifier' needs a verifier LM")
    if samples < 1:
        raise ValueError("samples must be >= 1")
    if task.kind in ("code", "repair"):
        from slmkit.eval.sandbox import require_isolation
        require_isolation(allow_unsandboxed)
    use_chat = _use_chat(lm, task, chat)
    settings = {"num_fewshot": task.num_fewshot, "chat": use_chat, "limit": limit, "seed": seed,
                "samples": samples, "temperature": temperature if samples > 1 else 0.0, "select_by": select_by,
                "prompt": task.prompt, "n_items": None}
    items = select(task.items, limit, seed)
    settings["n_items"] = len(items)
    key = hashlib.sha256(json.dumps([task.name, task.kind, settings, getattr(lm, "name", "")],
                                    sort_keys=True, default=str).encode()).hexdigest()[:16]
    done = _read_records(records_file, key)
    todo = [it for it in items if it["id"] not in done]
    if task.kind not in _RUNNERS:
        _load_plugged(task.kind)
    if task.kind not in _RUNNERS:
        raise ValueError(f"task {task.name!r}: no runner for kind {task.kind!r} is registered; register one with "
                         "register_kind, or name its module under the entry points \"slmkit.task_kinds\"")
    run = _RUNNERS[task.kind]
    start = time.perf_counter()
    bar = tqdm(total=len(items), initial=len(items) - len(todo), desc=f"{task.name}", unit="item",
               disable=not progress, dynamic_ncols=True)
    out = open(records_file, "a", encoding="utf-8") if records_file else None
    try:
        for b in range(0, len(todo), batch):
            chunk = todo[b:b + batch]
            new = run(lm, task, chunk, seed=seed, chat=use_chat, samples=samples, temperature=temperature,
                      select_by=select_by, verifier=verifier, allow_unsandboxed=allow_unsandboxed)
            for record in new:
                record["key"] = key
                done[record["id"]] = record
                if out:
                    out.write(json.dumps(record, ensure_ascii=False) + "\n")
            if out:
                out.flush()
            bar.update(len(chunk))
    finally:
        bar.close()
        if out:
            out.close()
    records = [done[it["id"]] for it in items]
    metric_values, details = _SCORERS[task.kind](task, records, samples)
    return TaskResult(task.name, task.kind, getattr(lm, "name", repr(lm)), metric_values, settings, details,
                      records, time.perf_counter() - start)


def _read_records(path, key: str) -> dict[str, dict]:
    """Records of an earlier run with the same settings (a torn last line from a crash is ignored)."""
    if not path or not Path(path).is_file():
        return {}
    found = {}
    for _, record in iter_jsonl(path, on_error=lambda err: None):
        if record.get("key") == key:
            found[record["id"]] = record
    return found


def _use_chat(lm, task: Task, chat: bool | None) -> bool:
    if task.kind == "support":
        chat = True  # the assistant always talks to its model through the chat template (support/assistant.py)
    if chat is None:
        chat = task.chat
    if chat is None:
        chat = task.kind in ("generate", "code", "repair") and bool(getattr(lm, "instruction_tuned", False))
    if chat and task.kind == "perplexity":
        raise ValueError("a perplexity task scores raw text; it has no chat form")
    tokenizer = getattr(lm, "tokenizer", None)
    if chat and tokenizer is not None and not tokenizer.chat_template:
        raise ValueError(f"{lm!r} has no chat template; evaluate with chat off (--no-chat)")
    return chat


# --- prompts ------------------------------------------------------------------------------------------------

def build_prompt(task: Task, item: dict, seed: int, chat: bool) -> str | list[dict]:
    """The text before the answer (raw), or the conversation whose next assistant turn is the answer (chat)."""
    shots = fewshot_examples(task, item, seed)
    preamble = task.preamble.format(**item) if task.preamble else ""
    if not chat:
        parts = [task.render(ex) + task.target_delimiter + task.render_target(ex) + "\n\n" for ex in shots]
        return preamble + "".join(parts) + task.render(item)
    messages = [{"role": "system", "content": task.system}] if task.system else []
    for ex in shots:
        messages += [{"role": "user", "content": task.render(ex, chat=True)},
                     {"role": "assistant", "content": task.render_target(ex)}]
    messages.append({"role": "user", "content": task.render(item, chat=True)})
    first_user = next(i for i, m in enumerate(messages) if m["role"] == "user")
    messages[first_user] = {"role": "user", "content": preamble + messages[first_user]["content"]}
    return messages


def _context_text(lm, prompt: str | list[dict]) -> str:
    if isinstance(prompt, str):
        return prompt
    if lm.tokenizer is None:
        raise ValueError(f"{lm!r} cannot score chat prompts (no tokenizer to render the template); use chat off")
    return lm.tokenizer.apply_chat_template(prompt, add_generation_prompt=True)


def _generate(lm, prompts: list, params: SamplingParams) -> list[str]:
    if prompts and isinstance(prompts[0], list) and hasattr(lm, "generate_chat"):
        return [lm.generate_chat(p, params) for p in prompts]  # a remote chat API applies its own template
    return lm.generate([_context_text(lm, p) for p in prompts], params)


def _sample(lm, task: Task, prompts: list, samples: int, temperature: float, seed: int) -> list[list[str]]:
    """samples completions per prompt: greedy when samples == 1, else seeded sampling."""
    outs = [[] for _ in prompts]
    chat = bool(prompts) and isinstance(prompts[0], list)
    # A chat answer ends with the turn: ChatML's end-of-turn marker, which need not be the model's eos.
    stop = with_chat_stops(list(task.chat_stop)) if chat else list(task.stop)
    for s in range(samples):
        params = SamplingParams(max_new_tokens=task.max_new_tokens, stop=stop,
                                temperature=0.0 if samples == 1 else temperature, seed=seed * 1000 + s)
        for i, text in enumerate(_generate(lm, prompts, params)):
            outs[i].append(text)
    return outs


# --- per-kind runners: items -> records ------------------------------------------------------------------------

def _run_choice(lm, task: Task, items, *, seed, chat, **_) -> list[dict]:
    requests, spans = [], []
    for item in items:
        context = _context_text(lm, build_prompt(task, item, seed, chat))
        delimiter = "" if chat else task.target_delimiter
        conts = task.continuations(item)
        spans.append((len(requests), len(conts), conts))
        requests += [(context, delimiter + c) for c in conts]
    scores = lm.score_many(requests)
    records = []
    for item, (at, n, conts) in zip(items, spans, strict=True):
        lps = [scores[at + j].logprob for j in range(n)]
        norm = [lp / max(1, len(c)) for lp, c in zip(lps, conts, strict=True)]
        record = {"id": item["id"], "logprobs": lps, "lengths": [len(c) for c in conts],
                  "pred": _argmax(lps), "pred_norm": _argmax(norm)}
        if task.kind == "classify":
            tokens = [max(1, scores[at + j].n_tokens) for j in range(n)]
            record["pred_mean"] = _argmax([lp / t for lp, t in zip(lps, tokens, strict=True)])
            record["gold"] = task.labels.index(str(item["label"]))
        else:
            record["gold"] = int(item["answer"])
        records.append(record)
    return records


def _run_generate(lm, task: Task, items, *, seed, chat, samples, temperature, select_by, verifier, **_):
    prompts = [build_prompt(task, item, seed, chat) for item in items]
    completions = _sample(lm, task, prompts, samples, temperature, seed)
    records = []
    for item, prompt, texts in zip(items, prompts, completions, strict=True):
        gold = _gold(task, item)
        extracted = [_extract(task, t) for t in texts]
        correct = [x is not None and x == gold for x in extracted]
        record = {"id": item["id"], "gold": gold, "completions": texts, "extracted": extracted, "correct": correct}
        if task.scoring == "exact":  # partial credit for free text (Natural-Instructions' metric)
            record["rouge_l"] = [M.rouge_l(t, str(item["answer"])) for t in texts]
        if samples > 1 and select_by == "verifier":
            context = _context_text(verifier, prompt)
            scored = verifier.score_many([(context, (" " if not chat else "") + t) for t in texts])
            record["verifier"] = [s.logprob / max(1, s.n_tokens) for s in scored]
        records.append(record)
    return records


def _run_code(lm, task: Task, items, *, seed, chat, samples, temperature, select_by, allow_unsandboxed, **_):
    from slmkit.eval.sandbox import humaneval_program, run_many
    prompts = [build_prompt(task, item, seed, chat) for item in items]
    completions = _sample(lm, task, prompts, samples, temperature, seed)
    programs, examples = [], []
    for item, texts in zip(items, completions, strict=True):
        for text in texts:
            body = _code_completion(text, chat)
            programs.append(humaneval_program(item["prompt"], body, item["test"], item["entry_point"]))
            if select_by == "execute" and samples > 1:
                examples.append(doctest_program(item["prompt"], body, item["entry_point"]))
    results = run_many(programs, timeout_s=task.timeout_s, allow_unsandboxed=allow_unsandboxed)
    checks = run_many(examples, timeout_s=task.timeout_s, allow_unsandboxed=allow_unsandboxed) if examples else []
    records = []
    for i, (item, texts) in enumerate(zip(items, completions, strict=True)):
        mine = results[i * samples:(i + 1) * samples]
        record = {"id": item["id"], "completions": texts, "correct": [r.passed for r in mine],
                  "status": [r.status for r in mine], "error": [_last_line(r.stderr) for r in mine]}
        if checks:
            record["examples_pass"] = [r.passed for r in checks[i * samples:(i + 1) * samples]]
        records.append(record)
    return records


def _run_repair(lm, task: Task, items, *, seed, chat, allow_unsandboxed, **_) -> list[dict]:
    """The generated line put back into its unit (eval/sandbox.py compiles it: compile() runs no code, but a
    parser fed hostile input is still best kept out of this process)."""
    from slmkit.eval.repair import put_back, repair_line
    from slmkit.eval.sandbox import run_many
    prompts = [build_prompt(task, item, seed, chat) for item in items]
    completions = [texts[0] for texts in _sample(lm, task, prompts, 1, 0.0, seed)]
    lines = [repair_line(text, chat) for text in completions]
    programs = [f"compile({put_back(item['unit'], item['unit_line'], line)!r}, '<unit>', 'exec', dont_inherit=True)\n"
                for item, line in zip(items, lines, strict=True)]
    results = run_many(programs, timeout_s=task.timeout_s, allow_unsandboxed=allow_unsandboxed)
    return [{"id": item["id"], "kind": item.get("kind"), "completion": text, "prediction": line,
             "exact_fix": line.rstrip() == item["completion"].rstrip(), "compiles": result.passed,
             "unchanged": "broken" in item and line.rstrip() == item["broken"].rstrip()}
            for item, text, line, result in zip(items, completions, lines, results, strict=True)]


def _run_perplexity(lm, task: Task, items, **_) -> list[dict]:
    if lm.tokenizer is None:
        raise ValueError(f"{lm!r} is text only (no token ids): perplexity needs a local backend")
    tok = lm.tokenizer
    prefix = _document_prefix(tok)  # context only, never scored
    docs = [[prefix] + tok.encode(item["text"]) for item in items]
    stride = task.stride or max(1, lm.max_length // 2)
    scored = document_nats(lambda windows: [r.token_logprobs for r in lm.logprobs_batch(windows)], docs,
                           lm.max_length, stride)
    return [{"id": item["id"], "nats": nats, "tokens": tokens, "bytes": len(item["text"].encode("utf-8"))}
            for item, (nats, tokens) in zip(items, scored, strict=True)]


_KBS: dict = {}  # open knowledge bases by folder: one embedder load per evaluation, not one per batch


def _run_kb(lm, task: Task, items, **_) -> list[dict]:
    from slmkit.kb.evaluate import question_record
    from slmkit.kb.index import open_kb
    kb = None
    if task.retrieval != "none":
        kb = _KBS.get(task.kb) or _KBS.setdefault(task.kb, open_kb(task.kb))
    out = []
    for item in items:
        record, timing = question_record(kb, item, lm, mode=task.retrieval, k=task.sources,
                                         min_similarity=task.min_similarity, max_new_tokens=task.max_new_tokens)
        out.append({**record, **timing})
    return out


_RUNNERS = {"choice": _run_choice, "classify": _run_choice, "generate": _run_generate, "code": _run_code,
            "perplexity": _run_perplexity, "kb": _run_kb, "repair": _run_repair}


# --- scorers: records -> metrics -------------------------------------------------------------------------------

def _score_choice(task: Task, records, samples):
    n = len(records)
    out = {"acc": M.proportion(sum(r["pred"] == r["gold"] for r in records), n),
           "acc_norm": M.proportion(sum(r["pred_norm"] == r["gold"] for r in records), n)}
    details = {}
    if task.fewshot_group:  # MMLU: also the mean over subjects, the paper's headline
        groups: dict[str, list[bool]] = {}
        by_id = {it["id"]: it for it in task.items}
        for r in records:
            groups.setdefault(by_id[r["id"]].get(task.fewshot_group), []).append(r["pred"] == r["gold"])
        details["acc_by_" + task.fewshot_group] = {g: sum(v) / len(v) for g, v in sorted(groups.items())}
    return out, details


def _score_classify(task: Task, records, samples):
    labels = task.labels
    golds = [labels[r["gold"]] for r in records]
    report = M.classification_report(golds, [labels[r["pred_mean"]] for r in records], labels)
    out = {"accuracy": report["accuracy"], "macro_f1": report["macro_f1"],
           "accuracy_sum_logprob": M.proportion(sum(r["pred"] == r["gold"] for r in records), len(records))}
    return out, {"per_class": report["per_class"], "confusion": report["confusion"], "labels": labels}


def _score_generate(task: Task, records, samples):
    n = len(records)
    if samples == 1:
        out = {"exact_match": M.proportion(sum(r["correct"][0] for r in records), n)}
        if all("rouge_l" in r for r in records):
            out["rouge_l"] = M.mean([r["rouge_l"][0] for r in records])
        return out, {}
    out, table = {}, {}
    for k in [k for k in BEST_OF if k <= samples]:
        chosen = [_select(r, k) for r in records]
        out[f"best_of_{k}"] = M.proportion(sum(r["correct"][c] for r, c in zip(records, chosen, strict=True)), n)
        out[f"oracle_{k}"] = M.proportion(sum(any(r["correct"][:k]) for r in records), n)
        table[k] = {"selected": out[f"best_of_{k}"].value, "any_correct": out[f"oracle_{k}"].value}
    return out, {"best_of_n": table}


def _score_code(task: Task, records, samples):
    from slmkit.eval.sandbox import pass_at_k
    out = {}
    for k in [k for k in (1, 10, 100) if k <= samples]:
        out[f"pass@{k}"] = M.mean([pass_at_k(samples, sum(r["correct"]), k) for r in records])
    if samples == 1:  # greedy: pass@1 is a proportion
        out["pass@1"] = M.proportion(sum(r["correct"][0] for r in records), len(records))
    details = {"status": dict(Counter(s for r in records for s in r["status"]))}
    if samples > 1:
        for k in [k for k in BEST_OF if 1 < k <= samples]:
            chosen = [_select(r, k) for r in records]
            out[f"best_of_{k}"] = M.proportion(
                sum(r["correct"][c] for r, c in zip(records, chosen, strict=True)), len(records))
    return out, details


def _score_perplexity(task: Task, records, samples):
    bits = [r["nats"] / math.log(2) for r in records]
    out = {"bits_per_byte": M.ratio_of_sums(bits, [r["bytes"] for r in records]),
           "token_loss": M.ratio_of_sums([r["nats"] for r in records], [r["tokens"] for r in records])}
    return out, {"bytes": sum(r["bytes"] for r in records), "tokens": sum(r["tokens"] for r in records)}


def _score_kb(task: Task, records, samples):
    """`slm kb eval`'s six numbers, the shares with their intervals; those nothing was counted for are left out."""
    from slmkit.kb.evaluate import tallies
    out = {name: M.Metric(total / n, n=n) if name == "mrr" else M.proportion(total, n)
           for name, (total, n) in tallies(records).items() if n or name == task.main_metric}
    return out, {}


def _score_repair(task: Task, records, samples):
    n = len(records)
    out = {name: M.proportion(sum(bool(r[name]) for r in records), n)
           for name in ("exact_fix", "compiles", "unchanged")}
    by_kind: dict[str, list[bool]] = {}
    for r in records:
        by_kind.setdefault(r.get("kind") or "?", []).append(r["exact_fix"])
    return out, {"exact_fix_by_kind": {k: {"exact_fix": sum(v) / len(v), "n": len(v)}
                                       for k, v in sorted(by_kind.items())}}


_SCORERS = {"choice": _score_choice, "classify": _score_classify, "generate": _score_generate,
            "code": _score_code, "perplexity": _score_perplexity, "kb": _score_kb, "repair": _score_repair}


def _load_plugged(kind: str) -> None:
    """Call the function that registers `kind`, from the "slmkit.task_kinds" entry points (pyproject.toml): kinds
    whose runner lives above eval in the layers (support) or in another installed package. A name, not an
    import, so eval never depends on the layers above it."""
    from importlib.metadata import entry_points
    for point in entry_points(group="slmkit.task_kinds", name=kind):
        point.load()()


def register_kind(kind: str, run, score) -> None:
    """Plug in a task kind's runner `run(lm, task, items, **settings) -> records` (one per item, each with the
    item's "id") and scorer `score(task, records, samples) -> (metrics, details)`."""
    _RUNNERS[kind], _SCORERS[kind] = run, score


# --- helpers ---------------------------------------------------------------------------------------------------

def _argmax(values) -> int:
    return max(range(len(values)), key=lambda i: values[i])


def _gold(task: Task, item: dict):
    if task.scoring == "numeric":
        return M.normalize_number(str(item["answer"]))
    if task.scoring == "regex":
        return str(item["answer"]).strip()
    return M.normalize_text(str(item["answer"]))


def _extract(task: Task, text: str):
    if task.scoring == "numeric":
        return M.extract_number(text)
    if task.scoring == "regex":
        found = M.extract_regex(text, task.pattern)
        return found.strip() if found is not None else None
    return M.normalize_text(text)


def _select(record: dict, k: int) -> int:
    """Which of the first k samples best-of-k picks, by the record's available signal."""
    if "verifier" in record:
        scores = record["verifier"][:k]
        return _argmax(scores)
    if "examples_pass" in record:
        passing = [i for i, ok in enumerate(record["examples_pass"][:k]) if ok]
        return passing[0] if passing else 0
    if "extracted" in record:  # majority vote over final answers; ties go to the earliest
        answers = [a for a in record["extracted"][:k] if a is not None]
        if not answers:
            return 0
        best = Counter(answers).most_common(1)[0][0]
        return record["extracted"].index(best)
    return 0


def _code_completion(text: str, chat: bool) -> str:
    """What to append to the HumanEval prompt: raw completions as they are; a chat answer's code block, which
    usually repeats the whole function (a later `def` replaces the prompt's docstring-only one)."""
    if not chat:
        return text
    code = M.extract_code(text)
    return "\n" + code if code.lstrip().startswith(("def ", "import ", "from ", "class ", "@")) else code


def doctest_program(prompt: str, completion: str, entry_point: str) -> str:
    """A program that runs only the examples in the function's docstring (public, unlike the hidden tests)."""
    return (prompt + completion + "\n\nimport doctest as _doctest, sys as _sys\n"
            f"_runner = _doctest.DocTestRunner(verbose=False)\n"
            f"for _t in _doctest.DocTestFinder().find({entry_point}, {entry_point!r}, globs=dict(globals())):\n"
            f"    _runner.run(_t, out=lambda s: None)\n"
            # raise, not sys.exit: the sandbox's verdict counts any early exit as a failure
            f"if _runner.failures:\n    raise AssertionError(f'{{_runner.failures}} docstring examples failed')\n")


def _document_prefix(tok) -> int:
    """The token a document is scored after: bos for models trained with it, else a document separator
    (<|endoftext|>, </s>) when the vocabulary has one, else bos / eos (lm-eval's choice too)."""
    if tok.add_bos and tok.bos_id is not None:
        return tok.bos_id
    for candidate in ("<|endoftext|>", "</s>"):
        token_id = tok.hf.token_to_id(candidate)
        if token_id is not None:
            return token_id
    if tok.bos_id is not None:
        return tok.bos_id
    if tok.eos_id is not None:
        return tok.eos_id
    raise ValueError("the tokenizer has no bos, eos or end-of-text token to start a document with")


def _last_line(text: str) -> str:
    lines = [line for line in text.strip().splitlines() if line.strip()]
    return lines[-1][:200] if lines else ""
