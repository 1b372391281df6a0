"""Tables, JSON/markdown reports and plots of ``compressm`` runs."""

from __future__ import annotations

import json
import math
import statistics
from collections.abc import Mapping, Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

import matplotlib
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from compressm_core.files import atomic_write

from .runs import RunResult

__all__ = [
    "comparison_rows",
    "format_stages",
    "format_sweep",
    "format_table",
    "markdown_value",
    "paired_differences",
    "plot_accuracy_vs_time",
    "plot_hsv_spectra",
    "plot_state_sizes",
    "save_figure",
    "size_steps",
    "sweep_summary",
    "to_json",
    "write_report",
    "write_text",
]

NON_FINITE_NOTE = "NaN or infinite values, written as null (strict JSON has neither)."

LABELS = {
    "full": "full size",
    "compressm": "CompreSSM",
    "small": "small from scratch",
    "below": "small below the true order",
    "kd": "knowledge distillation",
    "hnn": "Hankel-norm penalty + cut",
    "post": "cut after training + fine-tune",
}
BASELINE_ARMS = ("kd", "hnn", "post")
STAGE_LABELS = {
    "teacher": "teacher (full size)",
    "student": "student",
    "before_cut": "before the cut",
    "after_cut": "after the cut",
    "trained": "trained at full size",
    "fine_tuned": "fine-tuned",
}


def _finite(value: Any, path: str, found: list[str]) -> Any:
    """``value`` with every non-finite float replaced by ``None``; their paths go to ``found``."""
    if isinstance(value, float):
        if math.isfinite(value):
            return value
        found.append(path or "(top level)")
        return None
    if isinstance(value, dict):
        prefix = f"{path}." if path else ""
        return {k: _finite(v, f"{prefix}{k}", found) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(v, f"{path}[{i}]", found) for i, v in enumerate(value)]
    return value


def to_json(data: dict[str, Any]) -> str:
    """``data`` as strict JSON (``allow_nan=False``), indented, with a final newline.

    Non-finite floats (a diverged run's metrics) become ``null``, and the key ``"non_finite"``
    lists where they were: ``{"note": ..., "fields": ["runs.full[0].test_metric", ...]}``.
    """
    return _strict(data)[0]


def _strict(data: dict[str, Any]) -> tuple[str, list[str]]:
    """:func:`to_json`, and the paths of the non-finite floats."""
    found: list[str] = []
    clean = _finite(data, "", found)
    if found:
        clean["non_finite"] = {"note": NON_FINITE_NOTE, "fields": found}
    return json.dumps(clean, indent=1, allow_nan=False) + "\n", found


def _mean_std(values: Sequence[float]) -> tuple[float, float]:
    values = list(values)
    if not values:
        return float("nan"), float("nan")
    return statistics.mean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def comparison_rows(results: dict[str, list[RunResult]]) -> list[dict[str, Any]]:
    """One row per run type: metric, final state sizes, wall time, speed-up, events; for a
    baseline, ``stages``: the mean test metric at each of its stages."""
    full_time = _mean_std([r.train_seconds for r in results.get("full", [])])[0]
    rows = []
    for label, runs in results.items():
        if not runs:
            continue
        metric, spread = _mean_std([r.test_metric for r in runs])
        seconds = _mean_std([r.train_seconds for r in runs])[0]
        names = list(runs[0].final_sizes)
        sizes = {n: statistics.mean(r.final_sizes[n] for r in runs) for n in names}
        reductions = [sum(e["status"] == "reduced" for e in r.events) for r in runs]
        share = [r.reduction_seconds / r.train_seconds for r in runs if r.train_seconds > 0]
        extra = {}
        if runs[0].stages:
            extra["stages"] = {
                stage: _mean_std([r.stages[stage]["test"] for r in runs if stage in r.stages])[0]
                for stage in runs[0].stages
            }
        rows.append(
            {
                "run": label,
                "metric_name": runs[0].metric_name,
                "test_metric": metric,
                "test_metric_std": spread,
                "final_state": sizes,
                "train_seconds": seconds,
                "speedup_vs_full": full_time / seconds if seconds > 0 else float("nan"),
                "reduction_events": statistics.mean(reductions),
                "reduction_time_share": statistics.mean(share) if share else 0.0,
                "seeds": [r.config["seed"] for r in runs],
                "status": sorted({r.status for r in runs}),
                **extra,
            }
        )
    return rows


def format_stages(rows: list[dict[str, Any]]) -> str:
    """One line per baseline row: its test metric at each stage (empty without baselines)."""
    lines = []
    for row in rows:
        if "stages" not in row:
            continue
        percent = row["metric_name"] == "accuracy"
        values = {
            k: f"{100 * v:.2f} %" if percent else f"{v:.3g}" for k, v in row["stages"].items()
        }
        parts = ", ".join(f"{STAGE_LABELS.get(k, k)} {v}" for k, v in values.items())
        lines.append(f"{LABELS.get(row['run'], row['run'])}, test {row['metric_name']}: {parts}.")
    return "\n".join(lines)


def paired_differences(
    results: dict[str, list[RunResult]], arm: str = "compressm", other: str = "small"
) -> dict[str, Any] | None:
    """Per-seed differences ``arm - other`` of the test metric (runs paired by seed).

    Returns ``None`` unless both arms have runs of the same seeds. ``better`` counts the seeds
    where ``arm`` is better (higher accuracy, lower error).
    """
    mine = {r.config["seed"]: r for r in results.get(arm, []) if r.status == "complete"}
    theirs = {r.config["seed"]: r for r in results.get(other, []) if r.status == "complete"}
    seeds = sorted(set(mine) & set(theirs))
    if not seeds:
        return None
    higher = mine[seeds[0]].metric_name == "accuracy"
    diffs = [mine[s].test_metric - theirs[s].test_metric for s in seeds]
    return {
        "arm": arm,
        "other": other,
        "seeds": seeds,
        "differences": diffs,
        "mean": statistics.mean(diffs),
        "std": statistics.stdev(diffs) if len(diffs) > 1 else 0.0,
        "better": sum(1 for d in diffs if (d > 0 if higher else d < 0)),
        "metric_name": mine[seeds[0]].metric_name,
    }


def format_paired(paired: dict[str, Any]) -> str:
    """One line: the per-seed differences, their mean and a sign count."""
    percent = paired["metric_name"] == "accuracy"
    scale, unit = (100.0, " points") if percent else (1.0, "")
    per_seed = ", ".join(f"{scale * d:+.2f}" for d in paired["differences"])
    name = LABELS.get(paired["arm"], paired["arm"])
    other = LABELS.get(paired["other"], paired["other"])
    return (
        f"{name} - {other}, paired by seed: {per_seed}; mean {scale * paired['mean']:+.2f} "
        f"± {scale * paired['std']:.2f}{unit}; {name} better on {paired['better']} of "
        f"{len(paired['differences'])} seeds."
    )


def sweep_summary(
    sweep: Sequence[RunResult], compressm: RunResult | None
) -> dict[str, Any] | None:
    """The cost of finding the state size by a sweep of models trained from scratch.

    The size a user would pick is the one with the best validation metric; its test metric is
    reported beside the total training time of the sweep and of one CompreSSM run (same seed).
    """
    if not sweep:
        return None
    higher = sweep[0].metric_name == "accuracy"
    best = (max if higher else min)(sweep, key=lambda r: r.val_metric)
    out: dict[str, Any] = {
        "sizes": [max(r.initial_sizes.values()) for r in sweep],
        "test": [r.test_metric for r in sweep],
        "val": [r.val_metric for r in sweep],
        "seconds": [r.train_seconds for r in sweep],
        "total_seconds": sum(r.train_seconds for r in sweep),
        "best_size": max(best.initial_sizes.values()),
        "best_test": best.test_metric,
        "metric_name": best.metric_name,
        "seed": best.config["seed"],
    }
    if compressm is not None:
        out["compressm_seconds"] = compressm.train_seconds
        out["compressm_test"] = compressm.test_metric
        out["compressm_sizes"] = list(compressm.final_sizes.values())
    return out


def format_sweep(summary: dict[str, Any]) -> str:
    """One paragraph: what a sweep of sizes costs and finds, against one CompreSSM run."""
    percent = summary["metric_name"] == "accuracy"

    def fmt(value: float) -> str:
        return f"{100 * value:.2f} %" if percent else f"{value:.3g}"

    sizes = ", ".join(str(n) for n in summary["sizes"])
    text = (
        f"Sweep of sizes {sizes} (seed {summary['seed']}): {summary['total_seconds']:.1f} s of "
        f"training; best by validation N = {summary['best_size']}, "
        f"test {fmt(summary['best_test'])}."
    )
    if "compressm_seconds" in summary:
        ratio = summary["total_seconds"] / max(summary["compressm_seconds"], 1e-9)
        text += (
            f" One CompreSSM run: {summary['compressm_seconds']:.1f} s ({ratio:.1f}x less), "
            f"test {fmt(summary['compressm_test'])} at N = "
            f"{', '.join(str(n) for n in summary['compressm_sizes'])}."
        )
    return text


def format_table(rows: list[dict[str, Any]]) -> str:
    """The comparison as a markdown table (also readable in a terminal)."""
    if not rows:
        return "(no completed runs)"
    name = rows[0]["metric_name"]
    percent = name == "accuracy"

    def fmt(value: float) -> str:
        return f"{100 * value:.2f}" if percent else f"{value:.3g}"

    lines = [
        f"| run | test {name} | final state size | train time [s] | speed-up vs full "
        "| reductions | time in reductions |",
        "|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        sizes = ", ".join(f"{v:.3g}" for v in row["final_state"].values())
        spread = f" ± {fmt(row['test_metric_std'])}" if len(row["seeds"]) > 1 else ""
        unit = " %" if percent else ""
        lines.append(
            f"| {LABELS.get(row['run'], row['run'])} | {fmt(row['test_metric'])}{spread}"
            f"{unit} | {sizes} | {row['train_seconds']:.1f} | {row['speedup_vs_full']:.2f}x "
            f"| {row['reduction_events']:g} | {100 * row['reduction_time_share']:.2f} % |"
        )
    return "\n".join(lines)


def plot_hsv_spectra(result: RunResult, path: Path, truth: Sequence[float] | None = None) -> None:
    """Hankel singular values of every layer at each reduction event (log scale)."""
    events = [e for e in result.events if e["hsv"]]
    fig = Figure(figsize=(6.4, 4.0))
    ax = fig.subplots()
    cmap = matplotlib.colormaps["viridis"]
    for i, event in enumerate(events):
        hsv = event["hsv"]
        ax.semilogy(
            range(1, len(hsv) + 1),
            hsv,
            marker=".",
            color=cmap(i / max(1, len(events) - 1)),
            label=f"step {event['step']} {event['layer']} ({event['old_rank']}->"
            f"{event['new_rank']})",
        )
    if truth:
        ax.semilogy(range(1, len(truth) + 1), truth, "k--", marker="x", label="true system")
    ax.set_xlabel("index")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # states are counted
    ax.set_ylabel("Hankel singular value")
    ax.set_title("HSV spectra at the reduction events")
    if events or truth:
        ax.legend(fontsize=7)
    fig.tight_layout()
    save_figure(fig, path)


def markdown_value(value: Any) -> str:
    """``value`` as report text: mappings as ``key = value`` pairs, numbers to four significant
    digits, sequences in brackets (no Python ``repr`` of dicts and strings)."""
    if isinstance(value, Mapping):
        return ", ".join(f"{k} = {markdown_value(v)}" for k, v in value.items())
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(markdown_value(v) for v in value) + "]"
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def size_steps(run: RunResult) -> tuple[list[int], list[int]]:
    """The total state size of ``run`` as a step function: the steps at which it changed (its
    reduction and rollback events, at the step they happened) and the size from each on,
    closed at the last step of training or evaluation."""
    sizes = dict(run.initial_sizes)
    steps, totals = [0], [sum(sizes.values())]
    changes = [e for e in run.events if e.get("status") in ("reduced", "rolled_back")]
    for event in sorted(changes, key=lambda e: int(e["step"])):
        sizes[event["layer"]] = int(event["new_rank"])
        if int(event["step"]) == steps[-1]:
            totals[-1] = sum(sizes.values())
        else:
            steps.append(int(event["step"]))
            totals.append(sum(sizes.values()))
    last = max([int(run.config.get("steps", 0)), *(c[0] for c in run.curve)])
    if last > steps[-1]:
        steps.append(last)
        totals.append(totals[-1])
    return steps, totals


def plot_state_sizes(results: dict[str, list[RunResult]], path: Path) -> None:
    """Total state size over training steps (first seed of each run type), changing at the
    steps of the reduction events."""
    fig = Figure(figsize=(6.4, 3.6))
    ax = fig.subplots()
    for label, runs in results.items():
        if runs and runs[0].curve:
            steps, sizes = size_steps(runs[0])
            ax.step(steps, sizes, where="post", label=LABELS.get(label, label))
    ax.set_xlabel("training step")
    ax.set_ylabel("total state size")
    ax.set_yscale("log")
    if ax.get_legend_handles_labels()[0]:  # none for a run interrupted before evaluating
        ax.legend()
    fig.tight_layout()
    save_figure(fig, path)


def plot_accuracy_vs_time(results: dict[str, list[RunResult]], path: Path) -> None:
    """Validation metric against training wall time (every seed)."""
    fig = Figure(figsize=(6.4, 3.6))
    ax = fig.subplots()
    colors = {
        "full": "C0",
        "compressm": "C1",
        "small": "C2",
        "below": "C3",
        "kd": "C4",
        "hnn": "C5",
        "post": "C6",
    }
    name = "metric"
    for label, runs in results.items():
        for i, run in enumerate(runs):
            name = run.metric_name
            ax.plot(
                [c[1] for c in run.curve],
                [c[2] for c in run.curve],
                color=colors.get(label),
                alpha=0.9 if i == 0 else 0.4,
                label=LABELS.get(label, label) if i == 0 else None,
            )
    ax.set_xlabel("training wall time [s]")
    ax.set_ylabel(f"validation {name}")
    if ax.get_legend_handles_labels()[0]:  # none for a run interrupted before evaluating
        ax.legend()
    fig.tight_layout()
    save_figure(fig, path)


def _order_note(order: int, rows: list[dict[str, Any]]) -> str:
    """How the final state sizes compare with a known true order (real states)."""
    parts = []
    for row in rows:
        sizes = ", ".join(f"{v:g}" for v in row["final_state"].values())
        parts.append(f"{LABELS.get(row['run'], row['run'])}: {sizes}")
    note = (
        f"True system order: {order} real states = {order / 2:g} complex LRU/S5 states (a "
        f"complex state with output Re(C x) carries a conjugate pair; a Mamba state is real). "
        f"Final state sizes: {'; '.join(parts)}."
    )
    by_run = {row["run"]: row for row in rows}
    if "below" in by_run and "small" in by_run:
        below, small = by_run["below"], by_run["small"]
        ratio = below["test_metric"] / small["test_metric"] if small["test_metric"] else math.nan
        note += (
            f" One state below the true order, the model reaches test {below['metric_name']} "
            f"{below['test_metric']:.3g}, {ratio:.3g} times that of the small model at the size "
            f"CompreSSM reached ({small['test_metric']:.3g})."
        )
    return note


def write_text(path: Path, text: str) -> None:
    """Write ``text`` (UTF-8) to ``path`` atomically: a reader, or a run interrupted at any
    point, sees the old file or the new one, never a fragment."""
    with atomic_write(path) as f:
        f.write(text.encode())


def save_figure(fig: Figure, path: Path) -> None:
    """``fig`` as a PNG at ``path``, written atomically."""
    with atomic_write(path) as f:
        fig.savefig(f, format="png", dpi=120)


def write_report(
    folder: Path,
    *,
    header: dict[str, Any],
    results: dict[str, list[RunResult]],
    truth: Sequence[float] | None = None,
    sweep: Sequence[RunResult] = (),
) -> dict[str, Any]:
    """Write ``report.json``, ``report.md`` and the plots into ``folder``; return the report.

    ``sweep``: small models at several sizes (``compare --sweep``), summarised by
    :func:`sweep_summary` against the first CompreSSM run.
    """
    folder.mkdir(parents=True, exist_ok=True)
    rows = comparison_rows(results)
    others = ["small", "full", *(b for b in BASELINE_ARMS if results.get(b))]
    paired = [p for p in (paired_differences(results, other=o) for o in others) if p is not None]
    first = next(iter(results.get("compressm", [])), None)
    report = {
        **header,
        "summary": rows,
        "paired": paired,
        "sweep": sweep_summary(sweep, first),
        "runs": {label: [asdict(r) for r in runs] for label, runs in results.items()},
    }
    plots = {}
    reduced = results.get("compressm", [])
    if reduced:
        plots["hsv_spectra"] = "hsv_spectra.png"
        plot_hsv_spectra(reduced[0], folder / plots["hsv_spectra"], truth)
    if any(results.values()):
        plots["state_size"] = "state_size.png"
        plot_state_sizes(results, folder / plots["state_size"])
        plots["metric_vs_time"] = "metric_vs_time.png"
        plot_accuracy_vs_time(results, folder / plots["metric_vs_time"])
    report["plots"] = plots
    text, non_finite = _strict(report)
    write_text(folder / "report.json", text)
    md = [f"# compressm {header.get('command', '')}: {header.get('task', '')}", ""]
    md += [
        f"- {k}: {markdown_value(v)}" for k, v in header.items() if k not in ("command", "config")
    ]
    md += ["", format_table(rows), ""]
    stages = format_stages(rows)
    md += [f"- {line}" for line in stages.splitlines()] + [""] if stages else []
    md += [f"- {format_paired(p)}" for p in paired]
    if report["sweep"]:
        md += [f"- {format_sweep(report['sweep'])}"]
    md += [""] if paired or report["sweep"] else []
    order = header.get("task_info", {}).get("true_order")
    if order is not None:
        md += [_order_note(order, rows), ""]
    if non_finite:
        md += [f"Non-finite values (null in report.json): {', '.join(non_finite)}.", ""]
    md += [f"![{name}]({file})" for name, file in plots.items()]
    write_text(folder / "report.md", "\n".join(md) + "\n")
    return report
