"""EleutherAI lm-evaluation-harness (lm-eval 0.4) adapter: run lm-eval's tasks on any slmkit `LM`.

From the command line (lm-eval's own arguments, with the model "slmkit" added):

    python -m slmkit.eval.lm_eval.adapter --model slmkit --model_args path=runs/tiny,backend=torch \\
        --tasks hellaswag,arc_easy --device cpu

From Python:

    import lm_eval
    from slmkit.eval.lm_eval.adapter import SlmkitEvalLM
    lm_eval.simple_evaluate(model=SlmkitEvalLM(lm), tasks=["arc_easy"])

lm-eval 0.4 finds models only in its own registry (it reads no plugin entry points), so "slmkit" exists in a
process once this module is imported; running the module does that and then hands the command line to lm-eval's
own CLI. For the plain `lm_eval --model slmkit ...` command, install the start-up hook once per environment
(`make install` does it when the "eval" extra is installed; see `slmkit.eval.lm_eval.hook`):

    python -m slmkit.eval.lm_eval.adapter --install-hook      # or --uninstall-hook
"""

from __future__ import annotations

import argparse
import logging
import sys
import sysconfig
from pathlib import Path

import lm_eval.models  # noqa: F401  (lm-eval fills its model table only while the registry is empty: fill it first)
import torch
from lm_eval.api.model import LM as EvalLM
from lm_eval.api.registry import model_registry
from lm_eval.utils import get_rolling_token_windows, make_disjoint_window, simple_parse_args_string
from tqdm import tqdm

from slmkit.eval.lm_eval.hook import TARGET as HOOK_TARGET
from slmkit.files import atomic_write_text
from slmkit.lm import LM, load_lm
from slmkit.sampling import SamplingParams

log = logging.getLogger(__name__)

# Requests handed to the backend at once: TorchLM batches them by its own token budget; the chunk only sets how
# often the progress bar moves.
CHUNK = 64
DEFAULT_MAX_GEN_TOKS = 256  # lm-eval's own default for generate_until


class SlmkitEvalLM(EvalLM):
    """An lm-eval model backed by a slmkit `LM` (any backend: torch, hf, llamacpp, remote)."""

    def __init__(self, lm: LM):
        super().__init__()
        self.lm = lm

    @classmethod
    def load(cls, path: str, backend: str = "auto", device: str = "cpu", dtype: str | torch.dtype = "float32",
             **options) -> SlmkitEvalLM:
        """Open `path` (model dir, .gguf, pulled name or URL) with `slmkit.lm.load_lm`; dtype as "bfloat16" etc."""
        dtype = dtype if isinstance(dtype, torch.dtype) else getattr(torch, dtype)
        return cls(load_lm(str(path), backend=backend, device=device, dtype=dtype, **options))

    @classmethod
    def create_from_arg_obj(cls, arg_dict: dict, additional_config: dict | None = None) -> SlmkitEvalLM:
        args = dict(arg_dict)
        if "path" not in args:
            raise ValueError("--model slmkit needs --model_args path=MODEL (a model dir, .gguf file, name or URL)")
        # lm-eval always passes batch_size / max_batch_size / device; the backends batch by token budget, so only
        # the device is used, and model_args win over the command-line flag.
        device = (additional_config or {}).get("device")
        if device and "device" not in args:
            args["device"] = device
        args.pop("batch_size", None)
        args.pop("max_batch_size", None)
        return cls.load(**args)

    @classmethod
    def create_from_arg_string(cls, arg_string: str, additional_config: dict | None = None) -> SlmkitEvalLM:
        return cls.create_from_arg_obj(simple_parse_args_string(arg_string), additional_config)

    # --- the three request types --------------------------------------------------------------------------

    def loglikelihood(self, requests, disable_tqdm: bool = False) -> list[tuple[float, bool]]:
        """(sum of log p(continuation | context), is it the greedy continuation) for each request."""
        pairs = [tuple(req.args) for req in requests]
        # Tasks ask for the same pair more than once (repeats, shared few-shot contexts); longest first, so a
        # chunk holds sequences of similar length and the backend pads little.
        unique = sorted(set(pairs), key=lambda p: -len(p[0] + p[1]))
        results = {}
        with tqdm(total=len(unique), desc="slmkit loglikelihood", disable=disable_tqdm) as bar:
            for start in range(0, len(unique), CHUNK):
                chunk = unique[start:start + CHUNK]
                for pair, score in zip(chunk, self.lm.score_many(self._conditioned(chunk)), strict=True):
                    results[pair] = (score.logprob, score.is_greedy)
                    self.cache_hook.add_partial("loglikelihood", pair, results[pair])
                bar.update(len(chunk))
        return [results[p] for p in pairs]

    def _conditioned(self, pairs: list[tuple[str, str]]) -> list[tuple[str, str]]:
        """lm-eval requires empty contexts to work: without a bos token to condition on, use eos (as lm-eval's
        own models do)."""
        tok = self.lm.tokenizer
        if tok is None or tok.add_bos or tok.eos_token is None:
            return pairs
        return [(context or tok.eos_token, continuation) for context, continuation in pairs]

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        """Log-likelihood of whole documents, cut into disjoint windows the way lm-eval's HFLM cuts them.

        Every token is scored exactly once; a window after the first conditions on the tokens just before it
        (the last window on a full context). The document is conditioned on bos (or eos without one).
        """
        tok = self.lm.tokenizer
        if tok is None:
            raise NotImplementedError(f"{self.lm!r} has no tokenizer: loglikelihood_rolling needs token ids")
        prefix = tok.bos_id if tok.add_bos and tok.bos_id is not None else tok.eos_id
        if prefix is None:
            raise ValueError("loglikelihood_rolling needs a bos or eos token to condition the document on")
        windows, owner = [], []  # (context ids, scored ids) and the request each window belongs to
        for i, req in enumerate(requests):
            # slmkit's logprobs also runs the model on the last token, so a window holds max_length - 1
            # predictions plus one token of context (HFLM drops the last input token instead).
            for window in get_rolling_token_windows(tok.encode(req.args[0]), prefix, self.lm.max_length - 1, 1):
                windows.append(make_disjoint_window(window))
                owner.append(i)
        totals = [0.0] * len(requests)
        with tqdm(total=len(windows), desc="slmkit loglikelihood_rolling", disable=disable_tqdm) as bar:
            for start in range(0, len(windows), CHUNK):
                chunk = windows[start:start + CHUNK]
                for j, lp in enumerate(self.lm.logprobs_batch([ctx + cont for ctx, cont in chunk])):
                    totals[owner[start + j]] += float(lp.token_logprobs[-len(chunk[j][1]):].sum())
                bar.update(len(chunk))
        for req, total in zip(requests, totals, strict=True):
            self.cache_hook.add_partial("loglikelihood_rolling", req.args, total)
        return totals

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        """Completions that stop at the request's `until` strings (greedy unless it asks to sample)."""
        outputs = []
        for req in tqdm(requests, desc="slmkit generate_until", disable=disable_tqdm):
            context, gen_kwargs = req.args
            text = self.lm.generate(context, sampling_params(gen_kwargs))[0]
            self.cache_hook.add_partial("generate_until", req.args, text)
            outputs.append(text)
        return outputs

    # --- chat templates (--apply_chat_template) -------------------------------------------------------------

    @property
    def tokenizer_name(self) -> str:
        return self.lm.name.replace("/", "__")

    def chat_template(self, chat_template: bool | str = False) -> str | None:
        tok = self.lm.tokenizer
        return (tok.chat_template or "") if tok is not None else ""

    def apply_chat_template(self, chat_history: list[dict], add_generation_prompt: bool = True) -> str:
        tok = self.lm.tokenizer
        if tok is None or not tok.chat_template:
            raise NotImplementedError(f"{self.lm!r} has no chat template")
        text = tok.apply_chat_template(chat_history, add_generation_prompt=add_generation_prompt)
        # slmkit adds the bos token itself when it encodes; a template that writes it too would double it.
        if tok.add_bos and tok.bos_token and text.startswith(tok.bos_token):
            text = text[len(tok.bos_token):]
        return text


def sampling_params(gen_kwargs: dict) -> SamplingParams:
    """lm-eval's generation kwargs as slmkit SamplingParams: greedy unless do_sample (or, without do_sample, a
    temperature above 0) asks for sampling."""
    kw = dict(gen_kwargs)
    until = kw.pop("until", None) or []
    max_new = kw.pop("max_gen_toks", None) or kw.pop("max_new_tokens", None) or DEFAULT_MAX_GEN_TOKS
    temperature = float(kw.pop("temperature", 0.0) or 0.0)
    do_sample = kw.pop("do_sample", None)
    if do_sample is None:
        do_sample = temperature > 0
    params = SamplingParams(max_new_tokens=int(max_new), temperature=(temperature or 1.0) if do_sample else 0.0,
                            top_k=int(kw.pop("top_k", 0) or 0), top_p=float(kw.pop("top_p", 1.0) or 1.0),
                            stop=[until] if isinstance(until, str) else list(until), seed=kw.pop("seed", None))
    kw.pop("max_new_tokens", None)  # when max_gen_toks was given too
    if kw:
        log.warning("slmkit ignores these generation kwargs: %s", ", ".join(sorted(kw)))
    return params


# Registered by import path (a lazy placeholder), so running this file as __main__ and importing it normally
# register the same target instead of two clashing classes.
model_registry.register("slmkit", target=HOOK_TARGET)


PTH_NAME = "slmkit-lm-eval.pth"
# site runs the .pth lines that start with "import" at every interpreter start-up: the hook module is tiny, and a
# file left behind once slmkit is uninstalled (pip does not know about it) does nothing.
_PTH_CODE = "try: from slmkit.eval.lm_eval.hook import install\nexcept ImportError: pass\nelse: install()"
PTH_TEXT = ("# Written by `python -m slmkit.eval.lm_eval.adapter --install-hook` (remove with --uninstall-hook):\n"
            "# makes the plain `lm_eval` command know `--model slmkit` (see slmkit.eval.lm_eval.hook).\n"
            f"import sys; exec({_PTH_CODE!r})\n")


def hook_path(site_dir: str | Path | None = None) -> Path:
    """Where the start-up hook goes: this interpreter's site-packages unless `site_dir` is given."""
    return Path(site_dir or sysconfig.get_paths()["purelib"]) / PTH_NAME


def install_hook(site_dir: str | Path | None = None) -> Path:
    """Write (or rewrite: idempotent) the .pth file that lets the plain `lm_eval` command know "slmkit"."""
    path = hook_path(site_dir)
    atomic_write_text(path, PTH_TEXT)
    return path


def uninstall_hook(site_dir: str | Path | None = None) -> Path:
    path = hook_path(site_dir)
    path.unlink(missing_ok=True)
    return path


def main(argv: list[str] | None = None) -> None:
    """lm-eval's command line (`lm_eval ...` arguments), with the "slmkit" model registered; or, with
    --install-hook / --uninstall-hook, add or remove the hook that makes the plain `lm_eval` command know it."""
    args = sys.argv[1:] if argv is None else list(argv)
    if {"--install-hook", "--uninstall-hook"} & set(args):
        parser = argparse.ArgumentParser(prog="python -m slmkit.eval.lm_eval.adapter")
        action = parser.add_mutually_exclusive_group(required=True)
        action.add_argument("--install-hook", action="store_true", help="make `lm_eval --model slmkit` work")
        action.add_argument("--uninstall-hook", action="store_true", help="remove that hook again")
        parser.add_argument("--site-dir", help=argparse.SUPPRESS)  # for tests: instead of site-packages
        opts = parser.parse_args(args)
        if opts.install_hook:
            print(f"slmkit: installed the lm_eval hook: {install_hook(opts.site_dir)}")
        else:
            path = hook_path(opts.site_dir)
            done = "removed the lm_eval hook:" if path.exists() else "no lm_eval hook at"
            uninstall_hook(opts.site_dir)
            print(f"slmkit: {done} {path}")
        return
    from lm_eval.__main__ import cli_evaluate
    sys.argv = [sys.argv[0], *args]
    cli_evaluate()


if __name__ == "__main__":
    main()
