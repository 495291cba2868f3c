"""Fill-in-the-middle on held-out code (`slm eval-fim`): one line of a file is removed, the model writes it back,
scored by exact match.

An item is (prefix, middle, suffix) cut at line ends: the prefix ends with the line before the removed one (no
newline), the middle is "\\n" + the removed line, the suffix opens with the next newline. Cutting before the
newline keeps each piece's tokens what they are in running text (a byte-level BPE glues "\\n" to the indentation
after it).

Two prompt formats, the same items and scoring:

- "fim" (a model trained with --objective ul2, train/ul2.py): `<|R|> prefix <extra_id_0> suffix <extra_id_0>`, the
  UL2 R-denoiser's form of one corrupted span; the model writes the span and closes it with `<extra_id_1>`.
- "prefix": the left context alone, which is all a left-to-right model can use: the baseline, and the only
  format a model without the sentinels can be asked in.

The prediction is the greedy output up to the first special token (a sentinel, eos), cut after its first line
(the middle is one line; both formats are cut the same way), and it matches when it equals the middle up to
trailing whitespace. The prompt is cut to `context` tokens: at most a third of it suffix (its start), the rest
prefix (its end).

Why a command of its own and not a task kind of `slm eval` (eval/tasks.py): a task's prompt is text rendered
through any `LM` backend, and this prompt is token ids, sentinels included, which only a model trained on them
(slmkit's torch backend) reads; the items are made from code files, not read from a task file.
"""

from __future__ import annotations

import random
from pathlib import Path

import torch

from slmkit.files import atomic_write_json
from slmkit.lm.torch_lm import TorchLM, generate_ids
from slmkit.sampling import SamplingParams

FORMATS = ("fim", "prefix")
FIM_MODE = "<|R|>"  # train/ul2.py's MODE_TOKENS["R"]: a one-line span is a short span
SENTINELS = ("<extra_id_0>", "<extra_id_1>")  # train/ul2.py's first two sentinels


def fim_items(files: list[str | Path], per_file: int = 5, seed: int = 0, min_chars: int = 8,
              max_chars: int = 80, context_chars: int = 2000) -> list[dict]:
    """Up to `per_file` items from each file: lines of `min_chars`..`max_chars` non-blank characters that are not
    comments, with a line before and after, drawn by a generator seeded by (seed, file name)."""
    items = []
    for f in files:
        path = Path(f)
        try:
            text = path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as e:
            raise ValueError(f"{path}: cannot read it as UTF-8 text ({e})") from e
        lines = text.split("\n")
        ok = [i for i in range(1, len(lines) - 1)
              if min_chars <= len(lines[i].strip()) <= max_chars and not lines[i].lstrip().startswith("#")]
        for i in sorted(random.Random(f"{seed}:{path.name}").sample(ok, min(per_file, len(ok)))):
            prefix = "\n".join(lines[:i])[-context_chars:]
            suffix = ("\n" + "\n".join(lines[i + 1:]))[:context_chars]
            items.append({"id": f"{path.name}:{i + 1}", "prefix": prefix, "middle": "\n" + lines[i],
                          "suffix": suffix})
    return items


def heldout_fim_items(split: str = "test", per_file: int = 5) -> list[dict]:
    """Items from this Python's own test suite (Lib/test), which `slm quickstart` and `slm data prepare` over the
    stdlib (STDLIB_EXCLUDE) never train on: "test" is 20 files, "dev" 20 others, neither among the 20 files of
    the built-in `python` bits-per-byte task."""
    from slmkit.data.stdlib import unseen_code_sample
    starts = {"test": 20, "dev": 40}
    if split not in starts:
        raise ValueError(f"unknown FIM split {split!r}; choose one of {', '.join(starts)}")
    return fim_items(unseen_code_sample(20, start=starts[split]), per_file=per_file)


def _prompt(tok, item: dict, fmt: str, context: int) -> list[int]:
    prefix = tok.encode(item["prefix"], add_bos=False)
    if fmt == "prefix":
        return prefix[-context:]
    ids = {t: tok.hf.token_to_id(t) for t in (FIM_MODE, *SENTINELS)}
    missing = [t for t, i in ids.items() if i is None]
    if missing:
        raise ValueError(f"the model's tokenizer has no {missing[0]}: format 'fim' needs a model trained with "
                         "`slm train --objective ul2`; use --format prefix for a left-to-right model")
    suffix = tok.encode(item["suffix"], add_bos=False)
    room = context - 3
    suffix = suffix[:room // 3]
    prefix = prefix[-(room - len(suffix)):]
    s0 = ids[SENTINELS[0]]
    return [ids[FIM_MODE], *prefix, s0, *suffix, s0]


def first_line(text: str) -> str:
    """The prediction: up to the end of the first line (a leading newline belongs to it)."""
    head = text[:1] if text.startswith("\n") else ""
    return head + text[len(head):].split("\n", 1)[0]


def fill(lm: TorchLM, item: dict, fmt: str = "fim", context: int = 256, max_new_tokens: int = 48) -> str:
    """The model's one-line middle for `item`, greedy."""
    tok, model = lm.tokenizer, lm.model
    context = min(context, model.cfg.max_seq_len - max_new_tokens)
    if context < 8:
        raise ValueError(f"the model's context of {model.cfg.max_seq_len} tokens leaves no room for a prompt "
                         f"before {max_new_tokens} new tokens; lower --max-new-tokens")
    special = {i for i, t in tok.hf.get_added_tokens_decoder().items() if t.special}
    out: list[int] = []
    params = SamplingParams(max_new_tokens=max_new_tokens, temperature=0.0)
    with torch.no_grad():
        for t in generate_ids(model, _prompt(tok, item, fmt, context), params):
            if t in special:
                break
            out.append(t)
            text = tok.decode(out)
            if "\n" in text.lstrip("\n"):  # the line is complete
                break
    return first_line(tok.decode(out))


def exact_match(prediction: str, middle: str) -> bool:
    return prediction.rstrip() == middle.rstrip()


def evaluate_fim(model: str | TorchLM, items: list[dict] | None = None, fmt: str = "fim", context: int = 256,
                 max_new_tokens: int = 48, limit: int | None = None, files: list[str | Path] | None = None,
                 split: str = "test", per_file: int = 5, out: str | Path | None = None, log=None) -> dict:
    """Exact match of the missing line over `items`, else items cut from `files`, else the held-out `split`
    (`heldout_fim_items`): {"exact_match", "n", "format", "records": [{"id", "middle", "prediction",
    "correct"}]}, also written to `out` (JSON) when given."""
    if fmt not in FORMATS:
        raise ValueError(f"unknown FIM format {fmt!r}; choose one of {', '.join(FORMATS)}")
    if isinstance(model, str | Path):
        from slmkit.lm.resolve import load_lm
        lm = load_lm(str(model), backend="torch")
    else:
        lm = model
    if not isinstance(lm, TorchLM):
        raise ValueError(f"{model}: FIM evaluation runs on slmkit's torch backend (a model directory or a pulled "
                         "name), not a GGUF file or an endpoint")
    if items is None:
        items = fim_items(files, per_file=per_file) if files else heldout_fim_items(split, per_file=per_file)
    items = items[:limit] if limit else items
    if not items:
        raise ValueError("no FIM items to score")
    records = []
    for n, item in enumerate(items, 1):
        prediction = fill(lm, item, fmt, context, max_new_tokens)
        records.append({"id": item["id"], "middle": item["middle"], "prediction": prediction,
                        "correct": exact_match(prediction, item["middle"])})
        if log and n % 20 == 0:
            log(f"{n}/{len(items)}: exact match {sum(r['correct'] for r in records) / n:.1%}")
    result = {"exact_match": sum(r["correct"] for r in records) / len(records), "n": len(records), "format": fmt,
              "model": str(model) if isinstance(model, str | Path) else lm.name, "context": context,
              "records": records}
    if out is not None:
        atomic_write_json(out, result)
    return result
