"""(image x point) evaluations per second of the full protocol, and the projected time of the paper's.

The workload is the real evaluation path, ``itd.Evaluator.add_batch`` with the paper's
settings: 1000 log-SNR points on the truncated-logistic quantile grid (clip 4), 256 levels,
soft rounding, dequantization (so two network calls per image and point), the DDPM
CIFAR-10 architecture (diffusers ``UNet2DModel``, 35.7M parameters; random weights, which
cost the same as trained ones) and a full-covariance Gaussian reference (dense 3072 x 3072
basis).  Images are synthetic 32x32x3 images on the 8-bit grid.

For each device variant (fp32; bf16 autocast; bf16 + channels_last; the same compiled) it
prints the network alone (images per second per call), the full evaluation ((image x point)
evaluations per second, each one image at one point with all estimates: continuous,
hard- and soft-rounded discrete, dequantized), the share of the time spent outside the
network, the estimates themselves (random weights: only their agreement across variants
means anything) and the projected time of the paper's protocol, 10,000 images x 1,000 points.

Called by ``benchmarks/gpu_check.sh``; a CPU dry run checks it end to end::

    python benchmarks/gpu_throughput.py --device cpu --quick --compile-backend eager
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

import itdiffusion as itd  # noqa: E402
from _bench import ddpm_setup, image_spectrum, machine, print_machine, synthetic_images  # noqa: E402
from itdiffusion.evaluation import EvalConfig, Evaluator  # noqa: E402
from itdiffusion.denoisers.device import DeviceOptions, optimize_denoiser  # noqa: E402

PAPER_IMAGES, PAPER_POINTS = 10_000, 1_000
GOAL_SECONDS = 30 * 60
VARIANTS = {
    "fp32": DeviceOptions(),
    "bf16": DeviceOptions(dtype="bf16"),
    "bf16+channels_last": DeviceOptions(dtype="bf16", channels_last=True),
    "bf16+channels_last+compile": DeviceOptions(dtype="bf16", channels_last=True, compile=True),
}


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure(name, options, args, device, spectrum, grid, x) -> dict:
    net, _, _ = ddpm_setup(seed=0)
    net = optimize_denoiser(net.to(device), options)
    model = itd.ITDiffusion(net, spectrum).to(device)
    config = EvalConfig(n_points=args.points, discrete=grid, soft=True, dequantize=True, placement="midpoint", clip=4.0)
    row = {"variant": name}
    # Network alone: batches of args.batch noisy images at mixed log-SNR.
    z = torch.randn(args.batch, 3, 32, 32, device=device)
    logsnr = torch.linspace(-6.0, 18.6, args.batch, device=device)
    start = time.perf_counter()
    with torch.no_grad():
        net(z, logsnr)  # first call (compiles, if asked)
        sync(device)
        row["first_call_seconds"] = time.perf_counter() - start
        for _ in range(args.warmup):
            net(z, logsnr)
        sync(device)
        start = time.perf_counter()
        for _ in range(args.net_calls):
            net(z, logsnr)
        sync(device)
    row["network_images_per_second"] = args.net_calls * args.batch / (time.perf_counter() - start)
    # Full evaluation: warm-up on one image, then the timed images.
    warm = Evaluator(model, config, batch_size=args.batch)
    warm.add_batch(x[:1])
    sync(device)
    evaluator = Evaluator(model, config, batch_size=args.batch)
    start = time.perf_counter()
    evaluator.add_batch(x)
    sync(device)
    seconds = time.perf_counter() - start
    rate = len(x) * args.points / seconds
    results = evaluator.results()
    row.update({
        "eval_seconds": seconds, "evaluations_per_second": rate,
        "network_share": min(1.0, 2 * rate / row["network_images_per_second"]),
        "projected_full_protocol_seconds": PAPER_IMAGES * PAPER_POINTS / rate,
        "bpd_continuous": results["continuous"].bpd, "bpd_discrete": results["discrete"].bpd,
        "bpd_dequantized": results["dequantized_discrete"].bpd,
    })
    if device.type == "cuda":
        row["max_memory_gib"] = torch.cuda.max_memory_allocated(device) / 2**30
    print(f"| {name} | {row['first_call_seconds']:.1f} | {row['network_images_per_second']:,.0f} "
          f"| {rate:,.0f} | {100 * (1 - row['network_share']):.0f}% "
          f"| {row['projected_full_protocol_seconds'] / 60:.1f} | {row['bpd_discrete']:.4f} |", flush=True)
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda", help="cuda (default) or cpu for a dry run")
    parser.add_argument("--points", type=int, default=PAPER_POINTS, help="log-SNR points per image (default 1000)")
    parser.add_argument("--images", type=int, default=10, help="timed images (default 10)")
    parser.add_argument("--batch", type=int, default=1000, help="(image, point) pairs per network call")
    parser.add_argument("--net-calls", type=int, default=10, help="timed network-only calls per variant")
    parser.add_argument("--warmup", type=int, default=3, help="untimed network-only calls after the first")
    parser.add_argument("--variants", default=",".join(VARIANTS), help="comma-separated, from: " + ", ".join(VARIANTS))
    parser.add_argument("--compile-backend", default="inductor", help="torch.compile backend (eager: dry run)")
    parser.add_argument("--budget", type=float, default=150.0,
                        help="start no further variant after this many seconds (compiling takes a minute or two)")
    parser.add_argument("--json", help="write the figures as a flat JSON object")
    parser.add_argument("--quick", action="store_true",
                        help="tiny sizes (8 points, 2 images, batch 8, one timed network call): a dry run")
    args = parser.parse_args()
    if args.quick:
        args.points, args.images, args.batch, args.net_calls, args.warmup = 8, 2, 8, 1, 0
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("no CUDA device: run with --device cpu for a dry run")
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True  # fixed batch shape: let cuDNN pick its fastest kernels
    began = time.perf_counter()
    info = machine(str(device))
    info["cuda"] = torch.version.cuda
    print_machine(info)
    spectrum = image_spectrum()
    grid = itd.DiscreteGrid(-1.0, 1.0, 256)
    x = synthetic_images(args.images, grid).to(device)
    print(f"\nFull evaluation: {args.points} points, soft rounding + dequantization (2 network calls per image"
          f" and point), batch {args.batch} pairs, {args.images} images\n")
    print("| variant | first call (s) | network alone (images/s) | evaluations/s | outside network "
          "| projected 10k x 1k (min) | discrete bpd |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    rows = []
    for name in args.variants.split(","):
        if time.perf_counter() - began > args.budget:
            print(f"| {name} | skipped: started after {args.budget:.0f} s | | | | | |", flush=True)
            continue
        options = VARIANTS[name]
        if options.compile:
            options = DeviceOptions(dtype=options.dtype, channels_last=options.channels_last, compile=True,
                                    compile_backend=args.compile_backend)
        try:
            rows.append(measure(name, options, args, device, spectrum, grid, x))
        except Exception as err:  # report and go on with the other variants
            print(f"| {name} | failed: {type(err).__name__}: {str(err).splitlines()[0][:120]} | | | | | |", flush=True)
        write_figures(args.json, rows, info)  # after every variant, in case a later one is cut short
    if not rows:
        raise SystemExit("no variant ran")
    best = max(rows, key=lambda r: r["evaluations_per_second"])
    minutes = best["projected_full_protocol_seconds"] / 60
    verdict = "meets" if best["projected_full_protocol_seconds"] <= GOAL_SECONDS else "misses"
    print(f"\nbest: {best['variant']}, {best['evaluations_per_second']:,.0f} (image x point) evaluations/s: "
          f"the paper's protocol ({PAPER_IMAGES:,} images x {PAPER_POINTS:,} points, continuous + soft-rounded + "
          f"dequantized) would take {minutes:.1f} min on this device ({verdict} the 30 min goal)")
    ref = rows[0]
    for r in rows[1:]:
        diff = max(abs(r[k] - ref[k]) for k in ("bpd_continuous", "bpd_discrete", "bpd_dequantized"))
        print(f"{r['variant']}: largest bpd difference from {ref['variant']}: {diff:.2e}")
    print(f"total wall time {time.perf_counter() - began:.0f} s")


def write_figures(path, rows, info) -> None:
    if not path or not rows:
        return
    best = max(rows, key=lambda r: r["evaluations_per_second"])
    figures = {"best_variant": best["variant"], "best_evaluations_per_second": best["evaluations_per_second"],
               "projected_full_protocol_seconds": best["projected_full_protocol_seconds"]}
    for r in rows:
        figures.update({f"{r['variant']}_{k}": v for k, v in r.items() if k != "variant"})
    figures.update({f"machine_{k}": v for k, v in info.items()})
    with open(path, "w", encoding="utf-8") as fh:
        json.dump(figures, fh, indent=2, sort_keys=True)


if __name__ == "__main__":
    main()
