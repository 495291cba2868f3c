"""`TorchLM`: slmkit's own model as an `LM` (the reference backend: CPU or GPU, every feature)."""

from __future__ import annotations

import logging
from collections.abc import Iterator, Sequence
from pathlib import Path

import torch

from slmkit.lm.base import LM, LogProbs, end_ids, logprobs_from_logits
from slmkit.model.decode import KVCache, prepare_for_decoding, unfuse_projections
from slmkit.model.llama import Transformer
from slmkit.model.lora import find_adapter_dir, load_adapter
from slmkit.sampling import SamplingParams, sample


class TorchLM(LM):
    def __init__(self, model: Transformer, tokenizer, name: str = "torch", use_cache: bool = True):
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.name = name
        self.use_cache = use_cache
        self.max_length = model.cfg.max_seq_len
        self.eos_id = model.cfg.eos_token_id
        self.bos_id = model.cfg.bos_token_id

    @classmethod
    def load(cls, path, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32,
             weights: str | None = None, use_cache: bool = True) -> TorchLM:
        """From a model directory, a run directory or a GGUF file (dequantized to `dtype`), prepared for
        decoding (fused projections, see model.prepare_for_decoding).
        weights="int8": projections and LM head quantized to int8 per channel (quantize.py), for decoding."""
        from slmkit.formats import load_any
        if weights not in (None, "int8"):
            raise ValueError(f"unknown weights {weights!r}: the torch backend quantizes to 'int8' only")
        model, tokenizer = load_any(path, device=device, dtype=dtype)
        lm = cls(prepare_for_decoding(model), tokenizer, name=str(path), use_cache=use_cache)
        if weights == "int8":
            from slmkit.model.quantize import calibration_ids, quantize_int8
            check = calibration_ids(tokenizer, min(512, model.cfg.max_seq_len)) if tokenizer is not None else None
            lm.quantization = quantize_int8(model, check)
            if lm.quantization["kernel"] == "weight-only" and "loss_int8_dynamic" in lm.quantization:
                q = lm.quantization
                logging.getLogger(__name__).warning(
                    "int8 with int8 activations raised the calibration loss %.3f -> %.3f (over 1%%); using "
                    "weight-only int8 (%.3f): a quarter of the memory, not faster on a CPU",
                    q["loss_fp32"], q["loss_int8_dynamic"], q["loss_int8"])
        return lm

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
        Scoring ids[i] needs the logits of ids[:i] only, so sequences that differ only in their last token
        (the lettered answers of a multiple-choice question) share one forward pass over ids[:-1].
        """
        for ids in sequences:
            if len(ids) > self.max_length:
                raise ValueError(f"{len(ids)} tokens exceed the model's context of {self.max_length}")
        device = next(self.model.parameters()).device
        prefixes = list(dict.fromkeys(tuple(ids[:-1]) for ids in sequences))
        prefix_logits: dict[tuple, torch.Tensor] = {}
        order = sorted(prefixes, key=len, reverse=True)
        start = 0
        while start < len(order):
            width = max(1, len(order[start]))  # the longest of this batch (sorted descending)
            batch = order[start:start + max(1, max_batch_tokens // width)]
            x = torch.zeros(len(batch), width, dtype=torch.long)
            for row, prefix in enumerate(batch):
                x[row, :len(prefix)] = torch.tensor(prefix, dtype=torch.long)
            logits = self.model(x.to(device)).float().cpu()
            for row, prefix in enumerate(batch):
                prefix_logits[prefix] = logits[row, :len(prefix)]
            start += len(batch)
        out = []
        for ids in sequences:
            ids = list(ids)
            logits = prefix_logits[tuple(ids[:-1])]
            # logprobs_from_logits takes one row per token and ignores the last (nothing follows it)
            out.append(logprobs_from_logits(torch.cat([logits, logits[-1:]]), ids, top_k))
        return out

    def stream_ids(self, prompt_ids, params: SamplingParams, first_allowed) -> Iterator[int]:
        return generate_ids(self.model, prompt_ids, params, use_cache=self.use_cache, first_allowed=first_allowed)

    @torch.inference_mode()
    def embed(self, texts: list[str], batch_size: int = 16) -> torch.Tensor:
        """One unit-length vector per text, a (len(texts), dim) float32 CPU tensor.

        A text's vector is its final-norm hidden states (after the last layer and norm, before the output head)
        averaged over all its positions, then L2-normalised, so dot products are cosine similarities. Each text
        is encoded as a prompt (with bos when the model uses one). Texts run `batch_size` at a time, sorted by
        length and padded on the right: attention is causal, so a text's positions never see the padding after
        them, and the mean is over its own positions only (the same vectors as one at a time, to float rounding).
        """
        device = next(self.model.parameters()).device
        ids = []
        for i, text in enumerate(texts):
            ids.append(self.encode_prompt(text))
            if not ids[-1]:
                raise ValueError(f"text {i} is empty: nothing to embed")
            if len(ids[-1]) > self.max_length:
                raise ValueError(f"text {i} has {len(ids[-1])} tokens, more than the model's context of "
                                 f"{self.max_length}")
        out = torch.empty(len(texts), self.model.cfg.dim)
        order = sorted(range(len(texts)), key=lambda i: len(ids[i]))
        for start in range(0, len(order), batch_size):
            rows = order[start:start + batch_size]
            width = len(ids[rows[-1]])
            x = torch.zeros(len(rows), width, dtype=torch.long)
            mask = torch.zeros(len(rows), width)
            for r, i in enumerate(rows):
                x[r, :len(ids[i])] = torch.tensor(ids[i])
                mask[r, :len(ids[i])] = 1.0
            h = self.model.hidden_states(x.to(device)).float().cpu()
            mean = (h * mask[..., None]).sum(dim=1) / mask.sum(dim=1, keepdim=True)
            out[rows] = torch.nn.functional.normalize(mean, dim=1)
        return out


# inference_mode, not no_grad: cheaper per op (~10% of a batch-1 CPU decoding step). The tokens it yields are
# ordinary tensors once the caller copies them (torch.cat/stack outside inference mode), so training can use them.
@torch.inference_mode()
def decode(forward, prompts: torch.Tensor, params: SamplingParams, max_len: int,
           generator: torch.Generator | None = None,
           first_allowed: torch.Tensor | None = None) -> Iterator[torch.Tensor]:
    """The one decoding loop: for B prompts of equal length (B, T), the (B,) next tokens per step, for
    `params.max_new_tokens` steps (no eos handling: callers of one sequence stop it, see `until_end`).

    `forward(window, cached)` returns the (B, vocab) logits after `window` (B, L), having already seen its first
    `cached` tokens (0: start afresh), so a backend with a KV cache feeds only window[:, cached:] and one without
    feeds it all. When the context would exceed `max_len`, the window slides to its most recent half (and the
    cache starts afresh), the same way with and without a cache, so both decode token-for-token identically.
    `first_allowed` (bool over the vocabulary) restricts the first token (token healing). `generator` defaults
    to one seeded with params.seed.
    """
    ids = prompts.cpu()[:, -max_len:]
    if generator is None and params.seed is not None:
        generator = torch.Generator().manual_seed(params.seed)
    last_n = params.repeat_last_n if params.repetition_penalty != 1.0 else 0
    start, cached = 0, 0
    for _ in range(params.max_new_tokens):
        if ids.shape[1] - start > max_len:
            start, cached = ids.shape[1] - max_len // 2, 0
        logits = forward(ids[:, start:], cached).cpu()
        cached = ids.shape[1] - start
        if first_allowed is not None:
            logits = logits.masked_fill(~first_allowed, float("-inf"))
            first_allowed = None
        tok = sample(logits, params, generator, ids[:, -last_n:] if last_n else None)
        yield tok
        ids = torch.cat([ids, tok[:, None]], dim=1)


def until_end(steps: Iterator[torch.Tensor], ends: set[int]) -> Iterator[int]:
    """The token ids of a one-sequence `decode`, up to (not including) the first of `ends`."""
    for step in steps:
        tok = int(step[0])
        if tok in ends:
            return
        yield tok


def generate_batch(model: Transformer, prompts: torch.Tensor, params: SamplingParams,
                   generator: torch.Generator | None = None, use_cache: bool = True,
                   first_allowed: torch.Tensor | None = None) -> Iterator[torch.Tensor]:
    """`decode` with slmkit's model: B prompts of equal length (B, T) -> (B,) new tokens per step.

    Puts the model in eval mode (a caller that trains restores its mode). Without the cache every step re-runs
    the whole (cropped) context.
    """
    model.eval()
    device, dtype = next(model.parameters()).device, next(model.parameters()).dtype
    max_len = model.cfg.max_seq_len
    # the model never sees more than this many positions at once
    cache_len = min(max_len, max(1, prompts.shape[1]) + params.max_new_tokens)
    cache = KVCache(model.cfg, prompts.shape[0], cache_len, device=device, dtype=dtype) if use_cache else None

    def forward(window: torch.Tensor, cached: int) -> torch.Tensor:
        if cache is None:
            return model(window.to(device))[:, -1]
        cache.length = cached
        return model(window[:, cached:].to(device), cache=cache)[:, -1]

    return decode(forward, prompts, params, max_len, generator, first_allowed)


def generate_ids(model: Transformer, prompt_ids: list[int], params: SamplingParams, use_cache: bool = True,
                 first_allowed: torch.Tensor | None = None) -> Iterator[int]:
    """New token ids after `prompt_ids`, ending at the model's eos or bos when params.stop_at_eos."""
    cfg = model.cfg
    prompt = torch.tensor([list(prompt_ids)[-cfg.max_seq_len:] or [cfg.bos_token_id or 0]])
    steps = generate_batch(model, prompt, params, use_cache=use_cache, first_allowed=first_allowed)
    return until_end(steps, end_ids(params, cfg.eos_token_id, cfg.bos_token_id))


def apply_adapter(lm, adapter: str | Path):
    """Put a LoRA adapter (or a LoRA run's) on an open LM, unmerged: `generate/serve --adapter`."""
    from slmkit.formats.hf_dir import read_provenance
    if not isinstance(lm, TorchLM):
        raise ValueError("--adapter runs on slmkit's torch backend; use --backend torch, or `slm merge` first")
    from slmkit.model.quantize import Int8Linear
    if any(isinstance(m, Int8Linear) for m in lm.model.modules()):
        raise ValueError("--adapter needs float weights; `slm merge` the adapter first to serve it with int8 weights")
    adapter = find_adapter_dir(adapter)
    unfuse_projections(lm.model)  # LoRA wraps q_proj, up_proj, ...: back to the separate projections
    load_adapter(lm.model, adapter)
    lm.instruction_tuned = lm.instruction_tuned or read_provenance(adapter).get("instruction_tuned", False)
    return lm


def load_adapters(lm, adapters: dict[str, str | Path]):
    """Put several LoRA adapters on an open LM at once, each chosen per request (`serve --adapter NAME=DIR`):
    `lm.adapters` is their AdapterBank (model/multi_lora.py); `with lm.adapters.use(NAME): lm.generate(...)`
    runs one of them, and the serving engine picks one per batch row."""
    from slmkit.model.multi_lora import add_adapters
    from slmkit.model.quantize import Int8Linear
    if not isinstance(lm, TorchLM):
        raise ValueError("--adapter NAME=DIR runs on slmkit's torch backend; use --backend torch")
    if any(isinstance(m, Int8Linear) for m in lm.model.modules()):
        raise ValueError("--adapter NAME=DIR needs float weights (fp32 or bf16), not int8")
    unfuse_projections(lm.model)  # the adapters wrap q_proj, up_proj, ...: back to the separate projections
    lm.adapters = add_adapters(lm.model, adapters)
    return lm
