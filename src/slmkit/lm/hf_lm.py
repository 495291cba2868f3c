"""`HFLM`: any local transformers causal-LM checkpoint as an `LM` (needs the `hf` extra)."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from pathlib import Path

import torch

from slmkit.lm.base import LM, LogProbs, end_ids, logprobs_from_logits
from slmkit.lm.torch_lm import decode, until_end
from slmkit.sampling import SamplingParams


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
        gen = self.model.generation_config
        eos = gen.eos_token_id
        self.eos_ids = [e for e in (eos if isinstance(eos, list) else [eos]) if e is not None]
        self.eos_id = self.eos_ids[0] if self.eos_ids else None
        self.bos_id = gen.bos_token_id

    @torch.no_grad()
    def logprobs(self, ids: Sequence[int], top_k: int = 0) -> LogProbs:
        ids = list(ids)
        logits = self.model(torch.tensor([ids], device=self.device)).logits[0].float().cpu()
        return logprobs_from_logits(logits, ids, top_k)

    def stream_ids(self, prompt_ids, params: SamplingParams, first_allowed) -> Iterator[int]:
        """slmkit's decoding loop and sampler (lm.torch_lm.decode) over transformers' forward pass."""
        past = None

        def forward(window: torch.Tensor, cached: int) -> torch.Tensor:
            nonlocal past
            out = self.model(input_ids=window[:, cached:].to(self.device), past_key_values=past if cached else None,
                             use_cache=True)
            past = out.past_key_values
            return out.logits[:, -1]

        steps = decode(forward, torch.tensor([list(prompt_ids)]), params, self.max_length, first_allowed=first_allowed)
        return until_end(steps, end_ids(params, *self.eos_ids, self.bos_id))
