"""The noise-prediction U-Net of Chapter 30, sized for 28x28 MNIST.

28x28 -> 14x14 -> 7x7 and back, residual blocks with GroupNorm and a sinusoidal time embedding
added inside every block, self-attention at the 7x7 resolution, skip connections across.
The network knows nothing of the noise schedule: it maps (x_t, t) to a predicted noise.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn


@dataclass
class UNetConfig:
    channels: int = 32  # base width
    multipliers: tuple[int, int, int] = (1, 2, 2)  # width = channels * multiplier at 28x28, 14x14, 7x7
    blocks_per_level: int = 2
    groups: int = 8  # GroupNorm groups
    attention: bool = True  # self-attention at 7x7 (an ablation switches it off)
    time_embedding: bool = True  # an ablation switches it off: the network then cannot see t
    dropout: float = 0.0
    num_classes: int = 0  # > 0: class-conditional (a learned label embedding added to the time embedding)


def timestep_embedding(t: torch.Tensor, dim: int, max_period: float = 10_000.0) -> torch.Tensor:
    """Sinusoidal embedding of integer timesteps, ``[B] -> [B, dim]`` (Vaswani et al.; Ho et al.)."""
    half = dim // 2
    # $\omega_i = \text{max\_period}^{-i/\text{half}}$, embedding $= [\cos(t\omega), \sin(t\omega)]$
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    angles = t.float()[:, None] * freqs[None]
    return torch.cat([torch.cos(angles), torch.sin(angles)], dim=1)


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

    def forward(self, x: torch.Tensor, t_emb: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = h + self.time(t_emb)[:, :, None, None]  # the timestep enters every block
        h = self.conv2(self.dropout(F.silu(self.norm2(h))))
        return self.skip(x) + h


class SelfAttention(nn.Module):
    def __init__(self, channels: int, groups: int, heads: int = 4):
        super().__init__()
        self.norm = nn.GroupNorm(groups, channels)
        self.attn = nn.MultiheadAttention(channels, heads, batch_first=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        seq = self.norm(x).flatten(2).transpose(1, 2)  # (B, H*W, C)
        out, _ = self.attn(seq, seq, seq, need_weights=False)
        return x + out.transpose(1, 2).view(b, c, h, w)


class UNet(nn.Module):
    def __init__(self, config: UNetConfig | None = None):
        super().__init__()
        self.config = cfg = config or UNetConfig()
        c, g, t_dim = cfg.channels, cfg.groups, 4 * cfg.channels
        if len(cfg.multipliers) != 3:
            raise ValueError(f"multipliers: one per resolution 28, 14, 7; got {cfg.multipliers}")
        widths = [c * m for m in cfg.multipliers]
        self.t_mlp = nn.Sequential(nn.Linear(c, t_dim), nn.SiLU(), nn.Linear(t_dim, t_dim))
        self.label_emb = nn.Embedding(cfg.num_classes, t_dim) if cfg.num_classes > 0 else None
        self.stem = nn.Conv2d(1, c, 3, padding=1)
        self.down, self.downsample = nn.ModuleList(), nn.ModuleList()
        skips, ch = [c], c
        for level, w in enumerate(widths):
            for _ in range(cfg.blocks_per_level):
                self.down.append(ResBlock(ch, w, t_dim, g, cfg.dropout))
                ch = w
                skips.append(ch)
            if level < len(widths) - 1:
                self.downsample.append(nn.Conv2d(ch, ch, 3, stride=2, padding=1))
                skips.append(ch)
        self.mid1 = ResBlock(ch, ch, t_dim, g, cfg.dropout)
        self.mid_attn = SelfAttention(ch, g) if cfg.attention else nn.Identity()
        self.mid2 = ResBlock(ch, ch, t_dim, g, cfg.dropout)
        self.up, self.upsample = nn.ModuleList(), nn.ModuleList()
        for level, w in reversed(list(enumerate(widths))):
            for _ in range(cfg.blocks_per_level + 1):
                self.up.append(ResBlock(ch + skips.pop(), w, t_dim, g, cfg.dropout))
                ch = w
            if level > 0:
                self.upsample.append(nn.ConvTranspose2d(ch, ch, 4, stride=2, padding=1))
        self.out = nn.Sequential(nn.GroupNorm(g, ch), nn.SiLU(), nn.Conv2d(ch, 1, 3, padding=1))

    def embed(self, t: torch.Tensor, labels: torch.Tensor | None) -> torch.Tensor:
        t_emb = timestep_embedding(t, self.config.channels)
        if not self.config.time_embedding:
            t_emb = torch.zeros_like(t_emb)
        emb = self.t_mlp(t_emb)
        if self.label_emb is not None:
            if labels is None:
                raise ValueError("this U-Net is class-conditional: pass labels")
            emb = emb + self.label_emb(labels)
        return emb

    def forward(self, x: torch.Tensor, t: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        """Predicted noise for images ``x`` ``[B, 1, 28, 28]`` at integer timesteps ``t`` ``[B]``."""
        if x.ndim != 4 or tuple(x.shape[1:]) != (1, 28, 28):
            raise ValueError(f"x must have shape [B, 1, 28, 28], got {list(x.shape)}")
        if t.shape != (len(x),):
            raise ValueError(f"t must have shape [{len(x)}], got {list(t.shape)}")
        emb = self.embed(t, labels)
        h = self.stem(x)
        hs = [h]
        blocks = iter(self.down)
        for level in range(3):
            for _ in range(self.config.blocks_per_level):
                h = next(blocks)(h, emb)
                hs.append(h)
            if level < 2:
                h = self.downsample[level](h)
                hs.append(h)
        h = self.mid2(self.mid_attn(self.mid1(h, emb)), emb)
        blocks = iter(self.up)
        for level in range(3):
            for _ in range(self.config.blocks_per_level + 1):
                h = next(blocks)(torch.cat([h, hs.pop()], dim=1), emb)
            if level < 2:
                h = self.upsample[level](h)
        return self.out(h)


def parameter_count(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
