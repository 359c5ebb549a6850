"""Export a finetune-lab checkpoint to ONNX and to a `torch.export` program, and check both against the model.

    python scripts/export.py runs/quickstart/version_0/checkpoints/best-epoch07-acc0.9792.ckpt

Writes `<run>/export/model.onnx` and `<run>/export/model.pt2` (each written aside, then renamed) and prints the
largest absolute difference of each from the eager model's logits on one batch. Needs the `export` extra
(`pip install -e ".[export]"`: onnx, onnxscript, onnxruntime).
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import torch

from lightning_modules.errors import ConfigError
from lightning_modules.module import FineTuneModule


def load_model(ckpt: Path) -> FineTuneModule:
    """The model of a checkpoint, in eval mode, loaded with `weights_only=True` and no weight download."""
    if not ckpt.is_file():
        raise ConfigError(f"checkpoint {ckpt} does not exist")
    model = FineTuneModule.load_from_checkpoint(ckpt, map_location="cpu", weights_only=True, weights="none")
    return model.eval()


def export(ckpt: Path, out_dir: Path, batch_size: int = 4, seed: int = 0) -> dict[str, float]:
    """Write model.onnx and model.pt2 into `out_dir`; return the max |difference| from eager for each."""
    import numpy as np
    import onnxruntime as ort

    model = load_model(ckpt)
    size = model.backbone.data_config.input_size
    x = torch.rand(batch_size, *size, generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        eager = model(x).numpy()
    out_dir.mkdir(parents=True, exist_ok=True)
    batch = {"x": {0: torch.export.Dim("batch", min=1)}}

    onnx_path, tmp = out_dir / "model.onnx", out_dir / ".model.tmp.onnx"
    torch.onnx.export(
        model,
        (x,),
        str(tmp),
        dynamo=True,
        input_names=["images"],
        output_names=["logits"],
        dynamic_shapes=batch,
        external_data=False,
    )
    os.replace(tmp, onnx_path)
    session = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    onnx_out = session.run(None, {session.get_inputs()[0].name: x.numpy()})[0]

    program_path, tmp = out_dir / "model.pt2", out_dir / ".model.tmp.pt2"
    torch.export.save(torch.export.export(model, (x,), dynamic_shapes=batch), str(tmp))
    os.replace(tmp, program_path)
    with torch.no_grad():
        program_out = torch.export.load(str(program_path)).module()(x).numpy()
    return {
        "onnx": float(np.abs(onnx_out - eager).max()),
        "torch.export": float(np.abs(program_out - eager).max()),
    }


def main(argv: list[str] | None = None) -> int:
    """Command line: checkpoint in, files and parity out."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("checkpoint", type=Path)
    parser.add_argument("--out", type=Path, default=None, help="default: <run directory>/export")
    parser.add_argument("--batch-size", type=int, default=4)
    args = parser.parse_args(argv)
    out = args.out or args.checkpoint.resolve().parent.parent / "export"
    try:
        diffs = export(args.checkpoint, out, args.batch_size)
    except ConfigError as err:
        print(f"export: error: {err}", file=sys.stderr)
        return 2
    for name, diff in diffs.items():
        print(f"{name:>13}: max |difference| from eager = {diff:.3g}")
    print(f"written: {out / 'model.onnx'}, {out / 'model.pt2'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
