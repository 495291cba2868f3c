"""Code repair (FLAME / SLaDe): a small model fine-tuned on `slm synth repair` pairs against SmolLM2-135M-Instruct
prompted few-shot, on the same held-out items (files no training pair came from).

    slm synth repair -o runs/repair24 --per-file 24 --seed 0
    slm finetune runs/qs10/run/model -o runs/repair-ft --data runs/repair24/records.jsonl --seq-len 256 ...
    nice python benchmarks/repair.py --data runs/repair24 --finetuned runs/repair-ft/model \
        --base runs/qs10/run/model --baseline smollm2-135m-instruct --limit 150 --out docs/benchmark-logs/repair

Rows (each an `evaluate` run of the `repair` task kind on the same seeded subset of heldout.jsonl):
- anchor: the broken line returned unchanged (exact_fix 0 by construction; its compiles rate is the share of
  misspelled names, the one kind that compiles);
- the fine-tuned model, zero-shot (the prompt format it was trained on), raw text;
- the quickstart base before fine-tuning, 3-shot raw (what fine-tuning adds);
- the baseline 3-shot raw (the same text the fine-tuned model sees, after 3 solved training pairs) and 3-shot
  through its chat template (a system instruction, the examples as turns; the first line of its answer's code
  block is the fix), and 3-shot chat with the question in plain words (PLAIN_CHAT: the code and the broken line
  in fences, no "### ..." headings for it to imitate).
Greedy decoding, one line. Each row's per-item records go to OUT/NAME.records.jsonl as they are made (rerun the
same command to resume) and its metrics to OUT/results.jsonl when it ends; OUT/results.md is the table so far.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from slmkit.eval.harness import evaluate
from slmkit.eval.tasks import load_task, read_items
from slmkit.files import atomic_write_text
from slmkit.lm import load_lm

SYSTEM = "You fix one broken line of Python code. Reply with the fixed line only, keeping its indentation."


PLAIN_CHAT = ("This Python code has one broken line:\n```python\n{context}\n```\nThe broken line is:\n```python\n"
              "{broken}\n```\nWrite the corrected line, with its indentation, and nothing else.")


class Unchanged:
    """The anchor: answers every item with its broken line."""
    name = "unchanged"
    tokenizer = None
    instruction_tuned = False

    def generate(self, prompts, params):
        return [p.rsplit("### Broken line\n", 1)[1].split("\n", 1)[0] for p in prompts]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--data", required=True, help="an `slm synth repair` output directory")
    ap.add_argument("--finetuned", required=True)
    ap.add_argument("--skip", default="", help="comma list of row-name prefixes not to run")
    ap.add_argument("--only", default="", help="run only the rows whose names end with this (e.g. \"plain-language "
                                               "prompt\"), another process running the rest")
    ap.add_argument("--base", default=None, help="the model before fine-tuning (optional row)")
    ap.add_argument("--baseline", default="smollm2-135m-instruct")
    ap.add_argument("--limit", type=int, default=150)
    ap.add_argument("--shots", type=int, default=3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--backend", default="auto")
    ap.add_argument("--baseline-backend", default=None, help="default: --backend (llamacpp: give the f16 GGUF)")
    ap.add_argument("--threads", type=int, default=None, help="llamacpp threads (1 on an oversubscribed machine: "
                                                               "llama.cpp's spinning threads stall when shared)")
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    data, out = Path(args.data), Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    pool = read_items(data / "records.jsonl")
    # a chat answer is the line, or a code block around it: either way it ends at the first "\n```" or blank line
    common = dict(prompt="{prompt}", target_delimiter="", stop=["\n"], chat_stop=["\n```", "\n\n"],
                  max_new_tokens=48, system=SYSTEM, fewshot_items=pool)
    rows = [("unchanged (anchor)", lambda: Unchanged(), 0, False),
            ("fine-tuned quickstart, 0-shot", lambda: load_lm(args.finetuned, backend=args.backend), 0, False)]
    if args.base:
        rows.append((f"quickstart base, {args.shots}-shot", lambda: load_lm(args.base, backend=args.backend),
                     args.shots, False))
    name = Path(args.baseline).parent.name if args.baseline.endswith(".gguf") else args.baseline
    backend = args.baseline_backend or args.backend
    options = {"n_threads": args.threads} if args.threads and backend == "llamacpp" else {}
    baseline = lambda: load_lm(args.baseline, backend=backend, **options)  # noqa: E731
    rows += [(f"{name}, {args.shots}-shot raw", baseline, args.shots, False),
             (f"{name}, {args.shots}-shot chat", baseline, args.shots, True),
             (f"{name}, {args.shots}-shot chat, plain-language prompt", baseline, args.shots, "plain")]
    results_file = out / "results.jsonl"
    done = {}
    if results_file.exists():
        done = {r["row"]: r for r in map(json.loads, results_file.read_text().splitlines())}
    for label, make, shots, chat in rows:
        if label in done or any(label.startswith(p) for p in args.skip.split(",") if p) \
                or (args.only and not label.endswith(args.only)):
            continue
        task = load_task(data / "heldout.jsonl", num_fewshot=shots, **common)
        if chat == "plain":  # the question in words, the code in fences: no "### ..." format to imitate
            for item in task.items + task.fewshot_items:
                item["context"] = item["prompt"].split("### Code\n", 1)[1].split("\n### Broken line\n", 1)[0]
            task.chat_prompt = PLAIN_CHAT
        slug = "".join(c if c.isalnum() else "-" for c in label).strip("-")
        t0 = time.perf_counter()
        result = evaluate(make(), task, limit=args.limit, seed=args.seed, chat=bool(chat),
                          records_file=out / f"{slug}.records.jsonl")
        row = {"row": label, "items": result.settings["n_items"], "shots": shots, "chat": chat,
               "prompt": task.chat_prompt if chat == "plain" else task.prompt,
               "metrics": {k: m.to_dict() for k, m in result.metrics.items()},
               "exact_fix_by_kind": result.details["exact_fix_by_kind"],
               "seconds": round(time.perf_counter() - t0, 1)}
        done[label] = row
        with open(results_file, "a", encoding="utf-8") as f:
            f.write(json.dumps(row) + "\n")
        atomic_write_text(out / "results.md", table(list(done.values())))
        print(table(list(done.values())), flush=True)
    if results_file.exists():  # rows another process added too (one may run the baseline, another the rest)
        rows_now = [json.loads(line) for line in results_file.read_text().splitlines()]
        order = {label: i for i, (label, *_) in enumerate(rows)}
        atomic_write_text(out / "results.md", table(sorted(rows_now, key=lambda r: order.get(r["row"], 99))))


def table(rows: list[dict]) -> str:
    kinds = sorted({k for r in rows for k in r["exact_fix_by_kind"]})
    head = "| model | items | exact_fix | compiles | unchanged | " + " | ".join(kinds) + " | seconds |\n"
    head += "|---" * (6 + len(kinds)) + "|\n"
    lines = []
    for r in rows:
        m = r["metrics"]

        def cell(name, m=m):
            x = m[name]
            if x.get("low") is None:
                return f"{x['value']:.3f}"
            return f"{x['value']:.3f} [{x['low']:.3f}, {x['high']:.3f}]"
        by = [f"{r['exact_fix_by_kind'][k]['exact_fix']:.2f} ({r['exact_fix_by_kind'][k]['n']})"
              if k in r["exact_fix_by_kind"] else "" for k in kinds]
        lines.append(f"| {r['row']} | {r['items']} | {cell('exact_fix')} | {cell('compiles')} | "
                     f"{m['unchanged']['value']:.3f} | " + " | ".join(by) + f" | {r['seconds']:.0f} |")
    return head + "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
