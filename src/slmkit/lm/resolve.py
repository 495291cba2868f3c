"""`load_lm`: any model argument a user gives (directory, file, pulled name, URL) opened with the right backend."""

from __future__ import annotations

import importlib.util
import logging
from pathlib import Path

import torch

from slmkit.lm.base import LM

BACKENDS = ("auto", "torch", "hf", "llamacpp", "remote")


WEIGHTS = ("fp32", "bf16", "int8")


def load_lm(spec: str, backend: str = "auto", device: str = "cpu", dtype: torch.dtype = torch.float32,
            weights: str = "fp32", adapter: str | Path | None = None, draft: str | None = None, draft_k: int = 4,
            adapters: dict[str, str | Path] | None = None, **options) -> LM:
    """An LM for `spec`: a model or run directory, a .gguf file, a pulled name (`slm models`), or an
    http(s):// OpenAI-compatible endpoint.

    backend "auto" runs files and directories through slmkit's own model code (TorchLM) and URLs through
    RemoteLM; "hf" uses transformers, "llamacpp" llama-cpp-python (on the GGUF file, the one a pulled
    model keeps, or an f32 GGUF of a model directory written once into the cache). Extra `options` go to the
    backend's constructor (e.g. n_ctx for llamacpp, chat for remote). `weights` bf16 or int8 (per-channel,
    quantize.py) is for slmkit's torch backend; llama.cpp's counterpart is a q8_0 GGUF (`slm export --quant`).
    `adapter`: a LoRA adapter directory (PEFT format, or a LoRA run) applied unmerged: by slmkit's model on the
    torch backend, by llama.cpp on "llamacpp" (written once as a LoRA GGUF for the base, hub.lora_gguf; a LoRA
    GGUF file is taken as it is).
    `adapters`: {name: directory}, several adapters loaded side by side, one chosen per request or per batch row
    (`lm.adapters`, model/multi_lora.py; torch backend).
    `draft`: decode speculatively (lm/speculative.py) with this model (same tokenizer; opened through llama.cpp
    for a llama.cpp target, else on the torch backend with the same device and dtype) or "ngram" (prompt lookup),
    drafting up to `draft_k` tokens a step.
    A `.json` file is an up-scaling spec (lm/upscale.py, `read_spec`): a large model steered by a small tuned/base
    pair, each opened here, `backend` being the default of those the file gives none.
    """
    from slmkit.hub import resolve_model
    if backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}; choose one of {', '.join(BACKENDS)}")
    from slmkit.lm.upscale import is_upscale_spec, load_spec
    if is_upscale_spec(spec):
        if weights != "fp32" or adapter is not None or adapters or draft is not None or options:
            raise ValueError(f"{spec} is an up-scaling spec: weights, adapters, drafts and backend options apply to "
                             "its member models, not to it (open those yourself and build an UpscaledLM)")
        return load_spec(spec, backend=backend, device=device, dtype=dtype)
    if weights not in WEIGHTS:
        raise ValueError(f"unknown weights {weights!r}; choose one of {', '.join(WEIGHTS)}")
    if adapters and (adapter is not None or draft is not None):
        raise ValueError("adapters chosen per request (NAME=DIR) go with neither a single --adapter DIR nor --draft")
    ref = resolve_model(spec)
    if weights != "fp32":
        if backend not in ("auto", "torch") or ref.kind == "remote":
            raise ValueError(f"--weights {weights} is for the torch backend; for llama.cpp use a q8_0 GGUF "
                             "(slm export MODEL -o FILE.gguf --quant q8_0)")
        backend = "torch"
        if weights == "bf16":
            dtype = torch.bfloat16
        else:
            options["weights"] = "int8"
    if adapters and backend == "llamacpp":
        raise ValueError("adapters chosen per request (NAME=DIR) run on slmkit's torch engine (--backend torch) or "
                         "on llama-server (`slm serve --backend llama-server`), not in-process llama.cpp")
    if adapter is not None and backend == "llamacpp":
        from slmkit.hub import lora_gguf
        if ref.kind == "remote":
            raise ValueError(f"{spec}: a remote endpoint's model takes no --adapter")
        options["lora_path"] = lora_gguf(adapter, ref.gguf_file(create=True))
    lm = _open(ref, spec, backend, device, dtype, options)
    lm.instruction_tuned = _instruction_tuned(ref)
    lm.generation_defaults = _generation_defaults(ref)
    if adapter is not None and "lora_path" in options:
        lm.instruction_tuned = lm.instruction_tuned or _adapter_instruction_tuned(adapter)
    elif adapter is not None:
        from slmkit.lm.torch_lm import apply_adapter
        try:
            apply_adapter(lm, adapter)
        except BaseException:
            lm.close()
            raise
    if adapters:
        from slmkit.lm.torch_lm import load_adapters
        try:
            load_adapters(lm, adapters)
        except BaseException:
            lm.close()
            raise
    if draft is not None:
        try:
            return _speculative(lm, draft, draft_k, device, dtype)
        except BaseException:
            lm.close()
            raise
    return lm


def _speculative(target: LM, draft: str, draft_k: int, device: str, dtype: torch.dtype) -> LM:
    from slmkit.lm.speculative import NGRAM, SpeculativeLM
    if draft == NGRAM:
        return SpeculativeLM(target, draft, max_draft=draft_k)
    from slmkit.lm.hf_lm import HFLM
    from slmkit.lm.llamacpp_lm import LlamaCppLM
    # the draft runs where the target runs: llama.cpp beside llama.cpp, transformers beside transformers (a
    # model slmkit's own code may not load), else slmkit's torch backend
    backend = "llamacpp" if isinstance(target, LlamaCppLM) else "hf" if isinstance(target, HFLM) else "torch"
    options = {} if backend == "llamacpp" else {"device": device, "dtype": dtype}
    draft_lm = load_lm(draft, backend=backend, **options)
    try:
        return SpeculativeLM(target, draft_lm, max_draft=draft_k)
    except BaseException:
        draft_lm.close()
        raise


def _adapter_instruction_tuned(adapter) -> bool:
    from slmkit.formats.hf_dir import read_provenance
    from slmkit.model.lora import find_adapter_dir
    if Path(adapter).suffix.lower() == ".gguf":
        return False  # a LoRA GGUF carries no slmkit provenance
    return bool(read_provenance(find_adapter_dir(adapter)).get("instruction_tuned", False))


def _generation_defaults(ref) -> dict:
    from slmkit.hub import sampling_defaults
    return sampling_defaults(ref.location) if ref.kind == "dir" else {}


def _instruction_tuned(ref) -> bool:
    from slmkit.formats.hf_dir import looks_instruction_tuned, read_provenance
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
        from slmkit.formats.vision_dir import is_vision_dir
        if ref.kind == "dir" and is_vision_dir(ref.location):  # the decoder + its vision tower (lm/vision_lm.py)
            from slmkit.lm.vision_lm import VisionLM
            return VisionLM.load(ref.location, device=device, dtype=dtype, **options)
        from slmkit.lm.torch_lm import TorchLM
        return TorchLM.load(ref.location, device=device, dtype=dtype, **options)
    if backend == "hf":
        if ref.kind != "dir":
            raise ValueError(f"backend 'hf' needs a model directory, got a GGUF file ({spec}); import it first "
                             "with `slm import FILE.gguf -o DIR`")
        from slmkit.lm.hf_lm import HFLM
        return HFLM(ref.location, device=device, dtype=dtype)
    from slmkit.lm.llamacpp_lm import LlamaCppLM
    return LlamaCppLM(ref.gguf_file(create=True), **options)


def generation_backend(model: str, backend: str, device: str, weights: str = "fp32") -> tuple[str, str, dict]:
    """(backend, model argument, backend options) for work that is mostly decoding (`slm serve`, `slm synth`).

    "auto" on a CPU serves through llama.cpp when llama-cpp-python is installed (its batched decoding is the
    fastest CPU path: see BENCHMARKS.md), on the model's GGUF, written once into the cache as f32 when a model
    directory has none; otherwise, on a GPU, and for bf16/int8 `weights`, through slmkit's own model.
    Embeddings need the torch backend.
    """
    from slmkit.hub import resolve_model
    from slmkit.lm.upscale import is_upscale_spec
    if is_upscale_spec(model):  # its members each choose their backend (load_lm)
        return backend, model, {}
    ref = resolve_model(model)
    # logits_all=False: the engine reads logits from its own batched context, so the LM's can stay small.
    # llama.cpp keeps every core (measured on 2 cores: one thread served 137/258/334 tokens/s at 1/4/16 clients
    # against 182/307/378 with two; torch is the other way round, see serve()).
    llamacpp_options = {"logits_all": False}
    if backend == "llamacpp":
        return backend, model, llamacpp_options
    if backend != "auto" or ref.kind == "remote":
        return backend, model, {}
    from slmkit.formats.vision_dir import is_vision_dir
    if ref.kind == "dir" and is_vision_dir(ref.location):
        return "torch", model, {}  # llama.cpp would serve the decoder alone, blind
    if device != "cpu" or weights != "fp32" or importlib.util.find_spec("llama_cpp") is None:
        return "torch", model, {}
    try:
        path = ref.gguf_file(create=True)
    except ValueError as e:  # e.g. a tokenizer llama.cpp cannot reproduce exactly
        logging.getLogger(__name__).warning("serving with the torch backend: no exact GGUF for llama.cpp (%s)", e)
        return "torch", model, {}
    return "llamacpp", str(path), llamacpp_options
