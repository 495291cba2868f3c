"""The one interface every language model speaks: slmkit's own, transformers, llama.cpp, a remote endpoint.

Evaluation, distillation teachers, serving and judges only ever see an `LM`:

    lm.tokenizer                         slmkit Tokenizer (None for a remote, text-only model)
    lm.logprobs(ids, top_k=0)            log p(ids[i] | ids[:i]) for every position i >= 1 (+ top-k alternatives)
    lm.score(context, continuation)      total log-prob of the continuation and whether greedy decoding gives it
    lm.score_many(pairs)                 the same for many (context, continuation) pairs, batched when possible
    lm.generate(prompts, params)         completions, one per prompt
    lm.stream(prompt, params)            the completion of one prompt, piece by piece

A backend implements `logprobs` and `stream_ids` (a token-id stream); text handling (stop strings, UTF-8
hold-back, token healing) and scoring are shared here so all backends behave identically.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from slmkit.chat import with_chat_stops
from slmkit.sampling import DEFAULTS, SamplingParams, heal_prompt, stream_text


@dataclass
class LogProbs:
    """Per-position log-probabilities of a token sequence (position i scores ids[i + 1] given ids[:i + 1])."""

    ids: list[int]  # the scored tokens: ids[1:]
    token_logprobs: np.ndarray  # (n,) float32
    top_ids: np.ndarray | None = None  # (n, k) int64, most likely first
    top_logprobs: np.ndarray | None = None  # (n, k) float32

    def __len__(self) -> int:
        return len(self.ids)


@dataclass
class Score:
    logprob: float  # sum of log p over the continuation's tokens
    is_greedy: bool  # every continuation token is the argmax at its position
    n_tokens: int


def logprobs_from_logits(logits: torch.Tensor, ids: Sequence[int], top_k: int = 0) -> LogProbs:
    """LogProbs of `ids` from the (len(ids), vocab) logits a model produced for them."""
    logp = torch.log_softmax(logits[:-1].float(), dim=-1)
    targets = torch.tensor(ids[1:], dtype=torch.long)
    token_lp = logp.gather(1, targets[:, None])[:, 0]
    out = LogProbs(ids=list(ids[1:]), token_logprobs=token_lp.numpy())
    if top_k:
        top = logp.topk(min(top_k, logp.shape[-1]), dim=-1)
        out.top_ids, out.top_logprobs = top.indices.numpy(), top.values.numpy()
    return out


def split_continuation(tokenizer, context: str, continuation: str) -> tuple[list[int], list[int]]:
    """Token ids of context and continuation as the model would see them written together.

    Encoding the joined text and cutting at the context's length keeps merges across the boundary the way the
    model saw them in training (lm-eval does the same); a leading bos is added when the model expects one.
    """
    bos = [tokenizer.bos_id] if tokenizer.add_bos else []
    whole = tokenizer.encode(context + continuation)
    ctx = tokenizer.encode(context)
    if whole[:len(ctx)] != ctx:  # a merge crossed the boundary: score the continuation on its own
        return bos + ctx, tokenizer.encode(continuation)
    return bos + ctx, whole[len(ctx):]


def end_ids(params: SamplingParams, *ids: int | None) -> set[int]:
    """The token ids that end a completion: with params.stop_at_eos, the model's eos and its bos (a model emits
    bos where a new document would begin: slmkit's data separates files with it)."""
    return {t for t in ids if t is not None} if params.stop_at_eos else set()


class LM:
    """Base class: subclasses set `name`, `tokenizer`, `max_length` and implement `logprobs` and `stream_ids`."""

    name: str = "lm"
    tokenizer = None
    max_length: int = 2048
    eos_id: int | None = None
    bos_id: int | None = None  # also ends a completion (see end_ids)
    instruction_tuned: bool = False  # expects chat-formatted prompts (set by load_lm from the model's record)
    # The model's own sampling defaults (SamplingParams fields, e.g. from generation_config.json; set by load_lm)
    generation_defaults: dict = {}

    # --- what a backend implements ----------------------------------------------------------------------

    def logprobs(self, ids: Sequence[int], top_k: int = 0) -> LogProbs:
        raise NotImplementedError(f"{type(self).__name__} cannot return log-probabilities")

    def logprobs_batch(self, sequences: list[Sequence[int]], top_k: int = 0) -> list[LogProbs]:
        """`logprobs` of several sequences; backends that can batch override this."""
        return [self.logprobs(ids, top_k=top_k) for ids in sequences]

    def stream_ids(self, prompt_ids: list[int], params: SamplingParams,
                 first_allowed: torch.Tensor | None) -> Iterator[int]:
        """Sampled token ids after `prompt_ids`, stopping at eos or bos (when params.stop_at_eos, see `end_ids`)
        or after max_new_tokens."""
        raise NotImplementedError

    # --- shared -----------------------------------------------------------------------------------------

    def sampling_params(self, **given) -> SamplingParams:
        """SamplingParams: every `given` field that is not None, over this model's own defaults
        (`generation_defaults`, from its generation_config.json), over llama.cpp's (sampling.DEFAULTS).

        What `slm generate`, `slm chat` and the server use when a user or a request leaves a field out, and what
        `stream`/`generate` use without params.
        """
        given = {k: v for k, v in given.items() if v is not None}
        return SamplingParams(**{**DEFAULTS, **self.generation_defaults, **given})

    def encode_prompt(self, prompt: str) -> list[int]:
        tok = self.tokenizer
        # A chat template may already start the text with the bos token; never add a second one.
        add_bos = tok.add_bos and not (tok.bos_token and prompt.startswith(tok.bos_token))
        return tok.encode(prompt, add_bos=add_bos)

    def stream(self, prompt: str, params: SamplingParams | None = None, heal: bool = False) -> Iterator[str]:
        """The completion of `prompt`, as text pieces while they are generated."""
        params = params or self.sampling_params()
        ids = self.encode_prompt(prompt)
        healed, allowed = "", None
        if heal:
            ids, healed, allowed = heal_prompt(self.tokenizer, ids)
        if len(ids) + params.max_new_tokens > self.max_length:
            ids = ids[-max(1, self.max_length - params.max_new_tokens):]
        yield from stream_text(self.tokenizer, self.stream_ids(ids, params, allowed), params, healed)

    def stream_chat(self, messages: list[dict], params: SamplingParams | None = None) -> Iterator[str]:
        """The assistant's reply to `messages` ([{"role", "content"}, ...]) as text pieces: the conversation
        through the model's chat template, ending with the assistant's turn (RemoteLM asks the server's chat API)."""
        if self.tokenizer is None or not self.tokenizer.chat_template:
            raise ValueError(f"{self.name} has no chat template; prompt it with plain text (--no-chat)")
        params = params or self.sampling_params()
        params = dataclasses.replace(params, stop=with_chat_stops(params.stop, self.tokenizer))
        return self.stream(self.tokenizer.apply_chat_template(messages, add_generation_prompt=True), params)

    def generate(self, prompts: list[str] | str, params: SamplingParams | None = None,
                 heal: bool = False) -> list[str]:
        """One completion per prompt (a single string prompt gives a one-element list)."""
        prompts = [prompts] if isinstance(prompts, str) else prompts
        return ["".join(self.stream(p, params, heal=heal)) for p in prompts]

    def score(self, context: str, continuation: str) -> Score:
        """log p(continuation | context) summed over its tokens, and whether it is the greedy continuation."""
        return self.score_many([(context, continuation)])[0]

    def score_many(self, requests: Sequence[tuple[str, str]]) -> list[Score]:
        """`score` of many (context, continuation) pairs, batched where the backend can.

        A context longer than the model's window loses its oldest tokens (the continuation is always kept).
        """
        pairs = [split_continuation(self.tokenizer, c, x) for c, x in requests]
        for ctx, cont in pairs:
            if cont and not ctx:
                raise ValueError("an empty context needs a tokenizer with a bos token to condition on")
        todo = [i for i, (_, cont) in enumerate(pairs) if cont]
        results = self.logprobs_batch([(pairs[i][0] + pairs[i][1])[-self.max_length:] for i in todo], top_k=1)
        scores = [Score(0.0, True, 0)] * len(pairs)
        for i, lp in zip(todo, results, strict=True):
            cont = pairs[i][1]
            n = len(cont)
            greedy = bool(np.all(lp.top_ids[-n:, 0] == np.asarray(cont)))
            scores[i] = Score(float(lp.token_logprobs[-n:].sum()), greedy, n)
        return scores

    def close(self) -> None:
        """Free what the backend holds (processes, memory); the LM is unusable afterwards."""

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.name!r})"
