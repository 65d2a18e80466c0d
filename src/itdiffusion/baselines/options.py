"""Per-method options of :func:`itdiffusion.compare`: one dataclass per method, refusing a misspelled key.

``compare(..., options={"vlb": {"steps": 400}})`` and ``options={"vlb": VLBOptions(steps=400)}``
mean the same; a key that is not a field (``{"vlb": {"n_calsl": 3}}``) raises one
``ValueError`` naming the key and the valid ones.  Each field's default is what the method
does when the key is not given.
"""

from __future__ import annotations

from dataclasses import MISSING, dataclass, fields
from typing import Any, Mapping, Optional


@dataclass(frozen=True)
class ITOptions:
    """``"it"``: :meth:`ITDiffusion.nll` settings (``rounding`` is used only for data on a grid)."""

    n_points: int = 256
    clip: Optional[float] = None
    placement: str = "stratified"
    antithetic: Optional[bool] = None
    rounding: str = "hard"
    clamp: Optional[tuple[float, float]] = None
    batch_size: Optional[int] = None


@dataclass(frozen=True)
class VLBOptions:
    """``"vlb"``: the discrete-time bound (:func:`itdiffusion.baselines.vlb_discrete`).

    ``alphas_cumprod``: the schedule (default: the denoiser's own, else a log-SNR-linear one of
    ``steps`` steps, default 1000, over the model's range at ``clip``); ``variance``: ``"auto"``
    (the denoiser's ``variance_type``), ``"fixed_small"``, ``"fixed_large"``, ``"fixed_large_beta1"``
    or ``"learned"``; ``n_calls``: stratified estimate from this many steps (default all);
    ``clamp``: ``(lo, hi)`` for ``x_hat``, ``None``, or ``"auto"`` (the grid's ends for grid data).
    """

    alphas_cumprod: Any = None
    steps: Optional[int] = None
    variance: str = "auto"
    n_calls: Optional[int] = None
    clamp: Any = "auto"
    clip: Optional[float] = None
    batch_size: Optional[int] = None


@dataclass(frozen=True)
class VLBCTOptions:
    """``"vlb-ct"``: the continuous-time bound (:func:`itdiffusion.baselines.vlb_continuous`)."""

    n_points: int = 256
    clip: Optional[float] = None
    control_variate: bool = True
    antithetic: Optional[bool] = None
    batch_size: Optional[int] = None


@dataclass(frozen=True)
class ODEOptions:
    """``"ode"``: the probability-flow ODE (:func:`itdiffusion.baselines.ode_nll`)."""

    solver: str = "dopri5"
    n_steps: int = 50
    rtol: float = 1e-5
    atol: float = 1e-5
    trace: str = "auto"
    n_probes: int = 1
    clip: Optional[float] = None


OPTIONS = {"it": ITOptions, "vlb": VLBOptions, "vlb-ct": VLBCTOptions, "ode": ODEOptions}


def given_options(method: str, value: Mapping[str, Any] | object | None) -> dict:
    """The settings given for ``method`` as a dict of the keys that differ from the defaults.

    ``value``: ``None``, a mapping of field names, or the method's options dataclass.
    ``ValueError`` for a key that is not one of the method's fields, naming the valid ones.
    """
    cls = OPTIONS[method]
    if value is None:
        return {}
    if isinstance(value, cls):
        return {f.name: getattr(value, f.name) for f in fields(cls)
                if f.default is MISSING or _differs(getattr(value, f.name), f.default)}
    if not isinstance(value, Mapping):
        raise ValueError(f"options[{method!r}] must be a dict or {cls.__name__}, got {type(value).__name__}")
    names = [f.name for f in fields(cls)]
    unknown = [k for k in value if k not in names]
    if unknown:
        raise ValueError(f"unknown option {unknown[0]!r} for method {method!r}; valid options: {', '.join(names)}")
    return dict(value)


def _differs(value, default) -> bool:
    try:
        return bool(value != default)
    except (RuntimeError, TypeError, ValueError):  # a tensor compared with a default
        return True
