"""Vision-language model directories: an ordinary decoder directory (hf_dir.py) plus the vision tower.

    config.json, model.safetensors, tokenizer.json, ...   the decoder, exactly as hf_dir.py writes it (its
                                                           tokenizer has the `<image>` token)
    vision.json                                            VisionConfig (model/vit.py): image and patch size,
                                                           ViT shape, the projector's output width, the image
                                                           token and its id, the pixel normalisation
    vision.safetensors                                     the ViT (`vit.*`) and the projector (`projector.*`)

transformers and llama.cpp read the decoder part as the text-only Llama it is; neither reads vision.json or
vision.safetensors (their LLaVA classes expect a CLIP tower and other names), so only slmkit answers about images.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from slmkit.files import atomic_dir, atomic_write_json, make_readable
from slmkit.formats.hf_dir import find_model_dir, load_dir, write_model_files
from slmkit.model.llama import Transformer
from slmkit.model.vit import VisionConfig, VisionTower

VISION_CONFIG = "vision.json"
VISION_WEIGHTS = "vision.safetensors"


def is_vision_dir(path: str | Path) -> bool:
    """Whether `path` (a model or run directory) holds a vision tower."""
    try:
        return (find_model_dir(path) / VISION_CONFIG).is_file()
    except FileNotFoundError:
        return False


def save_vision_dir(decoder: Transformer, tower: VisionTower, path: str | Path, tokenizer,
                    provenance: dict | None = None, sampling: dict | None = None) -> Path:
    """Write the decoder and the vision tower as one directory, atomically (`sampling`: the model's sampling
    defaults, as hf_dir.write_model_files takes them)."""
    path = Path(path)
    with atomic_dir(path) as tmp:
        write_model_files(decoder, tmp, tokenizer, provenance, sampling=sampling)
        atomic_write_json(tmp / VISION_CONFIG, tower.cfg.to_dict())
        state = {k: v.detach().contiguous() for k, v in tower.state_dict().items()}
        save_file(state, str(tmp / VISION_WEIGHTS), metadata={"format": "pt"})
        make_readable(tmp / VISION_WEIGHTS)
    return path


def load_vision_tower(path: str | Path, device: str | torch.device = "cpu",
                      dtype: torch.dtype = torch.float32) -> VisionTower:
    d = find_model_dir(path)
    f = d / VISION_CONFIG
    if not f.is_file():
        raise ValueError(f"{d}: no {VISION_CONFIG}: this model has no vision part (train one with "
                         "`slm quickstart vision`)")
    try:
        cfg = VisionConfig.from_dict(json.loads(f.read_text()), where=str(f))
    except (json.JSONDecodeError, TypeError) as e:
        raise ValueError(f"{f}: not a valid vision config ({e})") from e
    w = d / VISION_WEIGHTS
    if not w.is_file():
        raise FileNotFoundError(f"{w}: missing; the vision tower's weights are in {VISION_WEIGHTS}")
    tower = VisionTower(cfg)
    tensors = load_file(str(w))
    expected = set(tower.state_dict())
    if set(tensors) != expected:
        raise ValueError(f"{w}: weights don't match {VISION_CONFIG}: missing {sorted(expected - set(tensors))[:5]}, "
                         f"unexpected {sorted(set(tensors) - expected)[:5]}")
    tower.load_state_dict(tensors)
    return tower.to(device=device, dtype=dtype).eval()


def load_vision_dir(path: str | Path, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32):
    """(decoder, tower, tokenizer) from a vision model directory (or a run directory holding one)."""
    decoder, tokenizer = load_dir(path, device=device, dtype=dtype)
    tower = load_vision_tower(path, device=device, dtype=dtype)
    if tower.cfg.text_dim != decoder.cfg.dim:
        raise ValueError(f"{path}: the projector outputs {tower.cfg.text_dim} dimensions, the decoder takes "
                         f"{decoder.cfg.dim}")
    if tokenizer._id(tower.cfg.image_token) != tower.cfg.image_token_id:
        raise ValueError(f"{path}: the tokenizer's {tower.cfg.image_token!r} is not token "
                         f"{tower.cfg.image_token_id} as {VISION_CONFIG} says")
    return decoder, tower, tokenizer
