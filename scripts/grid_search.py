"""Grid search from a YAML grid: every combination is one `ftlab` run; the best is written as an experiment.

    python scripts/grid_search.py experiments/grids/mnist_mlp.yaml

The grid file:

    base: experiments/mnist/mlp.yaml        # or a list of YAML files, in --config order
    metric: val_acc                         # what picks the best (default val_acc: the test split stays unseen)
    grid:
      model.optimizer.init_args.lr: [1.0e-3, 3.0e-3]
      data.init_args.batch_size: [64, 128]
      strategy:                             # a name without dots: labels of YAML layers
        frozen: {trainer: {callbacks+: [{class_path: lightning_modules.finetuning.Freeze}]}}
        full: {trainer: {callbacks+: [{class_path: lightning_modules.finetuning.NoFreeze}]}}

Writes `<out>/results.csv`, `results.md`, `results.png` and `best.yaml`: the base merged with the winning values,
ready for `ftlab fit --config <out>/best.yaml`.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from datamodules.common import ConfigError
from lightning_modules.results import METRICS, run_cli
from lightning_modules.sweeps import Launcher, Sweep, load_grid, subprocess_launcher, sweep_parser, write_best


def plan(args: argparse.Namespace, common: dict[str, Any]) -> Sweep:
    """The grid's runs, in the order of the cartesian product."""
    base, runs, metric = load_grid(args.grid)
    if metric not in METRICS:
        raise ConfigError(f"grid metric {metric!r} is not one of {', '.join(METRICS)}")
    out = args.out or Path("runs") / "grid" / args.grid.stem
    return Sweep(out, [*base, *args.config], runs, common, best_by=metric)


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


def main(argv: Sequence[str] | None = None, launcher: Launcher = subprocess_launcher) -> int:
    """The command line; see the module docstring."""
    parser = sweep_parser(__doc__, "runs/grid/<grid file name>")
    parser.add_argument("grid", type=Path, help="the grid YAML file")
    parser.set_defaults(out=None)
    return run_cli(parser, plan, argv, launcher, after=pick_best)


if __name__ == "__main__":
    sys.exit(main())
