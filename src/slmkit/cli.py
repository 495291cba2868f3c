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


def _fail(e: Exception) -> None:
    typer.secho(f"error: {e}", fg=typer.colors.RED, err=True)
    raise typer.Exit(2)


@data_app.command("prepare")
def data_prepare(
    sources: Annotated[list[str], typer.Argument(help="files, folders or globs (.txt/.md/.py/..., .jsonl, .csv)")],
    out: Annotated[Path, typer.Option("-o", "--out", help="output token dataset directory")],
    tokenizer: Annotated[str | None, typer.Option(help="use this tokenizer (tokenizer.json, HF dir, GPT-2 "
                                                       "encoder.json+vocab.bpe dir) instead of training one")] = None,
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
    try:
        prepare_dataset(sources, out, tokenizer=tokenizer, vocab_size=vocab_size, jsonl_field=jsonl_field,
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
    from slmkit.config import parse_overrides
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


def _load(model_path: str):
    from slmkit.checkpoint import find_model_dir, load_model_dir
    from slmkit.tokenizer import load_tokenizer
    d = find_model_dir(model_path)
    return load_model_dir(d), load_tokenizer(d)


def _sampling(max_new_tokens, temperature, top_k, top_p, stop, seed):
    from slmkit.generate import SamplingParams
    stops = [s.encode().decode("unicode_escape") for s in (stop or [])]  # allow --stop '\n\n'
    return SamplingParams(max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p,
                          stop=stops, seed=seed)


@app.command()
def generate(
    model: Annotated[str, typer.Argument(help="run directory or model directory")],
    prompt: Annotated[str, typer.Argument(help="text to continue")],
    max_new_tokens: int = 128,
    temperature: Annotated[float, typer.Option(help="0 = greedy")] = 0.8,
    top_k: int = 0,
    top_p: float = 1.0,
    stop: Annotated[list[str] | None, typer.Option(help="stop string (repeatable; escapes like \\n work)")] = None,
    seed: int | None = None,
    cache: Annotated[bool, typer.Option("--cache/--no-cache", help="use the KV cache")] = True,
    heal: Annotated[bool, typer.Option("--heal/--no-heal", help="token healing: let the first new token "
                                       "complete the prompt's last token (helps prompts ending in a space)")] = True,
):
    """Continue a prompt, streaming the text as it is generated."""
    from slmkit.generate import generate_text
    try:
        m, tok = _load(model)
        params = _sampling(max_new_tokens, temperature, top_k, top_p, stop, seed)
    except (ValueError, FileNotFoundError) as e:
        _fail(e)
    sys.stdout.write(prompt)
    for piece in generate_text(m, tok, prompt, params, use_cache=cache, heal=heal):
        sys.stdout.write(piece)
        sys.stdout.flush()
    sys.stdout.write("\n")


@app.command()
def chat(
    model: Annotated[str, typer.Argument(help="run directory or model directory")],
    system: Annotated[str | None, typer.Option(help="system prompt")] = None,
    max_new_tokens: int = 256,
    temperature: float = 0.7,
    top_k: int = 0,
    top_p: float = 0.9,
    seed: int | None = None,
):
    """Interactive chat with history, using the model's chat template. /reset clears, /exit quits."""
    from slmkit.generate import generate_text
    try:
        m, tok = _load(model)
    except (ValueError, FileNotFoundError) as e:
        _fail(e)
    end = [t for t in ("<|im_end|>", tok.eos_token) if t]
    params = _sampling(max_new_tokens, temperature, top_k, top_p, end, seed)
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
        prompt = tok.apply_chat_template(history, add_generation_prompt=True)
        sys.stdout.write("model> ")
        reply = []
        try:
            for piece in generate_text(m, tok, prompt, params, add_bos=False):
                reply.append(piece)
                sys.stdout.write(piece)
                sys.stdout.flush()
        except KeyboardInterrupt:
            pass
        sys.stdout.write("\n")
        history.append({"role": "assistant", "content": "".join(reply)})


@app.command()
def presets():
    """List the named model shapes with their size and training cost."""
    from slmkit.config import PRESETS, model_config
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
    preset: str = "micro",
    vocab_size: int = 8192,
    compile: Annotated[bool | None, typer.Option("--compile/--no-compile", help="default: measured choice")] = None,
    precision: str = "auto",
):
    """Train a small code model on this Python's own standard library and write report.md."""
    from slmkit.quickstart import run_quickstart
    try:
        run_quickstart(out, minutes=minutes, preset=preset, vocab_size=vocab_size, compile=compile,
                       precision=precision)
    except (ValueError, FileNotFoundError, FileExistsError) as e:
        _fail(e)


def main():  # pragma: no cover
    app()


if __name__ == "__main__":  # pragma: no cover
    main()
