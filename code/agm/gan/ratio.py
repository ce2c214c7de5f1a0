"""A GAN's discriminator as a density-ratio estimator, Chapter 7, and rejection sampling with it.

Trained on balanced batches with :func:`agm.gan.losses.discriminator_loss`, the optimal logit is
l*(x) = log p(x) - log q(x). Between two independent-pixel Bernoulli models (Chapter 1) that ratio is
known exactly, and linear in x, so a logistic regression is well specified. Discriminator rejection
sampling (Azadi et al., 2019) reads exp(l(x)) as p/q up to a constant M and filters a generator's samples.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Sequence

import torch
from torch import nn

from agm.config import TrainConfig
from agm.data import mnist
from agm.distributions import bernoulli_log_prob
from agm.foundations.bernoulli import BernoulliConfig, IndependentBernoulli
from agm.gan.losses import discriminator_loss
from agm.gan.training import Adversarial, check_image_shape
from agm.runtime import device
from agm.train import gradient_step, run_steps

# (n, generator) -> images (n, 1, 28, 28); IndependentBernoulli.sample and Adversarial.generate are samplers
Sampler = Callable[[int, torch.Generator], torch.Tensor]

# The pair with a known ratio: p fitted to the digits 0-4, q to all ten. q proposes everything p does, like a
# generator that is too broad, and the two overlap: log p/q averages 2.9 nats (sd 2.3) on samples of p and
# -3.4 (sd 3.0) on samples of q, and the Bayes classifier is right on 89% of them (99.3% for 0-4 against
# 5-9, whose log-ratios average +-12 nats), so held-out samples cover one range of log-ratios.
P_DIGITS = (0, 1, 2, 3, 4)
Q_DIGITS = tuple(range(10))


# --- the exact ratio of two independent-pixel Bernoulli models -----------------------------------------


def fit_digit_bernoulli(digits: Sequence[int], split: str = "train", alpha: float = 1.0) -> IndependentBernoulli:
    """Chapter 1's model fitted in closed form to the images of ``split`` whose label is in ``digits``."""
    x, y = mnist(split)
    keep = torch.isin(y, torch.as_tensor(list(digits)))
    if not keep.any():
        raise ValueError(f"no images of the digits {list(digits)} in the {split!r} split")
    return IndependentBernoulli(BernoulliConfig(alpha=alpha)).fit(x[keep])


def bernoulli_log_ratio(x: torch.Tensor, p_probs: torch.Tensor, q_probs: torch.Tensor) -> torch.Tensor:
    """log p(x) - log q(x) for binary images (B, 1, 28, 28) under independent pixels ``p_probs``, ``q_probs``
    (1, 28, 28): (B,)."""
    check_image_shape(x)
    # $\log\frac{p(x)}{q(x)} = \sum_d x_d\log\frac{p_d}{q_d} + (1 - x_d)\log\frac{1-p_d}{1-q_d}$
    return bernoulli_log_prob(x.flatten(1), p_probs.flatten()) - bernoulli_log_prob(x.flatten(1), q_probs.flatten())


def bernoulli_log_ratio_weights(p_probs: torch.Tensor, q_probs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The same log-ratio as w^T x + b: weights (784,) and bias (), for probabilities strictly in (0, 1)."""
    p, q = p_probs.flatten(), q_probs.flatten()
    if not ((p > 0) & (p < 1) & (q > 0) & (q < 1)).all():
        raise ValueError("the linear form needs pixel probabilities strictly between 0 and 1")
    # $w_d = \log\frac{p_d}{q_d} - \log\frac{1-p_d}{1-q_d}$, the difference of the two pixel logits
    weight = torch.logit(p) - torch.logit(q)
    # $b = \sum_d \log\frac{1-p_d}{1-q_d}$, the log-ratio of the blank image
    bias = (torch.log1p(-p) - torch.log1p(-q)).sum()
    return weight, bias


class LogisticDiscriminator(nn.Module):
    """l(x) = w^T x + b on the 784 pixels: logistic regression, which contains the exact log-ratio of two
    independent-pixel Bernoulli models. Starts at w = 0, b = 0 (D = 1/2 everywhere)."""

    def __init__(self):
        super().__init__()
        self.linear = nn.Linear(784, 1)
        nn.init.zeros_(self.linear.weight)
        nn.init.zeros_(self.linear.bias)

    @classmethod
    def exact(cls, p_probs: torch.Tensor, q_probs: torch.Tensor) -> LogisticDiscriminator:
        """The member of the family whose logit is log p(x) - log q(x)."""
        model = cls()
        weight, bias = bernoulli_log_ratio_weights(p_probs, q_probs)
        with torch.no_grad():
            model.linear.weight.copy_(weight[None])
            model.linear.bias.copy_(bias[None])
        return model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(check_image_shape(x).flatten(1)).squeeze(1)  # logit l(x): (B,)


# --- the ratio by classification ------------------------------------------------------------------------


# On P_DIGITS against Q_DIGITS at AGM_THREADS=1 (a 2-core machine shared with other jobs): Chapter 6's MLP
# discriminator at these defaults, 9 s, logit against log p/q on held-out samples: correlation 0.989, slope
# 0.92; the logistic regression, which starts at w = 0 and needs larger steps to grow to the ratio's scale,
# at lr = 3e-2: 1.4 s, correlation 0.986, slope 1.04 (at 3e-3: 0.96 and 0.64).
def ratio_training(steps: int = 400, **changes) -> TrainConfig:
    """``steps`` updates on fresh batches of 128 images from each side; Adam at 3e-3."""
    return TrainConfig(**{"steps": steps, "batch_size": 128, "lr": 3e-3} | changes)


def empirical_sampler(x: torch.Tensor) -> Sampler:
    """Draws rows of ``x`` uniformly with replacement: a sampler of the empirical distribution of x."""
    return lambda n, generator: x[torch.randint(len(x), (n,), generator=generator)]


def fit_ratio_discriminator(discriminator: nn.Module, sample_p: Sampler, sample_q: Sampler,
                            train: TrainConfig | None = None, log_every: int = 50,
                            desc: str = "ratio discriminator") -> tuple[nn.Module, dict]:
    """Train ``discriminator`` with the GAN's discriminator loss, p (label 1) against q (label 0), on fresh
    balanced batches, so that its logit approaches log p(x) - log q(x).

    Both samplers and the batch order draw from one generator seeded with ``train.seed``; the
    initialization is the caller's. Returns the discriminator (on the CPU, in evaluation mode) and
    ``{"history": [...]}``: ``d_loss``, ``d_real`` (mean D on p), ``d_fake`` (mean D on q).
    """
    train = train or ratio_training()
    generator = torch.Generator().manual_seed(train.seed)
    dev = device()
    discriminator = discriminator.to(dev)
    optimizer = train.adam(discriminator.parameters())

    def step_fn(step: int) -> dict:
        x_p = check_image_shape(sample_p(train.batch_size, generator)).to(dev)  # (B, 1, 28, 28)
        x_q = check_image_shape(sample_q(train.batch_size, generator)).to(dev)
        # $\mathbb{E}_p[\mathrm{softplus}(-l)] + \mathbb{E}_q[\mathrm{softplus}(l)]$, minimized by $l^* = \log p/q$
        loss, logs = discriminator_loss(discriminator(x_p), discriminator(x_q))
        return {"d_loss": gradient_step(loss, optimizer, desc=desc, step=step), **logs}

    history = run_steps(step_fn, train.steps, log_every, desc=desc, modules=[discriminator])
    return discriminator.cpu().eval(), {"history": history}


def refine_training(steps: int = 500, **changes) -> TrainConfig:
    """Continue the discriminator as the GAN trained it: batches of 64, Adam at 2e-4 with beta_1 = 0.5."""
    return TrainConfig(**{"steps": steps, "batch_size": 64, "lr": 2e-4, "betas": (0.5, 0.999)} | changes)


def refine_discriminator(model: Adversarial, train: TrainConfig | None = None, split: str = "trainval",
                         log_every: int = 50) -> dict:
    """Keep training the discriminator alone, real images of ``split`` against samples of the frozen
    generator, so that its logit approaches log p/q for the generator as it now is (Azadi et al., 2019).

    Changes ``model.discriminator`` in place (copy the model first to keep the original) with a fresh
    Adam. The samples come from :meth:`Adversarial.generate`, BatchNorm on running statistics: the
    distribution :func:`rejection_sample` filters. Returns the logs of :func:`fit_ratio_discriminator`.
    """
    refuse_conditional(model)
    x, _ = mnist(split)
    model.to(device())
    _, logs = fit_ratio_discriminator(model.discriminator, empirical_sampler(x), model.generate,
                                      train or refine_training(), log_every, desc="discriminator refinement")
    model.cpu().eval()
    return logs


# --- rejection sampling ----------------------------------------------------------------------------------


def check_below_log_m(logits: torch.Tensor, log_m: torch.Tensor | float) -> torch.Tensor:
    """l(x) - log M, which must be <= 0: M bounds every exp(l) it is used with."""
    delta = logits - torch.as_tensor(log_m, dtype=logits.dtype)
    if (delta > 0).any():
        raise ValueError(f"a logit exceeds log M by {delta.max().item():.3g}: M must be at least the largest "
                         "exp(l(x)) it is used with (a running maximum)")
    return delta


def exact_acceptance(logits: torch.Tensor, log_m: torch.Tensor | float) -> torch.Tensor:
    """Rejection sampling's acceptance probability with exp(l) as the ratio p/q up to a constant: exp(l - log M).

    With l = log p/q exactly and M >= max p/q, the accepted samples of q are samples of p, and a
    proposal is accepted with probability 1/M.
    """
    # $a(x) = \frac{p(x)}{M q(x)} = e^{l(x) - \log M}$
    return torch.exp(check_below_log_m(logits, log_m))


def drs_logit(logits: torch.Tensor, log_m: torch.Tensor | float, gamma: torch.Tensor | float = 0.0,
              eps: float = 1e-6) -> torch.Tensor:
    """F(x) of discriminator rejection sampling (Azadi et al., 2019), the logit of its acceptance probability."""
    delta = check_below_log_m(logits, log_m)  # $l(x) - \log M \le 0$
    # $F(x) = l(x) - \log M - \log\big(1 - e^{\,l(x) - \log M - \epsilon}\big) - \gamma$
    return delta - torch.log(-torch.expm1(delta - eps)) - gamma


def drs_acceptance(logits: torch.Tensor, log_m: torch.Tensor | float, gamma: torch.Tensor | float,
                   eps: float = 1e-6) -> torch.Tensor:
    """The acceptance probability sigmoid(F(x)) of discriminator rejection sampling; increasing in l(x).

    At gamma = 0, F is the logit of the exact acceptance exp(l - log M) but for eps, which keeps F finite
    where l = log M; gamma lowers every acceptance's log-odds by gamma.
    """
    # $a(x) = \sigma(F(x))$
    return torch.sigmoid(drs_logit(logits, log_m, gamma, eps))


def gamma_for_percentile(logits: torch.Tensor, log_m: torch.Tensor | float, percentile: float,
                         eps: float = 1e-6) -> float:
    """gamma = the ``percentile``-th percentile of F (at gamma = 0) over ``logits``: afterwards a fraction
    1 - percentile/100 of them have F >= 0, i.e. acceptance probability >= 1/2."""
    if not 0 <= percentile <= 100:
        raise ValueError(f"percentile must lie in [0, 100], got {percentile}")
    return torch.quantile(drs_logit(logits.double(), log_m, 0.0, eps), percentile / 100).item()


@torch.no_grad()
def discriminator_logits(discriminator: nn.Module, x: torch.Tensor, batch_size: int = 1000) -> torch.Tensor:
    """l(x) for images (N, 1, 28, 28), in batches on the discriminator's device, in evaluation mode: (N,) on the CPU."""
    was_training = discriminator.training
    discriminator.eval()
    dev = next(itertools.chain(discriminator.parameters(), discriminator.buffers())).device
    out = torch.cat([discriminator(x[i : i + batch_size].to(dev)).cpu() for i in range(0, len(x), batch_size)])
    discriminator.train(was_training)
    return out


def refuse_conditional(model: nn.Module) -> None:
    if getattr(model, "conditional", False):
        raise ValueError("this takes an unconditional GAN: its discriminator is l(x), not l(x, y)")


class RejectionSamplingError(RuntimeError):
    """Too few proposals were accepted within the cap on proposals."""


def acceptance_probability(logits: torch.Tensor, log_m: torch.Tensor, reference: torch.Tensor | None,
                           percentile: float, gamma_follows_m: bool,
                           eps: float = 1e-6) -> tuple[torch.Tensor, torch.Tensor]:
    """Acceptance probabilities of proposals with ``logits`` (k,) examined under running maxima ``log_m`` (k,),
    and the gamma each one used: exp(l - log M) when ``reference`` is None (exact rejection sampling), else
    sigmoid(F) with gamma the ``percentile`` of F over the ``reference`` logits (the burn-in), at each
    proposal's M if ``gamma_follows_m``, at the reference's own maximum otherwise."""
    if reference is None:
        return exact_acceptance(logits, log_m), torch.full_like(logits, float("nan"))
    m_for_gamma = log_m if gamma_follows_m else torch.full_like(log_m, reference.max().item())
    levels, which = m_for_gamma.unique(return_inverse=True)  # M rises rarely: a few levels per batch
    gamma = torch.tensor([gamma_for_percentile(reference, m, percentile, eps) for m in levels.tolist()],
                         dtype=logits.dtype)[which]  # (k,)
    return drs_acceptance(logits, log_m, gamma, eps), gamma


def rejection_sample(model: Adversarial, n: int, generator: torch.Generator, burn_in: int = 10_000,
                     percentile: float = 95.0, exact: bool = False, batch_size: int = 1000, eps: float = 1e-6,
                     gamma_follows_m: bool = True, max_proposals: int | None = None) -> tuple[torch.Tensor, dict]:
    """n samples of ``model.generate`` kept by discriminator rejection sampling (Azadi et al., 2019), or by
    exact rejection sampling with exp(l - log M) when ``exact``: images (n, 1, 28, 28) and statistics.

    1. burn-in: log M = the largest logit over ``burn_in`` proposals, which are not kept;
    2. proposals in batches, each accepted with probability sigmoid(F(x)) (or exp(l - log M)), log M
       raised to every larger logit seen, from that proposal on; stop at the n-th acceptance.

    gamma is the ``percentile``-th percentile of F over the burn-in logits (:func:`gamma_for_percentile`),
    so that a fraction 1 - percentile/100 of proposals is accepted with probability >= 1/2. With
    ``gamma_follows_m`` it is recomputed at every new M; otherwise it stays at the burn-in's M, and one
    large logit later lowers every acceptance. (Turner et al.'s (2019) reimplementation takes the
    percentile over each batch of proposals instead of the burn-in.)

    ``stats``: ``acceptance_rate`` = n / ``proposals`` (after the burn-in, up to the n-th acceptance),
    ``log_m`` and ``gamma`` at the end (gamma None when ``exact``). More than ``max_proposals`` (default
    200 n) raise :class:`RejectionSamplingError`. ``generator`` draws the latents and the uniforms.
    """
    refuse_conditional(model)
    if n < 1 or burn_in < 1 or batch_size < 1:
        raise ValueError(f"n, burn_in and batch_size must be positive, got {n}, {burn_in}, {batch_size}")
    max_proposals = 200 * n if max_proposals is None else max_proposals

    def propose(k: int) -> tuple[torch.Tensor, torch.Tensor]:
        x = check_image_shape(model.generate(k, generator))  # (k, 1, 28, 28) on the CPU
        return x, discriminator_logits(model.discriminator, x, batch_size).double()  # (k,)

    # 1. burn-in
    reference = torch.cat([propose(min(batch_size, burn_in - i))[1] for i in range(0, burn_in, batch_size)])
    log_m = reference.max()
    # 2. proposals until n are accepted
    kept, accepted, proposals = [], 0, 0
    while accepted < n:
        if proposals >= max_proposals:
            raise RejectionSamplingError(
                f"accepted {accepted} of {n} images in {proposals} proposals (acceptance rate "
                f"{accepted / proposals:.2g}); raise max_proposals" + ("" if exact else ", or lower the percentile"))
        x, logits = propose(min(batch_size, max_proposals - proposals))
        # $\log M_i = \max(\log M, l(x_1), \dots, l(x_i))$: M as it stands when proposal i is examined
        running_log_m = torch.maximum(logits.cummax(0).values, log_m)
        prob, gamma = acceptance_probability(logits, running_log_m, None if exact else reference, percentile,
                                             gamma_follows_m, eps)
        accept = torch.rand(len(x), generator=generator, dtype=torch.float64) < prob  # (k,)
        index = accept.nonzero().squeeze(1)[: n - accepted]  # the acceptances still needed
        # count proposals up to the n-th acceptance, where a one-at-a-time sampler stops
        last = index[-1].item() + 1 if accepted + len(index) == n else len(x)
        kept.append(x[index])
        accepted, proposals = accepted + len(index), proposals + last
        log_m, gamma = running_log_m[last - 1], gamma[last - 1]
    stats = {"acceptance_rate": n / proposals, "proposals": proposals, "log_m": log_m.item(),
             "gamma": None if exact else gamma.item(), "burn_in": burn_in}
    return torch.cat(kept), stats
