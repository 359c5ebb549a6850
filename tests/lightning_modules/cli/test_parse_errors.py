"""Config mistakes print one line naming the file or key (and the closest names), not a usage dump."""

from __future__ import annotations

from pathlib import Path

import pytest

from lightning_modules.cli.main import main

FILES = {
    "syntax.yaml": "trainer:\n  max_epochs: 3\n   bad: [\n",
    "unknown_key.yaml": "modle:\n  backbone: timm/efficientnet_lite0\n",
    "callback.yaml": "trainer:\n  callbacks:\n    - class_path: lightning.pytorch.callbacks.EarlyStoping\n",
    "optimizer.yaml": "model:\n  optimizer: {class_path: torch.optim.Adamm}\n",
}


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (["--config", "syntax.yaml"], "syntax.yaml, line 3, column 7: not valid YAML"),
        (["--config", "unknown_key.yaml"], "unknown key modle.backbone; close names: model.backbone"),
        (["--trainer.max_epochz=3"], "unknown key trainer.max_epochz; close names: trainer.max_epochs"),
        (["--trainer.max_epochs=abc"], "trainer.max_epochs: 'abc' is not valid; expected int or null"),
        (
            ["--config", "callback.yaml"],
            "trainer.callbacks: lightning.pytorch.callbacks.EarlyStoping does not exist; close names: "
            "lightning.pytorch.callbacks.EarlyStopping",
        ),
        (
            ["--config", "optimizer.yaml"],
            "model.optimizer: torch.optim.Adamm does not exist; close names: torch.optim.Adam",
        ),
        (
            ["--trainer.callbacks+=nowhere.Stop"],
            "trainer.callbacks: cannot import nowhere.Stop: no module named nowhere",
        ),
        (["--config", "missing.yaml"], "config file missing.yaml does not exist"),
        (["--model.optimizer=null", "--model.optimizer.init_args.lr=0.01"], "model.optimizer: init_args without"),
    ],
)
def test_a_config_mistake_is_one_line_naming_the_key_or_file(
    in_tmp: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], args: list[str], expected: str
) -> None:
    for name, text in FILES.items():
        (in_tmp / name).write_text(text)
    monkeypatch.setattr("sys.argv", ["ftlab", "fit", "--config", "experiments/quickstart.yaml", *args])
    with pytest.raises(SystemExit) as stop:
        main()
    assert stop.value.code == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) <= 3, err
    assert f"ftlab: error: {expected}" in err
