"""Fine-tuning recipes: supervised fine-tuning (full or LoRA) and folding an adapter into its base (`slm merge`).
"""

from __future__ import annotations

from pathlib import Path

from slmkit.model.lora import find_adapter_dir, load_adapter, merge_lora


def merge_adapter(base: str | Path, adapter: str | Path, out: str | Path) -> Path:
    """Write a full model directory: `base` with the adapter merged in, with the base's tokenizer."""
    from slmkit.formats import load_any
    from slmkit.formats.hf_dir import find_model_dir, read_provenance, save_model_dir
    base, adapter = find_model_dir(base), find_adapter_dir(adapter)
    model, tokenizer = load_any(base)
    merge_lora(load_adapter(model, adapter))
    provenance = {"instruction_tuned": read_provenance(base).get("instruction_tuned", False),
                  **read_provenance(adapter),
                  "merged_from": {"base": str(base.resolve()), "adapter": str(adapter.resolve())}}
    return save_model_dir(model, out, tokenizer=tokenizer, provenance=provenance)

