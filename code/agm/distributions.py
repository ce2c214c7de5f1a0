"""Densities and divergences used across the book, each written once.

Diagonal Gaussians are given by mean and log-variance, Bernoulli pixels by logits or probabilities;
every function reduces over the dimensions it names and broadcasts over the rest.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

LOG_2PI = math.log(2 * math.pi)


def gaussian_kl(mean1: torch.Tensor, logvar1: torch.Tensor, mean2: torch.Tensor | float = 0.0,
                logvar2: torch.Tensor | float = 0.0) -> torch.Tensor:
    """Elementwise KL(N(mean1, e^logvar1) || N(mean2, e^logvar2)); the defaults are N(0, 1)."""
    mean2 = torch.as_tensor(mean2, dtype=mean1.dtype, device=mean1.device)
    logvar2 = torch.as_tensor(logvar2, dtype=mean1.dtype, device=mean1.device)
    # $\mathrm{KL} = \tfrac12\big(\log\frac{\sigma_2^2}{\sigma_1^2}
    #   + \frac{\sigma_1^2 + (\mu_1-\mu_2)^2}{\sigma_2^2} - 1\big)$
    return 0.5 * (logvar2 - logvar1 + (torch.exp(logvar1) + (mean1 - mean2) ** 2) * torch.exp(-logvar2) - 1)


def diagonal_gaussian_kl(mean: torch.Tensor, logvar: torch.Tensor, mean2: torch.Tensor | float = 0.0,
                         logvar2: torch.Tensor | float = 0.0) -> torch.Tensor:
    """KL between diagonal Gaussians summed over the last dimension: (..., L) -> (...)."""
    return gaussian_kl(mean, logvar, mean2, logvar2).sum(-1)


def gaussian_kl_to_standard(mu: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
    """KL(N(mu, diag e^logvar) || N(0, I)) per row, in nats: the special case the VAE's ELBO needs."""
    # $\mathrm{KL} = \tfrac12 \sum_j \big(\mu_j^2 + \sigma_j^2 - \log\sigma_j^2 - 1\big)$
    return 0.5 * (mu**2 + logvar.exp() - logvar - 1).sum(-1)


def multivariate_gaussian_kl(m1: torch.Tensor, S1: torch.Tensor, m2: torch.Tensor, S2: torch.Tensor) -> torch.Tensor:
    """KL(N(m1, S1) || N(m2, S2)) for means (N, L) and covariances (L, L) shared by the rows: (N,)."""
    L = m1.shape[-1]
    S2_inv = torch.linalg.inv(S2)
    d = m2 - m1  # (N, L)
    # $\tfrac12\big[\mathrm{tr}(S_2^{-1}S_1) + d^\top S_2^{-1} d - L + \log\det S_2 - \log\det S_1\big]$
    return 0.5 * (torch.trace(S2_inv @ S1) + ((d @ S2_inv) * d).sum(-1) - L
                  + torch.logdet(S2) - torch.logdet(S1))


def diagonal_gaussian_log_prob(z: torch.Tensor, mean: torch.Tensor | float = 0.0,
                               logvar: torch.Tensor | float = 0.0) -> torch.Tensor:
    """log N(z; mean, diag e^logvar) summed over the last dimension; the defaults are N(0, I)."""
    mean = torch.as_tensor(mean, dtype=z.dtype, device=z.device)
    logvar = torch.as_tensor(logvar, dtype=z.dtype, device=z.device)
    # $\log\mathcal N(z;\mu,\sigma^2) = -\tfrac12\big((z-\mu)^2/\sigma^2 + \log\sigma^2 + \log 2\pi\big)$
    return -0.5 * ((z - mean) ** 2 * torch.exp(-logvar) + logvar + LOG_2PI).sum(-1)


def bernoulli_log_likelihood(logits: torch.Tensor, x: torch.Tensor, dims: int = 3) -> torch.Tensor:
    """log p(x) of Bernoulli pixels with these logits, summed over the last ``dims`` dimensions.

    ``logits`` (..., B, 1, 28, 28) broadcast against ``x`` (B, 1, 28, 28); ``x`` may hold gray levels
    in [0, 1], which gives the expected log-likelihood of a fresh binarization.
    """
    # $\log p(x) = \sum_d x_d \log\sigma(\ell_d) + (1 - x_d)\log(1 - \sigma(\ell_d))$
    elementwise = -F.binary_cross_entropy_with_logits(logits, x.expand_as(logits), reduction="none")
    return elementwise.flatten(-dims).sum(-1)


def bernoulli_log_prob(x: torch.Tensor, probs: torch.Tensor) -> torch.Tensor:
    """The same log-likelihood from probabilities, for rows ``x`` (..., D) against ``probs`` (..., D).

    Exact at probabilities 0 and 1 (``xlogy``: 0 log 0 = 0), which logits cannot express.
    """
    # $\log p(x) = \sum_d x_d \log p_d + (1 - x_d)\log(1 - p_d)$
    return (torch.xlogy(x, probs) + torch.xlogy(1 - x, 1 - probs)).sum(-1)


def categorical_log_prob(logits: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """log softmax(logits)[tokens]: the log-probability of each token under its row of logits,
    logits (..., K) and integer tokens (...) -> (...)."""
    # $\log p(k) = \ell_k - \log\sum_j e^{\ell_j}$
    return logits.log_softmax(-1).gather(-1, tokens.unsqueeze(-1)).squeeze(-1)


def mean_and_standard_error(values: torch.Tensor) -> tuple[float, float]:
    """The mean of a 1-D sample and its standard error s / sqrt(n) (s with Bessel's correction)."""
    if values.ndim != 1 or len(values) < 2:
        raise ValueError(f"need a 1-D tensor of at least two values, got shape {list(values.shape)}")
    v = values.double()
    return v.mean().item(), (v.std() / math.sqrt(len(v))).item()


def slerp(a: torch.Tensor, b: torch.Tensor, w: float) -> torch.Tensor:
    r"""Spherical interpolation of two Gaussian latents (per example): keeps the norm such a latent should have.

    $\mathrm{slerp}(a, b; w) = \frac{\sin((1-w)\theta)}{\sin\theta} a + \frac{\sin(w\theta)}{\sin\theta} b$,
    $\cos\theta = \langle a, b\rangle / (\|a\|\|b\|)$ (Shoemake, 1985; Song et al., 2021, Sec. 5.4).
    """
    if a.shape != b.shape:
        raise ValueError(f"a and b must have one shape, got {list(a.shape)} and {list(b.shape)}")
    fa, fb = a.flatten(1), b.flatten(1)
    cos = (fa * fb).sum(1) / (fa.norm(dim=1) * fb.norm(dim=1))
    theta = cos.clamp(-1, 1).acos()[:, None]  # (B, 1)
    # parallel a and b ($\theta \to 0$): the weights tend to $1 - w$ and $w$, where the formula is 0/0
    arc = theta > 1e-4
    sin = torch.sin(theta).clamp(min=1e-12)
    w_a = torch.where(arc, torch.sin((1 - w) * theta) / sin, torch.full_like(theta, 1 - w))
    w_b = torch.where(arc, torch.sin(w * theta) / sin, torch.full_like(theta, w))
    return (w_a * fa + w_b * fb).view_as(a)
