"""DDPM objectives (Chapters 26–28): the ELBO terms L_T, L_{t-1}, L_0 and L_simple; and the ELBO of the
diffusion read as a hierarchical VAE, estimated on whole trajectories (Chapter 33).

Images live in [-1, 1] (x = 2 * image - 1), as in Ho et al. (2020); L_0 is their discretized
Gaussian decoder over the 256 gray levels. Every term is in nats, summed over the 784 pixels.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

from agm.diffusion.schedule import NoiseSchedule
from agm.distributions import diagonal_gaussian_log_prob, gaussian_kl


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


def trajectory_elbo(eps_model: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], schedule: NoiseSchedule,
                    x0: torch.Tensor, generator: torch.Generator | None = None,
                    variance: str = "beta") -> dict[str, torch.Tensor]:
    r"""The ELBO of the diffusion read as a hierarchical VAE, estimated on one trajectory per example.

    Draws $x_{1:T} \sim q(x_{1:T} \mid x_0)$ from the fixed encoder (the forward chain) and returns two
    estimates of the ELBO without its decoder term $\log p_\theta(x_0 \mid x_1)$, which they share:
    "vae", the VAE's log-ratio
    $\log p(x_T) + \sum_{t \ge 2} \log p_\theta(x_{t-1} \mid x_t) - \sum_{t \ge 1} \log q(x_t \mid x_{t-1})$, and
    "kl", $-L_T - \sum_{t \ge 2} L_{t-1}$ with each KL of :func:`vlb_terms` at the trajectory's $x_t$: the
    same expectation, with every $x_{t-1}$ integrated out given $(x_t, x_0)$. Both (B,), in nats.
    ``eps_model(x_t, t)`` takes timesteps (B,); T calls of it.
    """
    vae = torch.zeros(len(x0), dtype=x0.dtype, device=x0.device)
    kl = -prior_term(schedule, x0)  # $-L_T$
    x_prev = x0
    for k in range(schedule.num_timesteps):  # code timestep k is the papers' t = k + 1
        t = torch.full((len(x0),), k, device=x0.device)
        a, b = schedule.alphas[k].item(), schedule.betas[k].item()
        # encoder: $x_t = \sqrt{\alpha_t}\,x_{t-1} + \sqrt{\beta_t}\,z$, and $-\log q(x_t \mid x_{t-1})$
        x = math.sqrt(a) * x_prev + math.sqrt(b) * torch.randn(x0.shape, generator=generator, dtype=x0.dtype)
        vae -= diagonal_gaussian_log_prob(x.flatten(1), math.sqrt(a) * x_prev.flatten(1), math.log(b))
        if k >= 1:
            eps = eps_model(x, t)
            # decoder layer: $+\log p_\theta(x_{t-1} \mid x_t)$, mean $\tilde\mu_t(x_t, \hat x_0)$
            mean, _ = schedule.q_posterior(schedule.predict_x0(x, t, eps), x, t)
            logvar = model_variance(schedule, t, x, variance).log().expand_as(x)
            vae += diagonal_gaussian_log_prob(x_prev.flatten(1), mean.flatten(1), logvar.flatten(1))
            # $-L_{t-1} = -\mathrm{KL}(q(x_{t-1} \mid x_t, x_0)\,\|\,p_\theta(x_{t-1} \mid x_t))$
            kl -= vlb_terms(schedule, eps, x0, x, t, variance)
        x_prev = x
    vae += diagonal_gaussian_log_prob(x_prev.flatten(1))  # $+\log p(x_T)$, $p(x_T) = \mathcal N(0, I)$
    return {"vae": vae, "kl": kl}


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
