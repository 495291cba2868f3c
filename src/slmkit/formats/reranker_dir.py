"""Cross-encoder (reranker) directories (model/cross_encoder.py) in transformers' layout, which is also
sentence-transformers' CrossEncoder format: BertForSequenceClassification / RobertaForSequenceClassification with
num_labels=1; safetensors only.

    config.json          BertConfig / RobertaConfig fields, architectures [...ForSequenceClassification], one label
    model.safetensors    the body under bert. / roberta.; the head as bert.pooler.dense.* + classifier.* (BERT) or
                         classifier.dense.* + classifier.out_proj.* (RoBERTa)
    tokenizer.json ...   the tokenizer, whose post-processor has a pair template ([CLS] A [SEP] B [SEP])
"""

from __future__ import annotations

import dataclasses
import datetime
import json
from pathlib import Path

import torch
from safetensors.torch import save_file

from slmkit import __version__
from slmkit.files import atomic_dir, atomic_write_json, make_readable
from slmkit.formats.encoder_dir import from_hf_names
from slmkit.formats.hf_dir import load_state_dict
from slmkit.model.config import load_json
from slmkit.model.cross_encoder import CrossEncoder
from slmkit.model.encoder import Encoder, EncoderConfig

# slmkit's head names -> transformers' (per flavour)
HEAD_NAMES = {"bert": {"head.dense.": "bert.pooler.dense.", "head.out.": "classifier."},
              "roberta": {"head.dense.": "classifier.dense.", "head.out.": "classifier.out_proj."}}


def is_reranker_dir(path: str | Path) -> bool:
    config = Path(path) / "config.json"
    try:
        hf = json.loads(config.read_text())
    except (OSError, ValueError):
        return False
    return hf.get("model_type") in ("bert", "roberta") and \
        any(a.endswith("ForSequenceClassification") for a in hf.get("architectures") or [])


def _body(cfg: EncoderConfig) -> EncoderConfig:
    return dataclasses.replace(cfg, mlm_head=False)


def cross_encoder_from(encoder: Encoder, head: dict[str, torch.Tensor] | None = None) -> CrossEncoder:
    """A cross-encoder over `encoder`'s body (an MLM head is dropped); `head` optionally gives the dense layer's
    start (BERT's pretrained pooler, `dense.weight` / `dense.bias`), else it starts as BERT initialises it."""
    cfg = _body(encoder.cfg)
    body = Encoder(cfg)
    body.load_state_dict({k: v for k, v in encoder.state_dict().items() if not k.startswith("lm_head.")})
    model = CrossEncoder(cfg, body)
    if head:
        model.head.dense.load_state_dict(head)
    return model.to(next(encoder.parameters()).device)


def read_pooler(path: str | Path) -> dict[str, torch.Tensor] | None:
    """BERT's pretrained pooler (dense + tanh on [CLS]) from an encoder directory, if it has one: loading the
    encoder drops it (embeddings mean-pool), but it is the natural start for a cross-encoder's head."""
    tensors = load_state_dict(Path(path))
    for prefix in ("pooler.dense.", "bert.pooler.dense."):
        if f"{prefix}weight" in tensors:
            return {"weight": tensors[f"{prefix}weight"].float(), "bias": tensors[f"{prefix}bias"].float()}
    return None


def load_reranker_dir(path: str | Path, device: str | torch.device = "cpu",
                      dtype: torch.dtype = torch.float32) -> CrossEncoder:
    path = Path(path)
    hf = load_json(path / "config.json")
    if not is_reranker_dir(path):
        raise ValueError(f"{path}: not a reranker directory (config.json's architectures {hf.get('architectures')} "
                         "is not a BERT/RoBERTa ...ForSequenceClassification); train one with `slm rerank-train`")
    if hf.get("num_labels", len(hf.get("id2label") or {0: 0})) != 1:
        raise ValueError(f"{path}: a reranker has one output (num_labels 1), this classifier has "
                         f"{len(hf.get('id2label') or {})}")
    cfg = _body(EncoderConfig.from_hf(hf))
    names = HEAD_NAMES[cfg.flavour]
    tensors = {}
    for name, t in load_state_dict(path).items():
        ours = next((o + name.removeprefix(h) for o, h in names.items() if name.startswith(h)), None)
        if ours is not None:
            tensors[ours] = t
        else:
            tensors.update({f"encoder.{k}": v for k, v in from_hf_names({name: t}).items()})
    model = CrossEncoder(cfg)
    missing, unexpected = model.load_state_dict(tensors, strict=False)
    if missing or unexpected:
        raise ValueError(f"{path}: weights do not match config.json "
                         f"(missing {sorted(missing)[:4]}, unexpected {sorted(unexpected)[:4]})")
    return model.to(device=device, dtype=dtype).eval()


def save_reranker_dir(model: CrossEncoder, path: str | Path, tokenizer=None, provenance: dict | None = None) -> Path:
    """Write `model` (+ tokenizer) as a transformers sequence-classification directory (one label), atomically."""
    path = Path(path)
    cfg = model.cfg
    arch = {"bert": "BertForSequenceClassification", "roberta": "RobertaForSequenceClassification"}[cfg.flavour]
    names = HEAD_NAMES[cfg.flavour]
    tensors = {}
    for name, t in model.state_dict().items():
        if name.startswith("head."):
            name = next(h + name.removeprefix(o) for o, h in names.items() if name.startswith(o))
        else:
            name = f"{cfg.flavour}.{name.removeprefix('encoder.')}"
        tensors[name] = t.detach().cpu().contiguous()
    with atomic_dir(path) as tmp:
        atomic_write_json(tmp / "config.json", {**cfg.to_hf(), "architectures": [arch], "torch_dtype": "float32",
                                                "id2label": {"0": "LABEL_0"}, "label2id": {"LABEL_0": 0}})
        save_file(tensors, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        make_readable(tmp / "model.safetensors")
        if tokenizer is not None:
            tokenizer.save(tmp)
        atomic_write_json(tmp / "slmkit.json", {
            "slmkit_version": __version__,
            "created": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
            "parameters": model.num_params(), "kind": "reranker", **(provenance or {})})
    return path
