"""How `ftlab` ends when it is stopped or cannot write: one line naming the last checkpoint and the command that
resumes, never a traceback, and an exit status that never says "finished".

- SIGTERM (what SLURM, systemd and CI send) and SIGINT (Ctrl+C): a fit stops after the batch in progress, through
  Lightning's own SIGTERM path (its handler sets `trainer.received_sigterm`, its loops raise `SIGTERMException`);
  anything else (parsing, building, test, predict) stops at once, and so does a fit at a second Ctrl+C. The status
  is 128 + the signal's number, as a shell reports a process a signal ended: 130 for SIGINT, 143 for SIGTERM.
  Lightning's own would be 0 after a SIGTERM (`SIGTERMException` is a `SystemExit` without a code) and 1 after a
  KeyboardInterrupt.
- Loader worker processes ignore both: the process that started them stops them when it is done (a worker killed
  by the signal made its parent fail with a DataLoader traceback).
- A write the disk refuses (a full disk, a quota, a read-only or failing device): status 74, `EX_IOERR` of
  sysexits.h, apart from a NaN stop (1) and a mistake (2): free space, then resume.
"""

from __future__ import annotations

import errno
import multiprocessing.util
import os
import shlex
import signal
import threading
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from types import FrameType
from typing import Any, ClassVar

import lightning.pytorch as pl
from lightning.pytorch.trainer.states import TrainerFn
from typing_extensions import override

from lightning_modules.cli.checkpoints import run_checkpoints, versions
from lightning_modules.reporting.callbacks import last_checkpoint
from lightning_modules.reporting.checkpoint_io import CheckpointNotWritten, os_error_in

SIGNALS = (signal.SIGINT, signal.SIGTERM)
EX_IOERR = 74
DISK_ERRORS = (errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EIO)


class Stopped(BaseException):
    """A stop signal that ends `ftlab` where it is. A BaseException, like KeyboardInterrupt: no `except Exception`
    on the way holds it up."""


@contextmanager
def handling(handler: Callable[[int, FrameType | None], Any]) -> Iterator[bool]:
    """`handler` handles SIGINT and SIGTERM until the block ends, then the handlers before it again; whether it
    does (only in the main thread: Python runs signal handlers nowhere else, and nothing changes)."""
    if threading.current_thread() is not threading.main_thread():
        yield False
        return
    before = {signum: signal.getsignal(signum) for signum in SIGNALS}
    for signum in SIGNALS:
        signal.signal(signum, handler)
    try:
        yield True
    finally:
        for signum, previous in before.items():
            signal.signal(signum, previous)


def stopped_by(status: int) -> str | None:
    """The signal an `ftlab` exit status says stopped it (`SIGTERM` for 143, or -15 when it was killed before it
    could answer), else None."""
    for signum in SIGNALS:
        if status in (128 + signum, -signum):
            return signal.Signals(signum).name
    return None


class StopNotice(pl.Callback):
    """Stops `ftlab` on SIGTERM or SIGINT, and notes where a run that ends by an exception can resume from.

    While `installed`, the first signal during a fit (from `on_fit_start`) takes Lightning's SIGTERM path: a SIGINT
    is sent on as a SIGTERM, to Lightning's handler, whose loops stop after the batch in progress. Anywhere else, and
    at a second SIGINT, `Stopped` is raised at once; a repeated SIGTERM changes nothing. The `ftlab` CLI adds the
    installed notice to its trainer's callbacks (`active`).
    """

    active: ClassVar[StopNotice | None] = None

    def __init__(self) -> None:
        self.signum: int | None = None
        self.fitting = False
        self.stage: TrainerFn | None = None  # what the trainer was doing when an exception ended the run
        self.checkpoint: str | None = None
        self.reached = ""
        self.quiet = False  # on a process other than zero: the line is process zero's

    @contextmanager
    def installed(self) -> Iterator[StopNotice]:
        """Handle SIGINT and SIGTERM in this process, and keep them from the worker processes it forks, until the
        block ends."""
        with handling(self.handle) as installed:
            if installed:
                multiprocessing.util.register_after_fork(self, StopNotice.in_worker)
                StopNotice.active = self
            try:
                yield self
            finally:
                StopNotice.active = None

    def handle(self, signum: int, frame: FrameType | None) -> None:
        """The signal handler (Lightning's own SIGTERM handler calls it too, after its own, during a run)."""
        if self.signum is None:
            self.signum = signum
            if not self.fitting:
                raise Stopped(signum)
            if signum == signal.SIGINT:
                os.kill(os.getpid(), signal.SIGTERM)  # Lightning's handler: its loops stop after this batch
        elif signum == signal.SIGINT == self.signum:
            raise Stopped(signum)  # Ctrl+C twice: now

    def in_worker(self) -> None:
        """In a worker process forked from this one (a loader's): SIGINT ignored, SIGTERM obeyed only when it comes
        from the parent (torch's own way to end a worker that does not stop), waited for on a thread of its own."""
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM})  # torch's SIGTERM handler never runs
        parent = os.getppid()

        def obey_parent() -> None:
            while signal.sigwaitinfo({signal.SIGTERM}).si_pid != parent:
                pass
            os._exit(0)

        threading.Thread(target=obey_parent, name="sigterm-from-parent", daemon=True).start()

    @override
    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """From here on a signal stops the fit at the end of a batch."""
        self.fitting = True

    @override
    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        """Note the run's last checkpoint, step and epoch, for the line `interrupted` or `refused` makes."""
        self.fitting = False
        self.stage = trainer.state.fn
        self.checkpoint = last_checkpoint(trainer)
        self.reached = f"step {trainer.global_step} (epoch {trainer.current_epoch})"
        self.quiet = not trainer.is_global_zero

    @override
    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        """A signal after the fit stops what comes next at once."""
        self.fitting = False

    def interrupted(self, argv: Sequence[str]) -> tuple[str, int] | None:
        """The line (after `ftlab: `) and exit status of a run a stop signal ended; None without a signal."""
        if self.signum is None:
            return None
        where = f" at {self.reached}" if self.reached else ""
        return f"interrupted by {signal.Signals(self.signum).name}{where}. {self.resume(argv)}", 128 + self.signum

    def refused(self, err: BaseException, argv: Sequence[str]) -> tuple[str, int] | None:
        """The line and exit status of a run that `err`, a write the disk refused, ended; None for another error."""
        found = os_error_in(err)
        if not isinstance(found, CheckpointNotWritten) and (found is None or found.errno not in DISK_ERRORS):
            return None
        code = errno.errorcode.get(found.errno or 0, "")
        if isinstance(found, CheckpointNotWritten):
            what = f"checkpoint {found.filename}: {found.strerror} ({code}); nothing half-written was left"
        else:
            what = f"{found.filename or 'a file of the run'}: {found.strerror} ({code})"
        return f"error: cannot write {what}. {self.resume(argv, 'free some space, then resume')}", EX_IOERR

    def resume(self, argv: Sequence[str], how: str = "resume") -> str:
        """What is left and the command that goes on: the fit from its last checkpoint, or the same command again."""
        if self.stage != TrainerFn.FITTING:
            return f"Nothing was finished; run it again: {shlex.join(['ftlab', *argv])}"
        if self.checkpoint is None:
            return f"No checkpoint was written yet; start again: {shlex.join(['ftlab', *without_ckpt_path(argv)])}"
        return f"Last intact checkpoint: {self.checkpoint}; {how}: {resume_command(argv, Path(self.checkpoint))}"


def without_ckpt_path(argv: Sequence[str]) -> list[str]:
    """The arguments without `--ckpt_path X` or `--ckpt_path=X`."""
    kept: list[str] = []
    skip = False
    for arg in argv:
        if skip:
            skip = False
        elif arg == "--ckpt_path":
            skip = True
        elif not arg.startswith("--ckpt_path="):
            kept.append(arg)
    return kept


def resume_command(argv: Sequence[str], checkpoint: Path) -> str:
    """`ftlab <argv> --ckpt_path last` when `last` names `checkpoint` (the newest run's newest last*.ckpt), else
    the same with the checkpoint's path."""
    run = checkpoint.parent.parent
    newest = versions(run.parent)
    last = run_checkpoints(run, "last") if newest and newest[0] == run else []
    which = "last" if last and last[0].resolve() == checkpoint.resolve() else str(checkpoint)
    return shlex.join(["ftlab", *without_ckpt_path(argv), "--ckpt_path", which])
