"""Figures: a panel per image (image, heatmap, overlay per explained class) and gallery grids.

Matplotlib's object API on the Agg canvas (no pyplot state, no display needed); every PNG is written
atomically. Each map is scaled to its own maximum for display: colours show where a map looks,
not how strongly compared with another map.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from matplotlib import colormaps
from matplotlib.figure import Figure
from torch import Tensor

from cnnbench.common import atomic_write

OVERLAY_ALPHA = 0.5
CMAP = "jet"


@dataclass
class MapView:
    """One map to show: a title (e.g. "pred: cat (0.93)") and the [R, R] map on the resized image."""

    title: str
    cam: Tensor


def image_hwc(image: Tensor) -> np.ndarray:
    """uint8 [3, H, W] tensor -> uint8 [H, W, 3] array."""
    return image.permute(1, 2, 0).contiguous().numpy()


def heatmap_rgb(cam: Tensor) -> np.ndarray:
    """[H, W] map -> float RGB [H, W, 3] in 0..1 through the colour map, scaled to its own maximum."""
    values = cam.detach().double().numpy()
    top = values.max()
    scaled = values / top if top > 0 else np.zeros_like(values)
    return colormaps[CMAP](scaled)[..., :3]


def overlay(image: Tensor, cam: Tensor) -> np.ndarray:
    """The image blended with the heatmap, float RGB [H, W, 3]."""
    return (1 - OVERLAY_ALPHA) * image_hwc(image) / 255.0 + OVERLAY_ALPHA * heatmap_rgb(cam)


def save_panel(path, image: Tensor, views: list[MapView], title: str = "") -> str:
    """One row per map: the image, the heatmap, the overlay. image: uint8 [3, R, R] (the model's view)."""
    fig = _figure(width=9, height=3.1 * len(views) + 0.4)
    axes = fig.subplots(len(views), 3, squeeze=False)
    for row, view in zip(axes, views):
        _show(row[0], image_hwc(image), "image")
        _show(row[1], heatmap_rgb(view.cam), view.title)
        _show(row[2], overlay(image, view.cam), "overlay")
    if title:
        fig.suptitle(title, fontsize=10)
    return save_figure(fig, path)


@dataclass
class GalleryRow:
    """One image of a gallery: its label line and the maps shown as overlays beside it."""

    image: Tensor
    label: str
    views: list[MapView]


def save_gallery(path, rows: list[GalleryRow], title: str, columns: int = 2) -> str:
    """A grid of images, each followed by its overlays; ``columns`` images side by side."""
    if not rows:
        raise ValueError("a gallery needs at least one image")
    per_image = 1 + max(len(r.views) for r in rows)
    columns = min(columns, len(rows))
    grid_rows = -(-len(rows) // columns)
    fig = _figure(width=2.2 * per_image * columns, height=2.4 * grid_rows + 0.5)
    axes = fig.subplots(grid_rows, per_image * columns, squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for index, row in enumerate(rows):
        line = axes[index // columns]
        first = (index % columns) * per_image
        _show(line[first], image_hwc(row.image), row.label)
        for offset, view in enumerate(row.views, start=1):
            _show(line[first + offset], overlay(row.image, view.cam), view.title)
    fig.suptitle(title, fontsize=11)
    return save_figure(fig, path)


def _figure(width: float, height: float) -> Figure:
    # Fixed margins: matplotlib's constrained/tight layouts more than double the time per panel.
    fig = Figure(figsize=(width, height))
    fig.subplots_adjust(left=0.01, right=0.99, bottom=0.01, top=1 - 0.65 / height, wspace=0.05, hspace=0.2)
    return fig


def _show(ax, pixels: np.ndarray, title: str) -> None:
    ax.imshow(pixels, interpolation="nearest")
    ax.set_title(title, fontsize=8)
    ax.axis("off")


def save_figure(fig: Figure, path) -> str:
    """Write ``fig`` as a PNG, atomically."""
    atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=100))
    return str(path)
