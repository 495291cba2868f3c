"""Several LoRA adapters on one base model at once, each row of a batch choosing its own (S-LoRA, Punica).

`slm serve MODEL --adapter support=DIR --adapter legal=DIR` loads every adapter at start-up and a request for
`MODEL:support` decodes in the same batch as one for `MODEL:legal` and one for the bare base: the base
weights are read once per step for all of them, and each row adds its own low-rank update.

Each targeted projection becomes a MultiLoRALinear holding every adapter's matrices stacked,

    A: (n_adapters + 1, r_max, in)     B: (n_adapters + 1, out, r_max) · (alpha / r)

with slot 0 all zeros (the base: no update). A smaller rank is padded with zeros, and an adapter that leaves a
projection alone has zeros there, so the padded products add exactly nothing. The scale is folded into B at
load, so rows with different alpha/r share one batched matmul. The row -> adapter map is an AdapterBank that
every MultiLoRALinear of the model shares; the batched decoder sets it before each forward pass
(`bank.rows`), and leaving it None runs the base alone.
"""

from __future__ import annotations

import re
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn as nn

from slmkit.model.lora import find_adapter_dir, read_adapter_config, read_adapter_weights

NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*")


@dataclass
class AdapterBank:
    """The adapters a model carries: their names (slot i + 1 is names[i]) and which slot each batch row uses."""

    names: list[str] = field(default_factory=list)
    paths: list[str] = field(default_factory=list)
    rows: torch.Tensor | int | None = None  # (batch,) slot per row of the next forward pass, or one slot for
    # every row; None: the base alone

    @contextmanager
    def use(self, name: str | None):
        """Every forward pass inside the block runs adapter `name` (None: the base): `lm.generate` with one."""
        previous, self.rows = self.rows, self.slot(name)
        try:
            yield
        finally:
            self.rows = previous

    def slot(self, name: str | None) -> int:
        """The slot of adapter `name` (0: the base, for None)."""
        if name is None:
            return 0
        try:
            return self.names.index(name) + 1
        except ValueError:
            raise ValueError(f"no adapter named {name!r}; loaded: {', '.join(self.names) or '(none)'}") from None


class MultiLoRALinear(nn.Module):
    """A frozen Linear plus one low-rank update per adapter, chosen per batch row by the shared AdapterBank."""

    def __init__(self, base: nn.Linear, A: torch.Tensor, B: torch.Tensor, bank: AdapterBank):
        super().__init__()
        self.in_features, self.out_features = base.in_features, base.out_features
        self.weight = base.weight
        self.register_buffer("lora_A", A)  # buffers: inference only, and state_dict still has the base's names
        self.register_buffer("lora_B", B)
        self.bank = bank

    def forward(self, x):
        y = nn.functional.linear(x, self.weight)
        rows = self.bank.rows
        if isinstance(rows, torch.Tensor):
            if rows.numel() != x.shape[0]:
                raise RuntimeError(f"the adapter bank has {rows.numel()} rows, the batch {x.shape[0]}")
            if bool((rows == rows[0]).all()):  # one adapter for the whole batch: two plain matmuls
                rows = int(rows[0])
        if rows is None or isinstance(rows, int) and rows == 0:
            return y
        A, B = self.lora_A, self.lora_B
        if isinstance(rows, int):
            update = x.to(A.dtype) @ A[rows].t() @ B[rows].t()
        else:  # (b, s, in) @ (b, in, r) @ (b, r, out): each row through its own adapter
            update = torch.bmm(torch.bmm(x.to(A.dtype), A[rows].transpose(1, 2)), B[rows].transpose(1, 2))
        return y + update.to(y.dtype)


def check_adapter_name(name: str) -> str:
    if not NAME.fullmatch(name):
        raise ValueError(f"adapter name {name!r}: use letters, digits, '_', '-' and '.' (it goes in the model "
                         "field as MODEL:NAME)")
    return name


def add_adapters(model: nn.Module, adapters: dict[str, str | Path]) -> AdapterBank:
    """Load every adapter (PEFT directories or LoRA runs, made for this base) onto `model` (in place) and
    return the bank that selects among them. Layers no adapter touches stay plain Linears."""
    if not adapters:
        raise ValueError("no adapters given")
    bank = AdapterBank()
    modules = dict(model.named_modules())
    loaded = []  # (scale, {layer: (A, B)}) per adapter
    for name, path in adapters.items():
        check_adapter_name(name)
        path = find_adapter_dir(path)
        cfg = read_adapter_config(path)
        tensors = read_adapter_weights(path)
        layers = {}
        for key in tensors:
            layer = key.rsplit(".lora_", 1)[0]
            if not isinstance(modules.get(layer), nn.Linear):
                raise ValueError(f"{path}: adapter layer {layer} is not in this model (was it made for another "
                                 "base?)")
            layers[layer] = (tensors[f"{layer}.lora_A.weight"].float(), tensors[f"{layer}.lora_B.weight"].float())
        loaded.append((cfg.scale, layers))
        bank.names.append(name)
        bank.paths.append(str(path))
    r_max = max(A.shape[0] for _, layers in loaded for A, _ in layers.values())
    device = next(model.parameters()).device
    for layer in sorted({name for _, layers in loaded for name in layers}):
        base = modules[layer]
        A = torch.zeros(len(loaded) + 1, r_max, base.in_features)
        B = torch.zeros(len(loaded) + 1, base.out_features, r_max)
        for slot, (scale, layers) in enumerate(loaded, start=1):
            if layer in layers:
                a, b = layers[layer]
                if a.shape[1] != base.in_features or b.shape[0] != base.out_features:
                    raise ValueError(f"{bank.paths[slot - 1]}: {layer} has shapes {tuple(a.shape)} and "
                                     f"{tuple(b.shape)}, the model's projection is {base.out_features}x"
                                     f"{base.in_features}")
                A[slot, :a.shape[0]] = a
                B[slot, :, :b.shape[1]] = b * scale
        parent_name, _, child = layer.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, MultiLoRALinear(base, A.to(device), B.to(device), bank))
    return bank
