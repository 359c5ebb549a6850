"""The run's own metrics file: a CSVLogger in every run directory, whatever logger the config names, whose
`metrics.csv` survives a resume or a test in the same directory.

Reports, results tables and checkpoint shortcuts read `metrics.csv` and `metrics.json`, never a logger's
internals, so they work the same with TensorBoard, CSV, MLflow or W&B.
"""

from __future__ import annotations

import csv
import shutil
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger
from lightning.pytorch.loggers.csv_logs import ExperimentWriter
from lightning.pytorch.utilities import rank_zero_only
from typing_extensions import override


class AppendingWriter(ExperimentWriter):
    """Lightning's CSV writer, except that an existing `metrics.csv` is kept and appended to (Lightning's deletes
    it when the folder is not empty: a resumed fit, or `ftlab test` into the fit's run, lost every epoch's row)."""

    @override
    def _check_log_dir_exists(self) -> None:
        if self._fs.isfile(self.metrics_file_path):
            with self._fs.open(self.metrics_file_path, "r", newline="") as f:
                self.metrics_keys = sorted(key for key in next(csv.reader(f), []) if key)


def keep_metrics(logger: CSVLogger) -> CSVLogger:
    """Give a CSVLogger the appending writer (before it writes anything), on process zero, the one that writes.
    Under DDP the other processes start before the run's folder is shared with them: theirs would be the next
    version, left empty, which `--ckpt_path last` would then take for the newest run."""
    if logger._experiment is None and rank_zero_only.rank == 0:  # type: ignore[attr-defined]
        logger._fs.makedirs(logger.root_dir, exist_ok=True)
        logger._experiment = AppendingWriter(log_dir=logger.log_dir)
    return logger


def with_run_csv(logger: Any, root_dir: str | None, version: str | None = None) -> Any:
    """The configured logger(s) plus a CSVLogger writing `metrics.csv` into the run directory: beside a
    TensorBoardLogger, in its folder; before any other logger (first: its folder becomes `trainer.log_dir`), in
    `<root_dir>/lightning_logs/<version>`. False (no logging) stays False."""
    if logger is False:
        return logger
    loggers = [] if logger in (None, True) else list(logger) if isinstance(logger, list) else [logger]
    csvs = [lg for lg in loggers if isinstance(lg, CSVLogger)]
    if csvs:
        for lg in csvs:
            keep_metrics(lg)
        return loggers
    if loggers and isinstance(loggers[0], TensorBoardLogger):
        tb = loggers[0]
        return [tb, keep_metrics(CSVLogger(tb.save_dir, name=tb.name, version=tb.version)), *loggers[1:]]
    return [keep_metrics(CSVLogger(root_dir or ".", name="lightning_logs", version=version)), *loggers]


# What a run folder holds before its first step: the loggers' files and the saved config. A folder of only these,
# left by a fit that failed before training, holds nothing of the user's.
BEFORE_TRAINING = ("events.out.tfevents.", "hparams.yaml", "metrics.csv", "config.yaml")


class DropUntrainedRun(pl.Callback):
    """A fit that fails before its first training step (a config or data error found at setup) leaves no run
    folder behind: else the next good run would be `version_1` beside an empty `version_0`. Only a new folder that
    holds nothing but `BEFORE_TRAINING` files goes; a resumed run's folder, or one with a checkpoint, stays."""

    @override
    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        """Remove the run folder if the fit trained nothing in it (process zero; no collective)."""
        if trainer.state.fn != "fit" or trainer.global_step > 0 or trainer.ckpt_path or not trainer.is_global_zero:
            return
        folders = {Path(str(lg.log_dir)) for lg in trainer.loggers if lg.log_dir}
        for logger in trainer.loggers:  # close the writers first (Lightning finalizes them after this hook)
            logger.finalize("failed")
        for folder in folders:
            files = list(folder.iterdir()) if folder.is_dir() else []
            if all(f.is_file() and f.name.startswith(BEFORE_TRAINING) for f in files):
                shutil.rmtree(folder, ignore_errors=True)
