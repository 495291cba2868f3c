"""Up-scaling (emulated fine-tuning): a large model steered by what fine-tuning taught a small one.

Mitchell et al. 2023 ("An Emulator for Fine-Tuning Large Language Models using Small Language Models", EFT) and
Liu et al. 2024 ("Tuning Language Models by Proxy", proxy-tuning). At every step

    log p(x) = log p_large(x) + beta * (log p_small_tuned(x) - log p_small_base(x)),  renormalised,

then the usual sampler chain (slmkit.sampling: repetition penalty, temperature, top-k, top-p, min-p; greedy at
temperature 0). beta = 1 emulates fine-tuning the large model the way the small one was tuned; beta = 0 is the
large model alone, exactly (the small models are not even run); beta > 1 pushes harder. What the sampler is given
is the large model's own logits plus the weighted difference of the small pair's log-probs: softmax of that is the
renormalised distribution above, and at beta = 0 it is the large model's logits bit for bit, so every truncation
and the repetition penalty act exactly as they would on the large model alone.

The three models must read the same token ids: their tokenizers are compared token by token
(`check_same_tokenizer`). Each is stepped with what its backend can give:

- slmkit's torch backend (`TorchLM`): its own KV cache (`speculative.CachedWindow`), one new token per step.
- transformers (`HFLM`): its own `past_key_values`, one new token per step.
- llama.cpp (`LlamaCppLM`): its context's KV cache, kept across steps by `_eval_reusing_prefix`.
- a remote OpenAI-compatible endpoint (`RemoteLM`, text only): per step one `/v1/completions` request with the
  context as text (token ids decoded with the local models' tokenizer), `max_tokens=1` and `logprobs=k`
  (`top_logprobs`, 20 by default: vLLM's limit; OpenAI's own API allows 5). Servers cache the shared prefix
  (llama.cpp's prompt cache, vLLM's prefix caching), but the whole text is sent each time. Its top tokens are
  mapped back to ids through the local tokenizer (a string that is not exactly one token there is dropped). Its
  tokenizer cannot be compared from here: a server running another tokenizer gives wrong, not failing, results.
- any other `LM`: `logprobs(ids, top_k=k)` on the whole context per step (correct, not incremental).

Top-k only members (remote ones and the fallback) are combined on the union of every member's top k tokens (of
the full-distribution members too), plus, when scoring, the scored token. A token of that union missing from a
member's list gets that member's floor: the least it could be and still be missing, no more than the k-th
listed log-prob and no more than the mass left outside the list, log(1 - sum of the listed probabilities);
i.e. the most a missing token could have, so a token one model never listed is not rewarded for it. Tokens
outside the union cannot be drawn. With full distributions everywhere (torch, transformers, llama.cpp) the
combination is exact over the whole vocabulary.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from slmkit.lm.base import LM, LogProbs, end_ids, logprobs_from_logits
from slmkit.lm.hf_lm import HFLM
from slmkit.lm.llamacpp_lm import LlamaCppLM
from slmkit.lm.remote_lm import RemoteLM
from slmkit.lm.torch_lm import TorchLM, decode, until_end
from slmkit.sampling import SamplingParams
from slmkit.tokenizer import check_same_tokenizer

TOP_LOGPROBS = 20  # what a top-k only member is asked for per step (vLLM's default max_logprobs)
SPEC_FIELDS = ("large", "small_base", "small_tuned", "beta", "backend", "top_logprobs")


@dataclass
class NextTokens:
    """One member's next-token scores at n positions: `values` (n, V) logits (or log-probs), -inf where unknown;
    `known` (n, V) bool: the ids a top-k only member listed, None when it gave the whole distribution."""

    values: torch.Tensor
    known: torch.Tensor | None = None


def combine(large: NextTokens, base: NextTokens | None, tuned: NextTokens | None, beta: float,
            top_k: int = TOP_LOGPROBS, include: torch.Tensor | None = None) -> torch.Tensor:
    """The up-scaled next-token logits (n, V): softmax of them is log p_large + beta (log p_tuned - log p_base),
    renormalised. `include` (n, V) bool: ids that must stay in the support of a top-k combination (a scored token).

    With full distributions the result is the large model's logits plus beta times the small pair's log-prob
    difference (at beta 0, or without a small pair, the large model's logits themselves). Otherwise it is the
    combination on the union of top-k sets described in the module docstring, -inf outside it.
    """
    if beta == 0 or base is None or tuned is None:
        return large.values
    members = (large, base, tuned)
    if all(m.known is None for m in members):
        return large.values + beta * (_log_softmax(tuned.values) - _log_softmax(base.values))
    support = torch.zeros_like(large.values, dtype=torch.bool)
    for m in members:
        if m.known is not None:
            support |= m.known
        else:
            top = m.values.topk(min(top_k, m.values.shape[-1]), dim=-1).indices
            support.scatter_(-1, top, True)
    if include is not None:
        support |= include
    lp_large, lp_base, lp_tuned = (_with_floor(m) for m in members)
    z = lp_large + beta * (lp_tuned - lp_base)
    return z.masked_fill(~support, float("-inf"))


def _log_softmax(x: torch.Tensor) -> torch.Tensor:
    return torch.log_softmax(x.double(), dim=-1).to(x.dtype)


def floor_logprob(listed: torch.Tensor) -> torch.Tensor:
    """(n, k) listed log-probs (-inf padding allowed) -> (n,) the most a token missing from the list can have:
    min(the k-th listed log-prob, log of the mass the list leaves)."""
    lowest = listed.masked_fill(torch.isinf(listed), float("inf")).amin(-1)
    left = torch.log1p(-torch.exp(torch.logsumexp(listed.double(), -1)).clamp(max=1 - 1e-12)).to(listed.dtype)
    return torch.minimum(lowest, left)


def _with_floor(m: NextTokens) -> torch.Tensor:
    if m.known is None:
        return _log_softmax(m.values)
    floor = floor_logprob(m.values.masked_fill(~m.known, float("-inf")))
    return torch.where(m.known, m.values, floor[:, None])


class UpscaledLM(LM):
    """`large` + beta x (`small_tuned` - `small_base`), step by step (see the module docstring).

    The LM interface is the large model's (its tokenizer, or the small models' when it is remote; its eos, chat
    template, sampling defaults); max_length is the smallest of the three. `top_logprobs`: the k a top-k only
    member is asked for, and the k of every member whose union forms the support of such a combination.
    """

    def __init__(self, large: LM, small_base: LM, small_tuned: LM, beta: float = 1.0,
                 top_logprobs: int = TOP_LOGPROBS):
        if not math.isfinite(beta):
            raise ValueError(f"beta must be a finite number, got {beta}")
        if top_logprobs < 1:
            raise ValueError(f"top_logprobs must be >= 1, got {top_logprobs}")
        roles = {"large": large, "small base": small_base, "small tuned": small_tuned}
        with_tok = [(role, lm) for role, lm in roles.items() if lm.tokenizer is not None]
        full = (TorchLM, HFLM, LlamaCppLM)
        if not with_tok and not all(isinstance(lm, full) for lm in roles.values()):
            raise ValueError("up-scaling a remote (text-only) model needs at least one local model with a tokenizer "
                             "to define the token ids")
        local_without = [f"{role} {lm.name}" for role, lm in roles.items()
                         if lm.tokenizer is None and not isinstance(lm, RemoteLM)]
        if with_tok and local_without:
            raise ValueError(f"{local_without[0]} has no tokenizer to compare with {with_tok[0][0]} "
                             f"{with_tok[0][1].name}'s")
        for role, lm in with_tok[1:]:
            first_role, first = with_tok[0]
            check_same_tokenizer(first.tokenizer, lm.tokenizer, f"{first_role} {first.name}", f"{role} {lm.name}",
                                 "Up-scaling adds log-probs token by token: the three models must share one "
                                 "tokenizer (a small pair from the large model's family, e.g. cut from it with "
                                 "`slm distill --student-from-teacher`).")
        self.large, self.small_base, self.small_tuned = large, small_base, small_tuned
        self.beta, self.top_logprobs = float(beta), int(top_logprobs)
        self.tokenizer = with_tok[0][1].tokenizer if with_tok else None
        self.name = f"{large.name} + {beta:g} x ({small_tuned.name} - {small_base.name})"
        self.max_length = min(lm.max_length for lm in roles.values())
        tok = large.tokenizer is None and self.tokenizer
        self.eos_id = tok.eos_id if tok else large.eos_id
        self.bos_id = tok.bos_id if tok else large.bos_id
        self.instruction_tuned = large.instruction_tuned
        self.generation_defaults = large.generation_defaults

    def _members(self) -> list[LM]:
        """The models a step runs: the large one alone at beta 0."""
        return [self.large] if self.beta == 0 else [self.large, self.small_base, self.small_tuned]

    def _combine(self, steps: list[NextTokens], include: torch.Tensor | None = None) -> torch.Tensor:
        width = min(s.values.shape[-1] for s in steps)  # a model may pad its vocabulary past the tokenizer's
        steps = [NextTokens(s.values[:, :width], None if s.known is None else s.known[:, :width]) for s in steps]
        if len(steps) == 1:
            return steps[0].values
        return combine(*steps, beta=self.beta, top_k=self.top_logprobs,
                       include=None if include is None else include[:, :width])

    def stream_ids(self, prompt_ids, params: SamplingParams, first_allowed) -> Iterator[int]:
        ids = list(prompt_ids)[-self.max_length:] or [self.bos_id if self.bos_id is not None else 0]
        cache_len = min(self.max_length, len(ids) + params.max_new_tokens)
        steppers = [stepper(lm, self.tokenizer, cache_len, self.top_logprobs) for lm in self._members()]

        def forward(window: torch.Tensor, cached: int) -> torch.Tensor:
            context = window[0].tolist()
            z = self._combine([s(context) for s in steppers])
            if first_allowed is not None and first_allowed.shape[-1] != z.shape[-1]:  # decode masks the first row
                return _fit(z, first_allowed.shape[-1])
            return z

        steps = decode(forward, torch.tensor([ids]), params, self.max_length, first_allowed=first_allowed)
        return until_end(steps, end_ids(params, self.eos_id, self.bos_id))

    def logprobs(self, ids: Sequence[int], top_k: int = 0) -> LogProbs:
        ids = list(ids)
        if len(ids) > self.max_length:
            raise ValueError(f"{len(ids)} tokens exceed the context of {self.max_length} (the smallest of the three)")
        rows = [sequence_scores(lm, ids, self.tokenizer, self.top_logprobs) for lm in self._members()]
        include = None
        if any(r.known is not None for r in rows):
            width = min(r.values.shape[-1] for r in rows)
            include = torch.zeros(len(ids), width, dtype=torch.bool)
            targets = torch.tensor([t for t in ids[1:] if t < width], dtype=torch.long)
            rows_idx = torch.tensor([i for i, t in enumerate(ids[1:]) if t < width], dtype=torch.long)
            include[rows_idx, targets] = True
        return logprobs_from_logits(self._combine(rows, include), ids, top_k)

    def close(self) -> None:
        closed = set()
        for lm in (self.large, self.small_base, self.small_tuned):
            if id(lm) not in closed:
                closed.add(id(lm))
                lm.close()


def _fit(z: torch.Tensor, width: int) -> torch.Tensor:
    if z.shape[-1] >= width:
        return z[..., :width]
    return torch.cat([z, z.new_full((*z.shape[:-1], width - z.shape[-1]), float("-inf"))], dim=-1)


# --- stepping one member ------------------------------------------------------------------------------------

def stepper(lm: LM, tokenizer, max_tokens: int, top_k: int):
    """A function: token list -> NextTokens (1 row) after it, incremental where the backend allows."""
    if isinstance(lm, TorchLM):
        from slmkit.lm.speculative import CachedWindow
        window = CachedWindow(lm.model, max_tokens)
        return lambda ids: NextTokens(window.logits(ids, 1))
    if isinstance(lm, HFLM):
        return _HFStepper(lm)
    if isinstance(lm, LlamaCppLM):
        return lambda ids: NextTokens(_llamacpp_next(lm, ids)[None])
    if isinstance(lm, RemoteLM):
        return lambda ids: _remote_next(lm, ids, tokenizer, top_k)
    return lambda ids: _top_k_row(lm.logprobs(ids + [0], top_k=top_k), -1, tokenizer.vocab_size)


class _HFStepper:
    """transformers' model with its own past_key_values, fed only the tokens a step adds."""

    def __init__(self, lm: HFLM):
        self.lm, self.fed, self.past, self.last = lm, [], None, None

    @torch.no_grad()
    def __call__(self, ids: list[int]) -> NextTokens:
        n = len(self.fed)
        if not (n and len(ids) >= n and ids[:n] == self.fed):
            self.fed, self.past, n = [], None, 0
        if len(ids) > n:
            x = torch.tensor([ids[n:]], device=self.lm.device)
            out = self.lm.model(input_ids=x, past_key_values=self.past, use_cache=True)
            self.past, self.last, self.fed = out.past_key_values, out.logits[0, -1:].float().cpu(), list(ids)
        return NextTokens(self.last)


def _llamacpp_next(lm: LlamaCppLM, ids: list[int]) -> torch.Tensor:
    """The (V,) logits after `ids`, through llama.cpp's KV cache (only the tokens not yet evaluated are)."""
    lm._eval_reusing_prefix(ids)
    llm = lm.llm
    if lm.logits_all:
        row = np.array(llm.scores[len(ids) - 1], dtype=np.float32)
    else:  # the one row the last batch kept
        row = np.ctypeslib.as_array(llm._ctx.get_logits(), shape=(llm.n_vocab(),)).astype(np.float32)
    return torch.from_numpy(row)


def _remote_next(lm: RemoteLM, ids: list[int], tokenizer, k: int) -> NextTokens:
    """The server's top-k next tokens after the text of `ids`, as ids of the local tokenizer."""
    if tokenizer.bos_id is not None and ids and ids[0] == tokenizer.bos_id:
        ids = ids[1:]  # the server adds its own
    body = {**lm.extra, "model": lm.model, "prompt": tokenizer.decode(ids), "max_tokens": 1, "temperature": 0.0,
            "logprobs": k}
    data = lm._json("POST", "/v1/completions", body)
    choices = data.get("choices") if isinstance(data, dict) else None
    lp = choices[0].get("logprobs") if choices and isinstance(choices[0], dict) else None
    tops = lp.get("top_logprobs") if isinstance(lp, dict) else None
    if not tops or not tops[0]:
        raise ValueError(f"{lm.root}/v1/completions returned no top_logprobs; up-scaling a remote model needs a "
                         "server that returns them (vLLM, llama.cpp's server, OpenAI's completions API)")
    top = tops[0]
    pairs = top.items() if isinstance(top, dict) else ((t.get("token"), t.get("logprob")) for t in top)
    values = torch.full((1, tokenizer.vocab_size), float("-inf"))
    for text, logprob in pairs:
        tid = _token_id(tokenizer, text)
        if tid is not None and logprob is not None and float(logprob) > values[0, tid]:
            values[0, tid] = float(logprob)
    return NextTokens(values, torch.isfinite(values))


def _token_id(tokenizer, text) -> int | None:
    """The id of `text` when it is exactly one token of `tokenizer` (cached per tokenizer)."""
    cache = getattr(tokenizer, "_slm_text_to_id", None)
    if cache is None:
        cache = tokenizer._slm_text_to_id = {}
    if text not in cache:
        ids = tokenizer.hf.encode(text, add_special_tokens=False).ids if isinstance(text, str) and text else []
        cache[text] = ids[0] if len(ids) == 1 else None
    return cache[text]


def _top_k_row(lp: LogProbs, row: int, vocab: int) -> NextTokens:
    values = torch.full((1, vocab), float("-inf"))
    ids = torch.as_tensor(lp.top_ids[row], dtype=torch.long)
    keep = ids < vocab
    values[0, ids[keep]] = torch.as_tensor(lp.top_logprobs[row], dtype=torch.float32)[keep]
    return NextTokens(values, torch.isfinite(values))


@torch.no_grad()
def sequence_scores(lm: LM, ids: list[int], tokenizer, top_k: int) -> NextTokens:
    """`lm`'s next-token scores at every position of `ids` (row i: after ids[:i + 1]), in one pass where the
    backend gives whole-sequence logits; a top-k only backend is stepped position by position."""
    if isinstance(lm, TorchLM):
        device = next(lm.model.parameters()).device
        return NextTokens(lm.model(torch.tensor([ids], device=device))[0].float().cpu())
    if isinstance(lm, HFLM):
        return NextTokens(lm.model(torch.tensor([ids], device=lm.device)).logits[0].float().cpu())
    if isinstance(lm, LlamaCppLM):
        if not lm.logits_all:
            raise ValueError(f"{lm.name}: scoring needs llama.cpp's logits at every position; open it with "
                             "logits_all=True")
        lm._eval_reusing_prefix(ids)
        return NextTokens(torch.from_numpy(np.array(lm.llm.scores[:len(ids)], dtype=np.float32)))
    if isinstance(lm, RemoteLM):
        rows = [_remote_next(lm, ids[:i + 1], tokenizer, top_k) for i in range(len(ids) - 1)]
    else:
        lp = lm.logprobs(ids + [0], top_k=top_k)
        rows = [_top_k_row(lp, i, tokenizer.vocab_size) for i in range(len(ids) - 1)]
    rows.append(rows[-1] if rows else NextTokens(torch.zeros(1, tokenizer.vocab_size)))  # nothing follows ids
    return NextTokens(torch.cat([r.values for r in rows]), torch.cat([r.known if r.known is not None
                                                                      else torch.ones_like(r.values, dtype=torch.bool)
                                                                      for r in rows]))


# --- opening ------------------------------------------------------------------------------------------------

def open_upscaled(large: str, small_base: str, small_tuned: str, beta: float = 1.0, backend: str = "auto",
                  small_backend: str | None = None, device: str = "cpu", dtype: torch.dtype = torch.float32,
                  top_logprobs: int = TOP_LOGPROBS) -> UpscaledLM:
    """An `UpscaledLM` from three model arguments (anything `load_lm` opens): `backend` for the large model,
    `small_backend` (default: the same) for the small pair."""
    small_backend = small_backend or backend
    return _open([(large, backend), (small_base, small_backend), (small_tuned, small_backend)], beta, device, dtype,
                 top_logprobs)


def _open(members: list[tuple[str, str]], beta: float, device: str, dtype: torch.dtype,
          top_logprobs: int) -> UpscaledLM:
    from slmkit.lm.resolve import load_lm
    opened: list[LM] = []
    try:
        for spec, backend in members:
            opened.append(load_lm(spec, backend=backend, device=device, dtype=dtype))
        return UpscaledLM(*opened, beta=beta, top_logprobs=top_logprobs)
    except BaseException:
        for lm in opened:
            lm.close()
        raise


def is_upscale_spec(spec: str) -> bool:
    """Whether a model argument names an up-scaling spec file (a .json file; see `read_spec`)."""
    return spec.lower().endswith(".json") and Path(spec).expanduser().is_file()


def read_spec(path: str | Path) -> dict:
    """The up-scaling spec in a JSON file, checked: the arguments of `open_upscaled`.

        {"large": "smollm2-135m-instruct", "small_base": "small-base", "small_tuned": "small-tuned/model",
         "beta": 1.0}

    Each model is anything `load_lm` opens (a path relative to the spec file's folder, else as given: a pulled
    name, a URL, a path from the current folder), or {"model": ..., "backend": ...} to choose its backend.
    Optional: "beta" (1.0), "top_logprobs" (20), "backend" (the default backend of all three).
    """
    path = Path(path).expanduser()
    try:
        spec = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(spec, dict):
        raise ValueError(f"{path}: an up-scaling spec is a JSON object with large, small_base, small_tuned")
    unknown = sorted(set(spec) - set(SPEC_FIELDS))
    if unknown:
        raise ValueError(f"{path}: unknown field {unknown[0]!r}; the fields are {', '.join(SPEC_FIELDS)}")
    out = {}
    for role in ("large", "small_base", "small_tuned"):
        member = spec.get(role)
        if isinstance(member, str):
            member = {"model": member}
        if not isinstance(member, dict) or not isinstance(member.get("model"), str) \
                or set(member) - {"model", "backend"}:
            raise ValueError(f"{path}: field {role!r} must be a model argument (a string) or "
                             "{\"model\": ..., \"backend\": ...}")
        local = path.parent / member["model"]
        out[role] = {"model": str(local) if local.exists() else member["model"], "backend": member.get("backend")}
    beta = spec.get("beta", 1.0)
    if isinstance(beta, bool) or not isinstance(beta, int | float):
        raise ValueError(f"{path}: field 'beta' must be a number, got {beta!r}")
    top = spec.get("top_logprobs", TOP_LOGPROBS)
    if isinstance(top, bool) or not isinstance(top, int) or top < 1:
        raise ValueError(f"{path}: field 'top_logprobs' must be a positive integer, got {top!r}")
    backend = spec.get("backend")
    if backend is not None and not isinstance(backend, str):
        raise ValueError(f"{path}: field 'backend' must be a string, got {backend!r}")
    return {**out, "beta": float(beta), "top_logprobs": top, "backend": backend}


def load_spec(path: str | Path, backend: str = "auto", device: str = "cpu",
              dtype: torch.dtype = torch.float32) -> UpscaledLM:
    """The `UpscaledLM` an up-scaling spec file describes (`read_spec`); `backend` is the default of members that
    name none, under the file's own "backend"."""
    spec = read_spec(path)
    default = spec["backend"] or backend
    members = [(spec[r]["model"], spec[r]["backend"] or default) for r in ("large", "small_base", "small_tuned")]
    return _open(members, spec["beta"], device, dtype, spec["top_logprobs"])
