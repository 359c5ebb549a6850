"""Export a finetune-lab checkpoint for use elsewhere: ONNX, a `torch.export` program and a timm folder.

    python scripts/export.py runs/quickstart/version_0/checkpoints/best-epoch07-acc0.9792.ckpt [--softmax]

Writes into `<run>/export/` (each file written aside, then renamed into place):

- `model.onnx`: input `images` (batch, C, H, W), normalised; output `logits`, or `probabilities` with
  `--softmax`. Its metadata (`onnxruntime`: `session.get_modelmeta().custom_metadata_map`) holds the class names
  and the preprocessing (`input_size`, `mean`, `std`, `interpolation`, `crop_pct`, `crop_mode`) as JSON strings.
- `model.pt2`: the same model as a `torch.export` program.
- `timm/`: for a timm backbone with a linear head, the model in timm's Hugging Face layout
  (`model.safetensors` + `config.json` with `label_names` and the preprocessing) and its model card (`README.md`:
  the Hub's metadata block, the test report of the run with its figures, the recipe, the preprocessing, how to load
  it; `--repo-id me/name` names it): `timm.create_model("local-dir:<run>/export/timm", pretrained=True)` loads it
  back, `model.backbone: timm/local-dir:...` fine-tunes it again, and `hf upload me/name <run>/export/timm .`
  publishes it for `timm.create_model("hf-hub:me/name", pretrained=True)`.

Prints the largest absolute difference of each from the eager model's output on one batch; while it works, a progress
line on stderr names the file being written and counts the files done of three (`--no-progress`: none). Uses
onnx, onnxscript and onnxruntime, installed with the package.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import shutil
import sys
from pathlib import Path
from typing import Any

import torch
from torch import nn

from datamodules.common import ConfigError, atomic_write, progress, say
from lightning_modules.module import FineTuneModule
from lightning_modules.reporting.checkpoint_io import load_module
from lightning_modules.reporting.model_card import FIGURES, model_card
from lightning_modules.speed.engines import write_onnx

STAGES = ("model.onnx", "model.pt2", "timm/")  # each written, read back and compared with the eager model


def load_model(ckpt: Path) -> FineTuneModule:
    """The model of a checkpoint, in eval mode, loaded with `weights_only=True` and no weight download; a ConfigError
    naming the file when it is missing, damaged or not a checkpoint."""
    return load_module(ckpt).eval()


def metadata(model: FineTuneModule, output: str) -> dict[str, str]:
    """What a user of the exported file needs besides the weights, as ONNX metadata (string values)."""
    config = model.backbone.data_config.to_dict()
    return {
        "class_names": json.dumps(list(model.class_names)),
        "output": output,
        "backbone": str(model.hparams["backbone"]),
        **{key: json.dumps(value) for key, value in config.items()},
    }


def export_onnx(model: nn.Module, x: torch.Tensor, path: Path, output: str, props: dict[str, str]) -> None:
    """ONNX (dynamo exporter, dynamic batch) with `props` as metadata, written aside then renamed."""
    import onnx

    def write(tmp: Path) -> None:
        write_onnx(model, x, tmp, output)
        proto = onnx.load(str(tmp))
        for key, value in props.items():
            proto.metadata_props.add(key=key, value=value)
        onnx.save(proto, str(tmp))

    atomic_write(path, write)


def timm_model(model: FineTuneModule) -> nn.Module:
    """The backbone with the trained head as its own timm classifier; a ConfigError when timm cannot hold it."""
    backbone = str(model.hparams["backbone"])
    linears = [m for m in model.head.modules() if isinstance(m, nn.Linear)]
    if not backbone.startswith("timm/") or len(linears) != 1:
        raise ConfigError(
            f"a timm folder needs a timm backbone with a linear head; this model is {backbone} with "
            f"{len(linears)} linear head layers (model.head_hidden): use model.onnx or model.pt2"
        )
    body: Any = copy.deepcopy(model.backbone.body).to(memory_format=torch.contiguous_format)  # safetensors
    body.reset_classifier(len(model.class_names))
    classifier = body.get_classifier()
    classifier.load_state_dict(linears[0].state_dict())
    return body.eval()


def export_timm(model: FineTuneModule, out_dir: Path, run: Path, repo_id: str) -> nn.Module:
    """The timm folder (`save_for_hf`, safetensors) with its model card (`README.md`, from run folder `run`, to be
    published as `repo_id`) and the report's figures, written aside then moved into place; returns the model."""
    from timm.models import save_for_hf

    body = timm_model(model)
    config = model.backbone.data_config.to_dict()
    tmp = out_dir.with_name(f".{out_dir.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    save_for_hf(
        body,
        str(tmp),
        model_config={"label_names": list(model.class_names)},
        safe_serialization=True,
        data_config={k: tuple(v) if isinstance(v, list) else v for k, v in config.items()},
    )
    card = model_card(
        run,
        str(model.hparams["backbone"]),
        str(model.hparams["weights"]),
        list(model.class_names),
        model.backbone.data_config,
        repo_id,
    )
    (tmp / "README.md").write_text(card)
    for figure in FIGURES:
        if (run / figure).is_file():
            shutil.copyfile(run / figure, tmp / figure)
    for written in tmp.iterdir():
        written.chmod(0o644)  # readable by others, as the Hub and a shared folder expect (save_for_hf writes 0600)
    old = out_dir.with_name(f".{out_dir.name}.old")
    if out_dir.exists():
        os.replace(out_dir, old)
    os.replace(tmp, out_dir)
    shutil.rmtree(old, ignore_errors=True)
    return body


def export(
    ckpt: Path,
    out_dir: Path,
    batch_size: int = 4,
    seed: int = 0,
    softmax: bool = False,
    shown: bool = True,
    repo_id: str | None = None,
) -> dict[str, float]:
    """Write model.onnx, model.pt2 and (timm backbones) timm/ with its model card into `out_dir`; the max
    |difference| from eager of each, read back from disk. `shown`: a progress line on stderr, the three files
    (`STAGES`) done and left. `repo_id`: the Hub name the card gives the model (default `<user>/<experiment>-<version>`
    for the user to replace)."""
    run = ckpt.resolve().parent.parent
    import numpy as np
    import onnxruntime as ort
    import timm

    model = load_model(ckpt)
    output = "probabilities" if softmax else "logits"
    exported: nn.Module = nn.Sequential(model, nn.Softmax(dim=1)).eval() if softmax else model
    size = model.backbone.data_config.input_size
    x = torch.rand(batch_size, *size, generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        eager = exported(x).numpy()
    out_dir.mkdir(parents=True, exist_ok=True)
    with progress("export", "file", len(STAGES), shown=shown) as bar:
        bar.set_postfix_str(STAGES[0])
        export_onnx(exported, x, out_dir / "model.onnx", output, metadata(model, output))
        session = ort.InferenceSession(str(out_dir / "model.onnx"), providers=["CPUExecutionProvider"])
        diffs = {"onnx": float(np.abs(session.run(None, {"images": x.numpy()})[0] - eager).max())}
        bar.update()
        bar.set_postfix_str(STAGES[1])

        program_path = out_dir / "model.pt2"
        batch = ({0: torch.export.Dim("batch", min=1)},)  # by position: a Sequential's argument is not named x
        program = torch.export.export(exported, (x,), dynamic_shapes=batch)
        atomic_write(program_path, lambda tmp: torch.export.save(program, str(tmp)))
        with torch.no_grad():
            diffs["torch.export"] = float(
                np.abs(torch.export.load(str(program_path)).module()(x).numpy() - eager).max()
            )
        bar.update()
        bar.set_postfix_str(STAGES[2])

        with torch.no_grad():
            try:
                export_timm(model, out_dir / "timm", run, repo_id or f"<user>/{run.parent.name}-{run.name}")
            except ConfigError as err:
                say(f"export: no timm folder: {err}", file=sys.stderr)
            else:
                loaded = timm.create_model(f"local-dir:{out_dir / 'timm'}", pretrained=True).eval()
                logits = loaded(x)
                out = logits.softmax(dim=1) if softmax else logits
                diffs["timm local-dir"] = float(np.abs(out.numpy() - eager).max())
        bar.update()
    return diffs


def main(argv: list[str] | None = None) -> int:
    """Command line: checkpoint in, files and parity out."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("checkpoint", type=Path)
    parser.add_argument("--out", type=Path, default=None, help="default: <run directory>/export")
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--softmax", action="store_true", help="end in softmax: output `probabilities`")
    parser.add_argument("--no-progress", action="store_true", help="no progress line (files done, left) on stderr")
    parser.add_argument("--repo-id", help="the Hub name the model card gives the model, e.g. me/cats-vs-dogs-lite0")
    args = parser.parse_args(argv)
    out = args.out or args.checkpoint.resolve().parent.parent / "export"
    try:
        diffs = export(
            args.checkpoint,
            out,
            args.batch_size,
            softmax=args.softmax,
            shown=not args.no_progress,
            repo_id=args.repo_id,
        )
    except ConfigError as err:
        print(f"export: error: {err}", file=sys.stderr)
        return 2
    for name, diff in diffs.items():
        print(f"{name:>13}: max |difference| from eager = {diff:.3g}")
    written = ["model.onnx", "model.pt2"] + (["timm/"] if "timm local-dir" in diffs else [])
    print(f"written into {out}: {', '.join(written)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
