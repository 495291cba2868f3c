"""The risk-coverage plot of a cascade: error among the items the small model answers, against the share it
answers, one curve per cascade (`lm.calibration.risk_coverage` gives the points); the chosen operating point
and the target error are marked. `slm eval`'s report and benchmarks/cascade.py draw it the same way."""

from __future__ import annotations

from pathlib import Path

from slmkit.files import atomic_path


def plot_risk_coverage(curves: dict[str, list[dict]], path: str | Path, target_error: float | None = None,
                       points: dict[str, tuple[float, float]] | None = None, title: str = "") -> Path:
    """Write a PNG: each curve's (coverage, risk) rows as a line; `points` {name: (coverage, risk)} as markers
    (e.g. the chosen threshold on held-out data); `target_error` as a dashed line."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(5.2, 3.8))
    for name, rows in curves.items():
        rows = sorted(rows, key=lambda r: r["coverage"])
        ax.plot([r["coverage"] for r in rows], [r["risk"] for r in rows], label=name, linewidth=1.4)
    for name, (coverage, risk) in (points or {}).items():
        ax.plot([coverage], [risk], "o", markersize=6, label=name)
    if target_error is not None:
        ax.axhline(target_error, linestyle="--", color="grey", linewidth=1, label=f"target error {target_error:g}")
    ax.set_xlabel("coverage (share answered by the small model)")
    ax.set_ylabel("risk (error among the answered)")
    ax.set_xlim(0, 1.02)
    ax.set_ylim(bottom=0)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    if title:
        ax.set_title(title, fontsize=9)
    fig.tight_layout()
    path = Path(path)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110)
    plt.close(fig)
    return path
