"""The test report's figures: the confusion matrix, image grids, first-layer kernels and feature maps (matplotlib
figures; writing them is the caller's)."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch


def denormalize(images: torch.Tensor, mean: tuple[float, ...], std: tuple[float, ...]) -> torch.Tensor:
    """Images back in [0, 1] from the backbone's normalisation; one channel repeated to three."""
    m = torch.tensor(mean).view(1, -1, 1, 1)
    s = torch.tensor(std).view(1, -1, 1, 1)
    out = (images.float().cpu() * s + m).clamp(0, 1)
    return out.expand(-1, 3, -1, -1) if out.shape[1] == 1 else out


def confusion_figure(matrix: np.ndarray, class_names: list[str]) -> Any:
    """Row-normalised confusion matrix with class names and the share in each cell."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = matrix.sum(1, keepdims=True)
    norm = np.divide(matrix, rows, out=np.zeros_like(matrix, dtype=float), where=rows > 0)
    size = max(4.0, 0.6 * len(class_names) + 2)
    fig, ax = plt.subplots(figsize=(size, size))
    ax.imshow(norm, cmap="Blues", vmin=0, vmax=1)
    ax.set_xticks(range(len(class_names)), class_names, rotation=45, ha="right")
    ax.set_yticks(range(len(class_names)), class_names)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    for i in range(len(class_names)):
        for j in range(len(class_names)):
            ax.text(
                j,
                i,
                f"{norm[i, j]:.2f}",
                ha="center",
                va="center",
                color="white" if norm[i, j] > 0.5 else "black",
                fontsize=8,
            )
    ax.set_title("confusion matrix (rows sum to 1)")
    fig.tight_layout()
    return fig


def grid_figure(samples: list[tuple[torch.Tensor, int, int, float, float]], class_names: list[str], title: str) -> Any:
    """A grid of images titled `true -> predicted (probability)`; a loss is shown when it is what ranks them."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cols = 4
    rows = max(1, (len(samples) + cols - 1) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(cols * 2.4, rows * 2.6), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for ax, (image, true, pred, prob, loss) in zip(axes.flat, samples, strict=False):
        ax.imshow(image.permute(1, 2, 0).numpy())
        color = "green" if true == pred else "red"
        ax.set_title(
            f"{class_names[true]} -> {class_names[pred]}\np={prob:.2f} loss={loss:.2f}", fontsize=8, color=color
        )
    fig.suptitle(title if samples else f"{title}: none")
    fig.tight_layout()
    return fig


def first_layer_figures(backbone: Any, image: torch.Tensor) -> dict[str, Any]:
    """The first convolution's kernels (as RGB tiles) and its feature maps for one image (the course figures)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

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
        fig, axes = plt.subplots(rows, cols, figsize=(cols * 1.2, rows * 1.3), squeeze=False)
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
