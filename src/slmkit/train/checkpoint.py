"""The training checkpoint, RUN/checkpoint/: a model directory + optimizer.safetensors + trainer_state.json.

Everything is safetensors or JSON (never pickle), and the directory is replaced atomically (files.atomic_dir: every
file fsynced, then two renames; a kill between them is repaired by `recover_dir` on resume), so a run killed at any
moment resumes from the last complete checkpoint. optimizer.safetensors holds AdamW's per-parameter tensors (and
the torch RNG state); trainer_state.json the step, tokens and elapsed time, plus the optimizer's scalars.
Resume refuses a checkpoint made for another model shape or other data, with a one-line error. A masked-LM run's
model files are an encoder directory (formats/encoder_dir.py) instead of a decoder's.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from slmkit.files import atomic_dir, atomic_write_json, recover_dir
from slmkit.formats.encoder_dir import load_encoder_dir, save_encoder_dir
from slmkit.formats.hf_dir import load_model_dir, read_provenance, save_model_dir
from slmkit.model.config import ModelConfig
from slmkit.model.encoder import Encoder, EncoderConfig
from slmkit.model.llama import Transformer
from slmkit.model.lora import LoRAConfig, load_lora_weights, merged_copy, save_adapter


def save_checkpoint(run: Path, model: Transformer, opt: torch.optim.Optimizer, tokenizer, state: dict,
                    provenance: dict, lora: LoRAConfig | None = None, lora_base: str | None = None) -> None:
    """With LoRA, the checkpoint's model files hold the merged model (so it loads like any model directory) and
    `adapter/` the LoRA matrices that resume reads back (the frozen base is `lora_base`, the run's init_from)."""
    with atomic_dir(run / "checkpoint") as tmp:
        if isinstance(model, Encoder):
            save_encoder_dir(model, tmp / "model", tokenizer=tokenizer, provenance=provenance)
        else:
            save_model_dir(merged_copy(model) if lora else model, tmp / "model", tokenizer=tokenizer,
                           provenance=provenance)
        for f in (tmp / "model").iterdir():
            f.rename(tmp / f.name)
        (tmp / "model").rmdir()
        tensors, scalars = _optimizer_tensors(opt)
        tensors["rng.torch"] = torch.get_rng_state()
        save_file(tensors, str(tmp / "optimizer.safetensors"))
        if lora:
            save_adapter(model, lora, tmp / "adapter", lora_base, provenance)
        atomic_write_json(tmp / "trainer_state.json", {**state, "optimizer_scalars": scalars})


def load_checkpoint(run: Path, model: Transformer, opt: torch.optim.Optimizer, sharded: bool = False) -> dict:
    """Restore the model (or its LoRA matrices), the optimizer and the RNG in place; returns the trainer state.
    `sharded`: the model is FSDP2's (train/distributed.py): every rank takes its shards of the saved state."""
    ckpt = run / "checkpoint"
    state = json.loads((ckpt / "trainer_state.json").read_text())
    # the saved weights first: building a model to read them into draws from the RNG, which the optimizer's file
    # restores after (else a resumed run's dropout masks differ from the uninterrupted run's)
    if sharded:
        from slmkit.train.distributed import load_full_state
        weights = load_model_dir(ckpt).state_dict()
        load_full_state(model, opt, weights, read_optimizer_state(ckpt, state))
        return state
    if (ckpt / "adapter").exists():
        load_lora_weights(model, ckpt / "adapter")  # the frozen base is init_from, already loaded
    else:
        saved = load_encoder_dir(ckpt) if isinstance(model, Encoder) else load_model_dir(ckpt)
        model.load_state_dict(saved.state_dict())
    restore_optimizer(opt, read_optimizer_state(ckpt, state))
    return state


def read_optimizer_state(ckpt: Path, state: dict) -> dict[int, dict]:
    """optimizer.safetensors (and the scalars that `state` holds, popped) as {pid: {name: value}}; restores the
    torch RNG saved beside them."""
    tensors = load_file(str(ckpt / "optimizer.safetensors"))
    torch.set_rng_state(tensors.pop("rng.torch"))
    per_param: dict[int, dict] = {}
    for key, v in [*tensors.items(), *state.pop("optimizer_scalars").items()]:
        pid, name = key.split(".", 1)
        per_param.setdefault(int(pid), {})[name] = v
    return per_param


def restore_optimizer(opt, per_param: dict[int, dict]) -> None:
    opt_state = opt.state_dict()
    opt_state["state"] = per_param
    opt.load_state_dict(opt_state)


def start_state(run: Path, model: Transformer, opt: torch.optim.Optimizer, resume: bool, master: bool,
                provenance: dict | None = None, sharded: bool = False) -> dict:
    """Where training starts: the checkpoint's state (resume, after checking it matches `model` and the data in
    `provenance` and loading it) or step 0 of a new run, which must not overwrite an existing one."""
    ckpt = run / "checkpoint"
    recover_dir(ckpt)  # a save killed between its two renames left the previous checkpoint as .checkpoint.old
    if resume:
        if not (ckpt / "trainer_state.json").exists():
            raise FileNotFoundError(f"{ckpt}: nothing to resume from; drop --resume to start fresh")
        check_matches(ckpt, model, provenance)
        try:
            return load_checkpoint(run, model, opt, sharded)
        except (SafetensorError, OSError, KeyError, ValueError, json.JSONDecodeError) as e:
            raise ValueError(f"{ckpt}: damaged checkpoint ({type(e).__name__}: {e}); delete it to start afresh "
                             "or restore it from a copy") from e
    if master and ckpt.exists():
        raise FileExistsError(f"{run} already holds a run; pass --resume to continue it or choose another --out")
    return {"step": 0, "tokens": 0, "elapsed": 0.0}


def check_matches(ckpt: Path, model: Transformer, provenance: dict | None) -> None:
    """Raise a one-line ValueError when the checkpoint was made for another model shape or other data (instead
    of a shape-mismatch traceback, or silently continuing on different data)."""
    config = EncoderConfig if isinstance(model, Encoder) else ModelConfig
    try:
        hf = json.loads((ckpt / "config.json").read_text())
    except (OSError, ValueError) as e:
        raise ValueError(f"{ckpt}/config.json: unreadable ({e}); the checkpoint is damaged") from e
    if (hf.get("model_type") in ("bert", "roberta")) != (config is EncoderConfig):
        what = "a masked-LM encoder" if config is ModelConfig else "a causal decoder"
        raise ValueError(f"{ckpt} holds {what}; resume with the run's original --objective (see train_config.json) "
                         "or choose another --out")
    try:
        saved = config.from_hf(hf)
    except (ValueError, KeyError, TypeError) as e:
        raise ValueError(f"{ckpt}/config.json: unreadable ({e}); the checkpoint is damaged") from e
    diff = [f"{f.name} {getattr(saved, f.name)!r} (now {getattr(model.cfg, f.name)!r})"
            for f in dataclasses.fields(config) if getattr(saved, f.name) != getattr(model.cfg, f.name)]
    if diff:
        raise ValueError(f"{ckpt} was saved for another model: {', '.join(diff[:4])}; resume with the run's "
                         "original --preset/--set/--init-from (see train_config.json) or choose another --out")
    then = read_provenance(ckpt).get("data", {}).get("fingerprint")
    now = (provenance or {}).get("data", {}).get("fingerprint")
    if then and now and then != now:
        path = read_provenance(ckpt)["data"].get("path")
        raise ValueError(f"{ckpt} was trained on other data ({path}, fingerprint {then}; --data now gives {now}); "
                         "resume with the run's original --data or choose another --out")


def _optimizer_tensors(opt: torch.optim.Optimizer) -> tuple[dict, dict]:
    tensors, scalars = {}, {}
    for pid, s in opt.state_dict()["state"].items():
        for k, v in s.items():
            if torch.is_tensor(v):
                tensors[f"{pid}.{k}"] = v.detach().cpu().contiguous()
            else:
                scalars[f"{pid}.{k}"] = v
    return tensors, scalars
