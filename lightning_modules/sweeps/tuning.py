"""Hyperparameter search with Optuna (the `sweep` extra): TPE sampling over a YAML search space, a median pruner
fed every epoch by a Lightning callback inside each `ftlab` run, and a study in a journal file that survives kills
and is shared by every process working on it (`--jobs`, array jobs).

A search file (scripts/searches/*.yaml):

    base: experiments/mnist/mlp.yaml        # or a list, in --config order
    metric: val_acc                         # maximised: the best epoch's validation accuracy (test stays unseen)
    trials: 16                              # finished trials (complete or pruned) the study ends with
    seed: 0                                 # TPE's seed
    pruner: {startup_trials: 4, warmup_epochs: 2}   # median pruner: no pruning before these
    space:
      model.optimizer.init_args.lr: {low: 1.0e-4, high: 1.0e-2, log: true}   # float (log scale)
      model.head_dropout: {low: 0.0, high: 0.5}                              # float
      data.init_args.batch_size: {low: 32, high: 256, step: 32}              # int: low and high are ints
      model.head_hidden: [[], [64], [128]]                                   # categorical: any YAML values
      strategy:                                                              # a name without dots: YAML layers
        frozen: {trainer: {callbacks+: [{class_path: lightning_modules.Freeze}]}}
        full: {trainer: {callbacks+: [{class_path: lightning_modules.NoFreeze}]}}

Each trial is a sweep run (`<out>/runs/trial-<digest of its values>/`, fit then test, resumable), so the table,
the plot and `best.yaml` are the grid's. A trial whose process died (a kill, a preempted job) is asked again with
the same values when the study is next run on its host, and its fit resumes from `last.ckpt`; a finished trial is
never run again.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from datamodules.common import ConfigError, digest
from lightning_modules.reporting.callbacks import median_pruner, optuna_module
from lightning_modules.sweeps.plan import (
    Launcher,
    Run,
    Sweep,
    check_key,
    dotted,
    merge,
    owner,
    process_alive,
    run_one,
    subprocess_launcher,
    write_labels,
)
from lightning_modules.sweeps.summary import read_run

SEARCH_KEYS = {"base", "metric", "trials", "seed", "pruner", "space"}


@dataclass(frozen=True)
class Param:
    """One axis of the search space: a dotted config key (or a name of YAML layers) and how it is sampled."""

    name: str
    kind: str  # float, int, categorical, layers
    low: float = 0.0
    high: float = 0.0
    log: bool = False
    step: float | None = None
    choices: tuple[Any, ...] = ()
    layers: tuple[tuple[str, dict[str, Any]], ...] = ()

    def sample(self, trial: Any) -> tuple[Any, dict[str, Any]]:
        """The trial's value (what the table shows) and its config layer."""
        if self.kind == "float":
            value = trial.suggest_float(self.name, self.low, self.high, log=self.log, step=self.step)
        elif self.kind == "int":
            value = trial.suggest_int(self.name, int(self.low), int(self.high), log=self.log, step=int(self.step or 1))
        elif self.kind == "layers":
            label = trial.suggest_categorical(self.name, [label for label, _ in self.layers])
            return label, dict(self.layers)[label]
        elif all(c is None or isinstance(c, (bool, int, float, str)) for c in self.choices):
            value = trial.suggest_categorical(self.name, list(self.choices))
        else:  # Optuna stores scalars: other YAML values (lists) are sampled by their text
            labels = [json.dumps(c) for c in self.choices]
            value = json.loads(trial.suggest_categorical(self.name, labels))
        return value, dotted(self.name, value)


def parse_space(space: Any, where: str) -> list[Param]:
    """The `space` mapping of a search file as Params; ConfigErrors name the key."""
    if not isinstance(space, dict) or not space:
        raise ConfigError(f"{where}: `space` must map config keys to ranges, lists of values or YAML layers")
    params = []
    for name, spec in space.items():
        if "." not in name:
            if not isinstance(spec, dict) or not all(isinstance(v, dict) for v in spec.values()):
                raise ConfigError(f"{where}: space key {name!r} (no dots) must map labels to YAML layers")
            for layer in spec.values():
                for top in layer:
                    check_key(str(top))
            params.append(Param(name, "layers", layers=tuple(spec.items())))
            continue
        check_key(name)
        if isinstance(spec, list) and spec:
            params.append(Param(name, "categorical", choices=tuple(spec)))
        elif isinstance(spec, dict) and {"low", "high"} <= set(spec) and set(spec) <= {"low", "high", "log", "step"}:
            low, high = spec["low"], spec["high"]
            if not all(isinstance(v, (int, float)) for v in (low, high)) or not low < high:
                raise ConfigError(f"{where}: space key {name!r}: low and high must be numbers with low < high")
            whole = all(isinstance(v, int) and not isinstance(v, bool) for v in (low, high, spec.get("step", 1)))
            kind = "int" if whole else "float"
            params.append(Param(name, kind, float(low), float(high), bool(spec.get("log", False)), spec.get("step")))
        else:
            raise ConfigError(
                f"{where}: space key {name!r}: give a list of values, or {{low: ..., high: ..., log: true}}"
            )
    return params


@dataclass
class Search:
    """A search file, read."""

    base: list[str]
    params: list[Param]
    trials: int
    seed: int | None
    startup_trials: int
    warmup_epochs: int


def load_search(path: Path) -> Search:
    """Read and check a search file."""
    if not path.is_file():
        raise ConfigError(f"search file {path} does not exist")
    spec = yaml.safe_load(path.read_text())
    if not isinstance(spec, dict) or not {"base", "space"} <= set(spec):
        raise ConfigError(f"search file {path} needs `base: <experiment.yaml>` and `space: {{<key>: ...}}`")
    unknown = set(spec) - SEARCH_KEYS
    if unknown:
        raise ConfigError(f"search file {path}: unknown keys {sorted(unknown)}; expected {sorted(SEARCH_KEYS)}")
    if spec.get("metric", "val_acc") != "val_acc":
        raise ConfigError(
            f"search file {path}: metric {spec['metric']!r}: the search maximises val_acc (test stays unseen)"
        )
    pruner = spec.get("pruner") or {}
    if not isinstance(pruner, dict) or set(pruner) - {"startup_trials", "warmup_epochs"}:
        raise ConfigError(f"search file {path}: pruner takes startup_trials and warmup_epochs")
    base = [spec["base"]] if isinstance(spec["base"], str) else list(spec["base"])
    trials = spec.get("trials", 20)
    if not isinstance(trials, int) or trials < 1:
        raise ConfigError(f"search file {path}: trials must be a whole number >= 1, got {trials!r}")
    return Search(
        base,
        parse_space(spec["space"], f"search file {path}"),
        trials,
        spec.get("seed"),
        int(pruner.get("startup_trials", 4)),
        int(pruner.get("warmup_epochs", 2)),
    )


# ------------------------------------------------------------------------------------------ the study


def storage_path(out: Path) -> Path:
    """The study's journal file."""
    return out / "study.journal"


def open_study(out: Path, search: Search, worker: int = 0) -> Any:
    """The study in `<out>/study.journal`, created on first use (TPE, median pruner), as worker `worker` sees it:
    TPE's seed is the search's plus the worker's number (workers with one seed would sample the same values)."""
    optuna = optuna_module()
    from optuna.storages import JournalStorage
    from optuna.storages.journal import JournalFileBackend

    out.mkdir(parents=True, exist_ok=True)
    return optuna.create_study(
        study_name="search",
        storage=JournalStorage(JournalFileBackend(str(storage_path(out)))),
        direction="maximize",
        sampler=optuna.samplers.TPESampler(
            seed=None if search.seed is None else search.seed + worker,
            n_startup_trials=min(10, max(2, search.trials // 3)),
        ),
        pruner=median_pruner(search.startup_trials, search.warmup_epochs),
        load_if_exists=True,
    )


def trial_run(search: Search, trial: Any, out: Path) -> Run:
    """The sweep run of a trial: its sampled values (the table's labels), its config layer, and the pruning
    callback (run_only: not part of best.yaml)."""
    values: dict[str, Any] = {}
    config: dict[str, Any] = {}
    for param in search.params:
        value, layer = param.sample(trial)
        values[param.name.rsplit(".", 1)[-1] if "." in param.name else param.name] = value
        config = merge(config, layer)
    name = f"trial-{digest(sorted(trial.params.items()))[:10]}"
    pruning: dict[str, Any] = {"journal": str(storage_path(out).resolve()), "run": name}
    pruning |= {"startup_trials": search.startup_trials, "warmup_epochs": search.warmup_epochs}
    prune = {"class_path": "lightning_modules.PruneTrial", "init_args": pruning}
    return Run(name, values, config, run_only={"trainer": {"callbacks+": [prune]}})


def requeue_dead(study: Any, every: bool = False, owned_by: str | None = None) -> list[int]:
    """Trials left running by a process of this host that is gone (or `every` running trial, or those of
    `owned_by`): failed, and their values asked again, so their fits resume from `last.ckpt`."""
    optuna = optuna_module()
    found = []
    for trial in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.RUNNING,)):
        who = trial.user_attrs.get("owner", "")
        if every or who == owned_by or (owned_by is None and not process_alive(who)):
            study.tell(trial.number, state=optuna.trial.TrialState.FAIL)
            study.enqueue_trial(trial.params, user_attrs={"retry_of": trial.number})
            found.append(trial.number)
    return found


def finished(study: Any) -> int:
    """Trials complete or pruned."""
    optuna = optuna_module()
    states = (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED)
    return len(study.get_trials(deepcopy=False, states=states))


def work(sweep: Sweep, search: Search, launcher: Launcher, worker: int = 0, stop_after: int | None = None) -> int:
    """Ask, run and tell trials until the study has `search.trials` finished or running ones (or this worker has
    run `stop_after`); the number this worker ran. Safe to run in several processes on one journal (each with its
    own `worker` number)."""
    optuna = optuna_module()
    study = open_study(sweep.out, search, worker)
    ran = 0
    while stop_after is None or ran < stop_after:
        running = study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.RUNNING,))
        if finished(study) + len(running) >= search.trials:
            break
        trial = study.ask()
        trial.set_user_attr("owner", owner())
        run = trial_run(search, trial, sweep.out)
        trial.set_user_attr("run", run.name)
        twin = [
            t.number
            for t in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.RUNNING,))
            if t.user_attrs.get("run") == run.name and t.number < trial.number
        ]
        if twin:  # the same values are being run by another worker, in the same folder: leave them to it
            trial.set_user_attr("twin_of", twin[0])
            study.tell(trial, state=optuna.trial.TrialState.FAIL)
            continue
        ok = run_one(sweep, run, launcher)
        ran += 1
        row = read_run(sweep.root(run))
        if (sweep.root(run) / "pruned.json").is_file():
            study.tell(trial, state=optuna.trial.TrialState.PRUNED)
        elif ok and row is not None and row.get("val_acc") is not None:
            study.tell(trial, row["val_acc"])
        else:
            study.tell(trial, state=optuna.trial.TrialState.FAIL)
    return ran


def study_runs(sweep: Sweep, search: Search) -> tuple[list[Run], Run | None]:
    """The runs of the study's finished trials (with their state as a label), and the best complete one."""
    optuna = optuna_module()
    study = open_study(sweep.out, search)
    runs, best, seen = [], None, set()
    done = (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED)
    for trial in study.get_trials(deepcopy=False, states=done):
        fixed = optuna.trial.FixedTrial(trial.params, trial.number)
        run = trial_run(search, fixed, sweep.out)
        if run.name in seen:
            continue
        seen.add(run.name)
        run.params = {"trial": trial.number, "state": trial.state.name.lower(), **run.params}
        if sweep.root(run).is_dir():
            write_labels(sweep, run)  # the table shows each trial's number and how it ended
        runs.append(run)
        if trial.state == optuna.trial.TrialState.COMPLETE and (best is None or trial.value > best[0]):
            best = (trial.value, run)
    return runs, best[1] if best else None


class TuneWorker:
    """`work` as a submitit job (one of an array): asks and runs trials until the study has enough. Preempted or
    timed out, it hands its running trial back to the study and is requeued (submitit calls `checkpoint`)."""

    def __call__(self, sweep: Sweep, search: Search, worker: int) -> int:
        return work(sweep, search, subprocess_launcher, worker)

    def checkpoint(self, sweep: Sweep, search: Search, worker: int) -> Any:
        """Give back this process's running trial, then run again."""
        from submitit.helpers import DelayedSubmission

        requeue_dead(open_study(sweep.out, search), owned_by=owner())
        return DelayedSubmission(self, sweep, search, worker)
