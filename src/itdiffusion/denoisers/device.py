"""Device options for the network call: reduced-precision autocast, channels-last, torch.compile.

The network call is the only expensive part of an evaluation; these options make it
cheaper on accelerators without touching the error arithmetic.  They apply to the
*denoiser*, not to :class:`~itdiffusion.ITDiffusion`: wrap the network, then build the
model around the wrapper::

    from itdiffusion.denoisers.device import DeviceOptions, optimize_denoiser

    net = build_denoiser("ddpm-cifar10", weights).to("cuda")
    net = optimize_denoiser(net, DeviceOptions(dtype="bf16", channels_last=True))
    model = itd.ITDiffusion(net, spectrum).to("cuda")

* ``dtype="bf16"`` / ``"fp16"``: the network runs under ``torch.autocast`` (matrix
  products and convolutions in 16 bits, reductions and normalisations as autocast
  decides).  The wrapper returns ``eps_hat`` in the input's dtype (float32), and every
  error, rounding and integral is then computed in float64 exactly as without the
  option: only the network's own rounding changes.
* ``channels_last=True``: the network's 4-D weights and its input use the NHWC memory
  format (faster convolutions on tensor-core GPUs); the output is returned contiguous.
* ``compile=True``: the network is wrapped with ``torch.compile`` (first calls are slow
  while it compiles; every new batch shape compiles again, so keep the batch size fixed).

All options are off by default, and on a CPU they are rarely worth it (bf16 autocast on
CPU is usually *slower* unless the CPU has AMX/AVX512-BF16).  With every option off,
:func:`optimize_denoiser` returns the denoiser itself.  The wrapper's ``state_dict`` has
the inner network's keys, so checkpoints written with and without it are interchangeable.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
from torch import nn

__all__ = ["DeviceOptions", "OptimizedDenoiser", "optimize_denoiser", "DTYPES"]

DTYPES = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}
"""Accepted ``DeviceOptions.dtype`` values and the autocast dtype of each (None: no autocast)."""


@dataclass(frozen=True)
class DeviceOptions:
    """How to run the denoiser network (all off by default).

    Attributes:
        dtype: ``"fp32"`` (no autocast), ``"bf16"`` or ``"fp16"`` (autocast to that type).
        channels_last: NHWC memory format for 4-D inputs and weights.
        compile: wrap the network with ``torch.compile``.
        compile_mode: ``mode`` passed to ``torch.compile`` (e.g. ``"max-autotune"``).
        compile_backend: ``backend`` passed to ``torch.compile`` (default ``"inductor"``).
    """

    dtype: str = "fp32"
    channels_last: bool = False
    compile: bool = False
    compile_mode: str | None = None
    compile_backend: str = "inductor"

    def __post_init__(self):
        if self.dtype not in DTYPES:
            raise ValueError(f"unknown dtype {self.dtype!r}; choose one of {', '.join(DTYPES)}")

    @property
    def autocast_dtype(self) -> torch.dtype | None:
        return DTYPES[self.dtype]

    @property
    def active(self) -> bool:
        """Whether any option changes how the network runs."""
        return self.autocast_dtype is not None or self.channels_last or self.compile

    def to_dict(self) -> dict:
        return asdict(self)


class OptimizedDenoiser(nn.Module):
    """``f(z, logsnr, ...) -> eps_hat`` of an inner denoiser run with :class:`DeviceOptions`.

    The output has ``z``'s dtype and shape and is contiguous.  Extra positional and keyword
    arguments (e.g. class labels) are passed through.  ``state_dict`` and
    ``load_state_dict`` use the inner network's keys (no ``inner.`` prefix).
    """

    def __init__(self, denoiser: nn.Module, options: DeviceOptions):
        super().__init__()
        if not isinstance(denoiser, nn.Module):
            raise TypeError(f"optimize_denoiser needs an nn.Module, got {type(denoiser).__name__}")
        self.inner = denoiser
        self.options = options
        if options.channels_last:
            denoiser.to(memory_format=torch.channels_last)
        compiled = None
        if options.compile:
            compiled = torch.compile(denoiser, mode=options.compile_mode, backend=options.compile_backend)
        # Kept out of the module tree: the compiled wrapper shares the inner parameters.
        self.__dict__["_compiled"] = compiled

    def forward(self, z: torch.Tensor, logsnr: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        out_dtype = z.dtype
        if self.options.channels_last and z.dim() == 4:
            z = z.contiguous(memory_format=torch.channels_last)
        net = self._compiled if self._compiled is not None else self.inner
        amp = self.options.autocast_dtype
        if amp is None:
            eps_hat = net(z, logsnr, *args, **kwargs)
        else:
            with torch.autocast(device_type=z.device.type, dtype=amp):
                eps_hat = net(z, logsnr, *args, **kwargs)
        return eps_hat.to(out_dtype).contiguous()

    def unwrap(self) -> nn.Module:
        """The inner denoiser."""
        return self.inner

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:
            # Attributes of the inner denoiser (e.g. ``model_spec``, ``logsnr_range``).
            modules = self.__dict__.get("_modules") or {}
            if "inner" not in modules:
                raise
            return getattr(modules["inner"], name)

    # ----------------------------------------------------------------- transparent checkpoints
    def state_dict(self, *args, destination=None, prefix: str = "", keep_vars: bool = False):
        return self.inner.state_dict(*args, destination=destination, prefix=prefix, keep_vars=keep_vars)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        inner = prefix + "inner."
        for key in [k for k in state_dict if k.startswith(prefix) and not k.startswith(inner)]:
            state_dict[inner + key[len(prefix):]] = state_dict.pop(key)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)


def optimize_denoiser(denoiser: nn.Module, options: DeviceOptions | None = None, **kwargs) -> nn.Module:
    """``denoiser`` run with ``options`` (or ``DeviceOptions(**kwargs)``).

    Returns ``denoiser`` itself when no option is active, else an :class:`OptimizedDenoiser`.
    With ``channels_last`` the inner network's weights are converted in place.
    """
    if options is None:
        options = DeviceOptions(**kwargs)
    elif kwargs:
        raise TypeError("pass either options or keyword arguments, not both")
    return OptimizedDenoiser(denoiser, options) if options.active else denoiser
