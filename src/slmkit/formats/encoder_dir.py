"""Encoder model directories (model/encoder.py) in transformers' layout: BertModel, BertForMaskedLM, RobertaModel,
RobertaForMaskedLM; safetensors only.

    config.json          BertConfig / RobertaConfig fields (model_type bert | roberta)
    model.safetensors    transformers' names: the body bare (BertModel) or under bert. / roberta. with a head;
                         the head as lm_head.* (RoBERTa) or cls.predictions.* (BERT)
    tokenizer.json ...   the tokenizer, whose post-processor adds [CLS]/[SEP] (BERT) or <s>/</s> (RoBERTa)

Read and dropped: BERT's pooler (sentence embeddings mean-pool instead, as sentence-transformers does), the
position_ids buffer old checkpoints carry, and the MLM decoder's weight and bias (tied to the word embeddings and
to the head's bias, as transformers ties them).
"""

from __future__ import annotations

import datetime
import json
from collections.abc import Callable
from pathlib import Path

import torch
from safetensors.torch import save_file

from slmkit import __version__
from slmkit.files import atomic_dir, atomic_write_json, make_readable
from slmkit.formats.hf_dir import load_state_dict
from slmkit.model.config import load_json
from slmkit.model.encoder import Encoder, EncoderConfig

# slmkit's head names <-> BERT's (RoBERTa's are slmkit's own)
BERT_HEAD = {"lm_head.dense.": "cls.predictions.transform.dense.",
             "lm_head.layer_norm.": "cls.predictions.transform.LayerNorm.", "lm_head.bias": "cls.predictions.bias"}
DROPPED = ("pooler.", "embeddings.position_ids", "lm_head.decoder.", "cls.predictions.decoder.")


def is_encoder_dir(path: str | Path) -> bool:
    config = Path(path) / "config.json"
    if not config.is_file():
        return False
    try:
        return json.loads(config.read_text()).get("model_type") in ("bert", "roberta")
    except (OSError, ValueError):
        return False


def to_hf_names(cfg: EncoderConfig, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    out = {}
    for name, t in tensors.items():
        if name.startswith("lm_head."):
            if cfg.flavour == "bert":
                name = next(hf + name.removeprefix(ours) for ours, hf in BERT_HEAD.items() if name.startswith(ours))
        elif cfg.mlm_head:
            name = f"{cfg.flavour}.{name}"
        out[name] = t.detach().cpu().contiguous()
    return out


def from_hf_names(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    out = {}
    for name, t in tensors.items():
        for ours, hf in BERT_HEAD.items():
            if name.startswith(hf):
                name = ours + name.removeprefix(hf)
        name = name.removeprefix("bert.").removeprefix("roberta.")
        if not name.startswith(DROPPED):
            out[name] = t
    return out


def load_encoder_dir(path: str | Path, device: str | torch.device = "cpu",
                     dtype: torch.dtype = torch.float32) -> Encoder:
    path = Path(path)
    cfg = EncoderConfig.from_hf(load_json(path / "config.json"))
    # load_state_dict reads every safetensors file (never pickle) under transformers' names; the decoder's
    # "model." prefix it strips does not occur in encoder checkpoints.
    tensors = from_hf_names(load_state_dict(path))
    model = Encoder(cfg)
    missing, unexpected = model.load_state_dict(tensors, strict=False)
    if missing or unexpected:
        raise ValueError(f"{path}: weights do not match config.json "
                         f"(missing {sorted(missing)[:4]}, unexpected {sorted(unexpected)[:4]})")
    return model.to(device=device, dtype=dtype).eval()


def save_encoder_dir(model: Encoder, path: str | Path, tokenizer=None, provenance: dict | None = None,
                     extra: Callable[[Path], None] | None = None) -> Path:
    """Write `model` (+ tokenizer) as a transformers encoder directory, atomically; `extra(tmp)` may add files
    (e.g. sentence-transformers' pooling config) before the directory takes its place."""
    path = Path(path)
    with atomic_dir(path) as tmp:
        atomic_write_json(tmp / "config.json", {**model.cfg.to_hf(), "torch_dtype": "float32"})
        save_file(to_hf_names(model.cfg, model.state_dict()), str(tmp / "model.safetensors"),
                  metadata={"format": "pt"})
        make_readable(tmp / "model.safetensors")
        if tokenizer is not None:
            tokenizer.save(tmp)
        atomic_write_json(tmp / "slmkit.json", {
            "slmkit_version": __version__,
            "created": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
            "parameters": model.num_params(), **(provenance or {})})
        if extra is not None:
            extra(tmp)
    return path
