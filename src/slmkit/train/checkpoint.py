"""The training checkpoint, RUN/checkpoint/: a model directory + optimizer.safetensors + trainer_state.json.

Everything is safetensors or JSON (never pickle), and the directory is replaced atomically, so a run killed at any
moment resumes from the last complete checkpoint. optimizer.safetensors holds AdamW's per-parameter tensors (and
the torch RNG state); trainer_state.json the step, tokens and elapsed time, plus the optimizer's scalars.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from slmkit.files import atomic_dir, atomic_write_json
from slmkit.formats.hf_dir import load_model_dir, save_model_dir
from slmkit.model.llama import Transformer
from slmkit.model.lora import LoRAConfig, load_lora_weights, merged_copy, save_adapter


def save_checkpoint(run: Path, model: Transformer, opt: torch.optim.Optimizer, tokenizer, state: dict,
                    provenance: dict, lora: LoRAConfig | None = None, lora_base: str | None = None) -> None:
    """With LoRA, the checkpoint's model files hold the merged model (so it loads like any model directory) and
    `adapter/` the LoRA matrices that resume reads back (the frozen base is `lora_base`, the run's init_from)."""
    with atomic_dir(run / "checkpoint") as tmp:
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


def load_checkpoint(run: Path, model: Transformer, opt: torch.optim.Optimizer) -> dict:
    """Restore the model (or its LoRA matrices), the optimizer and the RNG in place; returns the trainer state."""
    ckpt = run / "checkpoint"
    state = json.loads((ckpt / "trainer_state.json").read_text())
    if (ckpt / "adapter").exists():
        load_lora_weights(model, ckpt / "adapter")  # the frozen base is init_from, already loaded
    else:
        model.load_state_dict(load_model_dir(ckpt).state_dict())
    tensors = load_file(str(ckpt / "optimizer.safetensors"))
    torch.set_rng_state(tensors.pop("rng.torch"))
    per_param: dict[int, dict] = {}
    for key, v in [*tensors.items(), *state.pop("optimizer_scalars").items()]:
        pid, name = key.split(".", 1)
        per_param.setdefault(int(pid), {})[name] = v
    opt_state = opt.state_dict()
    opt_state["state"] = per_param
    opt.load_state_dict(opt_state)
    return state


def start_state(run: Path, model: Transformer, opt: torch.optim.Optimizer, resume: bool, master: bool) -> dict:
    """Where training starts: the checkpoint's state (resume, after loading it) or step 0 of a new run, which
    must not overwrite an existing one."""
    if resume:
        if not (run / "checkpoint" / "trainer_state.json").exists():
            raise FileNotFoundError(f"{run}/checkpoint: nothing to resume from; drop --resume to start fresh")
        return load_checkpoint(run, model, opt)
    if master and (run / "checkpoint").exists():
        raise FileExistsError(f"{run} already holds a run; pass --resume to continue it or choose another --out")
    return {"step": 0, "tokens": 0, "elapsed": 0.0}


def _optimizer_tensors(opt: torch.optim.Optimizer) -> tuple[dict, dict]:
    tensors, scalars = {}, {}
    for pid, s in opt.state_dict()["state"].items():
        for k, v in s.items():
            if torch.is_tensor(v):
                tensors[f"{pid}.{k}"] = v.detach().cpu().contiguous()
            else:
                scalars[f"{pid}.{k}"] = v
    return tensors, scalars
