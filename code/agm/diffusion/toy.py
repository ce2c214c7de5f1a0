"""One-dimensional models in which the diffusion quantities are closed forms.

:class:`GaussianMixture1D`: if x_0 ~ sum_k w_k N(m_k, s_k^2), then x_t = sqrt(abar) x_0 + sqrt(1 - abar) eps
is again a mixture, sum_k w_k N(sqrt(abar) m_k, abar s_k^2 + 1 - abar); its density and score are exact,
which lets Chapters 24, 28 and 31 check Tweedie's formula, the minimizer of the ε-MSE and the reverse
transition against the truth.

:class:`ComponentPosterior` and :class:`ExactConditionalNoisePredictor`: the mixture's components read as
classes, with the exact classifier p_t(k | x_t) and the exact class-conditional ε, the oracles of guidance
(Chapter 35); :func:`tilted_log_density` is the family p_t(x) p_t(k | x)^s that guidance at scale s follows.

:class:`LinearGaussianReverse`: a reverse chain whose steps are Gaussian with means linear in x_t; every
distribution of the chain is Gaussian, so log p(x_0), each term of the DDPM bound and the gap of the
bound are closed forms (Chapters 26 and 28).

:class:`GaussianMixture2D`: a mixture of isotropic Gaussians in the plane, with the same closed forms;
its score is what Chapter 34 fits by score matching and samples by Langevin dynamics.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from agm.diffusion.samplers import chain_pairs
from agm.diffusion.schedule import NoiseSchedule
from agm.distributions import gaussian_kl


@dataclass
class GaussianMixture1D:
    means: torch.Tensor  # (K,)
    stds: torch.Tensor  # (K,)
    weights: torch.Tensor  # (K,), summing to 1

    def __post_init__(self):
        self.means, self.stds, self.weights = (torch.as_tensor(v, dtype=torch.float64)
                                               for v in (self.means, self.stds, self.weights))
        if not (self.means.shape == self.stds.shape == self.weights.shape) or self.means.ndim != 1:
            raise ValueError("means, stds and weights must be 1-D tensors of the same length")
        if (self.stds <= 0).any() or (self.weights < 0).any() or abs(self.weights.sum().item() - 1) > 1e-6:
            raise ValueError("stds must be positive and weights a probability vector")

    def sample(self, n: int, generator: torch.Generator | None = None) -> torch.Tensor:
        """n draws of x_0, float64: (n,)."""
        comp = torch.multinomial(self.weights.float(), n, replacement=True, generator=generator)
        return (self.means.float()[comp] + self.stds.float()[comp] * torch.randn(n, generator=generator)).double()

    def log_components(self, x: torch.Tensor, abar: float = 1.0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """log(w_k N(x; mu_k, var_k)) of the mixture at noise level abar, (N, K), with mu (K,) and var (K,)."""
        # $\mu_k = \sqrt{\bar\alpha}\,m_k$, $\sigma_k^2 = \bar\alpha s_k^2 + 1 - \bar\alpha$
        mu, var = math.sqrt(abar) * self.means, abar * self.stds**2 + (1 - abar)
        x = x.double()[:, None]
        return self.weights.log() - 0.5 * (x - mu) ** 2 / var - 0.5 * torch.log(2 * math.pi * var), mu, var

    def log_density(self, x: torch.Tensor, abar: float = 1.0) -> torch.Tensor:
        """log q_t(x), (N,)."""
        return self.log_components(x, abar)[0].logsumexp(1)

    def score(self, x: torch.Tensor, abar: float = 1.0) -> torch.Tensor:
        r"""The score $\nabla_x \log q_t(x)$ of the mixture noised to level ``abar`` ($\bar\alpha_t$): (N,).

        q_t is the mixture of the components N(mu_k, var_k) of :meth:`log_components`, so its score is
        the responsibility-weighted average of the components' scores. ``abar`` = 1 is the data itself.
        """
        log_comp, mu, var = self.log_components(x, abar)
        # $r_k(x) = \frac{w_k \mathcal N(x; \mu_k, \sigma_k^2)}{\sum_j w_j \mathcal N(x; \mu_j, \sigma_j^2)}$
        responsibilities = log_comp.softmax(1)  # (N, K)
        # $\nabla_x \log q_t(x) = \sum_k r_k(x)\,\frac{\mu_k - x}{\sigma_k^2}$
        return (responsibilities * (mu - x.double()[:, None]) / var).sum(1)

    def posterior_x0(self, x: torch.Tensor, abar: float) -> tuple[torch.Tensor, torch.Tensor]:
        r"""$\mathbb E[x_0 \mid x_t = x]$ and $\mathrm{Var}[x_0 \mid x_t = x]$ at noise level ``abar`` < 1: (N,), (N,).

        Within component k, (x_0, x_t) is jointly Gaussian; the posterior is the mixture of the
        components' Gaussian posteriors with the responsibilities r_k(x) of :meth:`score`.
        """
        log_comp, _, var_t = self.log_components(x, abar)
        r = log_comp.softmax(1)  # (N, K)
        # $\mathbb E[x_0 \mid x_t, k] = m_k + \frac{\sqrt{\bar\alpha}\,s_k^2}{\sigma_k^2}(x_t - \sqrt{\bar\alpha}\,m_k)$
        gain = math.sqrt(abar) * self.stds**2 / var_t  # (K,)
        mean_k = self.means + gain * (x.double()[:, None] - math.sqrt(abar) * self.means)  # (N, K)
        # $\mathrm{Var}[x_0 \mid x_t, k] = s_k^2 (1 - \bar\alpha) / \sigma_k^2$
        var_k = self.stds**2 * (1 - abar) / var_t  # (K,)
        # total mean and variance of the mixture of the posteriors
        mean = (r * mean_k).sum(1)
        return mean, (r * (var_k + mean_k**2)).sum(1) - mean**2


class ExactNoisePredictor(nn.Module):
    r"""The ε-prediction a perfect network would make when every coordinate of x_0 is drawn from ``mixture``.

    $\epsilon^*(x_t, t) = \mathbb E[\epsilon \mid x_t] = -\sqrt{1-\bar\alpha_t}\,\nabla \log q_t(x_t)$ (Tweedie),
    coordinate by coordinate: a stand-in for ε_θ with which the samplers and the likelihood are exact
    up to their discretization. ``labels`` are refused.
    """

    def __init__(self, mixture: GaussianMixture1D, schedule: NoiseSchedule):
        super().__init__()
        self.mixture, self.schedule = mixture, schedule

    def forward(self, x: torch.Tensor, t: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        if labels is not None:
            raise ValueError("the exact noise predictor is unconditional")
        if t.ndim != 1 or len(t) != len(x) or (t != t[0]).any():
            raise ValueError("t must be one timestep broadcast over the batch")
        abar = self.schedule.alpha_bar(int(t[0])).item()
        score = self.mixture.score(x.reshape(-1), abar).to(x.dtype).view_as(x)
        return -math.sqrt(1 - abar) * score


def _one_timestep(schedule: NoiseSchedule, x: torch.Tensor, t: torch.Tensor) -> float:
    """abar of the single timestep ``t`` broadcast over a batch of points x (B, 1, 1, 1)."""
    if x.shape[1:] != (1, 1, 1) or t.ndim != 1 or len(t) != len(x) or (t != t[0]).any():
        raise ValueError("x must be (B, 1, 1, 1) and t one timestep broadcast over the batch")
    return schedule.alpha_bar(int(t[0])).item()


class ComponentPosterior(nn.Module):
    r"""The exact classifier of mixture data, the components as classes: $\log p_t(k \mid x_t)$, (B, K).

    Bayes' rule at noise level $\bar\alpha_t$, $p_t(k \mid x) = w_k\,\mathcal N(x; \mu_k, \sigma_k^2) / q_t(x)$ with
    the noised components of :meth:`GaussianMixture1D.log_components`; differentiable in x, so
    :class:`agm.diffusion.guidance.ClassifierGuidance` can take its gradient. Points are (B, 1, 1, 1).
    """

    def __init__(self, mixture: GaussianMixture1D, schedule: NoiseSchedule):
        super().__init__()
        self.mixture, self.schedule = mixture, schedule

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        abar = _one_timestep(self.schedule, x, t)
        # $\log p_t(k \mid x) = \log w_k\,\mathcal N(x; \mu_k, \sigma_k^2) - \log q_t(x)$
        return self.mixture.log_components(x.reshape(-1), abar)[0].log_softmax(1).to(x.dtype)


def tilted_log_density(mixture: GaussianMixture1D, schedule: NoiseSchedule, x: torch.Tensor, label: int,
                       scale: float, t: int) -> torch.Tensor:
    r"""$\log p_t(x) + s \log p_t(k \mid x)$ at points x (N,): the guided family $\pi^s_t$, unnormalized, (N,).

    The components of ``mixture`` are the classes, k = ``label``, s = ``scale``; t = -1 is the clean data.
    """
    abar = schedule.alpha_bar(t).item()
    log_joint = mixture.log_components(x, abar)[0]  # (N, K): log w_k N(x; mu_k, var_k) at level abar
    # $\log p_t(k \mid x) = \log w_k\,\mathcal N(x; \mu_k, \sigma_k^2) - \log p_t(x)$: Bayes' rule, a log-softmax over k
    # $\log \pi^s_t(x) = \log p_t(x) + s \log p_t(k \mid x) + \mathrm{const}$
    return log_joint.logsumexp(1) + scale * log_joint.log_softmax(1)[:, label]


class ExactConditionalNoisePredictor(nn.Module):
    r"""$\epsilon^*(x_t, t, k)$ for mixture data with the components as classes; label K is the null label.

    Label k gives the ε of component k alone, $-\sqrt{1-\bar\alpha_t}\,(\mu_k - x)/\sigma_k^2$; the null label K
    (or labels None) the mixture's, $\sum_k p_t(k \mid x)\,\epsilon^*(x, t, k)$ — what a class-conditional network
    trained with label dropout would learn with unlimited capacity and data, for
    :class:`agm.diffusion.guidance.ClassifierFreeGuidance` (``num_classes`` = K). Points are (B, 1, 1, 1).
    """

    def __init__(self, mixture: GaussianMixture1D, schedule: NoiseSchedule):
        super().__init__()
        self.mixture, self.schedule = mixture, schedule

    def forward(self, x: torch.Tensor, t: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        abar, K = _one_timestep(self.schedule, x, t), len(self.mixture.weights)
        labels = torch.full_like(t, K) if labels is None else labels
        if labels.shape != t.shape or ((labels < 0) | (labels > K)).any():
            raise ValueError(f"labels must be [B] integers in 0..{K} ({K} = null), got {labels.tolist()}")
        log_comp, mu, var = self.mixture.log_components(x.reshape(-1), abar)
        # $\epsilon^*(x, t, k) = -\sqrt{1-\bar\alpha_t}\,\nabla\log\mathcal N(x; \mu_k, \sigma_k^2)$, (B, K)
        eps_k = -math.sqrt(1 - abar) * (mu - x.reshape(-1, 1).double()) / var
        # $\epsilon^*(x, t) = \sum_k p_t(k \mid x)\,\epsilon^*(x, t, k)$ for the null label
        eps = torch.cat([eps_k, (log_comp.softmax(1) * eps_k).sum(1, keepdim=True)], 1)  # (B, K + 1)
        return eps.gather(1, labels.view(-1, 1).long()).to(x.dtype).view_as(x)


@dataclass
class GaussianMixture2D:
    r"""$p(x) = \sum_k w_k\,\mathcal N(x; m_k, s_k^2 I)$ in the plane, float64; noised as :class:`GaussianMixture1D`."""

    means: torch.Tensor  # (K, 2)
    stds: torch.Tensor  # (K,): each component is isotropic
    weights: torch.Tensor  # (K,), summing to 1

    def __post_init__(self):
        self.means, self.stds, self.weights = (torch.as_tensor(v, dtype=torch.float64)
                                               for v in (self.means, self.stds, self.weights))
        K = len(self.weights)
        if self.means.shape != (K, 2) or self.stds.shape != (K,) or self.weights.ndim != 1:
            raise ValueError("means must be (K, 2), stds and weights (K,)")
        if (self.stds <= 0).any() or (self.weights < 0).any() or abs(self.weights.sum().item() - 1) > 1e-6:
            raise ValueError("stds must be positive and weights a probability vector")

    def sample(self, n: int, generator: torch.Generator | None = None) -> torch.Tensor:
        """n draws, float64: (n, 2)."""
        comp = torch.multinomial(self.weights, n, replacement=True, generator=generator)
        z = torch.randn(n, 2, generator=generator, dtype=torch.float64)
        return self.means[comp] + self.stds[comp, None] * z

    def log_components(self, x: torch.Tensor, abar: float = 1.0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """log(w_k N(x; mu_k, var_k I)) at noise level abar, (N, K), with mu (K, 2) and var (K,)."""
        if x.ndim != 2 or x.shape[1] != 2:
            raise ValueError(f"x must have shape (N, 2), got {list(x.shape)}")
        # $\mu_k = \sqrt{\bar\alpha}\,m_k$, $\sigma_k^2 = \bar\alpha s_k^2 + 1 - \bar\alpha$
        mu, var = abar**0.5 * self.means, abar * self.stds**2 + (1 - abar)
        sq = ((x.double()[:, None, :] - mu) ** 2).sum(-1)  # (N, K)
        return self.weights.log() - 0.5 * sq / var - torch.log(2 * torch.pi * var), mu, var

    def log_density(self, x: torch.Tensor, abar: float = 1.0) -> torch.Tensor:
        """log q_t(x), (N,)."""
        return self.log_components(x, abar)[0].logsumexp(1)

    def responsibilities(self, x: torch.Tensor, abar: float = 1.0) -> torch.Tensor:
        r"""$r_k(x) = w_k\mathcal N(x; \mu_k, \sigma_k^2 I) / q_t(x)$: (N, K)."""
        return self.log_components(x, abar)[0].softmax(1)

    def score(self, x: torch.Tensor, abar: float = 1.0) -> torch.Tensor:
        r"""$\nabla_x \log q_t(x) = \sum_k r_k(x)\,(\mu_k - x)/\sigma_k^2$ at noise level ``abar``: (N, 2)."""
        log_comp, mu, var = self.log_components(x, abar)
        r = log_comp.softmax(1)  # (N, K)
        return (r[:, :, None] * (mu - x.double()[:, None, :]) / var[:, None]).sum(1)

    def smoothed(self, sigma: float) -> GaussianMixture2D:
        r"""The law of $x + \sigma z$, $z \sim \mathcal N(0, I)$: the same mixture with $s_k^2 + \sigma^2$."""
        if sigma < 0:
            raise ValueError(f"sigma must be >= 0, got {sigma}")
        return GaussianMixture2D(self.means, (self.stds**2 + sigma**2).sqrt(), self.weights)

    def moments(self) -> tuple[torch.Tensor, torch.Tensor]:
        r"""Mean $\mu = \sum_k w_k m_k$ (2,) and covariance
        $\sum_k w_k\big(s_k^2 I + (m_k - \mu)(m_k - \mu)^\top\big)$ (2, 2)."""
        mean = self.weights @ self.means
        d = self.means - mean
        return mean, (self.weights * self.stds**2).sum() * torch.eye(2, dtype=torch.float64) + (
            self.weights[:, None, None] * d[:, :, None] * d[:, None, :]).sum(0)


def two_mode_mixture() -> GaussianMixture2D:
    r"""Song & Ermon's (2019, Sec. 3.2.2) $\tfrac15\mathcal N((-5,-5), I) + \tfrac45\mathcal N((5,5), I)$."""
    f64 = torch.float64
    return GaussianMixture2D(torch.tensor([[-5.0, -5.0], [5.0, 5.0]], dtype=f64), torch.tensor([1.0, 1.0], dtype=f64),
                             torch.tensor([0.2, 0.8], dtype=f64))


class ExactNoisePredictor2D(nn.Module):
    r"""$\epsilon^*(x_t, t) = -\sqrt{1-\bar\alpha_t}\,\nabla\log q_t(x_t)$ for data from a :class:`GaussianMixture2D`.

    Points travel as (B, 2, 1, 1), the shape the samplers take; ``labels`` are refused.
    """

    def __init__(self, mixture: GaussianMixture2D, schedule: NoiseSchedule):
        super().__init__()
        self.mixture, self.schedule = mixture, schedule

    def forward(self, x: torch.Tensor, t: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        if labels is not None:
            raise ValueError("the exact noise predictor is unconditional")
        if x.shape[1:] != (2, 1, 1) or t.ndim != 1 or len(t) != len(x) or (t != t[0]).any():
            raise ValueError("x must be (B, 2, 1, 1) and t one timestep broadcast over the batch")
        abar = self.schedule.alpha_bar(int(t[0])).item()
        score = self.mixture.score(x.reshape(-1, 2), abar).to(x.dtype).view_as(x)
        return -(1 - abar) ** 0.5 * score


def normal_log_density(x: torch.Tensor, mean: torch.Tensor | float, var: torch.Tensor | float) -> torch.Tensor:
    r"""$\log\mathcal N(x; \mu, \sigma^2)$, elementwise, in float64."""
    x, mean, var = (torch.as_tensor(v, dtype=torch.float64) for v in (x, mean, var))
    # $\log\mathcal N(x;\mu,\sigma^2) = -\tfrac12\big(\log 2\pi\sigma^2 + (x-\mu)^2/\sigma^2\big)$
    return -0.5 * (torch.log(2 * math.pi * var) + (x - mean) ** 2 / var)


@dataclass
class LinearGaussianReverse:
    """p(x_T) = N(0, 1), p(x_{t-1} | x_t) = N(a_t x_t + b_t, s2_t) on one coordinate.

    Indexed by the code's timesteps t = 0 .. T-1: entry t is the step from x_{t+1} to x_t in the
    papers' numbering, and entry 0 is the decoder p(x_0 | x_1).
    """

    a: torch.Tensor  # (T,)
    b: torch.Tensor  # (T,)
    s2: torch.Tensor  # (T,), positive

    def __post_init__(self):
        self.a, self.b, self.s2 = (torch.as_tensor(v, dtype=torch.float64) for v in (self.a, self.b, self.s2))
        if not (self.a.shape == self.b.shape == self.s2.shape) or self.a.ndim != 1:
            raise ValueError("a, b and s2 must be 1-D tensors of the same length")
        if (self.s2 <= 0).any():
            raise ValueError("the variances s2 must be positive")

    @property
    def num_timesteps(self) -> int:
        return len(self.a)

    def marginal(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Mean and variance of p(x_0), by pushing N(0, 1) down the chain."""
        mean, var = torch.zeros((), dtype=torch.float64), torch.ones((), dtype=torch.float64)
        for t in reversed(range(self.num_timesteps)):
            # $\mathbb E[x_{t-1}] = a_t \mathbb E[x_t] + b_t$, $\mathrm{Var}[x_{t-1}] = a_t^2 \mathrm{Var}[x_t] + s^2_t$
            mean, var = self.a[t] * mean + self.b[t], self.a[t] ** 2 * var + self.s2[t]
        return mean, var

    def log_likelihood(self, x0: torch.Tensor) -> torch.Tensor:
        """log p(x_0), exact: (N,)."""
        return normal_log_density(x0, *self.marginal())

    def bound_terms(self, schedule: NoiseSchedule, x0: torch.Tensor) -> dict[str, torch.Tensor]:
        """The terms of the DDPM bound on -log p(x_0), with every expectation over q(x_t | x_0) in closed form.

        Returns "prior" L_T (N,), "kl" (N, T-1) whose column t-1 is the KL term of code timestep t
        (L_t in the papers' numbering), "decoder" L_0 = -E log p(x_0 | x_1) (N,) and their sum "total".
        """
        if schedule.num_timesteps != self.num_timesteps:
            raise ValueError(f"the schedule has {schedule.num_timesteps} steps, the chain {self.num_timesteps}")
        x0 = torch.as_tensor(x0, dtype=torch.float64)[:, None]  # (N, 1)
        abar, t = schedule.alphas_cumprod, torch.arange(1, self.num_timesteps)
        # $L_T = \mathrm{KL}\big(\mathcal N(\sqrt{\bar\alpha_T}x_0, 1-\bar\alpha_T)\,\|\,\mathcal N(0, 1)\big)$
        prior = gaussian_kl(abar[-1].sqrt() * x0[:, 0], (1 - abar[-1]).log())
        # $x_t \sim \mathcal N(m, v)$ with $m = \sqrt{\bar\alpha_t}x_0$, $v = 1 - \bar\alpha_t$
        m, v = abar[t].sqrt() * x0, 1 - abar[t]  # (N, T-1), (T-1,)
        # $\tilde\mu_t - \mu_\theta = c_1 x_0 + (c_2 - a_t) x_t - b_t$, whose square has expectation
        # $(c_1 x_0 + (c_2 - a_t) m - b_t)^2 + (c_2 - a_t)^2 v$
        c1, c2 = schedule.posterior_mean_coef1[t], schedule.posterior_mean_coef2[t]
        gap_mean, gap_var = c1 * x0 + (c2 - self.a[t]) * m - self.b[t], (c2 - self.a[t]) ** 2 * v
        # $\mathbb E\,\mathrm{KL}\big(\mathcal N(\tilde\mu_t, \tilde\beta_t)\,\|\,\mathcal N(\mu_\theta, s^2_t)\big)$
        spread = gaussian_kl(torch.zeros_like(self.s2[t]), schedule.posterior_variance[t].log(), 0.0, self.s2[t].log())
        kl = spread + (gap_mean**2 + gap_var) / (2 * self.s2[t])
        # $L_0 = -\mathbb E_{x_1 \sim \mathcal N(\sqrt{\bar\alpha_1}x_0, 1-\bar\alpha_1)}
        #   \log\mathcal N(x_0; a_1 x_1 + b_1, s^2_1)$
        residual_mean = x0[:, 0] - self.a[0] * abar[0].sqrt() * x0[:, 0] - self.b[0]
        residual_var = self.a[0] ** 2 * (1 - abar[0])
        decoder = 0.5 * torch.log(2 * math.pi * self.s2[0]) + (residual_mean**2 + residual_var) / (2 * self.s2[0])
        return {"prior": prior, "kl": kl, "decoder": decoder, "total": prior + kl.sum(1) + decoder}

    def joint(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Mean (T+1,) and covariance (T+1, T+1) of (x_0, ..., x_T) under p."""
        T = self.num_timesteps
        # $x = c + L w$ with $w \sim \mathcal N(0, I_{T+1})$; row T is $x_T = w_T$
        c, L = torch.zeros(T + 1, dtype=torch.float64), torch.zeros(T + 1, T + 1, dtype=torch.float64)
        L[T, T] = 1.0
        for t in reversed(range(T)):
            # row t is x_t: $x_t = a_t x_{t+1} + b_t + \sqrt{s^2_t}\, w_t$ (code indices, as in ``a``)
            c[t], L[t] = self.a[t] * c[t + 1] + self.b[t], self.a[t] * L[t + 1]
            L[t, t] = self.s2[t].sqrt()
        return c, L @ L.T

    def latent_kl(self, schedule: NoiseSchedule, x0: torch.Tensor) -> torch.Tensor:
        r"""$\mathrm{KL}\big(q(x_{1:T} \mid x_0)\,\|\,p(x_{1:T} \mid x_0)\big)$ between the joint Gaussians: (N,).

        By Step 1 of the bound's proof this is exactly the gap: bound - (-log p(x_0)).
        """
        x0 = torch.as_tensor(x0, dtype=torch.float64)
        abar = schedule.alphas_cumprod
        # $q$: $\mathbb E[x_k] = \sqrt{\bar\alpha_k}x_0$,
        #   $\mathrm{Cov}[x_j, x_k] = \sqrt{\bar\alpha_k/\bar\alpha_j}\,(1-\bar\alpha_j)$, $j \le k$
        j, k = torch.meshgrid(torch.arange(len(abar)), torch.arange(len(abar)), indexing="ij")
        lo, hi = torch.minimum(j, k), torch.maximum(j, k)
        cov_q = (abar[hi] / abar[lo]).sqrt() * (1 - abar[lo])
        # $p(x_{1:T} \mid x_0)$ by Gaussian conditioning:
        #   $\mu_{1|0} = \mu_1 + \Sigma_{10}\Sigma_{00}^{-1}(x_0 - \mu_0)$,
        #   $\Sigma_{1|0} = \Sigma_{11} - \Sigma_{10}\Sigma_{00}^{-1}\Sigma_{01}$
        mean, cov = self.joint()
        gain = cov[1:, 0] / cov[0, 0]
        cov_p = cov[1:, 1:] - gain[:, None] * cov[0, 1:][None, :]
        q = torch.distributions.MultivariateNormal(abar.sqrt() * x0[:, None], covariance_matrix=cov_q)
        p = torch.distributions.MultivariateNormal(mean[1:] + gain * (x0[:, None] - mean[0]), covariance_matrix=cov_p)
        return torch.distributions.kl_divergence(q, p)


def gaussian_ddim_coefficients(schedule: NoiseSchedule, c: float, t: int, s: int, eta: float) -> tuple[float, float]:
    r"""(m, σ) of one unclipped generalized DDIM step $x_s = m\,x_t + \sigma z$ for data $\mathcal N(0, c^2)$
    and the exact noise predictor $\epsilon^* = \sqrt{1-\bar\alpha_t}\,x_t / v_t$ with
    $v_t = \bar\alpha_t c^2 + 1 - \bar\alpha_t$ (Chapter 40)."""
    a_t, a_s = schedule.alpha_bar(t).item(), schedule.alpha_bar(s).item()
    # $\sigma = \eta \sqrt{(1-\bar\alpha_s)/(1-\bar\alpha_t)}\sqrt{1-\bar\alpha_t/\bar\alpha_s}$, as in ddim_step
    sigma = eta * math.sqrt((1 - a_s) / (1 - a_t) * (1 - a_t / a_s))
    # $m = \big(\sqrt{\bar\alpha_s\bar\alpha_t}\,c^2 + \sqrt{(1-\bar\alpha_s-\sigma^2)(1-\bar\alpha_t)}\big) / v_t$
    m = (math.sqrt(a_s * a_t) * c**2 + math.sqrt(max(1 - a_s - sigma**2, 0.0) * (1 - a_t))) / (a_t * c**2 + 1 - a_t)
    return m, sigma


def gaussian_ddim_variance(schedule: NoiseSchedule, c: float, steps: int | None, eta: float) -> float:
    """The variance of what ``ddim_sample`` returns from x_T ~ N(0, 1) with the exact noise predictor of data
    N(0, c²), unclipped: the recursion v <- m² v + σ² along the sampler's own chain (Chapter 40)."""
    v = 1.0
    for t, s in chain_pairs(schedule, steps):
        m, sigma = gaussian_ddim_coefficients(schedule, c, t, s, eta)
        # $v \leftarrow m_t^2 v + \sigma_t^2$
        v = m**2 * v + sigma**2
    return v
