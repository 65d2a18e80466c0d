"""itdiffusion: exact log-likelihoods of diffusion models via the I-MMSE identity.

The top level is the math core: it imports only ``torch`` and ``numpy``.  Denoiser
adapters (``itdiffusion.denoisers``), data, training, plots and the CLI are separate
modules imported on demand.
"""

from .core.analytic import FiniteDiscrete, GaussianMixture
from .core.analytic_conditional import ClassMixture, JointFinite
from .baselines.compare import compare
from .evaluation import evaluate
from .core.grid import DiscreteGrid, right_tail_bound
from .core.proposal import logistic_points, logistic_weights
from .model import ITDiffusion
from .results import Estimate, Results, ensemble
from .core.spectrum import GaussianSpectrum

__version__ = "0.1.0"

__all__ = [
    "ClassMixture",
    "DiscreteGrid",
    "JointFinite",
    "compare",
    "Estimate",
    "Results",
    "ensemble",
    "evaluate",
    "FiniteDiscrete",
    "GaussianMixture",
    "GaussianSpectrum",
    "ITDiffusion",
    "logistic_points",
    "logistic_weights",
    "right_tail_bound",
]
