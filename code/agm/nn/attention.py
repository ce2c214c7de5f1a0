"""Multi-head self-attention through ``scaled_dot_product_attention``: one layer for the whole book.

Used over the pixels of a feature map (the U-Net, no mask) and over a sequence of tokens (the
transformer, causal, with a key/value cache for generation one token at a time). ``attention_weights``
writes the softmax matrix out in full, for reading and plotting (Chapter 43).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

# (q, k, offset) -> (q, k): a position-dependent map applied to queries and keys (rotary embeddings)
QKTransform = Callable[[torch.Tensor, torch.Tensor, int], tuple[torch.Tensor, torch.Tensor]]


def attention_weights(q: torch.Tensor, k: torch.Tensor, causal: bool = False,
                      scale: float | None = None) -> torch.Tensor:
    """softmax(q k^T * scale + M): queries (..., T, d) and keys (..., S, d) -> weights (..., T, S), rows summing
    to one. ``scale`` defaults to 1/sqrt(d). With ``causal``, the T queries are the last T of the S positions
    (as with a KV cache) and query i attends to keys 0..S-T+i."""
    T, S, d = q.shape[-2], k.shape[-2], q.shape[-1]
    # $s_{ij} = q_i \cdot k_j / \sqrt{d}$
    scores = q @ k.transpose(-1, -2) * (d**-0.5 if scale is None else scale)  # (..., T, S)
    if causal:
        # $M_{ij} = -\infty$ for $j > i$: $e^{-\infty} = 0$, no weight on a later position
        future = torch.ones(T, S, dtype=torch.bool, device=q.device).triu(S - T + 1)
        scores = scores.masked_fill(future, float("-inf"))
    return scores.softmax(-1)


class KVCache:
    """Keys and values of the positions seen so far, per layer: ``(B, H, T, C/H)`` each."""

    def __init__(self) -> None:
        self.keys: dict[int, torch.Tensor] = {}
        self.values: dict[int, torch.Tensor] = {}

    def length(self) -> int:
        """Positions held (read it before a forward pass: layers extend the cache one after another)."""
        return self.keys[0].shape[2] if 0 in self.keys else 0

    def extend(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if layer in self.keys:
            k = torch.cat([self.keys[layer], k], dim=2)
            v = torch.cat([self.values[layer], v], dim=2)
        self.keys[layer], self.values[layer] = k, v
        return k, v


class SelfAttention(nn.Module):
    """softmax(Q K^T / sqrt(d) + M) V over ``heads`` heads, Q, K, V = one linear map of the input."""

    def __init__(self, width: int, heads: int, causal: bool = False, dropout: float = 0.0, bias: bool = True):
        super().__init__()
        if width % heads:
            raise ValueError(f"width {width} must be divisible by heads {heads}")
        self.heads, self.causal, self.dropout = heads, causal, dropout
        self.qkv = nn.Linear(width, 3 * width, bias=bias)
        self.out = nn.Linear(width, width, bias=bias)

    def forward(self, h: torch.Tensor, cache: KVCache | None = None, layer: int = 0, offset: int = 0,
                qk_transform: QKTransform | None = None) -> torch.Tensor:
        """``h`` (B, T, C) -> (B, T, C). With ``cache``, ``h`` holds only the new positions offset..offset+T-1."""
        B, T, C = h.shape
        q, k, v = self.split_heads(h)  # 3 x (B, H, T, C/H)
        if qk_transform is not None:
            q, k = qk_transform(q, k, offset)
        if cache is not None:
            k, v = cache.extend(layer, k, v)  # (B, H, offset + T, C/H)
        dropout = self.dropout if self.training else 0.0
        # $\mathrm{softmax}\big(QK^\top/\sqrt{d} + M\big)V$, $M_{ij} = -\infty$ for $j > i$ when causal
        if self.causal and offset == 0 and T > 1:
            y = F.scaled_dot_product_attention(q, k, v, dropout_p=dropout, is_causal=True)  # (B, H, T, C/H)
        else:
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=self._mask(T, offset, h.device), dropout_p=dropout)
        return self.out(y.transpose(1, 2).reshape(B, T, C))

    def split_heads(self, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(B, T, C) -> queries, keys, values of every head, each (B, H, T, C/H): one linear map, then a reshape."""
        B, T, C = h.shape
        q, k, v = self.qkv(h).view(B, T, 3, self.heads, C // self.heads).permute(2, 0, 3, 1, 4)
        return q, k, v

    def weights(self, h: torch.Tensor) -> torch.Tensor:
        """The attention weights of every head over ``h`` (B, T, C), no cache or qk_transform: (B, H, T, T)."""
        q, k, _ = self.split_heads(h)
        return attention_weights(q, k, self.causal)

    def _mask(self, T: int, offset: int, device: torch.device) -> torch.Tensor | None:
        """Causal mask of T new queries at positions offset.. against offset + T keys (True = attend)."""
        if not self.causal or T == 1:
            return None  # a single new query may attend to every key so far
        rows = torch.arange(offset, offset + T, device=device)[:, None]
        return torch.arange(offset + T, device=device)[None, :] <= rows


class SpatialSelfAttention(nn.Module):
    """Self-attention over the H*W positions of a feature map, with a GroupNorm in front and a residual."""

    def __init__(self, channels: int, groups: int, heads: int = 4):
        super().__init__()
        self.norm = nn.GroupNorm(groups, channels)
        self.attn = SelfAttention(channels, heads)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        seq = self.norm(x).flatten(2).transpose(1, 2)  # (B, H*W, C)
        return x + self.attn(seq).transpose(1, 2).reshape(b, c, h, w)
