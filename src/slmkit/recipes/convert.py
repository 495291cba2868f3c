"""`slm import` and `slm export`: move models between slmkit and the formats other tools use.

Import: a Hugging Face Llama-family directory (safetensors) or a GGUF file (any llama.cpp quantization,
dequantized) becomes a slmkit model directory, tokenizer and chat template included.
Export: a slmkit model or run directory becomes a GGUF file (llama.cpp, f32/f16/bf16/q8_0), a clean HF
directory (transformers, vLLM) in a chosen dtype, or an ONNX graph (onnxruntime).
"""

from __future__ import annotations

from pathlib import Path

import torch

from slmkit.files import sha256_file
from slmkit.formats import load_any
from slmkit.formats.hf_dir import DTYPES, looks_instruction_tuned, read_provenance, save_model_dir
from slmkit.hub import resolve_model, sampling_defaults

EXPORT_FORMATS = ("gguf", "hf", "onnx")


def import_model(src: str | Path, out: str | Path, dtype: str = "float32",
                 instruction_tuned: bool | None = None) -> Path:
    """Convert `src` (HF directory or .gguf file) into the slmkit model directory `out`.

    `instruction_tuned` (default: guessed from the name) is recorded so `slm generate` knows to apply the
    chat template.
    """
    src = Path(src)
    if not src.exists():
        raise FileNotFoundError(f"{src}: nothing to import (expected a Hugging Face model directory or a .gguf file)")
    if src.is_file() and src.suffix.lower() != ".gguf":
        raise ValueError(f"{src}: not a .gguf file; import takes a GGUF file or a Hugging Face model directory")
    if src.is_dir() and not (src / "config.json").is_file():
        raise FileNotFoundError(f"{src}: no config.json; not a Hugging Face model directory")
    if dtype not in DTYPES:
        raise ValueError(f"unknown dtype {dtype!r}; choose one of {', '.join(DTYPES)}")
    model, tokenizer = load_any(src)
    if instruction_tuned is None:
        instruction_tuned = looks_instruction_tuned(src)
    origin = {"imported_from": str(src.resolve()), "instruction_tuned": instruction_tuned}
    if src.is_file():
        origin["source_sha256"] = sha256_file(src)
    sampling = sampling_defaults(src) if src.is_dir() else None  # a HF directory's own; a GGUF has none
    return save_model_dir(model, out, tokenizer, provenance=origin, dtype=dtype, sampling=sampling or None)


def export_model(model: str | Path, out: str | Path, fmt: str = "gguf", quant: str = "f32",
                 dtype: str = "float32", base: str | Path | None = None) -> Path:
    """Write `model` (a model or run directory, a .gguf file, a pulled name) to `out` in format `fmt`.

    fmt is gguf | hf | onnx; `quant` applies to GGUF (f32, f16, bf16, q8_0), `dtype` to the HF directory
    (float32, bfloat16, float16). A LoRA adapter directory (one holding adapter_config.json, e.g. a LoRA run's
    `adapter/`) becomes llama.cpp's LoRA GGUF (formats/gguf.py: write_lora_gguf) for `base` (a model directory,
    GGUF or pulled name; default: the base the adapter records).
    """
    if fmt not in EXPORT_FORMATS:
        raise ValueError(f"unknown export format {fmt!r}; choose one of {', '.join(EXPORT_FORMATS)}")
    if (Path(model) / "adapter_config.json").is_file():
        return _export_adapter(Path(model), out, fmt, base)
    if base is not None:
        raise ValueError(f"--base is for exporting a LoRA adapter; {model} has no adapter_config.json")
    ref = resolve_model(str(model))
    if ref.kind == "remote":
        raise ValueError(f"{model}: a remote endpoint's weights cannot be exported")
    if ref.kind == "gguf" and fmt == "onnx":
        raise ValueError(f"{model}: import the GGUF first (`slm import {model} -o DIR`), then export DIR to ONNX")
    src = Path(ref.location)
    if fmt == "gguf":
        from slmkit.formats.gguf import write_gguf
        return write_gguf(src, out, quant=quant)
    if fmt == "hf":
        if dtype not in DTYPES:
            raise ValueError(f"unknown dtype {dtype!r}; choose one of {', '.join(DTYPES)}")
        m, tokenizer = load_any(src)
        provenance = {**read_provenance(src), "exported_from": str(src)}
        sampling = sampling_defaults(src) if src.is_dir() else None
        return save_model_dir(m.to(torch.float32), out, tokenizer, provenance=provenance, dtype=dtype,
                              sampling=sampling or None)
    from slmkit.formats.onnx import export_onnx
    return export_onnx(src, out)


def _export_adapter(adapter: Path, out: str | Path, fmt: str, base: str | Path | None) -> Path:
    from slmkit.formats.gguf import write_lora_gguf
    from slmkit.model.config import load_json
    if fmt != "gguf":
        raise ValueError(f"{adapter} is a LoRA adapter: it exports to gguf (llama.cpp's LoRA GGUF); for {fmt} "
                         "merge it into its base first (`slm merge`)")
    spec = base or load_json(adapter / "adapter_config.json").get("base_model_name_or_path")
    if not spec:
        raise ValueError(f"{adapter}: the adapter records no base model; give it with --base MODEL")
    ref = resolve_model(str(spec))
    if ref.kind == "remote":
        raise ValueError(f"--base {spec}: a remote endpoint; give the base model's directory or GGUF")
    location = Path(ref.location)
    if ref.kind == "dir" and not (location / "config.json").is_file():
        location = ref.gguf_file()  # a pulled model kept as a GGUF only
    return write_lora_gguf(adapter, location, out)
