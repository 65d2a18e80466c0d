"""Small denoiser networks implementing the package's denoiser contract.

A denoiser is a module ``f(z, logsnr) -> eps_hat``:

* ``z``: (B, *shape) float, a noisy observation
  ``z = sqrt(sigmoid(a)) x + sqrt(sigmoid(-a)) eps`` of data x;
* ``logsnr``: (B,) float, the log signal-to-noise ratio ``a`` of each example
  (a 0-d tensor or Python float is broadcast to the batch);
* ``eps_hat``: (B, *shape), the prediction of the noise eps, in z's dtype and
  on z's device.

Both networks add the skip term ``sqrt(sigmoid(-a)) * z`` to a learned
correction whose last layer starts at zero. The skip term is the exact
optimal noise prediction when x is standard normal, so an untrained network
already behaves sensibly (it is exact as ``a -> -inf``, where ``eps_hat -> z``),
and training only has to learn how the data differ from N(0, I). Pass
``skip=False`` for a plain network.

Two architectures:

* :class:`MLPDenoiser` for vectors (shape ``(d,)``), e.g. the 2-D data sets;
* :class:`SmallUNet` for small images (shape ``(C, H, W)``), e.g. 8x8 digits.

:class:`GaussianResidual` wraps either around the Gaussian-optimal denoiser of the
data's spectrum, so that an untrained network *is* the Gaussian reference.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["LogSNREmbedding", "FourierFeatures", "GaussianResidual", "MLPDenoiser", "SmallUNet"]

LOGSNR_RANGE = 20.0
"""Log-SNR values are expected in about ``[-LOGSNR_RANGE, LOGSNR_RANGE]``."""


def _geometric(lo: float, hi: float, n: int) -> Tensor:
    """(n,) frequencies spaced geometrically from lo to hi (float32)."""
    if n < 1:
        raise ValueError(f"need at least one frequency, got {n}")
    return torch.logspace(math.log10(lo), math.log10(hi), n)


def _batch_logsnr(logsnr: Tensor | float, z: Tensor) -> Tensor:
    """Broadcast ``logsnr`` to shape (B,) in z's dtype and device."""
    logsnr = torch.as_tensor(logsnr, dtype=z.dtype, device=z.device)
    if logsnr.dim() == 0:
        return logsnr.expand(z.shape[0])
    if logsnr.shape != (z.shape[0],):
        raise ValueError(
            f"logsnr must have shape ({z.shape[0]},), got {tuple(logsnr.shape)}"
        )
    return logsnr


def _gaussian_skip(z: Tensor, logsnr: Tensor) -> Tensor:
    """Optimal eps_hat for standard normal data, ``sqrt(sigmoid(-a)) z``; (B, *shape)."""
    scale = torch.sigmoid(-logsnr).sqrt()
    return scale.view(-1, *([1] * (z.dim() - 1))) * z


class FourierFeatures(nn.Module):
    """Fixed sinusoidal features of each coordinate.

    Maps (B, d) to (B, d * 2 * n_freq): ``sin(w_k x_i)`` and ``cos(w_k x_i)``
    for n_freq angular frequencies ``w_k`` spaced geometrically in
    ``[min_freq, max_freq]`` (radians per unit of x).
    """

    def __init__(self, n_freq: int = 16, min_freq: float = 0.5, max_freq: float = 32.0):
        super().__init__()
        self.register_buffer("freqs", _geometric(min_freq, max_freq, n_freq), persistent=False)

    @property
    def n_freq(self) -> int:
        return self.freqs.numel()

    def forward(self, x: Tensor) -> Tensor:
        """x: (B, d) -> (B, d * 2 * n_freq)."""
        angles = x.unsqueeze(-1) * self.freqs.to(x.dtype)  # (B, d, n_freq)
        return torch.cat([angles.sin(), angles.cos()], dim=-1).flatten(1)


class LogSNREmbedding(nn.Module):
    """Fixed features of the log-SNR ``a``.

    ``a`` is first scaled to ``u = a / LOGSNR_RANGE`` (about [-1, 1]); the output
    is ``[u, sin(w_k u), cos(w_k u)]`` with n_freq frequencies ``w_k``
    geometric in ``[pi / 2, 32 pi]``, i.e. periods from 4 * LOGSNR_RANGE down
    to about 1.25 log-SNR units. Maps (B,) to (B, 1 + 2 * n_freq).
    """

    def __init__(self, n_freq: int = 16):
        super().__init__()
        freqs = _geometric(math.pi / 2, 32 * math.pi, n_freq)
        self.register_buffer("freqs", freqs, persistent=False)

    @property
    def dim(self) -> int:
        return 1 + 2 * self.freqs.numel()

    def forward(self, logsnr: Tensor) -> Tensor:
        """logsnr: (B,) -> (B, 1 + 2 * n_freq)."""
        u = (logsnr / LOGSNR_RANGE).unsqueeze(-1)  # (B, 1)
        angles = u * self.freqs.to(u.dtype)
        return torch.cat([u, angles.sin(), angles.cos()], dim=-1)


class _ResidualMLPBlock(nn.Module):
    """``h + W2 silu(W1 silu(norm(h)) + E emb)``: a pre-norm residual block."""

    def __init__(self, hidden: int, emb_dim: int):
        super().__init__()
        self.norm = nn.LayerNorm(hidden)
        self.fc1 = nn.Linear(hidden, hidden)
        self.emb = nn.Linear(emb_dim, hidden)
        self.fc2 = nn.Linear(hidden, hidden)

    def forward(self, h: Tensor, emb: Tensor) -> Tensor:
        """h: (B, hidden), emb: (B, emb_dim) -> (B, hidden)."""
        u = self.fc1(F.silu(self.norm(h))) + self.emb(emb)
        return h + self.fc2(F.silu(u))


class MLPDenoiser(nn.Module):
    """Noise predictor for vector data of shape (d,).

    The input of the MLP is ``[z, fourier(z), embed(a)]``: the raw coordinates,
    sinusoidal features of every coordinate (:class:`FourierFeatures`) and of
    the log-SNR (:class:`LogSNREmbedding`). ``depth`` pre-norm residual blocks
    of width ``hidden`` with SiLU follow, each also receiving the log-SNR
    features; a zero-initialised linear layer gives the correction added to
    the skip term (see the module docstring).

    Args:
        d: data dimension.
        hidden: width of the residual stream.
        depth: number of residual blocks.
        n_freq: frequencies per coordinate and for the log-SNR.
        min_freq, max_freq: coordinate frequency range, radians per unit of z;
            the default suits data of roughly unit scale.
        skip: add ``sqrt(sigmoid(-a)) z`` to the output.

    Shapes: ``forward(z (B, d), logsnr (B,)) -> eps_hat (B, d)``.
    """

    def __init__(
        self,
        d: int,
        hidden: int = 128,
        depth: int = 3,
        n_freq: int = 16,
        min_freq: float = 0.5,
        max_freq: float = 32.0,
        skip: bool = True,
    ):
        super().__init__()
        self.d = d
        self.skip = skip
        self.fourier = FourierFeatures(n_freq, min_freq, max_freq)
        self.logsnr_embed = LogSNREmbedding(n_freq)
        n_in = d + d * 2 * n_freq + self.logsnr_embed.dim
        self.inp = nn.Linear(n_in, hidden)
        self.blocks = nn.ModuleList(
            _ResidualMLPBlock(hidden, self.logsnr_embed.dim) for _ in range(depth)
        )
        self.out_norm = nn.LayerNorm(hidden)
        self.out = nn.Linear(hidden, d)
        nn.init.zeros_(self.out.weight)
        nn.init.zeros_(self.out.bias)

    def forward(self, z: Tensor, logsnr: Tensor | float) -> Tensor:
        """z: (B, d), logsnr: (B,) -> eps_hat: (B, d)."""
        if z.dim() != 2 or z.shape[1] != self.d:
            raise ValueError(f"expected z of shape (B, {self.d}), got {tuple(z.shape)}")
        logsnr = _batch_logsnr(logsnr, z)
        emb = self.logsnr_embed(logsnr)
        h = self.inp(torch.cat([z, self.fourier(z), emb], dim=-1))
        for block in self.blocks:
            h = block(h, emb)
        eps_hat = self.out(F.silu(self.out_norm(h)))
        return eps_hat + _gaussian_skip(z, logsnr) if self.skip else eps_hat


def _groups(channels: int, max_groups: int = 8) -> int:
    """Largest group count <= max_groups that divides ``channels``."""
    return next(g for g in range(min(max_groups, channels), 0, -1) if channels % g == 0)


class _ResBlock(nn.Module):
    """GroupNorm-SiLU-conv twice, log-SNR embedding added in between; residual."""

    def __init__(self, c_in: int, c_out: int, emb_dim: int, dropout: float = 0.0):
        super().__init__()
        self.norm1 = nn.GroupNorm(_groups(c_in), c_in)
        self.conv1 = nn.Conv2d(c_in, c_out, 3, padding=1)
        self.emb = nn.Linear(emb_dim, c_out)
        self.norm2 = nn.GroupNorm(_groups(c_out), c_out)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, padding=1)
        self.shortcut = nn.Conv2d(c_in, c_out, 1) if c_in != c_out else nn.Identity()

    def forward(self, x: Tensor, emb: Tensor) -> Tensor:
        """x: (B, c_in, H, W), emb: (B, emb_dim) -> (B, c_out, H, W)."""
        h = self.conv1(F.silu(self.norm1(x)))
        h = h + self.emb(emb)[:, :, None, None]
        h = self.conv2(self.dropout(F.silu(self.norm2(h))))
        return self.shortcut(x) + h


class SmallUNet(nn.Module):
    """A small convolutional U-Net noise predictor for images (C, H, W).

    Layout, with ``widths = [base * m for m in channel_mult]``:
    a 3x3 input convolution; per level ``num_res_blocks`` residual blocks
    (GroupNorm, SiLU, 3x3 convolutions, log-SNR embedding added) then a
    stride-2 downsampling except at the last level; two middle blocks; the
    mirrored decoder with skip connections (concatenation) and nearest
    upsampling; GroupNorm, SiLU and a zero-initialised 3x3 output convolution.
    The log-SNR embedding is :class:`LogSNREmbedding` followed by a two-layer
    MLP of width ``4 * base``.

    H and W must be divisible by ``2 ** (len(channel_mult) - 1)``. With the
    defaults (base 32, two levels) the net has about 0.6M parameters and works
    at 8x8, 16x16 and 32x32.

    Args:
        channels: image channels C (1 for grey, 3 for RGB).
        base: width of the first level.
        channel_mult: width multiplier per resolution level.
        num_res_blocks: residual blocks per level in the encoder.
        n_freq: log-SNR frequencies.
        dropout: dropout probability inside the residual blocks.
        skip: add ``sqrt(sigmoid(-a)) z`` to the output.

    Shapes: ``forward(z (B, C, H, W), logsnr (B,)) -> eps_hat (B, C, H, W)``.
    """

    def __init__(
        self,
        channels: int = 1,
        base: int = 32,
        channel_mult: tuple[int, ...] = (1, 2),
        num_res_blocks: int = 1,
        n_freq: int = 16,
        dropout: float = 0.0,
        skip: bool = True,
    ):
        super().__init__()
        self.channels = channels
        self.skip = skip
        self.n_down = len(channel_mult) - 1
        widths = [base * m for m in channel_mult]
        emb_dim = 4 * base
        logsnr_embed = LogSNREmbedding(n_freq)
        self.embed = nn.Sequential(
            logsnr_embed,
            nn.Linear(logsnr_embed.dim, emb_dim),
            nn.SiLU(),
            nn.Linear(emb_dim, emb_dim),
        )
        self.conv_in = nn.Conv2d(channels, base, 3, padding=1)
        self.down, skip_widths = self._build_encoder(base, widths, num_res_blocks, emb_dim, dropout)
        self.mid = nn.ModuleList(
            [_ResBlock(widths[-1], widths[-1], emb_dim, dropout) for _ in range(2)]
        )
        self.up = self._build_decoder(widths, skip_widths, num_res_blocks, emb_dim, dropout)
        self.norm_out = nn.GroupNorm(_groups(base), base)
        self.conv_out = nn.Conv2d(base, channels, 3, padding=1)
        nn.init.zeros_(self.conv_out.weight)
        nn.init.zeros_(self.conv_out.bias)

    @staticmethod
    def _build_encoder(base, widths, num_res_blocks, emb_dim, dropout):
        """Encoder modules and the channel count of every skip activation."""
        layers, skip_widths, c = nn.ModuleList(), [base], base
        for level, width in enumerate(widths):
            for _ in range(num_res_blocks):
                layers.append(_ResBlock(c, width, emb_dim, dropout))
                c = width
                skip_widths.append(c)
            if level < len(widths) - 1:
                layers.append(nn.Conv2d(c, c, 3, stride=2, padding=1))
                skip_widths.append(c)
        return layers, skip_widths

    @staticmethod
    def _build_decoder(widths, skip_widths, num_res_blocks, emb_dim, dropout):
        """Decoder modules consuming the skip activations in reverse order."""
        layers, skip_widths, c = nn.ModuleList(), list(skip_widths), widths[-1]
        for level in reversed(range(len(widths))):
            for _ in range(num_res_blocks + 1):
                layers.append(_ResBlock(c + skip_widths.pop(), widths[level], emb_dim, dropout))
                c = widths[level]
            if level > 0:
                layers.append(_Upsample(c))
        return layers

    def forward(self, z: Tensor, logsnr: Tensor | float) -> Tensor:
        """z: (B, C, H, W), logsnr: (B,) -> eps_hat: (B, C, H, W)."""
        self._check_input(z)
        logsnr = _batch_logsnr(logsnr, z)
        return self.forward_embedded(z, logsnr, self.embed(logsnr))

    def forward_embedded(self, z: Tensor, logsnr: Tensor, emb: Tensor) -> Tensor:
        """The network on a checked ``z`` with its ``(B, 4 * base)`` embedding ``emb`` (the log-SNR's, to
        which a conditional wrapper may add its own)."""
        h = self.conv_in(z)
        skips = [h]
        for layer in self.down:
            h = layer(h, emb) if isinstance(layer, _ResBlock) else layer(h)
            skips.append(h)
        for block in self.mid:
            h = block(h, emb)
        for layer in self.up:
            if isinstance(layer, _ResBlock):
                h = layer(torch.cat([h, skips.pop()], dim=1), emb)
            else:
                h = layer(h)
        eps_hat = self.conv_out(F.silu(self.norm_out(h)))
        return eps_hat + _gaussian_skip(z, logsnr) if self.skip else eps_hat

    def _check_input(self, z: Tensor) -> None:
        factor = 2**self.n_down
        if z.dim() != 4 or z.shape[1] != self.channels:
            raise ValueError(
                f"expected z of shape (B, {self.channels}, H, W), got {tuple(z.shape)}"
            )
        if z.shape[2] % factor or z.shape[3] % factor:
            raise ValueError(f"H and W must be divisible by {factor}, got {tuple(z.shape[2:])}")


class _Upsample(nn.Module):
    """Nearest-neighbour 2x upsampling followed by a 3x3 convolution."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        """x: (B, c, H, W) -> (B, c, 2H, 2W)."""
        return self.conv(F.interpolate(x, scale_factor=2, mode="nearest"))


class GaussianResidual(nn.Module):
    """``eps_hat = eps_gauss(z, a) + net(z, a)``: a network correcting the Gaussian-optimal denoiser.

    With the network's output layer initialised at zero the model starts as the Gaussian
    reference (the estimate starts at the Gaussian's cross-entropy) and learns only what
    the data have beyond their first two moments.  The spectrum is kept in float64
    buffers, so the module is self-contained: its ``state_dict`` holds the network and
    the Gaussian, and it moves with ``.to(device)``.

    Args:
        net: a denoiser ``f(z (B, *shape), logsnr (B,)) -> (B, *shape)``, usually built
            with ``skip=False``.
        spectrum: a :class:`itdiffusion.core.spectrum.GaussianSpectrum` of the data.
    """

    def __init__(self, net: nn.Module, spectrum):
        super().__init__()
        self.net = net
        self.shape = tuple(spectrum.shape)
        self.register_buffer("mean", spectrum.mean.detach().double().clone())
        self.register_buffer("log_eigs", spectrum.log_eigs.detach().double().clone())
        eigvecs = torch.zeros(0, dtype=torch.float64) if spectrum.eigvecs is None else spectrum.eigvecs
        self.register_buffer("eigvecs", eigvecs.detach().double().clone())

    @property
    def spectrum(self):
        """The Gaussian reference, on this module's device."""
        from ..core.spectrum import GaussianSpectrum

        eigvecs = None if self.eigvecs.numel() == 0 else self.eigvecs
        return GaussianSpectrum(self.mean, eigvecs, self.log_eigs, self.shape)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        # Saved weights may carry a spectrum of the other kind (full vs diagonal): take its shapes.
        for name in ("mean", "log_eigs", "eigvecs"):
            value = state_dict.get(prefix + name)
            if value is not None and value.shape != getattr(self, name).shape:
                setattr(self, name, torch.empty_like(value, device=getattr(self, name).device))
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def forward(self, z: Tensor, logsnr: Tensor) -> Tensor:
        """z: (B, *shape), logsnr: (B,) -> eps_hat (B, *shape) in z's dtype."""
        return self.spectrum.denoise(z, logsnr) + self.net(z, logsnr)
