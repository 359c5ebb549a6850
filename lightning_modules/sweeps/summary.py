"""A sweep's table and plot, rebuilt at any time from its run folders alone: metrics.json and metrics.csv.

Where each number comes from (one home per fact):

    test_acc, test_f1        metrics.json of `ftlab test` (acc, macro f1 on the test split, best checkpoint)
    params_total             metrics.json `params_total` (every parameter of the tested model)
    images_per_s             metrics.json `images_per_s` (test steps: forward pass and metrics, one process)
    val_acc                  metrics.csv `val/acc`, its best epoch (what ModelCheckpoint kept)
    params_trainable         metrics.csv `trainable_params`, last epoch
    epoch_s, epochs          metrics.csv `time/epoch_s` (training and validation), mean and count
    gap_train_val            metrics.csv `gap/train_val_acc`, last epoch

metrics.csv is the CSVLogger's, which `ftlab` keeps in every run directory whatever the configured logger.
    acc_per_mparam           test_acc / (params_total / 1e6)
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import math
import signal
import statistics
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from datamodules.common import ConfigError, atomic_write
from lightning_modules.sweeps.interrupts import INTERRUPTS
from lightning_modules.sweeps.launchers import launch
from lightning_modules.sweeps.plan import (
    VERSION,
    Launcher,
    Sweep,
    describe,
    is_finished,
    overrides,
    select,
    subprocess_launcher,
    write_best,
)

METRICS = (
    "test_acc",
    "test_f1",
    "val_acc",
    "params_total",
    "params_trainable",
    "acc_per_mparam",
    "epoch_s",
    "images_per_s",
    "gap_train_val",
    "epochs",
)
HEADERS = {
    "test_acc": "test acc",
    "test_f1": "test macro F1",
    "val_acc": "best val acc",
    "params_total": "params",
    "params_trainable": "trainable",
    "acc_per_mparam": "acc / M params",
    "epoch_s": "s / epoch",
    "images_per_s": "test images / s",
    "gap_train_val": "train - val acc",
    "epochs": "epochs",
}


def scalars(run_dir: Path) -> dict[str, list[float]]:
    """Every scalar series the run logged, in step order, from its `metrics.csv`; a step logged twice (a resumed
    run redoing part of an epoch) keeps its last value. A run trained before `ftlab` kept metrics.csv has only
    TensorBoard event files for its fit (and maybe a metrics.csv of a later test): its fit's series come from
    those."""
    path = run_dir / "metrics.csv"
    series = _csv_scalars(path) if path.is_file() else {}
    if not any(key.startswith(("train/", "val/")) for key in series):
        series = {**_event_scalars(run_dir), **series}
    return series


def _csv_scalars(path: Path) -> dict[str, list[float]]:
    series: dict[str, dict[int, float]] = {}
    with path.open(newline="") as f:
        for row in csv.DictReader(f):
            step = int(row["step"])
            for key, value in row.items():
                if key not in ("step", "epoch") and value not in ("", None):
                    series.setdefault(key, {})[step] = float(value)
    return {key: [values[s] for s in sorted(values)] for key, values in series.items()}


def _event_scalars(run_dir: Path) -> dict[str, list[float]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(run_dir), size_guidance={"scalars": 0})
    events.Reload()
    return {tag: [e.value for e in events.Scalars(tag)] for tag in events.Tags()["scalars"]}


def read_run(root: Path) -> dict[str, Any] | None:
    """One table row from a run folder (`<out>/runs/<name>/`), or None when its test report is not written yet."""
    metrics_file = root / VERSION / "metrics.json"
    if not metrics_file.is_file():
        return None
    metrics = json.loads(metrics_file.read_text())
    labels = json.loads((root / "params.json").read_text()) if (root / "params.json").is_file() else {}
    series = scalars(root / VERSION)

    def last(tag: str) -> float | None:
        return series[tag][-1] if series.get(tag) else None

    times = series.get("time/epoch_s", [])
    total = metrics.get("params_total")
    row: dict[str, Any] = {"run": labels.get("name", root.name), **labels.get("params", {})}
    row |= {
        "test_acc": metrics["acc"],
        "test_f1": metrics["f1"],
        "val_acc": max(series["val/acc"]) if series.get("val/acc") else None,
        "params_total": total,
        "params_trainable": int(t) if (t := last("trainable_params")) is not None else None,
        "acc_per_mparam": metrics["acc"] / (total / 1e6) if total else None,
        "epoch_s": statistics.fmean(times) if times else None,
        "images_per_s": metrics.get("images_per_s"),
        "gap_train_val": last("gap/train_val_acc"),
        "epochs": len(times) or None,
    }
    return row


def collect(sweep: Sweep) -> list[dict[str, Any]]:
    """The rows of the sweep's finished runs, in the sweep's order, then any other run folder under it."""
    runs_dir = sweep.out / "runs"
    planned = [sweep.root(run) for run in sweep.runs]
    others = sorted(p for p in runs_dir.iterdir() if p.is_dir() and p not in planned) if runs_dir.is_dir() else []
    return [row for root in [*planned, *others] if (row := read_run(root)) is not None]


def summarize(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """`mean` and `std` rows (sample standard deviation, n - 1) of every metric over the rows."""
    mean: dict[str, Any] = {"run": "mean"}
    std: dict[str, Any] = {"run": "std"}
    for key in METRICS:
        values = [float(r[key]) for r in rows if r.get(key) is not None]
        mean[key] = statistics.fmean(values) if values else None
        std[key] = statistics.stdev(values) if len(values) > 1 else None
    return [mean, std]


def _columns(rows: list[dict[str, Any]]) -> list[str]:
    labels = [k for r in rows for k in r if k not in METRICS and k != "run"]
    return ["run", *dict.fromkeys(labels), *METRICS]


def _cell(key: str, value: Any) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return ""
    if key in ("params_total", "params_trainable"):
        return f"{value:,.0f}"
    if key in ("test_acc", "test_f1", "val_acc", "gap_train_val"):
        return f"{value:.4f}"
    if key in ("epoch_s", "acc_per_mparam"):
        return f"{value:.3g}"
    if key in ("images_per_s", "epochs"):
        return f"{value:.0f}"
    return str(value)


def markdown(rows: list[dict[str, Any]], summary: list[dict[str, Any]], title: str, note: str = "") -> str:
    """results.md: one row per run, then mean ± std when there is a summary, and the plot."""
    columns = _columns(rows)
    lines = [f"# {title}", "", *([note, ""] if note else [])]
    lines += ["| " + " | ".join(HEADERS.get(c, c) for c in columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(_cell(c, r.get(c)) for c in columns) + " |" for r in rows]
    if summary:
        mean, std = summary
        cells = [
            f"{_cell(c, mean[c])} ± {_cell(c, std[c])}" if c in METRICS and mean[c] is not None else "" for c in columns
        ]
        cells[0] = f"**mean ± std** (n={len(rows)})"
        lines.append("| " + " | ".join(cells) + " |")
    lines += ["", "![results](results.png)", ""]
    return "\n".join(lines)


def plot(rows: list[dict[str, Any]], summary: list[dict[str, Any]], title: str) -> Any:
    """Test accuracy against parameters (log scale), and test accuracy and macro F1 per run as bars."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(12, max(4.0, 0.35 * len(rows) + 1.5)))
    for row in rows:
        if row["params_total"]:
            left.scatter(row["params_total"], row["test_acc"])
            left.annotate(
                row["run"],
                (row["params_total"], row["test_acc"]),
                fontsize=8,
                xytext=(4, 4),
                textcoords="offset points",
            )
    left.set_xscale("log")
    left.set_xlabel("parameters")
    left.set_ylabel("test accuracy")
    left.set_title("accuracy against parameters")
    positions = range(len(rows))
    right.barh([p - 0.2 for p in positions], [r["test_acc"] for r in rows], height=0.4, label="test acc")
    right.barh([p + 0.2 for p in positions], [r["test_f1"] for r in rows], height=0.4, label="test macro F1")
    right.set_yticks(list(positions), [r["run"] for r in rows], fontsize=8)
    right.invert_yaxis()
    right.set_xlim(0, 1)
    if summary and summary[0]["test_acc"] is not None:
        mean, std = summary[0]["test_acc"], summary[1]["test_acc"] or 0.0
        right.axvline(mean, color="black", linestyle="--", label=f"mean acc {mean:.3f} ± {std:.3f}")
        right.axvspan(mean - std, mean + std, color="grey", alpha=0.2)
    right.legend(fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.08), ncol=3)
    right.set_title("per run")
    fig.suptitle(title)
    fig.tight_layout()
    return fig


def write_results(sweep: Sweep, rows: list[dict[str, Any]], title: str | None = None, note: str = "") -> None:
    """results.csv (full precision; `mean`/`std` rows for a summary), results.md and results.png, each atomically."""
    import matplotlib.pyplot as plt

    title = title or f"{sweep.out.name}: {len(rows)} runs"
    summary = summarize(rows) if sweep.summary and rows else []
    columns = _columns(rows)
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=columns, extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    writer.writerows([*rows, *summary])
    atomic_write(sweep.out / "results.csv", lambda p: p.write_text(buffer.getvalue()))
    atomic_write(sweep.out / "results.md", lambda p: p.write_text(markdown(rows, summary, title, note)))
    if rows:
        fig = plot(rows, summary, title)
        atomic_write(sweep.out / "results.png", lambda p: fig.savefig(p, dpi=110, format="png"))
        plt.close(fig)


def pick_best(sweep: Sweep, rows: list[dict[str, Any]]) -> str:
    """Write best.yaml for the run with the highest `best_by` metric; the note for results.md says which."""
    metric = sweep.best_by or "val_acc"
    scored = [r for r in rows if r.get(metric) is not None]
    if not scored:
        return f"No finished run has {metric}."
    best = max(scored, key=lambda r: r[metric])
    run = next(r for r in sweep.runs if r.name == best["run"])
    path = sweep.out / "best.yaml"
    note = f"Best by {metric}: {run.name} ({metric} {best[metric]:.4f}, test acc {best['test_acc']:.4f})"
    write_best(path, sweep, run, note)
    print(f"{note}; ready to run: ftlab fit --config {path}")
    return f"{note}; its config: `{path.name}`."


def run_cli(
    parser: argparse.ArgumentParser,
    plan: Callable[[argparse.Namespace, dict[str, Any]], Sweep],
    argv: Sequence[str] | None = None,
    launcher: Launcher = subprocess_launcher,
    after: Callable[[Sweep, list[dict[str, Any]]], str] | None = None,
) -> int:
    """Parse, plan, run what is not finished, then collect the table and plot; 0 when every run finished, 128 + the
    signal's number when a SIGINT or SIGTERM interrupted the sweep (`interrupts.Interrupts`).

    Args:
        parser: from `sweep_parser`, with the script's own options.
        plan: the sweep, from the parsed options and the common overrides.
        argv: the command line (default: `sys.argv[1:]`).
        launcher: how to run `ftlab` (default: a subprocess).
        after: called with the sweep and its table rows before they are written; returns a note for results.md
            (the grid writes best.yaml and names it).
    """
    try:
        args, rest = parser.parse_known_args(argv)
        sweep = plan(args, overrides(rest))
        for base in sweep.base:
            if not Path(base).is_file():
                raise ConfigError(f"experiment config {base} does not exist")
        if args.list:
            print("\n".join(f"{i}\t{run.name}" for i, run in enumerate(sweep.runs)))
            return 0
        chosen = [] if args.collect_only else select(sweep, args.only, args.index)
        with INTERRUPTS.catching():
            failed = launch(sweep, chosen, launcher, args)
            signum = INTERRUPTS.signum
        if args.only is not None or args.index is not None:
            if signum is None:
                print(f"Run finished; the table: {sys.argv[0]} ... --collect-only --out {sweep.out}")
            return _interrupted(signum, failed) or (1 if failed else 0)
        rows = collect(sweep)
        notes = [describe(sweep), after(sweep, rows) if after is not None and rows else ""]
        write_results(sweep, rows, note="\n\n".join(filter(None, notes)))
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    missing = [run.name for run in sweep.runs if not is_finished(sweep, run)]
    print(f"Results: {sweep.out / 'results.md'} ({len(rows)} of {len(sweep.runs)} runs finished)")
    if args.launcher == "submitit" and args.no_wait:
        if failed:
            print(f"Queued or running: {', '.join(failed)}; the same command again tables them once they finish")
        return 0
    interrupted = _interrupted(signum, missing)
    if missing and not interrupted:
        print(f"Not finished: {', '.join(missing)}" + (f" (failed now: {', '.join(failed)})" if failed else ""))
    return interrupted or (1 if missing else 0)


def _interrupted(signum: int | None, missing: list[str]) -> int:
    """When a signal interrupted the sweep: say so and what is left, and return 128 + its number; else 0."""
    if signum is None:
        return 0
    left = f"; not finished: {', '.join(missing)}" if missing else ""
    print(f"Interrupted by {signal.Signals(signum).name}{left}. The same command resumes the sweep")
    return 128 + signum
