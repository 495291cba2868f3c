"""The report card: several models side by side on quality (with 95% intervals) and cost.

    OUT/results.json          everything: settings, metrics with intervals, details, efficiency
    OUT/report.md             the tables
    OUT/report.html           the same, self-contained (plots embedded), to send to someone
    OUT/quality_vs_speed.png  headline metric of each task against decode tokens/s
    OUT/quality_vs_params.png ... against parameter count
    OUT/records/<model>/<task>.jsonl   every item's prompt outcome (what `--resume` continues from)
"""

from __future__ import annotations

import base64
import html
import json
import re
import shlex
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from slmkit.eval.harness import evaluate
from slmkit.eval.tasks import LOWER_IS_BETTER, load_task
from slmkit.files import atomic_path, atomic_write_json, atomic_write_text


@dataclass
class TaskSpec:
    """One entry of --tasks: a task name or file with per-task options ("gsm8k:limit=50:num_fewshot=5")."""

    name: str
    options: dict = field(default_factory=dict)
    label: str = ""  # how the report names it: the text as given, so "mmlu" and "mmlu:limit=500" can both run

    def __post_init__(self):
        self.label = self.label or self.name

    @classmethod
    def parse(cls, text: str) -> TaskSpec:
        name, *opts = text.split(":")
        options = {}
        for opt in opts:
            if "=" not in opt:
                raise ValueError(f"task option {opt!r} in {text!r} must be key=value (e.g. gsm8k:limit=50)")
            key, value = opt.split("=", 1)
            if key not in RUN_OPTIONS | TASK_OPTIONS:
                raise ValueError(f"unknown task option {key!r} in {text!r}; known: "
                                 f"{', '.join(sorted(RUN_OPTIONS | TASK_OPTIONS))}")
            options[key] = _value(value)
        return cls(name, options, label=text)


RUN_OPTIONS = {"limit", "seed", "chat", "samples", "temperature", "select_by"}
TASK_OPTIONS = {"num_fewshot", "max_new_tokens", "stride"}


def _value(text: str):
    lowered = text.lower()
    if lowered in ("true", "false"):
        return lowered == "true"
    for cast in (int, float):
        try:
            return cast(text)
        except ValueError:
            pass
    return text


def report_card(models: list[str], tasks: list[str | TaskSpec], out: str | Path, *, backend: str = "auto",
                limit: int | None = None, seed: int = 0, num_fewshot: int | None = None, chat: bool | None = None,
                resume: bool = False, efficiency: bool = True, verifier: str | None = None,
                command: str | None = None, allow_unsandboxed: bool = False, log=print) -> dict:
    """Evaluate every model on every task, measure efficiency, write the report files; returns results.json.

    Code tasks refuse to run without the sandbox's network namespace unless `allow_unsandboxed`."""
    from slmkit.lm import load_lm
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    specs = [t if isinstance(t, TaskSpec) else TaskSpec.parse(t) for t in tasks]
    loaded = {}
    for spec in specs:  # load (and pull) every task first: a typo should fail before hours of evaluation
        overrides = {k: v for k, v in spec.options.items() if k in TASK_OPTIONS}
        if num_fewshot is not None:
            overrides.setdefault("num_fewshot", num_fewshot)
        loaded[spec.label] = load_task(spec.name, **overrides)
    if any(task.kind in ("code", "repair") for task in loaded.values()):  # before any model loads
        from slmkit.eval.sandbox import require_isolation
        require_isolation(allow_unsandboxed)
    verifier_lm = load_lm(verifier, backend=backend) if verifier else None
    results = {"command": command or shlex.join(["slm", *sys.argv[1:]]),
               "created": time.strftime("%Y-%m-%d %H:%M:%S %Z"), "models": []}
    for model in models:
        log(f"== {model}")
        entry = {"model": model, "name": _short_name(model), "tasks": {}}
        lm = load_lm(model, backend=backend)
        entry["backend"] = type(lm).__name__
        for spec in specs:
            task = loaded[spec.label]
            run = {k: v for k, v in spec.options.items() if k in RUN_OPTIONS}
            run.setdefault("limit", limit)
            run.setdefault("seed", seed)
            if chat is not None:
                run.setdefault("chat", chat)
            records = out / "records" / _slug(model) / f"{_slug(spec.label)}.jsonl"
            records.parent.mkdir(parents=True, exist_ok=True)
            if not resume and records.exists():
                records.unlink()
            result = evaluate(lm, task, records_file=records, verifier=verifier_lm,
                              allow_unsandboxed=allow_unsandboxed, **run)
            headline = result.metrics.get(task.main_metric) or next(iter(result.metrics.values()))
            log(f"   {spec.label}: {task.main_metric} {headline}  ({result.seconds:.0f} s)")
            entry["tasks"][spec.label] = {**result.to_dict(), "main_metric": task.main_metric,
                                         "description": task.description}
        lm.close()
        if efficiency:
            from slmkit.eval.efficiency import measure_in_subprocess
            log("   measuring efficiency (in a fresh process)")
            entry["efficiency"] = measure_in_subprocess(model, backend=backend)
        results["models"].append(entry)
    write_report(results, out)
    log(f"report: {out / 'report.md'} and {out / 'report.html'}")
    return results


# --- writing --------------------------------------------------------------------------------------------------

def write_report(results: dict, out: Path) -> None:
    atomic_write_json(out / "results.json", results)
    plots = _plots(results, out)
    atomic_write_text(out / "report.md", render_markdown(results, [p.name for p in plots]))
    atomic_write_text(out / "report.html", render_html(results, plots))


def _quality_rows(results: dict) -> list[tuple[str, str, list[str]]]:
    """(task, metric, one cell per model) for every metric any model has."""
    rows = []
    task_names = list(dict.fromkeys(t for m in results["models"] for t in m["tasks"]))
    for task in task_names:
        metric_names = list(dict.fromkeys(k for m in results["models"] for k in m["tasks"].get(task, {})
                                          .get("metrics", {})))
        for metric in metric_names:
            cells = []
            for m in results["models"]:
                value = m["tasks"].get(task, {}).get("metrics", {}).get(metric)
                cells.append(_cell(metric, value))
            rows.append((task, metric, cells))
    return rows


def _cell(metric: str, m: dict | None) -> str:
    if not m or m.get("value") is None:
        return "–"
    percent = metric not in LOWER_IS_BETTER and 0 <= m["value"] <= 1
    fmt = (lambda v: f"{100 * v:.1f}") if percent else (lambda v: f"{v:.3f}")
    text = fmt(m["value"]) + ("%" if percent else "")
    if m.get("low") is not None:
        text += f" [{fmt(m['low'])}, {fmt(m['high'])}]"
    return text + f" (n={m['n']})"


EFFICIENCY_ROWS = [("parameters", "parameters", lambda v: f"{v / 1e6:.1f} M"),
                   ("weights on disk", "disk_bytes", lambda v: f"{v / 2**20:.1f} MiB"),
                   ("peak RSS", "peak_rss_bytes", lambda v: f"{v / 2**20:.0f} MiB"),
                   ("prefill tokens/s", "prefill_tokens_per_s", lambda v: f"{v:.0f}"),
                   ("decode tokens/s", "decode_tokens_per_s", lambda v: f"{v:.1f}"),
                   ("time to first token", "first_token_s", lambda v: f"{1000 * v:.0f} ms"),
                   ("latency p50 (request mix)", "latency_p50_s", lambda v: f"{v:.2f} s"),
                   ("latency p95 (request mix)", "latency_p95_s", lambda v: f"{v:.2f} s"),
                   ("backend", "backend", str)]


def _efficiency_rows(results: dict) -> list[tuple[str, list[str]]]:
    rows = []
    for label, key, fmt in EFFICIENCY_ROWS:
        cells = []
        for m in results["models"]:
            eff = m.get("efficiency") or {}
            value = eff.get(key)
            cells.append(fmt(value) if value is not None else ("error (results.json)" if "error" in eff else "–"))
        rows.append((label, cells))
    return rows


def render_markdown(results: dict, plots: list[str]) -> str:
    names = [m["name"] for m in results["models"]]
    lines = ["# Report card", "", f"Made with: `{results['command']}` ({results['created']})", "",
             "Quality: value [95% confidence interval] (n = items). Accuracies are percentages; "
             "bits per byte and token loss: lower is better.", "",
             "| task | metric | " + " | ".join(names) + " |", "|---|---|" + "---|" * len(names)]
    for task, metric, cells in _quality_rows(results):
        lines.append(f"| {task} | {metric} | " + " | ".join(cells) + " |")
    if any(m.get("efficiency") for m in results["models"]):
        lines += ["", "## Efficiency", "", "| | " + " | ".join(names) + " |", "|---|" + "---|" * len(names)]
        for label, cells in _efficiency_rows(results):
            lines.append(f"| {label} | " + " | ".join(cells) + " |")
    lines += ["", "## Models", ""] + [f"- **{m['name']}**: `{m['model']}` ({m.get('backend', '?')})"
                                      for m in results["models"]]
    lines += ["", "## Tasks", ""]
    seen = set()
    for m in results["models"]:
        for task, r in m["tasks"].items():
            if task not in seen:
                seen.add(task)
                s = r["settings"]
                chat = [x["name"] for x in results["models"] if x["tasks"].get(task, {}).get("settings", {})
                        .get("chat")]
                prompting = ("raw prompt" if not chat else "chat template" if len(chat) == len(results["models"])
                             else f"chat template for {', '.join(chat)}, raw prompt otherwise")
                lines.append(f"- **{task}** ({r['kind']}, headline: {r['main_metric']}): {r['description']} "
                             f"— {s['n_items']} items, {s['num_fewshot']}-shot, {prompting}, seed {s['seed']}"
                             + (f", {s['samples']} samples at T={s['temperature']}" if s["samples"] > 1 else ""))
    lines += [""] + [f"![{p}]({p})" for p in plots]
    return "\n".join(lines) + "\n"


def render_html(results: dict, plots: list[Path]) -> str:
    md = render_markdown(results, [])
    body = []
    table: list[str] = []
    for line in md.splitlines() + [""]:
        if line.startswith("|"):
            table.append(line)
            continue
        if table:
            body.append(_html_table(table))
            table = []
        if line.startswith("# "):
            body.append(f"<h1>{html.escape(line[2:])}</h1>")
        elif line.startswith("## "):
            body.append(f"<h2>{html.escape(line[3:])}</h2>")
        elif line.startswith("- "):
            body.append(f"<li>{_inline(line[2:])}</li>")
        elif line:
            body.append(f"<p>{_inline(line)}</p>")
    for p in plots:
        data = base64.b64encode(p.read_bytes()).decode()
        body.append(f'<figure><img alt="{p.stem}" src="data:image/png;base64,{data}"></figure>')
    style = ("body{font-family:system-ui,sans-serif;max-width:1100px;margin:2em auto;padding:0 1em}"
             "table{border-collapse:collapse;margin:1em 0}td,th{border:1px solid #ccc;padding:4px 8px;"
             "text-align:left}th{background:#f3f3f3}code{background:#f3f3f3;padding:1px 3px}img{max-width:100%}")
    return ("<!doctype html><html><head><meta charset='utf-8'><title>slmkit report card</title>"
            f"<style>{style}</style></head><body>\n" + "\n".join(body) + "\n</body></html>\n")


def _html_table(lines: list[str]) -> str:
    rows = [[c.strip() for c in line.strip("|").split("|")] for line in lines if not set(line) <= set("|-")]
    head, *rest = rows
    out = ["<table><tr>" + "".join(f"<th>{_inline(c)}</th>" for c in head) + "</tr>"]
    out += ["<tr>" + "".join(f"<td>{_inline(c)}</td>" for c in r) + "</tr>" for r in rest]
    return "\n".join(out) + "</table>"


def _inline(text: str) -> str:
    text = html.escape(text)
    text = re.sub(r"`([^`]+)`", r"<code>\1</code>", text)
    return re.sub(r"\*\*([^*]+)\*\*", r"<b>\1</b>", text)


def _plots(results: dict, out: Path) -> list[Path]:
    """Headline metric of each task against decode speed and against parameters (models as labelled points)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    models = [m for m in results["models"] if m.get("efficiency") and "error" not in m["efficiency"]]
    tasks = list(dict.fromkeys(t for m in models for t in m["tasks"]))
    written = []
    for filename, key, xlabel in [("quality_vs_speed.png", "decode_tokens_per_s", "decode tokens/s (batch 1)"),
                                  ("quality_vs_params.png", "parameters", "parameters")]:
        if not models or not tasks or any(m["efficiency"].get(key) is None for m in models):
            continue
        fig, axes = plt.subplots(1, len(tasks), figsize=(4 * len(tasks), 3.4), squeeze=False)
        for ax, task in zip(axes[0], tasks, strict=True):
            metric = next(m["tasks"][task]["main_metric"] for m in models if task in m["tasks"])
            for m in models:
                value = m["tasks"].get(task, {}).get("metrics", {}).get(metric)
                if not value:
                    continue
                x = m["efficiency"][key]
                err = None
                if value.get("low") is not None:
                    err = [[value["value"] - value["low"]], [value["high"] - value["value"]]]
                ax.errorbar([x], [value["value"]], yerr=err, fmt="o", capsize=3)
                ax.annotate(m["name"], (x, value["value"]), textcoords="offset points", xytext=(4, 4), fontsize=8)
            ax.set_xscale("log")
            ax.set_title(task, fontsize=10)
            ax.set_xlabel(xlabel, fontsize=8)
            ax.set_ylabel(metric + (" (lower is better)" if metric in LOWER_IS_BETTER else ""), fontsize=8)
            ax.grid(alpha=0.3)
        fig.tight_layout()
        with atomic_path(out / filename) as tmp:
            fig.savefig(tmp, format="png", dpi=110)
        plt.close(fig)
        written.append(out / filename)
    return written


def _short_name(model: str) -> str:
    path = Path(model)
    parts = [p for p in path.parts if p not in ("model", "run", "/")]
    return parts[-1] if parts else model


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", text).strip("_")[:80] or "model"


def load_results(out: str | Path) -> dict:
    return json.loads((Path(out) / "results.json").read_text())
