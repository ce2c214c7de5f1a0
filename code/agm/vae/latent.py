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
    if limit <= 0:
        raise ValueError(f"need limit > 0, got {limit}")
    return box_grid((-limit, -limit), (limit, limit), size)


def box_grid(lo, hi, size: int) -> tuple[torch.Tensor, float]:
    """A size x size grid of points on the box [lo_1, hi_1] x [lo_2, hi_2]: ``(size * size, 2)`` and the cell area."""
    lo, hi = torch.as_tensor(lo, dtype=torch.float32), torch.as_tensor(hi, dtype=torch.float32)
    if size < 2 or not bool((hi > lo).all()):
        raise ValueError(f"need size >= 2 and hi > lo, got size={size}, lo={lo.tolist()}, hi={hi.tolist()}")
    axes = [torch.linspace(lo[d].item(), hi[d].item(), size) for d in range(2)]
    z = torch.cartesian_prod(*axes)  # (G, 2), first coordinate varies slowest
    return z, ((hi - lo) / (size - 1)).prod().item()


def refined_log_marginal(model: VAE, x: torch.Tensor, z: torch.Tensor, log_joint: torch.Tensor,
                         size: int = 161, margin_nats: float = 30.0, mask: torch.Tensor | None = None,
                         ) -> tuple[torch.Tensor, list[tuple[torch.Tensor, float, torch.Tensor]]]:
    """log p(x) by a second, fine grid on the box where a first grid found the posterior's mass.

    A trained encoder's posteriors are far narrower than any grid that covers the prior can resolve.
    For each image, the box holds every point of the first grid ``z`` whose ``log_joint`` (B, G) is
    within ``margin_nats`` of its largest value, widened by one spacing of the first grid on each side;
    the mass outside it is below exp(-margin_nats) per point. Returns log p(x) (B,) and, per image, the
    fine grid, its cell area and its log-joint (for pictures of the posterior).
    """
    step = (z[:, 0].unique().diff().min(), z[:, 1].unique().diff().min())
    marginals, grids = [], []
    for i in range(len(x)):
        keep = z[log_joint[i] >= log_joint[i].max() - margin_nats]
        lo = keep.min(0).values - torch.stack(step)
        hi = keep.max(0).values + torch.stack(step)
        fine, area = box_grid(lo, hi, size)
        fine_joint = grid_log_joint(model, x[i : i + 1], fine, mask=mask)[0]
        marginals.append(grid_log_marginal(fine_joint[None], area)[0])
        grids.append((fine, area, fine_joint))
    return torch.stack(marginals), grids


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


def grid_moments(posterior: torch.Tensor, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and per-coordinate standard deviation of one posterior (G,) on grid points z (G, 2), in double precision."""
    z = z.double()
    mean = (posterior[:, None] * z).sum(0)
    return mean, (posterior[:, None] * (z - mean) ** 2).sum(0).sqrt()


def grid_peaks(posterior: torch.Tensor, size: int, threshold: float = 0.01) -> int:
    """Local maxima of a posterior on a size x size grid (its 8 neighbours lower) holding at least
    ``threshold`` of its largest value: the number of modes it resolves."""
    if posterior.numel() != size * size:
        raise ValueError(f"posterior has {posterior.numel()} cells, not {size} x {size}")
    p = posterior.reshape(size, size)
    padded = torch.nn.functional.pad(p[None, None], (1, 1, 1, 1), value=-1.0)[0, 0]  # (size + 2, size + 2)
    neighbours = torch.stack([padded[1 + a : size + 1 + a, 1 + b : size + 1 + b]
                              for a in (-1, 0, 1) for b in (-1, 0, 1) if (a, b) != (0, 0)])  # (8, size, size)
    return int(((p > neighbours.max(0).values) & (p > threshold * p.max())).sum())
