"""One-time pre-resize of an image folder to the training size, so every epoch decodes small files.

Cats vs dogs photos are about 500x375 and a phone photo 4000x3000; at 224 px training most of the decode and
resize work is thrown away every epoch. This writes a copy of the folder (same layout, names and formats) whose
images have their shorter side at `--size` (never enlarged; EXIF orientation applied). JPEGs are decoded at
reduced scale where libjpeg can (PIL's draft mode), which is much faster than a full decode.

Files that cannot be read are copied unchanged, so the training run still lists them, with the reason, in its
`bad_images.csv`; hidden files and folders and non-images (Thumbs.db) are left out. Reruns skip files already
done, and each file is written aside and renamed, so an interrupted run can simply be started again. A progress
line on stderr counts the images done of all and the rate (`--no-progress`: none).

    .venv/bin/python scripts/preresize.py data/PetImages data/PetImages-256 --size 256
    ftlab fit --config experiments/cats_vs_dogs/resnet18.yaml --data.init_args.root data/PetImages-256

`--size` should be at least the size the eval transform resizes to: image_size / crop_pct (224 / 0.875 = 256
for ImageNet backbones).
"""

from __future__ import annotations

import argparse
from pathlib import Path

from datamodules.preresize import preresize


def main(argv: list[str] | None = None) -> None:
    """Command line."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("src", type=Path, help="folder of images (any layout)")
    parser.add_argument("dst", type=Path, help="where the resized copy goes")
    parser.add_argument("--size", type=int, default=256, help="shorter side in pixels (default 256)")
    parser.add_argument("--workers", type=int, default=None, help="processes (default: all cores)")
    parser.add_argument("--no-progress", action="store_true", help="no progress line (images done, rate) on stderr")
    args = parser.parse_args(argv)
    counts = preresize(args.src, args.dst, args.size, args.workers, shown=not args.no_progress)
    print(
        f"{counts['resized']} resized, {counts['copied']} unreadable copied as they are, "
        f"{counts['done']} already done -> {args.dst}"
    )


if __name__ == "__main__":
    main()
