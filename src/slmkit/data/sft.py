"""Supervised fine-tuning data: chat (`messages`) or `prompt` / `completion` JSONL records, tokenized so that
the loss falls only on what the model should learn to write (assistant turns, completions).

    {"messages": [{"role": "system", "content": ...}, {"role": "user", ...}, {"role": "assistant", ...}, ...]}
    {"prompt": "Translate to French: cheese", "completion": " fromage"}

Chat records are rendered with the model's own chat template; every assistant turn, including its
end-of-turn token, is a target. Prompt/completion records are `[bos] prompt completion eos`, the completion
and eos being targets.

No packing: every example is its own row of the batch, right-padded (padding is never a target), so an example
can never attend to another one. Batches are padded to their longest example (at most the sequence length), not to
the sequence length; padding still costs compute on mixed lengths, but needs no block-diagonal attention masks,
which SDPA's fast paths don't take. Examples longer than the sequence length are cut (and counted).

`SFTDataset` offers the interface the training loop reads from a token dataset (`train_batch`, `val_batches`,
`bytes_per_token`, `vocab_size`, `meta`), so fine-tuning runs through the one training loop.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from slmkit.files import iter_jsonl, sha256_file

IGNORE = -100


@dataclass
class Example:
    ids: list[int]
    labels: list[int]  # per position of ids: the id itself where it is a target, else IGNORE
    chat: bool = False  # rendered with the chat template

    @property
    def target_tokens(self) -> int:
        return sum(1 for t in self.labels if t != IGNORE)


def encode_record(record: dict, tokenizer, where: str) -> Example:
    """One JSONL record as token ids with loss labels; `where` ("file:line") names it in errors."""
    if not isinstance(record, dict):
        raise ValueError(f"{where}: a record must be a JSON object")
    if "messages" in record:
        return _encode_chat(record["messages"], tokenizer, where)
    if "prompt" in record and "completion" in record:
        prompt, completion = record["prompt"], record["completion"]
        if not isinstance(prompt, str) or not isinstance(completion, str) or not completion:
            raise ValueError(f"{where}: `prompt` and `completion` must be strings (a non-empty completion)")
        if tokenizer.eos_id is None:
            raise ValueError("the tokenizer has no eos token to end completions with")
        ids = tokenizer.encode(prompt, add_bos=tokenizer.add_bos)
        answer = tokenizer.encode(completion) + [tokenizer.eos_id]
        return Example(ids + answer, [IGNORE] * len(ids) + answer)
    raise ValueError(f"{where}: a record needs `messages` (chat) or `prompt` + `completion`; "
                     f"it has {', '.join(sorted(record)) or 'no fields'}")


def _encode_chat(messages, tokenizer, where: str) -> Example:
    if not tokenizer.chat_template:
        raise ValueError(f"{where}: chat records need a tokenizer with a chat template")
    if not isinstance(messages, list) or not messages:
        raise ValueError(f"{where}: `messages` must be a non-empty list")
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or m.get("role") not in ("system", "user", "assistant") \
                or not isinstance(m.get("content"), str):
            raise ValueError(f"{where}: messages[{i}] must be {{\"role\": system|user|assistant, \"content\": str}}")
    if not any(m["role"] == "assistant" for m in messages):
        raise ValueError(f"{where}: no assistant message, so nothing to learn")
    # Render growing prefixes of the conversation: the text each assistant turn adds is its target span.
    # Template boundaries are special tokens, so encoding the pieces separately equals encoding the whole.
    ids, labels, rendered = [], [], ""
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        before = tokenizer.apply_chat_template(messages[:i], add_generation_prompt=True) if i else ""
        after = tokenizer.apply_chat_template(messages[:i + 1], add_generation_prompt=False)
        if not before.startswith(rendered) or not after.startswith(before):
            raise ValueError(f"{where}: the chat template does not render this conversation incrementally; "
                             "use prompt/completion records instead")
        context = tokenizer.encode(before[len(rendered):])
        answer = tokenizer.encode(after[len(before):])
        ids += context + answer
        labels += [IGNORE] * len(context) + answer
        rendered = after
    return Example(ids, labels, chat=True)


def read_examples(path: str | Path, tokenizer) -> list[Example]:
    path = Path(path)
    examples = []
    for n, record in iter_jsonl(path):
        examples.append(encode_record(record, tokenizer, f"{path}:{n}"))
    if not examples:
        raise ValueError(f"{path}: no records")
    return examples


class SFTDataset:
    """Fine-tuning examples with the training loop's dataset interface; a seeded 5% (at least one) is held out."""

    def __init__(self, path: str | Path, tokenizer, val_fraction: float = 0.05, seed: int = 0,
                 val_path: str | Path | None = None):
        self.path = Path(path)
        self.tokenizer = tokenizer
        examples = read_examples(self.path, tokenizer)
        self.chat = any(e.chat for e in examples)
        if val_path:
            self.train, self.val = examples, read_examples(val_path, tokenizer)
        else:
            order = np.random.default_rng(seed).permutation(len(examples))
            n_val = max(1, round(val_fraction * len(examples))) if len(examples) > 1 else 0
            val_idx = set(order[:n_val].tolist())
            self.train = [e for i, e in enumerate(examples) if i not in val_idx]
            self.val = [e for i, e in enumerate(examples) if i in val_idx]
        self.pad_id = tokenizer.pad_id if tokenizer.pad_id is not None else (tokenizer.eos_id or 0)
        self.meta = {"format": "slmkit-sft", "source": str(self.path), "manifest_sha256": sha256_file(self.path),
                     "tokenizer_sha256": tokenizer.sha256, "vocab_size": tokenizer.vocab_size, "chat": self.chat,
                     "splits": {name: self._split_stats(split) for name, split in
                                (("train", self.train), ("val", self.val))}}
        self._epoch, self._perm = -1, None
        self.truncated = 0

    def _split_stats(self, examples: list[Example]) -> dict:
        target_ids = [[t for t in e.labels if t != IGNORE] for e in examples]
        return {"examples": len(examples), "tokens": sum(len(e.ids) for e in examples),
                "target_tokens": sum(len(t) for t in target_ids),
                "target_bytes": sum(len(self.tokenizer.decode(t).encode("utf-8")) for t in target_ids)}

    @property
    def vocab_size(self) -> int:
        return self.tokenizer.vocab_size

    def bytes_per_token(self, split: str = "val") -> float:
        """UTF-8 bytes per target token: makes the loop's val_bpb the bits per byte of the answers."""
        s = self.meta["splits"][split]
        return s["target_bytes"] / max(1, s["target_tokens"])

    def _rows(self, examples: list[Example], seq_len: int) -> tuple[torch.Tensor, torch.Tensor]:
        width = min(seq_len, max(len(e.ids) - 1 for e in examples))  # pad to the longest row, not to seq_len
        x = torch.full((len(examples), width), self.pad_id, dtype=torch.long)
        y = torch.full((len(examples), width), IGNORE, dtype=torch.long)
        for row, e in enumerate(examples):
            if len(e.ids) > seq_len + 1:
                self.truncated += 1
            # A long example loses its beginning, never its answer: generation truncates a long prompt the
            # same way (LM.generate keeps its last tokens), so training sees what inference will.
            ids, labels = e.ids[-(seq_len + 1):], e.labels[-(seq_len + 1):]
            x[row, :len(ids) - 1] = torch.tensor(ids[:-1])
            y[row, :len(ids) - 1] = torch.tensor(labels[1:])  # position t predicts token t+1
        return x, y

    def train_batch(self, first_sample: int, batch_size: int, seq_len: int, seed: int = 0):
        """Samples first_sample .. first_sample+batch_size-1 (seeded order, epoch after epoch) as (x, y)."""
        n = len(self.train)
        if n == 0:
            raise ValueError(f"{self.path}: no training examples left after the validation split")
        chosen = []
        for j in range(batch_size):
            epoch, i = divmod(first_sample + j, n)
            if epoch != self._epoch:
                self._perm = np.random.default_rng([seed, epoch]).permutation(n)
                self._epoch = epoch
            chosen.append(self.train[int(self._perm[i])])
        return self._rows(chosen, seq_len)

    def val_batches(self, batch_size: int, seq_len: int, max_tokens: int | None = None):
        n = len(self.val)
        if max_tokens:
            per_example = max(1, self.meta["splits"]["val"]["tokens"] // max(1, n))
            n = min(n, max(1, math.ceil(max_tokens / per_example)))
        for start in range(0, n, batch_size):
            yield self._rows(self.val[start:start + batch_size], seq_len)
