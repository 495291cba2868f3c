"""Seconds per training step: from scratch vs distilling from a top-k cache vs distilling from an online teacher.

    python benchmarks/distill_step_speed.py --out runs/kd --rounds 3 --steps 5

Uses the data and teacher cache that benchmarks/distill_kd_vs_scratch.py wrote into --out, and the same student
(about 17M parameters, batch 8 x 256 tokens, fp32). Each round times --steps optimizer steps of every mode, one
mode after the other (interleaved, so machine noise hits all modes alike); the table gives the median seconds per
step and the ratio to plain training. Modes:
- scratch: the plain cross-entropy step of `slm train`;
- cache:   `slm distill --cache` (alpha 0.5, fkl over the teacher's top-16 + the rest), reading the cache;
- online:  `slm distill --teacher smollm2-135m-instruct` (full distribution), the teacher run on every batch.
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import torch

from slmkit.data.tokens import TokenDataset
from slmkit.distill.kd import DistillConfig, Distiller
from slmkit.model.config import model_config
from slmkit.model.llama import Transformer
from slmkit.train.loop import TrainConfig, make_optimizer

STUDENT = dict(dim=256, n_layers=6, n_heads=4, n_kv_heads=2, hidden_dim=768, tie_embeddings=True)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default="runs/kd")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--modes", nargs="+", default=["scratch", "cache", "online"])
    args = ap.parse_args()
    out = Path(args.out)
    cache = next(out.glob("cache-top*"))
    data = TokenDataset(out / "data")
    cfg = TrainConfig(data=str(out / "data"), out="/dev/null", max_steps=1, seq_len=256, batch_size=8)
    torch.manual_seed(0)
    model = Transformer(model_config("micro", vocab_size=data.vocab_size, max_seq_len=256, **STUDENT))
    opt = make_optimizer(model, cfg)
    from slmkit.tokenizer import load_tokenizer
    tokenizer = load_tokenizer(out / "data" / "tokenizer")
    distillers = {"cache": Distiller(DistillConfig(cache=str(cache)), data, tokenizer, 256, torch.device("cpu")),
                  "online": Distiller(DistillConfig(teacher="smollm2-135m-instruct"), data, tokenizer, 256,
                                      torch.device("cpu"))} if set(args.modes) - {"scratch"} else {}
    times: dict[str, list[float]] = {m: [] for m in args.modes}
    sample = 0
    for _round in range(args.rounds + 1):  # the first round warms up and is not counted
        for mode in args.modes:
            t0 = time.perf_counter()
            for _ in range(args.steps):
                x, y = data.train_batch(sample, 8, 256)
                if mode == "scratch":
                    loss = model(x, y)
                else:
                    loss, _ = distillers[mode].loss(model, model, x, y, data.train_windows(sample, 8, 256), sample)
                loss.backward()
                opt.step()
                opt.zero_grad(set_to_none=True)
                sample += 8
            times[mode].append((time.perf_counter() - t0) / args.steps)
    base = statistics.median(times["scratch"][1:]) if "scratch" in times else None
    print(f"{'mode':8} {'s/step (median)':>16} {'vs scratch':>11}  rounds")
    for mode, ts in times.items():
        med = statistics.median(ts[1:])
        print(f"{mode:8} {med:16.2f} {med / base if base else float('nan'):10.2f}x  "
              + " ".join(f"{t:.2f}" for t in ts[1:]))


if __name__ == "__main__":
    main()
