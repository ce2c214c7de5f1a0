"""The ELBO, its gap and the importance-weighted bound on models whose log p(x) is exact."""

import math

import numpy as np
import pytest
import torch
from scipy.special import logsumexp
from scipy.stats import multivariate_normal

from agm.data import binarize, mnist
from agm.distributions import multivariate_gaussian_kl
from agm.foundations.mixture import BernoulliMixture, MixtureConfig, e_step
from agm.vae.bounds import (
    LinearGaussian,
    LinearGaussianConfig,
    chi_square,
    discrete_elbo,
    discrete_elbo_readings,
    discrete_kl,
    discrete_log_weights,
    discrete_posterior,
    iwae_bound_from_log_weights,
    mixed_with_uniform,
    nested_iwae_bounds,
    tempered,
)


@pytest.fixture(scope="module")
def mixture_and_digits():
    """A mixture with random means (in float64) and binarized test digits: a discrete latent, K = 12."""
    g = torch.Generator().manual_seed(0)
    model = BernoulliMixture(MixtureConfig(components=12)).double()
    model.probs = torch.rand(12, 1, 28, 28, generator=g, dtype=torch.float64) * 0.8 + 0.1
    model.log_weights = torch.randn(12, generator=g, dtype=torch.float64).log_softmax(0)
    x, _ = mnist("test")
    return model, binarize(x[:40], g).double()


def proposals(log_post: torch.Tensor, generator: torch.Generator) -> dict[str, torch.Tensor]:
    random_q = torch.randn(log_post.shape, generator=generator, dtype=torch.float64).log_softmax(-1)
    return {"posterior": log_post, "uniform": tempered(log_post, 0.0), "tempered": tempered(log_post, 0.05),
            "mixed": mixed_with_uniform(log_post, 0.3), "random": random_q}


def test_elbo_plus_posterior_kl_is_log_p_exactly(mixture_and_digits, generator):
    model, x = mixture_and_digits
    joint = model.joint_log_probs(x)  # (N, K)
    log_px, log_post = discrete_posterior(joint)
    assert torch.allclose(log_px, torch.from_numpy(logsumexp(joint.numpy(), axis=1)), rtol=0, atol=1e-10)
    for name, log_q in proposals(log_post, generator).items():
        elbo = discrete_elbo(joint, log_q)
        gap = discrete_kl(log_q, log_post)
        assert torch.allclose(elbo + gap, log_px, rtol=0, atol=1e-9 * log_px.abs().max().item()), name
        assert (elbo <= log_px + 1e-9).all(), name
        if name == "posterior":
            assert torch.allclose(elbo, log_px, rtol=0, atol=1e-9) and gap.abs().max() < 1e-9
        else:
            assert (gap > 0).all(), name


def test_posterior_matches_the_e_step(mixture_and_digits):
    model, x = mixture_and_digits
    resp, mean_loglik = e_step(model, x)
    log_px, log_post = discrete_posterior(model.joint_log_probs(x))
    assert torch.allclose(log_post.exp(), resp, atol=1e-12)
    assert log_px.mean().item() == pytest.approx(mean_loglik, rel=1e-12)


def test_the_two_readings_are_the_elbo(mixture_and_digits, generator):
    model, x = mixture_and_digits
    joint = model.joint_log_probs(x)
    log_lik = joint - model.log_weights  # log p(x | k)
    _, log_post = discrete_posterior(joint)
    for log_q in proposals(log_post, generator).values():
        r = discrete_elbo_readings(log_lik, model.log_weights, log_q)
        elbo = discrete_elbo(joint, log_q)
        assert torch.allclose(r["reconstruction"] - r["kl_prior"], elbo, rtol=0, atol=1e-9)
        assert torch.allclose(r["expected_log_joint"] + r["entropy"], elbo, rtol=0, atol=1e-9)
        assert (r["kl_prior"] >= -1e-12).all() and (r["entropy"] >= -1e-12).all()


def test_zero_probability_components_contribute_nothing():
    log_joint = torch.log(torch.tensor([[0.2, 0.1, 0.3]], dtype=torch.float64))
    log_q = torch.log(torch.tensor([[0.5, 0.5, 0.0]], dtype=torch.float64))
    # by hand: 0.5 log(0.2/0.5) + 0.5 log(0.1/0.5)
    assert discrete_elbo(log_joint, log_q).item() == pytest.approx(0.5 * math.log(0.4) + 0.5 * math.log(0.2))
    assert discrete_elbo(log_joint, log_q).item() < math.log(0.6)


def test_chi_square_is_the_relative_variance_of_the_weights(mixture_and_digits, generator):
    model, x = mixture_and_digits
    joint = model.joint_log_probs(x[:5])
    log_px, log_post = discrete_posterior(joint)
    log_q = mixed_with_uniform(log_post, 0.4)
    # exact: Var_q[w] / p(x)^2 with w = p(x, k) / q(k), summed over the K components
    w_rel = (joint - log_q - log_px[:, None]).exp()
    var = (log_q.exp() * (w_rel - 1) ** 2).sum(1)
    assert torch.allclose(chi_square(log_post, log_q), var, rtol=1e-10)
    # and by sampling
    log_w = discrete_log_weights(joint, log_q, 200_000, generator)  # (n, N)
    empirical = (log_w - log_px).exp().var(0)
    assert torch.allclose(empirical, var, rtol=0.05)


def test_log_weights_are_unbiased_for_p_and_their_mean_log_is_the_elbo(mixture_and_digits, generator):
    model, x = mixture_and_digits
    joint = model.joint_log_probs(x[:6])
    log_px, log_post = discrete_posterior(joint)
    log_q = tempered(log_post, 0.02)
    log_w = discrete_log_weights(joint, log_q, 100_000, generator)
    ratio = (log_w - log_px).exp()  # w / p(x): mean 1
    se = ratio.std(0) / math.sqrt(len(ratio))
    assert ((ratio.mean(0) - 1).abs() < 4 * se + 1e-12).all()
    elbo_mc, elbo_se = log_w.mean(0), log_w.std(0) / math.sqrt(len(log_w))
    assert ((elbo_mc - discrete_elbo(joint, log_q)).abs() < 4 * elbo_se + 1e-12).all()


def test_iwae_bound_increases_with_k_and_stays_below_log_p(mixture_and_digits, generator):
    model, x = mixture_and_digits
    joint = model.joint_log_probs(x)
    log_px, log_post = discrete_posterior(joint)
    log_q = mixed_with_uniform(log_post, 0.6)  # a poor q: the ELBO is far below log p(x)
    reps, k_max, ks = 400, 64, [1, 2, 4, 8, 16, 64]
    log_w = discrete_log_weights(joint, log_q, reps * k_max, generator).view(reps, k_max, -1).transpose(0, 1)
    bounds = nested_iwae_bounds(log_w, ks).mean(-1)  # (len(ks), reps): averaged over the digits
    mean, se = bounds.mean(1), bounds.std(1) / math.sqrt(reps)
    elbo = discrete_elbo(joint, log_q).mean()
    assert abs(mean[0] - elbo) < 4 * se[0]  # L_1 is the ELBO
    steps = bounds[1:] - bounds[:-1]  # paired differences, one per repetition
    assert (steps.mean(1) > -3 * steps.std(1) / math.sqrt(reps)).all()
    assert mean[1] > mean[0] + 1.0  # the first doublings gain a lot here
    assert (mean <= log_px.mean() + 3 * se).all()
    assert log_px.mean() - mean[-1] < 0.1 * (log_px.mean() - elbo)


def test_iwae_bound_from_log_weights_against_numpy_and_constant_weights(generator):
    log_w = torch.randn(7, 3, 5, generator=generator, dtype=torch.float64) * 4
    ref = logsumexp(log_w.numpy(), axis=0) - math.log(7)
    assert np.allclose(iwae_bound_from_log_weights(log_w).numpy(), ref, atol=1e-12)
    constant = torch.full((9, 4), -3.25, dtype=torch.float64)  # q = posterior: every w_i = p(x)
    assert torch.allclose(iwae_bound_from_log_weights(constant), torch.full((4,), -3.25, dtype=torch.float64))
    nested = nested_iwae_bounds(log_w, [1, 3, 7])
    for row, k in zip(nested, [1, 3, 7], strict=True):
        assert torch.allclose(row, iwae_bound_from_log_weights(log_w[:k]), atol=1e-12)


def test_linear_gaussian_marginal_against_scipy_and_samples(generator):
    model = LinearGaussian(LinearGaussianConfig(latent_dim=3, data_dim=4, noise_std=0.7, seed=1))
    W, b, var = model.W.numpy(), model.b.numpy(), model.var
    x, _ = model.sample(6, generator)
    ref = multivariate_normal(mean=b, cov=W @ W.T + var * np.eye(4)).logpdf(x.numpy())
    assert np.allclose(model.log_marginal(x).numpy(), ref, atol=1e-10)
    xs, _ = model.sample(200_000, generator)
    mean, cov = model.marginal()
    assert torch.allclose(xs.mean(0), mean, atol=0.02)
    assert torch.allclose(torch.cov(xs.T), cov, atol=0.05 * cov.abs().max().item())


def test_linear_gaussian_posterior_is_bayes_rule_with_scipy(generator):
    model = LinearGaussian(LinearGaussianConfig(latent_dim=2, data_dim=5, noise_std=0.5, seed=2))
    W, b, var = model.W.numpy(), model.b.numpy(), model.var
    x, _ = model.sample(3, generator)
    post_mean, post_cov = model.posterior(x)
    log_px = multivariate_normal(mean=b, cov=W @ W.T + var * np.eye(5)).logpdf(x.numpy())
    rng = np.random.default_rng(0)
    for _ in range(5):
        z = rng.normal(size=2)
        for n in range(3):
            # Bayes: log p(z|x) = log p(z) + log p(x|z) - log p(x), all three from scipy
            bayes = (multivariate_normal(np.zeros(2), np.eye(2)).logpdf(z)
                     + multivariate_normal(W @ z + b, var * np.eye(5)).logpdf(x[n].numpy()) - log_px[n])
            ours = multivariate_normal(post_mean[n].numpy(), post_cov.numpy()).logpdf(z)
            assert ours == pytest.approx(bayes, abs=1e-10)
            joint = model.log_joint(x[n : n + 1], torch.from_numpy(z)[None]).item()
            assert joint - log_px[n] == pytest.approx(bayes, abs=1e-10)


def test_linear_gaussian_elbo_gap_is_the_kl_and_matches_monte_carlo(generator):
    model = LinearGaussian(LinearGaussianConfig(seed=3))
    x, _ = model.sample(4, generator)
    post_mean, post_cov = model.posterior(x)
    log_px = model.log_marginal(x)
    assert torch.allclose(model.elbo(x, post_mean, post_cov), log_px, rtol=0, atol=1e-10)
    q_mean, q_cov = post_mean + 0.4, torch.diag(torch.tensor([0.3, 1.5], dtype=torch.float64))
    elbo = model.elbo(x, q_mean, q_cov)
    kl = multivariate_gaussian_kl(q_mean, q_cov, post_mean, post_cov)
    assert torch.allclose(elbo + kl, log_px, rtol=0, atol=1e-10) and (kl > 0).all()
    ref = torch.distributions.kl_divergence(torch.distributions.MultivariateNormal(q_mean, q_cov),
                                            torch.distributions.MultivariateNormal(post_mean, post_cov))
    assert torch.allclose(kl, ref, atol=1e-10)
    log_w = model.log_weights(x, q_mean, q_cov, 100_000, generator)  # (n, N)
    se = log_w.std(0) / math.sqrt(len(log_w))
    assert ((log_w.mean(0) - elbo).abs() < 4 * se).all()
    l_10 = iwae_bound_from_log_weights(log_w.view(10, -1, 4)).mean(0)  # 10 000 draws of L_10
    assert (l_10 > elbo).all() and (l_10 < log_px).all()


def test_bad_inputs_raise_clear_errors(generator):
    with pytest.raises(ValueError, match="k >= 1"):
        iwae_bound_from_log_weights(torch.zeros(0, 3))
    with pytest.raises(ValueError, match="1 <= k"):
        nested_iwae_bounds(torch.zeros(5, 2), [0, 2])
    with pytest.raises(ValueError, match="1 <= k"):
        nested_iwae_bounds(torch.zeros(5, 2), [1, 6])
    log_joint = torch.zeros(2, 3, dtype=torch.float64)
    with pytest.raises(ValueError, match="sum to one"):
        discrete_elbo(log_joint, torch.zeros(2, 3, dtype=torch.float64))
    with pytest.raises(ValueError, match="n >= 1"):
        discrete_log_weights(log_joint, log_joint.log_softmax(-1), 0, generator)
    with pytest.raises(ValueError, match="tau"):
        tempered(log_joint, -1.0)
    with pytest.raises(ValueError, match="lam"):
        mixed_with_uniform(log_joint, 1.5)
    with pytest.raises(ValueError, match="noise_std"):
        LinearGaussian(LinearGaussianConfig(noise_std=0.0))
    model = LinearGaussian(LinearGaussianConfig())
    with pytest.raises(ValueError, match="n >= 1"):
        model.log_weights(torch.zeros(1, 5, dtype=torch.float64), torch.zeros(1, 2, dtype=torch.float64),
                          torch.eye(2, dtype=torch.float64), 0)
