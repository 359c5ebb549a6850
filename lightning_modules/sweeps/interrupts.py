"""A sweep's SIGINT and SIGTERM: passed on to the `ftlab` children it runs, which stop after their batch in progress
and end with status 143, each its member then interrupted, never done (`plan.run_one`)."""

from __future__ import annotations

import signal
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from types import FrameType
from typing import Any

from lightning_modules.cli.stops import handling


class Interrupts:
    """A sweep's SIGINT and SIGTERM (while `catching`): passed on as SIGTERM to every `ftlab` child running (those
    `run` started), which stops after its batch in progress with status 143 (a child that got the signal itself, as
    the whole process group does at a Ctrl+C, takes the second as the same stop); no member starts after it."""

    def __init__(self) -> None:
        self.signum: int | None = None
        self.children: set[subprocess.Popen[bytes]] = set()  # set operations are atomic: no lock a handler can wait on

    @contextmanager
    def catching(self) -> Iterator[Interrupts]:
        """Handle SIGINT and SIGTERM in this process until the block ends (`stops.handling`); `signum` holds the
        first signal that came inside the block."""
        self.signum = None
        try:
            with handling(self.handle):
                yield self
        finally:
            self.signum = None

    def handle(self, signum: int, frame: FrameType | None) -> None:
        """The signal handler: note the first signal, pass a SIGTERM on to every child."""
        self.signum = self.signum or signum
        for child in list(self.children):
            child.send_signal(signal.SIGTERM)

    def run(self, cmd: list[str], **popen: Any) -> int:
        """Run `cmd` as a child that a signal to this process reaches; its exit status."""
        child = subprocess.Popen(cmd, **popen)
        self.children.add(child)
        try:
            if self.signum is not None:  # came between the start and the line above
                child.send_signal(signal.SIGTERM)
            return child.wait()
        finally:
            self.children.discard(child)


INTERRUPTS = Interrupts()
