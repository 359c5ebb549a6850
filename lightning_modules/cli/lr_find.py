"""`ftlab fit --lr_find print|apply`: Lightning's learning-rate finder over all of its steps, a line that says what
it ran and found, and its figure in the run and in TensorBoard."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from lightning.pytorch import LightningDataModule, LightningModule, Trainer
from lightning.pytorch.loggers import TensorBoardLogger

LR_FIND_STEPS = 100  # the finder's sweep: one learning rate per step, 1e-8 to 1 (Lightning's default)
LR_FIND_STOP = 4.0  # the sweep stops early when its smoothed loss rises above this many times its lowest (default)


def find_lr(trainer: Trainer, model: LightningModule, datamodule: LightningDataModule | None) -> Any:
    """Lightning's `Tuner.lr_find` over `LR_FIND_STEPS` steps: its `_LRFinder`, or None (`fast_dev_run`).

    Lightning bounds the sweep by steps but leaves the fit's epoch limit in place, so a short `max_epochs` cut it
    short (21 steps of 100 at one epoch of 21 batches) and the suggestion came from a flat start of the curve. The
    limit is raised for the sweep to as many epochs as it has steps (an epoch holds one step at least), then put
    back as it was."""
    from lightning.pytorch.tuner import Tuner  # only with --lr_find

    loop = trainer.fit_loop
    max_epochs = loop.max_epochs
    if max_epochs is not None and max_epochs != -1:  # None or -1: no epoch limit
        loop.max_epochs = max(max_epochs, LR_FIND_STEPS)
    try:
        return Tuner(trainer).lr_find(
            model,
            datamodule=datamodule,
            num_training=LR_FIND_STEPS,
            early_stop_threshold=LR_FIND_STOP,
            update_attr=False,  # `--lr_find apply` applies it, `print` does not
        )
    finally:
        loop.max_epochs = max_epochs


def describe_lr_find(finder: Any, suggestion: float | None, applied: bool) -> str:
    """The finder's line: the steps it ran and their learning rates, where and why it stopped when it stopped
    early, and its suggestion, from how many steps."""
    if finder is None:
        return "Learning-rate finder: skipped (fast_dev_run); keeping the configured rate"
    lrs, losses = finder.results["lr"], finder.results["loss"]
    steps = len(lrs)
    if not steps:
        return f"Learning-rate finder: no step ran (of {finder.num_training}); keeping the configured rate"
    if steps < finder.num_training:
        finite = [x for x in losses if math.isfinite(x)]
        diverged = bool(finite) and losses[-1] > LR_FIND_STOP * min(finite)
        why = f" (the smoothed loss rose above {LR_FIND_STOP:g}x its lowest)" if diverged else ""
        ran = f"stopped at step {steps} of {finder.num_training}, lr {lrs[-1]:.3g}{why}"
        source = f" from those {steps} steps"
    else:
        ran, source = f"{steps} of {finder.num_training} steps, lr {lrs[0]:.3g} to {lrs[-1]:.3g}", ""
    if suggestion is None:
        return f"Learning-rate finder: {ran}; no suggestion (too few finite losses); keeping the configured rate"
    return f"Learning-rate finder: {ran}; suggests lr={suggestion:.3g}{source}" + (" (applied)" if applied else "")


def show_lr_find(finder: Any, trainer: Trainer, log_dir: Path | None) -> None:
    """The finder's loss against the learning rate, its suggestion marked: `lr_find.png` in the run directory and
    `lr_find` on every TensorBoardLogger (its IMAGES tab)."""
    import matplotlib.pyplot as plt  # only with --lr_find

    figure = finder.plot(suggest=True)
    if log_dir is not None:
        log_dir.mkdir(parents=True, exist_ok=True)
        figure.savefig(log_dir / "lr_find.png")
    for logger in trainer.loggers:
        if isinstance(logger, TensorBoardLogger):
            logger.experiment.add_figure("lr_find", figure, close=False)
    plt.close(figure)
