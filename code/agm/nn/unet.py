"""The noise-prediction U-Net of Chapter 30: any input channels and resolution, optional class labels.

Down through ``len(multipliers)`` resolutions and back (28 -> 14 -> 7 for MNIST pixels; a 7x7 latent
uses fewer levels), residual blocks with GroupNorm and a sinusoidal time embedding added inside every
block, self-attention at the lowest resolution, skip connections across. A class-conditional network
(``num_classes`` > 0) adds a label embedding to the time embedding; its extra label ``num_classes`` is
the null class, which classifier-free guidance trains on and calls for the unconditional prediction.
The network knows nothing of the noise schedule: it maps (x_t, t, y) to a prediction of x_t's shape.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from agm.nn.attention import SpatialSelfAttention


@dataclass
class UNetConfig:
    in_channels: int = 1  # channels of x_t (1 for MNIST pixels, C for a C x h x w latent)
    resolution: int = 28  # height = width of x_t
    channels: int = 16  # base width
    multipliers: tuple[int, ...] = (1, 2, 4)  # width = channels * multiplier, one per resolution: 28, 14, 7
    blocks_per_level: int = 1
    groups: int = 8  # GroupNorm groups
    attention: bool = True  # self-attention at the lowest resolution (an ablation switches it off)
    time_embedding: bool = True  # an ablation switches it off: the network then cannot see t
    dropout: float = 0.0
    num_classes: int = 0  # > 0: class-conditional, labels 0..num_classes-1 and the null label num_classes

    def __post_init__(self):
        if not self.multipliers or self.channels < 1 or self.in_channels < 1:
            raise ValueError(f"need channels >= 1, in_channels >= 1 and at least one multiplier, got {self}")
        if any((self.channels * m) % self.groups for m in self.multipliers):
            raise ValueError(f"every width channels * multiplier must divide by groups = {self.groups}")
        if self.resolution < 2 ** (len(self.multipliers) - 1):
            raise ValueError(f"resolution {self.resolution} is too small for {len(self.multipliers)} levels")

    @property
    def null_label(self) -> int:
        return self.num_classes


def timestep_embedding(t: torch.Tensor, dim: int, max_period: float = 10_000.0) -> torch.Tensor:
    """Sinusoidal embedding of integer timesteps, ``[B] -> [B, dim]`` (Vaswani et al.; Ho et al.)."""
    half = dim // 2
    # $\omega_i = \text{max\_period}^{-i/\text{half}}$, embedding $= [\cos(t\omega), \sin(t\omega)]$
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    angles = t.float()[:, None] * freqs[None]  # (B, half)
    return torch.cat([torch.cos(angles), torch.sin(angles)], dim=1)  # (B, dim)


class ResBlock(nn.Module):
    def __init__(self, c_in: int, c_out: int, t_dim: int, groups: int, dropout: float):
        super().__init__()
        self.norm1 = nn.GroupNorm(groups, c_in)
        self.conv1 = nn.Conv2d(c_in, c_out, 3, padding=1)
        self.time = nn.Linear(t_dim, c_out)
        self.norm2 = nn.GroupNorm(groups, c_out)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, padding=1)
        self.skip = nn.Conv2d(c_in, c_out, 1) if c_in != c_out else nn.Identity()

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        # $h = W_1 * \mathrm{SiLU}(\mathrm{GN}(x)) + A\,e$: the (time, label) embedding e shifts every channel
        h = self.conv1(F.silu(self.norm1(x)))  # (B, C_out, H, W)
        h = h + self.time(emb)[:, :, None, None]
        # $\mathrm{out} = S x + W_2 * \mathrm{Dropout}(\mathrm{SiLU}(\mathrm{GN}(h)))$
        h = self.conv2(self.dropout(F.silu(self.norm2(h))))
        return self.skip(x) + h


class UNet(nn.Module):
    def __init__(self, config: UNetConfig | None = None):
        super().__init__()
        self.config = cfg = config or UNetConfig()
        c, g, t_dim = cfg.channels, cfg.groups, 4 * cfg.channels
        widths = [c * m for m in cfg.multipliers]
        levels = len(widths)
        self.t_mlp = nn.Sequential(nn.Linear(c, t_dim), nn.SiLU(), nn.Linear(t_dim, t_dim))
        self.label_emb = nn.Embedding(cfg.num_classes + 1, t_dim) if cfg.num_classes > 0 else None  # + null
        self.stem = nn.Conv2d(cfg.in_channels, c, 3, padding=1)
        self.down, self.downsample = nn.ModuleList(), nn.ModuleList()
        skips, ch = [c], c
        for level, w in enumerate(widths):
            for _ in range(cfg.blocks_per_level):
                self.down.append(ResBlock(ch, w, t_dim, g, cfg.dropout))
                ch = w
                skips.append(ch)
            if level < levels - 1:
                self.downsample.append(nn.Conv2d(ch, ch, 3, stride=2, padding=1))  # H -> ceil(H / 2)
                skips.append(ch)
        self.mid1 = ResBlock(ch, ch, t_dim, g, cfg.dropout)
        self.mid_attn = SpatialSelfAttention(ch, g) if cfg.attention else nn.Identity()
        self.mid2 = ResBlock(ch, ch, t_dim, g, cfg.dropout)
        self.up, self.upsample = nn.ModuleList(), nn.ModuleList()
        for level, w in reversed(list(enumerate(widths))):
            for _ in range(cfg.blocks_per_level + 1):
                self.up.append(ResBlock(ch + skips.pop(), w, t_dim, g, cfg.dropout))
                ch = w
            if level > 0:
                self.upsample.append(nn.ConvTranspose2d(ch, ch, 4, stride=2, padding=1))  # H -> 2H
        self.out = nn.Sequential(nn.GroupNorm(g, ch), nn.SiLU(), nn.Conv2d(ch, cfg.in_channels, 3, padding=1))

    def embed(self, t: torch.Tensor, labels: torch.Tensor | None) -> torch.Tensor:
        """The (B, 4C) embedding of timesteps and labels; labels None = the null label for every row."""
        t_emb = timestep_embedding(t, self.config.channels)  # (B, C)
        if not self.config.time_embedding:
            t_emb = torch.zeros_like(t_emb)
        emb = self.t_mlp(t_emb)  # (B, 4C)
        if self.label_emb is None:
            if labels is not None:
                raise ValueError("this U-Net is not class-conditional (num_classes = 0): it cannot take labels")
            return emb
        if labels is None:
            labels = torch.full_like(t, self.config.null_label)
        if labels.shape != t.shape or ((labels < 0) | (labels > self.config.null_label)).any():
            raise ValueError(f"labels must be [B] integers in 0..{self.config.null_label} "
                             f"({self.config.null_label} = null), got {list(labels.shape)}")
        return emb + self.label_emb(labels)

    def check_input(self, x: torch.Tensor, t: torch.Tensor) -> None:
        c = self.config
        expected = (c.in_channels, c.resolution, c.resolution)
        if x.ndim != 4 or tuple(x.shape[1:]) != expected:
            raise ValueError(f"x must have shape [B, {', '.join(map(str, expected))}], got {list(x.shape)}")
        if t.shape != (len(x),):
            raise ValueError(f"t must have shape [{len(x)}], got {list(t.shape)}")

    def forward(self, x: torch.Tensor, t: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        """Prediction ``[B, C, H, W]`` for ``x`` ``[B, C, H, W]`` at integer timesteps ``t`` ``[B]``."""
        self.check_input(x, t)
        levels = len(self.config.multipliers)
        emb = self.embed(t, labels)  # (B, 4C)
        h = self.stem(x)  # (B, C, H, W)
        hs = [h]
        blocks = iter(self.down)
        for level in range(levels):
            for _ in range(self.config.blocks_per_level):
                h = next(blocks)(h, emb)  # (B, C * multipliers[level], H_level, W_level)
                hs.append(h)
            if level < levels - 1:
                h = self.downsample[level](h)  # (B, w, ceil(H/2), ceil(W/2))
                hs.append(h)
        h = self.mid2(self.mid_attn(self.mid1(h, emb)), emb)  # lowest resolution, e.g. (B, 4C, 7, 7)
        blocks = iter(self.up)
        for level in range(levels):
            for _ in range(self.config.blocks_per_level + 1):
                skip = hs.pop()  # the matching activation of the down path, same H_level x W_level
                h = next(blocks)(torch.cat([h, skip], dim=1), emb)  # (B, C * multipliers[level], H_level, W_level)
            if level < levels - 1:
                h = self.upsample[level](h)
                h = h[..., : hs[-1].shape[-2], : hs[-1].shape[-1]]  # an odd size (7 -> 4 -> 8) is cropped back
        return self.out(h)  # (B, in_channels, H, W)
