"""Grid search from a YAML grid: every combination is one `ftlab` run; the best is written as an experiment.

    python scripts/grid_search.py scripts/grids/mnist_mlp.yaml

The grid file:

    base: experiments/mnist/mlp.yaml        # or a list of YAML files, in --config order
    metric: val_acc                         # what picks the best (default val_acc: the test split stays unseen)
    grid:
      model.optimizer.init_args.lr: [1.0e-3, 3.0e-3]
      data.init_args.batch_size: [64, 128]
      strategy:                             # a name without dots: labels of YAML layers
        frozen: {trainer: {callbacks+: [{class_path: lightning_modules.Freeze}]}}
        full: {trainer: {callbacks+: [{class_path: lightning_modules.NoFreeze}]}}

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
from lightning_modules.sweeps.plan import Launcher, Sweep, load_grid, subprocess_launcher, sweep_parser
from lightning_modules.sweeps.summary import METRICS, pick_best, run_cli


def plan(args: argparse.Namespace, common: dict[str, Any]) -> Sweep:
    """The grid's runs, in the order of the cartesian product."""
    base, runs, metric = load_grid(args.grid)
    if metric not in METRICS:
        raise ConfigError(f"grid metric {metric!r} is not one of {', '.join(METRICS)}")
    out = args.out or Path("runs") / "grid" / args.grid.stem
    return Sweep(out, [*base, *args.config], runs, common, best_by=metric)


def main(argv: Sequence[str] | None = None, launcher: Launcher = subprocess_launcher) -> int:
    """The command line; see the module docstring."""
    parser = sweep_parser(__doc__, "runs/grid/<grid file name>")
    parser.add_argument("grid", type=Path, help="the grid YAML file")
    parser.set_defaults(out=None)
    return run_cli(parser, plan, argv, launcher, after=pick_best)


if __name__ == "__main__":
    sys.exit(main())
