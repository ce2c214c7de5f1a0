"""The score-function and reparameterization estimators against closed forms, and against each other."""

import functools
import math

import pytest
import torch

from agm.data import binarize, mnist
from agm.vae.estimators import (
    reparameterization_gradient,
    score_function_gradient,
    summarize,
)
from agm.vae.vae import VAE, VAEConfig, reconstruction_log_likelihood

MU = torch.tensor([0.5, -1.0, 1.5], dtype=torch.float64)
LOG_SIGMA = torch.tensor([0.8, 1.0, 0.8], dtype=torch.float64).log()
A = 0.7


def square(z):
    return (z**2).sum(-1)


def exponential(z):
    return torch.exp(A * z).sum(-1)


def exact_gradient(expectation, mu, log_sigma):
    """The oracle: autograd through the closed-form expectation E_q[f](mu, log sigma)."""
    mu, log_sigma = mu.clone().requires_grad_(True), log_sigma.clone().requires_grad_(True)
    return torch.autograd.grad(expectation(mu, log_sigma), (mu, log_sigma))


CASES = {
    # E[z^2] = mu^2 + sigma^2
    "square": (square, lambda m, s: (m**2 + (2 * s).exp()).sum()),
    # E[exp(a z)] = exp(a mu + a^2 sigma^2 / 2)
    "exp": (exponential, lambda m, s: torch.exp(A * m + 0.5 * A**2 * (2 * s).exp()).sum()),
}


def estimate(kind, f, n, seed, **kw):
    g = torch.Generator().manual_seed(seed)
    if kind == "reparameterization":
        return reparameterization_gradient(f, MU, LOG_SIGMA, n, g)
    return score_function_gradient(f, MU, LOG_SIGMA, n, g, **kw)


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("kind", ["reparameterization", "score", "score+baseline"])
def test_means_match_the_closed_form_gradient(case, kind):
    f, expectation = CASES[case]
    kw = {"baseline": 5.0} if kind == "score+baseline" else {}
    grads = estimate(kind.split("+")[0], f, 200_000, 1, **kw)
    for sample, exact in zip(grads, exact_gradient(expectation, MU, LOG_SIGMA), strict=True):
        s = summarize(sample)
        # the tolerance is tight enough that a wrong sign or a missing factor 2 fails
        assert torch.all(5 * s.standard_error < 0.5 * exact.abs())
        assert torch.all((s.mean - exact).abs() < 5 * s.standard_error), (s.mean, exact)


def test_gaussian_scores_match_autograd_of_the_log_density():
    """The closed-form scores eps/sigma and eps^2 - 1, recovered from one draw with b = f - 1."""
    g = torch.Generator().manual_seed(0)
    draws = score_function_gradient(lambda z: torch.ones(z.shape[:-1], dtype=z.dtype), MU, LOG_SIGMA, 5, g)
    eps = torch.randn((5, 3), generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    mu, log_sigma = MU.clone().requires_grad_(True), LOG_SIGMA.clone().requires_grad_(True)
    z = (MU + LOG_SIGMA.exp() * eps).detach()
    log_q = torch.distributions.Normal(mu, log_sigma.exp()).log_prob(z).sum()
    d_mu, d_log_sigma = torch.autograd.grad(log_q, (mu, log_sigma))
    assert torch.allclose(draws.mu.sum(0), d_mu) and torch.allclose(draws.log_sigma.sum(0), d_log_sigma)


@pytest.mark.parametrize("dim", [1, 5])
def test_variances_match_the_closed_forms_and_reparameterization_is_smaller(dim):
    """Per-draw variances for f = |z|^2 at mu = 0 (the chapter's proposition)."""
    sigma, n = 0.8, 400_000
    mu, log_sigma = torch.zeros(dim, dtype=torch.float64), torch.full((dim,), math.log(sigma), dtype=torch.float64)
    g = torch.Generator().manual_seed(2)
    rp = reparameterization_gradient(square, mu, log_sigma, n, g)
    sf = score_function_gradient(square, mu, log_sigma, n, g)
    sfb = score_function_gradient(square, mu, log_sigma, n, g, baseline=dim * sigma**2)
    d, s2 = dim, sigma**2
    expected = {
        "rp": (4 * s2, 8 * s2**2),
        "sf": (s2 * (d + 2) * (d + 4), 2 * s2**2 * (d * d + 10 * d + 26)),
        "sfb": (s2 * (2 * d + 8), s2**2 * (4 * d + 52)),
    }
    for name, grads in {"rp": rp, "sf": sf, "sfb": sfb}.items():
        for sample, value in zip(grads, expected[name], strict=True):
            s = summarize(sample)
            assert torch.all((s.variance - value).abs() < 5 * s.variance_standard_error), (name, s.variance, value)
    for r, f, fb in zip(rp, sf, sfb, strict=True):
        assert torch.all(summarize(r).variance < summarize(fb).variance)
        assert torch.all(summarize(fb).variance < summarize(f).variance)


def test_a_baseline_leaves_the_mean_unchanged():
    """Same draws with and without b: the difference -b * score has mean zero, and b = E f lowers the variance."""
    plain = estimate("score", square, 100_000, 3)
    shifted = estimate("score", square, 100_000, 3, baseline=5.0)  # near E f = 0.25 + 0.64 + 1 + 1 + 2.25 + 0.64
    for a, b in zip(plain, shifted, strict=True):
        diff = summarize(b - a)
        assert torch.all(diff.mean.abs() < 5 * diff.standard_error)
        assert torch.all(diff.standard_error > 0)  # the baseline did change every draw
        assert torch.all(summarize(b).variance < summarize(a).variance)


def test_reparameterization_is_biased_for_a_step_function_and_the_score_function_is_not():
    """f = 1[z > 0] has zero derivative almost everywhere, yet d/dmu P(z > 0) = phi(mu / sigma) / sigma."""
    mu, log_sigma = torch.tensor([0.3], dtype=torch.float64), torch.tensor([0.0], dtype=torch.float64)
    step = lambda z: (z[..., 0] > 0).to(z.dtype)  # noqa: E731
    exact = math.exp(-0.5 * 0.3**2) / math.sqrt(2 * math.pi)
    g = torch.Generator().manual_seed(4)
    assert torch.all(reparameterization_gradient(step, mu, log_sigma, 1000, g).mu == 0)
    s = summarize(score_function_gradient(step, mu, log_sigma, 100_000, g, baseline=0.5).mu)
    assert abs(s.mean.item() - exact) < 5 * s.standard_error.item() < 0.1 * exact


@pytest.fixture(scope="module")
def small_vae():
    torch.manual_seed(0)
    model = VAE(VAEConfig(latent_dim=4, hidden=(32,))).eval()
    x, _ = mnist("test")
    return model, binarize(x[:4], torch.Generator().manual_seed(0))


def test_the_two_estimators_agree_in_expectation_on_a_vae_reconstruction_term(small_vae):
    model, x = small_vae
    with torch.no_grad():
        mu, logvar = model.encode(x)  # (4, 4) each

    reconstruction = functools.partial(reconstruction_log_likelihood, model, x)  # (n, 4, 4) -> (n, 4)
    g = torch.Generator().manual_seed(5)
    log_sigma = 0.5 * logvar
    with torch.no_grad():
        baseline = reconstruction(mu + log_sigma.exp() * torch.randn((200, *mu.shape), generator=g)).mean(0)
    rp = reparameterization_gradient(reconstruction, mu, log_sigma, 2000, g)
    sf = score_function_gradient(reconstruction, mu, log_sigma, 10_000, g, baseline=baseline)
    for a, b in zip(rp, sf, strict=True):
        sa, sb = summarize(a), summarize(b)
        se = (sa.standard_error**2 + sb.standard_error**2).sqrt()
        assert torch.all((sa.mean - sb.mean).abs() < 5 * se)
        # the test has power: flipping the sign of the score-function estimate is detected
        assert ((sa.mean + sb.mean).abs() > 5 * se).float().mean() > 0.5
        assert torch.all(sa.variance < sb.variance)


def test_bad_inputs_raise_clear_errors():
    with pytest.raises(ValueError, match="n >= 1"):
        score_function_gradient(square, MU, LOG_SIGMA, 0)
    with pytest.raises(ValueError, match="n >= 1"):
        reparameterization_gradient(square, MU, LOG_SIGMA, -1)
    with pytest.raises(ValueError, match="same shape"):
        reparameterization_gradient(square, MU, LOG_SIGMA[:2], 10)
    with pytest.raises(ValueError, match="same shape"):
        score_function_gradient(square, torch.tensor(0.0), torch.tensor(0.0), 10)
    with pytest.raises(ValueError, match="one value per draw"):
        score_function_gradient(lambda z: z**2, MU, LOG_SIGMA, 10)
    with pytest.raises(ValueError, match="one value per draw"):
        reparameterization_gradient(lambda z: (z**2).sum(), MU, LOG_SIGMA, 10)
    with pytest.raises(ValueError, match="at least 2 draws"):
        summarize(torch.zeros(1, 3))
