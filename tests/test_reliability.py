"""Reliability: kill and resume, a kill while a checkpoint is written, a NaN loss, safe loading, DDP.

One uninterrupted run is the baseline. A second run on the same data is killed four times in a chain (at two
epoch boundaries around an unfreeze, in the middle of the next epoch, and while a later checkpoint is being
written), each process resuming with `--ckpt_path last` from the checkpoint the one before it wrote; it must end
bit for bit on the baseline's weights, optimizer state and groups and EarlyStopping counters, and so must the
epoch redone after the mid-epoch kill. Killed runs are child processes (a SIGKILL needs a process of its own).
docs/reliability.md.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

from lightning_modules.cli import main as cli
from lightning_modules.cli.main import cli_main
from tests.helpers import REPO
from tests.helpers.runs import ftlab, inject

pytestmark = pytest.mark.slow  # every test shares one module fixture of six fits (the kill chain)

EXPERIMENT = """
trainer:
  max_epochs: 4
  limit_train_batches: 4
  limit_val_batches: 2
  log_every_n_steps: 1
  enable_progress_bar: false
  enable_model_summary: false
  callbacks+:
    - class_path: lightning_modules.FreezeUnfreeze
      init_args: {unfreeze_at_epoch: 1, stages: 2, lr_factor: 0.1}
model:
  backbone: timm/test_resnet
  weights: none
  image_size: 32
data:
  class_path: datamodules.DigitsDataModule
  # two persistent worker processes; random crops and flips, seeded per sample
  init_args: {batch_size: 16, num_workers: 2, augment: basic}
early_stopping: {patience: 10, min_delta: 0.5}  # no epoch after the first improves by 0.5: wait_count counts up
"""
MARK = "restarts from its first batch"


def _fit_args(name: str, *extra: str) -> list[str]:
    return ["fit", "--config", "exp.yaml", f"--trainer.logger.init_args.name={name}", *extra]


class _Collect(logging.Handler):
    """The messages of the `ftlab` logger (our notices)."""

    def __init__(self) -> None:
        super().__init__()
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


def _ckpt(path: Path) -> dict[str, Any]:
    return torch.load(path, map_location="cpu", weights_only=True)


def _loads(path: Path) -> bool:
    try:
        _ckpt(path)
    except Exception:  # any failure to read counts
        return False
    return True


def _early_stopping(ckpt: dict[str, Any]) -> dict[str, Any]:
    return next(v for k, v in ckpt["callbacks"].items() if k.startswith("EarlyStopping"))


def _states_equal(a: dict[str, Any], b: dict[str, Any]) -> None:
    """Bit for bit: every weight and buffer, and every tensor of the optimizer state (deterministic CPU)."""
    assert a["state_dict"].keys() == b["state_dict"].keys()
    for key, value in a["state_dict"].items():
        assert torch.equal(value, b["state_dict"][key]), key
    states = [c["optimizer_states"][0]["state"] for c in (a, b)]
    assert states[0].keys() == states[1].keys()
    for index, slots in states[0].items():
        for slot, value in slots.items():
            assert torch.equal(value, states[1][index][slot]), (index, slot)


CHAIN = ["--trainer.max_epochs=5"]


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    """The baseline run and a run killed four times, each process resuming from the checkpoint the one before it
    wrote, with what each stage left behind."""
    root = tmp_path_factory.mktemp("reliability")
    (root / "experiments").symlink_to(REPO / "experiments")
    (root / "exp.yaml").write_text(EXPERIMENT)
    out: dict[str, Any] = {"root": root}
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(root)
        ckpts = root / "runs" / "chain" / "version_0" / "checkpoints"
        resume = ["--ckpt_path", "last", *CHAIN]
        # process 1: killed at the start of epoch 2 (the unfreeze was at epoch 1)
        out["k1"] = ftlab(
            root, *_fit_args("chain", *CHAIN, *inject(root, "k1", "tests.helpers.faults.KillAt", epoch=2))
        )
        out["after_k1"] = _ckpt(ckpts / "last.ckpt")
        # process 2 resumes from process 1's epoch-1 checkpoint, writes epoch 2's, killed at the start of epoch 3
        out["k2"] = ftlab(
            root, *_fit_args("chain", *resume, *inject(root, "k2", "tests.helpers.faults.KillAt", epoch=3))
        )
        out["after_k2"] = _ckpt(ckpts / "last.ckpt")
        # process 3 resumes from process 2's checkpoint, killed before batch 2 of epoch 3
        kill_mid = inject(root, "k3", "tests.helpers.faults.KillAt", epoch=3, batch=2)
        out["k3"] = ftlab(root, *_fit_args("chain", *resume, *kill_mid))
        # process 4 resumes from process 2's checkpoint again, redoes epoch 3, writes its checkpoint, and is killed
        # halfway through writing epoch 4's last.ckpt
        kill_save = inject(root, "k4", "tests.helpers.faults.KillDuringSave", epoch=4, only="last")
        out["k4"] = ftlab(root, *_fit_args("chain", *resume, *kill_save))
        out["partials"] = [(p.name, p.stat().st_size, _loads(p)) for p in ckpts.glob(".*.partial")]
        out["last_size"] = (ckpts / "last.ckpt").stat().st_size
        out["after_k4"] = _ckpt(ckpts / "last.ckpt")
        loads: list[Any] = []
        real_load = torch.load

        def recording_load(*args: Any, **kwargs: Any) -> Any:
            loads.append(kwargs.get("weights_only"))
            return real_load(*args, **kwargs)

        mp.setattr(torch, "load", recording_load)
        notices = _Collect()
        logging.getLogger("ftlab").addHandler(notices)
        try:  # process 5 (this one) resumes from process 4's epoch-3 checkpoint and finishes
            cli_main(_fit_args("chain", *resume))
        finally:
            logging.getLogger("ftlab").removeHandler(notices)
        mp.setattr(torch, "load", real_load)
        out["final_warnings"] = notices.messages
        out["resume_loads"] = loads
        out["partials_at_end"] = [p.name for p in ckpts.glob(".*.partial")]
        every_epoch = root / "every_epoch.yaml"  # the baseline keeps each epoch's weights aside (4 steps an epoch)
        every_epoch.write_text(
            "trainer:\n  callbacks+:\n    - class_path: lightning.pytorch.callbacks.ModelCheckpoint\n"
            f"      init_args: {{dirpath: '{root / 'straight_epochs'}', filename: 'e{{epoch}}', save_top_k: -1, "
            "every_n_train_steps: 4}\n"
        )
        cli_main(_fit_args("straight", *CHAIN, "--config", str(every_epoch)))
    out["straight"] = root / "runs" / "straight" / "version_0" / "checkpoints"
    out["straight_epoch3"] = _ckpt(next((root / "straight_epochs").glob("e*epoch=3*.ckpt")))
    out["chain"] = ckpts
    yield out


def test_sigkill_at_epoch_boundaries_resumes_to_the_same_weights_and_early_stopping_counters(
    runs: dict[str, Any],
) -> None:
    assert runs["k1"].returncode == runs["k2"].returncode == -9  # SIGKILLs at the starts of epochs 2 and 3
    first, second = runs["after_k1"], runs["after_k2"]
    assert first["epoch"] == 1 and _early_stopping(first)["wait_count"] == 1  # counters were mid-flight
    # the resumed process wrote its own checkpoint (step 12: epochs 0-2), counting on from the first one's
    assert second["epoch"] == 2 and second["global_step"] == 12 and _early_stopping(second)["wait_count"] == 2
    assert MARK not in runs["k2"].stderr  # resuming after a kill at an epoch boundary redoes nothing
    straight, resumed = _ckpt(runs["straight"] / "last.ckpt"), _ckpt(runs["chain"] / "last.ckpt")
    assert resumed["epoch"] == straight["epoch"] == 4
    _states_equal(straight, resumed)  # after four kills and five processes
    assert _early_stopping(resumed) == _early_stopping(straight)
    assert _early_stopping(resumed)["wait_count"] == 4  # counted on across every kill, not reset
    groups = [[(g.get("name"), g["lr"]) for g in c["optimizer_states"][0]["param_groups"]] for c in (straight, resumed)]
    assert groups[0] == groups[1] and [n for n, _ in groups[0]] == ["head", "layer4", "layer3"]


def test_sigkill_mid_epoch_warns_and_the_redone_epoch_ends_bit_for_bit_on_the_baseline(runs: dict[str, Any]) -> None:
    assert runs["k3"].returncode == -9  # killed before batch 2 of epoch 3: global step 14, checkpoint at step 12
    warning = " ".join(runs["k4"].stderr.split())
    assert "saved at global step 12; the interrupted run had reached epoch 3, step 14. Epoch 3 " + MARK in warning
    # the process that redid epoch 3 wrote its checkpoint before it was killed: the baseline's epoch 3 exactly
    assert runs["after_k4"]["epoch"] == 3 and runs["after_k4"]["global_step"] == 16
    _states_equal(runs["straight_epoch3"], runs["after_k4"])


def test_sigkill_while_writing_a_checkpoint_leaves_the_previous_one_loadable(runs: dict[str, Any]) -> None:
    assert runs["k4"].returncode == -9
    # the cut write: half a file under the atomic writer's name, beside last.ckpt, never over it
    assert [name for name, _, _ in runs["partials"]] == [".last.ckpt.partial"]
    _, size, loads = runs["partials"][0]
    assert 0 < size < runs["last_size"] and not loads  # half a zip archive
    assert runs["after_k4"]["epoch"] == 3  # the previous last.ckpt, whole (compared bit for bit above)
    # the next process resumed from that checkpoint (step 16), not from the half-written one, and redid epoch 4
    assert any("saved at global step 16" in w and "had reached epoch 4, step 20" in w for w in runs["final_warnings"])
    assert runs["partials_at_end"] == []  # its own write of last.ckpt replaced the partial file


def _primitive(value: Any) -> bool:
    if isinstance(value, dict):
        return all(isinstance(k, str) and _primitive(v) for k, v in value.items())
    if isinstance(value, list | tuple):
        return all(_primitive(v) for v in value)
    return value is None or isinstance(value, bool | int | float | str)


def test_checkpoints_load_with_weights_only_and_hyperparameters_are_primitive(runs: dict[str, Any]) -> None:
    files = sorted(runs["straight"].glob("*.ckpt"))
    assert len(files) == 2  # best and last
    for path in files:
        ckpt = _ckpt(path)  # raises on any pickled object that is not a tensor or a primitive
        assert _primitive(ckpt["hyper_parameters"]) and _primitive(ckpt["datamodule_hyper_parameters"])
    assert runs["resume_loads"] and all(w is True for w in runs["resume_loads"])  # the resume itself
    sources = [*(REPO / "lightning_modules").glob("*.py"), *(REPO / "datamodules").glob("*.py")]
    assert not [p.name for p in sources if "weights_only=False" in p.read_text()]


def test_nan_loss_stops_with_epoch_and_step_and_the_last_good_checkpoint_is_intact(
    runs: dict[str, Any], monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    root = runs["root"]
    monkeypatch.chdir(root)
    poison = inject(root, "nan", "tests.helpers.faults.PoisonBatch", step=6)  # epoch 1, batch 2
    monkeypatch.setattr("sys.argv", ["ftlab", *_fit_args("nan", *poison)])
    with pytest.raises(SystemExit) as exit_info:
        cli.main()
    assert exit_info.value.code == 1
    err = capsys.readouterr().err
    assert "Traceback" not in err
    assert "ftlab: error: training loss became nan at epoch 1, step 6 (batch 2 of the epoch)" in err
    named = Path(err.split("Last good checkpoint: ")[1].split()[0])
    assert named.parent == Path("runs/nan/version_0/checkpoints")
    ckpt = _ckpt(named)
    assert ckpt["epoch"] == 0 and ckpt["global_step"] == 4  # nothing written after the NaN
    assert all(torch.isfinite(v).all() for v in ckpt["state_dict"].values() if v.is_floating_point())
    assert [_ckpt(p)["epoch"] for p in named.parent.glob("*.ckpt")] == [0, 0]


# Loader workers stay off under DDP here: on CPython 3.11 a fork can deadlock in PyOS_AfterFork_Child when another
# thread of the process (gloo's, a loader's queue feeder) is ending at that moment; seen once in a full suite run
# (2026-12-02, gdb: _PyThreadState_DeleteExcept). These tests are about DDP's arithmetic, not about workers.
DDP = ["--trainer.strategy=ddp", "--trainer.devices=2", "--trainer.accelerator=cpu", "--data.init_args.num_workers=0"]


@pytest.mark.ddp
@pytest.mark.skipif(not torch.distributed.is_available(), reason="torch built without distributed")
def test_ddp_two_processes_agree_with_one_and_the_checkpoint_resumes_on_one(
    runs: dict[str, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    import json

    root = runs["root"]
    # Same global batches: DistributedSampler and EpochShuffle draw the same permutation from (seed, epoch), and
    # rank r takes every other index, so two processes x 16 see exactly one process's batches of 32. No random
    # augmentation and BatchNorm frozen (train_bn: false): the only difference left is float summation order.
    config = EXPERIMENT.replace("augment: basic", "augment: none").replace("0.1}", "0.1, train_bn: false}")
    (root / "same.yaml").write_text(config)
    dump = inject(root, "dump", "tests.helpers.faults.DumpState", path="ddp")
    ddp = ftlab(root, "fit", "--config=same.yaml", "--trainer.logger.init_args.name=ddp", *DDP, *dump)
    assert ddp.returncode == 0, ddp.stderr[-3000:]
    assert "unused" not in ddp.stderr.lower()
    rank0, rank1 = (json.loads((root / f"ddp.rank{r}.json").read_text()) for r in (0, 1))
    replicas = [torch.load(root / f"ddp.rank{r}.pt", weights_only=True) for r in (0, 1)]
    assert replicas[0].keys() == replicas[1].keys()
    for key, value in replicas[0].items():  # replicas never drifted apart: every weight and buffer, bit for bit
        assert torch.equal(value, replicas[1][key]), key
    assert rank0["groups"] == rank1["groups"] and rank0["trainable"] == rank1["trainable"]
    # epoch 0 (frozen) trained on cached features, epoch 1 (unfrozen) on images, from the same loaders: in both,
    # each process read its own part of the samples (the DistributedSampler Lightning gave the loader)
    for epoch, kind, other in (("0", "features", "images"), ("1", "images", "features")):
        parts = [set(rank["seen"][epoch][kind]) for rank in (rank0, rank1)]
        assert parts[0] and parts[1] and not parts[0] & parts[1], epoch
        assert rank0["seen"][epoch][other] == rank1["seen"][epoch][other] == [], epoch
    assert [g[0] for g in rank0["groups"]] == ["head", "layer4", "layer3"]
    monkeypatch.chdir(root)
    cli_main(["fit", "--config=same.yaml", "--trainer.logger.init_args.name=one", "--data.init_args.batch_size=32"])
    one = _ckpt(root / "runs" / "one" / "version_0" / "checkpoints" / "last.ckpt")["state_dict"]
    two = _ckpt(root / "runs" / "ddp" / "version_0" / "checkpoints" / "last.ckpt")["state_dict"]
    gap = max(float((one[k].double() - two[k].double()).abs().max()) for k in one if one[k].is_floating_point())
    scale = max(float(v.double().abs().max()) for v in one.values() if v.is_floating_point())
    print(
        f"DDP vs one process after 4 epochs (16 AdamW steps): max weight difference {gap:.3g} (max weight {scale:.3g})"
    )
    assert gap <= 1e-6  # stated tolerance: 1e-6 absolute on every weight (measured: 1.5e-8)

    # the DDP checkpoint resumes on one process: one more epoch, same groups, same run directory
    cli_main(
        [
            "fit",
            "--config=same.yaml",
            "--trainer.logger.init_args.name=ddp",
            "--ckpt_path=last",
            *dump,
            "--trainer.max_epochs=5",
        ]
    )
    solo = json.loads((root / "ddp.rank0.json").read_text())
    assert solo["epoch"] == 5 and solo["groups"] == rank0["groups"]
    assert _ckpt(root / "runs" / "ddp" / "version_0" / "checkpoints" / "last.ckpt")["epoch"] == 4

    # the test report gathers both processes' predictions (no hang in its collectives), on a test split of 363
    # digits: the sampler repeats one to give each process 182, and the report counts each digit once
    odd = "--data.init_args.test_fraction=0.202"
    tested = ftlab(
        root, "test", "--config", "same.yaml", "--trainer.logger.init_args.name=ddp", *DDP, "--ckpt_path=last", odd
    )
    assert tested.returncode == 0, tested.stderr[-3000:]
    report = json.loads((root / "runs" / "ddp" / "version_0" / "metrics.json").read_text())
    cli_main(["test", "--config=same.yaml", "--trainer.logger.init_args.name=ddp", "--ckpt_path=last", odd])
    alone = json.loads((root / "runs" / "ddp" / "version_0" / "metrics.json").read_text())  # the same, on one
    assert alone["samples"] == report["samples"] == 363  # not 364
    assert report["cam_seconds"] > 0  # both processes' CAM candidates gathered, rank zero drew the grid
    assert report["confusion_matrix"] == alone["confusion_matrix"]  # the same digits, each once


@pytest.mark.ddp
@pytest.mark.skipif(not torch.distributed.is_available(), reason="torch built without distributed")
def test_ddp_a_nan_loss_on_one_process_stops_both_with_the_last_good_checkpoint(runs: dict[str, Any]) -> None:
    root = runs["root"]
    (root / "nan_ddp.yaml").write_text(EXPERIMENT.replace("augment: basic", "augment: none"))
    poison = inject(root, "nan_rank1", "tests.helpers.faults.PoisonBatch", step=6, rank=1)  # epoch 1, batch 2; rank 1
    stopped = ftlab(root, "fit", "--config=nan_ddp.yaml", "--trainer.logger.init_args.name=nan_ddp", *DDP, *poison)
    assert stopped.returncode == 1, stopped.stderr[-3000:]  # both processes ended (no hang in a collective)
    err = " ".join(stopped.stderr.split())
    assert "Traceback" not in err
    assert "ftlab: error: training loss became non-finite on another process at epoch 1, step 6 (batch 2" in err
    checkpoints = root / "runs" / "nan_ddp" / "version_0" / "checkpoints"
    assert [(c["epoch"], c["global_step"]) for c in map(_ckpt, checkpoints.glob("*.ckpt"))] == [(0, 4), (0, 4)]
