"""Compare backbones: the same experiment (data, strategy, schedule) over a list of backbones, one `ftlab` process each.

    python scripts/compare_backbones.py --config experiments/cifar10/resnet18.yaml
    python scripts/compare_backbones.py --config experiments/quickstart.yaml --model.image_size 32 \\
        --backbones scratch/mlp@none scratch/simple_cnn@none timm/tf_efficientnet_lite0@embedded

A backbone is `model.backbone`, optionally with its own `model.weights` after `@` (the others keep the config's).

Writes `<out>/results.csv`, `results.md` and `results.png` (accuracy against parameters, and per-run bars).
Finished runs are skipped when run again. `--list` prints the runs; `--index $SLURM_ARRAY_TASK_ID` runs one (a job
array), then `--collect-only` builds the table from the run folders.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from typing import Any

from lightning_modules.sweeps.plan import Launcher, Run, Sweep, slug, subprocess_launcher, sweep_parser
from lightning_modules.sweeps.summary import run_cli

# The CIFAR-10 exercise's nine, then ResNet18 and a ViT.
DEFAULT_BACKBONES = [
    *(f"torchvision/{name}" for name in ("resnet50", "resnet101", "resnet152", "vgg16", "vgg19")),
    *(f"torchvision/{name}" for name in ("efficientnet_b0", "efficientnet_b3", "mobilenet_v2", "mobilenet_v3_large")),
    "torchvision/resnet18",
    "torchvision/vit_b_16",
]


def backbone_run(spec: str) -> Run:
    """A run for `backbone` or `backbone@weights`, named after it."""
    backbone, _, weights = spec.partition("@")
    model = {"backbone": backbone, **({"weights": weights} if weights else {})}
    return Run(slug(spec.replace("@", "-")), model, {"model": model})


def plan(args: argparse.Namespace, common: dict[str, Any]) -> Sweep:
    """One run per backbone."""
    return Sweep(args.out, args.config, [backbone_run(spec) for spec in args.backbones], common)


def main(argv: Sequence[str] | None = None, launcher: Launcher = subprocess_launcher) -> int:
    """The command line; see the module docstring."""
    parser = sweep_parser(__doc__, "runs/compare_backbones")
    parser.add_argument("--backbones", nargs="+", default=DEFAULT_BACKBONES, help="model.backbone[@weights] values")
    return run_cli(parser, plan, argv, launcher)


if __name__ == "__main__":
    sys.exit(main())
