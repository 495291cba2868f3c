"""The model formats slmkit reads and writes: Hugging Face model directories (hf_dir.py), GGUF (gguf.py) and ONNX
(onnx.py); `load_any` opens either of the first two. `slm import` / `slm export` are recipes/convert.py."""

from __future__ import annotations

from pathlib import Path

import torch

from slmkit.formats.gguf import load_gguf
from slmkit.formats.hf_dir import load_dir


def load_any(path: str | Path, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32):
    """(model, tokenizer) from a model directory, a run directory, or a GGUF file (dequantized)."""
    if Path(path).suffix.lower() == ".gguf":
        return load_gguf(path, device=device, dtype=dtype)
    return load_dir(path, device=device, dtype=dtype)
