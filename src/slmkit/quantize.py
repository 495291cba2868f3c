"""Weight-only int8 quantization of slmkit's model for decoding (`--weights int8`).

Batch-1 decoding reads every weight once per token, so on a CPU it is bound by memory traffic: int8 weights
move a quarter of fp32's bytes. Each output channel (row of a Linear weight) gets its own scale,
max|w| / 127, and weights round to the nearest int8 (symmetric, no zero point): the scheme of LLM.int8's
vector-wise quantization without outliers and of gpt-fast's int8 weight-only mode. Activations stay in floating
point, so the only error is the weights' rounding (BENCHMARKS.md: validation loss within 1% of fp32).

Every projection of every block and the LM head are quantized; the embedding table stays as it was (a lookup
reads one row per token, so it costs no traffic worth saving), which unties a tied LM head.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

# PyTorch's CPU kernel for fp activations x int8 weights with per-channel scales (what gpt-fast uses on CPU)
_INT8_MM = getattr(torch.ops.aten, "_weight_int8pack_mm", None)


class Int8Linear(nn.Module):
    """y = x @ (int8 weight * per-row scale)^T, from a float (out, in) weight."""

    def __init__(self, weight: torch.Tensor):
        super().__init__()
        w = weight.detach().float()
        scale = w.abs().amax(dim=1).clamp(min=1e-12) / 127
        self.register_buffer("weight", torch.round(w / scale[:, None]).clamp(-127, 127).to(torch.int8))
        self.register_buffer("scale", scale.to(weight.dtype))
        self.in_features, self.out_features = w.shape[1], w.shape[0]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        lead = x.shape[:-1]
        x2 = x.reshape(-1, self.in_features)
        scale = self.scale.to(x.dtype)
        if _INT8_MM is not None and x.device.type == "cpu" and x.dtype in (torch.float32, torch.bfloat16):
            y = _INT8_MM(x2.contiguous(), self.weight, scale)
        else:
            y = F.linear(x2, self.weight.to(x.dtype)) * scale
        return y.reshape(*lead, self.out_features)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, int8 per-channel"


def quantize_int8(model: nn.Module) -> nn.Module:
    """Replace the model's Linear layers (every block projection and the LM head) by Int8Linear, in place.

    For inference only: the result is not trainable and is not saved (a model directory keeps float weights;
    quantize again after loading, it takes well under a second for a 135M model).
    """
    targets = [(name, m) for name, m in model.named_modules() if type(m) is nn.Linear]
    if not targets:
        raise ValueError("no nn.Linear layers to quantize (already quantized, or LoRA-wrapped: merge it first)")
    for name, linear in targets:
        parent_name, _, attr = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, attr, Int8Linear(linear.weight))
    return model


def decode_bytes(model: nn.Module) -> int:
    """Bytes of weights one decoding step reads: every projection, the LM head and the norms. The embedding
    table is left out (a step reads one row of it) unless it is also the LM head (tied)."""
    tensors = {}
    for m in model.modules():
        if isinstance(m, (nn.Linear, Int8Linear)) or type(m).__name__ == "RMSNorm":
            for t in list(m.parameters(recurse=False)) + list(m.buffers(recurse=False)):
                tensors[id(t)] = t
    return sum(t.numel() * t.element_size() for t in tensors.values())
