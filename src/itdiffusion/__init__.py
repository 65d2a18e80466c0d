"""itdiffusion: exact log-likelihoods of diffusion models via the I-MMSE identity."""

__version__ = "0.1.0"
