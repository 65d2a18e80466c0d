"""Units: the one conversion from nats per example to bits per dimension."""

from __future__ import annotations

import math

LN2 = math.log(2.0)


def bpd(nats, d: int):
    """Bits per dimension of ``nats`` per example over ``d`` dimensions: ``nats / (d ln 2)``.

    Works on floats, numpy arrays and torch tensors alike (and keeps their type).
    """
    return nats / (int(d) * LN2)
