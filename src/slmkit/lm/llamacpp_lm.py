"""`LlamaCppLM`: a GGUF file through llama-cpp-python, the fast CPU path (needs the `llamacpp` extra).

Text is tokenized by slmkit's tokenizer rebuilt from the GGUF's own metadata (tests check it splits exactly
like llama.cpp), and token ids go to llama.cpp; so every backend sees the same ids for the same text.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np
import torch

from slmkit.generate import SamplingParams
from slmkit.lm.base import LM, LogProbs, logprobs_from_logits


class LlamaCppLM(LM):
    def __init__(self, path, n_ctx: int | None = None, n_threads: int | None = None, logits_all: bool = True):
        try:
            import llama_cpp
        except ImportError as e:
            raise ImportError("the llamacpp backend needs llama-cpp-python: pip install 'slmkit[llamacpp]' "
                              "(it compiles llama.cpp, ~8 minutes on 2 cores)") from e
        import gguf

        from slmkit.gguf_io import read_gguf_tokenizer
        path = Path(path)
        reader = gguf.GGUFReader(str(path))
        self.tokenizer = read_gguf_tokenizer(reader, path)
        trained_ctx = None
        if (f := reader.fields.get("llama.context_length")) is not None:
            trained_ctx = int(f.contents())
        self.max_length = n_ctx or min(trained_ctx or 2048, 2048)
        # logits_all keeps every position's logits (needed for logprobs/score); generation only reads the last.
        self.llm = llama_cpp.Llama(model_path=str(path), n_ctx=self.max_length,
                                   n_threads=n_threads or os.cpu_count(), n_batch=min(512, self.max_length),
                                   logits_all=logits_all, verbose=False)
        self.name = str(path)
        self.eos_id = self.llm.token_eos()
        self.logits_all = logits_all

    def logprobs(self, ids: Sequence[int], top_k: int = 0) -> LogProbs:
        ids = list(ids)
        if not self.logits_all:
            raise ValueError("this LlamaCppLM was opened with logits_all=False; open it with logits_all=True")
        if len(ids) > self.max_length:
            raise ValueError(f"{len(ids)} tokens exceed the context of {self.max_length} (n_ctx)")
        self._eval_reusing_prefix(ids)
        logits = torch.from_numpy(np.array(self.llm.scores[: len(ids)], dtype=np.float32))
        return logprobs_from_logits(logits, ids, top_k)

    def _eval_reusing_prefix(self, ids: list[int]) -> None:
        """Evaluate `ids`, keeping the KV cache of a shared prefix with the previous call.

        Scoring several continuations of one context (the choices of a multiple-choice question) then computes
        the context once. At least the last token is evaluated again so that its logits are fresh.
        """
        llm = self.llm
        keep = 0
        for a, b in zip(llm.input_ids[: llm.n_tokens], ids[:-1], strict=False):
            if a != b:
                break
            keep += 1
        if keep and llm._ctx.kv_cache_seq_rm(-1, keep, -1):
            llm.n_tokens = keep
        else:
            llm.reset()
        llm.eval(ids[llm.n_tokens:])

    def _new_ids(self, prompt_ids, params: SamplingParams, first_allowed) -> Iterator[int]:
        if params.seed is not None:
            self.llm.set_seed(params.seed)
        # temp 0 is llama.cpp's greedy sampler; neutral repeat penalty and min_p so that the sampling is
        # exactly temperature / top-k / top-p, as in the other backends.
        tokens = self.llm.generate(list(prompt_ids), temp=params.temperature, top_k=params.top_k or 0,
                                   top_p=params.top_p, min_p=0.0, repeat_penalty=1.0, reset=True,
                                   logits_processor=_first_token_mask(first_allowed))
        for n, tok in enumerate(tokens):
            if n >= params.max_new_tokens:
                return
            if params.stop_at_eos and tok == self.eos_id:
                return
            yield int(tok)
            if len(prompt_ids) + n + 1 >= self.max_length:
                return

    def close(self) -> None:
        self.llm.close()


def _first_token_mask(allowed: torch.Tensor | None):
    """A llama-cpp-python logits processor restricting only the first sampled token (token healing)."""
    if allowed is None:
        return None
    import llama_cpp
    mask = allowed.numpy()
    used = []

    def restrict(input_ids, scores):
        if used:
            return scores
        used.append(True)
        keep = np.zeros(len(scores), dtype=bool)
        keep[: len(mask)] = mask[: len(scores)]
        return np.where(keep, scores, -np.inf).astype(scores.dtype)

    return llama_cpp.LogitsProcessorList([restrict])
