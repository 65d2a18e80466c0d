"""Cost of the information-theoretic training objective against a plain epsilon-MSE step.

One optimisation step (forward, backward, Adam update) of the same network on the same
batch, two ways:

* **IT**: ``ITDiffusion.loss`` (stratified log-SNR per example over the training range,
  importance weights, the Gaussian control variate on the same noise in float64, the
  Gaussian's ``-log N(x)``);
* **plain**: log-SNR drawn from the same proposal, ``mean ||eps - eps_hat||^2``.

Networks: the digits U-Net (``SmallUNet``, 8x8x1) and the DDPM CIFAR-10 architecture
(diffusers ``UNet2DModel``, 35.7M parameters, random weights, full-covariance Gaussian
reference).  Steps alternate (IT, plain, IT, ...) after warm-up; the figure is the median
of the ratios of neighbouring steps (robust to the load of a shared machine drifting).

Run:  python benchmarks/train_step.py [--quick] [--json PATH] [--threads 1|2]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

import itdiffusion as itd  # noqa: E402
from _bench import (  # noqa: E402
    add_common_args, ddpm_setup, digits_setup, machine, median, print_machine, set_threads, synthetic_images,
    timed, write_json,
)
from itdiffusion.core.channel import add_noise  # noqa: E402
from itdiffusion.core.proposal import LogisticProposal  # noqa: E402


def compare(name: str, net, spectrum, x: torch.Tensor, steps: int) -> dict:
    net.train()
    model = itd.ITDiffusion(net, spectrum)
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-5)
    gen = torch.Generator().manual_seed(0)

    def it_step():
        loss = model.loss(x, generator=gen)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    def plain_step():
        u = torch.rand(len(x), generator=gen, dtype=torch.float64)
        if getattr(model, "train_proposal", "logistic") == "uniform":  # the IT loss's own proposal
            lo, hi = model.logsnr_range(model.train_clip)
            logsnr = lo + (hi - lo) * u
        else:
            logsnr, _ = LogisticProposal(model.loc, model.scale, model.train_clip).quantile(u)
        eps = torch.randn(x.shape, generator=gen, dtype=x.dtype)
        eps_hat = model(add_noise(x, logsnr, eps), logsnr)
        loss = ((eps - eps_hat) ** 2).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    for fn in (it_step, plain_step):  # warm-up
        fn()
    times = {"it": [], "plain": []}
    for _ in range(steps):
        times["it"].append(timed(it_step))
        times["plain"].append(timed(plain_step))
    t_it, t_plain = median(times["it"]), median(times["plain"])
    paired = median([a / b for a, b in zip(times["it"], times["plain"])])  # neighbours in time
    row = {"network": name, "batch": len(x), "steps": steps, "it_seconds": t_it, "plain_seconds": t_plain,
           "overhead_ratio": paired, "ratio_of_medians": t_it / t_plain}
    print(f"| {name} | {len(x)} | {1e3 * t_plain:.1f} | {1e3 * t_it:.1f} | {row['overhead_ratio']:.3f} |", flush=True)
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_common_args(parser)
    args = parser.parse_args()
    set_threads(args.threads)
    info = machine()
    print_machine(info)
    digits_batch, digits_steps = (128, 30) if args.quick else (256, 40)
    ddpm_batch, ddpm_steps = (2, 7) if args.quick else (8, 8)
    print("\nOne training step (forward + backward + Adam): median step times; ratio: median of neighbouring pairs\n")
    print("| network | batch | plain eps-MSE step (ms) | IT step (ms) | ratio |")
    print("|---|---:|---:|---:|---:|")
    rows = []
    net, _, spectrum, _ = digits_setup()
    from itdiffusion.data.toy import load_dataset

    x = load_dataset("digits").train[:digits_batch]
    rows.append(compare("digits U-Net", net, spectrum, x, digits_steps))
    net, spectrum, grid = ddpm_setup()
    rows.append(compare("DDPM CIFAR-10 (random weights)", net, spectrum, synthetic_images(ddpm_batch, grid), ddpm_steps))
    figures = {"overhead_ratio": max(r["overhead_ratio"] for r in rows), "quick": args.quick}
    for r, key in zip(rows, ("digits", "ddpm")):
        figures.update({f"{key}_{k}": v for k, v in r.items() if k != "network"})
    figures.update({f"machine_{k}": v for k, v in info.items()})
    print(f"\nIT step / plain step (largest of the two networks): {figures['overhead_ratio']:.3f}")
    write_json(args.json, figures)


if __name__ == "__main__":
    main()
