r"""The likelihood of a diffusion model through its probability-flow ODE, Chapter 33.

Along the ODE $d\bar x/d\sigma = f(\bar x, \sigma) = \epsilon_\theta(\sqrt{\bar\alpha}\,\bar x, t)$ of
:func:`agm.diffusion.samplers.probability_flow_sample` the density obeys the instantaneous change of
variables $d \log p_\sigma(\bar x_\sigma) / d\sigma = -\nabla\cdot f$ (Chen et al., 2018), so

$$\log p_{\sigma_0}(\bar x_0) = \log p_{\sigma_{\max}}(\bar x_{\sigma_{\max}})
  + \int_{\sigma_0}^{\sigma_{\max}} \nabla\cdot f\, d\sigma,$$

integrated upward from the data at the smallest level $\sigma_0$ of the schedule (Song et al., 2021b,
Sec. D.2). The divergence is the exact Jacobian trace (:func:`jacobian_trace`, D backward passes) or
Hutchinson's unbiased estimate $\mathbb E_z[z^\top J z]$ with Rademacher probes fixed along each path
(:func:`hutchinson_trace`; Grathwohl et al., 2019).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import nn

from agm.diffusion.samplers import predict_eps, sigma_ve
from agm.diffusion.schedule import NoiseSchedule

Field = Callable[[torch.Tensor], torch.Tensor]


def jacobian_trace(fn: Field, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    r"""``fn(x)`` and the exact trace of its Jacobian per example, $\sum_i \partial f_i / \partial x_i$: (B, ...), (B,).

    ``fn`` must act on each example separately (as the U-Net does: no batch statistics).
    """
    with torch.enable_grad():
        x = x.detach().requires_grad_(True)
        y = fn(x)
        flat = y.flatten(1)
        trace = torch.zeros(len(x), dtype=torch.float64, device=x.device)
        for i in range(flat.shape[1]):
            (g,) = torch.autograd.grad(flat[:, i].sum(), x, retain_graph=True)
            trace += g.flatten(1)[:, i].double()
    return y.detach(), trace


def rademacher(shape: tuple[int, ...], generator: torch.Generator | None = None) -> torch.Tensor:
    """Independent ±1 entries with probability 1/2 each (on the CPU generator)."""
    return torch.randint(0, 2, shape, generator=generator).float() * 2 - 1


def hutchinson_trace(fn: Field, x: torch.Tensor, probes: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    r"""``fn(x)`` and Hutchinson's estimate $\frac1K \sum_k z_k^\top (\partial f / \partial x)\, z_k$ per example.

    ``probes`` (K, B, ...) with $\mathbb E[z z^\top] = I$; each term is one vector-Jacobian product.
    """
    if probes.shape[1:] != x.shape:
        raise ValueError(f"probes must have shape [K, {', '.join(map(str, x.shape))}], got {list(probes.shape)}")
    with torch.enable_grad():
        x = x.detach().requires_grad_(True)
        y = fn(x)
        estimate = torch.zeros(len(x), dtype=torch.float64, device=x.device)
        for k, z in enumerate(probes):
            # $z^\top J z = \langle \nabla_x \langle f(x), z\rangle, z\rangle$
            (g,) = torch.autograd.grad((y * z).sum(), x, retain_graph=k < len(probes) - 1)
            estimate += (g * z).flatten(1).sum(1).double()
    return y.detach(), estimate / len(probes)


def gaussian_log_density(x: torch.Tensor, var: float) -> torch.Tensor:
    """log N(x; 0, var I) per example: (B,)."""
    d = x[0].numel()
    return -0.5 * (x.double() ** 2).flatten(1).sum(1) / var - 0.5 * d * math.log(2 * math.pi * var)


SPACINGS = ("uniform", "log-sigma")


def path_timesteps(schedule: NoiseSchedule, steps: int, spacing: str = "uniform") -> list[int]:
    r"""The ascending timesteps of the likelihood's path, from 0 to T - 1.

    "uniform": ``schedule.timesteps(steps)``, even in t, as the samplers walk. "log-sigma": for each of
    ``steps`` levels evenly spaced in $\log\sigma$ from $\sigma_0$ to $\sigma_{T-1}$, the timestep whose
    $\sigma_t$ is nearest in $\log\sigma$; repeats are dropped where the integer grid is coarser than
    the levels (near t = 0, where $\sigma_1/\sigma_0$ is largest), so fewer than ``steps`` may come back.
    """
    if spacing not in SPACINGS:
        raise ValueError(f"spacing must be one of {SPACINGS}, got {spacing!r}")
    if spacing == "uniform":
        return schedule.timesteps(steps).tolist()
    schedule.timesteps(steps)  # validates steps
    log_sigma = torch.stack([sigma_ve(schedule, t) for t in range(schedule.num_timesteps)]).log()  # (T,)
    # $\log\sigma^{(k)} = \log\sigma_0 + \frac{k}{S-1}(\log\sigma_{T-1} - \log\sigma_0)$
    levels = torch.linspace(log_sigma[0].item(), log_sigma[-1].item(), steps, dtype=torch.float64)
    nearest = (log_sigma[None, :] - levels[:, None]).abs().argmin(1)  # (S,)
    return torch.unique(nearest).tolist()


def probability_flow_log_likelihood(model: nn.Module, schedule: NoiseSchedule, x0: torch.Tensor,
                                    steps: int | None = None, solver: str = "heun", probes: int | None = 1,
                                    generator: torch.Generator | None = None,
                                    labels: torch.Tensor | None = None,
                                    spacing: str = "uniform") -> dict[str, torch.Tensor]:
    r"""$\log p_{\sigma_0}(x_0)$ in nats per example, for x_0 in the model's space, through the ODE.

    The path runs upward through ``path_timesteps(schedule, steps, spacing)``, from $\sigma_0 = \sigma_{\tau_1}$
    to $\sigma_{\max} = \sigma_{T-1}$, by Euler steps or Heun steps in $\sigma$ (two network calls a step).
    The divergence integral is taken in $\lambda = \log\sigma$,
    $\int \nabla\cdot f\, d\sigma = \int \sigma\,\nabla\cdot f\, d\lambda$, by the left-point rule (Euler)
    or the trapezoid rule (Heun) at the same points: near the data $\nabla\cdot f$ grows like
    $1/\sigma$, and $\sigma\,\nabla\cdot f$ stays bounded. The prior is the model's
    $x_T \sim \mathcal N(0, I)$, i.e. $\bar x \sim \mathcal N(0, I/\bar\alpha_{T-1})$. ``probes`` Rademacher
    vectors per example estimate each divergence; None uses the exact trace. Returns ``log_prob``, its
    ``prior`` and ``divergence`` parts, and the end point ``x_T`` (in the model's x_t scale).
    """
    if solver not in ("euler", "heun"):
        raise ValueError(f"solver must be 'euler' or 'heun', got {solver!r}")
    if probes is not None and probes < 1:
        raise ValueError(f"probes must be >= 1 or None (exact trace), got {probes}")
    tau = path_timesteps(schedule, schedule.num_timesteps if steps is None else steps, spacing)
    if len(tau) < 2:
        raise ValueError("the path needs at least 2 timesteps")
    z = None if probes is None else rademacher((probes, *x0.shape), generator).to(x0.device)

    def slope(xbar: torch.Tensor, t: int) -> tuple[torch.Tensor, torch.Tensor]:
        # $f(\bar x, \sigma_t) = \epsilon_\theta(\sqrt{\bar\alpha_t}\,\bar x, t)$ and its divergence
        a = schedule.alpha_bar(t).to(xbar.dtype).sqrt()

        def field(x: torch.Tensor) -> torch.Tensor:
            return predict_eps(model, a * x, t, labels)

        return jacobian_trace(field, xbar) if z is None else hutchinson_trace(field, xbar, z)

    xbar, divergence = x0, torch.zeros(len(x0), dtype=torch.float64, device=x0.device)
    d, div = slope(xbar, tau[0])
    for lo, hi in zip(tau[:-1], tau[1:], strict=True):
        sig_lo, sig_hi = sigma_ve(schedule, lo).item(), sigma_ve(schedule, hi).item()
        h, h_log = sig_hi - sig_lo, math.log(sig_hi / sig_lo)
        x_end = xbar + h * d
        if solver == "heun":
            d_end, div_end = slope(x_end, hi)
            # $\bar x_{hi} = \bar x_{lo} + \tfrac h2 (f_{lo} + f_{hi})$
            x_end = xbar + 0.5 * h * (d + d_end)
            # $\int \sigma\,\nabla\cdot f\, d\lambda \approx
            #   \tfrac{\Delta\lambda}2 (\sigma_{lo}\nabla\cdot f_{lo} + \sigma_{hi}\nabla\cdot f_{hi})$
            divergence += 0.5 * h_log * (sig_lo * div + sig_hi * div_end)
        else:
            # $\int \sigma\,\nabla\cdot f\, d\lambda \approx \Delta\lambda\,\sigma_{lo}\nabla\cdot f_{lo}$
            divergence += h_log * sig_lo * div
        xbar = x_end
        if hi != tau[-1]:
            d, div = slope(xbar, hi)
    prior = gaussian_log_density(xbar, 1 / schedule.alpha_bar(tau[-1]).item())
    x_T = schedule.alpha_bar(tau[-1]).sqrt().to(xbar.dtype) * xbar
    return {"log_prob": prior + divergence, "prior": prior, "divergence": divergence, "x_T": x_T}


def ode_bits_per_dim(log_prob: torch.Tensor, dims: int) -> torch.Tensor:
    r"""Bits/dim on the 0..256 scale of a density over [-1, 1]-scaled images: x = y/128 - 1, so
    $-\log_2 p_y(y)/D = -\log_2 p_x(x)/D + \log_2 128$.
    """
    return -log_prob / (dims * math.log(2)) + math.log2(128)
