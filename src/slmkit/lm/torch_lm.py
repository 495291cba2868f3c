"""`TorchLM`: slmkit's own model as an `LM` (the reference backend: CPU or GPU, every feature)."""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import torch

from slmkit.generate import SamplingParams, generate_ids
from slmkit.lm.base import LM, LogProbs, logprobs_from_logits
from slmkit.model import Transformer


class TorchLM(LM):
    def __init__(self, model: Transformer, tokenizer, name: str = "torch", use_cache: bool = True):
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.name = name
        self.use_cache = use_cache
        self.max_length = model.cfg.max_seq_len
        self.eos_id = model.cfg.eos_token_id

    @classmethod
    def load(cls, path, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32) -> TorchLM:
        """From a model directory, a run directory or a GGUF file (dequantized to `dtype`)."""
        from slmkit.checkpoint import load_any
        model, tokenizer = load_any(path, device=device, dtype=dtype)
        return cls(model, tokenizer, name=str(path))

    @torch.no_grad()
    def logprobs(self, ids: Sequence[int], top_k: int = 0) -> LogProbs:
        ids = list(ids)
        if len(ids) > self.max_length:
            raise ValueError(f"{len(ids)} tokens exceed the model's context of {self.max_length}")
        device = next(self.model.parameters()).device
        logits = self.model(torch.tensor([ids], device=device))[0].float().cpu()
        return logprobs_from_logits(logits, ids, top_k)

    @torch.no_grad()
    def logprobs_batch(self, sequences: list[Sequence[int]], top_k: int = 0,
                       max_batch_tokens: int = 16384) -> list[LogProbs]:
        """`logprobs` of many sequences, several per forward pass (right-padded, sorted by length).

        Right padding never changes the logits of the real positions of a causal model, so the results equal
        one-at-a-time `logprobs`; batching amortises per-op overhead, which dominates small models on a CPU.
        """
        for ids in sequences:
            if len(ids) > self.max_length:
                raise ValueError(f"{len(ids)} tokens exceed the model's context of {self.max_length}")
        device = next(self.model.parameters()).device
        order = sorted(range(len(sequences)), key=lambda i: -len(sequences[i]))
        out: list[LogProbs | None] = [None] * len(sequences)
        start = 0
        while start < len(order):
            width = len(sequences[order[start]])  # the longest of this batch (sorted descending)
            n = max(1, min(len(order) - start, max_batch_tokens // max(1, width)))
            batch = order[start:start + n]
            x = torch.zeros(len(batch), width, dtype=torch.long)
            for row, i in enumerate(batch):
                x[row, :len(sequences[i])] = torch.tensor(list(sequences[i]))
            logits = self.model(x.to(device)).float().cpu()
            for row, i in enumerate(batch):
                ids = list(sequences[i])
                out[i] = logprobs_from_logits(logits[row, :len(ids)], ids, top_k)
            start += n
        return out

    def _new_ids(self, prompt_ids, params: SamplingParams, first_allowed) -> Iterator[int]:
        return generate_ids(self.model, prompt_ids, params, use_cache=self.use_cache, first_allowed=first_allowed)
