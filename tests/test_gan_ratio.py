"""Chapter 7: the discriminator's logit against known log-ratios, and (discriminator) rejection sampling."""

import copy
import math
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from scipy.stats import chisquare
from torch import nn

from agm.data import mnist
from agm.foundations import fdiv
from agm.gan import gan, ratio
from agm.gan.losses import discriminator_loss
from agm.gan.training import Adversarial

# two independent-pixel distributions on the first four pixels (the other 780 are always 0): 16 states
P4 = torch.tensor([0.8, 0.3, 0.6, 0.2], dtype=torch.float64)
Q4 = torch.tensor([0.4, 0.5, 0.3, 0.4], dtype=torch.float64)


def on_four_pixels(probs: torch.Tensor) -> torch.Tensor:
    out = torch.zeros(784, dtype=torch.float64)
    out[:4] = probs
    return out.view(1, 28, 28)


class ThresholdGenerator(nn.Module):
    """x_d = 1[z_d < Phi^-1(q_d)], z ~ N(0, I): exactly the product Bernoulli q on the first four pixels."""

    def __init__(self, q: torch.Tensor):
        super().__init__()
        self.threshold = nn.Parameter(torch.distributions.Normal(0.0, 1.0).icdf(q.float()), requires_grad=False)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        x = torch.zeros(len(z), 784)
        x[:, :4] = (z < self.threshold).float()
        return x.view(-1, 1, 28, 28)


class ExactLogRatio(nn.Module):
    """l(x) = log p(x) - log q(x) on the first four pixels, the optimal discriminator's logit, written by hand."""

    def __init__(self, p: torch.Tensor, q: torch.Tensor):
        super().__init__()
        self.register_buffer("on", (p / q).log())  # log p_d/q_d where x_d = 1
        self.register_buffer("off", ((1 - p) / (1 - q)).log())  # where x_d = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        bits = x.flatten(1)[:, :4].double()
        return (bits * self.on + (1 - bits) * self.off).sum(1)


def exact_gan() -> Adversarial:
    """A 'GAN' whose generator samples q and whose discriminator's logit is log p/q exactly."""
    config = SimpleNamespace(latent_dim=4, loss="non-saturating")
    return Adversarial(config, ThresholdGenerator(Q4), ExactLogRatio(P4, Q4))


def state_index(x: torch.Tensor) -> torch.Tensor:
    """The state of the four pixels as in fdiv.binary_states: sum_d x_d 2^d."""
    return (x.flatten(1)[:, :4] * 2 ** torch.arange(4)).sum(1).long()


def tiny_gan() -> gan.GAN:
    torch.manual_seed(0)
    return gan.GAN(gan.GANConfig(latent_dim=8, hidden=32))


@pytest.fixture(scope="module")
def digit_pair():
    return ratio.fit_digit_bernoulli(ratio.P_DIGITS), ratio.fit_digit_bernoulli(ratio.Q_DIGITS)


# -- oracles --------------------------------------------------------------------------------------------


def test_bernoulli_log_ratio_is_the_difference_of_torch_log_likelihoods_and_linear_in_x(digit_pair):
    p, q = digit_pair
    g = torch.Generator().manual_seed(0)
    x = torch.cat([p.sample(100, g), q.sample(100, g)]).double()
    log_p = torch.distributions.Bernoulli(probs=p.probs.double()).log_prob(x).sum((1, 2, 3))
    log_q = torch.distributions.Bernoulli(probs=q.probs.double()).log_prob(x).sum((1, 2, 3))
    exact = ratio.bernoulli_log_ratio(x, p.probs.double(), q.probs.double())
    assert exact.shape == (200,) and torch.allclose(exact, log_p - log_q, rtol=0, atol=1e-9)
    assert exact.std() > 1  # the ratio varies: a broken formula could not match by accident
    # the same ratio as w^T x + b, which a logistic regression can represent exactly
    logistic = ratio.LogisticDiscriminator.exact(p.probs, q.probs)
    assert torch.allclose(logistic(x.float()).double(), exact, rtol=0, atol=1e-3)
    with pytest.raises(ValueError, match="strictly between 0 and 1"):
        ratio.bernoulli_log_ratio_weights(on_four_pixels(P4), on_four_pixels(Q4))


def test_exact_rejection_sampling_turns_samples_of_q_into_samples_of_p():
    model, n = exact_gan(), 10_000
    pmf_p, pmf_q = fdiv.bernoulli_pmf(P4), fdiv.bernoulli_pmf(Q4)  # (16,)
    log_m = (pmf_p / pmf_q).log().max().item()  # log max p/q; q gives its state probability 0.036
    x, stats = ratio.rejection_sample(model, n, torch.Generator().manual_seed(0), burn_in=2000, exact=True,
                                      batch_size=5000)
    assert x.shape == (n, 1, 28, 28)
    counts = torch.bincount(state_index(x), minlength=16).numpy()
    # under the null the p-value is uniform: 1e-3 rejects a correct sampler once in a thousand seeds
    assert chisquare(counts, n * pmf_p.numpy()).pvalue > 1e-3
    # the test has power: the proposals themselves (q) fail it by far
    proposals = torch.bincount(state_index(model.generate(n, torch.Generator().manual_seed(1))), minlength=16)
    assert chisquare(proposals.numpy(), n * pmf_p.numpy()).pvalue < 1e-12
    # the burn-in found max p/q, and a proposal is accepted with probability 1/M: n / proposals estimates
    # it with standard error a sqrt((1 - a) / n)
    assert stats["log_m"] == pytest.approx(log_m, abs=1e-9)
    a = math.exp(-log_m)
    assert abs(stats["acceptance_rate"] - a) < 4 * a * math.sqrt((1 - a) / n)
    assert stats["acceptance_rate"] == n / stats["proposals"] and stats["gamma"] is None


@pytest.mark.parametrize("follows", [True, False])
def test_m_rises_to_a_larger_logit_and_gamma_follows_it_when_asked(follows):
    model, seed = exact_gan(), 3
    log_m = (fdiv.bernoulli_pmf(P4) / fdiv.bernoulli_pmf(Q4)).log().max().item()
    first = ratio.discriminator_logits(model.discriminator, model.generate(1, torch.Generator().manual_seed(seed)))
    assert first.item() < log_m - 1  # the one burn-in proposal is not the most favoured state
    _, stats = ratio.rejection_sample(model, 200, torch.Generator().manual_seed(seed), burn_in=1,
                                      percentile=50.0, gamma_follows_m=follows, max_proposals=10**6)
    assert stats["log_m"] == pytest.approx(log_m, abs=1e-9)  # raised from the burn-in's logit
    gamma_at = lambda m: ratio.gamma_for_percentile(first.double(), m, 50.0)  # noqa: E731
    expected = gamma_at(log_m) if follows else gamma_at(first.item())
    assert stats["gamma"] == pytest.approx(expected, abs=1e-9)
    assert abs(gamma_at(log_m) - gamma_at(first.item())) > 1  # the two rules differ here


def test_drs_acceptance_at_gamma_zero_is_the_papers_formula_and_increases_with_the_logit():
    logits = torch.linspace(-20, 3, 231, dtype=torch.float64)
    log_m, eps = 3.0, 1e-6
    f = logits - log_m - torch.log(1 - torch.exp(logits - log_m - eps))  # F(x) written out
    accept = ratio.drs_acceptance(logits, log_m, 0.0, eps)
    assert torch.allclose(accept, torch.sigmoid(f), rtol=1e-12, atol=0)
    assert (accept.diff() > 0).all() and 0 < accept.min() and accept.max() < 1
    # F is the logit of the exact rule exp(l - log M), but for eps
    far = logits <= log_m - 0.1
    assert torch.allclose(accept[far], ratio.exact_acceptance(logits[far], log_m), rtol=1e-4, atol=0)
    # gamma lowers every log-odds by gamma
    shifted = ratio.drs_acceptance(logits, log_m, 2.5, eps)
    assert torch.allclose(torch.logit(shifted), torch.logit(accept) - 2.5, atol=1e-8)
    with pytest.raises(ValueError, match="exceeds log M"):
        ratio.drs_acceptance(torch.tensor([3.5]), log_m, 0.0)


@pytest.mark.parametrize("percentile", [50.0, 80.0, 95.0])
def test_gamma_for_percentile_leaves_the_stated_fraction_at_acceptance_one_half_or_more(percentile):
    logits = 2 * torch.randn(1001, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    log_m = logits.max().item()
    gamma = ratio.gamma_for_percentile(logits, log_m, percentile)
    above = (ratio.drs_logit(logits, log_m, gamma) >= -1e-12).double().mean().item()  # F >= 0
    assert abs(above - (1 - percentile / 100)) <= 1 / len(logits)
    assert (ratio.drs_acceptance(logits, log_m, gamma) >= 0.5 - 1e-12).double().mean().item() == above
    with pytest.raises(ValueError, match="percentile"):
        ratio.gamma_for_percentile(logits, log_m, 101.0)


# -- properties -----------------------------------------------------------------------------------------


def test_logistic_regression_recovers_the_log_ratio_of_two_digit_models(digit_pair):
    p, q = digit_pair
    logistic, logs = ratio.fit_ratio_discriminator(ratio.LogisticDiscriminator(), p.sample, q.sample,
                                                   ratio.ratio_training(200, lr=3e-2))
    g = torch.Generator().manual_seed(1)
    x = torch.cat([p.sample(2000, g), q.sample(2000, g)])
    exact = ratio.bernoulli_log_ratio(x, p.probs, q.probs)
    with torch.no_grad():
        learned = logistic(x)
    assert np.corrcoef(learned.numpy(), exact.numpy())[0, 1] > 0.95  # at 0 (untrained) or swapped labels: fails
    assert [row["step"] for row in logs["history"]] == [50, 100, 150, 200]
    assert logs["history"][-1]["d_loss"] < math.log(4) - 0.2  # below the loss of D = 1/2


def test_fit_is_deterministic_under_a_seed(digit_pair):
    p, q = digit_pair

    def weights(seed):
        model, _ = ratio.fit_ratio_discriminator(ratio.LogisticDiscriminator(), p.sample, q.sample,
                                                 ratio.ratio_training(5, seed=seed))
        return model.linear.weight.detach().clone()

    assert torch.equal(weights(0), weights(0)) and not torch.equal(weights(0), weights(1))


def test_wrong_image_shapes_raise(digit_pair):
    p, q = digit_pair
    flat = lambda n, g: p.sample(n, g).flatten(1)  # noqa: E731
    with pytest.raises(ValueError, match=r"\[B, 1, 28, 28\]"):
        ratio.fit_ratio_discriminator(ratio.LogisticDiscriminator(), flat, q.sample, ratio.ratio_training(2))
    with pytest.raises(ValueError, match=r"\[B, 1, 28, 28\]"):
        ratio.bernoulli_log_ratio(torch.zeros(3, 784), p.probs, q.probs)
    model = tiny_gan()
    model.generate = lambda n, generator=None: torch.zeros(n, 784)
    with pytest.raises(ValueError, match=r"\[B, 1, 28, 28\]"):
        ratio.rejection_sample(model, 4, torch.Generator().manual_seed(0), burn_in=8)


def test_the_proposal_cap_raises_a_clear_error():
    with pytest.raises(ratio.RejectionSamplingError, match=r"accepted \d+ of 100 images in 50 proposals"):
        ratio.rejection_sample(tiny_gan(), 100, torch.Generator().manual_seed(0), burn_in=50, max_proposals=50)


@pytest.mark.parametrize("exact", [False, True])
def test_exactly_n_images_are_accepted_and_the_run_is_deterministic_under_a_seed(exact):
    model = tiny_gan()

    def run(seed):
        return ratio.rejection_sample(model, 37, torch.Generator().manual_seed(seed), burn_in=64, batch_size=16,
                                      exact=exact)

    (a, stats), (b, again), (c, _) = run(0), run(0), run(1)
    assert a.shape == (37, 1, 28, 28) and torch.equal(a, b) and stats == again and not torch.equal(a, c)
    assert stats["proposals"] >= 37 and stats["acceptance_rate"] == 37 / stats["proposals"]


def test_refining_trains_the_discriminator_alone_towards_the_current_generator():
    model = tiny_gan()
    before = copy.deepcopy(model)
    real = ratio.empirical_sampler(mnist("valid")[0])

    def held_out_loss(m):
        g = torch.Generator().manual_seed(9)
        with torch.no_grad():
            return discriminator_loss(m.discriminator(real(256, g)), m.discriminator(m.generate(256, g)))[0].item()

    logs = ratio.refine_discriminator(model, ratio.refine_training(40, batch_size=32, lr=1e-3))
    assert len(logs["history"]) == 1 and logs["history"][0]["step"] == 40
    for old, new in zip(before.generator.state_dict().values(), model.generator.state_dict().values(), strict=True):
        assert torch.equal(old, new)  # the generator is frozen, BatchNorm statistics included
    assert not torch.equal(before.discriminator.net[1].weight, model.discriminator.net[1].weight)
    assert held_out_loss(model) < held_out_loss(before) - 0.1
    with pytest.raises(ValueError, match="unconditional"):
        ratio.refine_discriminator(SimpleNamespace(conditional=True))


# -- smoke ----------------------------------------------------------------------------------------------


def test_rejection_sample_on_a_tiny_untrained_gan():
    images, stats = ratio.rejection_sample(tiny_gan(), 5, torch.Generator().manual_seed(0), burn_in=100,
                                           batch_size=50)
    assert images.shape == (5, 1, 28, 28) and images.min() >= 0 and images.max() <= 1
    assert 0 < stats["acceptance_rate"] <= 1 and math.isfinite(stats["gamma"]) and math.isfinite(stats["log_m"])
