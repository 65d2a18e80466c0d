"""Full evaluation throughput: this package versus the published loop, side by side.

Both compute, for the same images, network and log-SNR points, the continuous NLL, the
soft-rounded discrete bound and the dequantized NLL:

* **package**: ``itd.evaluate(..., soft=True, dequantize=True)``: the raw, hard- and
  soft-rounded errors from one network call on the same noise, a second call for the
  dequantized data, (image, point) pairs batched across points, soft rounding without the
  ``(levels x batch x d)`` tensor, float64 errors, Gaussian control variate;
* **published**: :mod:`published_loop`: a loop over points with a batch of images, three
  calls per (image, point), dense soft rounding over all levels.

Networks: the digits U-Net (``SmallUNet``, 8x8x1, 17 levels) and the DDPM CIFAR-10
architecture (diffusers ``UNet2DModel``, 35.7M parameters, random weights, 32x32x3, 256
levels) at a small batch.  Both variants use the same network batch (pairs per call).
Runs alternate (package, published, package, ...); the speedup is the median of the ratios
of neighbouring runs (robust to the load of a shared machine drifting).

Run:  python benchmarks/eval_throughput.py [--quick] [--json PATH] [--threads 1|2]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

import itdiffusion as itd  # noqa: E402
from _bench import (  # noqa: E402
    Counting, add_common_args, ddpm_setup, digits_setup, machine, median, print_machine, set_threads,
    synthetic_images, timed, write_json,
)
from published_loop import published_evaluation  # noqa: E402

CLIP = 4.0  # the paper's evaluation range


def compare(name: str, net, x, spectrum, grid, n_points: int, batch: int, repeats: int) -> dict:
    counter = Counting(net)
    model = itd.ITDiffusion(counter, spectrum, clip=CLIP)
    quad = model.estimator(n_points, placement="midpoint", clip=CLIP, antithetic=False).shared_quadrature()
    logsnr, weights = quad.logsnr, quad.weights

    def package():
        return itd.evaluate(model, [x], n_points, discrete=grid, soft=True, dequantize=True,
                            batch_size=batch, clip=CLIP, seed=0)

    def published():
        gen = torch.Generator().manual_seed(0)
        return [published_evaluation(counter, x[i : i + batch], logsnr.float(), weights.float(), grid, spectrum, gen)
                for i in range(0, len(x), batch)]

    with torch.no_grad():  # warm-up: one network call of the batch size
        counter(x[:batch], torch.zeros(min(batch, len(x))))
    pairs = len(x) * n_points
    fns = {"package": package, "published": published}
    times, calls, outside = {name: [] for name in fns}, {}, {name: [] for name in fns}
    for _ in range(repeats):  # alternate, so that changes in the machine's load hit both alike
        for variant, fn in fns.items():
            counter.examples, counter.seconds = 0, 0.0
            times[variant].append(timed(fn))
            calls[variant] = counter.examples / pairs
            outside[variant].append(times[variant][-1] - counter.seconds)
    t_pkg, t_pub = median(times["package"]), median(times["published"])
    row = {
        "network": name, "images": len(x), "points": n_points, "batch": batch, "repeats": repeats,
        "package_seconds": t_pkg, "published_seconds": t_pub,
        "package_ms_per_pair": 1e3 * t_pkg / pairs, "published_ms_per_pair": 1e3 * t_pub / pairs,
        "package_calls_per_point": calls["package"], "published_calls_per_point": calls["published"],
        "package_outside_network_ms_per_pair": 1e3 * median(outside["package"]) / pairs,
        "published_outside_network_ms_per_pair": 1e3 * median(outside["published"]) / pairs,
        "speedup": median([b / a for a, b in zip(times["package"], times["published"])]),  # neighbours in time
        "ratio_of_medians": t_pub / t_pkg,
        "package_times": times["package"], "published_times": times["published"],
    }
    print(f"| {name} | {len(x)} x {n_points} | {batch} | {row['published_ms_per_pair']:.2f} "
          f"({row['published_outside_network_ms_per_pair']:.3f}) | {row['package_ms_per_pair']:.2f} "
          f"({row['package_outside_network_ms_per_pair']:.3f}) | {row['speedup']:.2f}x "
          f"| {calls['published']:g} -> {calls['package']:g} |", flush=True)
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_common_args(parser)
    args = parser.parse_args()
    set_threads(args.threads)
    info = machine()
    print_machine(info)
    if args.quick:
        digits_size = dict(images=128, n_points=16, batch=128, repeats=3)
        ddpm_size = dict(images=4, n_points=8, batch=4, repeats=2)
    else:
        digits_size = dict(images=256, n_points=64, batch=256, repeats=5)
        ddpm_size = dict(images=8, n_points=8, batch=8, repeats=3)
    print("\nFull evaluation (continuous + soft-rounded + dequantized): wall time per (image, point),"
          " in brackets the part spent outside the network\n")
    print("| network | images x points | batch | published ms | package ms | speedup | calls per (image, point) |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    rows = []
    net, test, spectrum, grid = digits_setup()
    rows.append(compare("digits U-Net", net, test[: digits_size["images"]], spectrum, grid,
                        digits_size["n_points"], digits_size["batch"], digits_size["repeats"]))
    net, spectrum, grid = ddpm_setup()
    x = synthetic_images(ddpm_size["images"], grid)
    rows.append(compare("DDPM CIFAR-10 (random weights)", net, x, spectrum, grid,
                        ddpm_size["n_points"], ddpm_size["batch"], ddpm_size["repeats"]))
    figures = {
        "speedup": min(r["speedup"] for r in rows),
        "calls_per_point": max(r["package_calls_per_point"] for r in rows),
        "published_calls_per_point": max(r["published_calls_per_point"] for r in rows),
        "quick": args.quick,
    }
    for r, key in zip(rows, ("digits", "ddpm")):
        for k, v in r.items():
            if k != "network" and not isinstance(v, list):
                figures[f"{key}_{k}"] = v
    figures.update({f"machine_{k}": v for k, v in info.items()})
    print(f"\nspeedup (smallest of the two networks): {figures['speedup']:.2f}x; "
          f"network calls per (image, point): {figures['published_calls_per_point']:g} -> {figures['calls_per_point']:g}")
    write_json(args.json, figures)


if __name__ == "__main__":
    main()
