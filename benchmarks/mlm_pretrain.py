"""Pretrain a tiny RoBERTa-style encoder from scratch with masked LM for a fixed wall-clock budget; report
masked-token accuracy and bits per byte against anchors measured on the same validation masks.

    nice python benchmarks/mlm_pretrain.py --data /work/bench/qs-data --minutes 10 --out /work/bench/mlm-encoder \
        --json docs/benchmark-logs/mlm_pretrain.json

--data is a token dataset (`slm data prepare`); without it the quickstart's stdlib dataset is prepared first into
--prepare-to (the same recipe as `slm quickstart`: the stdlib's .py files, no tests, 8k byte-level BPE). The run
is `slm train --objective mlm` (slmkit.recipes.pretrain) in --run; its final model directory (a transformers
RobertaForMaskedLM directory with the extended tokenizer) is copied to --out, for fine-tuning later
(`slm classify train OUT ...`) or `slm embed OUT`.

The anchors, on exactly the validation masks the model is scored on (train/mlm.py's VAL_SEED):
- untrained: the same encoder at initialisation (step 0);
- unigram: every masked token predicted from the training split's token frequencies (add-one smoothed), the best
  a model can do that ignores the context; beating it is what shows the encoder reads the words around the hole.
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import shutil
import time
from pathlib import Path

import numpy as np
import torch

from slmkit.data.tokens import TokenDataset, dataset_tokenizer
from slmkit.recipes.pretrain import pretrain
from slmkit.train import mlm


def unigram_anchor(data: TokenDataset, vocab: mlm.MLMVocab, seq_len: int) -> dict:
    counts = np.bincount(np.asarray(data.train, dtype=np.int64), minlength=vocab.vocab_size).astype(np.float64) + 1
    counts[vocab.special_ids] = 0  # a masked token is never a special
    with np.errstate(divide="ignore"):
        logp = np.log(counts / counts.sum())
    best = int(np.argmax(logp))
    nats, right, n, n_bytes, window = 0.0, 0, 0, 0.0, 0
    for x, _ in data.val_batches(64, seq_len):
        rows = mlm.full_sentence_windows(x.numpy(), vocab)
        _, labels = mlm.mask_tokens(rows, list(range(window, window + len(rows))), mlm.VAL_SEED, vocab)
        window += len(rows)
        chosen = labels[labels != -100].numpy()
        nats -= float(logp[chosen].sum())
        right += int((chosen == best).sum())
        n += len(chosen)
        n_bytes += mlm.masked_bytes(labels, vocab)
    return {"val_loss": nats / n, "val_bpb": nats / math.log(2) / n_bytes, "val_masked_acc": right / n}


def _cpu_name() -> str:
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
        return next(line.split(":", 1)[1].strip() for line in lines if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor() or platform.machine()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--data", help="token dataset (default: prepare the stdlib one into --prepare-to)")
    ap.add_argument("--prepare-to", default="runs/mlm-bench/data")
    ap.add_argument("--out", required=True, help="where the final model directory goes")
    ap.add_argument("--run", help="run directory (default: OUT-run)")
    ap.add_argument("--minutes", type=float, default=10.0)
    ap.add_argument("--preset", default="enc-tiny")
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--grad-accum", type=int, default=1)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--warmup-steps", type=int, default=50)
    ap.add_argument("--json", help="write the results here")
    args = ap.parse_args()

    data_dir = args.data
    if not data_dir:
        from slmkit.data.prepare import prepare_dataset
        from slmkit.data.stdlib import STDLIB_EXCLUDE, stdlib_dir
        data_dir = args.prepare_to
        if not (Path(data_dir) / "meta.json").exists():
            prepare_dataset([str(stdlib_dir() / "**" / "*.py")], data_dir, vocab_size=8192, val_fraction=0.02,
                            exclude=STDLIB_EXCLUDE, log=print)
    run = Path(args.run or f"{args.out.rstrip('/')}-run")
    if run.exists():
        shutil.rmtree(run)

    data = TokenDataset(data_dir)
    vocab = mlm.mlm_vocab(data, dataset_tokenizer(data_dir))
    unigram = unigram_anchor(data, vocab, args.seq_len)
    # RoBERTa's AdamW settings (beta2 0.98, weight decay 0.01); dropout off: one pass over a few million tokens
    # does not overfit, and dropout only slows a model this far from convergence
    options = dict(seq_len=args.seq_len, batch_size=args.batch_size, grad_accum=args.grad_accum, lr=args.lr,
                   warmup_steps=args.warmup_steps, beta2=0.98, weight_decay=0.01, max_minutes=args.minutes,
                   eval_every=200, eval_tokens=65536, save_every=500, log_every=20, progress=False)
    torch.manual_seed(0)
    encoder = mlm.build_encoder(args.preset, {"dropout": 0.0}, vocab, args.seq_len)
    untrained = mlm.evaluate(encoder, data, vocab, args.seq_len, args.batch_size, torch.device("cpu"), "fp32")
    t0 = time.time()
    summary = pretrain(data_dir, run, preset=args.preset, objective="mlm", model_overrides={"dropout": 0.0},
                       **options)
    wall = time.time() - t0
    if Path(args.out).exists():
        shutil.rmtree(args.out)
    shutil.copytree(run / "model", args.out)

    result = {
        "command": "benchmarks/mlm_pretrain.py " + " ".join(f"--{k.replace('_', '-')} {v}" for k, v in
                                                             vars(args).items() if v is not None),
        "cpu": _cpu_name(), "torch": torch.__version__,
        "threads": torch.get_num_threads(), "date": time.strftime("%Y-%m-%d"),
        "data": str(data_dir), "train_tokens": len(data.train), "val_tokens": len(data.val),
        "preset": args.preset, "parameters": summary["parameters"], "steps": summary["steps"],
        "tokens": summary["tokens"], "epochs": summary["tokens"] / len(data.train), "wall_s": wall,
        "tokens_per_s": summary["tokens_per_s"], "precision": summary["precision"],
        "trained": {k: summary[k] for k in ("val_loss", "val_bpb", "val_masked_acc", "val_masked_tokens")},
        "untrained": untrained, "unigram": unigram, "model_dir": str(args.out), "run": str(run),
    }
    print(json.dumps(result, indent=2))
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
