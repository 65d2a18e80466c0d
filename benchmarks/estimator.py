"""Accuracy per network call: the published estimator against this package's default.

On isotropic Gaussian mixtures with their exact denoiser, for d in {2, 64, 512}, estimate
``-log p(x)`` of 200 test points with 256 denoiser calls per point and report, against the
exact value, the per-sample RMSE and the bias of the mean (nats and bits/dim):

  (a) published: iid logistic log-SNR draws, clip 4, scale from ``3/pi``, baseline ``h_g``;
  (b) default:   ``ITDiffusion.nll`` (stratified points, antithetic noise pairs,
                 Gaussian control variate, clip 10).

Run:  python benchmarks/estimator.py [--quick] [--json PATH]
"""

from __future__ import annotations

import argparse
import json
import math
import time

import torch

import itdiffusion as itd
from itdiffusion.core.noise import draw_example_noise
from itdiffusion.core.proposal import LogisticProposal


def mixture(d: int, seed: int) -> itd.GaussianMixture:
    """5 isotropic components, means spread ~6/sqrt(d) per axis, stds in [0.3, 1.3]."""
    gen = torch.Generator().manual_seed(seed)
    means = torch.randn(5, d, generator=gen, dtype=torch.float64) * 6.0 / math.sqrt(d)
    stds = torch.rand(5, generator=gen, dtype=torch.float64) + 0.3
    weights = torch.rand(5, generator=gen, dtype=torch.float64) + 0.5
    return itd.GaussianMixture(means, stds, weights)


def published_nll(model: itd.ITDiffusion, x: torch.Tensor, n_calls: int, seed: int) -> torch.Tensor:
    """The published estimator: h_g + 1/2 mean_i w_i (err_i - mmse_g(a_i)), iid truncated-logistic a_i."""
    spec = model.spectrum
    log_eigs = spec.log_eigs
    loc = -log_eigs.mean().item()
    scale = math.sqrt(1 + 3 / math.pi * log_eigs.var(unbiased=False).item())  # the published "3/pi"
    noise = draw_example_noise(seed, range(len(x)), n_calls, model.shape, dtype=x.dtype)
    logsnr, inv_density = LogisticProposal(loc, scale, 4.0).quantile(noise.fractions)
    errs = model.point_errors(x, logsnr, noise.eps)
    return spec.entropy() + 0.5 * (inv_density / n_calls * (errs.raw - spec.mmse(logsnr))).sum(-1)


def run(d: int, n_test: int, n_calls: int, seed: int = 0) -> dict:
    mix = mixture(d, seed=100 + d)
    gen = torch.Generator().manual_seed(seed)
    spec = itd.GaussianSpectrum.from_data(mix.sample(max(20_000, 20 * d), gen))
    model = itd.ITDiffusion(mix, spec)
    x = mix.sample(n_test, gen)
    exact = -mix.log_prob(x)
    row = {"d": d, "n_test": n_test, "calls": n_calls}
    for name, fn in (
        ("published", lambda: published_nll(model, x, n_calls, seed=1)),
        ("default", lambda: model.nll(x, n_calls, seed=1)),
    ):
        start = time.perf_counter()
        err = fn() - exact
        row[f"{name}_seconds"] = time.perf_counter() - start
        row[f"{name}_rmse_nats"] = err.pow(2).mean().sqrt().item()
        row[f"{name}_bias_nats"] = err.mean().item()
        row[f"{name}_bias_se_nats"] = err.std().item() / math.sqrt(n_test)
        row[f"{name}_bias_bpd"] = err.mean().item() / (d * math.log(2))
    row["rmse_ratio"] = row["published_rmse_nats"] / row["default_rmse_nats"]
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="fewer test points and calls (under a minute)")
    parser.add_argument("--json", help="write the figures as a flat JSON object")
    args = parser.parse_args()
    torch.set_num_threads(max(1, min(2, torch.get_num_threads())))
    n_test, n_calls = (60, 64) if args.quick else (200, 256)
    rows = [run(d, n_test, n_calls) for d in (2, 64, 512)]
    print(f"Exact-denoiser Gaussian mixtures, {n_test} test points, {n_calls} calls per point\n")
    print("| d | published RMSE (nats) | default RMSE (nats) | ratio | published bias (bpd) | default bias (bpd) ± se |")
    print("|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        se_bpd = r["default_bias_se_nats"] / (r["d"] * math.log(2))
        print(f"| {r['d']} | {r['published_rmse_nats']:.3f} | {r['default_rmse_nats']:.3f} | {r['rmse_ratio']:.1f}x "
              f"| {r['published_bias_bpd']:+.4f} | {r['default_bias_bpd']:+.5f} ± {se_bpd:.5f} |")
    if args.json:
        flat = {f"{k}_d{r['d']}": v for r in rows for k, v in r.items() if k != "d"}
        flat["speedup"] = min(r["rmse_ratio"] for r in rows if r["d"] >= 64)
        with open(args.json, "w") as fh:
            json.dump(flat, fh, indent=2)


if __name__ == "__main__":
    main()
