"""``itd compare``: the IT estimate, variational bounds and the ODE likelihood on one model.

Examples::

    itd compare --model gmm-exact --data sample:200 --dim 64 --methods it,vlb,vlb-ct,ode
    itd compare --model iddpm-cifar10-vlb --weights cifar10_uncond_vlb_50M_500K.pt \\
        --data test_images.npy --limit 16 --methods it,vlb --points 256 --out results/compare.json
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path

from . import UsageError
from ._common import DATA_HELP, MODEL_HELP, add_device_arg

GMM = "gmm-exact"
SAMPLE_PREFIX = "sample:"


def add_parser(subparsers) -> None:
    p = subparsers.add_parser(
        "compare",
        help="compare likelihood methods (IT, variational bounds, ODE) on one model",
        description="Per-method NLL, standard error, network calls per example and wall time in one table. "
        "With an analytic model (gmm-exact) the exact value is added.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--model", required=True,
                   help=f"'{GMM}' (built-in Gaussian mixture with its exact denoiser and density), or {MODEL_HELP}")
    p.add_argument("--weights", help="weights of a registered model: a file, a diffusers folder or a Hub repo id")
    p.add_argument("--class-label", type=int, help="class-conditional diffusers models: -log p(x | y) at this class")
    p.add_argument("--data", required=True,
                   help=f"a .npy file of examples (N, *shape), or what itd eval reads ({DATA_HELP}; its test split); "
                        f"with {GMM} also '{SAMPLE_PREFIX}N' to draw N examples from the mixture")
    p.add_argument("--methods", default="it,vlb,ode", help="comma-separated: it, vlb, vlb-ct, ode")
    p.add_argument("--limit", type=int, help="use only the first N examples")
    p.add_argument("--dim", type=int, default=64, help=f"dimension of the {GMM} mixture when sampling its data")
    p.add_argument("--components", type=int, default=5, help=f"components of the {GMM} mixture")
    p.add_argument("--mixture-seed", type=int, default=0, help=f"seed that defines the {GMM} mixture")
    p.add_argument("--spectrum", help="GaussianSpectrum .npz of the data (default: computed from the data, and "
                   "with --out saved beside it as OUT.spectrum.npz; any Gaussian reference gives a valid estimate)")
    p.add_argument("--points", "--n-points", dest="n_points", metavar="POINTS", type=int, default=256,
                   help="IT and continuous-time bound: calls per example (itd eval's --points)")
    p.add_argument("--vlb-steps", type=int, default=None,
                   help="discrete-time bound: steps of the default schedule (models without their own)")
    p.add_argument("--vlb-calls", type=int, default=None,
                   help="discrete-time bound: estimate from this many stratified steps instead of all")
    p.add_argument("--variance", default="auto",
                   choices=["auto", "fixed_small", "fixed_large", "fixed_large_beta1", "learned"],
                   help="discrete-time bound: reverse-step variances (fixed_large: DDPM's and IDDPM's, beta_tilde_2 "
                        "at t = 1; fixed_large_beta1: beta_1 there)")
    p.add_argument("--solver", default="dopri5", choices=["dopri5", "rk4", "heun", "euler"], help="ODE solver")
    p.add_argument("--ode-steps", type=int, default=50, help="ODE: steps of a fixed-step solver")
    p.add_argument("--tol", type=float, default=1e-5, help="ODE: rtol and atol of the adaptive solver")
    p.add_argument("--trace", default="auto", choices=["auto", "exact", "hutchinson"], help="ODE: divergence")
    p.add_argument("--probes", type=int, default=1, help="ODE: Hutchinson probes per example")
    p.add_argument("--seed", type=int, default=0, help="seed of every method's noise")
    p.add_argument("--batch-size", type=int, help="(example, point) pairs per network call")
    add_device_arg(p, distributed=False)
    p.add_argument("--threads", type=int,
                   help=f"torch CPU threads (default: 1 for {GMM}, whose tensors are small, else torch's default)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out (and its .md)")
    p.add_argument("--format", default="markdown", choices=["markdown", "json"], help="what to print")
    p.add_argument("--out", help="write the table as JSON to this path and as Markdown beside it (.md)")
    p.set_defaults(func=run)


def parse_methods(text: str) -> list[str]:
    from ..baselines.compare import METHODS

    methods = [m.strip() for m in text.split(",") if m.strip()]
    unknown = [m for m in methods if m not in METHODS]
    if unknown or not methods:
        raise UsageError(f"unknown method(s) {', '.join(unknown) or '(none)'}; choose from {', '.join(METHODS)}")
    if len(set(methods)) != len(methods):
        raise UsageError(f"method listed twice in {text!r}")
    return methods


def load_data(source: str):
    """Examples from a ``.npy`` file as a tensor ``(N, *shape)``.

    Read by :func:`itdiffusion.fileio.load_npy`: no pickles, and a header that declares more
    data than the file holds is refused before anything is allocated.
    """
    import numpy as np
    import torch

    from .. import fileio as _io

    path = Path(source)
    if path.suffix != ".npy":
        raise UsageError(f"--data must be a .npy file (or {SAMPLE_PREFIX}N with {GMM}), got {source!r}")
    array = _io.load_npy(path)
    if array.dtype.kind not in "fiu" or array.ndim < 2 or len(array) == 0:
        raise UsageError(f"{path}: expected a non-empty numeric array of shape (N, *shape), got {array.dtype} "
                         f"{array.shape}")
    if array.dtype.kind == "f" and not np.isfinite(array).all():
        raise UsageError(f"{path}: contains NaN or Inf")
    return torch.from_numpy(np.ascontiguousarray(array))


def _gmm_setup(args):
    import torch

    from ..baselines.compare import demo_mixture
    from ..model import ITDiffusion

    if args.weights or args.spectrum or args.class_label is not None:
        raise UsageError(f"{GMM} is built in: it takes no --weights, --spectrum or --class-label")
    if args.data.startswith(SAMPLE_PREFIX):
        n = _positive_int(args.data[len(SAMPLE_PREFIX):], "--data sample:N")
        if n * args.dim > MAX_SAMPLED:
            raise UsageError(f"--data sample:N: at most {MAX_SAMPLED // args.dim:,} examples of dimension {args.dim}, "
                             f"got {n:,}")
        mixture, spectrum = demo_mixture(args.dim, args.components, args.mixture_seed)
        x = mixture.sample(n, torch.Generator().manual_seed(args.seed))
    else:
        x = load_data(args.data).double()
        x = x.reshape(len(x), -1)
        mixture, spectrum = demo_mixture(x.shape[1], args.components, args.mixture_seed)
    return ITDiffusion(mixture, spectrum), x, None, None


def _images(source: str):
    """``(x, grid)`` of a ``--data`` that is not a ``.npy`` file, read as ``itd eval`` reads it (its test split)."""
    from ..data.images import load_data as load_images

    data = load_images(source, "test")
    return data.x, data.grid


def _model_setup(args):
    """Any ``--model`` that ``itd eval`` takes (:func:`itdiffusion.resolve.resolve_model`), with its data."""
    import torch

    from ..core.grid import DiscreteGrid
    from ..core.spectrum import GaussianSpectrum
    from ..model import ITDiffusion
    from ..resolve import registry_shape, resolve_model

    if args.data.startswith(SAMPLE_PREFIX):
        raise UsageError(f"{SAMPLE_PREFIX}N needs an analytic model ({GMM}); give a .npy file")
    x, image_grid = (load_data(args.data), None) if Path(args.data).suffix == ".npy" else _images(args.data)
    shape = registry_shape(args.model)
    if shape is not None and tuple(x.shape[1:]) != shape:  # before the network is built
        raise UsageError(f"{args.model} models examples of shape {shape}; {args.data} holds {tuple(x.shape[1:])}")
    eight_bit = x.dtype == torch.uint8
    x = x[: args.limit] if args.limit else x
    if eight_bit:  # 8-bit images: map 0..255 onto [-1, 1], the diffusers and registry convention
        x = DiscreteGrid(-1.0, 1.0, 256).value(x.double())
    x = x.float()
    if args.spectrum:
        spectrum = GaussianSpectrum.load(args.spectrum)
        if tuple(spectrum.shape) != tuple(x.shape[1:]):
            raise UsageError(f"the spectrum {args.spectrum} is for examples of shape {tuple(spectrum.shape)}; "
                             f"{args.data} holds {tuple(x.shape[1:])}")
    else:  # any Gaussian reference is valid; this one is saved beside --out
        spectrum = computed = GaussianSpectrum.from_data(x, diagonal=len(x) <= math.prod(x.shape[1:]))
    loaded = resolve_model(args.model, weights=args.weights, spectrum=spectrum, seed=args.seed,
                           class_label=args.class_label)
    if tuple(loaded.shape) != tuple(x.shape[1:]):
        raise UsageError(f"{loaded.label} models examples of shape {tuple(loaded.shape)}; "
                         f"{args.data} holds {tuple(x.shape[1:])}")
    grid = loaded.grid if loaded.grid is not None else (DiscreteGrid(-1.0, 1.0, 256) if eight_bit else image_grid)
    return ITDiffusion(loaded.denoiser, spectrum), x, grid, None if args.spectrum else computed


def _positive_int(text: str, what: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise UsageError(f"{what}: expected a positive integer, got {text!r}")
    return value


def _options(args) -> dict:
    vlb = {"variance": args.variance, "n_calls": args.vlb_calls, "batch_size": args.batch_size}
    if args.vlb_steps:
        vlb["steps"] = args.vlb_steps
    ode = {"solver": args.solver, "n_steps": args.ode_steps, "rtol": args.tol, "atol": args.tol,
           "trace": args.trace, "n_probes": args.probes}
    return {
        "it": {"n_points": args.n_points, "batch_size": args.batch_size},
        "vlb": vlb,
        "vlb-ct": {"n_points": args.n_points, "batch_size": args.batch_size},
        "ode": ode,
    }


def run(args) -> int:
    from ._common import precheck_hub

    precheck_hub(args.model)  # an unreachable Hub repo fails at once
    import torch

    from ..baselines.compare import compare

    methods = parse_methods(args.methods)
    if args.out and Path(args.out).suffix == ".md":
        raise UsageError("--out takes the JSON path; the Markdown table is written beside it")
    if args.out and Path(args.out).is_dir():
        raise UsageError(f"--out {args.out} is a folder; give a file name such as compare.json")
    _check_numbers(args)
    from ..training.distributed import check_device

    device = check_device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))  # as itd eval
    lock = _guard_outputs(args) if args.out else None
    try:
        threads = args.threads or (1 if args.model == GMM else None)
        if threads:
            torch.set_num_threads(threads)
        model, x, grid, computed = _gmm_setup(args) if args.model == GMM else _model_setup(args)
        x = x[: args.limit] if args.limit else x
        model, x = model.to(device), x.to(device)
        options = {m: opts for m, opts in _options(args).items() if m in methods}
        table = compare(model, x, methods, seed=args.seed, discrete=grid, options=options)
        title = f"itd compare: {args.model} on {args.data}"
        print(table.to_markdown(title) if args.format == "markdown" else table.to_json(), end="")
        if args.out:
            meta = {"model": args.model, "data": args.data, "spectrum": args.spectrum}
            if computed is not None:  # the Gaussian reference computed from the data, for a repeatable run
                meta["spectrum"] = str(Path(args.out).with_suffix(".spectrum.npz"))
                computed.save(meta["spectrum"])
            table.save(args.out, title=title, meta=meta)
    finally:
        if lock is not None:
            lock.release()
    return 0


# the largest value each count may take: no flag may ask for a terabyte, a century or a segfault
_MOST = {"limit": 10**9, "n_points": 10**7, "probes": 10**4, "ode_steps": 10**6, "vlb_steps": 10**6,
         "vlb_calls": 10**6, "batch_size": 2**24, "dim": 10**6, "components": 10**4}
MAX_SAMPLED = 2**28  # values drawn by --data sample:N (2 GiB of float64)
MIN_TOL = 1e-12  # below this an adaptive float64 solver only takes its maximum number of steps


def _check_numbers(args) -> None:
    import os

    most = dict(_MOST, threads=max(64, 4 * (os.cpu_count() or 1)))
    for name, top in most.items():
        value = getattr(args, name)
        if value is not None and not 1 <= value <= top:
            flag = "--points (--n-points)" if name == "n_points" else f"--{name.replace('_', '-')}"
            raise UsageError(f"{flag} must be a positive integer of at most {top:,}, got {value}")
    if not (MIN_TOL <= args.tol <= 1.0):
        raise UsageError(f"--tol must lie in {MIN_TOL:g} .. 1, got {args.tol}")
    if not 0 <= args.seed < 2**63 or not 0 <= args.mixture_seed < 2**63:
        raise UsageError(f"--seed and --mixture-seed must lie in 0 .. 2^63 - 1, got {args.seed}, {args.mixture_seed}")


def _guard_outputs(args):
    """Refuse an --out (or the Markdown beside it) that would replace an input; hold its lock."""
    from ..guard import OutputLocks, check_outputs

    out = Path(args.out)
    computes = not args.spectrum and args.model != GMM  # a computed Gaussian reference is saved beside OUT
    written = [out, out.with_suffix(".md")] + ([out.with_suffix(".spectrum.npz")] if computes else [])
    check_outputs(written, [args.data, args.model, args.weights, args.spectrum])
    for path in written:
        if path.exists() and not args.overwrite:
            raise ValueError(f"{path} exists; pass --overwrite to replace it")
    return OutputLocks([out, out.with_suffix(".md")]).acquire()
