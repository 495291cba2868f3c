"""LoRA (Hu et al., 2021): fine-tune a few low-rank matrices beside frozen weights, in Hugging Face PEFT's format.

A targeted projection y = W x becomes y = W x + (alpha / r) · B A dropout(x), with A (r × in) and B (out × r).
B starts at zero, so a fresh adapter leaves the model unchanged; only A and B are trained, a fraction of a
percent of the weights for a small rank. The base can stay in bf16 while A and B train in fp32.

An adapter directory is what PEFT's `save_pretrained` writes for a LlamaForCausalLM, so
`PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(BASE), ADAPTER)` loads it:

    adapter_model.safetensors   base_model.model.model.layers.N.self_attn.q_proj.lora_A.weight, ...lora_B.weight
    adapter_config.json         peft_type LORA, task_type CAUSAL_LM, r, lora_alpha, target_modules, ...
    slmkit.json                 provenance (what the fine-tune made: e.g. instruction_tuned), read by `slm merge`
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn as nn
from safetensors import safe_open
from safetensors.torch import save_file

from slmkit.files import atomic_dir, atomic_write_json, make_readable
from slmkit.model.config import load_json

ATTENTION = ["q_proj", "k_proj", "v_proj", "o_proj"]


ALL_LINEAR = [*ATTENTION, "gate_proj", "up_proj", "down_proj"]  # PEFT's "all-linear": every Linear but lm_head


PEFT_PREFIX = "base_model.model."  # PeftModel wraps a LoraModel that wraps the LlamaForCausalLM


@dataclass
class LoRAConfig:
    r: int = 8
    alpha: float | None = None  # the update is scaled by alpha / r; None: 2 r (a scale of 2, the usual choice)
    dropout: float = 0.05  # on the input of the LoRA path only
    target_modules: list[str] | str = field(default_factory=lambda: list(ATTENTION))  # names, or "all-linear"

    def __post_init__(self):
        if self.alpha is None:
            self.alpha = 2.0 * self.r
        if isinstance(self.target_modules, str):
            spec = self.target_modules.strip()
            self.target_modules = "all-linear" if spec == "all-linear" else [t.strip() for t in spec.split(",")]
        unknown = [] if self.target_modules == "all-linear" else sorted(set(self.target_modules) - set(ALL_LINEAR))
        if unknown or not self.target_modules:
            raise ValueError(f"LoRA target_modules {unknown or '(none)'}: choose from {', '.join(ALL_LINEAR)} "
                             "or all-linear")
        if self.r < 1:
            raise ValueError(f"LoRA rank must be >= 1, got {self.r}")
        if not 0 <= self.dropout < 1:
            raise ValueError(f"LoRA dropout must be in [0, 1), got {self.dropout}")

    @property
    def targets(self) -> list[str]:
        return list(ALL_LINEAR) if self.target_modules == "all-linear" else list(self.target_modules)

    @property
    def scale(self) -> float:
        return self.alpha / self.r


class LoRALinear(nn.Module):
    """A frozen Linear plus a trainable low-rank update. The frozen weight keeps the name `weight`, so the
    model's state dict still has every base parameter under its usual name (plus `lora_A` / `lora_B`)."""

    def __init__(self, base: nn.Linear, r: int, alpha: float, dropout: float):
        super().__init__()
        if base.bias is not None:
            raise ValueError("LoRALinear wraps bias-free projections (Llama has no biases)")
        self.in_features, self.out_features = base.in_features, base.out_features
        self.weight = base.weight
        self.weight.requires_grad_(False)
        self.scale = alpha / r
        device = base.weight.device
        self.lora_A = nn.Linear(self.in_features, r, bias=False, device=device, dtype=torch.float32)
        self.lora_B = nn.Linear(r, self.out_features, bias=False, device=device, dtype=torch.float32)
        nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5))  # PEFT's default initialisation
        nn.init.zeros_(self.lora_B.weight)
        self.lora_dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.train(base.training)

    def forward(self, x):
        y = nn.functional.linear(x, self.weight)
        # As PEFT does: the LoRA path runs in the adapter's dtype, the sum comes back in the base's.
        update = self.lora_B(self.lora_A(self.lora_dropout(x.to(self.lora_A.weight.dtype))))
        return y + (update * self.scale).to(y.dtype)

    def merged_weight(self) -> torch.Tensor:
        delta = self.lora_B.weight.float() @ self.lora_A.weight.float() * self.scale
        return (self.weight.float() + delta).to(self.weight.dtype)


def _wrap(model: nn.Module, names: list[str], cfg: LoRAConfig) -> None:
    modules = dict(model.named_modules())
    for name in names:
        parent_name, _, child = name.rpartition(".")
        parent = modules[parent_name] if parent_name else model
        setattr(parent, child, LoRALinear(modules[name], cfg.r, cfg.alpha, cfg.dropout))


def add_lora(model: nn.Module, cfg: LoRAConfig) -> nn.Module:
    """Wrap the targeted projections of every layer in LoRALinear and freeze everything else (in place)."""
    if any(isinstance(m, LoRALinear) for m in model.modules()):
        raise ValueError("the model already has LoRA layers; merge them first (merge_lora)")
    targets = set(cfg.targets)
    names = [n for n, m in model.named_modules() if isinstance(m, nn.Linear) and n.rpartition(".")[2] in targets]
    if not names:
        raise ValueError(f"no Linear layer named {', '.join(sorted(targets))} in the model")
    for p in model.parameters():
        p.requires_grad_(False)
    _wrap(model, names, cfg)
    return model


def lora_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The LoRA matrices under PEFT's names (no adapter-name infix, as PEFT saves them), on the CPU."""
    out = {}
    for name, t in model.state_dict().items():
        if ".lora_A." in name or ".lora_B." in name:
            out[f"{PEFT_PREFIX}model.{name}"] = t.detach().to("cpu").contiguous()
    return out


def count_parameters(model: nn.Module) -> tuple[int, int]:
    """(trainable, total) parameters; a tied embedding / LM head counts once."""
    params = list(model.parameters())  # parameters() yields a shared tensor once
    return sum(p.numel() for p in params if p.requires_grad), sum(p.numel() for p in params)


def adapter_config(cfg: LoRAConfig, base_model_path: str | None) -> dict:
    """adapter_config.json as PEFT writes it for a plain LoRA (fields PEFT leaves at defaults are omitted)."""
    alpha = int(cfg.alpha) if float(cfg.alpha).is_integer() else cfg.alpha
    base = str(Path(base_model_path).resolve()) if base_model_path else None
    return {"peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": base,
            "r": cfg.r, "lora_alpha": alpha, "lora_dropout": cfg.dropout, "target_modules": sorted(cfg.targets),
            "bias": "none", "fan_in_fan_out": False, "inference_mode": True, "init_lora_weights": True,
            "modules_to_save": None, "use_rslora": False, "use_dora": False, "layers_to_transform": None,
            "layers_pattern": None, "rank_pattern": {}, "alpha_pattern": {}, "revision": None}


def save_adapter(model: nn.Module, cfg: LoRAConfig, path: str | Path, base_model_path: str | None = None,
                 provenance: dict | None = None) -> Path:
    """Write the adapter directory (PEFT format) atomically."""
    path = Path(path)
    tensors = lora_state_dict(model)
    if not tensors:
        raise ValueError("the model has no LoRA layers to save")
    with atomic_dir(path) as tmp:
        save_file(tensors, str(tmp / "adapter_model.safetensors"), metadata={"format": "pt"})
        make_readable(tmp / "adapter_model.safetensors")
        atomic_write_json(tmp / "adapter_config.json", adapter_config(cfg, base_model_path))
        if provenance:
            atomic_write_json(tmp / "slmkit.json", provenance)
    return path


def find_adapter_dir(path: str | Path) -> Path:
    """An adapter directory itself, or a fine-tuning run's `adapter/`."""
    path = Path(path)
    for candidate in (path, path / "adapter"):
        if (candidate / "adapter_config.json").exists():
            return candidate
    raise FileNotFoundError(f"{path}: no adapter_config.json here (expected a LoRA adapter directory or a run "
                            "directory from `slm finetune --lora-rank N`)")


def read_adapter_config(path: str | Path) -> LoRAConfig:
    """The LoRAConfig of a PEFT adapter directory; LoRA variants slmkit does not implement are refused."""
    raw = load_json(Path(path) / "adapter_config.json")
    unsupported = {"peft_type": raw.get("peft_type") != "LORA", "use_dora": raw.get("use_dora"),
                   "use_rslora": raw.get("use_rslora"), "fan_in_fan_out": raw.get("fan_in_fan_out"),
                   "bias": raw.get("bias", "none") != "none", "modules_to_save": raw.get("modules_to_save"),
                   "rank_pattern": raw.get("rank_pattern"), "alpha_pattern": raw.get("alpha_pattern"),
                   "layers_to_transform": raw.get("layers_to_transform")}
    bad = [k for k, v in unsupported.items() if v]
    if bad:
        raise ValueError(f"{path}: adapter uses {', '.join(bad)}, which slmkit's LoRA does not support")
    targets = raw.get("target_modules") or []
    if isinstance(targets, str) and targets != "all-linear":
        raise ValueError(f"{path}: target_modules is a regular expression ({targets!r}); slmkit needs a list")
    if isinstance(targets, list):  # PEFT matches name suffixes and saves "all-linear" as full module names
        targets = sorted({t.rpartition(".")[2] for t in targets})
    return LoRAConfig(r=raw["r"], alpha=raw["lora_alpha"], dropout=raw.get("lora_dropout", 0.0),
                      target_modules=targets)


def load_adapter(model: nn.Module, path: str | Path) -> nn.Module:
    """Apply a PEFT LoRA adapter to a slmkit Transformer, unmerged (in place; the base stays frozen)."""
    path = find_adapter_dir(path)
    cfg = read_adapter_config(path)
    tensors = read_adapter_weights(path)
    # Wrap exactly the layers the file has matrices for (target_modules is a pattern; the file is the truth).
    names = sorted({k.rsplit(".lora_", 1)[0] for k in tensors})
    modules = dict(model.named_modules())
    missing = [n for n in names if not isinstance(modules.get(n), nn.Linear)]
    if missing:
        raise ValueError(f"{path}: adapter layers not in this model: {missing[:3]} (was it made for another base?)")
    for p in model.parameters():
        p.requires_grad_(False)
    _wrap(model, names, cfg)
    _copy_lora_weights(model, tensors, source=str(path))
    return model


def load_lora_weights(model: nn.Module, path: str | Path) -> None:
    """Read an adapter's matrices into a model that already has the same LoRA layers (resuming a run)."""
    _copy_lora_weights(model, read_adapter_weights(path), source=str(path))


def read_adapter_weights(path: str | Path) -> dict[str, torch.Tensor]:
    """An adapter file's LoRA matrices under slmkit names (layers.N.self_attn.q_proj.lora_A.weight)."""
    tensors = {}
    with safe_open(str(Path(path) / "adapter_model.safetensors"), framework="pt") as f:
        for key in f.keys():
            tensors[key.removeprefix(PEFT_PREFIX).removeprefix("model.")] = f.get_tensor(key)
    return tensors


def _copy_lora_weights(model: nn.Module, tensors: dict[str, torch.Tensor], source: str) -> None:
    params = {n: p for n, p in model.named_parameters() if ".lora_" in n}
    missing, unexpected = sorted(set(params) - set(tensors)), sorted(set(tensors) - set(params))
    if missing or unexpected:
        raise ValueError(f"{source}: LoRA weights don't match the model's LoRA layers: missing {missing[:3]}, "
                         f"unexpected {unexpected[:3]}")
    with torch.no_grad():
        for name, p in params.items():
            if tensors[name].shape != p.shape:
                raise ValueError(f"{source}: {name} has shape {tuple(tensors[name].shape)}, the model expects "
                                 f"{tuple(p.shape)}")
            p.copy_(tensors[name])


def merge_lora(model: nn.Module) -> nn.Module:
    """Fold every LoRA update into its weight (W += alpha/r · B A) and put plain Linear layers back, in place."""
    for name, m in list(model.named_modules()):
        if not isinstance(m, LoRALinear):
            continue
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        plain = nn.Linear(m.in_features, m.out_features, bias=False, device=m.weight.device, dtype=m.weight.dtype)
        with torch.no_grad():
            plain.weight.copy_(m.merged_weight())
        plain.weight.requires_grad_(False)
        setattr(parent, child, plain.train(m.training))
    return model


def merged_copy(model: nn.Module) -> nn.Module:
    """An fp32 copy of `model` with its LoRA merged (the model itself keeps training, unchanged)."""
    return merge_lora(copy.deepcopy(model).float())

