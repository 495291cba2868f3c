"""Fine-tuning recipes: supervised fine-tuning (full or LoRA) and folding an adapter into its base (`slm merge`).
"""

from __future__ import annotations

from pathlib import Path

from slmkit.hub import sampling_defaults
from slmkit.model.lora import LoRAConfig, find_adapter_dir, load_adapter, merge_lora
from slmkit.recipes import model_dir
from slmkit.train.loop import TrainConfig, train


def finetune(model: str, out: str | Path, data: str | Path | None = None, mixture: str | Path | None = None,
             holdout_tasks: list[str] | None = None, lora: LoRAConfig | None = None, resume: bool = False,
             log=print, **options) -> dict:
    """Supervised fine-tuning (instruction tuning) of `model` (a model/run directory or a pulled name).

    The examples are `data`, a JSONL of {"messages": [...]} chat or {"prompt", "completion"} records, or
    `mixture`, a FLAN-style mixture YAML sampled into OUT/mixture (its `holdout_tasks` globs, as well as the
    YAML's own, become zero-shot eval files in OUT/mixture/heldout). The loss falls on the answers only.
    With `lora` only low-rank adapters train (OUT/adapter, plus the merged OUT/model); else every weight does.
    `options` are TrainConfig fields (a budget is required; weight_decay defaults to 0 here). Returns the summary.
    """
    start = model_dir(model, "fine-tuning")
    if (data is None) == (mixture is None):
        raise ValueError("give exactly one of --data (a JSONL file) or --mixture (a mixture YAML)")
    if mixture is not None:
        from slmkit.data.mixture import build_mixture, load_mixture
        built = Path(out) / "mixture"
        if not (resume and (built / "train.jsonl").exists()):  # a resumed run keeps the examples it had
            build_mixture(load_mixture(mixture, holdout_tasks or []), built, log=log)
        data = built / "train.jsonl"
    elif holdout_tasks:
        raise ValueError("--holdout-tasks needs --mixture")
    cfg = TrainConfig(data=str(data), out=str(out), init_from=start, lora=lora, **{"weight_decay": 0.0, **options})
    return train(cfg, resume=resume, log=log)


def merge_adapter(base: str | Path, adapter: str | Path, out: str | Path) -> Path:
    """Write a full model directory: `base` (a model/run directory or a pulled name) with the adapter merged in,
    with the base's tokenizer."""
    from slmkit.formats import load_any
    from slmkit.formats.hf_dir import read_provenance, save_model_dir
    base, adapter = Path(model_dir(str(base), "merging")), find_adapter_dir(adapter)
    model, tokenizer = load_any(base)
    merge_lora(load_adapter(model, adapter))
    provenance = {"instruction_tuned": read_provenance(base).get("instruction_tuned", False),
                  **read_provenance(adapter),
                  "merged_from": {"base": str(base.resolve()), "adapter": str(adapter.resolve())}}
    return save_model_dir(model, out, tokenizer=tokenizer, provenance=provenance, sampling=sampling_defaults(base))
