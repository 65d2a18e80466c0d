"""Figures of information maps: images beside their bits-per-dimension (or MI) maps, with a colour bar."""

from __future__ import annotations

from typing import Sequence

import numpy as np

from ..tables import literal_text
from .plots import _plt, save_figure

MAX_ROWS = 8


def _show_image(ax, img: np.ndarray) -> None:
    if img.shape[0] == 1:
        ax.imshow(img[0], cmap="gray", vmin=-1, vmax=1)
    else:
        ax.imshow(np.clip(np.transpose((img + 1) / 2, (1, 2, 0)), 0, 1))


def _panels(maps: np.ndarray) -> tuple[list[str], np.ndarray]:
    """Column titles and ``(n, P, H, W)`` panels: each channel, then the sum over channels (colour images)."""
    if maps.shape[1] == 1:
        return ["map"], maps
    names = [f"channel {c}" for c in range(maps.shape[1])] + ["sum of channels"]
    return names, np.concatenate([maps, maps.sum(1, keepdims=True)], 1)


def plot_maps(images: np.ndarray, maps: np.ndarray, path, *, unit: str = "bits/dim", title: str | None = None,
              row_titles: Sequence[str] | None = None, diverging: bool = False) -> None:
    """Images ``(n, C, H, W)`` in ``[-1, 1]`` beside their maps ``(n, C, H, W)`` (at most 8 rows).

    Per channel and summed over channels for colour images.  One colour scale for all maps
    (``diverging``: symmetric about zero, blue negative and red positive; else ``viridis``),
    shown by one colour bar; each row is titled with ``row_titles``.
    """
    plt = _plt()
    n = min(len(images), MAX_ROWS)
    names, panels = _panels(np.asarray(maps[:n], dtype=np.float64))
    cols = 1 + panels.shape[1]
    fig, axes = plt.subplots(n, cols, figsize=(1.7 * cols + 0.9, 1.7 * n + 0.6), squeeze=False)
    # The scale holds 99.5% of the values (a few extreme pixels would wash out the rest); the colour
    # bar is extended where values are clipped.
    if diverging:
        top = float(np.percentile(np.abs(panels), 99.5)) or float(np.abs(panels).max()) or 1.0
        lo, hi, cmap = -top, top, "RdBu_r"
    else:
        lo, hi = (float(v) for v in np.percentile(panels, [0.25, 99.75]))
        cmap = "viridis"
        hi = hi if hi > lo else lo + 1.0
    extend = {(False, False): "neither", (True, False): "min", (False, True): "max", (True, True): "both"}[
        (bool(panels.min() < lo), bool(panels.max() > hi))]
    shown = None
    for r in range(n):
        _show_image(axes[r, 0], images[r])
        axes[r, 0].set_ylabel(literal_text(row_titles[r]) if row_titles is not None else f"#{r}", fontsize=8)
        for c in range(panels.shape[1]):
            shown = axes[r, c + 1].imshow(panels[r, c], cmap=cmap, vmin=lo, vmax=hi)
        for ax in axes[r]:
            ax.set_xticks([])
            ax.set_yticks([])
    for c, name in enumerate(["image"] + names):
        axes[0, c].set_title(literal_text(name), fontsize=8)
    bar = fig.colorbar(shown, ax=axes.ravel().tolist(), shrink=0.9, pad=0.03, extend=extend)
    bar.set_label(unit, fontsize=8)
    bar.ax.tick_params(labelsize=7)
    if title:
        fig.suptitle(literal_text(title), fontsize=9)
    save_figure(fig, path)


def plot_confusion(matrix: np.ndarray, classes: Sequence[str], path, title: str | None = None) -> None:
    """A confusion matrix (rows: true class, columns: predicted) with its counts written in."""
    plt = _plt()
    k = len(classes)
    fig, ax = plt.subplots(figsize=(0.45 * k + 2.2, 0.45 * k + 1.8))
    shown = ax.imshow(matrix, cmap="Blues", vmin=0, vmax=max(1, int(matrix.max())))
    for i in range(k):
        for j in range(k):
            if matrix[i, j]:
                color = "white" if matrix[i, j] > 0.6 * matrix.max() else "black"
                ax.text(j, i, str(int(matrix[i, j])), ha="center", va="center", fontsize=7, color=color)
    ax.set_xticks(range(k), [literal_text(c) for c in classes], fontsize=7)
    ax.set_yticks(range(k), [literal_text(c) for c in classes], fontsize=7)
    ax.set_xlabel("predicted", fontsize=8)
    ax.set_ylabel("true", fontsize=8)
    fig.colorbar(shown, ax=ax, shrink=0.8)
    if title:
        ax.set_title(literal_text(title), fontsize=9)
    save_figure(fig, path)
