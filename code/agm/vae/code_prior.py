"""An autoregressive prior over a grid of discrete codes: a small causal transformer, Chapter 23.

The grid is read in raster order as a sequence c_1..c_L of indices into a codebook of K entries, and
p(c) = prod_i p(c_i | c_<i) with each factor a softmax over the K codes. A start token (index K)
stands in front of the sequence, so position i sees only the codes before it.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn


@dataclass
class CodePriorConfig:
    vocab_size: int = 32  # K, the codebook size; index K is the start token
    length: int = 49  # L, the positions of a 7x7 grid in raster order
    width: int = 96  # model width (embedding size)
    layers: int = 3  # transformer blocks
    heads: int = 4  # attention heads per block; width must divide by heads


class CausalSelfAttention(nn.Module):
    def __init__(self, config: CodePriorConfig):
        super().__init__()
        self.heads = config.heads
        self.qkv = nn.Linear(config.width, 3 * config.width)
        self.out = nn.Linear(config.width, config.width)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        B, T, C = h.shape
        q, k, v = self.qkv(h).view(B, T, 3, self.heads, C // self.heads).permute(2, 0, 3, 1, 4)  # 3 x (B, H, T, C/H)
        # $\mathrm{softmax}\big(QK^\top/\sqrt{d} + M\big)V$, $M_{ij} = -\infty$ for $j > i$
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)  # (B, H, T, C/H)
        return self.out(y.transpose(1, 2).reshape(B, T, C))


class Block(nn.Module):
    """Pre-LayerNorm transformer block: attention and an MLP, each added to the residual stream."""

    def __init__(self, config: CodePriorConfig):
        super().__init__()
        self.ln1, self.ln2 = nn.LayerNorm(config.width), nn.LayerNorm(config.width)
        self.attn = CausalSelfAttention(config)
        self.mlp = nn.Sequential(nn.Linear(config.width, 4 * config.width), nn.GELU(),
                                 nn.Linear(4 * config.width, config.width))

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        h = h + self.attn(self.ln1(h))
        return h + self.mlp(self.ln2(h))


class CodePrior(nn.Module):
    def __init__(self, config: CodePriorConfig):
        super().__init__()
        if config.vocab_size < 2 or config.length < 1 or config.width % config.heads:
            raise ValueError(f"need vocab_size >= 2, length >= 1 and width divisible by heads, got {config}")
        self.config = config
        self.token = nn.Embedding(config.vocab_size + 1, config.width)  # + the start token
        self.position = nn.Embedding(config.length, config.width)
        self.blocks = nn.ModuleList(Block(config) for _ in range(config.layers))
        self.ln = nn.LayerNorm(config.width)
        self.head = nn.Linear(config.width, config.vocab_size)

    def check_codes(self, codes: torch.Tensor) -> torch.Tensor:
        K, L = self.config.vocab_size, self.config.length
        if codes.ndim != 2 or not 1 <= codes.shape[1] <= L or codes.dtype != torch.long:
            raise ValueError(f"codes must be a long tensor [B, T] with 1 <= T <= {L}, got {codes.dtype} "
                             f"{list(codes.shape)}")
        if len(codes) and (codes.min() < 0 or codes.max() >= K):
            raise ValueError(f"codes must lie in 0..{K - 1}")
        return codes

    def next_logits(self, tokens: torch.Tensor) -> torch.Tensor:
        """Logits (B, T, K) of the code after each prefix; ``tokens`` (B, T) begin with the start token."""
        T = tokens.shape[1]
        h = self.token(tokens) + self.position(torch.arange(T, device=tokens.device))  # (B, T, C)
        for block in self.blocks:
            h = block(h)
        return self.head(self.ln(h))

    def forward(self, codes: torch.Tensor) -> torch.Tensor:
        """Logits (B, T, K) of p(c_i | c_<i) at every position i of ``codes`` (B, T) — teacher forcing."""
        self.check_codes(codes)
        start = torch.full((len(codes), 1), self.config.vocab_size, dtype=torch.long, device=codes.device)
        return self.next_logits(torch.cat([start, codes[:, :-1]], 1))

    def log_prob(self, codes: torch.Tensor) -> torch.Tensor:
        """log p(c) = sum_i log p(c_i | c_<i) per sequence, in nats: (B,)."""
        logp = self(codes).log_softmax(-1)  # (B, T, K)
        return logp.gather(-1, codes.unsqueeze(-1)).squeeze(-1).sum(1)

    @torch.no_grad()
    def sample(self, n: int, generator: torch.Generator | None = None, temperature: float = 1.0) -> torch.Tensor:
        """Ancestral sampling c_i ~ softmax(logits_i / temperature), one position at a time: (n, L)."""
        if n < 1 or temperature <= 0:
            raise ValueError(f"need n >= 1 and temperature > 0, got {n} and {temperature}")
        dev = self.head.weight.device
        tokens = torch.full((n, 1), self.config.vocab_size, dtype=torch.long, device=dev)
        for _ in range(self.config.length):
            probs = (self.next_logits(tokens)[:, -1] / temperature).softmax(-1)  # (n, K)
            nxt = torch.multinomial(probs.cpu(), 1, generator=generator).to(dev)  # (n, 1)
            tokens = torch.cat([tokens, nxt], 1)
        return tokens[:, 1:]
