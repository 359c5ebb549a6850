"""The one seam between the finetuning strategies and the distributed strategy: DDP re-wrapped after an unfreeze."""

from __future__ import annotations

import lightning.pytorch as pl
from lightning.pytorch.strategies import DDPStrategy, ParallelStrategy
from torch.nn.parallel import DistributedDataParallel

from datamodules.common import ConfigError


def check_strategy(trainer: pl.Trainer) -> None:
    """A ConfigError naming the strategy when it runs several processes and is not DDP: `rewrap_ddp` is what
    keeps replicas in step after an unfreeze, and only DDP has it."""
    strategy = trainer.strategy
    if isinstance(strategy, ParallelStrategy) and not isinstance(strategy, DDPStrategy):
        raise ConfigError(
            f"trainer.strategy {type(strategy).__name__}: a finetuning strategy that unfreezes during the fit is "
            "supported on one device and on DDP (`ddp`, `ddp_spawn`, ...); use one of them, or Freeze/NoFreeze"
        )


def rewrap_ddp(trainer: pl.Trainer) -> None:
    """Re-create the DDP wrapper so parameters unfrozen after it was built are synchronised too: the one seam
    between the finetuning strategies and the distributed strategy.

    DDP registers only the parameters that require grad when it is built; without this, each process would train
    newly unfrozen parameters on its own gradients and the replicas would silently drift apart. The seam is
    Lightning's own `DDPStrategy.configure_ddp`, which wraps `strategy.model`: it is handed the unwrapped module
    and builds a new wrapper (new gradient buckets; parameters broadcast from rank 0, which holds the same
    values). Parameters stay the same objects, so the optimizer and its state carry on. It runs after any change
    to the trainable set: at an unfreeze (`on_train_epoch_start`) and when a resumed fit restores unfrozen stages
    (`on_fit_start`). Single-device strategies need nothing; other multi-process ones are refused by
    `check_strategy`. `tests/test_reliability.py` trains across an unfreeze on two processes and checks that the
    replicas stay identical.
    """
    strategy = trainer.strategy
    if not isinstance(strategy, DDPStrategy) or not isinstance(strategy.model, DistributedDataParallel):
        return
    strategy.model = strategy.model.module
    strategy.configure_ddp()
