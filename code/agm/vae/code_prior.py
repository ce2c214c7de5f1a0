"""An autoregressive prior over a grid of discrete codes, Chapter 23: the shared decoder-only transformer
of :mod:`agm.nn.transformer` read over the codes in raster order.

The grid is a sequence c_1..c_L of indices into a codebook of K entries, and
p(c) = prod_i p(c_i | c_<i) with each factor a softmax over the K codes. A start token (index K)
stands in front of the sequence, so position i sees only the codes before it.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from agm.nn.transformer import Transformer, TransformerConfig


@dataclass
class CodePriorConfig:
    """The transformer's size; the vocabulary (K codes + a start token) and length come from the grid."""

    width: int = 96  # model width (embedding size)
    layers: int = 3  # transformer blocks
    heads: int = 4  # attention heads per block; width must divide by heads


class CodePrior(nn.Module):
    def __init__(self, config: CodePriorConfig, codebook_size: int, length: int):
        super().__init__()
        if codebook_size < 2 or length < 1:
            raise ValueError(f"need codebook_size >= 2 and length >= 1, got {codebook_size} and {length}")
        self.config, self.codebook_size, self.length = config, codebook_size, length
        self.transformer = Transformer(TransformerConfig(
            vocab_size=codebook_size + 1, output_size=codebook_size, block_size=length,
            width=config.width, layers=config.layers, heads=config.heads))

    def check_codes(self, codes: torch.Tensor) -> torch.Tensor:
        K, L = self.codebook_size, self.length
        if codes.ndim != 2 or not 1 <= codes.shape[1] <= L or codes.dtype != torch.long:
            raise ValueError(f"codes must be a long tensor [B, T] with 1 <= T <= {L}, got {codes.dtype} "
                             f"{list(codes.shape)}")
        if len(codes) and (codes.min() < 0 or codes.max() >= K):
            raise ValueError(f"codes must lie in 0..{K - 1}")
        return codes

    def start(self, n: int, device: torch.device | None = None) -> torch.Tensor:
        """The start token of n sequences: (n, 1)."""
        return torch.full((n, 1), self.codebook_size, dtype=torch.long, device=device)

    def forward(self, codes: torch.Tensor) -> torch.Tensor:
        """Logits (B, T, K) of p(c_i | c_<i) at every position i of ``codes`` (B, T) — teacher forcing."""
        self.check_codes(codes)
        return self.transformer(torch.cat([self.start(len(codes), codes.device), codes[:, :-1]], 1))

    def log_prob(self, codes: torch.Tensor) -> torch.Tensor:
        """log p(c) = sum_i log p(c_i | c_<i) per sequence, in nats: (B,)."""
        logp = self(codes).log_softmax(-1)  # (B, T, K)
        return logp.gather(-1, codes.unsqueeze(-1)).squeeze(-1).sum(1)

    @torch.no_grad()
    def sample(self, n: int, generator: torch.Generator | None = None, temperature: float = 1.0) -> torch.Tensor:
        """Ancestral sampling c_i ~ softmax(logits_i / temperature), one position at a time: (n, L)."""
        if n < 1:
            raise ValueError(f"n must be >= 1, got {n}")
        start = self.start(n, self.transformer.head.weight.device)
        return self.transformer.generate(start, self.length, generator, temperature)[:, 1:]
