"""`ftlab` starts with what the command uses: `ftlab fit --help` loads no heavy library it does not need
(docs/performance.md, "Start-up")."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.helpers import REPO

# Heavy libraries that `ftlab fit --help` does not use, and who imports them when they are needed (lazily, inside the
# function). Not counted: what `import lightning.pytorch` loads itself (matplotlib, scipy and torchvision, through
# torchmetrics). Loaded and needed: tensorboard, because jsonargparse reads the default logger's signature down to
# SummaryWriter.
NOT_NEEDED = {
    "timm": "backbones/sources/timm.py, resolving a backbone's preprocessing or building it",
    "huggingface_hub": "timm's, and reporting/model_card.py",
    "sklearn": "datamodules/splits.py, carving a split",
    "pandas": "sklearn's",
    "pyarrow": "pandas' and datasets'",
    "matplotlib": "reporting/figures.py, sweeps/summary.py, cli/lr_find.py",
    "torchcodec": "datamodules/images.py, decoding a JPEG",
    "datasets": "datamodules/hugging_face.py",
    "onnx": "speed/engines.py, an ONNX export",
    "onnxruntime": "speed/engines.py, inference_engine or feature_cache.engine onnxruntime",
    "onnxscript": "torch.onnx's dynamo exporter (speed/engines.py, scripts/export.py)",
    "optuna": "sweeps/tuning.py, reporting/callbacks.py (PruneTrial)",
    "submitit": "sweeps/launchers.py, a Slurm sweep",
}

# In one interpreter: `import lightning.pytorch`, then what the `ftlab` console script runs; prints the help and
# the top-level packages loaded beyond Lightning's own.
CHILD = """
import contextlib, io, json, sys
import lightning.pytorch
before = set(sys.modules)
from lightning_modules.cli.main import main
sys.argv = ["ftlab", "fit", "--help"]
shown, status = io.StringIO(), None
with contextlib.redirect_stdout(shown):
    try:
        main()
    except SystemExit as done:
        status = done.code
loaded = sorted({name.split(".")[0] for name in set(sys.modules) - before})
print(json.dumps({"status": status, "help": shown.getvalue(), "loaded": loaded}))
"""


@pytest.mark.slow
def test_fit_help_loads_no_heavy_library_it_does_not_use(tmp_path: Path) -> None:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    child = subprocess.run(
        [sys.executable, "-c", CHILD], cwd=tmp_path, env=env, capture_output=True, text=True, check=True
    )
    result = json.loads(child.stdout.splitlines()[-1])
    assert result["status"] == 0 and "--model.backbone" in result["help"], child.stderr[-3000:]
    loaded = result["loaded"]
    assert {"lightning_modules", "datamodules", "jsonargparse"} <= set(loaded), loaded  # the list is real
    heavy = [f"{name} (used by {NOT_NEEDED[name]})" for name in loaded if name in NOT_NEEDED]
    assert heavy == [], f"`ftlab fit --help` loads {'; '.join(heavy)}. All it loads beyond Lightning: {loaded}"
