"""Recipes: each stage of the lifecycle as one function that reads top to bottom, over the library packages.
The CLI calls these; a Python user can too."""

from __future__ import annotations


def model_dir(spec: str, purpose: str, kinds: tuple[str, ...] = ("model",)) -> str:
    """The model directory a model argument names (any spelling `slmkit.hub.resolve_model` takes), for recipes
    that need weights on disk in slmkit's format; `purpose` names what needs them, for the error; `kinds` as
    resolve_model's (("model", "embedding") also takes a pulled encoder)."""
    from slmkit.hub import resolve_model
    ref = resolve_model(spec, kinds=kinds)
    if ref.kind != "dir":
        raise ValueError(f"{spec}: {purpose} starts from a model directory; import a GGUF first with "
                         f"`slm import {spec} -o DIR`")
    return ref.location
