"""The model card of an exported timm folder (`README.md` in the Hugging Face Hub's format), from the run that trained
it: the metadata block (library, tags, dataset, metrics), what the model is, the test report, the recipe, the
preprocessing and how to load it. `hf upload <user>/<name> <folder>` publishes a usable model."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import yaml

from datamodules.common import DataConfig

FIGURES = ("confusion_matrix.png", "pr_curves.png", "learning_curves.png")  # copied beside the card when present


def hub_dataset(config: dict[str, Any]) -> str | None:
    """The Hub id of the run's dataset, when it came from the Hub (a HuggingFaceDataModule's `path` that is not a
    folder on this machine; CatsVsDogsDataModule without a `root`); None for local data."""
    data = config.get("data") or {}
    args = data.get("init_args") or {}
    class_path = str(data.get("class_path", ""))
    if class_path.endswith("CatsVsDogsDataModule"):
        return "microsoft/cats_vs_dogs" if not args.get("root") else None
    path = args.get("path")
    if class_path.endswith("HuggingFaceDataModule") and path and not Path(path).expanduser().exists():
        return str(path)
    return None


def model_card(run: Path, backbone: str, weights: str, class_names: list[str], data: DataConfig, repo_id: str) -> str:
    """The card's markdown for the model of run folder `run` (its `config.yaml`, `metrics.json` and `recipe.md` when
    the run has them), to be published as `repo_id`."""
    from huggingface_hub import EvalResult, ModelCardData

    config = yaml.safe_load((run / "config.yaml").read_text()) if (run / "config.yaml").is_file() else {}
    report = json.loads((run / "metrics.json").read_text()) if (run / "metrics.json").is_file() else None
    dataset = hub_dataset(config)
    spec = config.get("data") or {}
    args = spec.get("init_args") or {}
    local = args.get("path") or args.get("root") or str(spec.get("class_path", "unknown")).rsplit(".", 1)[-1]
    dataset_name = dataset or f"{Path(local).name} (local data)"
    results = []
    if report is not None:
        results = [
            EvalResult(
                task_type="image-classification",
                dataset_type=dataset or "imagefolder",
                dataset_name=dataset_name,
                dataset_split="test",
                metric_type=hub_type,
                metric_value=round(float(report[key]), 4),
                metric_name=name,
            )
            for key, hub_type, name in (
                ("acc", "accuracy", "Accuracy"),
                ("f1", "f1", "Macro F1"),
                ("auroc", "roc_auc", "Macro AUROC"),
            )
        ]
    card = ModelCardData(
        library_name="timm",
        pipeline_tag="image-classification",
        tags=["image-classification", "timm", "finetune-lab", "transfer-learning"],
        datasets=[dataset] if dataset else None,
        model_name=repo_id,
        eval_results=results or None,
    )
    lines = [
        "---",
        card.to_yaml(),
        "---",
        "",
        f"# {repo_id}",
        "",
        f"An image classifier for {len(class_names)} classes ({', '.join(class_names[:20])}"
        f"{' ...' if len(class_names) > 20 else ''}), fine-tuned by finetune-lab from the `{backbone}` backbone "
        f"({weights} weights) on {dataset_name}.",
        "",
    ]
    if report is not None:
        lines += [
            f"## Test results ({report['samples']} images of the test split)",
            "",
            "| metric | value |",
            "|---|---|",
            *[f"| {key} | {float(report[key]):.4f} |" for key in ("acc", "precision", "recall", "f1", "auroc")],
            "",
            "| class | precision | recall | f1 | support |",
            "|---|---|---|---|---|",
            *[
                f"| {name} | {c['precision']:.4f} | {c['recall']:.4f} | {c['f1']:.4f} | {c['support']} |"
                for name, c in report["per_class"].items()
            ],
            "",
            *[f"![{name[:-4].replace('_', ' ')}]({name})" for name in FIGURES if (run / name).is_file()],
            "",
        ]
    else:
        lines += ["## Test results", "", "Not tested: run `ftlab test ... --ckpt_path best` before exporting.", ""]
    if (run / "recipe.md").is_file():
        lines += ["## Recipe", "", (run / "recipe.md").read_text().strip(), ""]
    if config:
        lines += ["<details><summary>The full config (ftlab fit)</summary>", "", "```yaml"]
        lines += [yaml.safe_dump(config, sort_keys=False).rstrip(), "```", "", "</details>", ""]
    size = "x".join(str(s) for s in data.input_size)
    lines += [
        "## Preprocessing",
        "",
        f"Input {size} (channels x height x width), RGB; resized with {data.interpolation} interpolation, "
        f"crop_pct {data.crop_pct}, crop mode {data.crop_mode}; normalised with mean {list(data.mean)} and std "
        f"{list(data.std)}. `config.json` holds the same: `timm.data.resolve_data_config` reads it, as below.",
        "",
        "## How to use",
        "",
        "```python",
        "import timm",
        "import torch",
        "from PIL import Image",
        "",
        f'model = timm.create_model("hf-hub:{repo_id}", pretrained=True).eval()  # or "local-dir:<this folder>"',
        "transform = timm.data.create_transform(**timm.data.resolve_data_config({}, model=model))",
        "with torch.inference_mode():",
        '    probs = model(transform(Image.open("photo.jpg").convert("RGB")).unsqueeze(0)).softmax(-1)',
        'print(model.pretrained_cfg["label_names"][int(probs.argmax())], float(probs.max()))',
        "```",
        "",
        f"Published with `hf upload {repo_id} <this folder> .`; fine-tune it further with finetune-lab:",
        f"`ftlab fit ... --model.backbone timm/hf-hub:{repo_id}` (or `timm/local-dir:<this folder>`).",
        "",
    ]
    return "\n".join(lines)
