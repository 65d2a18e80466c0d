"""Peak memory (and time) of soft rounding: this package versus the full ``(levels, batch, d)`` softmax.

Workload: 256 grid levels, a batch of 256 noisy CIFAR-sized estimates (d = 3072) whose
rows span the paper's evaluation range of log-SNR (256 quantiles of the truncated
logistic, loc 6.2614, scale 3.0976, clip 4), as batching (image, point) pairs produces.
``x_hat = x + e^(-a/2) * noise`` on smooth images on the grid.

Method: each variant runs in a **fresh Python process** (so peaks do not mix).  After the
inputs are built, the process resets its peak resident set size (``echo 5 >
/proc/self/clear_refs``, Linux) and reads ``VmHWM`` (peak RSS) after the call: the figure is
that peak minus the resident size just before the call, i.e. all memory the call touched,
whatever allocated it.  Where the reset is not allowed, ``ru_maxrss`` is used instead (an
upper bound that includes start-up).  An analytic figure is printed too: for the
full softmax its largest tensor (``levels * batch * d`` float64; it needs several), for the
package its index copy and result plus its temporaries' budget.

Run:  python benchmarks/soft_round_memory.py [--quick] [--json PATH] [--threads 1|2]
"""

from __future__ import annotations

import argparse
import json
import math
import resource
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

LEVELS, D = 256, 3072
LOC, SCALE, CLIP = 6.2614, 3.0976, 4.0  # the paper's CIFAR-10 proposal


def _status_kib(field: str) -> int | None:
    try:
        with open("/proc/self/status", encoding="utf-8") as fh:
            for line in fh:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def _reset_peak() -> bool:
    try:
        with open("/proc/self/clear_refs", "w", encoding="utf-8") as fh:
            fh.write("5")
        return True
    except OSError:
        return False


def child(variant: str, batch: int, threads: int) -> None:
    """Run one variant and print a JSON line with its peak memory."""
    import torch

    import itdiffusion as itd
    from _bench import set_threads, synthetic_images
    from itdiffusion.core.grid import soft_round_index_dense
    from itdiffusion.core.proposal import logistic_points

    set_threads(threads)
    grid = itd.DiscreteGrid(-1.0, 1.0, LEVELS)
    logsnr, _ = logistic_points(batch, LOC, SCALE, CLIP, placement="midpoint")
    x = synthetic_images(batch, grid, seed=1).reshape(batch, D).double()
    gen = torch.Generator().manual_seed(2)
    x_hat = x + torch.randn(x.shape, generator=gen, dtype=torch.float64) * torch.exp(-0.5 * logsnr).unsqueeze(1)
    fn = {
        "package": lambda: grid.soft_round_index(x_hat, logsnr),
        "dense": lambda: soft_round_index_dense(grid, x_hat, logsnr),
    }[variant]
    if variant == "package":  # load kernels and code paths outside the measured call
        grid.soft_round_index(x_hat[:2], logsnr[:2])
    import gc

    gc.collect()
    method = "VmHWM after clear_refs" if _reset_peak() else "ru_maxrss (includes start-up)"
    before = _status_kib("VmRSS")
    start = time.perf_counter()
    out = fn()
    seconds = time.perf_counter() - start
    if method.startswith("VmHWM"):
        peak = _status_kib("VmHWM")
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    checksum = float(out.sum())
    print(json.dumps({"variant": variant, "peak_kib": peak - before, "seconds": seconds, "method": method,
                      "checksum": checksum}))


def run_child(variant: str, batch: int, threads: int) -> dict:
    cmd = [sys.executable, __file__, "--child", variant, "--batch", str(batch), "--threads", str(threads)]
    out = subprocess.run(cmd, capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    from _bench import add_common_args

    add_common_args(parser)
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--batch", type=int, default=None, help="rows (examples x points); default 256, 64 with --quick")

    args = parser.parse_args()
    batch = args.batch or (64 if args.quick else 256)
    if args.child:
        child(args.child, batch, args.threads)
        return
    import torch

    from _bench import machine, print_machine, set_threads, write_json

    set_threads(args.threads)
    info = machine()
    print_machine(info)
    runs = {v: run_child(v, batch, args.threads) for v in ("package", "dense")}
    pkg, dense = runs["package"], runs["dense"]
    if abs(pkg["checksum"] - dense["checksum"]) > 1e-6 * max(1.0, abs(dense["checksum"])):
        raise SystemExit(f"results differ: {pkg['checksum']} vs {dense['checksum']}")
    n = batch * D
    from itdiffusion.core.softround import default_max_elements

    # package: the float64 index copy and the result (n each) plus its temporaries' budget
    largest = {"package": 8 * (2 * n + default_max_elements("cpu")), "dense": 8 * LEVELS * n}
    print(f"\nSoft rounding, {LEVELS} levels, batch {batch}, d = {D} (float64), rows across the paper's log-SNR range")
    print(f"memory: {pkg['method']}, fresh process per variant\n")
    print("| variant | peak memory (MiB) | needed (MiB, analytic) | seconds |")
    print("|---|---:|---:|---:|")
    for name, r in (("full (levels x batch x d) softmax", dense), ("package (window + closed form)", pkg)):
        key = "dense" if r is dense else "package"
        print(f"| {name} | {r['peak_kib'] / 1024:.1f} | {largest[key] / 2**20:.1f} | {r['seconds']:.3f} |")
    ratio = dense["peak_kib"] / max(pkg["peak_kib"], 1)
    print(f"\nmemory ratio {ratio:.1f}x, time ratio {dense['seconds'] / pkg['seconds']:.1f}x; "
          f"inputs and output themselves: {3 * 8 * n / 2**20:.1f} MiB")
    figures = {
        "memory_ratio": ratio, "time_ratio": dense["seconds"] / pkg["seconds"], "batch": batch, "d": D, "levels": LEVELS,
        "package_peak_mib": pkg["peak_kib"] / 1024, "dense_peak_mib": dense["peak_kib"] / 1024,
        "package_seconds": pkg["seconds"], "dense_seconds": dense["seconds"], "method": pkg["method"],
        "package_largest_tensor_mib": largest["package"] / 2**20, "dense_largest_tensor_mib": largest["dense"] / 2**20,
        "quick": args.quick,
    }
    figures.update({f"machine_{k}": v for k, v in info.items()})
    del torch
    write_json(args.json, figures)


if __name__ == "__main__":
    main()
