"""DDPM objectives (Chapters 26–28): the ELBO terms L_T, L_{t-1}, L_0 and L_simple.

Images live in [-1, 1] (x = 2 * image - 1), as in Ho et al. (2020); L_0 is their discretized
Gaussian decoder over the 256 gray levels. Every term is in nats, summed over the 784 pixels.
"""

from __future__ import annotations

import math

import torch

from agm.diffusion.schedule import NoiseSchedule
from agm.distributions import gaussian_kl


def _sum_pixels(x: torch.Tensor) -> torch.Tensor:
    return x.flatten(1).sum(1)


def prior_term(schedule: NoiseSchedule, x0: torch.Tensor) -> torch.Tensor:
    """L_T = KL(q(x_T | x_0) || N(0, I)) per image; no parameters, close to zero for a good schedule.

    Computed in float64: 1 - alpha_bar_T is within float32 rounding of 1 for the cosine schedule.
    """
    x = x0.double()
    t = torch.full((len(x0),), schedule.num_timesteps - 1)
    a = schedule._at(schedule.alphas_cumprod, t, x)
    kl = gaussian_kl(a.sqrt() * x, (1 - a).log().expand_as(x), torch.zeros_like(x), torch.zeros_like(x))
    return _sum_pixels(kl).to(x0.dtype)


def _standard_normal_cdf(x: torch.Tensor) -> torch.Tensor:
    return 0.5 * (1 + torch.erf(x / math.sqrt(2)))


def discretized_gaussian_log_likelihood(x0: torch.Tensor, mean: torch.Tensor, log_scale: torch.Tensor) -> torch.Tensor:
    """log P(x0) of 8-bit images in [-1, 1] under N(mean, e^(2 log_scale)) integrated over each
    pixel's bin of width 2/255; the end bins extend to -inf and +inf (Ho et al., eq. 13)."""
    centered = x0 - mean
    inv = torch.exp(-log_scale)
    cdf_plus = _standard_normal_cdf(inv * (centered + 1 / 255))
    cdf_minus = _standard_normal_cdf(inv * (centered - 1 / 255))
    log_cdf_plus = cdf_plus.clamp(min=1e-12).log()  # bin (-inf, x + 1/255] at x = -1
    log_one_minus_cdf_minus = (1 - cdf_minus).clamp(min=1e-12).log()  # bin [x - 1/255, inf) at x = 1
    log_mass = (cdf_plus - cdf_minus).clamp(min=1e-12).log()
    return torch.where(x0 < -0.999, log_cdf_plus, torch.where(x0 > 0.999, log_one_minus_cdf_minus, log_mass))


def model_variance(schedule: NoiseSchedule, t: torch.Tensor, x: torch.Tensor, variance: str) -> torch.Tensor:
    """sigma_t^2 of p(x_{t-1} | x_t): beta_t or beta~_t (at t = 0, beta~_0 = 0 is replaced by beta~_1)."""
    if variance == "beta":
        return schedule._at(schedule.betas, t, x)
    clipped = torch.cat([schedule.posterior_variance[1:2], schedule.posterior_variance[1:]])
    return schedule._at(clipped, t, x)


def vlb_terms(schedule: NoiseSchedule, eps_pred: torch.Tensor, x0: torch.Tensor, xt: torch.Tensor,
              t: torch.Tensor, variance: str = "beta") -> torch.Tensor:
    """Per image: L_{t-1} = KL(q(x_{t-1}|x_t,x_0) || p(x_{t-1}|x_t)) where t >= 1,
    and L_0 = -log p(x_0|x_1) where t = 0 (0-based timesteps: t = 0 is the decoder step)."""
    x0_pred = schedule.predict_x0(xt, t, eps_pred)
    mean_q, var_q = schedule.q_posterior(x0, xt, t)
    mean_p, _ = schedule.q_posterior(x0_pred, xt, t)  # the model's mean: posterior mean at predicted x_0
    var_p = model_variance(schedule, t, xt, variance)
    kl = _sum_pixels(gaussian_kl(mean_q, var_q.clamp(min=1e-20).log().expand_as(x0), mean_p,
                                 var_p.log().expand_as(x0)))
    decoder = -_sum_pixels(discretized_gaussian_log_likelihood(x0, mean_p, 0.5 * var_p.log().expand_as(x0)))
    return torch.where(t == 0, decoder, kl)


def eps_mse_weight(schedule: NoiseSchedule, t: torch.Tensor, variance: str = "beta") -> torch.Tensor:
    """lambda_t in L_{t-1} = C_t + lambda_t * ||eps - eps_pred||^2 for t >= 1 (Chapter 28), where C_t does
    not depend on the network (C_t = 0 when sigma_t^2 = beta~_t)."""
    # $\lambda_t = \frac{\beta_t^2}{2\sigma_t^2\alpha_t(1-\bar\alpha_t)}$
    dummy = torch.zeros(len(t), 1)
    sigma2 = model_variance(schedule, t, dummy, variance).flatten()
    return schedule.betas[t] ** 2 / (2 * sigma2 * schedule.alphas[t] * (1 - schedule.alphas_cumprod[t]))


def simple_loss(eps_pred: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
    """L_simple = E ||eps - eps_theta(x_t, t)||^2, averaged over pixels and the batch (Ho et al., eq. 14)."""
    return ((eps - eps_pred) ** 2).mean()
