"""The DDPM noise schedule and the closed forms of Ho et al. (2020): separate from any network.

Names follow the diffusers schedulers (``betas``, ``alphas_cumprod``, ``pred_original_sample``,
``prev_sample``); timesteps are 0-based, t = 0 .. T-1, as there.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch


@dataclass
class ScheduleConfig:
    num_timesteps: int = 1000  # T
    kind: str = "linear"  # "linear" (Ho et al., 2020) or "cosine" (Nichol & Dhariwal, 2021)
    beta_start: float = 1e-4  # linear: beta_1
    beta_end: float = 0.02  # linear: beta_T
    cosine_s: float = 0.008  # cosine: offset that keeps beta_1 from being too small
    max_beta: float = 0.999  # cosine: clip, so the last steps do not destroy everything at once


def linear_betas(config: ScheduleConfig) -> torch.Tensor:
    return torch.linspace(config.beta_start, config.beta_end, config.num_timesteps, dtype=torch.float64)


def cosine_betas(config: ScheduleConfig) -> torch.Tensor:
    # $\bar\alpha(s) = \cos^2\big(\frac{s + c}{1 + c}\cdot\frac{\pi}{2}\big)$
    # $\beta_t = 1 - \bar\alpha((t+1)/T) / \bar\alpha(t/T)$
    s = torch.arange(config.num_timesteps + 1, dtype=torch.float64) / config.num_timesteps
    alpha_bar = torch.cos((s + config.cosine_s) / (1 + config.cosine_s) * math.pi / 2) ** 2
    return (1 - alpha_bar[1:] / alpha_bar[:-1]).clamp(max=config.max_beta)


class NoiseSchedule:
    """Forward process q(x_t | x_{t-1}) = N(sqrt(1 - beta_t) x_{t-1}, beta_t I) and what follows from it."""

    def __init__(self, config: ScheduleConfig | None = None, betas: torch.Tensor | None = None):
        self.config = config = config or ScheduleConfig()
        if config.kind not in ("linear", "cosine"):
            raise ValueError(f"unknown schedule {config.kind!r}; choose 'linear' or 'cosine'")
        if config.num_timesteps < 1:
            raise ValueError(f"num_timesteps must be >= 1, got {config.num_timesteps}")
        if betas is None:
            betas = linear_betas(config) if config.kind == "linear" else cosine_betas(config)
        elif betas.shape != (config.num_timesteps,) or not ((betas > 0) & (betas < 1)).all():
            raise ValueError(f"betas must be {config.num_timesteps} values in (0, 1)")
        self.betas = betas.to(torch.float64)
        # $\alpha_t = 1 - \beta_t$, $\bar\alpha_t = \prod_{s \le t} \alpha_s$
        self.alphas = 1 - self.betas
        self.alphas_cumprod = torch.cumprod(self.alphas, 0)
        self.alphas_cumprod_prev = torch.cat([torch.ones(1, dtype=torch.float64), self.alphas_cumprod[:-1]])
        # $\tilde\beta_t = \frac{1 - \bar\alpha_{t-1}}{1 - \bar\alpha_t}\beta_t$
        self.posterior_variance = self.betas * (1 - self.alphas_cumprod_prev) / (1 - self.alphas_cumprod)
        # $\tilde\mu_t = \frac{\sqrt{\bar\alpha_{t-1}}\beta_t}{1-\bar\alpha_t} x_0
        #   + \frac{\sqrt{\alpha_t}(1-\bar\alpha_{t-1})}{1-\bar\alpha_t} x_t$
        self.posterior_mean_coef1 = self.alphas_cumprod_prev.sqrt() * self.betas / (1 - self.alphas_cumprod)
        self.posterior_mean_coef2 = self.alphas.sqrt() * (1 - self.alphas_cumprod_prev) / (1 - self.alphas_cumprod)

    def timesteps(self, steps: int) -> torch.Tensor:
        r"""An evenly spaced subsequence $0 = \tau_1 < \dots < \tau_S = T - 1$ of the timesteps, ascending."""
        if not 1 <= steps <= self.num_timesteps:
            raise ValueError(f"steps must lie in 1..{self.num_timesteps}, got {steps}")
        if steps == 1:
            return torch.tensor([self.num_timesteps - 1])
        return torch.linspace(0, self.num_timesteps - 1, steps, dtype=torch.float64).round().long()

    def respaced(self, steps: int) -> tuple[NoiseSchedule, torch.Tensor]:
        r"""A ``steps``-step chain through an evenly spaced subsequence of the timesteps.

        Keeping $\bar\alpha$ at the chosen timesteps $\tau_1 < \dots < \tau_S$ and setting
        $\beta'_i = 1 - \bar\alpha_{\tau_i} / \bar\alpha_{\tau_{i-1}}$ gives a shorter forward process with
        the same marginals q(x_tau | x_0), so the network trained on all T steps applies unchanged
        (Nichol & Dhariwal, 2021, section 4). Returns the new schedule and the original timesteps
        tau. The samplers do not need it: ``step(eps, t, x_t, prev_t=s)`` jumps from t to s directly.
        """
        tau = self.timesteps(steps)
        kept = self.alphas_cumprod[tau]
        prev = torch.cat([torch.ones(1, dtype=torch.float64), kept[:-1]])
        config = ScheduleConfig(**{**vars(self.config), "num_timesteps": steps})
        return NoiseSchedule(config, betas=1 - kept / prev), tau

    @property
    def num_timesteps(self) -> int:
        return self.config.num_timesteps

    def _at(self, values: torch.Tensor, t: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """values[t] shaped to broadcast against a batch x of shape (B, ...)."""
        t = torch.as_tensor(t, dtype=torch.long, device=x.device)
        if t.ndim == 0:
            t = t.expand(len(x))
        if t.shape != (len(x),):
            raise ValueError(f"t must be a scalar or have shape ({len(x)},), got {tuple(t.shape)}")
        if (t < 0).any() or (t >= self.num_timesteps).any():
            raise ValueError(f"timesteps must lie in 0..{self.num_timesteps - 1}")
        return values.to(x.device)[t].to(x.dtype).view(-1, *([1] * (x.ndim - 1)))

    def snr(self, t: torch.Tensor) -> torch.Tensor:
        """Signal-to-noise ratio $\\bar\\alpha_t / (1 - \\bar\\alpha_t)$."""
        return self.alphas_cumprod[t] / (1 - self.alphas_cumprod[t])

    def q_sample(self, x0: torch.Tensor, t: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        """Draw x_t ~ q(x_t | x_0) in closed form (diffusers: ``add_noise``)."""
        if noise.shape != x0.shape:
            raise ValueError(f"noise shape {tuple(noise.shape)} differs from x0 shape {tuple(x0.shape)}")
        # $x_t = \sqrt{\bar\alpha_t}\,x_0 + \sqrt{1-\bar\alpha_t}\,\epsilon$
        a = self._at(self.alphas_cumprod, t, x0)
        return a.sqrt() * x0 + (1 - a).sqrt() * noise

    def q_posterior(self, x0: torch.Tensor, xt: torch.Tensor, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Mean and variance of q(x_{t-1} | x_t, x_0)."""
        mean = self._at(self.posterior_mean_coef1, t, xt) * x0 + self._at(self.posterior_mean_coef2, t, xt) * xt
        return mean, self._at(self.posterior_variance, t, xt)

    def predict_x0(self, xt: torch.Tensor, t: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
        # $\hat x_0 = (x_t - \sqrt{1-\bar\alpha_t}\,\hat\epsilon) / \sqrt{\bar\alpha_t}$
        a = self._at(self.alphas_cumprod, t, xt)
        return (xt - (1 - a).sqrt() * eps) / a.sqrt()

    def alpha_bar(self, t: int) -> torch.Tensor:
        r"""$\bar\alpha_t$ for 0 <= t < T, and 1 for t = -1 (the clean data before the first step)."""
        if not -1 <= t < self.num_timesteps:
            raise ValueError(f"timestep must lie in -1..{self.num_timesteps - 1}, got {t}")
        return self.alphas_cumprod[t] if t >= 0 else torch.ones((), dtype=torch.float64)

    def posterior_coefficients(self, t: int, s: int) -> tuple[torch.Tensor, ...]:
        r"""q(x_s | x_t, x_0) for timesteps s < t: the coefficients of $x_0$ and $x_t$ in its mean, its variance,
        and $\beta'$.

        $\beta' = 1 - \bar\alpha_t/\bar\alpha_s$ is the step of the chain from s to t ($\beta_t$ when s = t - 1).
        """
        a_t, a_s = self.alpha_bar(t), self.alpha_bar(s)
        # $\beta' = 1 - \bar\alpha_t / \bar\alpha_s$
        beta = 1 - a_t / a_s
        # $\tilde\mu = \frac{\sqrt{\bar\alpha_s}\beta'}{1-\bar\alpha_t} x_0
        #   + \frac{\sqrt{1-\beta'}(1-\bar\alpha_s)}{1-\bar\alpha_t} x_t$
        coef_x0 = a_s.sqrt() * beta / (1 - a_t)
        coef_xt = (1 - beta).sqrt() * (1 - a_s) / (1 - a_t)
        # $\tilde\beta' = \frac{1-\bar\alpha_s}{1-\bar\alpha_t}\beta'$
        return coef_x0, coef_xt, (1 - a_s) / (1 - a_t) * beta, beta

    def step(self, eps: torch.Tensor, t: int, xt: torch.Tensor, generator: torch.Generator | None = None,
             variance: str = "beta_tilde", prev_t: int | None = None,
             clip_denoised: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
        r"""One ancestral step x_t -> x_s from a predicted noise; returns (prev_sample, pred_original_sample).

        ``t`` and ``prev_t`` = s are timesteps of this schedule (0-based, as the network sees them);
        s defaults to t - 1, and any s < t is the step of the forward process with
        $\beta' = 1 - \bar\alpha_t/\bar\alpha_s$ (a respaced chain); s = -1 ends at the data, without noise.
        ``variance``: "beta_tilde" (the posterior variance, diffusers "fixed_small") or "beta" ("fixed_large").
        ``clip_denoised`` projects the predicted x_0 onto the data range [-1, 1] before it enters the
        posterior mean, as Ho et al.'s code (``clip_denoised=True``) and diffusers (``clip_sample=True``) do.
        """
        if variance not in ("beta_tilde", "beta"):
            raise ValueError(f"variance must be 'beta_tilde' or 'beta', got {variance!r}")
        s = t - 1 if prev_t is None else prev_t
        if not -1 <= s < t:
            raise ValueError(f"prev_t must lie in -1..{t - 1}, got {s}")
        # 1. the predicted original sample (Ho et al., eq. 15), optionally projected onto [-1, 1]
        pred_original_sample = self.predict_x0(xt, t, eps)
        if clip_denoised:
            pred_original_sample = pred_original_sample.clamp(-1, 1)
        # 2. the posterior mean with x_0 replaced by its prediction (eq. 7)
        coef_x0, coef_xt, var_tilde, beta = (c.to(xt.dtype) for c in self.posterior_coefficients(t, s))
        mean = coef_x0 * pred_original_sample + coef_xt * xt
        if s == -1:
            return mean, pred_original_sample
        # 3. add noise: $\sigma^2 = \tilde\beta = \frac{1-\bar\alpha_s}{1-\bar\alpha_t}\beta'$ or $\sigma^2 = \beta'$
        var = var_tilde.clamp(min=1e-20) if variance == "beta_tilde" else beta
        noise = torch.randn(xt.shape, generator=generator, dtype=xt.dtype).to(xt.device)
        return mean + var.sqrt() * noise, pred_original_sample
