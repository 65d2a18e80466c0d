"""Error against the exact NLL versus network calls: IT, variational bounds and the ODE likelihood.

On the built-in Gaussian mixtures (``itdiffusion.baselines.compare.demo_mixture``, 5 isotropic
components, exact denoiser, exact density) in d = 2, 64 and 512 dimensions, every method
runs through ``itd.compare`` at several budgets on the same examples:

- ``it``: the IT estimate with n network calls per example (package defaults otherwise);
- ``vlb``: the discrete-time variational bound on a log-SNR-linear schedule of T = n steps
  spanning the model's range (``fixed_large_beta1`` variances: ``beta_1`` at t = 1, the
  calibrated decoder of continuous data; DDPM's ``fixed_large`` takes ``beta_tilde_2`` there,
  a much looser bound on a density), one call per step;
- ``vlb-ct``: the continuous-time bound with n calls (same points and control variate as IT);
- ``ode``: the probability-flow ODE, RK4 with a fixed number of steps (and Dormand-Prince at
  rtol = atol = 1e-5 for reference); exact divergence for d = 2, Hutchinson with 1, 4 or 16
  Rademacher probes otherwise.

Calls per example count network passes: forward evaluations, plus for the ODE the backward
passes of its divergence (``NFE * (1 + probes)``; the NFE alone is printed too).  The
error is the per-example root mean square error against the exact ``-log p(x)``, in bits
per dimension; the mean error of the data-set average (with its standard error) is
printed beside it.

Goals checked (and reported, met or not): at equal calls the IT estimate has the lowest
error of the methods (no rival's best configuration within the same number of calls is
more than 2% lower; the continuous-time bound shares IT's points and noise and differs
from it only by analytic end terms, so it ties); it reaches an RMSE of 0.01 bits/dim with
at least 5x fewer calls than the ODE.

    python benchmarks/compare.py --quick --json quick.json
    python benchmarks/compare.py --png benchmarks/compare.png --json benchmarks/compare.json
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import torch

import itdiffusion as itd
from itdiffusion.baselines import EXACT_TRACE_MAX_D
from itdiffusion.baselines.compare import demo_mixture

TARGET_BPD = 0.01
TIE = 0.02  # a rival within 2% of IT's error counts as a tie (vlb-ct shares IT's points and noise)
LABELS = {"it": "IT", "vlb": "VLB (discrete time)", "vlb-ct": "VLB (continuous time)", "ode": "ODE"}


def settings(quick: bool) -> dict:
    if quick:
        return {"dims": (2, 64, 512), "examples": 64, "budgets": (8, 32, 128, 512),
                "ode_steps": (1, 2, 4, 8), "probes": (1, 4), "dopri": True}
    return {"dims": (2, 64, 512), "examples": 200, "budgets": (8, 16, 32, 64, 128, 256, 512, 1024, 2048),
            "ode_steps": (1, 2, 4, 8, 16, 32), "probes": (1, 4, 16), "dopri": True}


def runs(d: int, cfg: dict) -> list[tuple[str, str, dict]]:
    """(method, label, options) for every configuration at dimension d."""
    out = []
    for n in cfg["budgets"]:
        out.append(("it", f"n={n}", {"n_points": n}))
        out.append(("vlb", f"T={n}", {"steps": n, "variance": "fixed_large_beta1"}))
        out.append(("vlb-ct", f"n={n}", {"n_points": n}))
    probes = (None,) if d <= EXACT_TRACE_MAX_D else cfg["probes"]
    for p in probes:
        trace = {"trace": "exact"} if p is None else {"trace": "hutchinson", "n_probes": p}
        tag = "exact trace" if p is None else f"{p} probe{'s' if p > 1 else ''}"
        for steps in cfg["ode_steps"]:
            out.append(("ode", f"rk4 {steps} steps, {tag}", {"solver": "rk4", "n_steps": steps, **trace}))
        if cfg["dopri"]:
            out.append(("ode", f"dopri5 tol 1e-5, {tag}", {"solver": "dopri5", "rtol": 1e-5, "atol": 1e-5, **trace}))
    return out


def measure(d: int, cfg: dict, seed: int) -> list[dict]:
    mixture, spectrum = demo_mixture(d, seed=0)
    model = itd.ITDiffusion(mixture, spectrum)
    x = mixture.sample(cfg["examples"], torch.Generator().manual_seed(seed))
    rows = []
    for method, label, options in runs(d, cfg):
        table = itd.compare(model, x, (method,), seed=seed + 1, options={method: options})
        res = table[method]
        bits = d * math.log(2)
        rows.append({
            "d": d, "method": method, "config": label, "calls": res.calls_per_example,
            "nfe": res.settings.get("nfe", res.calls_per_example),
            "rmse_bpd": res.rmse / bits, "bias_bpd": res.error / bits, "bias_se_bpd": res.error_se / bits,
            "seconds": res.seconds,
        })
        print(f"  d={d:<4d} {LABELS[method]:22s} {label:30s} {rows[-1]['calls']:8.0f} calls  "
              f"RMSE {rows[-1]['rmse_bpd']:.5f} bpd  ({res.seconds:.2f} s)", file=sys.stderr, flush=True)
    return rows


def best_within(rows: list[dict], method: str, calls: float) -> float:
    """Lowest RMSE of ``method`` using at most ``calls`` calls per example (inf if none)."""
    errors = [r["rmse_bpd"] for r in rows if r["method"] == method and r["calls"] <= calls]
    return min(errors, default=math.inf)


def calls_to_reach(rows: list[dict], method: str, target: float) -> float:
    """Fewest calls at which ``method`` has RMSE <= target (inf if never)."""
    calls = [r["calls"] for r in rows if r["method"] == method and r["rmse_bpd"] <= target]
    return min(calls, default=math.inf)


def goals(rows: list[dict], d: int) -> dict:
    mine = [r for r in rows if r["d"] == d]
    it_rows = [r for r in mine if r["method"] == "it"]
    lost = []
    for r in it_rows:
        rivals = {m: best_within(mine, m, r["calls"]) for m in ("vlb", "vlb-ct", "ode")}
        winner = min(rivals, key=rivals.get)
        if rivals[winner] < (1.0 - TIE) * r["rmse_bpd"]:
            lost.append(f"{int(r['calls'])} calls: {LABELS[winner]} {rivals[winner]:.4f} < IT {r['rmse_bpd']:.4f}")
    it_calls, ode_calls = calls_to_reach(mine, "it", TARGET_BPD), calls_to_reach(mine, "ode", TARGET_BPD)
    ratio = ode_calls / it_calls if math.isfinite(it_calls) else math.nan
    return {
        "it_lowest_at_equal_calls": not lost, "it_beaten_at": lost,
        "it_calls_to_target": it_calls, "ode_calls_to_target": ode_calls,
        "ode_over_it_calls_to_target": ratio,
        "it_5x_fewer_calls_than_ode": bool(math.isfinite(it_calls) and ratio >= 5),
    }


def print_tables(rows: list[dict], dims) -> None:
    for d in dims:
        print(f"\n### d = {d}\n")
        print("| method | configuration | calls/example | NFE | RMSE (bpd) | mean error (bpd) | ± se | seconds |")
        print("|---|---|---:|---:|---:|---:|---:|---:|")
        for r in (r for r in rows if r["d"] == d):
            print(f"| {LABELS[r['method']]} | {r['config']} | {r['calls']:.0f} | {r['nfe']:.0f} | {r['rmse_bpd']:.5f} "
                  f"| {r['bias_bpd']:+.5f} | {r['bias_se_bpd']:.5f} | {r['seconds']:.2f} |")


def print_goals(summary: dict) -> None:
    print(f"\n### Goals (per-example RMSE, target {TARGET_BPD} bits/dim; rivals within {TIE:.0%} of IT tie)\n")
    print("| d | IT lowest at equal calls | IT calls to target | ODE calls to target | ODE / IT | >= 5x |")
    print("|---:|---|---:|---:|---:|---|")
    for d, g in summary.items():
        print(f"| {d} | {'yes' if g['it_lowest_at_equal_calls'] else 'no'} | {_calls(g['it_calls_to_target'])} "
              f"| {_calls(g['ode_calls_to_target'])} | {g['ode_over_it_calls_to_target']:.2f} "
              f"| {'yes' if g['it_5x_fewer_calls_than_ode'] else 'no'} |")
    for d, g in summary.items():
        for line in g["it_beaten_at"]:
            print(f"- d = {d}: IT not lowest at {line}")


def _calls(value: float) -> str:
    return "never" if math.isinf(value) else f"{value:.0f}"


def plot(rows: list[dict], dims, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(dims), figsize=(4.6 * len(dims), 4.0), squeeze=False)
    # vlb-ct first and dashed: it shares IT's points and noise and lies on top of IT's curve
    styles = {"vlb-ct": ("C2", "^", "--"), "vlb": ("C1", "s", "-"), "ode": ("C3", "D", "-"), "it": ("C0", "o", "-")}
    for ax, d in zip(axes[0], dims):
        for method, (color, marker, line) in styles.items():
            pts = sorted((r["calls"], r["rmse_bpd"]) for r in rows if r["d"] == d and r["method"] == method)
            if method == "ode":  # the ODE's configurations: scatter, and the best error within each budget
                ax.scatter(*zip(*pts), color=color, marker=marker, s=14, alpha=0.5)
                front = [(c, min(e for cc, e in pts if cc <= c)) for c, _ in pts]
                ax.step(*zip(*front), where="post", color=color, label=LABELS[method] + " (best within calls)")
            else:
                ax.plot(*zip(*pts), color=color, marker=marker, ms=4 if method == "it" else 6, ls=line,
                        label=LABELS[method], zorder=3 if method == "it" else 2)
        ax.axhline(TARGET_BPD, color="grey", ls="--", lw=0.8)
        ax.set(xscale="log", yscale="log", title=f"d = {d}", xlabel="network passes per example",
               ylabel="RMSE vs exact NLL (bits/dim)")
        ax.grid(True, which="major", alpha=0.3)
    axes[0][0].legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)


def flat_figures(rows: list[dict], summary: dict, cfg: dict, seconds: float) -> dict:
    flat = {"examples": cfg["examples"], "target_bpd": TARGET_BPD, "seconds_total": seconds}
    for r in rows:
        key = f"d{r['d']}/{r['method']}/{r['config']}"
        for field in ("calls", "nfe", "rmse_bpd", "bias_bpd", "bias_se_bpd", "seconds"):
            flat[f"{key}/{field}"] = r[field]
    for d, g in summary.items():
        for field, value in g.items():
            flat[f"d{d}/goal/{field}"] = "; ".join(value) if isinstance(value, list) else value
    return {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in flat.items()}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="fewer examples and budgets (under a minute)")
    parser.add_argument("--json", type=Path, help="write the figures as flat JSON")
    parser.add_argument("--png", type=Path, help="write the error-versus-calls plot")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (small tensors: 1 is fastest)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    cfg = settings(args.quick)
    start = time.perf_counter()
    rows = [row for d in cfg["dims"] for row in measure(d, cfg, args.seed)]
    summary = {d: goals(rows, d) for d in cfg["dims"]}
    seconds = time.perf_counter() - start
    print(f"# Likelihood methods on Gaussian mixtures ({cfg['examples']} examples, exact denoiser)")
    print_tables(rows, cfg["dims"])
    print_goals(summary)
    print(f"\n{seconds:.1f} s in all")
    if args.png:
        plot(rows, cfg["dims"], args.png)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(flat_figures(rows, summary, cfg, seconds), indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
