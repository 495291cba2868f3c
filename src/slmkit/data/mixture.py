"""FLAN-style instruction mixtures: many tasks, several instruction templates each, sampled into one SFT file,
with whole tasks held out for zero-shot evaluation (Wei et al. 2022, "Finetuned language models are zero-shot
learners"; Chung et al. 2022, "Scaling instruction-finetuned language models"; Mishra et al. 2022, Natural
Instructions).

A mixture is a YAML file:

    source: ../../../shared/data/instructions/natural_instructions.jsonl   # relative to the YAML file
    fields: {task: task, instruction: instruction, input: input, output: output, cot: explanation}
    templates:                      # str.format over {instruction} and {input}; one drawn per example
      - "{instruction}\\n\\n{input}"
      - "{input}\\n\\n{instruction}"
    cap: 200                        # examples-proportional mixing: a task gives min(its size, cap) x weight
    tasks:                          # optional, first match wins: weights and templates per task (globs)
      - {match: "*answer_generation*", weight: 2.0}
      - {match: "subtask001_*", templates: ["Passage and task: {input}\\n{instruction}"]}
    holdout: ["*qasc*"]             # tasks never trained on (globs); more with --holdout-tasks
    cot_fraction: 0.5               # records with a chain of thought: this share answers "<cot> So the answer is"
    max_chars: 4000                 # skip examples whose prompt + answer is longer (counted per task)
    eval_per_task: 100              # held-out examples written per held-out task
    seed: 0

`build_mixture` writes a directory:

    train.jsonl           chat records {"messages": [user, assistant], "task", "template"} (for `slm finetune`)
    heldout/TASK.yaml     one `slm eval` task file per held-out task (generation, exact match + ROUGE-L),
    heldout/TASK.jsonl    prompted with the first template, as the task would be met zero-shot
    mixture.json          what went in: examples per task and template, skipped, held out

Weights above 1 repeat a task's examples (with fresh templates); below 1 subsample it. Hold out whole task
families (e.g. every task built on one dataset): a held-out task whose source data appears in a training task
measures memory, not zero-shot generalisation.
"""

from __future__ import annotations

import fnmatch
import json
import random
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path

from slmkit.files import atomic_dir, iter_jsonl

DEFAULT_TEMPLATES = ["{instruction}\n\n{input}", "{input}\n\n{instruction}",
                     "Instruction: {instruction}\n\nInput: {input}\n\nAnswer:"]
DEFAULT_FIELDS = {"task": "task", "instruction": "instruction", "input": "input", "output": "output",
                  "cot": "explanation"}


@dataclass
class Mixture:
    source: Path
    templates: list[str] = field(default_factory=lambda: list(DEFAULT_TEMPLATES))
    fields: dict[str, str] = field(default_factory=lambda: dict(DEFAULT_FIELDS))
    cap: int = 200
    tasks: list[dict] = field(default_factory=list)  # {"match": glob, "weight": float, "templates": [...]}
    holdout: list[str] = field(default_factory=list)
    cot_fraction: float = 0.5
    max_chars: int = 4000
    eval_per_task: int = 100
    seed: int = 0

    def settings_for(self, task: str) -> dict:
        for rule in self.tasks:
            if fnmatch.fnmatchcase(task, rule["match"]):
                return rule
        return {}

    def is_heldout(self, task: str) -> bool:
        return any(fnmatch.fnmatchcase(task, pattern) for pattern in self.holdout)


def load_mixture(path: str | Path, holdout: list[str] | None = None) -> Mixture:
    """Read a mixture YAML file; `holdout` adds task globs to its `holdout` list."""
    import yaml
    path = Path(path)
    try:
        spec = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as e:
        raise ValueError(f"{path}: not valid YAML: {e}") from None
    if not isinstance(spec, dict) or "source" not in spec:
        raise ValueError(f"{path}: a mixture needs at least `source` (a JSONL file of instruction records)")
    known = set(Mixture.__dataclass_fields__)
    unknown = sorted(set(spec) - known)
    if unknown:
        raise ValueError(f"{path}: unknown mixture field(s) {', '.join(unknown)}; known: {', '.join(sorted(known))}")
    spec["source"] = (path.parent / spec["source"]).resolve()
    spec["fields"] = {**DEFAULT_FIELDS, **(spec.get("fields") or {})}
    spec["holdout"] = list(spec.get("holdout") or []) + list(holdout or [])
    for i, rule in enumerate(spec.get("tasks") or []):
        if not isinstance(rule, dict) or "match" not in rule or set(rule) - {"match", "weight", "templates"}:
            raise ValueError(f"{path}: tasks[{i}] must be {{match: GLOB, weight: NUMBER, templates: [...]}}")
        if float(rule.get("weight", 1.0)) < 0:
            raise ValueError(f"{path}: tasks[{i}].weight must be >= 0")
    mixture = Mixture(**spec)
    for template in mixture.templates + [t for rule in mixture.tasks for t in rule.get("templates", [])]:
        _render(template, "instruction", "input", where=f"{path}: template {template!r}")
    return mixture


def _render(template: str, instruction: str, text: str, where: str) -> str:
    try:
        return template.format(instruction=instruction, input=text)
    except (KeyError, IndexError, ValueError) as e:
        raise ValueError(f"{where}: templates may use only {{instruction}} and {{input}} ({e})") from None


def read_source(mixture: Mixture) -> dict[str, list[dict]]:
    """The source records grouped by task, checked field by field (errors name file:line)."""
    f = mixture.fields
    by_task: dict[str, list[dict]] = defaultdict(list)
    if not mixture.source.is_file():
        raise FileNotFoundError(f"mixture source {mixture.source} does not exist")
    for n, record in iter_jsonl(mixture.source):
        for key in ("task", "instruction", "input", "output"):
            if not isinstance(record.get(f[key]), str):
                raise ValueError(f"{mixture.source}:{n}: needs a string field {f[key]!r} (the {key}; see `fields:`)")
        by_task[record[f["task"]]].append(record)
    if not by_task:
        raise ValueError(f"{mixture.source}: no records")
    return dict(by_task)


def build_mixture(mixture: Mixture, out: str | Path, log=print) -> dict:
    """Sample the training mixture and write the held-out evaluation tasks into `out` (see the module doc)."""
    f = mixture.fields
    by_task = read_source(mixture)
    heldout = sorted(t for t in by_task if mixture.is_heldout(t))
    unmatched = [p for p in mixture.holdout if not any(fnmatch.fnmatchcase(t, p) for t in by_task)]
    if unmatched:
        raise ValueError(f"holdout pattern(s) {unmatched} match no task of {mixture.source}")
    if len(heldout) == len(by_task):
        raise ValueError("every task is held out: nothing left to train on")
    rng = random.Random(mixture.seed)
    train, summary = [], {"source": str(mixture.source), "seed": mixture.seed, "cap": mixture.cap,
                          "heldout": heldout, "tasks": {}}
    for task in sorted(set(by_task) - set(heldout)):
        rule = mixture.settings_for(task)
        templates = rule.get("templates") or mixture.templates
        records = by_task[task]
        n = round(min(len(records), mixture.cap) * float(rule.get("weight", 1.0)))
        order = []
        while len(order) < n:  # whole shuffled passes, so every example appears before any repeats
            order += rng.sample(range(len(records)), len(records))
        stats = Counter()
        for i in order[:n]:
            record = records[i]
            k = rng.randrange(len(templates))
            prompt = _render(templates[k], record[f["instruction"]], record[f["input"]], where=task)
            answer = record[f["output"]]
            cot = record.get(f["cot"]) if f.get("cot") else None
            with_cot = isinstance(cot, str) and bool(cot.strip()) and rng.random() < mixture.cot_fraction
            if with_cot:
                answer = f"{cot.strip()} So the answer is {answer}"
            if len(prompt) + len(answer) > mixture.max_chars:
                stats["skipped_too_long"] += 1
                continue
            stats["cot"] += with_cot
            stats[f"template_{k}"] += 1
            stats["examples"] += 1
            train.append({"messages": [{"role": "user", "content": prompt}, {"role": "assistant", "content": answer}],
                          "task": task, "template": k})
        summary["tasks"][task] = dict(sorted(stats.items()))
    if not train:
        raise ValueError("the mixture is empty (every example skipped: raise max_chars?)")
    rng.shuffle(train)
    summary["train_examples"] = len(train)
    with atomic_dir(out) as tmp:
        with open(tmp / "train.jsonl", "w", encoding="utf-8") as fh:
            for record in train:
                fh.write(json.dumps(record, ensure_ascii=False) + "\n")
        (tmp / "heldout").mkdir()
        for task in heldout:
            records = by_task[task]
            chosen = random.Random(f"{mixture.seed}/{task}").sample(range(len(records)),
                                                                   min(mixture.eval_per_task, len(records)))
            templates = mixture.settings_for(task).get("templates") or mixture.templates
            with open(tmp / "heldout" / f"{task}.jsonl", "w", encoding="utf-8") as fh:
                for i in chosen:
                    r = records[i]
                    item = {"id": f"{task}/{i}", "question": _render(templates[0], r[f["instruction"]], r[f["input"]],
                                                                       where=task), "answer": r[f["output"]]}
                    fh.write(json.dumps(item, ensure_ascii=False) + "\n")
            (tmp / "heldout" / f"{task}.yaml").write_text(
                f"# zero-shot on a task held out of the mixture; ROUGE-L is Natural-Instructions' metric\n"
                f"name: {task}\nkind: generate\ndata: {task}.jsonl\nscoring: exact\nmain_metric: rouge_l\n"
                f"max_new_tokens: 64\nstop: [\"\\n\\n\"]\n", encoding="utf-8")
        (tmp / "mixture.json").write_text(json.dumps(summary, indent=2) + "\n")
    log(f"mixture: {len(train):,} training examples from {len(summary['tasks'])} tasks; "
        f"{len(heldout)} held out ({', '.join(heldout) or 'none'}) -> {out}")
    return summary
