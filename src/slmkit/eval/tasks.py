"""Evaluation tasks: what to ask a model and how to score the answer, as data.

A `Task` is a list of item records plus the few settings that say how to turn an item into a prompt.
Five kinds cover the field:

    perplexity  items {"id", "text"}: bits per byte (and token loss) with a sliding window
    choice      items {"question", "choices": [...], "answer": index}: the choice the model finds most likely
    generate    items {"question", "answer"}: generated text scored by exact match, a regex or a final number
    code        items {"prompt", "test", "entry_point"}: generated code run against tests in a sandbox (pass@k)
    classify    items {"text", "label"}: the label whose verbaliser the model finds most likely
    kb          items {"question", "answer_keywords", "topics", "answerable"} (kb-python's format) over a knowledge
                base (`kb:` in the YAML, a folder from `slm kb index`): retrieval, answers with citations or
                abstention, scored as `slm kb eval` scores them (hit_at_5, answer_correct, citation_precision, ...)
    repair      items {"prompt", "completion", "unit", "unit_line"} (`slm synth repair`'s heldout.jsonl): the
                generated line is the fix; exact_fix (it equals the original line) and compiles (put back into its
                unit, the unit compiles: checked in the sandbox)
    support     items {"message", "intent", "answer_articles", "answer_keywords", "escalate"} (../shared/data/
                support's format) over a help-center knowledge base (`kb:`) with `intents:` (and `catalogue:`): the
                customer-service assistant with the model writing its replies, scored as `slm support eval` scores
                it (intent_accuracy, handoff_precision, handoff_recall, auto_resolved, wrong_reply_rate). Its
                runner lives in slmkit.support.task (support sits above eval), loaded through the
                "slmkit.task_kinds" entry point

Built-in tasks: mmlu (letter answers, as in the MMLU paper), mmlu_cloze (the answer texts, as SmolLM2's authors
report it), gsm8k, humaneval (registry packages, see benchmarks.py) and python (held-out standard-library test
files, bits per byte). Anything else is a YAML or JSONL file (see `load_task` and docs/evaluation.md).
"""

from __future__ import annotations

import itertools
import random
from dataclasses import dataclass, field, fields
from pathlib import Path

from slmkit.files import iter_jsonl

KINDS = ("perplexity", "choice", "generate", "code", "classify", "kb", "repair", "support")
BUILTIN = ("mmlu", "mmlu_cloze", "gsm8k", "humaneval", "python")
MAIN_METRIC = {"perplexity": "bits_per_byte", "choice": "acc", "generate": "exact_match", "code": "pass@1",
               "classify": "accuracy", "kb": "answer_correct", "repair": "exact_fix", "support": "wrong_reply_rate"}
LOWER_IS_BETTER = {"bits_per_byte", "token_loss", "wrong_reply_rate"}
# What a kind's items need unless the task says otherwise: a repair item's prompt ends where the fixed line starts
# (`slm synth repair`), and the answer is that one line.
KIND_DEFAULTS = {"repair": dict(prompt="{prompt}", target_delimiter="", stop=["\n"], max_new_tokens=48,
                                chat_stop=["\n```", "\n\n"],
                                system="You fix one broken line of Python code. Reply with the fixed line only, "
                                       "keeping its indentation."),
                 # the support assistant's own MIN_SIMILARITY (support/assistant.py; a test keeps them equal)
                 "support": dict(min_similarity=0.35, max_new_tokens=160)}


@dataclass
class Task:
    name: str
    kind: str
    items: list[dict]
    prompt: str = "{question}"  # str.format over an item's fields; also renders few-shot examples
    target: str = "{answer}"  # a few-shot example's answer, written after the prompt and target_delimiter
    target_delimiter: str = " "  # between prompt and answer / choice (lm-eval's convention)
    preamble: str = ""  # once before the few-shot examples (str.format over the item)
    system: str | None = None  # system message in chat mode
    num_fewshot: int = 0
    fewshot_items: list[dict] | None = None  # the pool for examples (default: the other items of the task)
    fewshot_group: str | None = None  # draw examples with the same value of this field (MMLU: subject)
    chat: bool | None = None  # None: generate/code tasks use the chat template of instruction-tuned models
    chat_prompt: str | None = None  # the user turn in chat mode (default: `prompt`)
    chat_stop: list[str] = field(default_factory=list)  # chat answers end at the end of the turn, not at `stop`
    # choice
    choice_texts: list[str] | None = None  # the same continuations for every item (MMLU's "A".."D")
    # generate / code
    scoring: str = "exact"  # generate: "exact" | "regex" | "numeric"
    pattern: str | None = None  # regex scoring: the answer is the first group of the first match
    stop: list[str] = field(default_factory=lambda: ["\n\n"])
    max_new_tokens: int = 256
    timeout_s: float = 10.0  # code: per program
    # classify
    labels: list[str] | None = None
    verbalizers: dict[str, str] | None = None  # label -> the words the model scores (default: the label)
    # kb
    kb: str | None = None  # the knowledge base folder (relative to the YAML file)
    retrieval: str = "hybrid"  # hybrid | bm25 | dense | none (closed book)
    sources: int = 3  # chunks shown to the model
    min_similarity: float = 0.45  # abstain below this best-chunk similarity
    # support (also kb, retrieval, sources, min_similarity: hand off as not_in_kb below it)
    intents: str | None = None  # a descriptions JSON or a classifier directory (relative to the YAML file)
    catalogue: str | None = None  # the product catalogue CSV (relative to the YAML file)
    min_confidence: float | None = None  # hand off as low_confidence below it (None: the assistant's default)
    # perplexity
    stride: int | None = None  # default: half the model's context
    description: str = ""
    main_metric: str | None = None  # the headline number (default by kind; see MAIN_METRIC)

    def __post_init__(self):
        if self.kind not in KINDS:
            raise ValueError(f"task {self.name!r}: kind must be one of {', '.join(KINDS)}, got {self.kind!r}")
        if self.scoring not in ("exact", "regex", "numeric"):
            raise ValueError(f"task {self.name!r}: scoring must be exact, regex or numeric, got {self.scoring!r}")
        if self.scoring == "regex" and not self.pattern:
            raise ValueError(f"task {self.name!r}: regex scoring needs a `pattern`")
        if self.kind == "classify":
            if self.labels is None:
                self.labels = sorted({str(it["label"]) for it in self.items})
            self.verbalizers = {label: (self.verbalizers or {}).get(label, label.replace("_", " "))
                                for label in self.labels}
        self.main_metric = self.main_metric or MAIN_METRIC[self.kind]
        if self.kind == "kb" and not self.kb and self.retrieval != "none":
            raise ValueError(f"task {self.name!r}: a kb task needs `kb:`, the knowledge base folder (slm kb index)")
        if self.kind == "support" and not (self.kb and self.intents):
            raise ValueError(f"task {self.name!r}: a support task needs `kb:` (the help center indexed by `slm kb "
                             "index`) and `intents:` (a descriptions JSON or a classifier directory)")
        for i, item in enumerate(self.items):
            item.setdefault("id", f"{self.name}/{i}")
            _check_item(self, item, i)

    def render(self, item: dict, chat: bool = False) -> str:
        return _format(self.chat_prompt if chat and self.chat_prompt else self.prompt, item, self.name)

    def render_target(self, item: dict) -> str:
        if self.kind == "choice":
            answer = int(item["answer"])
            return (self.choice_texts or item["choices"])[answer]
        if self.kind == "classify":
            return self.verbalizers[str(item["label"])]
        if self.kind == "code":
            return item.get("canonical_solution", "")
        if self.kind == "repair":
            return item["completion"]
        return _format(self.target, item, self.name)

    def continuations(self, item: dict) -> list[str]:
        """choice / classify: the texts scored after the prompt, in answer-index / label order."""
        if self.kind == "classify":
            return [self.verbalizers[label] for label in self.labels]
        return list(self.choice_texts or item["choices"])


_REQUIRED = {"perplexity": ("text",), "choice": ("answer",), "generate": ("answer",),
             "code": ("prompt", "test", "entry_point"), "classify": ("label",), "kb": ("question",),
             "repair": ("prompt", "completion", "unit", "unit_line"),
             "support": ("message", "intent", "answer_articles", "answer_keywords", "escalate")}


def _check_item(task: Task, item: dict, i: int) -> None:
    where = item.get("_source", f"task {task.name!r}, item {i}")
    missing = [f for f in _REQUIRED[task.kind] if f not in item]
    if missing:
        raise ValueError(f"{where}: missing field(s) {', '.join(missing)} for a {task.kind} task")
    if task.kind == "choice":
        n = len(task.choice_texts or item.get("choices") or [])
        if n < 2:
            raise ValueError(f"{where}: a choice item needs a `choices` list of at least 2 "
                             "(or the task's choice_texts)")
        if not isinstance(item["answer"], int) or not 0 <= item["answer"] < n:
            raise ValueError(f"{where}: `answer` must be the index (0..{n - 1}) of the right choice, "
                             f"got {item['answer']!r}")
    if task.kind == "repair":
        lines = str(item["unit"]).split("\n")
        if not isinstance(item["unit_line"], int) or not 0 <= item["unit_line"] < len(lines):
            raise ValueError(f"{where}: `unit_line` must be the index (0..{len(lines) - 1}) of the broken line in "
                             f"`unit`, got {item['unit_line']!r}")
    if task.kind == "support" and (not isinstance(item["message"], str) or not item["message"].strip()):
        raise ValueError(f"{where}: `message` must be a non-empty string")
    if task.kind == "kb":
        from slmkit.kb.evaluate import check_question
        item.update(check_question(item, where))
    if task.kind == "classify" and str(item["label"]) not in task.labels:
        raise ValueError(f"{where}: label {item['label']!r} is not one of the task's labels {task.labels}")


def _format(template: str, item: dict, task_name: str) -> str:
    try:
        return template.format(**item)
    except KeyError as e:
        raise ValueError(f"task {task_name!r}: the template {template[:60]!r} uses field {e} that item "
                         f"{item.get('id', '?')} does not have (fields: {', '.join(sorted(item))})") from None


# --- subsets and few-shot examples --------------------------------------------------------------------------

def select(items: list[dict], limit: int | None, seed: int = 0) -> list[dict]:
    """A seeded random subset of `limit` items (in their original order), or all of them."""
    if limit is None or limit >= len(items):
        return items
    keep = sorted(random.Random(seed).sample(range(len(items)), limit))
    return [items[i] for i in keep]


def fewshot_examples(task: Task, item: dict, seed: int = 0) -> list[dict]:
    """The task's few-shot examples for `item`: the same seeded draw for every item (of its group), never
    the item itself, so the examples form a shared prefix that backends can cache."""
    if not task.num_fewshot:
        return []
    pool = task.fewshot_items if task.fewshot_items is not None else task.items
    if task.fewshot_group:
        pool = [x for x in pool if x.get(task.fewshot_group) == item.get(task.fewshot_group)]
    order = list(range(len(pool)))
    random.Random(f"{seed}/{item.get(task.fewshot_group) if task.fewshot_group else ''}").shuffle(order)
    if task.kind == "classify":  # stratified: one example of each label in turn, so every label is shown
        by_label = {label: [i for i in order if str(pool[i]["label"]) == label] for label in task.labels}
        order = [i for row in itertools.zip_longest(*by_label.values()) for i in row if i is not None]
    chosen = [pool[i] for i in order[: task.num_fewshot + 1] if pool[i].get("id") != item.get("id")]
    return chosen[: task.num_fewshot]


# --- loading ----------------------------------------------------------------------------------------------

def load_task(spec: str | Path, **overrides) -> Task:
    """A built-in task name, a YAML task file, or a JSONL file of items (its kind guessed from the fields).

    YAML: `name`, `kind`, `data` (a JSONL file, relative to the YAML), optional `fewshot_data` (the example
    pool) and any other `Task` field (prompt, target, num_fewshot, labels, verbalizers, scoring, ...).
    """
    spec = str(spec)
    if spec in BUILTIN:
        return _builtin(spec, **overrides)
    path = Path(spec)
    if not path.is_file():
        raise FileNotFoundError(f"task {spec!r}: not a built-in task ({', '.join(BUILTIN)}) and no such file")
    if path.suffix in (".yaml", ".yml"):
        return _from_yaml(path, overrides)
    if path.suffix == ".jsonl":
        items = read_items(path)
        kind = _guess_kind(items, path)
        return _make(Task, {"name": path.stem, "kind": kind, "items": items}, overrides)
    raise ValueError(f"{path}: a task file is .yaml/.yml or .jsonl")


def read_items(path: Path) -> list[dict]:
    items = []
    for n, item in iter_jsonl(path):
        item["_source"] = f"{path}:{n}"
        items.append(item)
    if not items:
        raise ValueError(f"{path}: no items")
    return items


def _guess_kind(items: list[dict], path: Path) -> str:
    keys = set(items[0])
    for kind, needs in (("code", {"prompt", "test", "entry_point"}), ("repair", {"prompt", "completion", "unit"}),
                        ("choice", {"choices", "answer"}),
                        ("classify", {"text", "label"}), ("generate", {"answer"}), ("perplexity", {"text"})):
        if needs <= keys:
            return kind
    raise ValueError(f"{path}:1: cannot tell the task kind from the fields {sorted(keys)}; write a YAML task file "
                     "with `kind:` (see docs/evaluation.md)")


def _from_yaml(path: Path, overrides: dict) -> Task:
    import yaml
    try:
        spec = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as e:
        raise ValueError(f"{path}: not valid YAML: {e}") from None
    if not isinstance(spec, dict) or "data" not in spec or "kind" not in spec:
        raise ValueError(f"{path}: a task file needs at least `kind` and `data` (a JSONL file of items)")
    spec = dict(spec)
    spec.setdefault("name", path.stem)
    spec["items"] = read_items(path.parent / spec.pop("data"))
    for name in ("kb", "intents", "catalogue"):
        if spec.get(name):
            spec[name] = str(path.parent / spec[name])
    if "fewshot_data" in spec:
        spec["fewshot_items"] = read_items(path.parent / spec.pop("fewshot_data"))
    return _make(Task, spec, overrides, where=str(path))


def _make(cls, spec: dict, overrides: dict, where: str = "") -> Task:
    spec = {**KIND_DEFAULTS.get(spec.get("kind"), {}), **spec}
    known = {f.name for f in fields(cls)}
    unknown = sorted(set(spec) - known)
    if unknown:
        raise ValueError(f"{where or spec.get('name')}: unknown task field(s) {', '.join(unknown)}; "
                         f"known: {', '.join(sorted(known))}")
    return cls(**{**spec, **{k: v for k, v in overrides.items() if v is not None}})


# --- built-in tasks -------------------------------------------------------------------------------------

def _builtin(name: str, **overrides) -> Task:
    from slmkit.eval import benchmarks
    if name in ("mmlu", "mmlu_cloze"):
        items = []
        for it in benchmarks.load_mmlu():
            subject = it["subject"].replace("_", " ")
            items.append({**it, "subject_name": subject, **dict(zip("ABCD", it["choices"], strict=True))})
        if name == "mmlu":
            spec = dict(kind="choice", prompt="{question}\nA. {A}\nB. {B}\nC. {C}\nD. {D}\nAnswer:",
                        target_delimiter=" ", choice_texts=["A", "B", "C", "D"], fewshot_group="subject",
                        preamble="The following are multiple choice questions (with answers) about {subject_name}.\n\n",
                        description="MMLU, 57 subjects; the letter of the answer after the lettered choices "
                                    "(Hendrycks et al.); acc is the reported metric")
        else:
            spec = dict(kind="choice", prompt="Question: {question}\nAnswer:", fewshot_group="subject",
                        main_metric="acc_norm",
                        description="MMLU as a cloze task: the answer texts themselves are scored (as SmolLM2's "
                                    "authors report it); acc_norm is the reported metric")
        return _make(Task, {"name": name, "items": items, **spec}, overrides)
    if name == "gsm8k":
        return _make(Task, dict(
            name=name, kind="generate", items=benchmarks.load_gsm8k(), prompt="Question: {question}\nAnswer:",
            target="{solution}", scoring="numeric", stop=["Question:", "\n\n\n"], max_new_tokens=256,
            description="GSM8K test: a worked solution, scored by its final number (#### N, 'the answer is N', "
                        "else the last number); few-shot examples come from the other test items"), overrides)
    if name == "humaneval":
        return _make(Task, dict(
            name=name, kind="code", items=benchmarks.load_humaneval(), prompt="{prompt}", target_delimiter="",
            stop=["\ndef ", "\nclass ", "\nif __name__", "\nprint(", "\n#"], max_new_tokens=384,
            chat_prompt="Complete this Python function. Reply with the whole function in one ```python code "
                        "block.\n\n```python\n{prompt}```",
            description="HumanEval: the function body is generated and run against the tests in a sandbox"),
            overrides)
    if name == "python":
        return _make(Task, dict(
            name=name, kind="perplexity", items=heldout_python(), description=(
                "bits per byte on the first 8 KB of 20 files of this Python's own test suite (Lib/test), which "
                "`slm quickstart` never trains on")), overrides)
    raise ValueError(f"unknown built-in task {name!r}")


def heldout_python(n_files: int = 20, max_bytes: int = 8192) -> list[dict]:
    from slmkit.data.stdlib import unseen_code_sample
    items = []
    for path in unseen_code_sample(n_files):
        data = path.read_bytes()[:max_bytes].decode("utf-8", errors="ignore")
        items.append({"id": f"python/{path.name}", "text": data})
    return items
