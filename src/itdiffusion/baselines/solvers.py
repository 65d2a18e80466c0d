"""Runge-Kutta solvers of the probability-flow ODE: fixed-step Euler/Heun/RK4 and adaptive Dormand-Prince 5(4).

Each integrates a state ``(z, l)`` over ODE time ``s`` in [0, 1] with ``rhs(s, z) -> (dz/ds, dl/ds)``;
``z`` is ``(B, *shape)``, ``l`` a ``(B,)`` float64 accumulator.
"""

from __future__ import annotations

import torch

from .gaussian import _flat

def _rk_fixed(rhs, z, n_steps: int, solver: str):
    """Integrate ``(z, l)`` over ``s`` in [0, 1] with ``n_steps`` equal steps; returns ``(z, l, steps)``."""
    h = 1.0 / n_steps
    ell = torch.zeros(len(z), dtype=torch.float64, device=z.device)
    for i in range(n_steps):
        s = i * h
        k1 = rhs(s, z)
        if solver == "euler":
            incr = k1
        elif solver == "heun":
            k2 = rhs(s + h, z + h * k1[0])
            incr = tuple(0.5 * (p + q) for p, q in zip(k1, k2))
        else:  # rk4
            k2 = rhs(s + h / 2, z + h / 2 * k1[0])
            k3 = rhs(s + h / 2, z + h / 2 * k2[0])
            k4 = rhs(s + h, z + h * k3[0])
            incr = tuple((p + 2 * q + 2 * r + t) / 6 for p, q, r, t in zip(k1, k2, k3, k4))
        z, ell = z + h * incr[0], ell + h * incr[1]
    return z, ell, n_steps, 0


# Dormand-Prince 5(4) tableau.
_DP_C = (0.0, 1 / 5, 3 / 10, 4 / 5, 8 / 9, 1.0, 1.0)
_DP_A = (
    (),
    (1 / 5,),
    (3 / 40, 9 / 40),
    (44 / 45, -56 / 15, 32 / 9),
    (19372 / 6561, -25360 / 2187, 64448 / 6561, -212 / 729),
    (9017 / 3168, -355 / 33, 46732 / 5247, 49 / 176, -5103 / 18656),
    (35 / 384, 0.0, 500 / 1113, 125 / 192, -2187 / 6784, 11 / 84),
)
_DP_B = _DP_A[6] + (0.0,)
_DP_B_LOW = (5179 / 57600, 0.0, 7571 / 16695, 393 / 640, -92097 / 339200, 187 / 2100, 1 / 40)


def _dopri5(rhs, z, rtol: float, atol: float, first_step: float = 0.02, max_steps: int = 10_000):
    """Adaptive Dormand-Prince 5(4) over ``s`` in [0, 1], one step size shared by the batch.

    The error norm is the RMS over each example's state ``(z, l)`` of
    ``err / (atol + rtol * max(|y_old|, |y_new|))``, maximised over the batch.
    """
    s, h = 0.0, first_step
    ell = torch.zeros(len(z), dtype=torch.float64, device=z.device)
    k_first = rhs(s, z)
    accepted = rejected = 0
    while s < 1.0 - 1e-12:
        h = min(h, 1.0 - s)
        ks = [k_first]
        for i in range(1, 7):
            dz = sum(a * k[0] for a, k in zip(_DP_A[i], ks) if a)
            ks.append(rhs(s + _DP_C[i] * h, z + h * dz))
        new_z = z + h * sum(b * k[0] for b, k in zip(_DP_B, ks) if b)
        new_ell = ell + h * sum(b * k[1] for b, k in zip(_DP_B, ks) if b)
        err_z = h * sum((b - c) * k[0] for b, c, k in zip(_DP_B, _DP_B_LOW, ks) if b != c)
        err_l = h * sum((b - c) * k[1] for b, c, k in zip(_DP_B, _DP_B_LOW, ks) if b != c)
        tol_z = atol + rtol * torch.maximum(z.abs(), new_z.abs())
        tol_l = atol + rtol * torch.maximum(ell.abs(), new_ell.abs())
        ratio = torch.cat([_flat(err_z / tol_z).double(), (err_l / tol_l)[:, None]], 1)
        norm = ratio.pow(2).mean(1).sqrt().max().item()
        if norm <= 1.0:
            s, z, ell, k_first = s + h, new_z, new_ell, ks[6]  # first-same-as-last
            accepted += 1
        else:
            rejected += 1
        h *= min(5.0, max(0.2, 0.9 * (norm + 1e-16) ** -0.2))
        if accepted + rejected > max_steps:
            raise RuntimeError(f"adaptive ODE solver did not finish in {max_steps} steps (stiff or diverging flow)")
    return z, ell, accepted, rejected
