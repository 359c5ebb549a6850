"""scripts/export.py: ONNX and torch.export from a checkpoint, parity with the eager model below 1e-4."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from lightning_modules.cli import cli_main
from tests.conftest import REPO


def test_export_parity_from_a_checkpoint(in_tmp: Path) -> None:
    cli_main(
        [
            "fit",
            "--config",
            "experiments/quickstart.yaml",
            "--model.image_size=32",
            "--trainer.max_epochs=1",
            "--trainer.limit_train_batches=2",
            "--trainer.limit_val_batches=1",
            "--trainer.enable_progress_bar=false",
            "--data.init_args.num_workers=0",
        ]
    )
    ckpt = next((in_tmp / "runs" / "quickstart" / "version_0" / "checkpoints").glob("best-*.ckpt"))
    sys.path.insert(0, str(REPO / "scripts"))
    try:
        from export import export
    finally:
        sys.path.pop(0)
    diffs = export(ckpt, in_tmp / "out")
    assert set(diffs) == {"onnx", "torch.export"}
    assert all(d < 1e-4 for d in diffs.values()), diffs  # the embedded EfficientNet-Lite0 and its head
    assert (in_tmp / "out" / "model.onnx").stat().st_size > 1_000_000
    assert (in_tmp / "out" / "model.pt2").is_file()


def test_export_missing_checkpoint_is_a_clear_error(in_tmp: Path) -> None:
    result = subprocess.run(
        [sys.executable, str(REPO / "scripts" / "export.py"), "nowhere.ckpt"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 2
    assert "checkpoint nowhere.ckpt does not exist" in result.stderr and "Traceback" not in result.stderr
