"""Speculative decoding: a cheap draft proposes a few tokens, the target checks them all in one forward pass.

Leviathan et al. 2023 ("Fast Inference from Transformers via Speculative Decoding") and Chen et al. 2023
("Accelerating Large Language Model Decoding with Speculative Sampling"). Per step, with p the target's and q
the draft's distribution after the same sampler chain (`sampling.token_probs`: repetition penalty, temperature,
top-k, top-p, min-p), the draft proposes x_1..x_k (x_i ~ q_i), the target scores the context plus all k in one
forward, and for i = 1..k: keep x_i with probability min(1, p_i(x_i) / q_i(x_i)); at the first rejection draw
from the residual max(0, p_i - q_i) (normalised) and stop; when all k are kept, draw one bonus token from
p_{k+1}. Every emitted token is then distributed exactly as the target alone would sample it. Greedy decoding
(temperature 0) is the special case "keep x_i iff it is the target's argmax, else emit the argmax": the output
is the target's own greedy output, token for token.

Drafts: another slmkit model with the same tokenizer (`TorchLM`, its own KV cache), or "ngram", prompt lookup
(Saxena 2023, transformers' `prompt_lookup_num_tokens`): find the most recent earlier occurrence of the
context's last 3 (else 2, else 1) tokens and propose the tokens that followed it. Its proposal is a point mass
(q = 1 on the proposed token), which the same rule handles: keep with probability p(x), else draw from p with x
removed. It costs no model, and pays off where the output copies the context (code edits, extraction, quoting).

The target (and a model draft) is slmkit's own model (`TorchLM`), which scores the k drafted tokens in one
forward pass with its KV cache and rolls the cache back (`KVCache.length`) past the rejected ones, or a GGUF
through llama.cpp (`LlamaCppLM`), which evaluates them as one batch with every row's logits and drops the
rejected ones from its KV cache by sequence removal (`LlamaCppLM._eval_reusing_prefix`), or any transformers
causal LM (`HFLM`), whose DynamicCache is cropped back past the rejected ones (`HFWindow`); they mix. On
llama.cpp and transformers the probabilities come from slmkit's sampler chain over the backend's logits
(`sampling.token_probs`), so greedy output is the backend's own greedy output.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import torch

from slmkit.lm.base import LM, end_ids
from slmkit.lm.hf_lm import HFLM
from slmkit.lm.llamacpp_lm import LlamaCppLM
from slmkit.lm.torch_lm import TorchLM
from slmkit.model.decode import KVCache
from slmkit.sampling import SamplingParams, token_probs
from slmkit.tokenizer import check_same_tokenizer

NGRAM = "ngram"
NGRAM_MAX = 3  # the longest context suffix prompt lookup matches

# Adaptive k: draft the i-th token only while its chance of being reached and kept, alpha^i under a per-token
# acceptance rate alpha, is at least this (then a drafted token is accepted at least a third of the time).
MIN_REACH = 1 / 3
# The running acceptance rate forgets old steps at this rate per step (about the last 10 steps count), and
# starts from one pseudo-observation at 0.8 (k = 4 before anything is known).
DECAY, PRIOR = 0.9, 0.8


@dataclass
class SpeculativeStats:
    """What speculative decoding did, over every stream of this LM (assign a fresh one to start counting anew)."""

    drafted: int = 0  # tokens the draft proposed
    accepted: int = 0  # of them, kept by the target
    emitted: int = 0  # tokens generated (accepted + one per target forward)
    target_forwards: int = 0

    @property
    def acceptance_rate(self) -> float:
        return self.accepted / self.drafted if self.drafted else 0.0

    @property
    def tokens_per_forward(self) -> float:
        return self.emitted / self.target_forwards if self.target_forwards else 0.0

    def __str__(self) -> str:
        return (f"{self.acceptance_rate:.0%} of {self.drafted:,} drafted tokens accepted, "
                f"{self.tokens_per_forward:.2f} tokens per target forward")


@dataclass
class Acceptance:
    """The running per-token acceptance rate alpha that sets how many tokens to draft (see MIN_REACH)."""

    kept: float = PRIOR  # numerator and denominator, each decayed by DECAY per step
    checked: float = 1.0

    def draft_length(self, max_draft: int) -> int:
        """Tokens to draft next: the most whose chance of being reached and kept, alpha^i, is >= MIN_REACH."""
        alpha = self.kept / self.checked
        if alpha >= 1:
            return max_draft
        if alpha <= 0:
            return 1
        return max(1, min(max_draft, int(math.log(MIN_REACH) / math.log(alpha))))

    def observe(self, drafted: int, kept: int) -> None:
        if drafted:
            # the drafted tokens the target looked at: the kept ones and the first rejected (none after it)
            self.kept = DECAY * self.kept + kept
            self.checked = DECAY * self.checked + min(drafted, kept + 1)


class SpeculativeLM(LM):
    """`target` decoded speculatively with `draft` (a `TorchLM` sharing its tokenizer, or "ngram").

    Everything but `stream_ids` (log-probs, scoring, the attributes) is the target's; `max_draft`
    bounds the tokens drafted per step, adapted in between from the running acceptance rate (see MIN_REACH).
    """

    def __init__(self, target: LM, draft: LM | str, max_draft: int = 4):
        check_windowed(target, "target")
        if isinstance(draft, str):
            if draft != NGRAM:
                raise ValueError(f"unknown draft {draft!r}: give a model (same tokenizer as the target) or 'ngram'")
        else:
            check_windowed(draft, "draft")
            if draft is target:
                raise ValueError("the draft must be another model than the target (each keeps its own KV cache)")
            if (target.tokenizer is None) != (draft.tokenizer is None):
                raise ValueError(f"target {target.name} and draft {draft.name}: only one has a tokenizer to compare")
            if target.tokenizer is not None:
                check_same_tokenizer(target.tokenizer, draft.tokenizer, f"target {target.name}",
                                     f"draft {draft.name}", "A draft must read the target's token ids: use a model "
                                     "of the same family, or --draft ngram.")
        if max_draft < 1:
            raise ValueError(f"max_draft must be >= 1, got {max_draft}")
        self.target, self.draft, self.max_draft = target, draft, max_draft
        self.name = f"{target.name} (draft {draft if isinstance(draft, str) else draft.name})"
        for attr in ("tokenizer", "max_length", "eos_id", "bos_id", "instruction_tuned", "generation_defaults"):
            setattr(self, attr, getattr(target, attr))
        self.stats = SpeculativeStats()
        self.acceptance = Acceptance()

    def logprobs(self, ids, top_k: int = 0):
        return self.target.logprobs(ids, top_k)

    def logprobs_batch(self, sequences, top_k: int = 0):
        return self.target.logprobs_batch(sequences, top_k)

    def close(self) -> None:
        self.target.close()
        if isinstance(self.draft, LM):
            self.draft.close()

    def draft_length(self) -> int:
        return self.acceptance.draft_length(self.max_draft)

    def stream_ids(self, prompt_ids, params: SamplingParams, first_allowed) -> Iterator[int]:
        if isinstance(self.target, TorchLM):
            cfg = self.target.model.cfg
            ids = list(prompt_ids)[-cfg.max_seq_len:] or [cfg.bos_token_id or 0]  # as generate_ids
        elif isinstance(self.target, HFLM):
            ids = list(prompt_ids)[-self.target.max_length:]  # as torch_lm.decode crops it
        else:
            ids = list(prompt_ids)
        ends = end_ids(params, self.eos_id, self.bos_id)
        generator = torch.Generator().manual_seed(params.seed) if params.seed is not None else None
        cache_len = len(ids) + params.max_new_tokens
        target = window(self.target, cache_len)
        draft = window(self.draft, cache_len) if isinstance(self.draft, LM) else None
        vocab = target.vocab_size
        allowed = first_allowed
        emitted = 0
        while emitted < params.max_new_tokens:
            room = target.room(len(ids))  # never draft past a window slide: the target decodes as plain decode does
            if room < 1:
                return  # llama.cpp's context is full (LlamaCppLM.stream_ids stops there too)
            k = min(self.draft_length(), params.max_new_tokens - emitted - 1, room - 1)
            if draft is not None:
                drafted, q = propose_with_model(draft, ids, k, params, generator, allowed, vocab)
            else:
                drafted, q = prompt_lookup(ids, k), None
            logits = target.logits(ids + drafted, len(drafted) + 1)
            if allowed is not None:
                logits = torch.cat([logits[:1].masked_fill(~allowed, float("-inf")), logits[1:]])
                allowed = None
            p = torch.cat([token_probs(row[None], params, recent_ids(ids + drafted[:j], params))
                           for j, row in enumerate(logits)])
            new = verify(drafted, q, p, params.temperature == 0, generator)
            self._count(len(drafted), len(new))
            for tok in new:
                if tok in ends:
                    return
                yield tok
                ids.append(tok)
                emitted += 1

    def _count(self, drafted: int, new: int) -> None:
        kept = new - 1
        s = self.stats
        s.drafted, s.accepted, s.emitted, s.target_forwards = (s.drafted + drafted, s.accepted + kept,
                                                               s.emitted + new, s.target_forwards + 1)
        self.acceptance.observe(drafted, kept)


def verify(drafted: list[int], q: torch.Tensor | None, p: torch.Tensor, greedy: bool,
           generator: torch.Generator | None) -> list[int]:
    """The tokens one speculative step emits: the kept drafts, then one drawn by the target.

    p (m + 1, V): the target's distributions after the context and each drafted prefix; q (m, V): the draft's
    for each drafted token, or None for point masses (prompt lookup).
    """
    out = []
    for i, x in enumerate(drafted):
        if greedy:
            best = int(p[i].argmax())
            if x != best:
                return out + [best]
            out.append(x)
            continue
        qx = 1.0 if q is None else float(q[i, x])
        if float(torch.rand((), generator=generator)) * qx < float(p[i, x]):  # u < p/q, without dividing by 0
            out.append(x)
            continue
        residual = p[i].clone()
        if q is None:
            residual[x] = 0
        else:
            residual = (residual - q[i]).clamp(min=0)
        if float(residual.sum()) <= 0:  # p == q up to rounding: a rejection is then (almost) impossible
            residual = p[i]
        return out + [int(torch.multinomial(residual, 1, generator=generator))]
    last = p[len(drafted)]
    return out + [int(last.argmax()) if greedy else int(torch.multinomial(last, 1, generator=generator))]


def recent_ids(ids: list[int], params: SamplingParams) -> torch.Tensor | None:
    """The ids the repetition penalty looks at after `ids`, as `decode` passes them."""
    if params.repetition_penalty == 1.0 or not params.repeat_last_n:
        return None
    return torch.tensor([ids[-params.repeat_last_n:]], dtype=torch.long)


def propose_with_model(draft: CachedWindow, ids: list[int], k: int, params: SamplingParams,
                       generator: torch.Generator | None, allowed: torch.Tensor | None,
                       vocab: int) -> tuple[list[int], torch.Tensor]:
    """k tokens sampled from the draft model (its argmax when greedy), with the distributions q (k, vocab) they
    were drawn from, over the target's vocabulary (a model with the same tokenizer may pad its own)."""
    drafted: list[int] = []
    qs = []
    for i in range(k):
        logits = draft.logits(ids + drafted, 1)
        if allowed is not None and i == 0 and allowed.shape[-1] == logits.shape[-1]:
            logits = logits.masked_fill(~allowed, float("-inf"))
        drawn = draw_draft(logits, params, ids + drafted, vocab, generator)
        if drawn is None:
            break
        drafted.append(drawn[0])
        qs.append(drawn[1])
    return drafted, torch.stack(qs) if qs else torch.zeros(0, vocab)


def draw_draft(logits: torch.Tensor, params: SamplingParams, ids: list[int], vocab: int,
               generator: torch.Generator | None) -> tuple[int, torch.Tensor] | None:
    """One drafted token after `ids` from the draft's (1, V) `logits` (its argmax when greedy), and the
    distribution q (vocab,) it was drawn from over the target's `vocab`; None when all the draft's mass is on
    ids the target does not have."""
    probs = token_probs(logits, params, recent_ids(ids, params))[0]
    q = torch.zeros(vocab)
    n = min(vocab, probs.shape[0])
    q[:n] = probs[:n]
    if float(q.sum()) <= 0:
        return None
    tok = q.argmax() if params.temperature == 0 else torch.multinomial(q, 1, generator=generator)
    return int(tok), q


def prompt_lookup(ids: list[int], k: int, max_n: int = NGRAM_MAX) -> list[int]:
    """Up to k tokens that followed the most recent earlier occurrence of the context's last n tokens, for the
    longest n <= max_n that has one; [] when none does."""
    if k <= 0:
        return []
    for n in range(min(max_n, len(ids) - 1), 0, -1):
        tail = ids[-n:]
        for start in range(len(ids) - n - 1, -1, -1):
            if ids[start:start + n] == tail:
                return ids[start + n:start + n + k]
    return []


def check_windowed(lm, role: str) -> None:
    """`lm` can score drafted tokens in one pass and roll its KV cache back (a one-line error otherwise)."""
    if isinstance(lm, TorchLM):
        if not lm.use_cache:
            raise ValueError(f"speculative decoding needs the {role}'s KV cache: drop --no-cache")
    elif isinstance(lm, LlamaCppLM):
        if not lm.logits_all:
            raise ValueError(f"the {role} {lm.name} was opened with logits_all=False; speculative decoding reads "
                             "the logits of every drafted row")
    elif not isinstance(lm, HFLM):
        raise ValueError(f"speculative decoding needs slmkit's torch backend, llama.cpp or transformers for the "
                         f"{role} (it rolls back the KV cache), got {type(lm).__name__} for {lm.name}: use --backend "
                         "torch, llamacpp or hf")


def window(lm: LM, max_tokens: int):
    if isinstance(lm, LlamaCppLM):
        return LlamaCppWindow(lm)
    if isinstance(lm, HFLM):
        return HFWindow(lm)
    return CachedWindow(lm.model, max_tokens)


class LlamaCppWindow:
    """CachedWindow's interface over a `LlamaCppLM`: llama.cpp keeps the KV of the longest prefix the new list
    shares with what it evaluated last (sequence removal past it: the rejected drafts) and evaluates the rest as
    one batch, every row's logits kept. No window slides: generation ends at the context (n_ctx), as
    `LlamaCppLM.stream_ids` ends."""

    def __init__(self, lm: LlamaCppLM):
        self.lm, self.vocab_size = lm, lm.llm.n_vocab()

    def room(self, length: int) -> int:
        # rows after length .. n_ctx - 1 tokens: as LlamaCppLM.stream_ids, whose last token is read from the
        # logits after n_ctx - 1 tokens
        return self.lm.max_length - length

    def logits(self, ids: list[int], n: int) -> torch.Tensor:
        if n > self.room(len(ids) - n + 1):
            raise ValueError(f"{len(ids)} tokens exceed the context of {self.lm.max_length} (n_ctx)")
        self.lm._eval_reusing_prefix(ids)
        return torch.from_numpy(np.array(self.lm.llm.scores[len(ids) - n:len(ids)], dtype=np.float32))


class CachedWindow:
    """Next-token logits for one growing token list, through a KV cache that follows whatever list it is given.

    The cache keeps the tokens it was last fed; a call reuses their longest common prefix with the new list
    (dropping drafted tokens that were rejected is setting `KVCache.length` back) and feeds the rest. The window
    slides exactly as `torch_lm.decode` slides it (to its most recent half, the cache starting afresh, once the
    context exceeds the model's max_seq_len), so the target's logits are those plain decoding computes.
    """

    def __init__(self, model, max_tokens: int):
        weight = next(model.parameters())
        self.model, self.max_len = model.eval(), model.cfg.max_seq_len
        self.cache = KVCache(model.cfg, 1, min(self.max_len, max_tokens), device=weight.device, dtype=weight.dtype)
        self.device, self.vocab_size = weight.device, model.cfg.vocab_size
        self.start = 0  # where the window begins in the token list
        self.fed: list[int] = []  # the window's tokens the cache holds

    def room(self, length: int) -> int:
        """How many next-token rows one `logits` call can give from a list of `length` tokens on (the rows after
        length, length + 1, ... tokens), sliding the window first where plain decoding would."""
        if length - self.start > self.max_len:
            self.start, self.fed = length - self.max_len // 2, []
        return self.max_len - (length - self.start) + 1

    @torch.inference_mode()
    def logits(self, ids: list[int], n: int) -> torch.Tensor:
        """(n, vocab) float32 CPU logits: row j predicts the token after ids[:len(ids) - n + 1 + j]."""
        first = len(ids) - n + 1
        if n > self.room(first):
            raise ValueError(f"{n} rows from {first} tokens cross a window slide")
        window = ids[self.start:]
        reuse = min(len(self.fed), first - 1 - self.start)  # at least the token before the first row is fed
        if self.fed[:reuse] != window[:reuse]:
            reuse = next(i for i, (a, b) in enumerate(zip(self.fed, window, strict=False)) if a != b)
        out = self._forward(window[reuse:], reuse, n)
        self.fed = window
        return out

    def _forward(self, new: list[int], reuse: int, n: int) -> torch.Tensor:
        """The last n rows' logits after feeding `new` on top of the cache's first `reuse` tokens."""
        self.cache.length = reuse
        x = torch.tensor([new], device=self.device)
        # the output head on the n rows wanted only (a prefill would otherwise project the whole prompt)
        return self.model.lm_head(self.model.hidden_states(x, cache=self.cache)[0, -n:]).float().cpu()


class HFWindow(CachedWindow):
    """CachedWindow over a transformers model (`HFLM`): its DynamicCache cropped back to the reused prefix; the
    window slides at the model's max_position_embeddings, as HFLM.stream_ids (torch_lm.decode) slides it."""

    def __init__(self, lm: HFLM):
        self.model, self.max_len, self.device = lm.model, lm.max_length, lm.device
        self.vocab_size = lm.model.config.vocab_size
        self.cache = None  # transformers makes the DynamicCache on the first forward
        self.start, self.fed = 0, []

    def _forward(self, new: list[int], reuse: int, n: int) -> torch.Tensor:
        if reuse and self.cache is not None:
            self.cache.crop(reuse - self.cache.get_seq_length())  # (transformers 5: minus the tokens to drop)
        out = self.model(input_ids=torch.tensor([new], device=self.device),
                         past_key_values=self.cache if reuse else None, use_cache=True, logits_to_keep=n)
        self.cache = out.past_key_values
        return out.logits[0, -n:].float().cpu()
