"""Sampling: the parameters, the one sampler chain every backend applies, token healing, streaming text.

The chain, in order (the same in slmkit's sampler and in the llama.cpp sampler chain llamacpp_lm builds):
repetition penalty over the last `repeat_last_n` tokens, then temperature (0 = greedy), top-k, top-p, min-p, and
a (seeded) draw. Temperature comes before the truncations as in transformers, whose generation_config.json values
(a model's own defaults) were tuned that way; llama.cpp's own tools apply it after them, which moves the top-p
and min-p cut-offs a little.

`SamplingParams` says exactly how to sample: a truncation left out is off. What a user gets when they leave a
field out is `LM.sampling_params()`: the model's generation_config.json over `DEFAULTS`.

`TextStream` turns new token ids into text, holding back only what could still turn into a stop string or an
incomplete UTF-8 character.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

import torch

# llama.cpp's defaults (common/common.h): what a model without its own generation_config.json samples with.
# Plain temperature sampling draws from the whole vocabulary, whose long tail of unlikely tokens adds up to a
# real chance per step of derailing a small model; top-k and min-p cut that tail.
DEFAULTS = {"temperature": 0.8, "top_k": 40, "top_p": 0.95, "min_p": 0.05}


@dataclass
class SamplingParams:
    max_new_tokens: int = 128
    temperature: float = 0.8  # 0 = greedy
    top_k: int = 0  # 0 = off
    top_p: float = 1.0  # 1 = off
    min_p: float = 0.0  # drop tokens less likely than min_p x the most likely one; 0 = off
    repetition_penalty: float = 1.0  # CTRL / llama.cpp repeat_penalty; 1 = off
    repeat_last_n: int = 64  # how many of the last tokens (prompt + output) the penalty looks at
    stop: list[str] = field(default_factory=list)
    seed: int | None = None
    stop_at_eos: bool = True  # stop at the model's eos, and at its bos (slmkit's data separates files with bos)

    def __post_init__(self):
        if self.temperature < 0:
            raise ValueError("temperature must be >= 0")
        if not 0 < self.top_p <= 1:
            raise ValueError("top_p must be in (0, 1]")
        if not 0 <= self.min_p <= 1:
            raise ValueError("min_p must be in [0, 1]")
        if self.repetition_penalty <= 0:
            raise ValueError("repetition_penalty must be > 0 (1 = off)")
        if self.top_k < 0 or self.max_new_tokens < 0 or self.repeat_last_n < 0:
            raise ValueError("top_k, max_new_tokens and repeat_last_n must be >= 0")


def sample(logits: torch.Tensor, p: SamplingParams, generator: torch.Generator | None,
           recent: torch.Tensor | None = None) -> torch.Tensor:
    """One token id per row of (B, vocab) logits: a (B,) tensor. `recent` (B, n): the ids the repetition penalty
    looks at (the caller passes the last `p.repeat_last_n`)."""
    logits = _penalize(logits.float(), p, recent)
    if p.temperature == 0:
        return argmax(logits)
    return torch.multinomial(_truncated_probs(logits, p), 1, generator=generator)[:, 0]


def argmax(logits: torch.Tensor) -> torch.Tensor:
    """(B,) the index of each row's largest logit (the first, on ties), as `logits.argmax(-1)`. On the CPU through
    numpy: torch's CPU argmax is not vectorised (measured, 16 x 32,000 float32 logits on one AVX-512 core: 300 us,
    numpy's 25 us; 16 greedy rows through sample_next: 681 -> 158 us, ~7% of a stories15m serving step)."""
    if logits.device.type == "cpu" and logits.dtype == torch.float32:
        return torch.from_numpy(logits.detach().numpy().argmax(-1))
    return logits.argmax(-1)


def token_probs(logits: torch.Tensor, p: SamplingParams, recent: torch.Tensor | None = None) -> torch.Tensor:
    """The (B, vocab) distribution `sample` draws from, normalised: the whole chain applied to the logits, a point
    mass on the argmax at temperature 0. Speculative decoding compares a target's and a draft's with it."""
    logits = _penalize(logits.float(), p, recent)
    if p.temperature == 0:
        return torch.nn.functional.one_hot(argmax(logits), logits.shape[-1]).float()
    probs = _truncated_probs(logits, p)
    return probs / probs.sum(-1, keepdim=True)


def _penalize(logits: torch.Tensor, p: SamplingParams, recent: torch.Tensor | None) -> torch.Tensor:
    if p.repetition_penalty != 1.0 and recent is not None and recent.numel():
        # CTRL (Keskar et al. 2019), as llama.cpp and transformers apply it: a seen token's logit moves towards
        # "less likely" whatever its sign; each token once, however often it was seen.
        seen = logits.gather(-1, recent)
        logits = logits.scatter(-1, recent, torch.where(seen > 0, seen / p.repetition_penalty,
                                                        seen * p.repetition_penalty))
    return logits


def _truncated_probs(logits: torch.Tensor, p: SamplingParams) -> torch.Tensor:
    """Temperature, top-k, top-p, min-p (temperature > 0): probabilities, not renormalised after the cuts
    (torch.multinomial normalises)."""
    logits = logits / p.temperature
    if p.top_k:
        kth = torch.topk(logits, min(p.top_k, logits.shape[-1]), dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = torch.softmax(logits, dim=-1)
    if p.top_p < 1.0:
        sorted_probs, order = probs.sort(dim=-1, descending=True)
        cum = sorted_probs.cumsum(-1)
        # keep the smallest prefix whose mass reaches top_p (the first token always stays, even for a top_p
        # so small it is 0 in float32)
        drop = cum - sorted_probs >= p.top_p
        drop[..., 0] = False
        sorted_probs[drop] = 0
        probs = torch.zeros_like(probs).scatter_(-1, order, sorted_probs)
    if p.min_p > 0:
        probs = probs.masked_fill(probs < p.min_p * probs.amax(-1, keepdim=True), 0)
    return probs


def sample_next(logits: torch.Tensor, p: SamplingParams, generator: torch.Generator | None,
                recent: Sequence[int] = ()) -> int:
    """One token id from a (vocab,) logits vector; `recent`: the ids before it (the penalty reads the last
    `p.repeat_last_n`)."""
    seen = None
    if p.repetition_penalty != 1.0 and p.repeat_last_n:
        seen = torch.tensor([list(recent)[-p.repeat_last_n:]], dtype=torch.long)
    return int(sample(logits[None], p, generator, seen)[0])


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

    Each push decodes only the tokens since the last character boundary, with the chunk before them as context
    (the prefix/read-offset scheme of vLLM and transformers' TextStreamer; the context keeps a tokenizer's
    first-token rules, e.g. SentencePiece's leading space, where they were), so a token costs the same however
    long the sequence is. The text is the same as decoding every id at once.
    """

    def __init__(self, tokenizer, stop: list[str] | tuple[str, ...] = (), healed: str = ""):
        self.tokenizer, self.stop, self.healed = tokenizer, list(stop), healed
        self.ids: list[int] = []
        self.stopped = False
        self._hold = max((len(s) for s in self.stop), default=0)
        self._prefix = self._read = 0  # ids[_prefix:_read]: the context chunk; ids[_read:]: not yet committed
        self._prefix_text = ""  # decode(ids[_prefix:_read])
        self._skip = len(healed)  # characters of the healed prefix still to drop from the front
        self._buf = ""  # committed text from character _base on (kept from `_hold` before the emitted end)
        self._base = 0
        self.n_emitted = 0  # characters emitted so far

    def _text(self) -> str:
        """The text (after the healed prefix) from character `_base` on, the uncommitted tail included."""
        window = self.tokenizer.decode(self.ids[self._prefix:])
        new = window[len(self._prefix_text):] if window.startswith(self._prefix_text) else window
        if new and not new.endswith("\ufffd"):  # a character boundary: commit, this chunk is the next context
            self._prefix, self._read, self._prefix_text = self._read, len(self.ids), new
            cut = min(self._skip, len(new))
            self._skip -= cut
            self._buf += new[cut:]
            return self._buf
        return self._buf + new[self._skip:]

    def push(self, tok: int) -> str:
        if self.stopped:
            return ""
        self.ids.append(tok)
        text, base = self._text(), self._base
        for s in self.stop:
            cut = text.find(s, max(0, self.n_emitted - len(s) - base))
            if cut != -1:
                self.stopped = True
                return self._emit(text, cut) if cut + base > self.n_emitted else ""
        safe = len(text) - self._hold
        while safe + base > self.n_emitted and text[safe - 1] == "\ufffd":
            safe -= 1
        piece = self._emit(text, safe) if safe + base > self.n_emitted else ""
        # keep only what a stop string may still start in: the last `_hold` emitted characters and beyond. Only
        # committed text can go: what was emitted from the uncommitted tail (a space before an incomplete
        # character, say) is decoded again, with what completes it, at the next commit.
        drop = min(max(0, self.n_emitted - self._hold - self._base), len(self._buf))
        if drop:
            self._buf, self._base = self._buf[drop:], self._base + drop
        return piece

    def finish(self) -> str:
        """Everything still held back, once the sequence has ended without a stop string."""
        if self.stopped:
            return ""
        text = self._text()
        return self._emit(text, len(text)) if len(text) + self._base > self.n_emitted else ""

    def _emit(self, text: str, upto: int) -> str:
        """text[n_emitted:upto], in `text`'s coordinates (it starts at character `_base`)."""
        piece = text[self.n_emitted - self._base:upto]
        self.n_emitted = self._base + upto
        return piece
