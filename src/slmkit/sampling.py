"""Sampling: the parameters, the sampler chain (temperature, top-k, top-p), token healing, streaming text.

Every backend decodes with these parameters; `TextStream` turns new token ids into text, holding back only what
could still turn into a stop string or an incomplete UTF-8 character.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field

import torch


@dataclass
class SamplingParams:
    max_new_tokens: int = 128
    temperature: float = 0.8  # 0 = greedy
    top_k: int = 0  # 0 = off
    top_p: float = 1.0  # 1 = off
    stop: list[str] = field(default_factory=list)
    seed: int | None = None
    stop_at_eos: bool = True

    def __post_init__(self):
        if self.temperature < 0:
            raise ValueError("temperature must be >= 0")
        if not 0 < self.top_p <= 1:
            raise ValueError("top_p must be in (0, 1]")
        if self.top_k < 0 or self.max_new_tokens < 0:
            raise ValueError("top_k and max_new_tokens must be >= 0")


def sample_next(logits: torch.Tensor, p: SamplingParams, generator: torch.Generator | None) -> int:
    """One token id from a (vocab,) logits vector."""
    if p.temperature == 0:
        return int(logits.argmax())
    logits = logits.float() / p.temperature
    if p.top_k:
        kth = torch.topk(logits, min(p.top_k, logits.numel())).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = torch.softmax(logits, dim=-1)
    if p.top_p < 1.0:
        sorted_probs, order = probs.sort(descending=True)
        cum = sorted_probs.cumsum(0)
        # keep the smallest prefix whose mass reaches top_p (the first token always stays)
        drop = cum - sorted_probs >= p.top_p
        sorted_probs[drop] = 0
        probs = torch.zeros_like(probs).scatter_(0, order, sorted_probs)
    return int(torch.multinomial(probs, 1, generator=generator))


def heal_prompt(tokenizer, prompt_ids: list[int]) -> tuple[list[int], str, torch.Tensor | None]:
    """Token healing: drop the prompt's last token and allow only first tokens that start with its text.

    A prompt like "def " ends in a lone-space token that BPE training data almost never shows at a word boundary
    (it sees " name" as one token), so the model continues as if inside whitespace. Backing off one token and
    letting the model choose any token that begins with " " puts it back on its training distribution.
    """
    if len(prompt_ids) < 2 or prompt_ids[-1] in (tokenizer.bos_id, tokenizer.eos_id, tokenizer.pad_id):
        return prompt_ids, "", None
    prefix = tokenizer.decode([prompt_ids[-1]])
    if not prefix or "\ufffd" in prefix:
        return prompt_ids, "", None
    texts = _token_texts(tokenizer)
    allowed = torch.tensor([t.startswith(prefix) for t in texts], dtype=torch.bool)
    return prompt_ids[:-1], prefix, allowed


def _token_texts(tokenizer) -> list[str]:
    cached = getattr(tokenizer, "_slm_token_texts", None)
    if cached is None:
        cached = [tokenizer.decode([i]) for i in range(tokenizer.vocab_size)]
        tokenizer._slm_token_texts = cached
    return cached


def stream_text(tokenizer, new_ids: Iterator[int], params: SamplingParams, healed: str = "") -> Iterator[str]:
    """Turn a stream of new token ids (from any backend) into text pieces, applying the stop strings.

    `healed` is text the first new tokens repeat from the prompt (token healing); it is not emitted again.
    """
    text = TextStream(tokenizer, params.stop, healed)
    for tok in new_ids:
        piece = text.push(tok)
        if piece:
            yield piece
        if text.stopped:
            return
    if tail := text.finish():
        yield tail


class TextStream:
    """Incremental detokenization for one sequence: push token ids, get the text that is safe to show.

    Text is held back while it could still become a stop string, or ends in an incomplete UTF-8 character
    (which decodes to U+FFFD until its last byte arrives). After a stop string, `stopped` is set and the
    text before the stop string is all that was emitted.
    """

    def __init__(self, tokenizer, stop: list[str] | tuple[str, ...] = (), healed: str = ""):
        self.tokenizer, self.stop, self.healed = tokenizer, list(stop), healed
        self.ids: list[int] = []
        self.emitted = ""
        self.stopped = False
        self._hold = max((len(s) for s in self.stop), default=0)

    def push(self, tok: int) -> str:
        if self.stopped:
            return ""
        self.ids.append(tok)
        text = self.tokenizer.decode(self.ids)[len(self.healed):]
        for s in self.stop:
            cut = text.find(s, max(0, len(self.emitted) - len(s)))
            if cut != -1:
                self.stopped = True
                return self._emit(text[:cut]) if cut > len(self.emitted) else ""
        safe = len(text) - self._hold
        while safe > len(self.emitted) and text[safe - 1] == "\ufffd":
            safe -= 1
        return self._emit(text[:safe]) if safe > len(self.emitted) else ""

    def finish(self) -> str:
        """Everything still held back, once the sequence has ended without a stop string."""
        if self.stopped:
            return ""
        text = self.tokenizer.decode(self.ids)[len(self.healed):]
        return self._emit(text) if len(text) > len(self.emitted) else ""

    def _emit(self, upto: str) -> str:
        piece, self.emitted = upto[len(self.emitted):], upto
        return piece

