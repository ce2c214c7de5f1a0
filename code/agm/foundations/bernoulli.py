"""The independent-pixel Bernoulli model of Chapter 1: p(x) = prod_d mu_d^x_d (1 - mu_d)^(1 - x_d)."""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
from torch import nn

from agm.data import check_images, mnist
from agm.metrics import binarized_test_nll
from agm.registry import ModelSpec, TrainResult, register, unconditional_sample


@dataclass
class BernoulliConfig:
    # Add-alpha smoothing: mu = (sum x + alpha) / (N + 2 alpha), the MAP estimate under a
    # Beta(alpha + 1, alpha + 1) prior. alpha = 0 is the MLE, which gives probability 0 to
    # pixels never inked in training and so an infinite NLL on a test image that inks one.
    alpha: float = 1.0


class IndependentBernoulli(nn.Module):
    def __init__(self, config: BernoulliConfig):
        super().__init__()
        self.config = config
        self.register_buffer("probs", torch.full((1, 28, 28), 0.5))  # mu_d, one per pixel

    def fit(self, x: torch.Tensor) -> IndependentBernoulli:
        """Closed-form estimate from images in [0, 1] (gray levels = expected binarized pixels)."""
        check_images(x)
        a = self.config.alpha
        # $\hat\mu_d = (\sum_n x_{nd} + \alpha) / (N + 2\alpha)$
        self.probs = (x.sum(0) + a) / (len(x) + 2 * a)
        return self

    def log_prob(self, x: torch.Tensor) -> torch.Tensor:
        """log p(x) in nats for binary images ``[N, 1, 28, 28]`` -> ``[N]``."""
        check_images(x)
        # $\log p(x) = \sum_d x_d \log\mu_d + (1 - x_d)\log(1 - \mu_d)$
        return torch.xlogy(x, self.probs).add(torch.xlogy(1 - x, 1 - self.probs)).flatten(1).sum(1)

    @torch.no_grad()
    def sample(self, n: int, generator: torch.Generator | None = None) -> torch.Tensor:
        return torch.bernoulli(self.probs.expand(n, 1, 28, 28), generator=generator)


def zero_probability_images(x_fit: torch.Tensor, x_test: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The unsmoothed MLE (alpha = 0) fitted to ``x_fit``: the pixels it never inks, ``[1, 28, 28]`` bool, and the
    binary images of ``x_test`` it gives probability zero (an infinite NLL), ``[N]`` bool."""
    check_images(x_test, "x_test")
    probs = IndependentBernoulli(BernoulliConfig(alpha=0.0)).fit(x_fit).probs
    # $\hat\mu_d = 0$ (never inked) and $x_d = 1$, or $\hat\mu_d = 1$ (always inked) and $x_d = 0$: a factor of zero
    zero_factor = ((probs == 0) & (x_test > 0)) | ((probs == 1) & (x_test < 1))
    # $p(x) = \prod_d \hat\mu_d^{x_d}(1 - \hat\mu_d)^{1 - x_d} = 0$ iff some factor is zero
    return probs == 0, zero_factor.flatten(1).any(1)


def build(config: dict) -> IndependentBernoulli:
    return IndependentBernoulli(BernoulliConfig(**config))


def train(seed: int = 0, parents: dict | None = None) -> TrainResult:
    """Closed form: the seed changes nothing."""
    x, _ = mnist("trainval")
    model = build({}).fit(x)
    return TrainResult(model, asdict(model.config), steps=1)


register(ModelSpec(
    name="bernoulli", chapter=1, summary="independent-pixel Bernoulli (closed-form fit)",
    build=build, train=train, evaluate=binarized_test_nll,
    sample=unconditional_sample,
    train_minutes=0.1,
    samples="binary draws",
))
