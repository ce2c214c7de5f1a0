"""A mixture of independent-pixel Bernoullis, fitted by (MAP-)EM (Chapters 1, 15 and 16).

p(x) = sum_k pi_k prod_d mu_kd^x_d (1 - mu_kd)^(1 - x_d).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch
from torch import nn

from agm.data import binarize, check_images, mnist
from agm.metrics import binarized_test_nll
from agm.registry import ModelSpec, TrainResult, register, unconditional_sample
from agm.runtime import budget


@dataclass
class MixtureConfig:
    components: int = 50  # K
    iterations: int = 30  # EM iterations; each one sees a fresh binarization of the data
    alpha: float = 1.0  # add-alpha smoothing of each mu_k in the M-step (MAP under a Beta prior)
    seed: int = 0


class BernoulliMixture(nn.Module):
    def __init__(self, config: MixtureConfig):
        super().__init__()
        if config.components < 1:
            raise ValueError(f"components must be >= 1, got {config.components}")
        self.config = config
        k = config.components
        self.register_buffer("log_weights", torch.full((k,), -torch.log(torch.tensor(float(k)))))  # log pi_k
        self.register_buffer("probs", torch.full((k, 1, 28, 28), 0.5))  # mu_k

    def joint_log_probs(self, x: torch.Tensor) -> torch.Tensor:
        """``log pi_k + log p(x | k)`` for each image and component: ``[N, K]``."""
        check_images(x)
        mu = self.probs.flatten(1).clamp(1e-6, 1 - 1e-6)  # (K, D)
        x = x.flatten(1)  # (N, D)
        # $\log p(x|k) = \sum_d x_d \log\frac{\mu_{kd}}{1-\mu_{kd}} + \sum_d \log(1-\mu_{kd})$
        log_px_k = x @ (mu.log() - (1 - mu).log()).T + (1 - mu).log().sum(1)  # (N, K)
        return self.log_weights + log_px_k

    def log_prob(self, x: torch.Tensor) -> torch.Tensor:
        """log p(x) in nats, ``[N]``."""
        return self.joint_log_probs(x).logsumexp(1)

    @torch.no_grad()
    def sample(self, n: int, generator: torch.Generator | None = None) -> torch.Tensor:
        k = torch.multinomial(self.log_weights.exp(), n, replacement=True, generator=generator)
        return torch.bernoulli(self.probs[k], generator=generator)


def e_step(model: BernoulliMixture, x: torch.Tensor) -> tuple[torch.Tensor, float]:
    """Responsibilities r_nk = p(k | x_n) and the mean log-likelihood under the current parameters."""
    joint = model.joint_log_probs(x)  # (N, K)
    log_px = joint.logsumexp(1, keepdim=True)  # (N, 1)
    # $r_{nk} = \pi_k p(x_n|k) / \sum_j \pi_j p(x_n|j)$
    return (joint - log_px).exp(), log_px.mean().item()


def m_step(x: torch.Tensor, resp: torch.Tensor, alpha: float) -> tuple[torch.Tensor, torch.Tensor]:
    """New (log pi, mu) maximizing the expected complete-data log-likelihood (+ Beta prior)."""
    if resp.ndim != 2 or resp.shape[0] != len(x):
        raise ValueError(f"resp must have shape [N, K] with N = {len(x)} images, got {list(resp.shape)}")
    n_k = resp.sum(0)  # (K,)
    # $\pi_k = N_k / N$
    log_weights = (n_k / len(x)).clamp_min(1e-12).log()
    # $\mu_k = (\sum_n r_{nk} x_n + \alpha) / (N_k + 2\alpha)$
    probs = (resp.T @ x.flatten(1) + alpha) / (n_k[:, None] + 2 * alpha)
    return log_weights, probs.view(-1, 1, 28, 28)


def m_step_objective(x: torch.Tensor, resp: torch.Tensor, b: torch.Tensor, a: torch.Tensor,
                     alpha: float) -> torch.Tensor:
    """The objective the M-step maximizes, in unconstrained parameters: pi = softmax(b) (K,), mu = sigmoid(a)
    (K, D). Expected complete-data log-likelihood under ``resp`` (N, K) plus the Beta prior's log-density,
    up to constants; differentiable, so a check can confirm that ``m_step`` is its stationary point."""
    xf = x.flatten(1)  # (N, D)
    log_mu, log_one_minus_mu = nn.functional.logsigmoid(a), nn.functional.logsigmoid(-a)  # (K, D)
    # $\log p(x_n \mid k) = \sum_d x_{nd}\log\mu_{kd} + (1 - x_{nd})\log(1 - \mu_{kd})$
    log_px_given_k = xf @ log_mu.T + (1 - xf) @ log_one_minus_mu.T  # (N, K)
    # $\sum_{n,k} r_{nk}\big(\log\pi_k + \log p(x_n \mid k)\big) + \alpha \sum_{k,d} \log\mu_{kd}(1 - \mu_{kd})$
    return (resp * (b.log_softmax(0) + log_px_given_k)).sum() + alpha * (log_mu + log_one_minus_mu).sum()


def log_prior(model: BernoulliMixture) -> float:
    """log p(pi, mu): a flat Dirichlet on pi and an independent Beta(alpha + 1, alpha + 1) on every mu_kd.

    EM with ``alpha > 0`` is MAP-EM: it never decreases log-likelihood + this log-prior.
    """
    alpha = model.config.alpha
    k = model.config.components
    mu = model.probs.flatten(1).double().clamp(1e-6, 1 - 1e-6)  # (K, D), as in joint_log_probs
    # $\log B(a, b) = \log\Gamma(a) + \log\Gamma(b) - \log\Gamma(a + b)$ with $a = b = \alpha + 1$
    log_beta_fn = 2 * math.lgamma(alpha + 1) - math.lgamma(2 * alpha + 2)
    # $\sum_{k,d} \big[\alpha \log\mu_{kd} + \alpha\log(1 - \mu_{kd}) - \log B(\alpha+1, \alpha+1)\big]$
    log_beta = (alpha * (mu.log() + (1 - mu).log())).sum().item() - mu.numel() * log_beta_fn
    # $\log \mathrm{Dir}(\pi; 1, \dots, 1) = \log\Gamma(K)$
    return log_beta + math.lgamma(k)


def initialize(model: BernoulliMixture, x: torch.Tensor, generator: torch.Generator) -> None:
    """Each mu_k halfway between a random training image and the mean image."""
    idx = torch.randperm(len(x), generator=generator)[: model.config.components]
    model.probs = 0.5 * x[idx] + 0.5 * x.mean(0, keepdim=True)


def fit_em(
    model: BernoulliMixture, x: torch.Tensor, iterations: int, dynamic: bool = True,
    generator: torch.Generator | None = None, log_posterior: bool = False,
) -> list[float]:
    """EM on images ``x`` in [0, 1]; returns the mean log-likelihood before each M-step.

    With ``dynamic=True`` every iteration draws a fresh binarization of ``x`` (one epoch of dynamic
    binarization), so the log-likelihood is measured on a slightly different sample each time.
    With ``dynamic=False``, ``x`` is used as given; then the quantity EM never decreases is the mean
    log-likelihood for ``alpha = 0`` and, for ``alpha > 0``, the mean log-likelihood plus
    ``log_prior(model) / N``, which ``log_posterior=True`` records instead.
    """
    generator = generator or torch.Generator().manual_seed(model.config.seed)
    initialize(model, x, generator)
    history = []
    for _ in range(iterations):
        xb = binarize(x, generator) if dynamic else x
        resp, log_lik = e_step(model, xb)
        history.append(log_lik + (log_prior(model) / len(xb) if log_posterior else 0.0))
        model.log_weights, model.probs = m_step(xb, resp, model.config.alpha)
    return history


def em_trace(model: BernoulliMixture, x: torch.Tensor, iterations: int) -> list[dict[str, float]]:
    """EM on fixed images ``x`` from the model's current parameters, measuring the chain of each step.

    Per iteration t and per image: ``log_lik`` = log p(x | theta^t) and ``log_prior`` = log p(theta^t) / N;
    ``elbo_e`` = F(q^t, theta^t) after the E-step (equal to log_lik); ``elbo_m`` = F(q^t, theta^{t+1})
    after the M-step; ``log_lik_next`` and ``log_prior_next`` under theta^{t+1}. The theorem of
    Chapter 16: log_lik + log_prior <= elbo_m + log_prior_next <= log_lik_next + log_prior_next.
    """
    rows, n = [], len(x)
    for _ in range(iterations):
        resp, log_lik = e_step(model, x)  # q^t = p(z | x, theta^t)
        row = {"log_lik": log_lik, "log_prior": log_prior(model) / n,
               "elbo_e": _elbo(model.joint_log_probs(x), resp)}
        model.log_weights, model.probs = m_step(x, resp, model.config.alpha)
        joint = model.joint_log_probs(x)  # under theta^{t+1}
        row |= {"elbo_m": _elbo(joint, resp), "log_lik_next": joint.logsumexp(1).mean().item(),
                "log_prior_next": log_prior(model) / n}
        rows.append(row)
    return rows


def _elbo(joint: torch.Tensor, resp: torch.Tensor) -> float:
    # $F(q, \theta) = \frac1N \sum_n \sum_k q_{nk}\big(\log p(x_n, k \mid \theta) - \log q_{nk}\big)$
    return ((resp * joint).sum(1) - torch.xlogy(resp, resp).sum(1)).mean().item()


def build(config: dict) -> BernoulliMixture:
    return BernoulliMixture(MixtureConfig(**config))


def train(seed: int = 0, parents: dict | None = None) -> TrainResult:
    x, _ = mnist("trainval")
    x = x[: budget(len(x), 2000)]
    config = MixtureConfig(iterations=budget(30, 3), seed=seed)
    model = BernoulliMixture(config)
    fit_em(model, x, config.iterations)
    return TrainResult(model, asdict(config), steps=config.iterations)


register(ModelSpec(
    name="bernoulli-mixture", chapter=1, summary="mixture of 50 independent-pixel Bernoullis (EM)",
    build=build, train=train, evaluate=binarized_test_nll,
    sample=unconditional_sample,
    train_minutes=1.0,
    samples="binary draws",
))
