"""Pretraining (`slm train`): a model of a preset shape, or one to continue from, trained on a token dataset: a
causal decoder (objective "clm"), or a RoBERTa-style masked-LM encoder (objective "mlm", train/mlm.py)."""

from __future__ import annotations

from pathlib import Path

from slmkit.recipes import model_dir
from slmkit.train.loop import TrainConfig, train


def pretrain(data: str | Path, out: str | Path, preset: str | None = None, model_overrides: dict | None = None,
             init_from: str | None = None, resume: bool = False, objective: str = "clm", log=print,
             **options) -> dict:
    """Train a model on a token dataset (from `slm data prepare`) into the run directory `out`.

    The model is `preset` reshaped by `model_overrides` (e.g. {"n_layers": 4}), or the model `init_from` names (a
    model/run directory or a pulled name) to train further. objective="mlm" pretrains an encoder of an encoder
    preset (`enc-tiny` by default; see ENCODER_PRESETS) with RoBERTa's dynamic masking; its RUN/model loads in
    transformers as RobertaForMaskedLM and in `slm embed`. `options` are TrainConfig fields; a budget (max_steps,
    max_tokens and/or max_minutes) is required. Works under torchrun for DDP. Returns the run's summary.
    """
    start = model_dir(init_from, "continued training") if init_from else None
    cfg = TrainConfig(data=str(data), out=str(out), preset=preset, objective=objective,
                      model_overrides=model_overrides or {}, init_from=start, **options)
    return train(cfg, resume=resume, log=log)
