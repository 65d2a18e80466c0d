"""Shared pieces of the performance benchmarks: machine description, timing, test networks and data."""

from __future__ import annotations

import json
import math
import os
import platform
import statistics
import time
import warnings
from typing import Callable

import torch
from torch import nn

import itdiffusion as itd


DEFAULT_THREADS = 1
THREADS_HELP = (
    "torch CPU threads (at most 2; default 1). On a machine shared with other jobs, every "
    "2-thread parallel region waits for the scheduler (measured here: one 120k-element op went "
    "from 0.3 ms to 12 ms), which times the scheduler rather than the code; use 2 on an idle machine"
)


def add_common_args(parser) -> None:
    """``--quick``, ``--json PATH`` and ``--threads N``, shared by every benchmark."""
    parser.add_argument("--quick", action="store_true", help="the same comparison at a smaller size (under a minute)")
    parser.add_argument("--json", metavar="PATH", help="write the figures as a flat JSON object")
    parser.add_argument("--threads", type=int, default=DEFAULT_THREADS, choices=(1, 2), help=THREADS_HELP)


def set_threads(n: int = DEFAULT_THREADS) -> int:
    """Use ``n`` CPU threads, at most 2 (the benchmarks' machine has 2 cores)."""
    torch.set_num_threads(max(1, min(n, 2)))
    return torch.get_num_threads()


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as fh:
            for line in fh:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine(device: str = "cpu") -> dict:
    """What the figures were measured on."""
    info = {
        "device": device,
        "cpu": cpu_model(),
        "cpus_available": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "load_average_1min": os.getloadavg()[0] if hasattr(os, "getloadavg") else None,
    }
    if device.startswith("cuda") and torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(torch.device(device))
    return info


def print_machine(info: dict) -> None:
    parts = [f"{k}={v}" for k, v in info.items() if v is not None]
    print("machine: " + ", ".join(parts))


def timed(fn: Callable[[], object], sync: Callable[[], None] | None = None) -> float:
    if sync:
        sync()
    start = time.perf_counter()
    fn()
    if sync:
        sync()
    return time.perf_counter() - start


def interleaved(fns: dict[str, Callable[[], object]], repeats: int, warmup: int = 1) -> dict[str, list[float]]:
    """Wall times of each function, run in turn (A B A B ...) so that load changes hit both alike."""
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    times = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            times[name].append(timed(fn))
    return times


def median(values: list[float]) -> float:
    return statistics.median(values)


def write_json(path: str | None, figures: dict) -> None:
    if path:
        with open(path, "w", encoding="utf-8") as fh:
            json.dump(figures, fh, indent=2, sort_keys=True)
        print(f"wrote {path}")


class Counting(nn.Module):
    """Counts the examples a denoiser is called on and the wall time spent in it (CPU)."""

    def __init__(self, net: nn.Module):
        super().__init__()
        self.net = net
        self.examples = 0
        self.seconds = 0.0

    def forward(self, z, logsnr, *args, **kwargs):
        self.examples += len(z)
        start = time.perf_counter()
        out = self.net(z, logsnr, *args, **kwargs)
        self.seconds += time.perf_counter() - start
        return out


# ----------------------------------------------------------------------------- networks and data
def digits_setup(seed: int = 0):
    """The digits U-Net (``SmallUNet``, 0.6M parameters) on scikit-learn's 8x8 digits, 17 levels.

    Weights are random, with a non-zero output layer so that ``x_hat`` varies like a real
    network's (timing does not depend on the weights).
    """
    from itdiffusion.data.toy import load_dataset
    from itdiffusion.denoisers.nets import SmallUNet

    torch.manual_seed(seed)
    data = load_dataset("digits", seed=seed)
    lo, hi, levels = data.grid
    net = SmallUNet(channels=1).eval()
    nn.init.normal_(net.conv_out.weight, std=0.02)
    spectrum = itd.GaussianSpectrum.from_data(data.train)
    return net, data.test, spectrum, itd.DiscreteGrid(lo, hi, levels)


def _dct_matrix(n: int) -> torch.Tensor:
    """Orthonormal DCT-II basis (rows), float64."""
    k = torch.arange(n, dtype=torch.float64).unsqueeze(1)
    i = torch.arange(n, dtype=torch.float64).unsqueeze(0)
    m = torch.cos(math.pi * (i + 0.5) * k / n) * math.sqrt(2.0 / n)
    m[0] /= math.sqrt(2.0)
    return m


def image_spectrum(shape=(3, 32, 32)) -> itd.GaussianSpectrum:
    """A full-covariance Gaussian reference shaped like natural images' (a dense d x d basis).

    Eigenvectors: the 2-D DCT basis (Kronecker with a colour DCT); eigenvalues fall as a
    power of spatial frequency.  Cheap to build, and as costly to use as a spectrum
    estimated from data (the Gaussian denoiser multiplies by the dense ``d x d`` basis).
    """
    c, h, w = shape
    basis = torch.kron(torch.kron(_dct_matrix(c), _dct_matrix(h)), _dct_matrix(w))  # (d, d), rows
    fc = torch.arange(c, dtype=torch.float64).reshape(-1, 1, 1)
    fh = torch.arange(h, dtype=torch.float64).reshape(1, -1, 1)
    fw = torch.arange(w, dtype=torch.float64).reshape(1, 1, -1)
    freq = torch.sqrt(fh**2 + fw**2) + 1.0
    var = (0.25 / freq**2 * torch.where(fc == 0, 1.0, 0.1)).reshape(-1)
    var = var + 1e-5
    return itd.GaussianSpectrum(torch.zeros(var.numel(), dtype=torch.float64), basis.T.contiguous(), var.log(), tuple(shape))


def synthetic_images(n: int, grid: itd.DiscreteGrid, shape=(3, 32, 32), seed: int = 0) -> torch.Tensor:
    """Smooth random images on the grid (upsampled 4x4 noise plus a little pixel noise)."""
    gen = torch.Generator().manual_seed(seed)
    c, h, w = shape
    coarse = torch.randn(n, c, 4, 4, generator=gen) * 0.5
    x = torch.nn.functional.interpolate(coarse, size=(h, w), mode="bilinear", align_corners=False)
    x = (x + 0.05 * torch.randn(n, c, h, w, generator=gen)).clamp(grid.lo, grid.hi)
    return grid.round(x)


def ddpm_setup(seed: int = 0):
    """The DDPM CIFAR-10 U-Net (35.7M parameters, diffusers ``UNet2DModel``) with random weights."""
    from itdiffusion.denoisers import build_denoiser

    torch.manual_seed(seed)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "no weights given, randomly initialised"
        net = build_denoiser("ddpm-cifar10")
    grid = itd.DiscreteGrid(-1.0, 1.0, 256)
    return net.eval(), image_spectrum(), grid
