"""``itd demo``: train a small denoiser with the IT objective on built-in data, then measure it.

Usable from Python (:func:`run_demo`) as well as from the command line.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from . import fileio as _io
from .data.toy import load_dataset
from .evaluation import evaluate
from .core.grid import DiscreteGrid
from .model import ITDiffusion
from .denoisers.nets import GaussianResidual
from .core.spectrum import GaussianSpectrum
from .training.train import TrainConfig, train

DEFAULT_DATASET = "moons"


@dataclass(frozen=True)
class DemoSettings:
    """Defaults per kind of data, sized for a 2-core laptop CPU."""

    epochs: int
    lr: float
    batch_size: int
    eval_points: int
    val_points: int
    n_train: int | None = None  # None: the data set's default split
    n_test: int | None = None
    val_examples: int = 500
    density_grid: int = 70  # points per axis of the density plots
    density_points: int = 128  # network calls per plotted point


# 2-D sets are generated, so the demo draws more points than the default split: with
# 4,000 points the MLP overfits by a few hundredths of a nat.  Sized for a first result within
# about a minute of one CPU core (profiled: training 1.3 s per epoch, the evaluation 8 ms per
# test point at 512 calls, a density snapshot 0.6 ms per grid point at 64 calls): 30 epochs
# (80 gave 0.03-0.08 nats lower), 2,000 test points (standard error near 0.02 nats), and 512
# calls, since the midpoint rule's bias is 0.15 nats at 128 calls and 0.04 at 256.
SETTINGS_2D = DemoSettings(epochs=30, lr=2e-3, batch_size=256, eval_points=512, val_points=32,
                           n_train=20_000, n_test=2_000, density_grid=50, density_points=64)
SETTINGS_IMAGES = DemoSettings(epochs=15, lr=2e-3, batch_size=64, eval_points=200, val_points=32)
# A smoke test: the same pipeline in seconds (numbers are not meaningful).
SETTINGS_QUICK = DemoSettings(epochs=2, lr=2e-3, batch_size=128, eval_points=16, val_points=8,
                              n_train=512, n_test=64, val_examples=32, density_grid=20, density_points=8)
DENSITY_SNAPSHOTS = 4


def build_model(name: str, shape: tuple[int, ...], spectrum: GaussianSpectrum) -> tuple[ITDiffusion, dict]:
    """The demo's network for data of ``shape``, wrapped; returns the model and its description."""
    from .denoisers.nets import MLPDenoiser, SmallUNet

    if len(shape) == 1:
        config = {"kind": "mlp", "d": shape[0], "hidden": 128, "depth": 3}
        net = MLPDenoiser(shape[0], hidden=128, depth=3, skip=False)
    else:
        config = {"kind": "small-unet", "channels": shape[0], "base": 32}
        net = SmallUNet(channels=shape[0], base=32, skip=False)
    return ITDiffusion(GaussianResidual(net, spectrum), spectrum), {"dataset": name, **config}


def _density_grid(points: torch.Tensor, n: int):
    lo, hi = points.min(0).values, points.max(0).values
    pad = 0.15 * (hi - lo)
    lo, hi = (lo - pad).tolist(), (hi + pad).tolist()
    xs, ys = np.linspace(lo[0], hi[0], n), np.linspace(lo[1], hi[1], n)
    mesh = torch.tensor(np.stack(np.meshgrid(xs, ys), -1).reshape(-1, 2), dtype=torch.float32)
    return mesh, (lo[0], hi[0], lo[1], hi[1])


@torch.no_grad()
def _learned_density(model: ITDiffusion, mesh: torch.Tensor, n_points: int) -> np.ndarray:
    """``-log p`` on the plot grid, every grid point with the same noise (common random numbers).

    Sharing the noise removes the point-to-point speckle of independent estimates, so the
    contours show the model rather than the estimator's noise.
    """
    model.eval()
    estimator = model.estimator(n_points, placement="midpoint", antithetic=True)
    points = estimator.shared_quadrature()
    out = [estimator.nll(model, model.spectrum, chunk, seed=0, shared=points, same_noise=True)
           for chunk in mesh.split(1024)]
    side = int(round(math.sqrt(len(mesh))))
    return torch.cat(out).cpu().numpy().reshape(side, side)


def run_demo(
    dataset: str = DEFAULT_DATASET,
    *,
    epochs: int | None = None,
    out: str | Path | None = None,
    seed: int = 0,
    progress: bool = True,
    log=print,
    verbose: bool = True,
    quick: bool = False,
) -> dict:
    """Train, evaluate and plot; returns the metrics written to ``out/metrics.json``."""
    began = time.perf_counter()
    out = Path(out) if out is not None else Path("runs") / f"demo-{dataset}"
    if out.exists() and not out.is_dir():
        raise ValueError(f"output directory {out} exists and is a file")
    settings = SETTINGS_QUICK if quick else SETTINGS_IMAGES if dataset == "digits" else SETTINGS_2D
    ds, grid, model, description, epochs = _prepare(dataset, settings, epochs, seed)
    image = len(ds.shape) > 1
    (log if verbose else _silent)(f"itd demo: {ds.name} ({ds.description}); d = {ds.dim}, {len(ds.train)} train / {len(ds.test)} test")
    config = TrainConfig(epochs=epochs, lr=settings.lr, batch_size=settings.batch_size, seed=seed,
                         val_points=settings.val_points, val_examples=settings.val_examples, grad_clip=1.0,
                         lr_schedule="cosine")
    on_epoch, snapshots, extent = _epoch_logger(model, ds, settings, epochs, verbose, log)
    history = train(model, ds.train, config, x_val=ds.test, discrete=grid, out_dir=out, meta=description,
                    progress=progress, on_epoch=on_epoch)
    model.eval()
    results = evaluate(model, ds.test.split(256), n_points=settings.eval_points, discrete=grid,
                       dequantize=grid is not None, seed=seed)
    results.config["model"] = f"demo-{ds.name}"
    results.save(out / "results.json")
    metrics = _metrics(ds, results, history, time.perf_counter() - began)
    _plots(ds, results, snapshots, extent, out, settings.density_grid)
    _io.save_json_atomic(out / "metrics.json", metrics)
    log(_table(metrics))
    log(f"wrote {out}/: metrics.json, results.json/.npz, mse.png, " + ("density.png" if not image else "images.png")
        + ", checkpoint.safetensors, history.json")
    return metrics


def _prepare(dataset: str, settings, epochs: int | None, seed: int):
    """The data set, its grid, the model built at ``seed`` with its description, and the epochs."""
    ds = load_dataset(dataset, seed=seed, n_train=settings.n_train, n_test=settings.n_test)
    epochs = settings.epochs if epochs is None else int(epochs)
    if epochs < 1:
        raise ValueError(f"--epochs must be a positive integer, got {epochs}")
    grid = DiscreteGrid(*ds.grid) if ds.grid is not None else None
    spectrum = GaussianSpectrum.from_data(ds.train, added_variance=grid.delta**2 / 12 if grid else 0.0)
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model, description = build_model(ds.name, ds.shape, spectrum)
    return ds, grid, model, description, epochs


def _epoch_logger(model, ds, settings, epochs: int, verbose: bool, log):
    """``(on_epoch, snapshots, extent)``: the per-epoch callback that logs and, for 2-D data, keeps
    density snapshots (appended to ``snapshots``) on a mesh over ``extent``."""
    snapshots, mesh, extent, keep = [], None, None, set()
    # a coarser estimate than the test's:
    calls = f"{min(settings.val_examples, len(ds.test))} examples x {settings.val_points} calls"
    val_label = (f"validation discrete bound -log P(x) ({calls}) <=" if ds.grid is not None  # what train() validates
                 else f"validation -log p(x) (continuous, {calls})")
    if not len(ds.shape) > 1:  # 2-D point data, not images
        mesh, extent = _density_grid(ds.train, settings.density_grid)
        keep = set(np.unique(np.linspace(0, epochs, DENSITY_SNAPSHOTS).round().astype(int)).tolist())
        if 0 in keep:
            snapshots.append(("epoch 0 (Gaussian)", _learned_density(model, mesh, settings.density_points)))

    def on_epoch(record, model):
        if not verbose:
            return _snapshot(record.epoch)
        msg = f"  epoch {record.epoch:3d}  training loss {record.train_loss:8.4f}"
        if record.val_nll is not None:
            msg += f"  {val_label} {record.val_nll:8.4f} ± {record.val_se:.4f} nats"
        log(msg)
        _snapshot(record.epoch)

    def _snapshot(epoch):
        if mesh is not None and epoch in keep:
            snapshots.append((f"epoch {epoch}", _learned_density(model, mesh, settings.density_points)))

    return on_epoch, snapshots, extent


def _silent(*args, **kwargs) -> None:
    pass


def _metrics(ds, results, history, seconds: float) -> dict:
    est = results.estimates
    cont = est["continuous"]
    metrics = {
        "dataset": ds.name, "d": ds.dim, "n_train": len(ds.train), "n_test": len(ds.test),
        "epochs": len(history.records), "calls_per_example": results.config["calls_per_example"],
        "test_nll_nats": cont.nats, "test_nll_nats_se": cont.se_nats, "test_nll_bpd": cont.bpd,
        "test_nll_bpd_se": cont.se_bpd, "gaussian_nll_nats": float(results.terms["continuous"].offset.mean()),
        "seconds": seconds,
    }
    if ds.true_nll is not None:
        metrics["true_nll_nats"] = float(ds.true_nll(ds.test).double().mean())
    if "discrete" in est:
        for key, name in (("discrete", "discrete"), ("dequantized", "dequantized_discrete")):
            if name in est:
                metrics[f"test_{key}_bpd"], metrics[f"test_{key}_bpd_se"] = est[name].bpd, est[name].se_bpd
        metrics["test_discrete_gauss_min_bpd"] = est["discrete_gauss_min"].bpd
    metrics["history"] = history.to_json()
    return metrics


def _table(m: dict) -> str:
    """The final table, every row saying what it measures (on a grid the discrete bounds come first:
    they are the numbers comparable with published bits/dim; the continuous density is not)."""
    rows = [("estimate (test set)", "value", "± se", "truth")]
    truth = m.get("true_nll_nats")
    for key, label in (("test_dequantized_bpd", "dequantized bound on -log P(x), bits/dim (comparable with papers)"),
                       ("test_discrete_bpd", "discrete bound on -log P(x), bits/dim (hard rounding)")):
        if key in m:
            rows.append((label, f"{m[key]:.4f}", f"{m[key + '_se']:.4f}", "–"))
    grid = "test_discrete_bpd" in m
    rows.append(("continuous -log p(x), nats" + (" (grid values as a density: not comparable)" if grid else ""),
                 f"{m['test_nll_nats']:.4f}", f"{m['test_nll_nats_se']:.4f}",
                 "–" if truth is None else f"{truth:.4f}"))
    rows.append(("Gaussian reference -log N(x), nats (continuous)", f"{m['gaussian_nll_nats']:.4f}", "", ""))
    rows.append(("time, s", f"{m['seconds']:.1f}", "", ""))
    widths = [max(len(r[i]) for r in rows) for i in range(4)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def _plots(ds, results, snapshots, extent, out: Path, side: int) -> None:
    from .reporting import plots

    title = f"{ds.name}: model error vs Gaussian mmse"
    plots.plot_mse(results, out / "mse.png", title=title, rounded=ds.grid is not None)
    if snapshots:
        panels = list(snapshots)
        if ds.true_nll is not None:
            mesh, _ = _density_grid(ds.train, side)
            panels.append(("exact", ds.true_nll(mesh).double().numpy().reshape(side, side)))
        plots.plot_density_grid(panels, extent, ds.train[:2000].numpy(), out / "density.png",
                                title=f"{ds.name}: learned -log p(x) over training")
    elif ds.grid is not None:
        nll = results.terms["discrete"].nll_nats
        bpd = nll / (ds.dim * math.log(2))
        plots.plot_image_bpd(ds.test.numpy(), bpd, results, out / "images.png")
