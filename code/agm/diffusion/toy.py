"""A one-dimensional mixture of Gaussians pushed through the forward process: everything in closed form.

If x_0 ~ sum_k w_k N(m_k, s_k^2), then x_t = sqrt(abar) x_0 + sqrt(1 - abar) eps is again a mixture,
sum_k w_k N(sqrt(abar) m_k, abar s_k^2 + 1 - abar); its density and score are exact, which lets
Chapters 24 and 28 check Tweedie's formula and the minimizer of the ε-MSE against the truth.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch


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
        """d/dx log q_t(x) = sum_k r_k(x) (mu_k - x) / var_k, with responsibilities r_k: (N,)."""
        log_comp, mu, var = self.log_components(x, abar)
        return (log_comp.softmax(1) * (-(x.double()[:, None] - mu) / var)).sum(1)
