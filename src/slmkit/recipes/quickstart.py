"""`slm quickstart`: a code model trained on this Python's own standard library, start to finish.

    OUT/data/        token dataset (stdlib .py files, deduplicated, 8k byte-level BPE)
    OUT/run/         training run (checkpoint/, model/, metrics.jsonl, loss.png)
    OUT/report.md    what happened and how good it is, next to gzip -9 and xz -9e on the same text

Re-running continues where an interrupted run stopped: a finished dataset is reused and training resumes.
The default model and hyperparameters were chosen for a ~10 minute budget on 2 CPU cores (see
docs/quickstart-tuning.md): on a small budget many small steps beat big batches (batches are only 4 × 256 tokens),
and a small model that sees more tokens beats a bigger one that sees fewer.
"""

from __future__ import annotations

import json
import statistics
from pathlib import Path

from slmkit.data.stdlib import STDLIB_EXCLUDE, stdlib_dir, unseen_code_sample
from slmkit.data.tokens import TokenDataset
from slmkit.eval.perplexity import compressor_bits_per_byte, token_bits_per_byte
from slmkit.files import atomic_write_json, atomic_write_text
from slmkit.formats.hf_dir import load_model_dir
from slmkit.lm import load_lm
from slmkit.sampling import SamplingParams
from slmkit.train.loop import SCHEDULES, TrainConfig, train
from slmkit.train.metrics import read_metrics
from slmkit.train.optim import OPTIMIZERS

# What a 10-minute CPU budget wants (measured; see docs/quickstart-tuning.md). The model: `nano` (4 layers)
# narrowed to dim 96, with the data's 8k vocabulary: 1.2M parameters. On 2 AVX2 cores `micro` (6.5M) sees 1.0M
# tokens in 10 minutes and this one 2.6M, and ends 0.11 bits/byte lower.
QUICKSTART_PRESET = "nano"


QUICKSTART_MODEL = {"dim": 96, "hidden_dim": 256}


# The report's third completion: greedy with llama.cpp's repeat penalty (see run_quickstart).
GREEDY_REPEAT_PENALTY = 1.3
# Muon for the hidden matrices with warmup-stable-decay: at equal wall time (10 minutes, 2-core AVX-512) 0.12
# bits/byte below AdamW with cosine on the validation split, and below xz -9e on pip's sources (BENCHMARKS.md).
QUICKSTART_TRAIN = dict(seq_len=256, batch_size=4, lr=3e-3, min_lr_ratio=0.05, warmup_steps=100,
                        weight_decay=0.1, optimizer="muon", schedule="wsd", eval_every=500, eval_tokens=32768,
                        save_every=250)


def run_quickstart(out: str | Path = "runs/quickstart", minutes: float = 10.0, preset: str | None = None,
                   model_overrides: dict | None = None, vocab_size: int = 8192, compile: bool | None = None,
                   precision: str = "auto", log=print, **train_overrides) -> dict:
    """preset=None trains the measured quickstart shape (QUICKSTART_PRESET + QUICKSTART_MODEL); a named preset
    trains that preset as it is, plus `model_overrides`."""
    out = Path(out)
    model_overrides = model_overrides or {}
    if preset is None:
        preset, model_overrides = QUICKSTART_PRESET, {**QUICKSTART_MODEL, **model_overrides}
    data_dir, run_dir = out / "data", out / "run"
    from slmkit.model.config import model_config
    model_config(preset, **model_overrides)  # a bad preset or shape fails now, not after preparing the data
    if not minutes > 0:
        raise ValueError(f"--minutes {minutes:g}: the training budget must be positive")
    for name, value, allowed in (("optimizer", train_overrides.get("optimizer"), OPTIMIZERS),
                                 ("schedule", train_overrides.get("schedule"), SCHEDULES)):
        if value is not None and value not in allowed:  # fail now, not after preparing the data
            raise ValueError(f"--{name} {value}: choose one of {', '.join(allowed)}")

    if (data_dir / "meta.json").exists():
        log(f"[1/4] reusing the token dataset in {data_dir}")
    else:
        from slmkit.data.prepare import prepare_dataset
        log(f"[1/4] preparing {stdlib_dir()}/**/*.py (no tests, no site-packages) -> {data_dir}")
        prepare_dataset([str(stdlib_dir() / "**" / "*.py")], data_dir, vocab_size=vocab_size, val_fraction=0.02,
                        exclude=STDLIB_EXCLUDE, log=log)
    meta = json.loads((data_dir / "meta.json").read_text())

    if (run_dir / "model" / "config.json").exists():
        log(f"[2/4] reusing the trained model in {run_dir / 'model'}")
        summary = json.loads((run_dir / "model" / "slmkit.json").read_text()).get("metrics", {})
    else:
        resume = (run_dir / "checkpoint" / "trainer_state.json").exists()
        if compile is None:
            compile = _compile_helps()
        cfg = TrainConfig(data=str(data_dir), out=str(run_dir), preset=preset, model_overrides=model_overrides,
                          max_minutes=minutes, precision=precision, compile=compile,
                          **{**QUICKSTART_TRAIN, **train_overrides})
        log(f"[2/4] training `{preset}`{_shape_note(model_overrides)} for {minutes:g} minutes"
            f"{' (resuming)' if resume else ''}")
        summary = train(cfg, resume=resume, log=log)
        if summary.get("interrupted"):
            log("interrupted: run `slm quickstart` again to continue")
            return summary

    log("[3/4] evaluating against gzip -9 and xz -9e")
    model = load_model_dir(run_dir / "model")
    from slmkit.tokenizer import load_tokenizer
    tok = load_tokenizer(run_dir / "model")
    results = compare_with_compressors(model, tok, data_dir, summary.get("val_bpb"))

    log("[4/4] sampling a completion of `def `")
    # As `slm generate` samples: the model's own defaults (its generation_config.json), token healing, and the
    # end of the file (a bos: training documents are separated by it) ends the completion.
    lm = load_lm(str(run_dir / "model"))
    params = lm.sampling_params(max_new_tokens=160, seed=0)
    sample = lm.generate("def ", params, heal=True)[0]
    greedy = lm.generate("def ", SamplingParams(max_new_tokens=96, temperature=0.0), heal=True)[0]
    # A model this small loops when decoded greedily ("the list of the list of..."); llama.cpp's repeat penalty
    # at 1.3 over the last 64 tokens keeps greedy decoding deterministic and breaks the loop.
    penalized = lm.generate("def ", SamplingParams(max_new_tokens=96, temperature=0.0,
                                                   repetition_penalty=GREEDY_REPEAT_PENALTY), heal=True)[0]
    how = describe_sampling(params)
    rule = "-" * 60
    print(f"\n{rule}\nsampled ({how}):\ndef {sample}\n{rule}\ngreedy:\ndef {greedy}\n{rule}\n"
          f"greedy, repeat penalty {GREEDY_REPEAT_PENALTY}:\ndef {penalized}\n{rule}")
    report = render_report(out, meta, summary, results, sample, greedy, model.cfg, minutes, how, penalized)
    atomic_write_text(out / "report.md", report)
    atomic_write_json(out / "results.json", {**results, "train": summary, "sample": sample, "greedy": greedy,
                                             "greedy_repeat_penalty": penalized})
    v, u = results["val"], results["unseen"]
    log(f"validation: {v['model']:.3f} bits/byte (xz -9e {v['xz -9e']:.3f}, per file {v['xz -9e (per file)']:.3f}); "
        f"unseen test code: {u['model']:.3f} (xz -9e {u['xz -9e']:.3f}, per file {u['xz -9e (per file)']:.3f}) "
        f"-> {out / 'report.md'}")
    return {**summary, "results": results, "sample": sample}


def compare_with_compressors(model, tok, data_dir: Path, val_bpb_non_overlapping: float | None = None) -> dict:
    """Bits per byte of `model` on the dataset's validation files and on unseen stdlib test files, in sliding
    windows of its context (each window scores its second half), next to gzip -9 and xz -9e on the same bytes."""
    seq_len = model.cfg.max_seq_len  # the training context: the model never saw positions beyond it
    dataset = TokenDataset(data_dir)
    val_docs = dataset.val_documents()
    val_bytes = dataset.meta["splits"]["val"]["bytes"]
    unseen_texts = [p.read_text(encoding="utf-8", errors="replace") for p in unseen_code_sample()]
    unseen_docs = [tok.encode(t, add_bos=tok.add_bos) for t in unseen_texts]
    unseen_bytes = sum(len(t.encode("utf-8")) for t in unseen_texts)

    def score(docs, n_bytes):
        return token_bits_per_byte(model, docs, n_bytes, seq_len=seq_len, stride=seq_len // 2,
                                   batch_size=16)["bits_per_byte"]

    return {
        "val": {"model": score(val_docs, val_bytes),
                "model, non-overlapping": val_bpb_non_overlapping,  # the training loop's own figure
                # the held-out files again, as text: byte-level BPE decodes exactly
                **compressor_bits_per_byte([tok.decode(d).encode("utf-8") for d in val_docs]),
                "bytes": val_bytes, "files": len(val_docs)},
        "unseen": {"model": score(unseen_docs, unseen_bytes),
                   **compressor_bits_per_byte([t.encode("utf-8") for t in unseen_texts]), "bytes": unseen_bytes,
                   "files": len(unseen_texts)},
        "context": seq_len,
    }


def _compile_helps() -> bool:
    """On GPUs compile wins. On the 2-core AVX2 CPUs measured in BENCHMARKS.md it does not for models this small
    (`micro`: 0.95x eager fp32, plus ~50 s of compilation out of a 10-minute budget), so CPU runs stay eager."""
    import torch
    return torch.cuda.is_available()


def _shape_note(model_overrides: dict) -> str:
    return "".join(f", {k}={v}" for k, v in model_overrides.items())


def describe_sampling(p: SamplingParams) -> str:
    """"temperature 0.8, top-k 40, top-p 0.95, min-p 0.05, seed 0": the settings that are on."""
    parts = [f"temperature {p.temperature:g}"]
    parts += [f"top-k {p.top_k}"] if p.top_k else []
    parts += [f"top-p {p.top_p:g}"] if p.top_p < 1 else []
    parts += [f"min-p {p.min_p:g}"] if p.min_p else []
    parts += [f"repetition penalty {p.repetition_penalty:g}"] if p.repetition_penalty != 1 else []
    return ", ".join(parts + ([f"seed {p.seed}"] if p.seed is not None else []))


def render_report(out: Path, meta: dict, summary: dict, results: dict, sample: str, greedy: str, mcfg,
                  minutes: float, sampling: str = "the model's default sampling", penalized: str = "") -> str:
    cl = meta.get("cleaning", {})
    tr, va = meta["splits"]["train"], meta["splits"]["val"]
    metrics = read_metrics(out / "run" / "metrics.jsonl")
    tok_s = [r["tok_s"] for r in metrics if "tok_s" in r][1:]  # the first window includes compilation
    mfu = [r["mfu"] for r in metrics if "mfu" in r][1:]
    med = statistics.median
    tok_s, mfu = tok_s or [float("nan")], mfu or [float("nan")]
    v, u, ctx = results["val"], results["unseen"], results["context"]
    shape = _shape_note(summary.get("model_overrides") or {})

    def row(name, d):
        per_file = f"{d['xz -9e (per file)']:.3f}" if "xz -9e (per file)" in d else "(one file)"
        plain = d.get("model, non-overlapping")
        return (f"| {name} | **{d['model']:.3f}** | {'n/a' if plain is None else f'{plain:.3f}'} | "
                f"{d['gzip -9']:.3f} | {d['xz -9e']:.3f} | {per_file} | {d['bytes']:,} |")

    return f"""# slmkit quickstart report

A Llama-style model (`{summary.get('preset', '?')}` preset{shape}) trained for {minutes:g} minutes on
this Python's standard library source (`{stdlib_dir()}`, `.py` files, no test folders, no site-packages).

## Data
| | |
|---|---|
| source files read | {len(meta.get('sources', [])):,} |
| documents in | {cl.get('documents_in', 'n/a'):,} |
| exact duplicates removed | {cl.get('exact_duplicates', 'n/a')} |
| near-duplicates removed (MinHash) | {cl.get('near_duplicates', 'n/a')} |
| empty documents | {cl.get('empty', 'n/a')} |
| train documents / tokens / bytes | {tr['documents']:,} / {tr['tokens']:,} / {tr['bytes']:,} |
| validation documents / tokens / bytes | {va['documents']:,} / {va['tokens']:,} / {va['bytes']:,} |
| tokenizer | byte-level BPE, {meta['vocab_size']:,} tokens, {tr['bytes'] / max(1, tr['tokens']):.2f} bytes/token |

## Model and training
| | |
|---|---|
| parameters | {mcfg.num_params():,} (dim {mcfg.dim}, {mcfg.n_layers} layers, {mcfg.n_heads}/{mcfg.n_kv_heads} heads) |
| training FLOPs/token | {mcfg.flops_per_token(ctx) / 1e6:.1f} M |
| optimizer, schedule | {summary.get('optimizer', 'adamw')}, {summary.get('schedule', 'cosine')} |
| steps / tokens seen | {summary.get('steps', 'n/a'):,} / {summary.get('tokens', 0):,} |
| wall time | {summary.get('elapsed_s', 0) / 60:.1f} min ({summary.get('precision', '?')}) |
| throughput (median) | {med(tok_s):,.0f} tokens/s, MFU {med(mfu):.1%} of this machine's measured matmul peak |
| epochs over train | {summary.get('tokens', 0) / max(1, tr['tokens']):.2f} |

![loss curve](run/loss.png)

## Quality: bits per byte (lower is better)
| text | slmkit model | model, non-overlapping windows | gzip -9 | xz -9e | xz -9e, each file alone | bytes |
|---|---|---|---|---|---|---|
{row(f"validation split ({v['files']} held-out stdlib files)", v)}
{row(f"unseen code: {u['files']} files of the stdlib test suite", u)}

The model scores every file on its own, in sliding windows of {ctx} tokens (its training context) that
score their last {ctx // 2} tokens, so each token is predicted from at least {ctx // 2} tokens of its file
(llama.cpp's perplexity tool scores the same way); "non-overlapping" is the training loop's validation figure:
consecutive {ctx}-token windows over the split, whose first tokens see almost no context.
`xz -9e` on the concatenation can also copy text across files, so "each file alone" is the like-for-like
compressor.

## Sample: `def ` (the model's default sampling, as `slm generate` uses it: {sampling}, token healing)
```python
def {sample}
```

Greedy (temperature 0), for comparison:
```python
def {greedy}
```

Greedy with a repeat penalty of {GREEDY_REPEAT_PENALTY} over the last 64 tokens (`slm generate --temperature 0
--repetition-penalty {GREEDY_REPEAT_PENALTY}`; still deterministic):
```python
def {penalized}
```

## Next
```bash
slm generate {out}/run "import os"
slm chat {out}/run
slm quickstart --out {out}-30min --minutes 30   # the same recipe, three times the budget
python -c "import transformers as t; m = t.AutoModelForCausalLM.from_pretrained('{out}/run/model')"
```
"""

