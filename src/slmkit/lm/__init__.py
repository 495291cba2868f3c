"""One interface for every language model (see base.py); `load_lm` opens any model argument a user gives."""

from __future__ import annotations

import torch

from slmkit.lm.base import LM, LogProbs, Score

BACKENDS = ("auto", "torch", "hf", "llamacpp", "remote")

__all__ = ["BACKENDS", "LM", "LogProbs", "Score", "load_lm"]


def load_lm(spec: str, backend: str = "auto", device: str = "cpu", dtype: torch.dtype = torch.float32,
            **options) -> LM:
    """An LM for `spec`: a model or run directory, a .gguf file, a pulled name (`slm models`), or an
    http(s):// OpenAI-compatible endpoint.

    backend "auto" runs files and directories through slmkit's own model code (TorchLM) and URLs through
    RemoteLM; "hf" uses transformers, "llamacpp" llama-cpp-python (on the GGUF file, the one a pulled
    model keeps, or an f32 GGUF of a model directory written once into the cache). Extra `options` go to the
    backend's constructor (e.g. n_ctx for llamacpp, chat for remote).
    """
    from slmkit.hub import resolve_model
    if backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}; choose one of {', '.join(BACKENDS)}")
    ref = resolve_model(spec)
    lm = _open(ref, spec, backend, device, dtype, options)
    lm.instruction_tuned = _instruction_tuned(ref)
    return lm


def _instruction_tuned(ref) -> bool:
    from slmkit.checkpoint import read_provenance
    from slmkit.convert import looks_instruction_tuned
    if ref.kind == "dir":
        return bool(read_provenance(ref.location).get("instruction_tuned", False))
    return ref.kind == "gguf" and looks_instruction_tuned(ref.location)


def _open(ref, spec: str, backend: str, device: str, dtype: torch.dtype, options: dict) -> LM:
    if ref.kind == "remote" or backend == "remote":
        if ref.kind != "remote":
            raise ValueError(f"backend 'remote' needs an http(s):// URL, got {spec!r}")
        from slmkit.lm.remote_lm import RemoteLM
        return RemoteLM(ref.location, **options)
    if backend in ("auto", "torch"):
        from slmkit.lm.torch_lm import TorchLM
        return TorchLM.load(ref.location, device=device, dtype=dtype)
    if backend == "hf":
        if ref.kind != "dir":
            raise ValueError(f"backend 'hf' needs a model directory, got a GGUF file ({spec}); import it first "
                             "with `slm import FILE.gguf -o DIR`")
        from slmkit.lm.hf_lm import HFLM
        return HFLM(ref.location, device=device, dtype=dtype)
    from slmkit.lm.llamacpp_lm import LlamaCppLM
    return LlamaCppLM(ref.gguf_file(create=True), **options)
