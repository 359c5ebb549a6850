"""The report's and the dashboard's figures: the confusion matrix, image grids, learning curves, precision-recall
curves, first-layer kernels and feature maps (matplotlib figures; writing them is the caller's)."""

from __future__ import annotations

from itertools import pairwise
from typing import Any

import numpy as np
import torch


def denormalize(images: torch.Tensor, mean: tuple[float, ...], std: tuple[float, ...]) -> torch.Tensor:
    """Images back in [0, 1] from the backbone's normalisation; one channel repeated to three."""
    m = torch.tensor(mean).view(1, -1, 1, 1)
    s = torch.tensor(std).view(1, -1, 1, 1)
    out = (images.float().cpu() * s + m).clamp(0, 1)
    return out.expand(-1, 3, -1, -1) if out.shape[1] == 1 else out


def new_figure(width: float, height: float) -> Any:
    """A matplotlib Figure of its own: not pyplot's, so no backend is switched (a notebook's stays inline) and
    nothing needs closing; matplotlib is imported when a figure is drawn, not before."""
    from matplotlib.figure import Figure

    return Figure(figsize=(width, height))


CELL_TEXT_CLASSES = 20  # the confusion matrix writes each cell's share up to this many classes (400 cells)


def confusion_figure(matrix: np.ndarray, class_names: list[str], title: str = "confusion matrix") -> Any:
    """Row-normalised confusion matrix with class names and, up to `CELL_TEXT_CLASSES` classes, the share in each
    cell (beyond, the text would be unreadable and cost seconds per figure)."""
    rows = matrix.sum(1, keepdims=True)
    norm = np.divide(matrix, rows, out=np.zeros_like(matrix, dtype=float), where=rows > 0)
    size = max(4.0, 0.6 * len(class_names) + 2)
    fig = new_figure(size, size)
    ax = fig.subplots()
    ax.imshow(norm, cmap="Blues", vmin=0, vmax=1)
    ax.set_xticks(range(len(class_names)), class_names, rotation=45, ha="right")
    ax.set_yticks(range(len(class_names)), class_names)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    shown = len(class_names) if len(class_names) <= CELL_TEXT_CLASSES else 0  # beyond: colours only
    for i in range(shown):
        for j in range(shown):
            ax.text(
                j,
                i,
                f"{norm[i, j]:.2f}",
                ha="center",
                va="center",
                color="white" if norm[i, j] > 0.5 else "black",
                fontsize=8,
            )
    ax.set_title(f"{title} (rows sum to 1)")
    fig.tight_layout()
    return fig


def tiles_figure(images: list[torch.Tensor], titles: list[str], colors: list[str], title: str, cols: int = 4) -> Any:
    """Images (3, H, W in [0, 1]) `cols` to a row, each with its title (in its color)."""
    rows = max(1, (len(images) + cols - 1) // cols)
    fig = new_figure(cols * 2.4, rows * 2.6)
    axes = fig.subplots(rows, cols, squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for ax, image, caption, color in zip(axes.flat, images, titles, colors, strict=False):
        ax.imshow(image.permute(1, 2, 0).numpy())
        ax.set_title(caption, fontsize=8, color=color)
    fig.suptitle(title if images else f"{title}: none")
    fig.tight_layout()
    return fig


def grid_figure(samples: list[tuple[torch.Tensor, int, int, float, float]], class_names: list[str], title: str) -> Any:
    """A grid of images titled `true -> predicted (probability)`; a loss is shown when it is what ranks them."""
    return tiles_figure(
        [image for image, *_ in samples],
        [f"{class_names[t]} -> {class_names[p]}\np={prob:.2f} loss={loss:.2f}" for _, t, p, prob, loss in samples],
        ["green" if t == p else "red" for _, t, p, _, _ in samples],
        title,
    )


def learning_curves_figure(history: list[dict[str, float]], title: str) -> Any:
    """Train and val loss (left) and accuracy (right) by epoch, the epochs at which more of the backbone began to
    train marked by dashed lines (`history`: one dict per epoch, `epoch`, `train_loss`, `val_loss`, `train_acc`,
    `val_acc`, `trainable`; a key absent when that number was not measured)."""
    fig = new_figure(10, 3.8)
    axes = fig.subplots(1, 2)
    for ax, metric in zip(axes, ("loss", "acc"), strict=True):
        for split, style in (("train", "-o"), ("val", "-s")):
            points = [(row["epoch"], row[f"{split}_{metric}"]) for row in history if f"{split}_{metric}" in row]
            if points:
                ax.plot(*zip(*points, strict=True), style, markersize=3, label=split)
        ax.set_xlabel("epoch")
        ax.set_ylabel(metric)
        ax.grid(alpha=0.3)
    counts = [(row["epoch"], row["trainable"]) for row in history if "trainable" in row]
    for (_, before), (epoch, after) in pairwise(counts):
        if after > before:
            for ax in axes:
                ax.axvline(epoch, color="gray", linestyle="--", linewidth=1)
            axes[1].annotate(f"{after:,.0f} trainable", (epoch, 0.02), xycoords=("data", "axes fraction"), fontsize=7)
    axes[0].legend()
    fig.suptitle(title)
    fig.tight_layout()
    return fig


def pr_curves_figure(curves: list[tuple[str, np.ndarray, np.ndarray]]) -> Any:
    """One precision-recall curve per class (one-vs-rest), each `(class, precision, recall)`."""
    fig = new_figure(5.5, 4.5)
    ax = fig.subplots()
    for name, precision, recall in curves:
        ax.plot(recall, precision, label=name)
    ax.set_xlabel("recall")
    ax.set_ylabel("precision")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1.02)
    ax.grid(alpha=0.3)
    if len(curves) <= 12:
        ax.legend(fontsize=7)
    ax.set_title("precision-recall per class (test)")
    fig.tight_layout()
    return fig


def first_layer_figures(backbone: Any, image: torch.Tensor) -> dict[str, Any]:
    """The first convolution's kernels (as RGB tiles) and its feature maps for one image (the course figures)."""
    conv = next((m for m in backbone.body.modules() if isinstance(m, torch.nn.Conv2d)), None)
    if conv is None:
        return {}
    weights = conv.weight.detach().float().cpu()[:32]
    kernels = (weights - weights.amin(dim=(1, 2, 3), keepdim=True)) / (
        weights.amax(dim=(1, 2, 3), keepdim=True) - weights.amin(dim=(1, 2, 3), keepdim=True) + 1e-8
    )
    with torch.no_grad():
        maps = conv(image.unsqueeze(0).to(conv.weight.device, conv.weight.dtype))[0, :16].float().cpu()
    figures = {}
    for name, tiles, title in (
        ("first_layer_kernels", kernels, f"first-layer kernels ({tuple(conv.weight.shape)})"),
        ("feature_maps", maps, "first-layer feature maps of one test image"),
    ):
        cols = 8
        rows = max(1, (len(tiles) + cols - 1) // cols)
        fig = new_figure(cols * 1.2, rows * 1.3)
        axes = fig.subplots(rows, cols, squeeze=False)
        for ax in axes.flat:
            ax.axis("off")
        for ax, tile in zip(axes.flat, tiles, strict=False):
            if tile.dim() == 3 and tile.shape[0] == 3:  # an RGB kernel
                ax.imshow(tile.permute(1, 2, 0).numpy())
            else:  # a feature map, or a kernel over other channel counts
                ax.imshow((tile.mean(0) if tile.dim() == 3 else tile).numpy(), cmap="viridis")
        fig.suptitle(title)
        fig.tight_layout()
        figures[name] = fig
    return figures
