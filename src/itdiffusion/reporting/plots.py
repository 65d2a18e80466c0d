"""Figures (matplotlib, imported lazily; files written atomically)."""

from __future__ import annotations

import io
import math
from pathlib import Path
from typing import Sequence

import numpy as np

from .. import fileio as _io
from ..results import Results


def _plt():
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    return plt


def save_figure(fig, path, close: bool = True) -> None:
    """Save ``fig`` to ``path`` (format from the suffix) atomically, then close it (unless ``close=False``)."""
    path = Path(path)
    buf = io.BytesIO()
    fig.savefig(buf, format=path.suffix.lstrip(".") or "png", dpi=130, bbox_inches="tight")
    if close:
        _plt().close(fig)
    _io.write_atomic(path, lambda fh: fh.write(buf.getvalue()))


def mse_axes(ax, results: Results, label: str = "model", curve: str = "mmse", color: str = "C0", shade: bool = True):
    """Draw a mean error curve against log-SNR with the Gaussian mmse and the shaded gap.

    The gap between the Gaussian's curve and the model's, integrated over log-SNR and
    halved, is how much better than the Gaussian the model's likelihood is.
    """
    a = results.logsnr
    gauss = results.curves["mmse_gauss_analytic"]
    model = results.curves[curve]
    ax.plot(a, gauss, color="0.4", lw=1.5, ls="--", label="Gaussian mmse")
    ax.plot(a, model, color=color, lw=1.8, label=label)
    if shade:
        ax.fill_between(a, model, gauss, where=model <= gauss, color=color, alpha=0.2, interpolate=True,
                        label="gap (likelihood gain)")
        ax.fill_between(a, model, gauss, where=model > gauss, color="C3", alpha=0.2, interpolate=True,
                        label="worse than Gaussian")
    ax.set_xlabel("log-SNR a")
    ax.set_ylabel("E ||eps - eps_hat||^2")
    ax.set_yscale("log")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)


def plot_mse(results: Results, path, title: str | None = None, rounded: bool = False) -> None:
    """``mse.png``: the error curve (and, for discrete data, the rounded one) against the Gaussian's."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6, 4))
    mse_axes(ax, results)
    if rounded:
        key = "mmse_soft" if results.config.get("soft") else "mmse_hard"
        if key in results.curves:
            ax.plot(results.logsnr, results.curves[key], color="C2", lw=1.5, label=f"rounded ({key[5:]})")
            ax.legend(fontsize=8)
    if title:
        ax.set_title(title)
    save_figure(fig, path)


def plot_density_grid(
    panels: Sequence[tuple[str, np.ndarray]],
    extent: tuple[float, float, float, float],
    points: np.ndarray,
    path,
    title: str | None = None,
) -> None:
    """Filled contours of ``-log p`` (each panel ``(label, (ny, nx) array)``) with data points on top,
    axis ticks in data coordinates and one colour bar (nats) for every panel."""
    plt = _plt()
    from matplotlib.ticker import MaxNLocator

    n = len(panels)
    fig, axes = plt.subplots(1, n, figsize=(3.0 * n + 1.0, 3.4), squeeze=False, sharey=True, layout="constrained")
    finite = np.concatenate([p[np.isfinite(p)].ravel() for _, p in panels])
    lo, hi = np.percentile(finite, 1), np.percentile(finite, 97)
    levels = np.linspace(lo, hi, 15)
    for k, (ax, (label, nll)) in enumerate(zip(axes[0], panels)):
        filled = ax.contourf(np.clip(nll, lo, hi), levels=levels, extent=extent, origin="lower", cmap="viridis_r")
        ax.scatter(points[:, 0], points[:, 1], s=1.5, c="white", alpha=0.35, linewidths=0)
        ax.set_title(label, fontsize=9)
        ax.tick_params(labelsize=7)
        ax.set_xlabel("$x_1$", fontsize=8)
        if k == 0:
            ax.set_ylabel("$x_2$", fontsize=8)
        ax.set_xlim(extent[0], extent[1])
        ax.set_ylim(extent[2], extent[3])
        ax.xaxis.set_major_locator(MaxNLocator(4))
        ax.set_aspect("equal")

    bar = fig.colorbar(filled, ax=axes[0].tolist(), shrink=0.85, pad=0.02, ticks=MaxNLocator(6))
    bar.set_label("-log p(x), nats (clipped to the 1st-97th percentile)", fontsize=7)
    bar.ax.tick_params(labelsize=7)
    if title:
        fig.suptitle(title, fontsize=10)
    save_figure(fig, path)


def plot_image_bpd(images: np.ndarray, bpd: np.ndarray, results: Results, path, title: str | None = None) -> None:
    """Test images framed by colour by their bits/dim (the value above each tile), next to the error curves."""
    plt = _plt()
    n = min(len(images), 36)
    order = np.argsort(bpd[:n])
    cols = int(math.ceil(math.sqrt(n)))
    fig = plt.figure(figsize=(11, 5.2))
    outer = fig.add_gridspec(1, 2, width_ratios=[1.0, 1.15], wspace=0.22)
    tiles = outer[0].subgridspec(int(math.ceil(n / cols)), cols, wspace=0.12, hspace=0.45)
    cmap = plt.get_cmap("coolwarm")
    lo, hi = float(bpd[:n].min()), float(bpd[:n].max())
    for slot, i in enumerate(order):
        ax = fig.add_subplot(tiles[slot // cols, slot % cols])
        img = images[i]
        ax.imshow(img[0] if img.shape[0] == 1 else np.transpose((img + 1) / 2, (1, 2, 0)), cmap="gray", vmin=-1, vmax=1)
        color = cmap((bpd[i] - lo) / max(hi - lo, 1e-9))
        for spine in ax.spines.values():
            spine.set_edgecolor(color)
            spine.set_linewidth(2.5)
        ax.set_xticks([])
        ax.set_yticks([])
        ax.set_title(f"{bpd[i]:.2f}", fontsize=7, pad=3)
    ax = fig.add_subplot(outer[1])
    mse_axes(ax, results, label="model (raw)")
    key = "mmse_soft" if results.config.get("soft") else "mmse_hard"
    if key in results.curves:
        ax.plot(results.logsnr, results.curves[key], color="C2", lw=1.5, label="rounded")
        ax.legend(fontsize=7)
    fig.suptitle(title or "test images by discrete bits/dim (above each; blue frame: likely, red: unlikely)",
                 fontsize=10)
    save_figure(fig, path)


# ----------------------------------------------------------------------------- report figures
def save_figure_as(fig, paths: Sequence) -> None:
    """Save ``fig`` in every format of ``paths`` (by suffix), each atomically, then close it."""
    for path in paths:
        save_figure(fig, path, close=False)
    _plt().close(fig)


def plot_error_curves(results: Sequence[Results], labels: Sequence[str], paths: Sequence, title: str | None = None):
    """Mean error curves of several models against the Gaussian mmse, each gap to it shaded.

    Half the area between a model's curve and the Gaussian's is how much its likelihood
    improves on the Gaussian reference (where the model is below it).
    """
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    first = results[0]
    gauss = first.curves["mmse_gauss_analytic"]
    ax.plot(first.logsnr, gauss, color="0.3", lw=1.5, ls="--", label="Gaussian mmse")
    for i, (res, label) in enumerate(zip(results, labels)):
        color = f"C{i % 10}"
        ax.plot(res.logsnr, res.curves["mmse"], color=color, lw=1.6, label=label)
        ref = np.interp(res.logsnr, first.logsnr, gauss)
        ax.fill_between(res.logsnr, res.curves["mmse"], ref, color=color, alpha=0.12, interpolate=True)
    ax.set_xlabel("log-SNR a")
    ax.set_ylabel("E ||eps - eps_hat||^2")
    ax.set_yscale("log")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    ax.set_title(title or "error curves (shaded: gap to the Gaussian mmse)", fontsize=10)
    save_figure_as(fig, paths)


def has_rounded(results: Results) -> bool:
    return "mmse_hard" in results.curves or "mmse_soft" in results.curves


def plot_rounded_curves(results: Sequence[Results], labels: Sequence[str], paths: Sequence) -> None:
    """For discrete data: each model's raw error curve against its rounded ones (one panel per model)."""
    pairs = [(r, label) for r, label in zip(results, labels) if has_rounded(r)]
    if not pairs:
        raise ValueError("no results with rounded error curves (discrete data)")
    plt = _plt()
    fig, axes = plt.subplots(1, len(pairs), figsize=(5.2 * len(pairs), 3.9), squeeze=False)
    for ax, (res, label) in zip(axes[0], pairs):
        mse_axes(ax, res, label="raw", shade=False)
        for key, color in (("mmse_hard", "C2"), ("mmse_soft", "C1")):
            if key in res.curves:
                ax.plot(res.logsnr, res.curves[key], color=color, lw=1.5, label=f"rounded ({key[5:]})")
        # rounded errors fall to (nearly) zero at high log-SNR: keep the scale of the raw curves
        shown = [res.curves[k] for k in ("mmse", "mmse_gauss_analytic", "mmse_hard", "mmse_soft") if k in res.curves]
        floor = min(res.curves["mmse"].min(), res.curves["mmse_gauss_analytic"].min())
        ax.set_ylim(max(floor, 1e-12) / 100, 3 * max(float(c.max()) for c in shown))
        ax.legend(fontsize=8)
        ax.set_title(label, fontsize=10)
    fig.suptitle("raw and rounded error curves (discrete data)", fontsize=10)
    save_figure_as(fig, paths)


def plot_loss_curves(runs: Sequence[dict], paths: Sequence) -> None:
    """Training loss and test NLL per epoch, bits/dim; ``runs``: dicts with ``label``, ``epochs``,
    ``train_bpd``, ``test_bpd`` (entries may be None) and ``test_metric``."""
    plt = _plt()
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8))
    for i, run in enumerate(runs):
        color = f"C{i % 10}"
        axes[0].plot(run["epochs"], run["train_bpd"], "o-", color=color, ms=3, label=run["label"])
        test = [(e, v) for e, v in zip(run["epochs"], run["test_bpd"]) if v is not None]
        if test:
            axes[1].plot(*zip(*test), "o-", color=color, ms=3, label=f"{run['label']} ({run['test_metric']})")
    axes[0].set_title("training loss (continuous -log p, IT objective)", fontsize=10)
    axes[1].set_title("test NLL", fontsize=10)
    from matplotlib.ticker import MaxNLocator

    for ax in axes:
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_xlabel("epoch")
        ax.set_ylabel("bits/dim")
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8)
    save_figure_as(fig, paths)
