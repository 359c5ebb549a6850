"""What `ftlab` prints: our notices through the `ftlab` logger on process zero only, third-party noise that
says nothing about the run filtered by message, and a progress bar that fits 80 columns.

The noise list is the one home for what is filtered: the CLI applies it, and the test suite applies it too
(so that every other DeprecationWarning from our code fails a test).
"""

from __future__ import annotations

import logging
import os
import platform
import sys
import warnings
from typing import Any

import lightning
import torch
from lightning.pytorch.callbacks import TQDMProgressBar
from lightning.pytorch.utilities import rank_zero_only
from typing_extensions import override

log = logging.getLogger("ftlab")

# (category, message regex) of third-party warnings that say nothing about the user's run
NOISE: tuple[tuple[type[Warning], str], ...] = (
    (FutureWarning, r"`isinstance\(treespec, LeafSpec\)` is deprecated"),  # Lightning 2.6 on torch 2.14
    # ModelCheckpoint's state in a checkpoint read by test or predict from another run folder: nothing to act on
    (UserWarning, r"The dirpath has changed from"),
    # EMAWeightAveraging on any module with configure_model (ours: channels-last, compile); nothing is sharded here
    (UserWarning, r"You're using the WeightAveraging callback with a model that overrides the configure_model"),
)
NOISE_LOGS = ("litlogger",)  # Lightning's advertisement for its cloud logger, at every start
# Lightning's note of a SIGTERM (its number; `Received SIGTERM: 2` for a Ctrl+C sent on): `ftlab`'s own line names it
NOISE_SIGNAL_LOGS = ("Received SIGTERM",)


class _DropNoise(logging.Filter):
    def __init__(self, words: tuple[str, ...] = NOISE_LOGS) -> None:
        super().__init__()
        self.words = words

    @override
    def filter(self, record: logging.LogRecord) -> bool:
        return not any(word in record.getMessage() for word in self.words)


def quiet_known_noise() -> None:
    """Filter `NOISE` warnings and log lines (idempotent). jsonargparse's deprecation warnings are switched off
    by its own variable: they are about how LightningCLI 2.6 calls it (add_instantiator, instantiate_classes,
    dump's skip_none ...), not about anything in a config."""
    os.environ.setdefault("JSONARGPARSE_DEPRECATION_WARNINGS", "off")
    for category, message in NOISE:
        warnings.filterwarnings("ignore", message=message, category=category)
    for name, words in (
        ("lightning.pytorch.utilities.rank_zero", NOISE_LOGS),
        ("lightning.fabric.utilities.rank_zero", NOISE_LOGS),
        ("lightning.pytorch.trainer.connectors.signal_connector", NOISE_SIGNAL_LOGS),
    ):
        target = logging.getLogger(name)
        if not any(isinstance(f, _DropNoise) for f in target.filters):
            target.addFilter(_DropNoise(words))


class _Stderr(logging.StreamHandler):
    """A stream handler on whatever `sys.stderr` is when a message comes (not the one of the first set-up)."""

    @property  # type: ignore[override]
    def stream(self) -> Any:
        """The current standard error."""
        return sys.stderr

    @stream.setter
    def stream(self, value: Any) -> None:
        pass


def setup_console() -> None:
    """Show `ftlab` notices (INFO and up, the message alone) on stderr, and filter the noise."""
    quiet_known_noise()
    if not log.handlers:
        handler = _Stderr()
        handler.setFormatter(logging.Formatter("%(message)s"))
        log.addHandler(handler)
        log.setLevel(logging.INFO)


@rank_zero_only
def notice(message: str) -> None:
    """A warning for the user (process zero only), without a file path."""
    log.warning(message)


class CompactProgressBar(TQDMProgressBar):
    """TQDM's bar with two numbers: the step's training loss and the monitored metric (the rest goes to the
    loggers), so that a bar fits 80 columns; no `v_num`."""

    @override
    def get_metrics(self, trainer: Any, pl_module: Any) -> dict[str, int | str | float | dict[str, float]]:
        """`loss` and the metric early stopping (else the best checkpoint) watches."""
        metrics = super().get_metrics(trainer, pl_module)
        watched = getattr(trainer.early_stopping_callback, "monitor", None) or getattr(
            trainer.checkpoint_callback, "monitor", None
        )
        shown: dict[str, int | str | float | dict[str, float]] = {}
        loss = metrics.get("train/loss_step", metrics.get("train/loss"))
        if loss is not None:
            shown["loss"] = loss
        if watched and watched in metrics:
            shown[watched] = metrics[watched]
        return shown


def machine() -> str:
    """Where this runs, in one line (the results and benchmark pages' header): CPU, cores, GPU, Python, torch and
    Lightning."""
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
    return (
        f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPU cores, {gpu}; Python "
        f"{platform.python_version()}, torch {torch.__version__}, Lightning {lightning.__version__}"
    )
