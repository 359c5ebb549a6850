"""Where sweep members run: one after another on this machine (the default), several at once on this machine
(`--jobs N`), or as one SLURM job array through submitit (`--launcher submitit`, the `sweep` extra).

Every member is the same `run_one` (fit, then test, resumable from `last.ckpt`), so the run folders, the tables and
the resume behave the same whichever launcher ran them.

- `--jobs N` on this machine: N members at once, each in a `Slot`. With GPUs, each slot gets `--gpus-per-job`
  devices of its own (`CUDA_VISIBLE_DEVICES`, round-robin when there are fewer devices than slots x GPUs); on CPU
  the cores this process may use are split between the slots (the member's CPU affinity and `OMP_NUM_THREADS`,
  so its torch threads, loader workers and ONNX Runtime threads fit its share).
- `--launcher submitit`: one job per member, submitted as one array (`slurm_array_parallelism` = `--jobs`). A
  member preempted or timed out is requeued by submitit (`Member.checkpoint`) and its fit resumes from
  `last.ckpt`. `--no-wait` returns after submitting; the same command later collects what has finished, skips
  members whose job is still queued or running, and resubmits the others.
"""

from __future__ import annotations

import argparse
import json
import os
import queue
import socket
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any

import torch
import yaml

from datamodules.common import ConfigError, atomic_write, cores, progress
from lightning_modules.sweeps.interrupts import INTERRUPTS
from lightning_modules.sweeps.plan import (
    Launcher,
    Run,
    Sweep,
    process_alive,
    run_one,
    subprocess_launcher,
)

SWEEP_EXTRA = "pip install -e '.[sweep]' (Optuna and submitit)"


@dataclass(frozen=True)
class Slot:
    """Where one of several members running at once goes: its environment and the CPU cores it may use."""

    index: int
    env: dict[str, str] = field(default_factory=dict)
    cpus: frozenset[int] | None = None


def slots(jobs: int, gpus_per_job: int = 1, gpus: int | None = None, cpus: Sequence[int] | None = None) -> list[Slot]:
    """`jobs` slots: GPUs dealt round-robin when there are any (`gpus`: default, the visible CUDA devices),
    otherwise the CPU cores (`cpus`: default, this process's affinity) split into `jobs` nearly equal shares."""
    if jobs < 1:
        raise ConfigError(f"--jobs {jobs}: give 1 or more")
    gpus = torch.cuda.device_count() if gpus is None else gpus
    if gpus:
        if gpus_per_job < 1:
            raise ConfigError(f"--gpus-per-job {gpus_per_job}: give 1 or more")
        visible = os.environ.get("CUDA_VISIBLE_DEVICES", ",".join(map(str, range(gpus)))).split(",")[:gpus]
        return [
            Slot(
                i,
                {"CUDA_VISIBLE_DEVICES": ",".join(visible[(i * gpus_per_job + k) % gpus] for k in range(gpus_per_job))},
            )
            for i in range(jobs)
        ]
    pool = sorted(os.sched_getaffinity(0) if cpus is None and hasattr(os, "sched_getaffinity") else cpus or [])
    if not pool:  # no affinity on this platform: threads only
        share = max(1, cores() // jobs)
        return [Slot(i, {"OMP_NUM_THREADS": str(share), "MKL_NUM_THREADS": str(share)}) for i in range(jobs)]
    if jobs >= len(pool):  # a core each, dealt round-robin
        shares = [[pool[i % len(pool)]] for i in range(jobs)]
    else:
        shares = [pool[i * len(pool) // jobs : (i + 1) * len(pool) // jobs] for i in range(jobs)]
    return [
        Slot(i, {"OMP_NUM_THREADS": str(len(s)), "MKL_NUM_THREADS": str(len(s))}, frozenset(s))
        for i, s in enumerate(shares)
    ]


@dataclass(frozen=True)
class LocalLauncher:
    """`ftlab <args>` as a child process of this one (the default launcher), in `slot` when one is given."""

    slot: Slot | None = None

    def __call__(self, args: list[str], log: Path) -> int:
        with pinned(self.slot):
            return subprocess_launcher(args, log, self.slot.env if self.slot else {})

    def at(self, slot: Slot) -> LocalLauncher:
        """The same launcher in `slot`."""
        return replace(self, slot=slot)


@contextmanager
def pinned(slot: Slot | None) -> Iterator[None]:
    """This thread's CPU affinity set to the slot's cores while a child starts (Linux: affinity is per thread, and
    a child inherits its parent thread's), then restored."""
    if slot is None or slot.cpus is None or not hasattr(os, "sched_setaffinity"):
        yield
        return
    before = os.sched_getaffinity(0)
    os.sched_setaffinity(0, slot.cpus)
    try:
        yield
    finally:
        os.sched_setaffinity(0, before)


def run_members(sweep: Sweep, runs: list[Run], launcher: Launcher, jobs: int = 1, gpus_per_job: int = 1) -> list[str]:
    """Run `runs` (`run_one`), `jobs` at a time; the names of those that failed. A progress line on stderr counts
    the members done of all, with the time each takes (`Sweep.shows_progress`); the `[name]` lines print above it.
    Once the sweep is interrupted (`interrupts.INTERRUPTS`), no member starts."""
    local = LocalLauncher() if launcher is subprocess_launcher else launcher
    parallel = jobs > 1 and len(runs) > 1
    if parallel and not isinstance(local, LocalLauncher):
        raise ConfigError("--jobs N runs members as processes of this machine; this launcher runs them another way")
    failed: list[str] = []
    with progress("sweep", "member", len(runs), shown=sweep.shows_progress()) as bar:

        def member(run: Run, where: Launcher) -> None:
            if INTERRUPTS.signum is not None:  # the sweep was interrupted: no member starts
                return
            ok = run_one(sweep, run, where)
            with bar.get_lock():  # members end in several threads at once
                failed.extend([] if ok else [run.name])
                bar.set_postfix_str(f"{len(failed)} failed" if failed else "", refresh=False)
                bar.update()

        if parallel and isinstance(local, LocalLauncher):
            in_slots(runs, jobs, gpus_per_job, lambda run, slot: member(run, local.at(slot)))
        else:
            for run in runs:
                member(run, launcher)
    return [run.name for run in runs if run.name in failed]  # in the sweep's order


def in_slots(items: Sequence[Any], jobs: int, gpus_per_job: int, work: Callable[[Any, Slot], Any]) -> list[Any]:
    """`work(item, slot)` for every item, `jobs` at once, each call holding one free slot; results in order."""
    free: queue.SimpleQueue[Slot] = queue.SimpleQueue()
    for slot in slots(jobs, gpus_per_job):
        free.put(slot)

    def hold(item: Any) -> Any:
        slot = free.get()
        try:
            return work(item, slot)
        finally:
            free.put(slot)

    with ThreadPoolExecutor(max_workers=jobs, thread_name_prefix="member") as pool:
        return list(pool.map(hold, items))


# ------------------------------------------------------------------------------------------ SLURM via submitit


@dataclass
class SlurmOptions:
    """What each member's job asks for; `extra` goes to submitit's `update_parameters` as is."""

    partition: str | None = None
    time_min: int = 240
    gpus_per_job: int = 1
    cpus_per_job: int | None = None
    mem_gb: float | None = None
    parallel: int | None = None
    cluster: str | None = None  # None: SLURM when sbatch is found, else local processes (submitit's AutoExecutor)
    extra: dict[str, Any] = field(default_factory=dict)

    def parameters(self) -> dict[str, Any]:
        """submitit's generic and `slurm_` parameters."""
        found: dict[str, Any] = {"timeout_min": self.time_min, "gpus_per_node": self.gpus_per_job, "nodes": 1}
        found["tasks_per_node"] = 1
        if self.cpus_per_job:
            found["cpus_per_task"] = self.cpus_per_job
        if self.mem_gb:
            found["mem_gb"] = self.mem_gb
        if self.partition:
            found["slurm_partition"] = self.partition
        if self.parallel:
            found["slurm_array_parallelism"] = self.parallel
        return {**found, **self.extra}


class Member:
    """One sweep member as a submitit job: `run_one` in the job's process; requeued on preemption or timeout
    (submitit calls `checkpoint`), and the fit then resumes from `last.ckpt`."""

    def __call__(self, sweep: Sweep, run: Run) -> bool:
        return run_one(sweep, run, LocalLauncher())

    def checkpoint(self, sweep: Sweep, run: Run) -> Any:
        """The same member again (submitit requeues it)."""
        from submitit.helpers import DelayedSubmission

        return DelayedSubmission(self, sweep, run)


def executor(folder: Path, options: SlurmOptions) -> Any:
    """submitit's AutoExecutor writing its files under `folder`, with `options`."""
    try:
        import submitit
    except ImportError as err:
        raise ConfigError(f"--launcher submitit needs submitit: {SWEEP_EXTRA}") from err
    found = submitit.AutoExecutor(folder=folder, cluster=options.cluster)
    kept = {k: v for k, v in options.parameters().items() if not k.startswith("slurm_") or found.cluster == "slurm"}
    found.update_parameters(**kept)
    return found


def job_ids(sweep: Sweep) -> dict[str, str]:
    """The submitted job of each member (`<out>/submitit/jobs.json`)."""
    path = sweep.out / "submitit" / "jobs.json"
    return json.loads(path.read_text()) if path.is_file() else {}


def job_alive(folder: Path, job_id: str, cluster: str) -> bool:
    """Whether a job submitted earlier is still queued or running: SLURM's word for it, or, for local jobs (whose
    id is the process id on this host), whether that process still exists."""
    if cluster == "slurm":
        from submitit import SlurmJob

        return SlurmJob(folder, job_id).state in ("PENDING", "RUNNING", "REQUEUED", "CONFIGURING", "COMPLETING")
    return process_alive(job_id)


def submit_members(sweep: Sweep, runs: list[Run], options: SlurmOptions, wait: bool) -> list[str]:
    """Submit the members not finished and not already queued or running as one job array; with `wait`, wait
    for them. The names of the members that failed (with `wait`) or are still queued or running (without)."""
    folder = sweep.out / "submitit"
    ex = executor(folder, options)
    known = job_ids(sweep)
    running = [r for r in runs if r.name in known and job_alive(folder, known[r.name], ex.cluster)]
    for run in running:
        print(f"[{run.name}] still queued or running as job {known[run.name]}", flush=True)
    todo = [r for r in runs if r not in running and not (sweep.root(r) / "version_0" / "metrics.json").is_file()]
    jobs = ex.map_array(Member(), [sweep] * len(todo), todo) if todo else []
    for run, job in zip(todo, jobs, strict=True):
        known[run.name] = job.job_id if ex.cluster == "slurm" else f"{socket.gethostname()}:{job.job_id}"
        print(f"[{run.name}] submitted as job {job.job_id}", flush=True)
    atomic_write(folder / "jobs.json", lambda p: p.write_text(json.dumps(known, indent=2)))
    if not wait:
        return [r.name for r in [*running, *todo]]
    failed = [r.name for r in running]
    for run, job in zip(todo, jobs, strict=True):
        try:
            ok = bool(job.result())
        except Exception as err:  # the job itself failed (killed, out of memory ...): its log says why
            print(f"[{run.name}] job {job.job_id} failed: {str(err).splitlines()[-1][:300]}", flush=True)
            ok = False
        if not ok:
            failed.append(run.name)
    return failed


def slurm_options(args: argparse.Namespace) -> SlurmOptions:
    """The job settings: `--slurm FILE`, then the flags, which win."""
    found = yaml.safe_load(args.slurm.read_text()) if args.slurm else {}
    if args.slurm and not isinstance(found, dict):
        raise ConfigError(f"--slurm {args.slurm}: expected a YAML mapping such as `partition: gpu`")
    known = {f.name for f in fields(SlurmOptions)} - {"extra", "cluster", "parallel"}
    options = SlurmOptions(**{k: v for k, v in found.items() if k in known})
    options.extra = {k: v for k, v in found.items() if k not in known}
    flags = {"partition": args.partition, "time_min": args.time_min, "cpus_per_job": args.cpus_per_job}
    flags |= {"mem_gb": args.mem_gb, "parallel": args.jobs if args.jobs > 1 else None}
    if args.gpus_per_job != 1 or "gpus_per_job" not in found:
        flags["gpus_per_job"] = args.gpus_per_job
    return replace(options, **{k: v for k, v in flags.items() if v is not None})


def launch(sweep: Sweep, runs: list[Run], launcher: Launcher, args: argparse.Namespace) -> list[str]:
    """The runs, where the command line says (`--launcher`, `--jobs` ...); the names not finished now."""
    if args.launcher == "submitit":
        return submit_members(sweep, runs, slurm_options(args), wait=not args.no_wait)
    return run_members(sweep, runs, launcher, args.jobs, args.gpus_per_job)
