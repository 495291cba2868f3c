"""int8 weights for decoding (`--weights int8`): per-channel scales, a quarter of fp32's memory traffic.

Batch-1 decoding reads every weight once per token, so on a CPU it is bound by memory traffic, and the LM head
is the largest single read (stories15m: 37 of 61 MB per token). Each output channel (row of a Linear weight)
gets its own scale, max|w| / 127, and weights round to the nearest int8 (symmetric, no zero point), as in
LLM.int8's vector-wise quantization without the outlier split, or gpt-fast's int8 mode.

Two kernels. On a CPU, PyTorch's fbgemm/oneDNN dynamic-quantized linear, which also rounds each activation
tensor to 8 bits (7 on x86, `reduce_range`) on the fly, as llama.cpp's q8_0 kernels do: fast (stories15m
decodes 1.6-2.0x faster than with fp32 weights here), and within 1% of fp32's validation loss for slmkit-trained
models, but SmolLM2-135M's activation outliers (LLM.int8, Dettmers et al. 2022) make it 79% worse. Hence a check: the
model's loss on a calibration text is computed with fp32 and with int8 weights, and when int8 is more than
`max_loss_increase` worse, every layer falls back to weight-only int8 (weights dequantized per call: SmolLM2
within 0.2% of fp32, a quarter of the memory, but no faster on a CPU: `aten._weight_int8pack_mm`, PyTorch's
weight-only kernel, ran 4-10x slower than the fp32 matmul on this AVX2 CPU). Off the CPU (GPU, bf16
activations) the weight-only path is the only one. Figures: benchmarks/int8_quality.py, BENCHMARKS.md.

Every projection of every block and the LM head are quantized; the embedding table stays as it was (a step
reads one row of it), which unties a tied LM head.
"""

from __future__ import annotations

import warnings

import torch
import torch.nn as nn
import torch.nn.functional as F

_CPU_KERNEL = bool(torch.backends.quantized.supported_engines) and hasattr(torch.ops.quantized, "linear_dynamic")


class Int8Linear(nn.Module):
    """y = x @ (int8 weight * per-row scale)^T, from a float (out, in) weight."""

    def __init__(self, weight: torch.Tensor):
        super().__init__()
        w = weight.detach().float()
        scale = w.abs().amax(dim=1).clamp(min=1e-12) / 127
        self.register_buffer("weight", torch.round(w / scale[:, None]).clamp(-127, 127).to(torch.int8))
        self.register_buffer("scale", scale)
        self.in_features, self.out_features = w.shape[1], w.shape[0]
        self._packed = None  # the CPU kernel's prepacked weight, built on first use
        self.dynamic = True  # use the CPU kernel that also quantizes activations, where it exists

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.dynamic and _CPU_KERNEL and x.device.type == "cpu" and x.dtype == torch.float32:
            if self._packed is None:
                self._packed = self._pack()
            if self._packed is not False:
                return torch.ops.quantized.linear_dynamic(x, self._packed, True)
        return F.linear(x, self.weight.to(x.dtype)) * self.scale.to(x.dtype)

    def _pack(self):
        """The CPU kernel's weight, or False where this PyTorch no longer has quantized tensors (they are
        deprecated): the weight-only path then takes over."""
        zero = torch.zeros(self.out_features, dtype=torch.long)
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", UserWarning)
                q = torch._make_per_channel_quantized_tensor(self.weight, self.scale.double(), zero, 0)
                return torch.ops.quantized.linear_prepack(q, None)
        except (RuntimeError, AttributeError, NotImplementedError):
            return False

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, int8 per-channel"


def quantize_int8(model: nn.Module, check_ids: torch.Tensor | None = None, max_loss_increase: float = 0.01) -> dict:
    """Replace the model's Linear layers (every block projection and the LM head) by Int8Linear, in place.

    With `check_ids` (1, T) token ids, the loss on them is compared before and after; when the fast kernel (int8
    activations too) is more than `max_loss_increase` worse, the layers switch to weight-only int8. Returns
    {"kernel": "dynamic" | "weight-only", "loss_fp32", "loss_int8"} (losses when checked).
    For inference only: the result is not trainable and is not saved (a model directory keeps float weights).
    """
    targets = [(name, m) for name, m in model.named_modules() if type(m) is nn.Linear]
    if not targets:
        raise ValueError("no nn.Linear layers to quantize (already quantized, or LoRA-wrapped: merge it first)")
    report = {"kernel": "dynamic" if _CPU_KERNEL else "weight-only"}
    with torch.no_grad():
        if check_ids is not None:
            report["loss_fp32"] = model(check_ids[:, :-1], targets=check_ids[:, 1:]).item()
        for name, linear in targets:
            parent_name, _, attr = name.rpartition(".")
            parent = model.get_submodule(parent_name) if parent_name else model
            setattr(parent, attr, Int8Linear(linear.weight))
        if check_ids is not None:
            report["loss_int8"] = model(check_ids[:, :-1], targets=check_ids[:, 1:]).item()
            if report["loss_int8"] > report["loss_fp32"] * (1 + max_loss_increase) and _CPU_KERNEL:
                for m in model.modules():
                    if isinstance(m, Int8Linear):
                        m.dynamic = False
                report["kernel"] = "weight-only"
                report["loss_int8_dynamic"] = report["loss_int8"]
                report["loss_int8"] = model(check_ids[:, :-1], targets=check_ids[:, 1:]).item()
    return report


def calibration_ids(tokenizer, max_tokens: int = 512) -> torch.Tensor:
    """(1, T) ids of a text every Python install has (the standard library's textwrap module: prose docstrings
    and code), for quantize_int8's check."""
    import inspect
    import textwrap
    ids = tokenizer.encode(inspect.getsource(textwrap), add_bos=tokenizer.add_bos)[:max_tokens]
    return torch.tensor([ids])


def decode_bytes(model: nn.Module) -> int:
    """Bytes of weights one decoding step reads: every projection, the LM head and the norms. The embedding
    table is left out (a step reads one row of it) unless it is also the LM head (tied)."""
    tensors = {}
    for m in model.modules():
        if isinstance(m, (nn.Linear, Int8Linear)) or type(m).__name__ == "RMSNorm":
            for t in list(m.parameters(recurse=False)) + list(m.buffers(recurse=False)):
                tensors[id(t)] = t
    return sum(t.numel() * t.element_size() for t in tensors.values())
