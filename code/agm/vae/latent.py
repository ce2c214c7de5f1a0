"""Exact inference in a two-dimensional latent space by quadrature on a grid (Chapter 21).

With L = 2, the posterior p(z | x) and the marginal p(x) = ∫ p(x|z) p(z) dz can be computed on a
fine grid of z — no encoder, no sampling — which gives an independent check of the importance-
sampled likelihood and a picture of the true posterior next to the encoder's Gaussian.
"""

from __future__ import annotations

import math

import torch

from agm.data import check_images
from agm.vae.vae import VAE, bernoulli_log_likelihood


def latent_grid(limit: float = 4.0, size: int = 161) -> tuple[torch.Tensor, float]:
    """A size x size grid of points on [-limit, limit]^2: ``(size * size, 2)`` and the area of one cell."""
    if size < 2 or limit <= 0:
        raise ValueError(f"need size >= 2 and limit > 0, got size={size}, limit={limit}")
    axis = torch.linspace(-limit, limit, size)
    z = torch.cartesian_prod(axis, axis)  # (G, 2), first coordinate varies slowest
    return z, (axis[1] - axis[0]).item() ** 2


@torch.no_grad()
def grid_log_joint(model: VAE, x: torch.Tensor, z: torch.Tensor, mask: torch.Tensor | None = None,
                   chunk: int = 2**14) -> torch.Tensor:
    """log p(x_obs | z) + log p(z) for every image and grid point: (B, G).

    ``mask`` (1, 1, 28, 28) of 0/1 keeps only the observed pixels in the likelihood (default: all).
    """
    check_images(x)
    if model.config.latent_dim != z.shape[-1]:
        raise ValueError(f"grid points have {z.shape[-1]} coordinates, the latent space {model.config.latent_dim}")
    # $\log p(z) = -\tfrac12\|z\|^2 - \tfrac{L}{2}\log 2\pi$
    log_prior = -0.5 * (z**2).sum(-1) - 0.5 * z.shape[-1] * math.log(2 * math.pi)  # (G,)
    parts, rows = [], max(1, chunk // len(x))  # about ``chunk`` decoded images in memory at a time
    for i in range(0, len(z), rows):
        logits = model.decode(z[i : i + rows])[:, None].expand(-1, len(x), -1, -1, -1)  # (g, B, 1, 28, 28)
        parts.append(bernoulli_log_likelihood(logits, x) if mask is None else _masked(logits, x, mask))  # (g, B)
    return (torch.cat(parts) + log_prior[:, None]).T  # (B, G)


def _masked(logits: torch.Tensor, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Bernoulli log-likelihood of the pixels where ``mask`` is 1 only: (g, B)."""
    log_p = -torch.nn.functional.binary_cross_entropy_with_logits(logits, x.expand_as(logits), reduction="none")
    return (log_p * mask).flatten(-3).sum(-1)


def grid_log_marginal(log_joint: torch.Tensor, cell_area: float) -> torch.Tensor:
    """log p(x) = log ∫ p(x, z) dz by the midpoint rule on the grid: (B,)."""
    # $\log p(x) \approx \log \sum_g p(x, z_g)\,\Delta$
    return log_joint.logsumexp(-1) + math.log(cell_area)


def grid_posterior(log_joint: torch.Tensor) -> torch.Tensor:
    """p(z_g | x) normalized over the grid points, in double precision: (B, G), each row sums to one."""
    log_joint = log_joint.double()
    return (log_joint - log_joint.logsumexp(-1, keepdim=True)).exp()
