"""The IDDPM U-Net (Nichol & Dhariwal, 2021) and its epsilon-denoiser wrapper.

`IDDPMUNet` is written for this package; its module tree is laid out so that its
``state_dict`` has exactly the keys and shapes of OpenAI's improved-diffusion
checkpoints (e.g. ``cifar10_uncond_vlb_50M_500K.pt``), so those load with
``strict=True``.  `IDDPMDenoiser` turns it into the package's denoiser contract
``f(z, logsnr) -> eps_hat``.

Shapes: images (B, C, H, W), timesteps and log-SNRs (B,).
"""

from __future__ import annotations

import math
from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from .schedule import LogSNRTimestepMap, iddpm_alphas_cumprod

__all__ = ["IDDPMUNet", "IDDPMDenoiser", "timestep_embedding"]


# --------------------------------------------------------------------------- #
# Building blocks
# --------------------------------------------------------------------------- #


def timestep_embedding(t: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """Sinusoidal embedding of (possibly fractional) timesteps.

    Args:
        t: (B,) timesteps, any float value (the networks are trained on [0, 1000)).
        dim: embedding width.
        max_period: longest wavelength, in timesteps.

    Returns:
        (B, dim) float32 tensor ``[cos(t w_k), sin(t w_k)]`` with geometric frequencies
        ``w_k = max_period^(-k / (dim // 2))``; zero-padded when ``dim`` is odd.
    """
    half = dim // 2
    k = torch.arange(half, dtype=torch.float32, device=t.device)
    freqs = torch.exp(-math.log(max_period) * k / half)
    angles = t.float()[:, None] * freqs[None, :]
    emb = torch.cat([torch.cos(angles), torch.sin(angles)], dim=-1)
    if dim % 2:
        emb = F.pad(emb, (0, 1))
    return emb


class GroupNorm32(nn.GroupNorm):
    """GroupNorm with 32 groups, computed in at least float32 (output in the input dtype)."""

    def __init__(self, channels: int):
        super().__init__(32, channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = torch.promote_types(x.dtype, torch.float32)
        out = F.group_norm(x.to(dtype), self.num_groups, self.weight.to(dtype), self.bias.to(dtype), self.eps)
        return out.to(x.dtype)


def _zeroed(module: nn.Module) -> nn.Module:
    """Zero all parameters of `module` in place (residual branches start as identity)."""
    for p in module.parameters():
        nn.init.zeros_(p)
    return module


class EmbedSequential(nn.Sequential):
    """A sequence of layers; those that take the timestep embedding receive it."""

    def forward(self, h: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        for layer in self:
            h = layer(h, emb) if isinstance(layer, ResBlock) else layer(h)
        return h


class _MaybeCheckpointed(nn.Module):
    """Mixin: run `_forward` under activation checkpointing when asked and useful."""

    use_checkpoint: bool = False

    def _run(self, *args: torch.Tensor) -> torch.Tensor:
        if self.use_checkpoint and self.training and torch.is_grad_enabled():
            return checkpoint(self._forward, *args, use_reentrant=False)
        return self._forward(*args)


class ResBlock(_MaybeCheckpointed):
    """Residual block conditioned on the timestep embedding.

    in_layers: GroupNorm, SiLU, 3x3 conv (channels -> out_channels).
    emb_layers: SiLU, Linear (emb_channels -> out_channels, or 2*out_channels for
        scale-shift conditioning).
    out_layers: GroupNorm, SiLU, Dropout, zero-initialised 3x3 conv.
    With scale-shift, the embedding modulates the output of out_layers' GroupNorm:
    ``norm(h) * (1 + scale) + shift``; otherwise it is added before out_layers.
    """

    def __init__(
        self,
        channels: int,
        emb_channels: int,
        out_channels: int,
        dropout: float,
        use_scale_shift_norm: bool,
        use_checkpoint: bool = False,
    ):
        super().__init__()
        self.use_scale_shift_norm = use_scale_shift_norm
        self.use_checkpoint = use_checkpoint
        self.in_layers = nn.Sequential(
            GroupNorm32(channels), nn.SiLU(), nn.Conv2d(channels, out_channels, 3, padding=1)
        )
        emb_out = 2 * out_channels if use_scale_shift_norm else out_channels
        self.emb_layers = nn.Sequential(nn.SiLU(), nn.Linear(emb_channels, emb_out))
        self.out_layers = nn.Sequential(
            GroupNorm32(out_channels),
            nn.SiLU(),
            nn.Dropout(p=dropout),
            _zeroed(nn.Conv2d(out_channels, out_channels, 3, padding=1)),
        )
        if out_channels == channels:
            self.skip_connection: nn.Module = nn.Identity()
        else:
            self.skip_connection = nn.Conv2d(channels, out_channels, 1)

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        """x: (B, channels, H, W); emb: (B, emb_channels) -> (B, out_channels, H, W)."""
        return self._run(x, emb)

    def _forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        h = self.in_layers(x)
        cond = self.emb_layers(emb).to(h.dtype)[:, :, None, None]
        if self.use_scale_shift_norm:
            scale, shift = cond.chunk(2, dim=1)
            h = self.out_layers[0](h) * (1 + scale) + shift
            for layer in self.out_layers[1:]:
                h = layer(h)
        else:
            h = self.out_layers(h + cond)
        return self.skip_connection(x) + h


class AttentionBlock(_MaybeCheckpointed):
    """Multi-head self-attention over spatial positions, with a residual connection.

    The 1x1 `qkv` projection produces 3*C channels laid out head by head, each head
    holding its own [q, k, v] block of C / num_heads channels (the original
    improved-diffusion layout, which its checkpoints rely on).
    """

    def __init__(self, channels: int, num_heads: int, use_checkpoint: bool = False):
        super().__init__()
        if channels % num_heads:
            raise ValueError(f"channels ({channels}) must be divisible by num_heads ({num_heads})")
        self.num_heads = num_heads
        self.use_checkpoint = use_checkpoint
        self.norm = GroupNorm32(channels)
        self.qkv = nn.Conv1d(channels, 3 * channels, 1)
        self.proj_out = _zeroed(nn.Conv1d(channels, channels, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: (B, C, H, W) -> (B, C, H, W)."""
        return self._run(x)

    def _forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, *spatial = x.shape
        tokens = x.reshape(b, c, -1)  # (B, C, T)
        qkv = self.qkv(self.norm(tokens))  # (B, 3C, T)
        per_head = qkv.reshape(b * self.num_heads, 3 * c // self.num_heads, -1)
        q, k, v = per_head.chunk(3, dim=1)  # each (B*heads, C/heads, T)
        h = self._attend(q, k, v).reshape(b, c, -1)
        return (tokens + self.proj_out(h)).reshape(b, c, *spatial)

    @staticmethod
    def _attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """Scaled dot-product attention, (N, D, T) layout, softmax in float32."""
        scale = q.shape[1] ** -0.25  # split between q and k for float16 headroom
        logits = torch.einsum("ndt,nds->nts", q * scale, k * scale)
        weights = torch.softmax(logits.float(), dim=-1).to(logits.dtype)
        return torch.einsum("nts,nds->ndt", weights, v)


class Downsample(nn.Module):
    """Halve H and W with a stride-2 3x3 convolution."""

    def __init__(self, channels: int):
        super().__init__()
        self.op = nn.Conv2d(channels, channels, 3, stride=2, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.op(x)


class Upsample(nn.Module):
    """Double H and W by nearest-neighbour repetition followed by a 3x3 convolution."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.interpolate(x, scale_factor=2, mode="nearest"))


# --------------------------------------------------------------------------- #
# The U-Net
# --------------------------------------------------------------------------- #


class IDDPMUNet(nn.Module):
    """U-Net of improved-diffusion, state_dict-compatible with OpenAI's checkpoints.

    Args (the names of improved-diffusion's constructor):
        in_channels: image channels C.
        model_channels: base width; the timestep embedding has 4 * model_channels.
        out_channels: output channels (2 * C for learned variances: [eps, v]).
        num_res_blocks: residual blocks per resolution on the way down (one more up).
        attention_resolutions: downsample factors (1, 2, 4, ...) that get attention.
        dropout: dropout probability inside the residual blocks.
        channel_mult: width multiplier per resolution level.
        num_classes: if set, class-conditional with labels y in [0, num_classes).
        use_checkpoint: trade compute for memory with activation checkpointing
            (only in training mode with gradients enabled).
        num_heads: attention heads on the way down and in the middle.
        num_heads_upsample: heads on the way up; -1 means num_heads.
        use_scale_shift_norm: FiLM-like scale/shift conditioning in the residual blocks.

    Call ``net(x, t, y=None)`` with x (B, C, H, W), t (B,) float timesteps in
    [0, 1000), y (B,) int64 labels; returns (B, out_channels, H, W).
    """

    def __init__(
        self,
        in_channels: int,
        model_channels: int,
        out_channels: int,
        num_res_blocks: int,
        attention_resolutions: Sequence[int],
        dropout: float = 0.0,
        channel_mult: Sequence[int] = (1, 2, 4, 8),
        num_classes: Optional[int] = None,
        use_checkpoint: bool = False,
        num_heads: int = 1,
        num_heads_upsample: int = -1,
        use_scale_shift_norm: bool = False,
    ):
        super().__init__()
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.model_channels = model_channels
        self.num_classes = num_classes
        self._block_kw = dict(dropout=dropout, use_scale_shift_norm=use_scale_shift_norm,
                              use_checkpoint=use_checkpoint)
        self._attn_factors = set(attention_resolutions)
        self._use_checkpoint = use_checkpoint
        heads_up = num_heads if num_heads_upsample == -1 else num_heads_upsample

        emb_dim = 4 * model_channels
        self.time_embed = nn.Sequential(
            nn.Linear(model_channels, emb_dim), nn.SiLU(), nn.Linear(emb_dim, emb_dim)
        )
        if num_classes is not None:
            self.label_emb = nn.Embedding(num_classes, emb_dim)

        widths = [model_channels * m for m in channel_mult]
        self.input_blocks, skip_widths = self._build_down(in_channels, widths, num_res_blocks, num_heads)
        width = widths[-1]
        self.middle_block = EmbedSequential(
            self._res(width, width),
            AttentionBlock(width, num_heads, use_checkpoint),
            self._res(width, width),
        )
        self.output_blocks = self._build_up(widths, skip_widths, num_res_blocks, heads_up)
        self.out = nn.Sequential(
            GroupNorm32(model_channels),
            nn.SiLU(),
            _zeroed(nn.Conv2d(model_channels, out_channels, 3, padding=1)),
        )

    # -- construction helpers ------------------------------------------------ #

    def _res(self, c_in: int, c_out: int) -> ResBlock:
        return ResBlock(c_in, 4 * self.model_channels, c_out, **self._block_kw)

    def _stage(self, c_in: int, c_out: int, factor: int, heads: int) -> list[nn.Module]:
        """A residual block, followed by attention if `factor` is an attention resolution."""
        layers: list[nn.Module] = [self._res(c_in, c_out)]
        if factor in self._attn_factors:
            layers.append(AttentionBlock(c_out, heads, self._use_checkpoint))
        return layers

    def _build_down(self, in_channels: int, widths: list[int], n_res: int, heads: int):
        """Encoder blocks and the widths of the activations they pass to the decoder."""
        stem = nn.Conv2d(in_channels, self.model_channels, 3, padding=1)
        blocks = [EmbedSequential(stem)]
        skips = [self.model_channels]
        width, factor = self.model_channels, 1
        for level, level_width in enumerate(widths):
            for _ in range(n_res):
                blocks.append(EmbedSequential(*self._stage(width, level_width, factor, heads)))
                width = level_width
                skips.append(width)
            if level < len(widths) - 1:
                blocks.append(EmbedSequential(Downsample(width)))
                skips.append(width)
                factor *= 2
        return nn.ModuleList(blocks), skips

    def _build_up(self, widths: list[int], skips: list[int], n_res: int, heads: int) -> nn.ModuleList:
        """Decoder blocks; each consumes one encoder activation (popped from `skips`)."""
        skips = list(skips)
        blocks = []
        width, factor = widths[-1], 2 ** (len(widths) - 1)
        for level in reversed(range(len(widths))):
            for i in range(n_res + 1):
                layers = self._stage(width + skips.pop(), widths[level], factor, heads)
                width = widths[level]
                if level > 0 and i == n_res:
                    layers.append(Upsample(width))
                    factor //= 2
                blocks.append(EmbedSequential(*layers))
        return nn.ModuleList(blocks)

    # -- forward -------------------------------------------------------------- #

    def forward(self, x: torch.Tensor, t: torch.Tensor, y: Optional[torch.Tensor] = None) -> torch.Tensor:
        """x: (B, C, H, W); t: (B,) float timesteps in [0, 1000); y: (B,) labels or None."""
        if (y is not None) != (self.num_classes is not None):
            raise ValueError("pass class labels y if and only if the model is class-conditional")
        t_emb = timestep_embedding(t, self.model_channels)
        emb = self.time_embed(t_emb.to(self.time_embed[0].weight.dtype))
        if y is not None:
            emb = emb + self.label_emb(y)
        h, skips = x, []
        for block in self.input_blocks:
            h = block(h, emb)
            skips.append(h)
        h = self.middle_block(h, emb)
        for block in self.output_blocks:
            h = block(torch.cat([h, skips.pop()], dim=1), emb)
        return self.out(h)


# --------------------------------------------------------------------------- #
# Denoiser wrapper
# --------------------------------------------------------------------------- #


class IDDPMDenoiser(nn.Module):
    """Epsilon denoiser ``f(z, logsnr) -> eps_hat`` around an improved-diffusion network.

    The log-SNR ``a`` of the variance-preserving channel
    ``z = sqrt(sigmoid(a)) x + sqrt(sigmoid(-a)) eps`` is mapped to a continuous
    timestep in [0, T-1] by linear interpolation of the discrete table
    ``log(alpha_bar_t / (1 - alpha_bar_t))``, t = 0..T-1 (so ``sigmoid(a) = alpha_bar``
    at the grid points).  Outside the trained range `logsnr_range` the timestep is
    clamped to the nearest end: the network is then evaluated at the end of its
    schedule and extrapolates.  The network receives ``t * 1000 / T`` when
    `rescale_timesteps` (as improved-diffusion's training did), else ``t``.

    Args:
        net: the raw network, ``net(x, t) -> (B, C or 2C, H, W)``; wrapped, not copied.
        diffusion_steps: T, the number of training steps (4000 for the CIFAR-10 models).
        noise_schedule: "cosine" (s = 0.008, betas clipped at 0.999) or "linear".
        rescale_timesteps: feed the network timesteps rescaled to [0, 1000).
    """

    def __init__(
        self,
        net: nn.Module,
        diffusion_steps: int = 4000,
        noise_schedule: str = "cosine",
        rescale_timesteps: bool = True,
    ):
        super().__init__()
        self.net = net
        self.diffusion_steps = diffusion_steps
        self.noise_schedule = noise_schedule
        self.rescale_timesteps = rescale_timesteps
        self.timesteps = LogSNRTimestepMap(iddpm_alphas_cumprod(noise_schedule, diffusion_steps))

    @property
    def logsnr_range(self) -> tuple[float, float]:
        """(min, max) log-SNR covered by the training timesteps; clamped outside."""
        return self.timesteps.logsnr_range

    @property
    def alphas_cumprod(self) -> torch.Tensor:
        """(T,) float64 alpha_bar_t of the training schedule (the `Denoiser` protocol's optional schedule)."""
        return self.timesteps.alphas_cumprod

    @property
    def variance_type(self) -> Optional[str]:
        """``"learned"`` when the network outputs IDDPM's variance half (2C channels), else ``None`` (unknown)."""
        return "learned" if getattr(self.net, "out_channels", None) == 2 * getattr(self.net, "in_channels", -1) \
            else None

    def eps_and_variance(self, z: torch.Tensor, logsnr: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """One network call: ``(eps_hat, v)``, each (B, C, H, W), ``v`` in [-1, 1] IDDPM's variance output."""
        if self.variance_type != "learned":
            raise ValueError("this network has no variance output (IDDPM learned variance needs out_channels = 2C)")
        out = self.net(z, self.network_time(torch.as_tensor(logsnr, device=z.device).expand(len(z))))
        c = z.shape[1]
        return out[:, :c], out[:, c:]

    def network_time(self, logsnr: torch.Tensor) -> torch.Tensor:
        """(B,) log-SNR -> (B,) float32 time value fed to the network (differentiable)."""
        t = self.timesteps(logsnr)
        if self.rescale_timesteps:
            t = t * (1000.0 / self.diffusion_steps)
        return t.float()

    @property
    def conditional(self) -> Optional[bool]:
        """Whether the network takes class labels (``None``: it does not say)."""
        if hasattr(self.net, "num_classes"):
            return self.net.num_classes is not None
        return None

    def forward(self, z: torch.Tensor, logsnr: torch.Tensor, y: Optional[torch.Tensor] = None) -> torch.Tensor:
        """z: (B, C, H, W) noisy images; logsnr: (B,) or scalar -> eps_hat (B, C, H, W).

        `y` (B,) class labels are passed through for class-conditional networks.
        """
        logsnr = torch.as_tensor(logsnr, device=z.device).expand(z.shape[0])
        t = self.network_time(logsnr)
        out = self.net(z, t) if y is None else self.net(z, t, y)
        return out[:, : z.shape[1]]
