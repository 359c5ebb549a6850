"""Hyperparameter search with Optuna: TPE over a YAML search space, median pruning every epoch, a study that
survives kills; the same table, plot and best.yaml as the grid. Needs the `sweep` extra.

    python scripts/tune.py scripts/searches/mnist_mlp.yaml                  # trials one after another
    python scripts/tune.py scripts/searches/mnist_mlp.yaml --jobs 4         # four trials at once on this machine
    python scripts/tune.py scripts/searches/mnist_mlp.yaml --launcher submitit --jobs 8 --partition gpu
    python scripts/tune.py scripts/searches/mnist_mlp.yaml --collect-only   # the table and best.yaml so far

The search file: see lightning_modules/sweeps/tuning.py. The study is `<out>/study.journal`: run the same command again
after a kill and it goes on (a trial cut short resumes from its last.ckpt; finished trials are not run again).
Writes `<out>/results.csv`, `results.md`, `results.png` and `best.yaml` (the best complete trial's values merged
into the base, ready for `ftlab fit --config <out>/best.yaml`).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path

from datamodules.common import ConfigError
from lightning_modules.sweeps.launchers import LocalLauncher, Slot, executor, in_slots, slurm_options
from lightning_modules.sweeps.plan import Launcher, Sweep, describe, overrides, subprocess_launcher, sweep_parser
from lightning_modules.sweeps.summary import collect, pick_best, write_results
from lightning_modules.sweeps.tuning import (
    Search,
    TuneWorker,
    finished,
    load_search,
    open_study,
    requeue_dead,
    study_runs,
    work,
)


def run(args: argparse.Namespace, search: Search, sweep: Sweep, launcher: Launcher) -> None:
    """The trials not run yet, where the command line says."""
    study = open_study(sweep.out, search)
    retried = requeue_dead(study, every=args.retry_running)
    if retried:
        print(f"Trials {retried} were left running by a process that is gone: asked again (their fits resume)")
    if args.launcher == "submitit":
        ex = executor(sweep.out / "submitit", slurm_options(args))
        workers = max(1, args.jobs)
        jobs = ex.map_array(TuneWorker(), [sweep] * workers, [search] * workers, list(range(workers)))
        print(f"Submitted {len(jobs)} workers: {', '.join(j.job_id for j in jobs)}", flush=True)
        if args.no_wait:
            return
        for job in jobs:
            job.result()
    elif args.jobs > 1:
        local = LocalLauncher() if launcher is subprocess_launcher else launcher
        if not isinstance(local, LocalLauncher):
            raise ConfigError("--jobs N runs trials as processes of this machine; this launcher runs them another way")

        def worker(number: int, slot: Slot) -> int:
            return work(sweep, search, local.at(slot), number)

        in_slots(range(args.jobs), args.jobs, args.gpus_per_job, worker)
    else:
        work(sweep, search, launcher)


def main(argv: Sequence[str] | None = None, launcher: Launcher = subprocess_launcher) -> int:
    """The command line; see the module docstring."""
    parser = sweep_parser(__doc__, "runs/tune/<search file name>")
    parser.add_argument("search", type=Path, help="the search YAML file")
    parser.add_argument("--trials", type=int, help="finished trials the study ends with (default: the file's)")
    parser.add_argument(
        "--retry-running",
        action="store_true",
        help="ask again every trial the study shows as running (after a cluster job died; no worker may be running)",
    )
    parser.set_defaults(out=None)
    try:
        args, rest = parser.parse_known_args(argv)
        if args.list or args.only or args.index is not None:
            raise ConfigError("--list, --only and --index are for grids; a search asks its trials as it goes")
        search = load_search(args.search)
        search = replace(search, trials=args.trials or search.trials)
        out = args.out or Path("runs") / "tune" / args.search.stem
        sweep = Sweep(out, [*search.base, *args.config], [], overrides(rest), best_by="val_acc")
        for base in sweep.base:
            if not Path(base).is_file():
                raise ConfigError(f"experiment config {base} does not exist")
        if not args.collect_only:
            run(args, search, sweep, launcher)
        sweep.runs, _ = study_runs(sweep, search)
        rows = collect(sweep)
        complete = [r for r in rows if r.get("state") == "complete"]
        note = "\n\n".join([describe(sweep), pick_best(sweep, complete) if complete else "No trial is complete yet."])
        title = f"{out.name}: {finished(open_study(out, search))} of {search.trials} trials finished"
        write_results(sweep, rows, title=title, note=note)
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(f"Results: {out / 'results.md'} ({title})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
