"""Chapter 1's models against closed forms and direct computations."""

import itertools
import math

import pytest
import torch
from scipy.special import logsumexp
from scipy.stats import bernoulli as scipy_bernoulli

from agm import registry
from agm.data import binarize, mnist
from agm.distributions import bernoulli_log_prob
from agm.foundations.bernoulli import BernoulliConfig, IndependentBernoulli, zero_probability_images
from agm.foundations.mixture import BernoulliMixture, MixtureConfig, e_step, fit_em, m_step


@pytest.fixture(scope="module")
def images():
    x, _ = mnist("train")
    return x[:3000]


def test_bernoulli_mle_is_the_pixel_mean(images):
    model = IndependentBernoulli(BernoulliConfig(alpha=0.0)).fit(images)
    assert torch.allclose(model.probs, images.mean(0), atol=1e-6)


def test_bernoulli_smoothing_is_add_alpha(images):
    model = IndependentBernoulli(BernoulliConfig(alpha=2.0)).fit(images)
    expected = (images.sum(0) + 2.0) / (len(images) + 4.0)
    assert torch.allclose(model.probs, expected)
    assert model.probs.min() > 0 and model.probs.max() < 1


def test_bernoulli_log_prob_matches_scipy(images, generator):
    model = IndependentBernoulli(BernoulliConfig()).fit(images)
    x = binarize(images[:5], generator)
    ours = model.log_prob(x).double()
    ref = scipy_bernoulli.logpmf(x.flatten(1).numpy(), model.probs.flatten().double().numpy()).sum(1)
    assert torch.allclose(ours, torch.from_numpy(ref), rtol=1e-5)


def test_bernoulli_samples_have_the_model_marginals(images, generator):
    model = IndependentBernoulli(BernoulliConfig()).fit(images)
    s = model.sample(4000, generator)
    assert set(s.unique().tolist()) <= {0.0, 1.0} and s.shape == (4000, 1, 28, 28)
    se = (model.probs * (1 - model.probs) / 4000).sqrt()
    assert ((s.mean(0) - model.probs).abs() <= 5 * se + 1e-6).all()


def test_mixture_log_prob_matches_direct_computation(images, generator):
    model = BernoulliMixture(MixtureConfig(components=4))
    fit_em(model, images, iterations=3, generator=generator)
    x = binarize(images[:6], generator)
    mu = model.probs.flatten(1).double().clamp(1e-6, 1 - 1e-6).numpy()
    xs = x.flatten(1).double().numpy()
    per_component = scipy_bernoulli.logpmf(xs[:, None, :], mu[None]).sum(2) + model.log_weights.double().numpy()
    ref = logsumexp(per_component, axis=1)
    assert torch.allclose(model.log_prob(x).double(), torch.from_numpy(ref), rtol=1e-5)


def test_e_step_gives_a_posterior(images, generator):
    model = BernoulliMixture(MixtureConfig(components=5))
    fit_em(model, images, iterations=2, generator=generator)
    resp, _ = e_step(model, binarize(images[:100], generator))
    assert torch.allclose(resp.sum(1), torch.ones(100), atol=1e-5) and (resp >= 0).all()


def test_one_component_m_step_is_the_bernoulli_fit(images):
    resp = torch.ones(len(images), 1)
    log_weights, probs = m_step(images, resp, alpha=1.0)
    single = IndependentBernoulli(BernoulliConfig(alpha=1.0)).fit(images)
    assert torch.allclose(log_weights, torch.zeros(1)) and torch.allclose(probs[0], single.probs, atol=1e-6)


def test_em_never_decreases_the_log_likelihood_on_fixed_data(images, generator):
    x = binarize(images, generator)
    model = BernoulliMixture(MixtureConfig(components=10))
    history = fit_em(model, x, iterations=15, dynamic=False, generator=generator)
    steps = torch.tensor(history).diff()
    assert (steps >= -1e-4).all(), steps
    assert history[-1] > history[0] + 10


def test_em_is_deterministic_under_a_seed(images):
    runs = []
    for _ in range(2):
        model = BernoulliMixture(MixtureConfig(components=3, seed=7))
        runs.append(fit_em(model, images[:500], iterations=2))
    assert runs[0] == runs[1]


def test_mixture_samples_are_binary_and_seeded(images):
    model = BernoulliMixture(MixtureConfig(components=3))
    fit_em(model, images[:500], iterations=2)
    a = model.sample(16, torch.Generator().manual_seed(1))
    b = model.sample(16, torch.Generator().manual_seed(1))
    assert torch.equal(a, b) and set(a.unique().tolist()) <= {0.0, 1.0}


@pytest.mark.parametrize("bad", [torch.zeros(3, 784), torch.zeros(3, 1, 14, 14), torch.full((2, 1, 28, 28), -1.0)])
def test_models_reject_bad_images(bad):
    with pytest.raises(ValueError):
        IndependentBernoulli(BernoulliConfig()).log_prob(bad)
    with pytest.raises(ValueError):
        BernoulliMixture(MixtureConfig(components=2)).log_prob(bad)
    with pytest.raises(ValueError, match="components"):
        BernoulliMixture(MixtureConfig(components=0))


def test_log_prob_of_gray_levels_is_the_expected_log_likelihood_over_binarizations(generator):
    """Chapter 1's L-BFGS check and its Monte Carlo check score gray levels: E_{x ~ Bern(g)}[log p(x)], enumerated."""
    g = torch.rand(3, 4, generator=generator, dtype=torch.float64)  # 3 gray images of 4 pixels
    probs = torch.rand(4, generator=generator, dtype=torch.float64)
    states = torch.tensor(list(itertools.product([0.0, 1.0], repeat=4)), dtype=torch.float64)  # (16, 4)
    weight = (states * g[:, None].log() + (1 - states) * (1 - g[:, None]).log()).sum(-1).exp()  # (3, 16): P(x | g)
    log_p = (states * probs.log() + (1 - states) * (1 - probs).log()).sum(-1)  # (16,)
    assert torch.allclose(bernoulli_log_prob(g, probs), (weight * log_p).sum(1), rtol=1e-12)


def test_zero_probability_images_are_those_the_unsmoothed_mle_scores_minus_infinity(generator):
    x_fit = torch.bernoulli(torch.full((50, 1, 28, 28), 0.5), generator=generator)
    x_fit[:, :, :3] = 0  # rows 0-2 never inked in training
    x_fit[:, :, 27, 27] = 1  # one pixel always inked
    x_test = torch.bernoulli(torch.full((400, 1, 28, 28), 0.5), generator=generator)
    x_test[:, :, :3] = 0
    x_test[:, :, 27, 27] = 1
    x_test[:40, :, 1, 5] = 1  # these ink a never-inked pixel
    x_test[30:60, :, 27, 27] = 0  # these leave the always-inked pixel blank
    never, impossible = zero_probability_images(x_fit, x_test)
    assert torch.equal(never, x_fit.sum(0) == 0) and int(never.sum()) == 3 * 28
    log_p = IndependentBernoulli(BernoulliConfig(alpha=0.0)).fit(x_fit).log_prob(x_test)
    assert torch.equal(impossible, torch.isneginf(log_p)) and int(impossible.sum()) == 60
    # with the real digits: fit on few images, some binarized test digits get probability zero
    x_train, _ = mnist("train")
    x_bin = binarize(mnist("test")[0][:2000], torch.Generator().manual_seed(0))
    never, impossible = zero_probability_images(x_train[:1000], x_bin)
    mle = IndependentBernoulli(BernoulliConfig(alpha=0.0)).fit(x_train[:1000])
    assert never.sum() > 0 and torch.equal(impossible, torch.isneginf(mle.log_prob(x_bin)))


def test_fair_coin_costs_784_ln2_nats():
    model = IndependentBernoulli(BernoulliConfig())
    x = torch.bernoulli(torch.full((4, 1, 28, 28), 0.3))
    assert torch.allclose(model.log_prob(x), torch.full((4,), -784 * math.log(2)))


@pytest.mark.parametrize("name", ["bernoulli", "bernoulli-mixture"])
def test_shipped_checkpoint_reproduces_its_manifest_metrics(name):
    spec = registry.get(name)
    model, manifest = registry.load_model(name)
    metrics = spec.evaluate(model)
    for key, value in metrics.items():
        assert manifest.metrics[key] == pytest.approx(value, rel=1e-6), key


def test_em_trace_is_fit_em_with_each_step_measured(images):
    """The trace's log-likelihoods are fit_em's, and the MAP-EM chain holds at every iteration."""
    from agm.foundations.mixture import em_trace, fit_em, initialize

    x = torch.bernoulli(images.double(), generator=torch.Generator().manual_seed(0))
    config = MixtureConfig(components=4, alpha=1.0, seed=0)
    model = BernoulliMixture(config)
    initialize(model, x, torch.Generator().manual_seed(config.seed))
    rows = em_trace(model, x, 6)
    history = fit_em(BernoulliMixture(config), x, 6, dynamic=False)
    assert [r["log_lik"] for r in rows] == pytest.approx(history, abs=1e-9)
    for r in rows:
        assert r["elbo_e"] == pytest.approx(r["log_lik"], abs=1e-9)  # the E-step closes the gap
        assert r["log_lik"] + r["log_prior"] <= r["elbo_m"] + r["log_prior_next"] + 1e-9  # the M-step
        assert r["elbo_m"] <= r["log_lik_next"] + 1e-9  # Jensen
    for earlier, later in zip(rows, rows[1:], strict=False):
        assert later["log_lik"] == pytest.approx(earlier["log_lik_next"], abs=1e-9)


def test_m_step_is_the_stationary_point_of_its_objective(images):
    from agm.foundations.mixture import initialize, m_step_objective

    x = torch.bernoulli(images.double(), generator=torch.Generator().manual_seed(0))
    model = BernoulliMixture(MixtureConfig(components=3, alpha=1.0))
    initialize(model, x, torch.Generator().manual_seed(1))
    resp, _ = e_step(model, x)
    log_weights, probs = m_step(x, resp, 1.0)
    b = log_weights.clone().requires_grad_(True)
    a = torch.logit(probs.flatten(1)).requires_grad_(True)
    grads = torch.autograd.grad(m_step_objective(x, resp, b, a, 1.0), [b, a])
    assert max(g.abs().max().item() for g in grads) < 1e-8 * len(x)
