"""EM (Chapter 16): monotone objectives, closed-form M-steps, the Gaussian mixture against SciPy."""

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from scipy.special import logsumexp
from scipy.stats import bernoulli as scipy_bernoulli
from scipy.stats import beta as scipy_beta
from scipy.stats import dirichlet as scipy_dirichlet
from scipy.stats import multivariate_normal

from agm.data import binarize, mnist
from agm.foundations.mixture import BernoulliMixture, MixtureConfig, e_step, fit_em, initialize, log_prior, m_step
from agm.vae import gmm

F64 = torch.float64


@pytest.fixture(scope="module")
def binary_images():
    x, _ = mnist("train")
    return binarize(x[:1500], torch.Generator().manual_seed(0)).double()


@pytest.fixture(scope="module")
def pca_features():
    x, _ = mnist("train")
    flat = x[:2000].flatten(1).double()
    mean, directions = gmm.pca(flat, 10)
    return (flat - mean) @ directions.T  # (2000, 10)


def random_mixture(k: int, d: int, generator: torch.Generator) -> gmm.GaussianMixture:
    factors = torch.randn(k, d, d, generator=generator, dtype=F64)
    covs = factors @ factors.transpose(1, 2) + 0.1 * torch.eye(d, dtype=F64)
    log_weights = torch.randn(k, generator=generator, dtype=F64).log_softmax(0)
    return gmm.GaussianMixture(log_weights, 4 * torch.randn(k, d, generator=generator, dtype=F64), covs)


# -- the Bernoulli mixture -------------------------------------------------------------------------


@pytest.mark.parametrize("alpha", [0.0, 1.0, 5.0])
def test_bernoulli_em_never_decreases_the_log_posterior(binary_images, alpha):
    model = BernoulliMixture(MixtureConfig(components=8, alpha=alpha, seed=3))
    history = fit_em(model, binary_images, iterations=15, dynamic=False, log_posterior=True)
    steps = np.diff(history)
    assert (steps >= -1e-9).all(), steps
    assert history[-1] > history[0] + 10


def test_log_posterior_history_is_log_likelihood_plus_log_prior(binary_images):
    x = binary_images[:400]

    def run(iterations, log_posterior=False):
        model = BernoulliMixture(MixtureConfig(components=5, alpha=2.0, seed=1))
        return model, fit_em(model, x, iterations, dynamic=False, log_posterior=log_posterior)

    after_two, _ = run(2)  # theta^2
    _, plain = run(3)
    _, posterior = run(3, log_posterior=True)
    assert plain[2] == pytest.approx(e_step(after_two, x)[1], rel=1e-12)
    assert posterior[2] - plain[2] == pytest.approx(log_prior(after_two) / len(x), rel=1e-9)


def test_log_prior_matches_scipy(binary_images):
    model = BernoulliMixture(MixtureConfig(components=4, alpha=2.0))
    fit_em(model, binary_images[:300], iterations=2, dynamic=False)
    mu = model.probs.flatten().double().numpy()
    pi = model.log_weights.double().exp().numpy()
    expected = scipy_beta.logpdf(mu, 3.0, 3.0).sum() + scipy_dirichlet.logpdf(pi / pi.sum(), np.ones(4))
    assert log_prior(model) == pytest.approx(expected, rel=1e-10)


def test_bernoulli_e_step_is_bayes_rule(binary_images):
    model = BernoulliMixture(MixtureConfig(components=6, seed=1))
    fit_em(model, binary_images[:500], iterations=3, dynamic=False)
    x = binary_images[500:520]
    resp, mean_log_lik = e_step(model, x)
    mu = model.probs.flatten(1).double().clamp(1e-6, 1 - 1e-6).numpy()
    log_joint = scipy_bernoulli.logpmf(x.flatten(1).numpy()[:, None, :], mu[None]).sum(2) + model.log_weights.numpy()
    expected = np.exp(log_joint - logsumexp(log_joint, axis=1, keepdims=True))
    assert np.allclose(resp.numpy(), expected, rtol=0, atol=1e-12)
    assert torch.allclose(resp.sum(1), torch.ones(len(x), dtype=F64), rtol=0, atol=1e-12)
    assert mean_log_lik == pytest.approx(logsumexp(log_joint, axis=1).mean(), rel=1e-12)


def test_bernoulli_m_step_maximizes_the_map_objective(binary_images):
    alpha = 1.5
    x = binary_images[:600]
    model = BernoulliMixture(MixtureConfig(components=5, alpha=alpha))
    initialize(model, x, torch.Generator().manual_seed(2))
    resp, _ = e_step(model, x)
    log_weights, probs = m_step(x, resp, alpha)
    b = log_weights.clone().requires_grad_(True)
    a = torch.logit(probs.flatten(1)).requires_grad_(True)
    log_mu, log_not_mu = F.logsigmoid(a), F.logsigmoid(-a)
    log_lik = x.flatten(1) @ log_mu.T + (1 - x.flatten(1)) @ log_not_mu.T  # (N, K), written out independently
    objective = (resp * (b.log_softmax(0) + log_lik)).sum() + alpha * (log_mu + log_not_mu).sum()
    grads = torch.autograd.grad(objective, [b, a])
    assert max(g.abs().max().item() for g in grads) < 1e-9


def test_bernoulli_bad_input_raises():
    with pytest.raises(ValueError, match="components"):
        BernoulliMixture(MixtureConfig(components=0))
    model = BernoulliMixture(MixtureConfig(components=2))
    with pytest.raises(ValueError, match="shape"):
        e_step(model, torch.zeros(3, 784))
    x = torch.zeros(5, 1, 28, 28)
    for resp in (torch.ones(4, 2), torch.ones(5)):
        with pytest.raises(ValueError, match="resp"):
            m_step(x, resp, 1.0)


# -- the Gaussian mixture --------------------------------------------------------------------------


def test_gmm_log_density_matches_scipy(generator):
    mixture = random_mixture(3, 4, generator)
    x = 3 * torch.randn(50, 4, generator=generator, dtype=F64)
    ours = gmm.gaussian_log_density(x, mixture.means, mixture.covs)  # (N, K)
    ref = np.stack([multivariate_normal(m.numpy(), c.numpy()).logpdf(x.numpy())
                    for m, c in zip(mixture.means, mixture.covs, strict=True)], 1)
    assert np.allclose(ours.numpy(), ref, rtol=1e-10, atol=1e-10)
    ref_mixture = logsumexp(ref + mixture.log_weights.numpy(), axis=1)
    assert np.allclose(mixture.log_prob(x).numpy(), ref_mixture, rtol=1e-10, atol=1e-10)


def test_gmm_e_step_is_bayes_rule(generator):
    mixture = random_mixture(4, 3, generator)
    x = 3 * torch.randn(40, 3, generator=generator, dtype=F64)
    resp, mean_log_lik = gmm.e_step(mixture, x)
    joint = np.stack([w.item() * multivariate_normal(m.numpy(), c.numpy()).pdf(x.numpy()) for w, m, c in
                      zip(mixture.log_weights.exp(), mixture.means, mixture.covs, strict=True)], 1)
    assert np.allclose(resp.numpy(), joint / joint.sum(1, keepdims=True), rtol=1e-9, atol=1e-12)
    assert torch.allclose(resp.sum(1), torch.ones(len(x), dtype=F64), rtol=0, atol=1e-12)
    assert mean_log_lik == pytest.approx(np.log(joint.sum(1)).mean(), rel=1e-10)


@pytest.mark.parametrize("dim", [2, 10])
def test_gmm_em_never_decreases_the_penalized_log_likelihood(pca_features, dim):
    x = pca_features[:, :dim].contiguous()
    _, history = gmm.fit_em(x, gmm.GMMConfig(components=6, iterations=25, reg=1e-2), log_posterior=True)
    steps = np.diff(history)
    assert (steps >= -1e-9).all(), steps
    assert history[-1] > history[0] + 0.1


def test_gmm_em_without_penalty_never_decreases_the_log_likelihood(generator):
    truth = random_mixture(3, 2, generator)
    x, _ = truth.sample(3000, generator)
    model, history = gmm.fit_em(x, gmm.GMMConfig(components=3, iterations=40, reg=0.0, seed=4))
    assert (np.diff(history) >= -1e-9).all()
    # the maximum-likelihood fit explains its own training data at least as well as the true parameters
    assert model.log_prob(x).mean().item() >= truth.log_prob(x).mean().item() - 1e-3


def test_gmm_penalty_is_the_negative_half_trace_of_the_precisions(generator):
    mixture = random_mixture(3, 4, generator)
    expected = -0.5 * 0.7 * sum(np.trace(np.linalg.inv(c.numpy())) for c in mixture.covs)
    assert gmm.log_prior(mixture, 0.7) == pytest.approx(expected, rel=1e-10)


@pytest.mark.parametrize("reg", [0.0, 0.5])
def test_gmm_one_component_is_the_gaussian_fit(generator, reg):
    x = torch.randn(500, 3, generator=generator, dtype=F64) @ torch.randn(3, 3, generator=generator, dtype=F64) + 1
    model, _ = gmm.fit_em(x, gmm.GMMConfig(components=1, iterations=2, reg=reg))
    mean = x.mean(0)
    cov = ((x - mean).T @ (x - mean) + reg * torch.eye(3, dtype=F64)) / len(x)
    assert torch.allclose(model.means[0], mean, atol=1e-12) and torch.allclose(model.covs[0], cov, atol=1e-12)
    ref = multivariate_normal(mean.numpy(), cov.numpy()).logpdf(x.numpy())
    assert np.allclose(model.log_prob(x).numpy(), ref, rtol=1e-10)


def test_gmm_m_step_is_a_stationary_point(generator):
    reg = 0.3
    mixture = random_mixture(3, 3, generator)
    x, _ = mixture.sample(300, generator)
    resp, _ = gmm.e_step(mixture, x)
    fitted = gmm.m_step(x, resp, reg)
    params = [p.clone().requires_grad_(True) for p in (fitted.log_weights, fitted.means, fitted.covs)]
    logits, means, covs = params
    value = (resp * (logits.log_softmax(0) + gmm.gaussian_log_density(x, means, covs))).sum() \
        - 0.5 * reg * torch.linalg.inv(covs).diagonal(dim1=1, dim2=2).sum()
    grads = torch.autograd.grad(value, params)
    assert max(g.abs().max().item() for g in grads) < 1e-9


def test_gmm_samples_are_seeded_and_have_the_mixture_mean(generator):
    mixture = random_mixture(2, 2, generator)
    a, za = mixture.sample(20_000, torch.Generator().manual_seed(1))
    b, zb = mixture.sample(20_000, torch.Generator().manual_seed(1))
    assert torch.equal(a, b) and torch.equal(za, zb) and a.shape == (20_000, 2)
    expected = mixture.log_weights.exp() @ mixture.means
    se = a.std(0) / math.sqrt(len(a))
    assert ((a.mean(0) - expected).abs() < 5 * se).all()


def test_pca_gives_orthonormal_decorrelating_directions(generator):
    x = torch.randn(400, 6, generator=generator, dtype=F64) @ torch.randn(6, 6, generator=generator, dtype=F64)
    mean, directions = gmm.pca(x, 6)
    assert torch.allclose(directions @ directions.T, torch.eye(6, dtype=F64), atol=1e-12)
    features = (x - mean) @ directions.T
    cov = features.T.cov()
    assert torch.allclose(cov, torch.diag(cov.diagonal()), atol=1e-9)
    assert (cov.diagonal().diff() <= 1e-9).all()
    assert torch.allclose(features @ directions + mean, x, atol=1e-10)


def test_gmm_bad_input_raises(generator):
    with pytest.raises(ValueError, match="components"):
        gmm.GMMConfig(components=0)
    with pytest.raises(ValueError, match="reg"):
        gmm.GMMConfig(reg=-1.0)
    mixture = random_mixture(2, 3, generator)
    with pytest.raises(ValueError, match="shape"):
        mixture.log_prob(torch.zeros(5, dtype=F64))
    with pytest.raises(ValueError, match="features"):
        mixture.log_prob(torch.zeros(5, 4, dtype=F64))
    with pytest.raises(ValueError, match="float64"):
        mixture.log_prob(torch.zeros(5, 3))
    x = torch.zeros(5, 3, dtype=F64)
    with pytest.raises(ValueError, match="resp"):
        gmm.m_step(x, torch.ones(4, 2, dtype=F64), 0.1)
    with pytest.raises(ValueError, match="reg"):
        gmm.m_step(x, torch.ones(5, 2, dtype=F64), -0.1)
    with pytest.raises(ValueError, match="covs"):
        gmm.GaussianMixture(torch.zeros(2, dtype=F64), torch.zeros(2, 3, dtype=F64), torch.zeros(3, 3, 3, dtype=F64))
    with pytest.raises(ValueError, match="components"):
        gmm.initialize(x[:2], gmm.GMMConfig(components=5), generator)
    with pytest.raises(ValueError, match="dim"):
        gmm.pca(x, 0)
