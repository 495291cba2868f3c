"""Export a model directory to ONNX (`input_ids` -> `logits`, no KV cache) and run it with onnxruntime.

    export_onnx("runs/x", "out/")            -> out/model.onnx + config.json, generation_config.json, tokenizer files
    export_onnx("runs/x", "out/tiny.onnx")   -> just out/tiny.onnx

The graph has one input, `input_ids` (int64, [batch, seq]), and one output, `logits` (float32, [batch, seq,
vocab]); batch and seq are dynamic, seq up to the model's max_seq_len (the RoPE tables are baked in at that
length). Weights are exported in fp32. A model whose weights pass ONNX's 2 GB protobuf limit has them written
to `<name>.onnx.data` beside the graph (external data; onnxruntime finds it by that relative name), so keep the
two files together.

We use the torch.export-based ("dynamo") exporter, not the legacy TorchScript one (`dynamo=False`): the legacy
exporter cannot convert `scaled_dot_product_attention(enable_gqa=True)` at all, so grouped-query models would
need a patched attention just for export, and it is deprecated since torch 2.9. The dynamo exporter decomposes
GQA attention itself (repeating k/v heads inside the graph), so the PyTorch model runs unchanged, and it keeps
batch/seq symbolic via `torch.export.Dim`. It is slower (seconds even for a tiny model) but exact: logits match
PyTorch to ~1e-7 in fp32.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import shutil
import tempfile
import warnings
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn

from slmkit import __version__
from slmkit.files import atomic_write_bytes
from slmkit.formats.hf_dir import find_model_dir, load_model_dir

MODEL_FILE = "model.onnx"
MIN_OPSET = 18
# Copied next to model.onnx when exporting to a directory (each only if the model directory has it).
SIDE_FILES = ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
              "special_tokens_map.json", "chat_template.jinja")
_INSTALL = "pip install 'slmkit[onnx]'"


def _require(*modules: str) -> None:
    for name in modules:
        try:
            __import__(name)
        except ImportError as e:
            raise ImportError(f"ONNX support needs the `{name}` package: {_INSTALL}") from e


class _LogitsOnly(nn.Module):
    """forward(input_ids) -> logits: the exported signature (no targets, no cache)."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.model(input_ids)


def _resolve_out(out_path: str | Path) -> tuple[Path, bool]:
    """(path of the .onnx file, whether out_path is a directory that also gets config + tokenizer files)."""
    out = Path(out_path)
    if out.suffix.lower() == ".onnx":
        if out.is_dir():
            raise IsADirectoryError(f"{out}: is a directory; give a file name ending in .onnx or a directory")
        return out, False
    if out.exists() and not out.is_dir():
        raise NotADirectoryError(f"{out}: exists and is not a directory; an output ending in .onnx is written "
                                 "as that file, anything else is a directory that receives model.onnx")
    return out / MODEL_FILE, True


@contextlib.contextmanager
def _quiet_exporter():
    """Silence the exporter's harmless noise (torchvision ops it skips, pytree deprecations inside torch)."""
    registry_log = logging.getLogger("torch.onnx._internal.exporter._registration")
    level = registry_log.level
    registry_log.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*LeafSpec.*", category=FutureWarning)
            yield
    finally:
        registry_log.setLevel(level)


def _save_atomically(program, dest: Path, external_data: bool | None) -> None:
    """Save an ONNXProgram to `dest` (+ `dest.data` if external) via a temporary sibling directory + os.replace.

    The graph names its external data file by a relative name, so both files are written under their final
    names in the temporary directory, then renamed into place: data first, graph last.
    """
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.", suffix=".tmp", dir=dest.parent))
    try:
        program.save(tmp / dest.name, external_data=external_data)
        umask = os.umask(0)
        os.umask(umask)
        data_name = f"{dest.name}.data"
        written = sorted(p.name for p in tmp.iterdir())
        for name in sorted(written, key=lambda n: n == dest.name):  # the graph last
            os.chmod(tmp / name, 0o666 & ~umask)
            os.replace(tmp / name, dest.parent / name)
        if data_name not in written:  # a stale data file from an earlier, external-data export of this name
            with contextlib.suppress(FileNotFoundError):
                os.unlink(dest.parent / data_name)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def export_onnx(model_dir_or_run: str | Path, out_path: str | Path, opset: int | None = None, *,
                external_data: bool | None = None) -> Path:
    """Export a model directory (or a `slm train` run directory) to ONNX; returns the path of the .onnx file.

    `out_path` ending in `.onnx` writes that file only; anything else is a directory (created if needed, other
    contents left alone) that receives `model.onnx` plus config.json, generation_config.json and the tokenizer
    files. `opset` None uses the exporter's default (18 or newer); below 18 is refused, because ONNX's version
    converter cannot take this graph below 18 and the exporter would silently keep 18. `external_data` None
    stores weights inside the graph unless they pass 2 GB; True always writes them to `<name>.onnx.data`.
    """
    if opset is not None and opset < MIN_OPSET:
        raise ValueError(f"opset {opset} is not supported: the exporter writes opset {MIN_OPSET} or newer; "
                         f"pass opset=None (the default) or >= {MIN_OPSET}")
    _require("onnx", "onnxscript")
    src = find_model_dir(model_dir_or_run)
    dest, with_side_files = _resolve_out(out_path)
    model = load_model_dir(src, device="cpu", dtype=torch.float32)
    cfg = model.cfg
    # torch.export specialises dimensions whose example size is 0 or 1, so the example is 2 x (2..8).
    example = torch.randint(0, cfg.vocab_size, (2, max(2, min(8, cfg.max_seq_len))), dtype=torch.long)
    batch = torch.export.Dim("batch", min=1)
    seq = torch.export.Dim("seq", min=1, max=max(2, cfg.max_seq_len))
    with _quiet_exporter(), torch.no_grad():
        program = torch.onnx.export(
            _LogitsOnly(model).eval(), (example,), None, dynamo=True, opset_version=opset,
            input_names=["input_ids"], output_names=["logits"],
            dynamic_shapes={"input_ids": {0: batch, 1: seq}}, optimize=True, verbose=False)
    program.model.metadata_props.update({
        "slmkit_version": __version__,
        "max_seq_len": str(cfg.max_seq_len),
        "vocab_size": str(cfg.vocab_size),
        "bos_token_id": str(cfg.bos_token_id),
        "eos_token_id": str(cfg.eos_token_id),
    })
    _save_atomically(program, dest, external_data)
    if with_side_files:
        for name in SIDE_FILES:
            f, to = src / name, dest.parent / name
            if f.is_file() and not (to.exists() and to.samefile(f)):
                atomic_write_bytes(to, f.read_bytes())
    return dest


@functools.lru_cache(maxsize=4)
def _session(path: str, mtime_ns: int, size: int):
    try:
        import onnxruntime as ort
    except ImportError as e:
        raise ImportError(f"running ONNX models needs onnxruntime: {_INSTALL}") from e
    return ort.InferenceSession(path, providers=["CPUExecutionProvider"])


def onnx_logits(onnx_path: str | Path, ids: np.ndarray) -> np.ndarray:
    """Logits from an exported model with onnxruntime (CPU): ids (batch, seq) -> (batch, seq, vocab) float32.

    `onnx_path` is the .onnx file or a directory holding model.onnx. 1-D ids give (seq, vocab).
    """
    path = Path(onnx_path)
    if path.is_dir():
        path = path / MODEL_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no ONNX model here (export one with slmkit.formats.onnx.export_onnx)")
    stat = path.stat()
    session = _session(str(path.resolve()), stat.st_mtime_ns, stat.st_size)
    ids = np.asarray(ids)
    if ids.ndim not in (1, 2) or not np.issubdtype(ids.dtype, np.integer):
        raise ValueError(f"ids must be a 1-D or 2-D integer array, got {ids.dtype} with shape {ids.shape}")
    meta = session.get_modelmeta().custom_metadata_map
    max_len = int(meta.get("max_seq_len", 0))
    if max_len and ids.shape[-1] > max_len:
        raise ValueError(f"sequence of {ids.shape[-1]} tokens exceeds this model's max_seq_len {max_len}")
    batch = ids.reshape(1, -1) if ids.ndim == 1 else ids
    logits = session.run(["logits"], {"input_ids": batch.astype(np.int64, copy=False)})[0]
    return logits[0] if ids.ndim == 1 else logits
