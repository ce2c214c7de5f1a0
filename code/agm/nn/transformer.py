"""A decoder-only transformer in the manner of nanoGPT: one config, blocks, a KV cache for generation.

Used by the VQ-VAE's prior over codes (Chapter 23) and by the autoregressive models, policies and
reward models of Modules 5–7. Switches for the ablations of Chapters 46–47: pre- or post-LayerNorm,
residual connections on or off, and the positional embedding (learned, sinusoidal, 2-D, rotary, none).
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import nn

from agm.nn.attention import KVCache, SelfAttention

NORMS = ("pre", "post")
POSITIONS = ("learned", "sinusoidal", "2d", "rotary", "none")


@dataclass
class TransformerConfig:
    vocab_size: int = 32  # input symbols, special tokens (start, labels) included
    output_size: int | None = None  # symbols the head predicts; None = vocab_size
    block_size: int = 49  # the longest sequence, in tokens
    width: int = 96  # C, the embedding size
    layers: int = 3
    heads: int = 4  # width must divide by heads
    mlp_ratio: int = 4  # hidden width of each block's MLP = mlp_ratio * width
    dropout: float = 0.0
    norm: str = "pre"  # "pre": x + f(LN(x)) (GPT-2); "post": LN(x + f(x)) (Vaswani et al.)
    residual: bool = True  # False removes both skip connections of every block (an ablation)
    positions: str = "learned"  # one of POSITIONS
    grid: tuple[int, int] | None = None  # (rows, cols) of the token grid, for "2d" positions

    def __post_init__(self):
        if self.norm not in NORMS:
            raise ValueError(f"norm must be one of {NORMS}, got {self.norm!r}")
        if self.positions not in POSITIONS:
            raise ValueError(f"positions must be one of {POSITIONS}, got {self.positions!r}")
        if self.vocab_size < 1 or self.block_size < 1 or self.layers < 0 or self.width % self.heads:
            raise ValueError(f"need vocab_size >= 1, block_size >= 1 and width divisible by heads, got {self}")
        if self.positions == "2d" and (self.grid is None or self.grid[0] * self.grid[1] < self.block_size):
            raise ValueError(f"2-D positions need a grid of at least block_size cells, got {self.grid}")
        if self.positions == "rotary" and (self.width // self.heads) % 2:
            raise ValueError("rotary positions need an even head dimension")


def sinusoidal_frequencies(width: int, max_period: float = 10_000.0) -> torch.Tensor:
    """The width // 2 frequencies of :func:`sinusoidal_table`, from 1 down to nearly 1 / max_period."""
    half = width // 2
    # $\omega_i = \text{max\_period}^{-i/\text{half}}$, $i = 0, \dots, \text{half} - 1$
    return torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32) / half)


def sinusoidal_table(length: int, width: int, max_period: float = 10_000.0) -> torch.Tensor:
    """Vaswani et al.'s fixed embedding (length, width): sines and cosines of geometric frequencies."""
    half = width // 2
    # row $p$ = $[\sin(p\omega), \cos(p\omega)]$
    freqs = sinusoidal_frequencies(width, max_period)
    angles = torch.arange(length, dtype=torch.float32)[:, None] * freqs[None]
    table = torch.cat([torch.sin(angles), torch.cos(angles)], dim=1)
    return nn.functional.pad(table, (0, width - 2 * half))


def sinusoidal_shift(offset: int, width: int, max_period: float = 10_000.0) -> torch.Tensor:
    """The matrix R (width, width), the same for every p, with row p + offset of :func:`sinusoidal_table` equal to
    R @ row p (Chapter 47): a rotation by the angle offset * omega_i in the plane of each (sin, cos) pair."""
    half = width // 2
    angle = offset * sinusoidal_frequencies(width, max_period).double()  # (half,)
    cos, sin, i = angle.cos(), angle.sin(), torch.arange(half)
    R = torch.eye(width, dtype=torch.float64)  # an odd width's padding column stays zero under any R
    # $\sin((p + k)\omega) = \cos(k\omega)\sin(p\omega) + \sin(k\omega)\cos(p\omega)$
    R[i, i], R[i, i + half] = cos, sin
    # $\cos((p + k)\omega) = -\sin(k\omega)\sin(p\omega) + \cos(k\omega)\cos(p\omega)$
    R[i + half, i], R[i + half, i + half] = -sin, cos
    return R


def rotate(x: torch.Tensor, positions: torch.Tensor, max_period: float = 10_000.0) -> torch.Tensor:
    """Rotary embedding (Su et al., 2021) of ``x`` (B, H, T, d) at integer ``positions`` (T,)."""
    d = x.shape[-1]
    # pairs $(x_{2i}, x_{2i+1})$ rotated by the angle $p\,\theta_i$, $\theta_i = \text{max\_period}^{-2i/d}$
    theta = torch.exp(-math.log(max_period) * torch.arange(0, d, 2, dtype=torch.float32, device=x.device) / d)
    angles = positions.to(x.device, torch.float32)[:, None] * theta[None]  # (T, d/2)
    cos, sin = angles.cos().to(x.dtype), angles.sin().to(x.dtype)
    even, odd = x[..., 0::2], x[..., 1::2]
    return torch.stack([even * cos - odd * sin, even * sin + odd * cos], dim=-1).flatten(-2)


def feed_forward(width: int, ratio: int = 4, dropout: float = 0.0) -> nn.Sequential:
    """The position-wise MLP of a block: width -> ratio * width -> GELU -> width."""
    return nn.Sequential(nn.Linear(width, ratio * width), nn.GELU(), nn.Linear(ratio * width, width),
                         nn.Dropout(dropout))


class Block(nn.Module):
    """Attention and an MLP, each around the residual stream, with pre- or post-LayerNorm."""

    def __init__(self, config: TransformerConfig):
        super().__init__()
        self.config = config
        self.ln1, self.ln2 = nn.LayerNorm(config.width), nn.LayerNorm(config.width)
        self.attn = SelfAttention(config.width, config.heads, causal=True, dropout=config.dropout)
        self.mlp = feed_forward(config.width, config.mlp_ratio, config.dropout)

    def forward(self, h: torch.Tensor, cache: KVCache | None = None, layer: int = 0, offset: int = 0,
                qk_transform=None) -> torch.Tensor:
        skip = 1.0 if self.config.residual else 0.0
        if self.config.norm == "pre":
            # $h \leftarrow h + \mathrm{Attn}(\mathrm{LN}(h))$, $h \leftarrow h + \mathrm{MLP}(\mathrm{LN}(h))$
            h = skip * h + self.attn(self.ln1(h), cache, layer, offset, qk_transform)
            return skip * h + self.mlp(self.ln2(h))
        # $h \leftarrow \mathrm{LN}(h + \mathrm{Attn}(h))$, $h \leftarrow \mathrm{LN}(h + \mathrm{MLP}(h))$
        h = self.ln1(skip * h + self.attn(h, cache, layer, offset, qk_transform))
        return self.ln2(skip * h + self.mlp(h))


class Transformer(nn.Module):
    """tokens (B, T) -> logits (B, T, output_size) of the next symbol after each prefix."""

    def __init__(self, config: TransformerConfig):
        super().__init__()
        self.config = c = config
        self.token = nn.Embedding(c.vocab_size, c.width)
        if c.positions == "learned":
            self.position = nn.Embedding(c.block_size, c.width)
        elif c.positions == "2d":
            self.row, self.col = nn.Embedding(c.grid[0], c.width), nn.Embedding(c.grid[1], c.width)
        elif c.positions == "sinusoidal":
            self.register_buffer("table", sinusoidal_table(c.block_size, c.width), persistent=False)
        self.drop = nn.Dropout(c.dropout)
        self.blocks = nn.ModuleList(Block(c) for _ in range(c.layers))
        self.ln = nn.LayerNorm(c.width) if c.norm == "pre" else nn.Identity()  # post-LN blocks end normalized
        self.head = nn.Linear(c.width, c.output_size or c.vocab_size)

    def embed(self, tokens: torch.Tensor, offset: int = 0) -> torch.Tensor:
        """Token plus (absolute) position embeddings of ``tokens`` at positions offset.., (B, T, C)."""
        c, T = self.config, tokens.shape[1]
        if offset + T > c.block_size:
            raise ValueError(f"sequence of {offset + T} tokens exceeds block_size {c.block_size}")
        if len(tokens) and (tokens.min() < 0 or tokens.max() >= c.vocab_size):
            raise ValueError(f"tokens must lie in 0..{c.vocab_size - 1}")
        h = self.token(tokens)  # (B, T, C)
        pos = torch.arange(offset, offset + T, device=tokens.device)
        if c.positions == "learned":
            h = h + self.position(pos)
        elif c.positions == "2d":
            h = h + self.row(pos // c.grid[1]) + self.col(pos % c.grid[1])
        elif c.positions == "sinusoidal":
            h = h + self.table[offset : offset + T]
        return self.drop(h)

    def forward(self, tokens: torch.Tensor, cache: KVCache | None = None) -> torch.Tensor:
        """Logits (B, T, K). With a ``cache``, ``tokens`` are the new positions after those it holds."""
        return self.head(self.features(tokens, cache))

    def features(self, tokens: torch.Tensor, cache: KVCache | None = None) -> torch.Tensor:
        """The final hidden states (B, T, C) that the head reads: the last block's output after the final
        LayerNorm (an identity for post-LN blocks, which end normalized). A value head reads them too."""
        if tokens.ndim != 2 or tokens.dtype != torch.long:
            raise ValueError(f"tokens must be a long tensor [B, T], got {tokens.dtype} {list(tokens.shape)}")
        offset = cache.length() if cache is not None else 0
        h = self.embed(tokens, offset)
        qk = None
        if self.config.positions == "rotary":
            def qk(q, k, start):
                pos = torch.arange(start, start + tokens.shape[1])
                return rotate(q, pos), rotate(k, pos)
        for layer, block in enumerate(self.blocks):
            h = block(h, cache, layer, offset, qk)
        return self.ln(h)

    @torch.no_grad()
    def generate(self, prefix: torch.Tensor, new_tokens: int, generator: torch.Generator | None = None,
                 temperature: float = 1.0, use_cache: bool = True, top_k: int | None = None,
                 top_p: float | None = None) -> torch.Tensor:
        """Ancestral sampling of ``new_tokens`` after ``prefix`` (B, T0), one position at a time:
        x_t ~ softmax(logits_t / temperature), restricted by :func:`filter_logits` to the ``top_k`` most likely
        symbols or the smallest set of probability ``top_p`` (None: no restriction). Returns (B, T0 + new_tokens);
        draws use the CPU ``generator``, so a seed gives the same tokens on any device. With ``use_cache`` each
        step feeds only the newest token through a KV cache; without, each step runs the whole sequence again
        (same logits, more work)."""
        if new_tokens < 1 or temperature <= 0:
            raise ValueError(f"need new_tokens >= 1 and temperature > 0, got {new_tokens} and {temperature}")
        cache, tokens = KVCache() if use_cache else None, [prefix]
        logits = self(prefix, cache)[:, -1]  # (B, K)
        for i in range(new_tokens):
            probs = filter_logits(logits.float() / temperature, top_k, top_p).softmax(-1)
            tokens.append(torch.multinomial(probs.cpu(), 1, generator=generator).to(prefix.device))  # (B, 1)
            if i < new_tokens - 1:
                # the cache holds positions < t: feed x_t alone; without it, feed x_0..x_t again
                logits = self(tokens[-1] if use_cache else torch.cat(tokens, 1), cache)[:, -1]
        return torch.cat(tokens, 1)


def filter_logits(logits: torch.Tensor, top_k: int | None = None, top_p: float | None = None) -> torch.Tensor:
    """Logits (..., K) with every symbol outside the ``top_k`` largest, or outside the smallest set whose
    probability reaches ``top_p`` (nucleus sampling, Holtzman et al., 2020), set to -inf. None keeps all."""
    if top_k is not None:
        if not 1 <= top_k <= logits.shape[-1]:
            raise ValueError(f"top_k must be in 1..{logits.shape[-1]}, got {top_k}")
        kth = logits.topk(top_k, dim=-1).values[..., -1:]  # (..., 1): the k-th largest logit
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None:
        if not 0 < top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {top_p}")
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        # drop a symbol when the symbols more likely than it already reach top_p
        before = sorted_logits.softmax(-1).cumsum(-1) - sorted_logits.softmax(-1)  # (..., K)
        drop = torch.zeros_like(before, dtype=torch.bool).scatter(-1, order, before >= top_p)
        logits = logits.masked_fill(drop, float("-inf"))
    return logits


def block_gradient_norms(model: Transformer, loss: torch.Tensor, retain_graph: bool = False) -> list[float]:
    """The norm of the gradient of ``loss`` with respect to all the parameters of each block, first block first
    (Chapter 46). Computed with ``torch.autograd.grad``: no ``.grad`` attribute is written."""
    params = [list(block.parameters()) for block in model.blocks]
    grads = iter(torch.autograd.grad(loss, [p for block in params for p in block], retain_graph=retain_graph))
    # $\|\nabla_{\theta_l} \ell\| = \big(\sum_{p \in \theta_l} \|\nabla_p \ell\|^2\big)^{1/2}$ for block $l$
    return [math.sqrt(sum(next(grads).double().square().sum().item() for _ in block)) for block in params]


def parameter_formula(c: TransformerConfig) -> int:
    """The parameters of :class:`Transformer` with learned positions, in closed form (Chapter 44)."""
    r, C, K = c.mlp_ratio, c.width, c.output_size or c.vocab_size
    # per block $(4 + 2r)C^2 + (r + 9)C$; embeddings $VC + T_{\max}C$, final norm $2C$, head $CK + K$
    block = (4 + 2 * r) * C**2 + (r + 9) * C
    return c.vocab_size * C + c.block_size * C + c.layers * block + 2 * C + C * K + K


def generation_cost(c: TransformerConfig, new_tokens: int, use_cache: bool) -> tuple[int, int]:
    """Weight FLOPs and query-key pairs (per head, summed over layers) of :meth:`Transformer.generate` drawing
    ``new_tokens`` after one start token, per sequence: with the cache each step feeds one position, without it
    step t feeds all t."""
    N, K = new_tokens, c.output_size or c.vocab_size
    per_position = 2 * ((4 + 2 * c.mlp_ratio) * c.layers * c.width**2 + c.width * K)  # multiply and add
    # cached: $N$ positions, pairs $L\sum_t t$; uncached: $\sum_t t$ positions, pairs $L\sum_t t(t+1)/2$
    if use_cache:
        return per_position * N, c.layers * N * (N + 1) // 2
    return per_position * N * (N + 1) // 2, c.layers * N * (N + 1) * (N + 2) // 6


@contextmanager
def counting_attention_pairs(model: Transformer) -> Iterator[list[int]]:
    """Inside the block, every call of an attention layer appends the query-key pairs it scores (per head,
    per sequence): n new positions against m cached ones score n m + n (n + 1) / 2 pairs."""
    pairs: list[int] = []

    def hook(module, args, output):  # args = (h, cache, layer, offset, ...)
        n, m = args[0].shape[1], args[3]
        pairs.append(n * m + n * (n + 1) // 2)

    handles = [block.attn.register_forward_hook(hook) for block in model.blocks]
    try:
        yield pairs
    finally:
        for handle in handles:
            handle.remove()
