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

    def _new_ids(self, prompt_ids, params: SamplingParams, first_allowed) -> Iterator[int]:
        return generate_ids(self.model, prompt_ids, params, use_cache=self.use_cache, first_allowed=first_allowed)
