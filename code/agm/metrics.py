"""The metrics kit shared by every chapter. Likelihoods first.

Conventions. A model of binarized images reports its negative log-likelihood in **nats per
image**, ``-E[log p(x)]`` with natural logarithms. A model of 8-bit images reports **bits per
dimension** of the discrete data, ``-E[log2 P(k)] / D``; when it is a density p on [0, 1]^D fitted
to uniformly dequantized data ``y = (k + u) / 256``, ``-E[log2 p(y)] / D + 8`` bounds it from above.
Nats per image convert to bits/dim as ``nats / (D ln 2)``, D = 784 for MNIST.
"""

from __future__ import annotations

import math

import torch

PIXELS = 28 * 28


def nats_to_bits_per_dim(nats_per_image: float, dims: int = PIXELS) -> float:
    """``nats / (D ln 2)``: the same quantity in bits, averaged over the D dimensions."""
    return nats_per_image / (dims * math.log(2))


def nll_report(log_probs: torch.Tensor, prefix: str = "test") -> dict[str, float]:
    """Mean NLL (nats per image), its standard error, and the same in bits/dim."""
    if log_probs.ndim != 1 or len(log_probs) < 2:
        raise ValueError(f"log_probs must be a 1-D tensor of at least two values, got {list(log_probs.shape)}")
    if not torch.isfinite(log_probs).all():
        raise ValueError("log_probs contains inf or NaN: the model gives zero probability to some image")
    nll = -log_probs.double()
    mean = nll.mean().item()
    return {
        f"{prefix}_nll_nats": mean,
        f"{prefix}_nll_nats_se": (nll.std() / math.sqrt(len(nll))).item(),
        f"{prefix}_bits_per_dim": nats_to_bits_per_dim(mean),
    }
