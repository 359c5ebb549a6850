"""docs/python-api.ipynb, the Python API's session, run end to end through a real Jupyter kernel (nbclient) on tiny
data: the run folder holds the report, and three photos are predicted with class names."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.helpers import REPO
from tests.helpers.data import write_class_folders

NOTEBOOK = REPO / "docs" / "python-api.ipynb"


@pytest.mark.slow
def test_the_python_api_notebook_runs_in_a_kernel(tmp_path: Path) -> None:
    nbformat = pytest.importorskip("nbformat", reason="the dev extra installs nbformat, nbclient and ipykernel")
    from nbclient import NotebookClient

    write_class_folders(tmp_path / "pets", {"cat": 10, "dog": 10})
    notebook = nbformat.read(NOTEBOOK, as_version=4)
    (parameters,) = [c for c in notebook.cells if "parameters" in c.metadata.get("tags", [])]
    assert "DATA =" in parameters.source and "EPOCHS" in parameters.source
    parameters.source = "\n".join(  # papermill's way: the parameters cell replaced, every other cell as written
        [
            'DATA = "pets"',
            'BACKBONE, WEIGHTS, IMAGE_SIZE = "timm/test_resnet", "none", 32',
            'EPOCHS, WORKERS, RUNS = 2, 0, "runs"',
        ]
    )
    NotebookClient(
        notebook, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}}
    ).execute()

    run = tmp_path / "runs" / "notebook" / "version_0"
    for name in ("report.md", "metrics.json", "metrics.csv", "confusion_matrix.png", "hparams.yaml"):
        assert (run / name).is_file(), name
    assert len(list((run / "checkpoints").glob("best-*.ckpt"))) == 1 and list(run.glob("events.out.tfevents.*"))
    printed = "".join(o.get("text", "") for o in notebook.cells[-1].outputs if o.output_type == "stream")
    lines = printed.strip().splitlines()
    assert len(lines) == 3, printed
    for line in lines:
        label, probability, path = line.split()
        assert label in ("cat", "dog") and 0.5 <= float(probability) <= 1 and Path(tmp_path, path).is_file()
