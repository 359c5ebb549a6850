"""Recipes proven on real data: each row of a plan (`scripts/results.yaml`) is one `ftlab fit` + `ftlab test` run
of an experiment on a real dataset, through the sweep machinery (resumable: a finished row is never rerun), and
the results table (`results.md`, `results.csv`) is rebuilt from the run folders alone.

    <out>/data/cifar10/                 the CIFAR-10 JPEG archive, extracted once
    <out>/runs/<row>/...                each row's run folder (see lightning_modules/sweeps/plan.py)
    <out>/results.md, results.csv       the table
"""

from __future__ import annotations

import argparse
import csv
import datetime
import io
import json
import shutil
import tarfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from datamodules.common import ConfigError, atomic_write, write_generated
from lightning_modules.backbones.backbone import resolve_data_config
from lightning_modules.console import machine
from lightning_modules.sweeps.plan import VERSION, Launcher, Run, Sweep, merge, overrides, run_one, subprocess_launcher
from lightning_modules.sweeps.summary import read_run

STAND_IN = {"backbone": "timm/tf_efficientnet_lite0", "weights": "embedded"}
# Quick mode: every row for one epoch of two batches at 32 px, no workers: checks the plan and the data, no figures.
QUICK = [
    "--trainer.max_epochs=1",
    "--trainer.limit_train_batches=2",
    "--trainer.limit_val_batches=2",
    "--trainer.limit_test_batches=2",
    "--model.image_size=32",
    "--data.init_args.num_workers=0",
]
COMMON = ["--trainer.enable_progress_bar=false"]


@dataclass
class Row:
    """One recipe on one dataset; see `scripts/results.yaml` for the keys."""

    name: str
    dataset: str
    recipe: list[str]
    overrides: dict[str, Any] = field(default_factory=dict)
    stand_in: bool = False
    notebook: str = ""
    goal: dict[str, float] = field(default_factory=dict)
    extended: bool = False


# ------------------------------------------------------------------------------------------ data sources


def _folder(data: Path, relative: str) -> Path:
    path = data / relative
    if not path.is_dir():
        raise ConfigError(f"{path} not found: DATA must hold {relative}/ (see ../shared/data/README.md)")
    return path


def _cifar10(data: Path, work: Path) -> Path:
    """`data/cifar10_train_jpeg.tar.gz` extracted into `work/cifar10` (once; a cut extraction starts over)."""
    target = work / "cifar10"
    if (target / "train").is_dir():
        return target
    archive = data / "cifar10_train_jpeg.tar.gz"
    if not archive.is_file():
        raise ConfigError(f"{archive} not found: DATA must hold the CIFAR-10 train split as JPEG (train/<class>/)")
    partial = work / ".cifar10.partial"
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir(parents=True)
    with tarfile.open(archive) as tar:
        tar.extractall(partial, filter="data")
    partial.rename(target)
    return target


def _layer(class_path: str, **init_args: Any) -> dict[str, Any]:
    return {"data": {"class_path": class_path, "init_args": init_args}}


SOURCES: dict[str, Callable[[Path, Path], dict[str, Any]]] = {
    "digits": lambda data, work: {},
    "mnist": lambda data, work: _layer("datamodules.MNISTDataModule", root=str(_folder(data, "mnist")), download=False),
    "cifar10": lambda data, work: _layer("datamodules.ImageFolderDataModule", root=str(_cifar10(data, work))),
    "cats_vs_dogs": lambda data, work: _layer(
        "datamodules.CatsVsDogsDataModule", root=str(_folder(data, "cats_vs_dogs/PetImages"))
    ),
    "cats_vs_dogs_folder": lambda data, work: _layer(
        "datamodules.ImageFolderDataModule", root=str(_folder(data, "cats_vs_dogs/PetImages"))
    ),
    "pet_expressions": lambda data, work: _layer(
        "datamodules.PetExpressionsDataModule", root=str(_folder(data, "pet_expressions")), download=False
    ),
    "pet_expressions_folder": lambda data, work: _layer(
        "datamodules.ImageFolderDataModule", root=str(_folder(data, "pet_expressions/Master Folder"))
    ),
}


# ------------------------------------------------------------------------------------------ the plan


def load_plan(path: Path) -> tuple[list[Row], dict[str, str]]:
    """The rows of a plan file and its `not_run` notes (recipe -> why it is not in the table)."""
    if not path.is_file():
        raise ConfigError(f"results plan {path} does not exist")
    spec = yaml.safe_load(path.read_text()) or {}
    rows = []
    for entry in spec.get("rows", []):
        unknown = set(entry) - set(Row.__dataclass_fields__)
        if unknown or "name" not in entry:
            raise ConfigError(f"{path}: row {entry.get('name', entry)} has unknown keys {sorted(unknown)}")
        if entry.get("dataset") not in SOURCES:
            raise ConfigError(f"{path}: row {entry['name']}: dataset must be one of {sorted(SOURCES)}")
        recipe = entry["recipe"]
        rows.append(Row(**{**entry, "recipe": [recipe] if isinstance(recipe, str) else list(recipe)}))
    return rows, dict(spec.get("not_run", {}))


def row_sweep(row: Row, data: Path, out: Path, common: dict[str, Any]) -> tuple[Sweep, Run]:
    """The one-run sweep of a row: its recipe, then the dataset's layer, the stand-in backbone and its overrides."""
    layer = SOURCES[row.dataset](data, out / "data")
    if row.stand_in:
        layer = merge(layer, {"model": dict(STAND_IN)})
    for key, value in row.overrides.items():
        layer = merge(layer, overrides([f"--{key}", yaml.safe_dump(value, default_flow_style=True).strip()]))
    params = {"dataset": row.dataset, "recipe": " + ".join(row.recipe)}
    run = Run(row.name, params, layer)
    return Sweep(out, row.recipe, [run], common), run


# ------------------------------------------------------------------------------------------ the table


def table_row(row: Row, sweep: Sweep, run: Run) -> dict[str, Any] | None:
    """A finished row's figures from its run folder (None while unfinished)."""
    root = sweep.root(run)
    figures = read_run(root)
    if figures is None:
        return None
    metrics = json.loads((root / VERSION / "metrics.json").read_text())
    config = yaml.safe_load((root / VERSION / "config.yaml").read_text())
    timing = json.loads((root / "timing.json").read_text()) if (root / "timing.json").is_file() else {}
    sizes = metrics.get("split_sizes") or {}
    model = config["model"]
    size = resolve_data_config(model["backbone"], model["weights"], model.get("image_size"), model.get("in_chans", 3))
    backbone = f"{model['backbone']} ({model['weights']}, {size.input_size[-1]} px)"
    if row.stand_in:
        own = _recipe_model(row.recipe)
        backbone += f", stand-in for {own.get('backbone')} ({own.get('weights')})"
    goal = ", ".join(_goal(key, value, figures, timing) for key, value in row.goal.items())
    return {
        "row": row.name,
        "dataset": row.dataset,
        "recipe": " + ".join(row.recipe) + "".join(f", {k.rsplit('.', 1)[-1]}={v}" for k, v in row.overrides.items()),
        "backbone": backbone,
        "train": sizes.get("train"),
        "val": sizes.get("val"),
        "test": sizes.get("test"),
        "val_acc": figures["val_acc"],
        "test_acc": figures["test_acc"],
        "epochs": figures["epochs"],
        "fit_s": timing.get("fit_s"),
        "notebook": row.notebook,
        "goal": goal,
    }


def _goal(key: str, value: float, figures: dict[str, Any], timing: dict[str, float]) -> str:
    """`val_acc >= 0.97: met`; `fit_min` is an upper bound on the fit's wall time in minutes."""
    if key == "fit_min":
        seconds = timing.get("fit_s")
        return f"fit <= {value} min: {'missed' if seconds is None or seconds > 60 * value else 'met'}"
    return f"{key} >= {value}: {'met' if (figures.get(key) or 0) >= value else 'missed'}"


def _recipe_model(recipe: Sequence[str]) -> dict[str, Any]:
    model: dict[str, Any] = {}
    for path in recipe:
        model = merge(model, (yaml.safe_load(Path(path).read_text()) or {}).get("model", {}))
    return model


def _minutes(seconds: float | None) -> str:
    return "" if seconds is None else f"{int(seconds // 60)} min {int(seconds % 60):02d} s"


def markdown(table: list[dict[str, Any]], missing: list[Row], not_run: dict[str, str], data: Path) -> str:
    """results.md: the machine, the table, the rows not finished and the recipes not run."""
    columns = ["dataset", "recipe", "backbone", "train / val / test images", "best val acc", "test acc", "goal"]
    head = "| " + " | ".join([*columns, "epochs", "fit time", "notebook"]) + " |"
    lines = [
        "# Recipes on real data",
        "",
        f"Written by `scripts/results.py --data {data}` on {datetime.date.today().isoformat()}; machine: {machine()}.",
        "Val is carved from the dev data's train split (the pet set: its own `valid`); test is the data's own test "
        "split where it has one (MNIST t10k), else a seeded stratified 20% carved from train before val. "
        "Nothing was tuned on test. Fit time is the wall time of `ftlab fit` (start-up, feature caching, every "
        "epoch), on a machine that may have been running other work.",
        "",
        head,
        "|" + "---|" * (len(columns) + 3),
    ]
    for r in table:
        sizes = " / ".join(f"{r[k]:,}" if r[k] is not None else "?" for k in ("train", "val", "test"))
        cells = [
            r["dataset"],
            f"`{r['recipe']}`",
            r["backbone"],
            sizes,
            f"{r['val_acc']:.4f}" if r["val_acc"] is not None else "",
            f"{r['test_acc']:.4f}",
            r["goal"],
            str(r["epochs"] or ""),
            _minutes(r["fit_s"]),
            r["notebook"],
        ]
        lines.append("| " + " | ".join(cells) + " |")
    if missing:
        lines += ["", "Not finished (not run yet, or cut; `--only <row>` runs one): "]
        lines[-1] += ", ".join(f"`{row.name}`" for row in missing) + "."
    if not_run:
        lines += ["", "Recipes not in this table:", ""]
        lines += [f"- `{recipe}`: {why}" for recipe, why in not_run.items()]
    return "\n".join(lines) + "\n"


def write_table(out: Path, table: list[dict[str, Any]], text: str, doc: Path | None) -> None:
    """results.md and results.csv in `out` (and at `doc`, above its hand-written part), each written atomically."""
    buffer = io.StringIO()
    if table:
        writer = csv.DictWriter(buffer, fieldnames=list(table[0]), lineterminator="\n")
        writer.writeheader()
        writer.writerows(table)
    atomic_write(out / "results.csv", lambda p: p.write_text(buffer.getvalue()))
    atomic_write(out / "results.md", lambda p: p.write_text(text))
    if doc:  # the page keeps its hand-written measurements
        write_generated(doc, text)
        atomic_write(doc.with_suffix(".csv"), lambda p: p.write_text(buffer.getvalue()))


# ------------------------------------------------------------------------------------------ the command line


def parser() -> argparse.ArgumentParser:
    """`scripts/results.py`'s options."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", type=Path, required=True, help="the real data folder (../shared/data)")
    p.add_argument("--plan", type=Path, default=Path("scripts/results.yaml"), help="the rows (scripts/results.yaml)")
    p.add_argument("--out", type=Path, default=Path("runs/results"), help="run folders and the table (runs/results)")
    p.add_argument("--doc", type=Path, help="also write the table here (docs/results.md) and its csv beside it")
    p.add_argument("--all", action="store_true", help="also the extended rows (the stand-in recipes; long)")
    p.add_argument("--only", nargs="+", help="only these rows")
    p.add_argument("--quick", action="store_true", help="smoke test: one epoch of two batches per row at 32 px")
    p.add_argument("--collect-only", action="store_true", help="rebuild the table from the run folders")
    return p


def main(argv: Sequence[str] | None = None, launcher: Launcher = subprocess_launcher) -> int:
    """Run the rows that are not finished, then write the table; 0 when every chosen row finished."""
    args = parser().parse_args(argv)
    try:
        rows, not_run = load_plan(args.plan)
        unknown = set(args.only or []) - {r.name for r in rows}
        if unknown:
            raise ConfigError(f"--only: no rows {sorted(unknown)} in {args.plan}; its rows: {[r.name for r in rows]}")
        chosen = [
            r for r in rows if (args.only and r.name in args.only) or (not args.only and (args.all or not r.extended))
        ]
        common = overrides(COMMON + (QUICK if args.quick else []))
        planned = [(row, *row_sweep(row, args.data, args.out, common)) for row in chosen]
        failed = []
        if not args.collect_only:
            failed = [row.name for row, sweep, run in planned if not run_one(sweep, run, launcher)]
    except ConfigError as err:
        print(f"error: {err}", flush=True)
        return 2
    table = [t for row, sweep, run in planned if (t := table_row(row, sweep, run)) is not None]
    missing = [row for row, sweep, run in planned if table_row(row, sweep, run) is None]
    write_table(args.out, table, markdown(table, missing, not_run, args.data), args.doc)
    print(f"Results: {args.out / 'results.md'} ({len(table)} of {len(planned)} rows finished)")
    if failed:
        print(f"Failed: {', '.join(failed)}")
    return 1 if missing else 0
