"""Read and write model directories: the Hugging Face layout, safetensors only, plus `slmkit.json` provenance.

    config.json              LlamaConfig fields (architectures: LlamaForCausalLM)
    model.safetensors        HF parameter names (model.layers.0.self_attn.q_proj.weight, ..., lm_head.weight)
    generation_config.json   bos/eos ids and the model's sampling defaults (read by `generation_defaults`)
    tokenizer.json, tokenizer_config.json (+ chat_template)
    slmkit.json              how the model was made: data manifest hash, training config, metrics

Weights are never read with pickle: a directory holding only pytorch_model.bin is refused with advice.
"""

from __future__ import annotations

import datetime
import json
from dataclasses import replace
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from slmkit import __version__
from slmkit.files import atomic_dir, atomic_write_json, make_readable
from slmkit.model.config import ModelConfig, load_json
from slmkit.model.decode import is_fused
from slmkit.model.llama import Transformer, rope_tables

DTYPES = {"float32": torch.float32, "fp32": torch.float32, "float16": torch.float16, "fp16": torch.float16,
          "bfloat16": torch.bfloat16, "bf16": torch.bfloat16}


def to_hf_name(name: str) -> str:
    return name if name.startswith("lm_head.") else f"model.{name}"


def from_hf_name(name: str) -> str:
    return name.removeprefix("model.")


def hf_state_dict(model: Transformer, dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
    """The model's weights under HF names; a tied LM head is stored once (as embed_tokens), as HF does."""
    if is_fused(model):
        raise ValueError("this model's projections are fused for inference (slmkit.model.decode.fuse_projections); "
                         "call slmkit.model.decode.unfuse_projections(model) before saving or exporting it")
    out = {}
    for name, t in model.state_dict().items():
        if name == "lm_head.weight" and model.cfg.tie_embeddings:
            continue
        t = t.detach().to("cpu")
        out[to_hf_name(name)] = (t.to(dtype) if dtype is not None else t).contiguous()
    return out


def save_model_dir(model: Transformer, path: str | Path, tokenizer=None, provenance: dict | None = None,
                   dtype: str | torch.dtype | None = None, sampling: dict | None = None) -> Path:
    """Write `model` (+ tokenizer) as a model directory, atomically: readers never see a half-written one."""
    path = Path(path)
    with atomic_dir(path) as tmp:
        write_model_files(model, tmp, tokenizer, provenance, dtype, sampling)
    return path


# generation_config.json fields that are SamplingParams fields under the same name
_SAMPLING_FIELDS = ("temperature", "top_k", "top_p", "min_p", "repetition_penalty", "max_new_tokens")


def generation_config_fields(sampling: dict | None = None) -> dict:
    """Sampling defaults (SamplingParams fields; None: slmkit.sampling.DEFAULTS) as generation_config.json fields.

    do_sample is written out: transformers decodes greedily without it, whatever the temperature says."""
    from slmkit.sampling import DEFAULTS
    sampling = dict(DEFAULTS if sampling is None else sampling)
    unknown = set(sampling) - set(_SAMPLING_FIELDS)
    if unknown:
        raise ValueError(f"not generation_config.json sampling fields: {sorted(unknown)}")
    if sampling.get("temperature") == 0:
        return {"do_sample": False, **{k: v for k, v in sampling.items() if k != "temperature"}}
    return {"do_sample": True, **sampling} if sampling else {}


def generation_defaults(path: str | Path) -> dict:
    """The sampling defaults in a model directory's generation_config.json, as SamplingParams fields ({} when
    it has none): temperature, top_k, top_p, min_p, repetition_penalty, max_new_tokens; `do_sample: false`
    means greedy (temperature 0)."""
    f = Path(path) / "generation_config.json"
    if not f.is_file():
        return {}
    try:
        gen = json.loads(f.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{f}: not valid JSON ({e}); fix or delete the file") from e
    out = {k: gen[k] for k in _SAMPLING_FIELDS if gen.get(k) is not None}
    if gen.get("do_sample") is False:
        out["temperature"] = 0.0
    from slmkit.sampling import SamplingParams
    try:
        SamplingParams(**out)
    except (TypeError, ValueError) as e:
        raise ValueError(f"{f}: {e}; fix the value or delete the field") from e
    return out


def write_model_files(model: Transformer, directory: Path, tokenizer=None, provenance: dict | None = None,
                      dtype: str | torch.dtype | None = None, sampling: dict | None = None) -> None:
    """The files of a model directory, written into an existing (temporary) `directory`.

    `sampling`: the model's sampling defaults for generation_config.json (SamplingParams fields; default
    llama.cpp's, slmkit.sampling.DEFAULTS)."""
    dt = DTYPES[dtype] if isinstance(dtype, str) else dtype
    cfg = model.cfg
    hf_cfg = cfg.to_hf()
    hf_cfg["torch_dtype"] = str(dt or torch.float32).removeprefix("torch.")
    atomic_write_json(directory / "config.json", hf_cfg)
    save_file(hf_state_dict(model, dt), str(directory / "model.safetensors"), metadata={"format": "pt"})
    make_readable(directory / "model.safetensors")
    gen = {"bos_token_id": cfg.bos_token_id, "eos_token_id": cfg.eos_token_id}
    if cfg.pad_token_id is not None:
        gen["pad_token_id"] = cfg.pad_token_id
    atomic_write_json(directory / "generation_config.json", {**gen, **generation_config_fields(sampling)})
    if tokenizer is not None:
        tokenizer.save(directory)
    atomic_write_json(directory / "slmkit.json", {
        "slmkit_version": __version__,
        "created": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "parameters": model.num_params(),
        **(provenance or {}),
    })


def _weight_files(path: Path) -> list[Path]:
    index = path / "model.safetensors.index.json"
    if index.exists():
        names = sorted(set(load_json(index)["weight_map"].values()))
        return [path / n for n in names]
    single = path / "model.safetensors"
    if single.exists():
        return [single]
    if any(path.glob("*.bin")) or any(path.glob("*.pt")):
        raise ValueError(f"{path}: only pickle weights (.bin/.pt) found; slmkit never loads pickle. Convert "
                         "them to safetensors first (e.g. transformers' save_pretrained(safe_serialization=True)).")
    raise FileNotFoundError(f"{path}: no model.safetensors (or model.safetensors.index.json) in this directory")


def load_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """All tensors of a model directory under slmkit names."""
    tensors = {}
    for f in _weight_files(Path(path)):
        with safe_open(str(f), framework="pt") as sf:
            for key in sf.keys():
                tensors[from_hf_name(key)] = sf.get_tensor(key)
    return tensors


# What a model trained further may change without new weights: RoPE has no position parameters, so the context
# (max_seq_len) and RoPE's base (rope_theta) can be extended; every other field is the weights' shape or meaning.
CONTINUED_OVERRIDES = ("max_seq_len", "rope_theta")


def load_model_dir(path: str | Path, device: str | torch.device = "cpu",
                   dtype: torch.dtype = torch.float32, overrides: dict | None = None) -> Transformer:
    """Build the model described by `path/config.json` and load its safetensors weights. `overrides` changes
    config fields that leave the weights as they are (CONTINUED_OVERRIDES: context extension)."""
    path = Path(path)
    if not path.is_dir():
        raise FileNotFoundError(f"{path}: not a model directory (expected config.json + model.safetensors)")
    cfg = ModelConfig.from_hf(load_json(path / "config.json"))
    if overrides:
        if bad := [k for k in overrides if k not in CONTINUED_OVERRIDES]:
            raise ValueError(f"--set {bad[0]}: a model continued from {path} keeps its shape; only "
                             f"{' and '.join(CONTINUED_OVERRIDES)} can be set (context extension)")
        cfg = replace(cfg, **overrides)
    return model_from_state_dict(cfg, load_state_dict(path), device, dtype, source=str(path))


def model_from_state_dict(cfg: ModelConfig, tensors: dict[str, torch.Tensor], device: str | torch.device = "cpu",
                          dtype: torch.dtype = torch.float32, source: str = "weights") -> Transformer:
    """A Transformer for `cfg` holding `tensors` (slmkit names), checked to match the config exactly."""
    tensors = dict(tensors)
    if "lm_head.weight" not in tensors and not cfg.tie_embeddings:
        raise ValueError(f"{source}: lm_head.weight missing and tie_word_embeddings is false")
    if cfg.tie_embeddings:
        tensors.pop("lm_head.weight", None)
    with torch.device("meta"):
        model = Transformer(cfg)
    expected = {k for k in model.state_dict() if not (cfg.tie_embeddings and k == "lm_head.weight")}
    missing, unexpected = expected - set(tensors), set(tensors) - expected
    unexpected = {k for k in unexpected if not k.endswith("rotary_emb.inv_freq")}
    if missing or unexpected:
        raise ValueError(f"{source}: weights don't match config.json: missing {sorted(missing)[:5]}, "
                         f"unexpected {sorted(unexpected)[:5]}")
    model = model.to_empty(device=device)
    model.load_state_dict({k: v for k, v in tensors.items() if k in expected}, strict=False)
    if cfg.tie_embeddings:
        model.lm_head.weight = model.embed_tokens.weight
    # Non-persistent RoPE tables were lost on the meta device: rebuild them.
    model.rope_cos, model.rope_sin = rope_tables(cfg.head_dim, cfg.max_seq_len, cfg.rope_theta, device=device)
    return model.to(dtype).eval()


def load_dir(path: str | Path, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32):
    """(model, tokenizer) from a model directory or a run directory."""
    from slmkit.tokenizer import load_tokenizer
    d = find_model_dir(path)
    return load_model_dir(d, device=device, dtype=dtype), load_tokenizer(d)


def looks_instruction_tuned(path: str | Path) -> bool:
    """Published chat models say so in their name (SmolLM2-135M-Instruct, TinyLlama-1.1B-Chat, ...)."""
    name = Path(path).resolve().name.lower()
    return any(word in name for word in ("instruct", "chat", "-it"))


def read_provenance(path: str | Path) -> dict:
    p = Path(path) / "slmkit.json"
    return json.loads(p.read_text()) if p.exists() else {}


def find_model_dir(path: str | Path) -> Path:
    """A model directory itself, or a run directory's final model (else its latest checkpoint)."""
    path = Path(path)
    for candidate in (path, path / "model", path / "checkpoint"):
        if (candidate / "config.json").exists():
            return candidate
    raise FileNotFoundError(f"{path}: no model here (expected a model directory with config.json, or a run "
                            "directory from `slm train` containing model/ or checkpoint/)")
