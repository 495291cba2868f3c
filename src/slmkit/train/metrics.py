"""What a run reports: RUN/metrics.jsonl (one JSON object per logged step or validation), RUN/loss.png, and the
progress line (step, loss, tokens/s, MFU, ETA)."""

from __future__ import annotations

import json
import math
import os
import time
from pathlib import Path

from tqdm import tqdm

from slmkit.files import atomic_write_text, iter_jsonl


def append_metrics(path: Path, rec: dict) -> None:
    with open(path, "a", encoding="utf-8") as f:
        f.write(json.dumps(rec) + "\n")


def read_metrics(path: str | Path) -> list[dict]:
    """The records of a run's metrics.jsonl ([] before the first); a line torn by a kill is skipped."""
    path = Path(path)
    if not path.exists():
        return []
    return [record for _, record in iter_jsonl(path, on_error=lambda e: None)]


def truncate_metrics(path: Path, step: int) -> None:
    """On resume, drop records written after the checkpoint we continue from (they will be redone)."""
    if not path.exists():
        return
    # a record without an integer step (a torn line that still parsed, a hand edit) is dropped, not a KeyError
    keep = [r for r in read_metrics(path) if isinstance(r.get("step"), int) and r["step"] <= step
            and not r.get("final")]
    atomic_write_text(path, "".join(json.dumps(r) + "\n" for r in keep))


def plot_losses(run: Path) -> None:
    """RUN/loss.png: train and validation loss against tokens, from RUN/metrics.jsonl."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    recs = read_metrics(run / "metrics.jsonl")
    train = [(r["tokens"], r["loss"]) for r in recs if "loss" in r]
    val = [(r["tokens"], r["val_loss"]) for r in recs if "val_loss" in r]
    if not train:
        return
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot(*zip(*train, strict=True), label="train loss", lw=1)
    if val:
        ax.plot(*zip(*val, strict=True), "o-", label="val loss")
    ax.set_xlabel("tokens")
    ax.set_ylabel("cross-entropy (nats/token)")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    tmp = run / ".loss.png.tmp.png"
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    os.replace(tmp, run / "loss.png")


def fmt_time(seconds: float) -> str:
    if not math.isfinite(seconds):
        return "?"
    m, s = divmod(int(seconds), 60)
    h, m = divmod(m, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m}:{s:02d}"


class Progress:
    """The progress bar and its line. Throughput is measured over the window since the last line, so it shows the
    speed now rather than an average that includes compilation and the first steps."""

    def __init__(self, enabled: bool, flops_per_token: float, peak_flops: float):
        self.bar = tqdm(total=1000, disable=not enabled, dynamic_ncols=True, bar_format="{l_bar}{bar}| {postfix}")
        self.flops_per_token, self.peak_flops = flops_per_token, peak_flops
        self.window_start, self.window_tokens = time.perf_counter(), 0

    def count(self, tokens: int) -> None:
        self.window_tokens += tokens

    def throughput(self) -> tuple[float, float]:
        """(tokens/s, model FLOPs utilisation) over the window, which starts anew."""
        now = time.perf_counter()
        tok_s = self.window_tokens / max(now - self.window_start, 1e-9)
        self.window_start, self.window_tokens = now, 0
        return tok_s, self.flops_per_token * tok_s / self.peak_flops if self.peak_flops else 0.0

    def show(self, rec: dict, progress: float, elapsed: float) -> None:
        """Update the line from a step's metrics record; `progress` is the fraction of the budget spent."""
        eta = max(0.0, elapsed / progress - elapsed) if progress > 0 else float("nan")
        self.bar.n = min(1000, int(progress * 1000))
        acc = f" acc {rec['masked_acc']:.1%}" if "masked_acc" in rec else ""  # masked LM: masked-token accuracy
        self.bar.set_postfix_str(f"step {rec['step']} loss {rec['loss']:.3f}{acc} {rec['tok_s']:,.0f} tok/s "
                                 f"MFU {rec['mfu']:.0%} ETA {fmt_time(eta)}", refresh=True)

    def write(self, message: str) -> None:
        self.bar.write(message)

    def close(self) -> None:
        self.bar.close()
