"""A Gaussian fitted to a one-dimensional density by minimizing a KL divergence, Chapter 4.

The density ``p`` is given on a uniform grid; the divergence is the Riemann sum over the grid, so
forward and reverse KL can be compared exactly where a mixture has modes the Gaussian cannot cover.
"""

from __future__ import annotations

import math

import torch

from agm.train import gradient_step, run_steps

TINY = 1e-300  # keeps log q finite where a density underflows on the grid (float64)


def normal_density(x: torch.Tensor, mean: torch.Tensor | float, std: torch.Tensor | float) -> torch.Tensor:
    # $\mathcal N(x; m, s^2) = e^{-(x-m)^2 / 2s^2} / (s\sqrt{2\pi})$
    return torch.exp(-0.5 * ((x - mean) / std) ** 2) / (std * math.sqrt(2 * math.pi))


def grid_kl(p: torch.Tensor, q: torch.Tensor, dx: float) -> torch.Tensor:
    """KL(p || q) of two densities on the same uniform grid, by the Riemann sum."""
    # $\mathrm{KL}(p\,\|\,q) \approx \sum_i p_i \log(p_i / q_i)\,\Delta x$
    return torch.xlogy(p, p / (q + TINY)).sum() * dx


def fit_gaussian(p: torch.Tensor, grid: torch.Tensor, divergence: str, init_mean: float = 0.0,
                 steps: int = 1500, lr: float = 0.05) -> tuple[float, float]:
    """Adam on (mean, log std) of q = N(mean, std^2) to minimize KL(p||q) ("forward") or KL(q||p) ("reverse").

    Returns the fitted mean and standard deviation.
    """
    if divergence not in ("forward", "reverse"):
        raise ValueError(f"divergence must be 'forward' or 'reverse', got {divergence!r}")
    if grid.ndim != 1 or p.shape != grid.shape:
        raise ValueError(f"p and grid must be 1-D of the same length, got {list(p.shape)} and {list(grid.shape)}")
    dx = (grid[1] - grid[0]).item()
    mean = torch.tensor(float(init_mean), dtype=grid.dtype, requires_grad=True)
    log_std = torch.tensor(0.0, dtype=grid.dtype, requires_grad=True)
    optimizer = torch.optim.Adam([mean, log_std], lr=lr)

    def step(i: int) -> dict[str, float]:
        q = normal_density(grid, mean, log_std.exp())
        kl = grid_kl(p, q, dx) if divergence == "forward" else grid_kl(q, p, dx)
        return {"loss": gradient_step(kl, optimizer, desc=f"{divergence} KL fit", step=i)}

    run_steps(step, steps, log_every=steps, desc=f"{divergence} KL fit")
    return mean.item(), log_std.exp().item()
