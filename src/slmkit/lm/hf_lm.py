"""`HFLM`: any local transformers causal-LM checkpoint as an `LM` (needs the `hf` extra)."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from pathlib import Path

import torch

from slmkit.lm.base import LM, LogProbs, logprobs_from_logits
from slmkit.sampling import SamplingParams, sample_next


class HFLM(LM):
    def __init__(self, path, device: str = "cpu", dtype: torch.dtype = torch.float32):
        try:
            import transformers
        except ImportError as e:
            raise ImportError("the hf backend needs transformers: pip install 'slmkit[hf]'") from e
        from slmkit.tokenizer import load_tokenizer
        path = Path(path)
        # use_safetensors=True: never fall back to pickle weights.
        self.model = transformers.AutoModelForCausalLM.from_pretrained(
            path, dtype=dtype, use_safetensors=True).to(device).eval()
        self.tokenizer = load_tokenizer(path)
        self.name = str(path)
        self.device = device
        cfg = self.model.config
        self.max_length = getattr(cfg, "max_position_embeddings", None) or 2048
        eos = self.model.generation_config.eos_token_id
        self.eos_id = eos[0] if isinstance(eos, list) else eos

    @torch.no_grad()
    def logprobs(self, ids: Sequence[int], top_k: int = 0) -> LogProbs:
        ids = list(ids)
        logits = self.model(torch.tensor([ids], device=self.device)).logits[0].float().cpu()
        return logprobs_from_logits(logits, ids, top_k)

    @torch.no_grad()
    def stream_ids(self, prompt_ids, params: SamplingParams, first_allowed) -> Iterator[int]:
        gen = torch.Generator().manual_seed(params.seed) if params.seed is not None else None
        x, past = torch.tensor([prompt_ids], device=self.device), None
        for _ in range(params.max_new_tokens):
            out = self.model(input_ids=x, past_key_values=past, use_cache=True)
            past = out.past_key_values
            logits = out.logits[0, -1].float().cpu()
            if first_allowed is not None:
                logits = logits.masked_fill(~first_allowed, float("-inf"))
                first_allowed = None
            tok = sample_next(logits, params, gen)
            if params.stop_at_eos and tok == self.eos_id:
                return
            yield tok
            x = torch.tensor([[tok]], device=self.device)
