"""Make the plain `lm_eval --model slmkit ...` command know the model "slmkit".

lm-eval 0.4 has no plugin mechanism for models: `lm_eval.api.registry.get_model` sees only models registered in
the running process, and fills its table from the fixed `MODEL_MAPPING` when it first imports `lm_eval.models`.
`python -m slmkit.eval.lm_eval.adapter --install-hook` writes a .pth file that calls `install()` at interpreter
start-up; `install()` puts a finder on `sys.meta_path` that, right after `lm_eval.models` has filled the table,
adds "slmkit" as a lazy import path (the adapter, torch and slmkit's models load only if "slmkit" is asked for).
This module imports nothing heavy: start-up stays as fast as without it.
"""

import sys

TARGET = "slmkit.eval.lm_eval.adapter:SlmkitEvalLM"


def register() -> None:
    from lm_eval.api.registry import model_registry
    if "slmkit" not in model_registry:
        model_registry.register("slmkit", target=TARGET)


class _Finder:
    """Finds nothing itself: lets the other finders find `lm_eval.models`, and registers once it has run."""

    def find_spec(self, name, path, target=None):
        if name != "lm_eval.models":
            return None
        others = (f for f in sys.meta_path if f is not self and hasattr(f, "find_spec"))
        spec = next((found for f in others if (found := f.find_spec(name, path, target)) is not None), None)
        if spec is None or spec.loader is None:
            return None
        exec_module = spec.loader.exec_module

        def exec_and_register(module):
            exec_module(module)
            register()

        spec.loader.exec_module = exec_and_register
        return spec


def install() -> None:
    if not any(isinstance(f, _Finder) for f in sys.meta_path):
        sys.meta_path.insert(0, _Finder())
    if "lm_eval.models" in sys.modules:  # too late for the finder: lm-eval's table is already filled
        register()
