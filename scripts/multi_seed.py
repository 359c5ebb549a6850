"""One experiment under several seeds: mean and standard deviation of every metric, one `ftlab` process per seed.

    python scripts/multi_seed.py --config experiments/quickstart.yaml --seeds 1 2 3
    python scripts/multi_seed.py --config experiments/quickstart.yaml --seeds 1 2 3 --split-seed

The seed is `seed_everything` (initialisation, shuffling, augmentation, dropout); with `--split-seed` the data's
train/val/test split changes with it too. Writes `<out>/results.csv`, `results.md` and `results.png`.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from typing import Any

from lightning_modules.sweeps.plan import Launcher, Run, Sweep, subprocess_launcher, sweep_parser
from lightning_modules.sweeps.summary import run_cli


def plan(args: argparse.Namespace, common: dict[str, Any]) -> Sweep:
    """One run per seed."""
    runs = []
    for seed in args.seeds:
        config: dict[str, Any] = {"seed_everything": seed}
        if args.split_seed:
            config["data"] = {"init_args": {"split_seed": seed}}
        runs.append(Run(f"seed{seed}", {"seed": seed}, config))
    return Sweep(args.out, args.config, runs, common, summary=True)


def main(argv: Sequence[str] | None = None, launcher: Launcher = subprocess_launcher) -> int:
    """The command line; see the module docstring."""
    parser = sweep_parser(__doc__, "runs/multi_seed")
    parser.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3], help="seed_everything values (1 2 3)")
    parser.add_argument("--split-seed", action="store_true", help="also vary data.init_args.split_seed")
    return run_cli(parser, plan, argv, launcher)


if __name__ == "__main__":
    sys.exit(main())
