"""Zero-shot classification with a diffusion model: network calls needed for a given accuracy.

A class-conditional Gaussian mixture (``ClassMixture``, one isotropic component per class) with
its exact conditional denoiser, so the exact Bayes classifier (uniform prior over the classes)
is known.  For each budget of calls per candidate class, three estimators of the ``(B, K)``
table ``log p(x | y_k)``:

- independent: each candidate's ``-model.nll(x, y=k)`` on its own noise (another seed);
- shared: ``model.classify`` (every candidate on the same noise and points);
- shared + early drop: ``model.classify(early_drop=3, rounds=4)``; its calls are those spent.

Reported per method and budget: agreement of the argmax with the exact Bayes decision, the
posterior's L1 error, and the calls per image (all candidates).  Then, for target agreements,
the fewest calls per image that reach them and the ratios between methods (measured, printed).

Run:  python benchmarks/classify.py [--quick] [--json PATH]
"""

from __future__ import annotations

import argparse
import json
import time

import torch

import itdiffusion as itd


def make_law(d: int, k: int, seed: int = 0) -> itd.ClassMixture:
    gen = torch.Generator().manual_seed(seed)
    means = torch.randn(k, d, generator=gen, dtype=torch.float64) * 0.55
    return itd.ClassMixture(means, torch.rand(k, generator=gen, dtype=torch.float64) * 0.3 + 0.7)


def run_method(model, x, k: int, n: int, method: str, seed: int):
    t0 = time.perf_counter()
    if method == "independent":
        scores = torch.stack([-model.nll(x, n, seed=seed + 1 + j, y=j) for j in range(k)], 1)
        calls = len(x) * k * n
    elif method == "shared":
        scores = model.classify(x, k, n, seed=seed)
        calls = len(x) * k * n
    else:
        scores, used = model.classify(x, k, n, seed=seed, early_drop=3.0, rounds=4, return_calls=True)
        calls = int(used.sum())
    return scores, calls / len(x), time.perf_counter() - t0


def fewest_calls(rows: list[dict], method: str, target: float):
    ok = [r["calls_per_image"] for r in rows if r["method"] == method and r["agreement"] >= target]
    return min(ok) if ok else None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="fewer images and budgets")
    parser.add_argument("--json", help="write the rows here")
    args = parser.parse_args()
    d, k, n_images = 16, 10, 100 if args.quick else 300
    budgets = (4, 16, 64) if args.quick else (4, 8, 16, 32, 64, 128, 256)
    law = make_law(d, k)
    x, labels = law.sample_labelled(n_images, torch.Generator().manual_seed(1))
    model = itd.ITDiffusion(law, itd.GaussianSpectrum.from_data(law.sample(4000, torch.Generator().manual_seed(2))))
    exact = law.posterior(x, uniform=True)
    bayes = exact.argmax(1)
    print(f"ClassMixture d={d}, K={k}, {n_images} images: exact Bayes accuracy {(bayes == labels).double().mean():.3f}, "
          f"mean max posterior {exact.max(1).values.mean():.3f}")
    print(f"{'method':<22}{'calls/cand':>11}{'calls/img':>11}{'agree':>8}{'L1':>8}{'s':>7}")
    rows = []
    for n in budgets:
        for method in ("independent", "shared", "shared+drop"):
            scores, per_image, secs = run_method(model, x, k, n, method, seed=0)
            post = torch.softmax(scores, 1)
            row = {"method": method, "calls_per_candidate": n, "calls_per_image": per_image,
                   "agreement": float((post.argmax(1) == bayes).double().mean()),
                   "l1": float((post - exact).abs().sum(1).mean()), "seconds": secs}
            rows.append(row)
            print(f"{method:<22}{n:>11}{per_image:>11.0f}{row['agreement']:>8.3f}{row['l1']:>8.3f}{secs:>7.1f}")
    print("\nfewest calls per image (all candidates) reaching an agreement with the Bayes decision:")
    for target in (0.9, 0.95, 0.98):
        found = {m: fewest_calls(rows, m, target) for m in ("independent", "shared", "shared+drop")}
        text = ", ".join(f"{m} {'-' if v is None else f'{v:.0f}'}" for m, v in found.items())
        ratio = ""
        if found["independent"] and found["shared"]:
            ratio += f"; independent/shared {found['independent'] / found['shared']:.1f}x"
        if found["shared"] and found["shared+drop"]:
            ratio += f"; shared/shared+drop {found['shared'] / found['shared+drop']:.1f}x"
        print(f"  {target:.0%}: {text}{ratio}")
    same = [r for r in rows if r["method"] != "shared+drop"]
    for n in budgets:
        ind, sh = (next(r for r in same if r["method"] == m and r["calls_per_candidate"] == n)
                   for m in ("independent", "shared"))
        print(f"  {n:>4} calls/candidate: posterior L1 independent/shared {ind['l1'] / max(sh['l1'], 1e-12):.1f}x")
    if args.json:
        with open(args.json, "w", encoding="utf-8") as fh:
            json.dump({"d": d, "k": k, "images": n_images, "rows": rows}, fh, indent=1)


if __name__ == "__main__":
    main()
