"""Two Monte Carlo estimators of the gradient of an expectation under a Gaussian (Chapter 19).

Both estimate the gradient of E_{q(z)}[f(z)], q = N(mu, diag sigma^2), sigma = exp(log_sigma), with
respect to mu and log_sigma: the score-function (REINFORCE, likelihood-ratio) estimator of Williams
(1992) and Glynn (1990), and the reparameterization (pathwise) estimator of Kingma & Welling (2014)
and Rezende et al. (2014). They return one gradient per draw, so that a caller can average them
(the estimate) or take their variance (its quality).

Shapes: mu and log_sigma are (*batch, D), one Gaussian over the last dimension per batch entry;
f maps draws z of shape (n, *batch, D) to values (n, *batch), each value depending only on its own
draw z[i, b]. The objective is the sum over the batch of E_q[f]; its gradient has the shape of mu.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import torch

Objective = Callable[[torch.Tensor], torch.Tensor]


class GaussianGradients(NamedTuple):
    mu: torch.Tensor  # (n, *batch, D): one estimate of the gradient in mu per draw
    log_sigma: torch.Tensor  # (n, *batch, D): one estimate of the gradient in log sigma per draw


class Summary(NamedTuple):
    mean: torch.Tensor  # the estimate: the average over draws
    standard_error: torch.Tensor  # of that average
    variance: torch.Tensor  # per draw
    variance_standard_error: torch.Tensor  # of the per-draw variance, from the fourth central moment


def draw_noise(mu: torch.Tensor, log_sigma: torch.Tensor, n: int,
               generator: torch.Generator | None = None) -> torch.Tensor:
    """n standard normal draws eps of the shape of mu: (n, *batch, D); checks the inputs."""
    if n < 1:
        raise ValueError(f"need n >= 1 draws, got {n}")
    if mu.ndim < 1 or mu.shape != log_sigma.shape:
        raise ValueError(f"mu and log_sigma must have the same shape (*batch, D), got "
                         f"{list(mu.shape)} and {list(log_sigma.shape)}")
    return torch.randn((n, *mu.shape), generator=generator, dtype=mu.dtype).to(mu.device)


def evaluate(f: Objective, z: torch.Tensor) -> torch.Tensor:
    """f(z) for draws z (n, *batch, D), checked to be one value per draw: (n, *batch)."""
    values = f(z)
    if values.shape != z.shape[:-1]:
        raise ValueError(f"f must map draws {list(z.shape)} to one value per draw {list(z.shape[:-1])}, "
                         f"got {list(values.shape)}")
    return values


def score_function_gradient(f: Objective, mu: torch.Tensor, log_sigma: torch.Tensor, n: int,
                            generator: torch.Generator | None = None,
                            baseline: float | torch.Tensor | None = None) -> GaussianGradients:
    """(f(z) - b) grad log q(z) per draw; f is only evaluated, never differentiated.

    ``baseline`` b is a constant (a float, or a tensor of shape ``batch``) that must not depend
    on the draws; any such b leaves the mean unchanged.
    """
    mu, log_sigma = mu.detach(), log_sigma.detach()
    eps = draw_noise(mu, log_sigma, n, generator)  # (n, *batch, D)
    sigma = log_sigma.exp()
    # $z = \mu + \sigma\epsilon$
    z = mu + sigma * eps
    with torch.no_grad():
        values = evaluate(f, z)  # (n, *batch)
    b = 0.0 if baseline is None else torch.as_tensor(baseline, dtype=values.dtype, device=values.device)
    weight = (values - b).unsqueeze(-1)  # (n, *batch, 1)
    # $\nabla_\mu \log q(z) = (z - \mu)/\sigma^2 = \epsilon/\sigma$
    score_mu = eps / sigma
    # $\nabla_{\log\sigma} \log q(z) = (z - \mu)^2/\sigma^2 - 1 = \epsilon^2 - 1$
    score_log_sigma = eps**2 - 1
    # $\hat g = \big(f(z) - b\big)\,\nabla_\phi \log q_\phi(z)$
    return GaussianGradients(weight * score_mu, weight * score_log_sigma)


def reparameterization_gradient(f: Objective, mu: torch.Tensor, log_sigma: torch.Tensor, n: int,
                                generator: torch.Generator | None = None) -> GaussianGradients:
    """grad_phi f(mu + sigma eps) per draw, by the chain rule through z; f must be differentiable in z."""
    mu, log_sigma = mu.detach(), log_sigma.detach()
    eps = draw_noise(mu, log_sigma, n, generator)  # (n, *batch, D)
    sigma = log_sigma.exp()
    with torch.enable_grad():
        # $z = \mu + \sigma\epsilon$, a leaf of the graph so that autograd returns $\nabla_z f$
        z = (mu + sigma * eps).requires_grad_(True)
        values = evaluate(f, z)  # (n, *batch)
        if values.requires_grad:
            # each value depends on its own draw only, so the gradient of the sum is row i's $\nabla_z f(z_i)$
            (grad_z,) = torch.autograd.grad(values.sum(), z)  # (n, *batch, D)
        else:  # f is piecewise constant in z (a step, a rounding): its derivative is zero wherever it exists
            grad_z = torch.zeros_like(z)
    # $\partial z / \partial \mu = 1$: $\hat g_\mu = \nabla_z f(z)$
    grad_mu = grad_z
    # $\partial z / \partial \log\sigma = \sigma\epsilon$: $\hat g_{\log\sigma} = \nabla_z f(z) \odot \sigma\epsilon$
    grad_log_sigma = grad_z * sigma * eps
    return GaussianGradients(grad_mu, grad_log_sigma)


def summarize(samples: torch.Tensor) -> Summary:
    """Mean over the first dimension (the draws), its standard error, the per-draw variance and its error."""
    n = samples.shape[0]
    if n < 2:
        raise ValueError(f"need at least 2 draws to estimate a variance, got {n}")
    mean = samples.mean(0)
    centered = samples - mean
    # $s^2 = \frac{1}{n-1}\sum_i (g_i - \bar g)^2$
    variance = centered.pow(2).sum(0) / (n - 1)
    # $\mathrm{se}(\bar g) = \sqrt{s^2 / n}$
    standard_error = (variance / n).sqrt()
    # $\mathrm{se}(s^2) \approx \sqrt{(m_4 - s^4)/n}$, $m_4$ the fourth central moment
    variance_standard_error = ((centered.pow(4).mean(0) - variance**2).clamp_min(0) / n).sqrt()
    return Summary(mean, standard_error, variance, variance_standard_error)
