"""``itd spectrum``: the data's covariance spectrum, the Gaussian reference of every estimate."""

from __future__ import annotations

import argparse
import math
from pathlib import Path

from ._common import DATA_HELP, add_workers_arg, positive_int, seed_int

BATCH = 2048  # images per accumulation step


def add_parser(sub) -> None:
    p = sub.add_parser(
        "spectrum",
        help="compute the covariance spectrum of a data set (the Gaussian reference)",
        description="Mean and covariance eigendecomposition (float64) of the training images, saved as .npz "
        "(no pickle) with the log-SNR integration loc/scale it implies. The paper used 12,500 CIFAR-10 training "
        "images (--max-samples 12500).",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--data", required=True, help=DATA_HELP + "; its training split is used")
    p.add_argument("--out", required=True, help="output .npz file")
    p.add_argument("--diagonal", action="store_true", help="per-pixel variances only (no eigenvectors)")
    p.add_argument("--dequantize", action="store_true", help="the spectrum of x + u, u uniform over one grid step: "
                   "adds delta^2/12 to every eigenvalue (exactly). Recommended when some pixels are constant (digits): "
                   "it keeps the Gaussian reference of dequantized data from degenerating")
    p.add_argument("--max-samples", type=positive_int, help="use this many images, drawn at random by --seed")
    p.add_argument("--overwrite", action="store_true", help="replace an existing OUT")
    p.add_argument("--seed", type=seed_int, default=0, help="seed of the --max-samples draw")
    add_workers_arg(p)
    p.set_defaults(func=run)


def run(args) -> int:
    from ..guard import OutputLock, check_outputs

    out = Path(args.out)
    if out.is_dir():
        raise ValueError(f"--out {out} is a folder; give a file name such as spectrum.npz")
    check_outputs([out], [args.data])
    if out.suffix != ".npz":
        raise ValueError(f"--out must name a .npz file, got {out}")
    if out.exists() and not args.overwrite:
        raise ValueError(f"{out} exists; pass --overwrite to replace it")
    lock = OutputLock(out).acquire()
    try:
        return _spectrum(args, out)
    finally:
        lock.release()


def _spectrum(args, out: Path) -> int:
    from tqdm.auto import tqdm

    from ..data.stream import Chunks, open_images
    from ..core.spectrum import GaussianSpectrum

    data = open_images(args.data, "train", limit=args.max_samples, seed=args.seed)
    grid = "continuous" if data.grid is None else f"{data.grid.levels} levels"
    print(f"{data.source}: {len(data)} images of shape {data.shape}, {grid}")
    if not args.diagonal and len(data) <= data.d:
        raise ValueError(f"a full covariance of {data.d} dimensions needs more than {data.d} images (got "
                         f"{len(data)}); pass --diagonal or use more images")
    if args.dequantize and data.grid is None:
        raise ValueError(f"--dequantize needs data on a grid; {data.source} is continuous")
    added = data.grid.delta**2 / 12.0 if args.dequantize else 0.0  # the variance of u ~ U(-delta/2, delta/2)
    with tqdm(total=len(data), unit="img", desc="spectrum", dynamic_ncols=True, disable=None) as bar:
        batches = (bar.update(len(xb)) or xb for xb in Chunks(data, BATCH, workers=args.workers))  # one streaming pass
        spectrum = GaussianSpectrum.from_batches(batches, diagonal=args.diagonal, added_variance=added)
    spectrum.save(out)
    eigs = spectrum.log_eigs.exp()
    kind = ("diagonal" if args.diagonal else "full") + (" dequantized" if args.dequantize else "")
    print(f"{kind} spectrum of {len(data)} images, d = {spectrum.d}: eigenvalues {eigs.min().item():.3g} .. "
          f"{eigs.max().item():.3g}")
    print(f"integration loc = {spectrum.loc:.4f}, scale = {spectrum.scale:.4f}; Gaussian entropy "
          f"{spectrum.entropy():.2f} nats ({spectrum.entropy() / (spectrum.d * math.log(2)):.4f} bits/dim)")
    print(f"wrote {out}")
    return 0

