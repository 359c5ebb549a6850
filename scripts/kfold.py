"""Stratified k-fold cross-validation of an experiment on any DataModule: one `ftlab` process per fold.

    python scripts/kfold.py --config experiments/quickstart.yaml --folds 5

Fold i is `data.init_args.num_folds: k, fold: i`: train and val are pooled and cut into k stratified folds
(seeded by `split_seed`); fold i validates, the others train; the test split is never touched. Writes each fold's
metrics and their mean and standard deviation to `<out>/results.csv`, `results.md` and `results.png`.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from typing import Any

from datamodules.common import ConfigError
from lightning_modules.sweeps.plan import Launcher, Run, Sweep, subprocess_launcher, sweep_parser
from lightning_modules.sweeps.summary import run_cli


def plan(args: argparse.Namespace, common: dict[str, Any]) -> Sweep:
    """One run per fold."""
    if args.folds < 2:
        raise ConfigError(f"--folds must be at least 2, got {args.folds}")
    runs = [
        Run(f"fold{i}", {"fold": i}, {"data": {"init_args": {"num_folds": args.folds, "fold": i}}})
        for i in range(args.folds)
    ]
    return Sweep(args.out, args.config, runs, common, summary=True)


def main(argv: Sequence[str] | None = None, launcher: Launcher = subprocess_launcher) -> int:
    """The command line; see the module docstring."""
    parser = sweep_parser(__doc__, "runs/kfold")
    parser.add_argument("--folds", type=int, default=5, help="number of folds (5)")
    return run_cli(parser, plan, argv, launcher)


if __name__ == "__main__":
    sys.exit(main())
