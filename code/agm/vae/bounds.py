"""Evidence lower bounds, checked on models whose log p(x) is exact (Chapter 17).

Two such models. A discrete latent z in {1, ..., K}, such as the Bernoulli mixture of Chapter 1: the
ELBO of any q(z|x) and its gap KL(q || p(z|x)) are finite sums over K terms. And the linear-Gaussian
model z ~ N(0, I), x | z ~ N(Wz + b, sigma^2 I), whose marginal and posterior are Gaussian in closed
form. A discrete distribution over z is given by log-probabilities, one row of K per image: (N, K).
The importance-weighted bound of Burda et al. (2016) is computed from log-weights of any model; the
VAE's own log-weights come from `agm.vae.vae.log_importance_weights`.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from agm.distributions import multivariate_gaussian_kl

# -- the importance-weighted bound, from log-weights ----------------------------------------------


def iwae_bound_from_log_weights(log_w: torch.Tensor) -> torch.Tensor:
    """One draw of L_k = log (1/k) sum_i w_i from log-weights (k, ...): the first dimension is summed."""
    if log_w.ndim < 1 or log_w.shape[0] < 1:
        raise ValueError(f"need k >= 1 log-weights along the first dimension, got shape {list(log_w.shape)}")
    # $\hat{\mathcal{L}}_k = \log \frac1k \sum_{i=1}^k e^{\log w_i}$
    return log_w.logsumexp(0) - math.log(log_w.shape[0])


def nested_iwae_bounds(log_w: torch.Tensor, ks: Sequence[int]) -> torch.Tensor:
    """L_k for every k in ``ks`` from the first k of the same k_max draws (k_max, ...): (len(ks), ...)."""
    if log_w.ndim < 1 or not ks or min(ks) < 1 or max(ks) > log_w.shape[0]:
        raise ValueError(f"every k must satisfy 1 <= k <= {log_w.shape[0] if log_w.ndim else 0}, got {list(ks)}")
    idx = torch.as_tensor(list(ks)) - 1
    # $\log \sum_{i \le k} w_i$ for every k at once
    running = torch.logcumsumexp(log_w, 0)[idx]  # (len(ks), ...)
    sizes = torch.as_tensor(list(ks), dtype=log_w.dtype).view(-1, *[1] * (log_w.ndim - 1))
    return running - sizes.log()


# -- a discrete latent variable --------------------------------------------------------------------


def check_log_probs(log_q: torch.Tensor, name: str = "log_q") -> torch.Tensor:
    """Raise unless ``log_q`` holds rows of log-probabilities (.., K) that sum to one."""
    if log_q.ndim < 1 or log_q.shape[-1] < 1 or torch.isnan(log_q).any():
        raise ValueError(f"{name} must be log-probabilities of shape (..., K), got {list(log_q.shape)}")
    if (log_q.logsumexp(-1).abs() > 1e-6).any():
        raise ValueError(f"the rows of exp({name}) must sum to one")
    return log_q


def discrete_posterior(log_joint: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """log p(x) (N,) and log p(z|x) (N, K) from log p(x, z = k) (N, K)."""
    # $\log p(x) = \log \sum_k p(x, k)$
    log_px = log_joint.logsumexp(-1)  # (N,)
    # $\log p(k \mid x) = \log p(x, k) - \log p(x)$
    return log_px, log_joint - log_px.unsqueeze(-1)


def _expect(log_q: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    """sum_k q_k values_k, with the convention 0 * anything = 0 (q_k = 0 contributes nothing)."""
    q = log_q.exp()
    return torch.where(q > 0, q * values, torch.zeros_like(values)).sum(-1)


def discrete_elbo(log_joint: torch.Tensor, log_q: torch.Tensor) -> torch.Tensor:
    """ELBO(q) = E_q[log p(x, z) - log q(z)] per image: (N,)."""
    check_log_probs(log_q)
    # $\mathcal{L}(q) = \sum_k q_k \big(\log p(x, k) - \log q_k\big)$
    return _expect(log_q, log_joint - log_q)


def discrete_kl(log_q: torch.Tensor, log_p: torch.Tensor) -> torch.Tensor:
    """KL(q || p) between rows of two discrete distributions: (N,)."""
    check_log_probs(log_q)
    check_log_probs(log_p, "log_p")
    # $\mathrm{KL}(q \,\|\, p) = \sum_k q_k (\log q_k - \log p_k)$
    return _expect(log_q, log_q - log_p)


def discrete_elbo_readings(log_lik: torch.Tensor, log_prior: torch.Tensor,
                           log_q: torch.Tensor) -> dict[str, torch.Tensor]:
    """The two readings of the ELBO from log p(x|k) (N, K), log p(k) (K,) and log q(k) (N, K)."""
    check_log_probs(log_prior, "log_prior")
    return {
        # $\mathbb{E}_q[\log p(x \mid z)]$ and $\mathrm{KL}(q \,\|\, p(z))$
        "reconstruction": _expect(log_q, log_lik),
        "kl_prior": discrete_kl(log_q, log_prior.expand_as(log_q)),
        # $\mathbb{E}_q[\log p(x, z)]$ and $H(q) = -\mathbb{E}_q[\log q]$
        "expected_log_joint": _expect(log_q, log_lik + log_prior),
        "entropy": -_expect(log_q, log_q),
    }


def tempered(log_post: torch.Tensor, tau: float) -> torch.Tensor:
    """q proportional to p(z|x)^tau: tau = 1 is the posterior, tau -> 0 the uniform distribution."""
    if tau < 0:
        raise ValueError(f"tau must be >= 0, got {tau}")
    return (tau * log_post).log_softmax(-1)


def mixed_with_uniform(log_post: torch.Tensor, lam: float) -> torch.Tensor:
    """q = (1 - lam) p(z|x) + lam / K: every component keeps at least lam / K."""
    if not 0 <= lam <= 1:
        raise ValueError(f"lam must lie in [0, 1], got {lam}")
    log_uniform = torch.full_like(log_post, -math.log(log_post.shape[-1]))
    lam_t = torch.tensor(lam, dtype=log_post.dtype)
    # $q = (1 - \lambda)\, p(z \mid x) + \lambda / K$  (log(0) = -inf drops a term at lam = 0 or 1)
    return torch.logaddexp(log_post + torch.log1p(-lam_t), log_uniform + lam_t.log())


def chi_square(log_p: torch.Tensor, log_q: torch.Tensor) -> torch.Tensor:
    """Pearson chi^2(p || q) = sum_k p_k^2 / q_k - 1 per row: the relative variance of w = p/q under q."""
    check_log_probs(log_p, "log_p")
    check_log_probs(log_q)
    # $\chi^2(p \,\|\, q) = \sum_k p_k^2 / q_k - 1$
    return (2 * log_p - log_q).logsumexp(-1).exp() - 1


def discrete_log_weights(log_joint: torch.Tensor, log_q: torch.Tensor, n: int,
                         generator: torch.Generator | None = None) -> torch.Tensor:
    """log w = log p(x, z) - log q(z) for n independent draws z ~ q(z|x) per image: (n, N)."""
    if n < 1:
        raise ValueError(f"need n >= 1 draws, got {n}")
    check_log_probs(log_q)
    z = torch.multinomial(log_q.exp(), n, replacement=True, generator=generator)  # (N, n)
    # $\log w_i = \log p(x, z_i) - \log q(z_i \mid x)$
    return (log_joint.gather(-1, z) - log_q.gather(-1, z)).T


# -- the linear-Gaussian model ---------------------------------------------------------------------


@dataclass
class LinearGaussianConfig:
    latent_dim: int = 2  # L: z ~ N(0, I_L)
    data_dim: int = 5  # D: x | z ~ N(W z + b, sigma^2 I_D)
    noise_std: float = 0.5  # sigma
    seed: int = 0  # draws W and b from N(0, 1)


class LinearGaussian:
    """z ~ N(0, I), x | z ~ N(W z + b, sigma^2 I), in float64; every quantity in closed form."""

    def __init__(self, config: LinearGaussianConfig):
        if config.latent_dim < 1 or config.data_dim < 1 or config.noise_std <= 0:
            raise ValueError(f"need latent_dim, data_dim >= 1 and noise_std > 0, got {config}")
        self.config = config
        g = torch.Generator().manual_seed(config.seed)
        self.W = torch.randn(config.data_dim, config.latent_dim, generator=g, dtype=torch.float64)  # (D, L)
        self.b = torch.randn(config.data_dim, generator=g, dtype=torch.float64)  # (D,)
        self.var = config.noise_std**2  # sigma^2

    def sample(self, n: int, generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """n ancestral draws: x (n, D) and the z (n, L) that produced them."""
        z = torch.randn(n, self.config.latent_dim, generator=generator, dtype=torch.float64)
        noise = torch.randn(n, self.config.data_dim, generator=generator, dtype=torch.float64)
        return z @ self.W.T + self.b + math.sqrt(self.var) * noise, z

    def marginal(self) -> tuple[torch.Tensor, torch.Tensor]:
        """p(x) = N(b, W W^T + sigma^2 I): mean (D,) and covariance (D, D)."""
        # $p(x) = \mathcal{N}(b,\; W W^\top + \sigma^2 I)$
        return self.b, self.W @ self.W.T + self.var * torch.eye(self.config.data_dim, dtype=torch.float64)

    def posterior(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """p(z|x) = N(m(x), S): means (N, L) and the shared covariance (L, L)."""
        # $S = (I + W^\top W / \sigma^2)^{-1}$
        cov = torch.linalg.inv(torch.eye(self.config.latent_dim, dtype=torch.float64) + self.W.T @ self.W / self.var)
        # $m(x) = S W^\top (x - b) / \sigma^2$
        return (x - self.b) @ self.W @ cov / self.var, cov

    def log_marginal(self, x: torch.Tensor) -> torch.Tensor:
        """log p(x) per row of x (N, D): (N,)."""
        mean, cov = self.marginal()
        return torch.distributions.MultivariateNormal(mean, cov).log_prob(x)

    def log_joint(self, x: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        """log p(x, z) = log p(z) + log p(x|z), broadcasting z (..., N, L) against x (N, D): (..., N)."""
        # $\log p(z) = -\tfrac12 \|z\|^2 - \tfrac L2 \log 2\pi$
        log_prior = -0.5 * (z**2).sum(-1) - 0.5 * self.config.latent_dim * math.log(2 * math.pi)
        # $\log p(x \mid z) = -\|x - Wz - b\|^2 / (2\sigma^2) - \tfrac D2 \log 2\pi\sigma^2$
        resid = x - z @ self.W.T - self.b
        log_lik = -0.5 * (resid**2).sum(-1) / self.var - 0.5 * self.config.data_dim * math.log(2 * math.pi * self.var)
        return log_prior + log_lik

    def elbo(self, x: torch.Tensor, q_mean: torch.Tensor, q_cov: torch.Tensor) -> torch.Tensor:
        """The ELBO of q = N(q_mean (N, L), q_cov (L, L)) in closed form: (N,)."""
        D = self.config.data_dim
        # $\mathbb{E}_q\|x - Wz - b\|^2 = \|x - Wm - b\|^2 + \mathrm{tr}(W S W^\top)$
        sq = ((x - q_mean @ self.W.T - self.b) ** 2).sum(-1) + torch.trace(self.W @ q_cov @ self.W.T)
        reconstruction = -0.5 * sq / self.var - 0.5 * D * math.log(2 * math.pi * self.var)
        zeros = torch.zeros_like(q_mean)
        eye = torch.eye(self.config.latent_dim, dtype=q_cov.dtype)
        # $\mathcal{L}(q) = \mathbb{E}_q[\log p(x \mid z)] - \mathrm{KL}(q \,\|\, \mathcal{N}(0, I))$
        return reconstruction - multivariate_gaussian_kl(q_mean, q_cov, zeros, eye)

    def log_weights(self, x: torch.Tensor, q_mean: torch.Tensor, q_cov: torch.Tensor, n: int,
                    generator: torch.Generator | None = None) -> torch.Tensor:
        """log w = log p(x, z) - log q(z) for n draws z ~ N(q_mean, q_cov) per row of x: (n, N)."""
        if n < 1:
            raise ValueError(f"need n >= 1 draws, got {n}")
        eps = torch.randn((n, *q_mean.shape), generator=generator, dtype=q_mean.dtype)  # (n, N, L)
        # $z = m + C\epsilon$ with $C C^\top = S$
        z = q_mean + eps @ torch.linalg.cholesky(q_cov).T
        q = torch.distributions.MultivariateNormal(q_mean, q_cov)
        return self.log_joint(x, z) - q.log_prob(z)  # (n, N)
