"""Likelihood baselines on the same denoiser: variational bounds and the probability-flow ODE.

Three classical ways to turn a diffusion model into a likelihood, rewritten for the
variance-preserving channel of this package (``z = alpha x + sigma eps``,
``alpha^2 = sigmoid(a)``, ``sigma^2 = sigmoid(-a)``, ``a`` = log-SNR):

- :func:`vlb_discrete` (:mod:`.vlb`): the discrete-time bound of DDPM/IDDPM on a
  :class:`DiscreteSchedule` (:mod:`.schedule`);
- :func:`vlb_continuous` (:mod:`.vlb`): the continuous-time bound of Variational Diffusion Models;
- :func:`ode_nll` (:mod:`.ode`): the probability-flow ODE likelihood, with the solvers of :mod:`.solvers`.

:mod:`.gaussian` holds the per-example random streams and the Gaussian NLLs they share;
:mod:`.compare` runs them beside the IT estimate (``itdiffusion.compare``).  All results are
per example, in nats (float64), with the number of network calls spent.
"""

from .gaussian import discretized_gaussian_nll, example_generators, gaussian_nll, prior_kl
from .ode import EXACT_TRACE_MAX_D, ODE_SCALE_FACTOR, SOLVERS, ODEResult, flow_velocity, ode_nll, \
    reference_marginal_log_prob
from .schedule import DEFAULT_STEPS, VARIANCES, DiscreteSchedule, logsnr_linear_alphas_cumprod
from .vlb import BoundTerms, gaussian_decoder_nll, grid_decoder_nll, vlb_continuous, vlb_discrete

__all__ = [
    "BoundTerms", "DEFAULT_STEPS", "DiscreteSchedule", "EXACT_TRACE_MAX_D", "ODEResult", "ODE_SCALE_FACTOR",
    "SOLVERS", "VARIANCES", "discretized_gaussian_nll", "example_generators", "flow_velocity",
    "gaussian_decoder_nll", "gaussian_nll", "grid_decoder_nll", "logsnr_linear_alphas_cumprod", "ode_nll",
    "prior_kl", "reference_marginal_log_prob", "vlb_continuous", "vlb_discrete",
]
