"""Rounding with a trained network: the digits DDPM fixture (tests/fixtures/digits-ddpm) on 17 levels.

Tunes on ``--pilot`` training images (``--calls`` per image, pilot budget 64 images' calls at most),
then bounds ``-log P(x)`` of ``--n`` test images with hard, soft, raw and ``auto`` (tuned) rounding on
the same noise; prints each bound's mean (bits/dim) and the paired difference auto - hard/soft ± its se.

Run:  python benchmarks/adaptive_digits.py [--n 100] [--calls 64] [--pilot 32]
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path

import torch

import itdiffusion as itd
from itdiffusion.data.toy import load_dataset
from itdiffusion.denoisers import DiffusersDenoiser

FIXTURE = Path(__file__).resolve().parent.parent / "tests" / "fixtures" / "digits-ddpm"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=100)
    parser.add_argument("--calls", type=int, default=64)
    parser.add_argument("--pilot", type=int, default=32)
    args = parser.parse_args()
    torch.set_num_threads(1)
    data = load_dataset("digits")
    grid = itd.DiscreteGrid(-1.0, 1.0, 17)
    model = itd.ITDiffusion(DiffusersDenoiser.from_pretrained(FIXTURE), itd.GaussianSpectrum.from_data(data.train))
    x, pilot = data.test[: args.n].float(), data.train[: args.pilot].float()
    bpd = lambda v: v / (model.d * math.log(2))  # noqa: E731
    with torch.no_grad():
        model.tune(pilot, args.pilot * args.calls, generator=torch.Generator().manual_seed(5), discrete=grid,
                   calls_per_example=args.calls)
        fit = model.tuning
        out = {r: bpd(model.nll(x, args.calls, seed=1, discrete=grid, rounding=r)) for r in ("hard", "soft", "none")}
        out["auto"] = bpd(model.nll(x, args.calls, seed=1, discrete=grid))
    print(f"{args.n} test images, {args.calls} calls, pilot {fit.pilot['calls']} calls; layout "
          f"{'groups' if fit.antithetic else 'points'}; auto regions {fit.pilot.get('rounding_regions')}")
    for r, v in out.items():
        print(f"{r:5s}: {v.mean().item():.4f} bits/dim (se {v.std().item() / math.sqrt(len(v)):.4f})")
    for r in ("hard", "soft"):
        diff = out["auto"] - out[r]
        print(f"auto - {r}: {diff.mean().item():+.4f} ± {diff.std().item() / math.sqrt(len(diff)):.4f} bits/dim")


if __name__ == "__main__":
    main()
