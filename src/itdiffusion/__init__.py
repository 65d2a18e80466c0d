"""itdiffusion: exact log-likelihoods of diffusion models via the I-MMSE identity.

``import itdiffusion as itd`` is cheap: the names below are imported on first use
(PEP 562 module ``__getattr__``), so ``itd --help`` and scripts that need one name do not
load torch-heavy layers, diffusers, scipy or matplotlib.  See ``ARCHITECTURE.md`` for the layers.
"""

from __future__ import annotations

import importlib

__version__ = "0.1.0"

# public name -> module that defines it (relative to this package)
_EXPORTS = {
    # the model, its Gaussian reference and the data grid
    "ITDiffusion": ".model",
    "GaussianSpectrum": ".core.spectrum",
    "DiscreteGrid": ".core.grid",
    "right_tail_bound": ".core.grid",
    "logistic_points": ".core.proposal",
    "logistic_weights": ".core.proposal",
    # closed-form truths with exact denoisers
    "GaussianMixture": ".core.analytic",
    "FullGaussianMixture": ".core.analytic",
    "FiniteDiscrete": ".core.analytic",
    "ProductDiscrete": ".core.analytic",
    "ClassMixture": ".core.analytic_conditional",
    "JointFinite": ".core.analytic_conditional",
    # evaluation, comparison, results
    "evaluate": ".evaluation",
    "Evaluator": ".evaluation",
    "EvalConfig": ".evaluation",
    "compare": ".baselines.compare",
    "Estimate": ".results",
    "Results": ".results",
    "ensemble": ".results",
    "BitsPerDim": ".metrics",
    # training
    "train": ".training.train",
    "TrainConfig": ".training.train",
    # denoiser adapters
    "Denoiser": ".denoisers.protocol",
    "DiffusersDenoiser": ".denoisers.diffusers",
    "IDDPMDenoiser": ".denoisers.iddpm",
    "IDDPMUNet": ".denoisers.iddpm",
}

# sub-packages and modules reachable as attributes (``itd.baselines.ode_nll``) without an import statement
_SUBMODULES = ("baselines", "cli", "core", "data", "denoisers", "fileio", "metrics", "reporting", "results",
               "training", "evaluation", "model", "resolve")

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        value = getattr(importlib.import_module(_EXPORTS[name], __name__), name)
        globals()[name] = value  # later look-ups skip this function
        return value
    if name in _SUBMODULES:
        return importlib.import_module(f".{name}", __name__)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS) | set(_SUBMODULES))
