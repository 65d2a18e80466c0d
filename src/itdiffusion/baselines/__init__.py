"""Likelihood baselines on the same denoiser: variational bounds and the probability-flow ODE."""
