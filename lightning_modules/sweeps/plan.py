"""Sweeps: many `ftlab` runs of one experiment (backbones, a grid, folds, seeds), each its own process, resumable.

A sweep lives in one folder:

    <out>/runs/<run>/run.yaml        the run's own config layer: what differs, the common overrides, where it logs
    <out>/runs/<run>/params.json     the run's labels in the table (backbone, lr, fold, seed ...)
    <out>/runs/<run>/fit.log, test.log, fit.done
    <out>/runs/<run>/timing.json     wall seconds of each command (`fit_s`, `test_s`), summed over resumes
    <out>/runs/<run>/version_0/      the run itself: TensorBoard events, checkpoints, config.yaml, metrics.json
    <out>/results.csv, results.md, results.png (lightning_modules/sweeps/summary.py)

Each run is `ftlab fit --config <base>... --config run.yaml`, then `ftlab test ... --ckpt_path best`, as
subprocesses. A run whose `version_0/metrics.json` exists is finished and never run again; a fit that was cut
short (crashed, or interrupted by SIGTERM or SIGINT: exit status 143 or 130, never "done") resumes from its
`last.ckpt`. A sweep that gets SIGINT or SIGTERM itself passes it on to the running members and starts no other.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from datamodules.common import ConfigError, atomic_write, close_names, say
from lightning_modules.cli.stops import stopped_by
from lightning_modules.sweeps.interrupts import INTERRUPTS

Launcher = Callable[[list[str], Path], int]  # (ftlab arguments, log file) -> exit status
VERSION = "version_0"
TOP_LEVEL = ("model", "data", "trainer", "seed_everything", "early_stopping", "feature_cache", "lr_find", "ckpt_path")


@dataclass
class Run:
    """One run: its folder name, its labels in the table, and the config layer that makes it differ."""

    name: str
    params: dict[str, Any]
    config: dict[str, Any] = field(default_factory=dict)
    run_only: dict[str, Any] = field(default_factory=dict)  # what the run needs but best.yaml does not (a callback)


@dataclass
class Sweep:
    """Runs of the same base configs and common overrides, under `<out>/runs/<name>/`.

    Args:
        out: the sweep's folder.
        base: the experiment's YAML files, in `--config` order.
        runs: the runs, in table order.
        common: overrides every run gets (nested, as in YAML), e.g. from `--trainer.max_epochs 2`.
        summary: add mean and standard deviation rows (folds, seeds).
        best_by: the table column that picks the best run (grids).
    """

    out: Path
    base: list[str]
    runs: list[Run]
    common: dict[str, Any] = field(default_factory=dict)
    summary: bool = False
    best_by: str | None = None

    def root(self, run: Run) -> Path:
        """The folder of a run."""
        return self.out / "runs" / run.name

    def experiment(self, run: Run | None = None) -> dict[str, Any]:
        """The base configs merged with the common overrides and the run's own layer (None: what every run shares)."""
        config: dict[str, Any] = {}
        for base in self.base:
            config = merge(config, yaml.safe_load(Path(base).read_text()) or {})
        return merge(merge(config, self.common), run.config if run is not None else {})

    def shows_progress(self) -> bool:
        """Whether the sweep shows a progress line: unless what every run shares turns the progress bar off
        (`trainer.enable_progress_bar: false`)."""
        trainer = self.experiment().get("trainer")
        return not isinstance(trainer, dict) or trainer.get("enable_progress_bar") is not False

    def layer(self, run: Run) -> dict[str, Any]:
        """The run's `run.yaml`: common overrides, then the run's own, then its fixed log location."""
        logger = {"init_args": {"save_dir": str(self.out / "runs"), "name": run.name, "version": 0}}
        return merge(merge(merge(self.common, run.config), run.run_only), {"trainer": {"logger": logger}})


# ------------------------------------------------------------------------------------------ config layers


def merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    """Deep merge of two YAML trees: `over` wins; lists under `key+` (jsonargparse's append) are concatenated."""
    out = dict(base)
    for key, value in over.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = merge(out[key], value)
        elif key.endswith("+") and isinstance(value, list) and isinstance(out.get(key), list):
            out[key] = [*out[key], *value]
        else:
            out[key] = value
    return out


def check_key(key: str) -> None:
    """A dotted config key must start with a top-level key of `ftlab fit` (`model.`, `data.`, `trainer.` ...)."""
    head = key.split(".", 1)[0]
    if head not in TOP_LEVEL or not all(key.split(".")):
        hint = close_names(head, list(TOP_LEVEL))
        raise ConfigError(
            f"{key!r} is not an ftlab config key: it must start with one of {', '.join(TOP_LEVEL)}"
            + (f" (did you mean {hint[0]!r}?)" if hint else "")
        )


def dotted(key: str, value: Any) -> dict[str, Any]:
    """`model.optimizer.init_args.lr`, 0.01 -> {"model": {"optimizer": {"init_args": {"lr": 0.01}}}}."""
    check_key(key)
    tree: dict[str, Any] = {}
    node = tree
    *parents, leaf = key.split(".")
    for part in parents:
        node = node.setdefault(part, {})
    node[leaf] = value
    return tree


def overrides(args: Sequence[str]) -> dict[str, Any]:
    """`--key value` and `--key=value` command-line overrides as one nested YAML tree (values read as YAML)."""
    tree: dict[str, Any] = {}
    items = list(args)
    while items:
        arg = items.pop(0)
        if not arg.startswith("--") or arg == "--":
            raise ConfigError(f"unexpected argument {arg!r}: overrides are --<key> <value> or --<key>=<value>")
        key, eq, value = arg[2:].partition("=")
        if not eq:
            if not items or items[0].startswith("--"):
                raise ConfigError(f"override --{key} needs a value")
            value = items.pop(0)
        tree = merge(tree, dotted(key, yaml.safe_load(value)))
    return tree


def slug(text: str) -> str:
    """A folder name for a run: letters, digits, `.`, `-`, `_` and `=` only."""
    return re.sub(r"[^A-Za-z0-9._=-]+", "-", text).strip("-") or "run"


# ------------------------------------------------------------------------------------------ grids


def grid_runs(grid: dict[str, Any]) -> list[Run]:
    """The cartesian product of a grid: a dotted key maps to a list of values, any other name to a mapping of
    labels to YAML layers (`strategy: {frozen: {trainer: {callbacks+: [...]}}, ...}`)."""
    if not isinstance(grid, dict) or not grid:
        raise ConfigError("grid must be a mapping of config keys to lists of values")
    axes: list[list[tuple[str, Any, dict[str, Any]]]] = []
    shorts = [key.rsplit(".", 1)[-1] for key in grid]
    for (key, values), short in zip(grid.items(), shorts, strict=True):
        label = short if shorts.count(short) == 1 else key
        if isinstance(values, list) and values:
            axes.append([(label, v, dotted(key, v)) for v in values])
        elif isinstance(values, dict) and values and "." not in key:
            for name, layer in values.items():
                if not isinstance(layer, dict):
                    raise ConfigError(f"grid key {key!r}: {name!r} must map to a YAML layer such as {{model: ...}}")
                for top in layer:
                    check_key(str(top))
            axes.append([(label, name, layer) for name, layer in values.items()])
        else:
            raise ConfigError(
                f"grid key {key!r}: give a non-empty list of values for a dotted key (model.head_dropout: [0, 0.2]) "
                "or, for a name without dots, a mapping of labels to YAML layers"
            )
    runs = []
    for combo in itertools.product(*axes):
        config: dict[str, Any] = {}
        for _, _, layer in combo:
            config = merge(config, layer)
        name = slug("_".join(f"{label}={_short(value)}" for label, value, _ in combo))
        runs.append(Run(name, {label: value for label, value, _ in combo}, config))
    return runs


def _short(value: Any) -> str:
    """A value as it reads in a run name: lists joined by `-` (`[]` is `none`)."""
    return "-".join(map(str, value)) or "none" if isinstance(value, list) else str(value)


def load_grid(path: Path) -> tuple[list[str], list[Run], str]:
    """A grid file: `base` (an experiment YAML or a list), `grid` (see `grid_runs`), optional `metric`."""
    if not path.is_file():
        raise ConfigError(f"grid file {path} does not exist")
    spec = yaml.safe_load(path.read_text())
    if not isinstance(spec, dict) or "grid" not in spec or "base" not in spec:
        raise ConfigError(f"grid file {path} needs `base: <experiment.yaml>` and `grid: {{<key>: [values]}}`")
    unknown = set(spec) - {"base", "grid", "metric"}
    if unknown:
        raise ConfigError(f"grid file {path}: unknown keys {sorted(unknown)}; expected base, grid, metric")
    base = [spec["base"]] if isinstance(spec["base"], str) else list(spec["base"])
    return base, grid_runs(spec["grid"]), str(spec.get("metric", "val_acc"))


def write_best(path: Path, sweep: Sweep, run: Run, note: str) -> None:
    """A ready-to-run experiment: the base configs merged with the common overrides and the run's own layer."""
    text = f"# {note}\n# ftlab fit --config {path}\n" + yaml.safe_dump(sweep.experiment(run), sort_keys=False)
    atomic_write(path, lambda p: p.write_text(text))


# ------------------------------------------------------------------------------------------ running


def subprocess_launcher(args: list[str], log: Path, extra_env: Mapping[str, str] | None = None) -> int:
    """Run `ftlab <args>` as a child process with this checkout importable (and `extra_env`); its output goes to
    `log`."""
    repo = str(Path(__file__).resolve().parents[2])
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [repo, os.environ.get("PYTHONPATH")]))}
    env.update(extra_env or {})
    with log.open("a") as out:
        cmd = [sys.executable, "-m", "lightning_modules.cli.main", *args]
        return INTERRUPTS.run(cmd, stdout=out, stderr=subprocess.STDOUT, env=env)


def owner() -> str:
    """This process as `host:pid`: who runs a trial or a local job, for `process_alive`."""
    return f"{socket.gethostname()}:{os.getpid()}"


def process_alive(who: str) -> bool:
    """Whether the process `host:pid` (an `owner()`) still runs. A process of another host, or a pid that cannot be
    read or signalled, counts as alive: only its host can tell, and work that may still run is never started twice."""
    host, _, pid = who.rpartition(":")
    if host != socket.gethostname():
        return True
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return False
    except (PermissionError, ValueError):
        return True
    return True


def write_labels(sweep: Sweep, run: Run) -> None:
    """The run's labels in the table (`params.json`)."""
    text = json.dumps({"name": run.name, "params": run.params}, indent=2)
    atomic_write(sweep.root(run) / "params.json", lambda p: p.write_text(text))


def is_finished(sweep: Sweep, run: Run) -> bool:
    """A run is finished when its test report is written (atomically, so never half)."""
    return (sweep.root(run) / VERSION / "metrics.json").is_file()


def _last_lines(log: Path) -> str:
    lines = log.read_text(errors="replace").strip().splitlines() if log.is_file() else []
    return lines[-1] if lines else "(no output)"


def add_time(path: Path, key: str, seconds: float) -> None:
    """Add `seconds` to `key` of a run's timing file (a resumed fit adds its part to the interrupted one's)."""
    timing = json.loads(path.read_text()) if path.is_file() else {}
    timing[key] = round(timing.get(key, 0.0) + seconds, 1)
    path.write_text(json.dumps(timing, indent=2))


def run_one(sweep: Sweep, run: Run, launcher: Launcher = subprocess_launcher) -> bool:
    """Fit and test one run unless it is finished; True when it is finished now. A config `ftlab` rejects
    (exit status 2) raises ConfigError: every run of the sweep would fail the same way. A command interrupted by a
    signal (its own or the sweep's) leaves the run to the next run of the sweep: a fit resumes from `last.ckpt`."""
    root = sweep.root(run)
    layer = yaml.safe_dump(sweep.layer(run), sort_keys=False)
    written = root / "run.yaml"
    if written.is_file() and written.read_text() != layer:
        raise ConfigError(f"{root} was run with another config ({written}); use another --out or delete it")
    if is_finished(sweep, run):
        say(f"[{run.name}] finished before: skipped")
        return True
    root.mkdir(parents=True, exist_ok=True)
    written.write_text(layer)
    write_labels(sweep, run)
    configs = [arg for path in [*sweep.base, str(written)] for arg in ("--config", path)]
    steps = [("test", ["--ckpt_path", "best"])]
    if not (root / "fit.done").is_file():
        last = root / VERSION / "checkpoints" / "last.ckpt"
        if not last.is_file():
            shutil.rmtree(root / VERSION, ignore_errors=True)  # a fit that never finished an epoch: start over
        steps.insert(0, ("fit", ["--ckpt_path", "last"] if last.is_file() else []))
    for command, extra in steps:
        if INTERRUPTS.signum is not None:
            return False
        say(
            f"[{run.name}] ftlab {command}" + (" (resuming from last.ckpt)" if extra == ["--ckpt_path", "last"] else "")
        )
        log = root / f"{command}.log"
        started = time.perf_counter()
        status = launcher([command, *configs, *extra], log)
        add_time(root / "timing.json", f"{command}_s", time.perf_counter() - started)
        stopped = stopped_by(status)
        if stopped is not None:
            say(f"[{run.name}] ftlab {command} interrupted by {stopped}; the next run of this sweep {_goes_on(root)}")
            return False
        if status == 2:
            raise ConfigError(f"run {run.name}: ftlab {command} rejected the config ({log}): {_last_lines(log)}")
        if status != 0:
            say(f"[{run.name}] ftlab {command} failed with status {status}; see {log}: {_last_lines(log)}")
            return False
        if command == "fit":
            (root / "fit.done").touch()
    return is_finished(sweep, run)


def _goes_on(root: Path) -> str:
    """What the next run of the sweep does with an interrupted run (`root`)."""
    if (root / "fit.done").is_file():
        return "tests it"
    if (root / VERSION / "checkpoints" / "last.ckpt").is_file():
        return "resumes its fit from last.ckpt"
    return "starts its fit again"


# ------------------------------------------------------------------------------------------ the scripts' CLI


def describe(sweep: Sweep) -> str:
    """What every run shares (base configs, common overrides), when the run folders agree with this command."""
    made = [(sweep.root(run) / "run.yaml", sweep.layer(run)) for run in sweep.runs]
    if any(path.is_file() and yaml.safe_load(path.read_text()) != layer for path, layer in made):
        return "Some runs were made with other settings than this command's: see each `runs/<run>/run.yaml`."
    common = yaml.safe_dump(sweep.common, default_flow_style=True, width=1000).strip() if sweep.common else "none"
    return f"Base: {', '.join(f'`{b}`' for b in sweep.base) or 'defaults only'}; overrides for every run: `{common}`."


def sweep_parser(description: str | None, default_out: str) -> argparse.ArgumentParser:
    """The options every sweep script shares; any other `--key value` is an override for every run."""
    parser = argparse.ArgumentParser(
        description=description,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="Any other --<key> <value> (e.g. --trainer.max_epochs 2) is passed to every run.",
    )
    parser.add_argument("--config", action="append", default=[], help="the experiment's YAML (repeatable)")
    parser.add_argument("--out", type=Path, default=Path(default_out), help=f"the sweep's folder ({default_out})")
    parser.add_argument("--collect-only", action="store_true", help="rebuild the table and plot from the run folders")
    parser.add_argument("--list", action="store_true", help="print the runs (index and name) and exit")
    parser.add_argument("--only", help="run only the run of this name (one task of a job array)")
    parser.add_argument("--index", type=int, help="run only the run at this index, e.g. $SLURM_ARRAY_TASK_ID")
    where = parser.add_argument_group("where the runs go (docs/sweeps.md)")
    where.add_argument(
        "--jobs",
        type=int,
        default=1,
        help="runs at once (default 1); with --launcher submitit: jobs of the array at once (default: all)",
    )
    where.add_argument("--gpus-per-job", type=int, default=1, help="GPUs of each run (default 1)")
    where.add_argument(
        "--launcher",
        choices=("local", "submitit"),
        default="local",
        help="local: processes of this machine (default); submitit: one SLURM job per run, one array",
    )
    where.add_argument(
        "--no-wait",
        action="store_true",
        help="submitit: return once submitted; the same command "
        "later tables what has finished and resubmits what is neither finished nor queued",
    )
    where.add_argument(
        "--slurm",
        type=Path,
        help="a YAML file of job settings: partition, time_min, cpus_per_job, "
        "mem_gb, gpus_per_job, and any other submitit parameter (slurm_account: ...)",
    )
    where.add_argument("--partition", help="SLURM partition")
    where.add_argument("--time-min", type=int, help="SLURM time limit of each job, in minutes (default 240)")
    where.add_argument("--cpus-per-job", type=int, help="CPUs of each job")
    where.add_argument("--mem-gb", type=float, help="memory of each job, in GB")
    return parser


def select(sweep: Sweep, only: str | None, index: int | None) -> list[Run]:
    """The runs to run now: all, the one named `only`, or the one at `index`."""
    if index is not None:
        if not 0 <= index < len(sweep.runs):
            raise ConfigError(
                f"--index {index} is out of range: the sweep has {len(sweep.runs)} runs (0 to {len(sweep.runs) - 1})"
            )
        return [sweep.runs[index]]
    if only is not None:
        found = [r for r in sweep.runs if r.name == only]
        if not found:
            hint = close_names(only, [r.name for r in sweep.runs])
            raise ConfigError(
                f"--only {only!r} is not a run of this sweep" + (f"; did you mean {hint[0]!r}?" if hint else "")
            )
        return found
    return sweep.runs
