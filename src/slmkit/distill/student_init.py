"""A student cut from its teacher (DistilBERT-style): the teacher's tokenizer, embeddings, final norm and every
N-th block.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path


def student_from_teacher(teacher: str, out: str | Path, layer_step: int = 2) -> Path:
    """A smaller model directory from the teacher (DistilBERT-style): its tokenizer, embeddings, final norm and
    LM head, and every `layer_step`-th block (0, step, 2 step, ...). Width stays the teacher's."""
    from slmkit.formats import load_any
    from slmkit.formats.hf_dir import read_provenance, save_model_dir
    from slmkit.hub import resolve_model
    from slmkit.model.llama import Transformer
    if layer_step < 1:
        raise ValueError(f"layer_step must be >= 1, got {layer_step}")
    ref = resolve_model(teacher)
    model, tokenizer = load_any(ref.location)
    keep = list(range(0, model.cfg.n_layers, layer_step))
    student = Transformer(dataclasses.replace(model.cfg, n_layers=len(keep)))
    teacher_state = model.state_dict()
    state = {k: v for k, v in teacher_state.items() if not k.startswith("layers.")}
    for new, old in enumerate(keep):
        prefix = f"layers.{old}."
        state.update({f"layers.{new}." + k[len(prefix):]: v for k, v in teacher_state.items()
                      if k.startswith(prefix)})
    student.load_state_dict(state)
    provenance = {"student_from_teacher": {"teacher": str(teacher), "layers_kept": keep,
                                           "teacher_layers": model.cfg.n_layers},
                  "instruction_tuned": bool(read_provenance(ref.location).get("instruction_tuned", False))
                  if ref.kind == "dir" else False}
    return save_model_dir(student, out, tokenizer=tokenizer, provenance=provenance)

