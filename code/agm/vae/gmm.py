"""A Gaussian mixture with full covariances, fitted by (penalized) EM in float64 (Chapter 16).

p(x) = sum_k pi_k N(x; mu_k, Sigma_k), on feature vectors such as the PCA projections of MNIST
images (``pca``). The penalty -(lambda/2) sum_k tr(Sigma_k^{-1}) keeps every covariance away from
the singular solutions where the likelihood is unbounded; with it, EM never decreases
log-likelihood + penalty (``log_prior``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch


@dataclass
class GMMConfig:
    components: int = 10  # K
    iterations: int = 50  # EM iterations
    reg: float = 1e-3  # lambda: adds lambda I to every weighted scatter matrix in the M-step
    seed: int = 0  # chooses the K data points that initialize the means

    def __post_init__(self):
        if self.components < 1 or self.iterations < 0 or self.reg < 0:
            raise ValueError(f"need components >= 1, iterations >= 0 and reg >= 0, got {self}")


def check_features(x: torch.Tensor, name: str = "x") -> torch.Tensor:
    """Raise a clear error unless ``x`` is a finite float64 matrix [N, D] with N, D >= 1."""
    if x.ndim != 2 or x.shape[0] < 1 or x.shape[1] < 1:
        raise ValueError(f"{name} must have shape [N, D] with N, D >= 1, got {list(x.shape)}")
    if x.dtype != torch.float64 or not torch.isfinite(x).all():
        raise ValueError(f"{name} must hold finite float64 values, got {x.dtype}")
    return x


@dataclass
class GaussianMixture:
    log_weights: torch.Tensor  # log pi_k, (K,)
    means: torch.Tensor  # mu_k, (K, D)
    covs: torch.Tensor  # Sigma_k, (K, D, D), symmetric positive definite

    def __post_init__(self):
        k, d = check_features(self.means, "means").shape
        if self.log_weights.shape != (k,) or self.covs.shape != (k, d, d):
            raise ValueError(f"need log_weights (K,) and covs (K, D, D) for means (K, D) = {(k, d)}, got "
                             f"{list(self.log_weights.shape)} and {list(self.covs.shape)}")

    @property
    def dim(self) -> int:
        return self.means.shape[1]

    def joint_log_probs(self, x: torch.Tensor) -> torch.Tensor:
        """``log pi_k + log N(x; mu_k, Sigma_k)`` for each row of ``x`` and each component: (N, K)."""
        check_features(x)
        if x.shape[1] != self.dim:
            raise ValueError(f"x has {x.shape[1]} features, the mixture has {self.dim}")
        return self.log_weights + gaussian_log_density(x, self.means, self.covs)

    def log_prob(self, x: torch.Tensor) -> torch.Tensor:
        """log p(x) per row: (N,)."""
        return self.joint_log_probs(x).logsumexp(1)

    def sample(self, n: int, generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """n ancestral draws: x (n, D) and their components z (n,)."""
        z = torch.multinomial(self.log_weights.exp(), n, replacement=True, generator=generator)  # (n,)
        eps = torch.randn(n, self.dim, 1, generator=generator, dtype=torch.float64)
        # $x = \mu_z + L_z \varepsilon$ with $L_z L_z^\top = \Sigma_z$
        return self.means[z] + (torch.linalg.cholesky(self.covs)[z] @ eps)[..., 0], z


def gaussian_log_density(x: torch.Tensor, means: torch.Tensor, covs: torch.Tensor) -> torch.Tensor:
    """log N(x_n; mu_k, Sigma_k) for x (N, D), means (K, D), covs (K, D, D): (N, K)."""
    chol = torch.linalg.cholesky(covs)  # (K, D, D), Sigma_k = L_k L_k^T
    diff = (x[None] - means[:, None]).transpose(1, 2)  # (K, D, N)
    # $u = L_k^{-1}(x - \mu_k)$, so that $\|u\|^2 = (x - \mu_k)^\top \Sigma_k^{-1} (x - \mu_k)$
    u = torch.linalg.solve_triangular(chol, diff, upper=False)  # (K, D, N)
    # $\log\det\Sigma_k = 2 \sum_d \log L_{k,dd}$
    logdet = 2 * chol.diagonal(dim1=1, dim2=2).log().sum(-1)  # (K,)
    # $\log\mathcal{N}(x; \mu_k, \Sigma_k) = -\tfrac12\big(\|u\|^2 + \log\det\Sigma_k + D \log 2\pi\big)$
    return -0.5 * ((u**2).sum(1) + logdet[:, None] + x.shape[1] * math.log(2 * math.pi)).T


def e_step(model: GaussianMixture, x: torch.Tensor) -> tuple[torch.Tensor, float]:
    """Responsibilities r_nk = p(k | x_n), (N, K), and the mean log-likelihood of the current parameters."""
    joint = model.joint_log_probs(x)  # (N, K)
    log_px = joint.logsumexp(1, keepdim=True)  # (N, 1)
    # $r_{nk} = \pi_k \mathcal{N}(x_n; \mu_k, \Sigma_k) / \sum_j \pi_j \mathcal{N}(x_n; \mu_j, \Sigma_j)$
    return (joint - log_px).exp(), log_px.mean().item()


def m_step(x: torch.Tensor, resp: torch.Tensor, reg: float) -> GaussianMixture:
    """The parameters maximizing E_r[log p(x, z)] - (reg/2) sum_k tr(Sigma_k^{-1}), in closed form."""
    check_features(x)
    if resp.ndim != 2 or resp.shape[0] != len(x) or resp.shape[1] < 1 or reg < 0:
        raise ValueError(f"need resp of shape [N = {len(x)}, K] and reg >= 0, got {list(resp.shape)} and {reg}")
    n_k = resp.sum(0).clamp_min(torch.finfo(resp.dtype).tiny)  # (K,)
    # $\pi_k = N_k / N$
    log_weights = (n_k / len(x)).log()
    # $\mu_k = \sum_n r_{nk} x_n / N_k$
    means = resp.T @ x / n_k[:, None]  # (K, D)
    diff = x[None] - means[:, None]  # (K, N, D)
    scatter = (resp.T[:, :, None] * diff).transpose(1, 2) @ diff  # (K, D, D)
    # $\Sigma_k = \big(\sum_n r_{nk} (x_n - \mu_k)(x_n - \mu_k)^\top + \lambda I\big) / N_k$
    covs = (scatter + reg * torch.eye(x.shape[1], dtype=x.dtype)) / n_k[:, None, None]
    return GaussianMixture(log_weights, means, 0.5 * (covs + covs.transpose(1, 2)))


def log_prior(model: GaussianMixture, reg: float) -> float:
    """The penalty -(reg/2) sum_k tr(Sigma_k^{-1}): the log of an improper prior on the covariances."""
    # $-\tfrac{\lambda}{2} \sum_k \mathrm{tr}(\Sigma_k^{-1})$
    return -0.5 * reg * torch.linalg.inv(model.covs).diagonal(dim1=1, dim2=2).sum().item()


def initialize(x: torch.Tensor, config: GMMConfig, generator: torch.Generator) -> GaussianMixture:
    """Means at K distinct random data points, every covariance the data's, equal weights."""
    check_features(x)
    if config.components < 1 or config.components > len(x):
        raise ValueError(f"components must lie in [1, N = {len(x)}], got {config.components}")
    k, d = config.components, x.shape[1]
    idx = torch.randperm(len(x), generator=generator)[:k]
    centred = x - x.mean(0)
    cov = (centred.T @ centred + config.reg * torch.eye(d, dtype=x.dtype)) / len(x)  # (D, D)
    return GaussianMixture(torch.full((k,), -math.log(k), dtype=x.dtype), x[idx].clone(), cov.expand(k, d, d).clone())


def fit_em(x: torch.Tensor, config: GMMConfig, generator: torch.Generator | None = None,
           log_posterior: bool = False) -> tuple[GaussianMixture, list[float]]:
    """EM from ``initialize``; returns the mixture and the mean log-likelihood before each M-step.

    With ``log_posterior=True`` the history holds mean log-likelihood + ``log_prior / N`` instead,
    the quantity that EM never decreases when ``reg > 0``.
    """
    generator = generator or torch.Generator().manual_seed(config.seed)
    model = initialize(x, config, generator)
    history = []
    for _ in range(config.iterations):
        resp, log_lik = e_step(model, x)
        history.append(log_lik + (log_prior(model, config.reg) / len(x) if log_posterior else 0.0))
        model = m_step(x, resp, config.reg)
    return model, history


def pca(x: torch.Tensor, dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The mean (D,) and the top ``dim`` principal directions (dim, D) of the rows of x (N, D), by SVD."""
    if x.ndim != 2 or not 1 <= dim <= min(x.shape):
        raise ValueError(f"need x of shape [N, D] and 1 <= dim <= min(N, D), got {list(x.shape)} and {dim}")
    mean = x.mean(0)
    # $X - \bar x = U S V^\top$: the rows of $V^\top$ are the principal directions, by decreasing variance
    _, _, vt = torch.linalg.svd(x - mean, full_matrices=False)
    return mean, vt[:dim]
