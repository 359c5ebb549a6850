"""Small callbacks: what trains, at which rate and how long an epoch takes; a stop on a NaN loss; a notice when a
resume redoes steps; the best checkpoint with a tie-breaker; an Optuna trial's pruning inside its run."""

from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from typing_extensions import override

from datamodules.base import ImageClassificationDataModule
from datamodules.common import ConfigError, atomic_write
from lightning_modules.console import notice

PROGRESS_FILE = "progress.json"
OPTUNA_EXTRA = "the search needs Optuna: pip install -e '.[sweep]'"


class TrainingStopped(RuntimeError):
    """Training cannot go on (the loss became NaN or infinite); the message says where and what is left."""


class TrainingStateLogger(pl.Callback):
    """Logs `lr/<group>` for every param group (`lr/head`, `lr/layer4` ...), `trainable_params` and `time/epoch_s`.

    Learning rates and trainable parameters are logged at the first batch of each epoch, after every finetuning
    strategy has unfrozen what is due; `time/epoch_s` is the wall time of the epoch (training and its validation).
    """

    @override
    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Log every step of an epoch shorter than `log_every_n_steps` (a small set): else no step is logged, and
        Lightning warns that the training batches are fewer than the logging interval."""
        batches = training_batches(trainer)
        interval = trainer.log_every_n_steps  # type: ignore[attr-defined]  # set by Lightning's logger connector
        if batches is not None and 0 < batches < interval:
            trainer.log_every_n_steps = 1  # type: ignore[attr-defined]

    @override
    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Start the epoch's clock."""
        self._epoch_start = time.perf_counter()

    @override
    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Log the epoch's wall time, `time/epoch_s`."""
        start = getattr(self, "_epoch_start", None)
        if start is not None:
            pl_module.log("time/epoch_s", time.perf_counter() - start, on_step=False, on_epoch=True, batch_size=1)

    @override
    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        """Log the learning rate of each named group and the number of trainable parameters."""
        if batch_idx != 0:
            return
        for i, optimizer in enumerate(trainer.optimizers):
            for j, group in enumerate(optimizer.param_groups):
                name = group.get("name", f"group{j}")
                key = f"lr/{name}" if len(trainer.optimizers) == 1 else f"lr/opt{i}/{name}"
                pl_module.log(key, float(group["lr"]), on_step=False, on_epoch=True, batch_size=1)
        trainable = sum(p.numel() for p in pl_module.parameters() if p.requires_grad)
        pl_module.log("trainable_params", float(trainable), on_step=False, on_epoch=True, batch_size=1)


def training_batches(trainer: pl.Trainer) -> int | None:
    """The training batches of an epoch on each process, from the DataModule's train split, batch size and
    `limit_train_batches` (without building a loader); None when the data is not an ImageClassificationDataModule."""
    data = getattr(trainer, "datamodule", None)
    if not isinstance(data, ImageClassificationDataModule) or "train" not in data.datasets:
        return None
    samples = math.ceil(len(data.datasets["train"]) / max(1, trainer.world_size))
    batches = samples // data.batch_size + (samples % data.batch_size > 1)  # a last batch of one is dropped
    limit = trainer.limit_train_batches
    if isinstance(limit, int):
        return min(batches, limit)
    return math.ceil(batches * float(limit or 1.0))


class StopOnNonFiniteLoss(pl.Callback):
    """Stops training when the training loss is NaN or infinite, naming the epoch and step and the last good
    checkpoint. It checks before the backward pass, so the bad step changes no weight and no checkpoint is
    written after it; under DDP every process stops together (one agreed decision per step)."""

    def __init__(self) -> None:
        self.batch_idx = 0

    @override
    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        """Remember the batch index for the message."""
        self.batch_idx = batch_idx

    @override
    def on_before_backward(self, trainer: pl.Trainer, pl_module: pl.LightningModule, loss: torch.Tensor) -> None:
        """Raise `TrainingStopped` if any process's loss is not finite."""
        bad = not bool(torch.isfinite(loss.detach()).all())
        if not trainer.strategy.reduce_boolean_decision(bad, all=False):
            return
        value = float(loss.detach().float().flatten()[0]) if bad else "non-finite on another process"
        raise TrainingStopped(
            f"training loss became {value} at epoch {trainer.current_epoch}, step {trainer.global_step} "
            f"(batch {self.batch_idx} of the epoch); the step was not applied. "
            f"Last good checkpoint: {last_checkpoint(trainer) or 'none written yet'}"
        )


class BestCheckpoint(ModelCheckpoint):
    """Lightning's ModelCheckpoint, with ties on the monitored metric broken by a second metric.

    On a small val set accuracy has few values (25 images: steps of 0.04) and often ties; Lightning keeps the
    first checkpoint that reached the value, so the epochs after it (fine-tuning that lowered the loss) are
    never kept. Here a later epoch with the same `monitor` value and a better `tie_breaker` (by default a lower
    `val/loss`) replaces the kept one. The rule is exact for `save_top_k: 1` (the defaults); with more, it decides
    which checkpoint leaves the top k.

    Args:
        tie_breaker: the metric that decides between equal `monitor` values; None: Lightning's rule (the first).
        tie_mode: `min` (a loss) or `max`.
        **kwargs: ModelCheckpoint's arguments (`monitor`, `mode`, `filename`, `save_top_k` ...).
    """

    def __init__(self, tie_breaker: str | None = "val/loss", tie_mode: str = "min", **kwargs: Any) -> None:
        super().__init__(**kwargs)
        if tie_mode not in ("min", "max"):
            raise ValueError(f"BestCheckpoint tie_mode must be 'min' or 'max', got {tie_mode!r}")
        self.tie_breaker, self.tie_mode = tie_breaker, tie_mode
        self.tie_scores: dict[str, float] = {}  # the tie-breaker's value of each kept checkpoint

    @override
    def check_monitor_top_k(self, trainer: pl.Trainer, current: torch.Tensor | None = None) -> bool:
        """Lightning's decision, or on a tie with the k-th kept checkpoint, whether the tie-breaker is better."""
        if super().check_monitor_top_k(trainer, current):
            return True
        if current is None or not self.tie_breaker or self.save_top_k == 0:
            return False
        kept = self.kth_best_model_path
        breaker = trainer.callback_metrics.get(self.tie_breaker)
        better = False
        if kept in self.tie_scores and breaker is not None and bool(torch.eq(current, self.best_k_models[kept])):
            value, old = float(breaker), self.tie_scores[kept]
            better = value < old if self.tie_mode == "min" else value > old
        return trainer.strategy.reduce_boolean_decision(better)

    @override
    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Save as Lightning does, then note the tie-breaker's value of a newly kept checkpoint."""
        super().on_validation_end(trainer, pl_module)
        self._note_tie_scores(trainer)

    @override
    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """The same, when checkpoints are saved at the end of the training epoch."""
        super().on_train_epoch_end(trainer, pl_module)
        self._note_tie_scores(trainer)

    def _note_tie_scores(self, trainer: pl.Trainer) -> None:
        breaker = trainer.callback_metrics.get(self.tie_breaker) if self.tie_breaker else None
        scores = dict(self.tie_scores)
        if breaker is not None:
            scores.update({path: float(breaker) for path in self.best_k_models if path not in scores})
        self.tie_scores = {path: score for path, score in scores.items() if path in self.best_k_models}

    @override
    def state_dict(self) -> dict[str, Any]:
        """ModelCheckpoint's state and the tie-breaker's values (a resumed run breaks ties as before)."""
        return {**super().state_dict(), "tie_scores": dict(self.tie_scores)}

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore both."""
        super().load_state_dict(state_dict)
        self.tie_scores = {k: v for k, v in state_dict.get("tie_scores", {}).items() if k in self.best_k_models}


def last_checkpoint(trainer: pl.Trainer) -> str | None:
    """The newest checkpoint file written by this run's ModelCheckpoints (or the one it resumed from)."""
    paths = [str(trainer.ckpt_path or "")]
    for callback in trainer.checkpoint_callbacks:
        if isinstance(callback, ModelCheckpoint):
            paths += [callback.best_model_path, callback.last_model_path]
    found = [Path(p) for p in paths if p and Path(p).is_file()]
    return str(max(found, key=lambda p: p.stat().st_mtime)) if found else None


class ResumeNotice(pl.Callback):
    """Records how far training got (`progress.json` in the run directory, after every step) and warns when a
    fit resumes from a checkpoint older than that: checkpoints are written at epoch ends, so the interrupted
    epoch restarts from its first batch, in the same order (shuffling is seeded by epoch)."""

    def __init__(self) -> None:
        self.path: Path | None = None

    @override
    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Find the progress file (every process asks: `log_dir` is a collective) and warn on a partial epoch."""
        log_dir = trainer.log_dir
        self.path = Path(log_dir) / PROGRESS_FILE if log_dir else None
        if not trainer.ckpt_path or self.path is None or not self.path.is_file():
            return
        reached = json.loads(self.path.read_text())
        if reached["step"] > trainer.global_step and trainer.is_global_zero:
            notice(
                f"resuming from {trainer.ckpt_path}, saved at global step {trainer.global_step}; the interrupted run "
                f"had reached epoch {reached['epoch']}, step {reached['step']}. Epoch {trainer.current_epoch} "
                f"restarts from its first batch: the {reached['step'] - trainer.global_step} steps after the "
                "checkpoint are redone with the same data order."
            )

    @override
    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        """Write the epoch and step reached (atomically: written aside, then renamed)."""
        if self.path is None or not trainer.is_global_zero:
            return
        progress = json.dumps({"epoch": trainer.current_epoch, "step": trainer.global_step})
        atomic_write(self.path, lambda p: p.write_text(progress), durable=False)  # every step: no fsync


def optuna_module() -> Any:
    """Optuna, or a ConfigError saying how to install it."""
    try:
        import optuna
    except ImportError as err:
        raise ConfigError(OPTUNA_EXTRA) from err
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    return optuna


def median_pruner(startup_trials: int, warmup_epochs: int) -> Any:
    """The search's pruner (Optuna keeps it out of the study's storage: each process that reports builds it)."""
    return optuna_module().pruners.MedianPruner(n_startup_trials=startup_trials, n_warmup_steps=warmup_epochs)


class PruneTrial(pl.Callback):
    """Inside a trial's `ftlab` run: report the monitored metric to the study after every validation, and stop the
    fit (the median pruner's call) with `pruned.json` beside the run, which the search reads back.

    Args:
        journal: the study's journal file.
        run: the trial's run name (its folder); the running trial of that name is the one reported.
        startup_trials, warmup_epochs: the median pruner's (see `median_pruner`).
        monitor: the logged metric (default `val/acc`).
    """

    def __init__(
        self, journal: str, run: str, startup_trials: int, warmup_epochs: int, monitor: str = "val/acc"
    ) -> None:
        self.journal, self.run, self.monitor = journal, run, monitor
        self.pruner = (startup_trials, warmup_epochs)
        self._trial: Any = None

    def _find(self) -> Any:
        optuna = optuna_module()
        from optuna.storages import JournalStorage
        from optuna.storages.journal import JournalFileBackend

        storage = JournalStorage(JournalFileBackend(self.journal))
        study = optuna.load_study(study_name="search", storage=storage, pruner=median_pruner(*self.pruner))
        running = [
            t
            for t in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.RUNNING,))
            if t.user_attrs.get("run") == self.run
        ]
        if not running:
            return None  # run by hand outside its study: nothing to report to
        # Optuna has no public way to reattach to a trial from another process; its own Lightning callback under
        # DDP uses the same private id.
        return optuna.trial.Trial(study, max(running, key=lambda t: t.number)._trial_id)

    @override
    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.sanity_checking or self.monitor not in trainer.callback_metrics:
            return
        prune = False
        if trainer.is_global_zero:  # one process reports; every process learns the verdict
            self._trial = self._trial or self._find()
            if self._trial is not None:
                value = float(trainer.callback_metrics[self.monitor])
                self._trial.report(value, trainer.current_epoch)
                prune = bool(self._trial.should_prune())
                if prune:
                    root = Path(trainer.log_dir or ".").parent
                    marker = {"epoch": trainer.current_epoch, self.monitor: value}
                    atomic_write(root / "pruned.json", lambda p: p.write_text(json.dumps(marker)))
        if trainer.strategy.broadcast(prune, src=0):
            trainer.should_stop = True
