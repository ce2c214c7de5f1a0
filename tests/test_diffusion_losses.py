"""DDPM objectives against closed forms (Chapters 26–28)."""

import math

import pytest
import torch
from torch.distributions import Normal, kl_divergence

from agm.diffusion import losses
from agm.diffusion.schedule import NoiseSchedule, ScheduleConfig
from agm.diffusion.toy import LinearGaussianReverse


@pytest.fixture
def batch(generator):
    x0 = (torch.randint(0, 256, (3, 1, 28, 28), generator=generator).double() / 255) * 2 - 1
    eps = torch.randn(x0.shape, generator=generator, dtype=torch.float64)
    eps_pred = eps + 0.3 * torch.randn(x0.shape, generator=generator, dtype=torch.float64)
    return x0, eps, eps_pred


def test_gaussian_kl_matches_torch_distributions(generator):
    m1, m2 = torch.randn(50, generator=generator), torch.randn(50, generator=generator)
    lv1, lv2 = torch.randn(50, generator=generator), torch.randn(50, generator=generator)
    ref = kl_divergence(Normal(m1, (0.5 * lv1).exp()), Normal(m2, (0.5 * lv2).exp()))
    assert torch.allclose(losses.gaussian_kl(m1, lv1, m2, lv2), ref, atol=1e-5)


def test_prior_term_closed_form(batch):
    s = NoiseSchedule()
    x0 = batch[0]
    a = s.alphas_cumprod[-1]
    per_pixel = 0.5 * (-torch.log(1 - a) + (1 - a) + a * x0**2 - 1)
    assert torch.allclose(losses.prior_term(s, x0), per_pixel.flatten(1).sum(1))
    assert (losses.prior_term(s, x0) < 0.05).all()  # x_T is nearly N(0, I): L_T is tiny


def test_discretized_decoder_is_a_distribution_over_the_256_levels():
    levels = (torch.arange(256, dtype=torch.float64) / 255 * 2 - 1).view(256, 1, 1, 1)
    for mean, log_scale in [(0.1, math.log(0.01)), (-0.95, math.log(0.3)), (0.5, math.log(2.0))]:
        logp = losses.discretized_gaussian_log_likelihood(
            levels, torch.full_like(levels, mean), torch.full_like(levels, log_scale))
        assert logp.exp().sum().item() == pytest.approx(1.0, abs=1e-6)


@pytest.mark.parametrize("kind", ["linear", "cosine"])
def test_l_t_minus_1_is_a_weighted_eps_mse(kind, batch):
    """Chapter 28: with sigma_t^2 = beta~_t, L_{t-1} = lambda_t ||eps - eps_pred||^2 exactly."""
    s = NoiseSchedule(ScheduleConfig(kind=kind))
    x0, eps, eps_pred = batch
    t = torch.tensor([1, 300, 998])
    xt = s.q_sample(x0, t, eps)
    vlb = losses.vlb_terms(s, eps_pred, x0, xt, t, variance="beta_tilde")
    weighted = losses.eps_mse_weight(s, t, "beta_tilde") * ((eps - eps_pred) ** 2).flatten(1).sum(1)
    assert torch.allclose(vlb, weighted, rtol=1e-6)


def test_with_sigma_beta_the_difference_is_a_network_independent_constant(batch):
    s = NoiseSchedule()
    x0, eps, eps_pred = batch
    t = torch.tensor([5, 5, 5])
    xt = s.q_sample(x0, t, eps)
    w = losses.eps_mse_weight(s, t, "beta")
    gaps = []
    for pred in (eps_pred, eps, -eps):
        mse = ((eps - pred) ** 2).flatten(1).sum(1)
        gaps.append(losses.vlb_terms(s, pred, x0, xt, t, variance="beta") - w * mse)
    assert torch.allclose(gaps[0], gaps[1]) and torch.allclose(gaps[1], gaps[2])
    assert (gaps[0] > 0).all()


def test_decoder_term_at_t0(batch):
    s = NoiseSchedule()
    x0, eps, eps_pred = batch
    t = torch.zeros(3, dtype=torch.long)
    xt = s.q_sample(x0, t, eps)
    perfect = losses.vlb_terms(s, eps, x0, xt, t)
    noisy = losses.vlb_terms(s, eps + 3.0, x0, xt, t)
    assert torch.isfinite(perfect).all() and (perfect > 0).all() and (noisy > perfect).all()


def test_simple_loss():
    eps = torch.randn(4, 1, 28, 28)
    assert losses.simple_loss(eps, eps) == 0
    assert losses.simple_loss(eps + 1, eps).item() == pytest.approx(1.0)


def test_noised_gaussian_mixture_density_and_score_are_exact():
    """The density integrates to 1, matches a histogram of noised draws, and the score is its derivative."""
    from agm.diffusion.toy import GaussianMixture1D

    mix = GaussianMixture1D(torch.tensor([-0.7, 0.6]), torch.tensor([0.15, 0.25]), torch.tensor([0.4, 0.6]))
    abar = 0.7
    grid = torch.linspace(-5, 5, 20_001, dtype=torch.float64)
    density = mix.log_density(grid, abar).exp()
    assert torch.trapezoid(density, grid).item() == pytest.approx(1.0, abs=1e-6)
    g = torch.Generator().manual_seed(0)
    xt = math.sqrt(abar) * mix.sample(200_000, g) + math.sqrt(1 - abar) * torch.randn(200_000, generator=g).double()
    inside = ((xt > 0.0) & (xt < 0.5)).double().mean().item()
    exact = torch.trapezoid(density[(grid > 0) & (grid < 0.5)], grid[(grid > 0) & (grid < 0.5)]).item()
    assert inside == pytest.approx(exact, abs=4 * math.sqrt(exact * (1 - exact) / 200_000) + 1e-3)
    x = torch.linspace(-2, 2, 9, dtype=torch.float64).requires_grad_(True)
    mix.log_density(x, abar).sum().backward()
    assert torch.allclose(mix.score(x.detach(), abar), x.grad, atol=1e-10)
    with pytest.raises(ValueError, match="probability"):
        GaussianMixture1D(torch.tensor([0.0]), torch.tensor([1.0]), torch.tensor([0.5]))


def test_trajectory_elbo_estimates_the_closed_form_bound_of_a_linear_gaussian_reverse():
    """With ε linear in x_t every reverse step is N(a_t x_t + b_t, β_t), whose L_T and L_{t-1} are closed forms.

    Both estimates, one whole trajectory each, must be unbiased for the sum -L_T - sum L_{t-1}.
    """
    s = NoiseSchedule(ScheduleConfig(num_timesteps=20, beta_start=0.01, beta_end=0.3))
    g = torch.Generator().manual_seed(0)
    c = 0.5 + 0.5 * torch.rand(20, generator=g, dtype=torch.float64)
    d = 0.1 * torch.randn(20, generator=g, dtype=torch.float64)
    ab = s.alphas_cumprod
    # the mean coef1 * x0_hat + coef2 * x_t with x0_hat = (x_t - sqrt(1 - ab) (c x_t + d)) / sqrt(ab)
    a = s.posterior_mean_coef1 * (1 - (1 - ab).sqrt() * c) / ab.sqrt() + s.posterior_mean_coef2
    b = -s.posterior_mean_coef1 * (1 - ab).sqrt() * d / ab.sqrt()
    closed = LinearGaussianReverse(a, b, s.betas).bound_terms(s, torch.tensor([-0.8, 0.3, 1.1]))
    truth = -(closed["prior"] + closed["kl"].sum(1))  # (3,)
    n = 20000
    x0 = torch.tensor([-0.8, 0.3, 1.1], dtype=torch.float64).repeat_interleave(n).view(-1, 1, 1, 1)
    out = losses.trajectory_elbo(lambda x, t: c[t].view(-1, 1, 1, 1) * x + d[t].view(-1, 1, 1, 1), s, x0, g)
    for key in ("vae", "kl"):
        per_point = out[key].view(3, n)
        se = per_point.std(1) / math.sqrt(n)
        assert ((per_point.mean(1) - truth).abs() < 5 * se).all(), key
        assert (se < 0.02).all()  # tight enough that a missing or misindexed term would show
