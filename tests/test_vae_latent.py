"""Quadrature on a latent grid against importance sampling and Bayes' rule (Chapter 21)."""

import math

import pytest
import torch

from agm.data import binarize, mnist
from agm.vae.latent import (
    box_grid,
    grid_log_joint,
    grid_log_marginal,
    grid_moments,
    grid_posterior,
    latent_grid,
    refined_log_marginal,
)
from agm.vae.vae import VAE, VAEConfig, bernoulli_log_likelihood, importance_sampled_log_likelihood


@pytest.fixture(scope="module")
def model_and_digits():
    torch.manual_seed(0)
    model = VAE(VAEConfig(latent_dim=2, hidden=(32,))).eval()
    x, _ = mnist("test")
    return model, binarize(x[:4], torch.Generator().manual_seed(0))


def test_quadrature_matches_importance_sampling(model_and_digits):
    model, x = model_and_digits
    z, area = latent_grid(limit=6.0, size=241)
    exact = grid_log_marginal(grid_log_joint(model, x, z), area)
    sampled = importance_sampled_log_likelihood(model, x, k=20_000, chunk=5000,
                                                generator=torch.Generator().manual_seed(1))
    assert torch.allclose(exact, sampled, atol=0.05)


def test_quadrature_of_the_prior_alone_is_one():
    z, area = latent_grid(limit=6.0, size=121)
    log_prior = -0.5 * (z**2).sum(-1) - math.log(2 * math.pi)
    assert grid_log_marginal(log_prior[None], area).exp().item() == pytest.approx(1.0, abs=1e-4)


def test_posterior_is_bayes_rule_and_a_mask_drops_pixels(model_and_digits):
    model, x = model_and_digits
    z, _ = latent_grid(limit=3.0, size=31)
    log_joint = grid_log_joint(model, x, z)
    post = grid_posterior(log_joint)
    assert torch.allclose(post.sum(-1), torch.ones(len(x), dtype=torch.float64))
    g = 17
    with torch.no_grad():
        logits = model.decode(z[g].expand(len(x), 2))
        direct = bernoulli_log_likelihood(logits, x) - 0.5 * (z[g] ** 2).sum() - math.log(2 * math.pi)
    assert torch.allclose(log_joint[:, g], direct, atol=1e-4)
    nothing_seen = grid_log_joint(model, x, z, mask=torch.zeros(1, 1, 28, 28))
    assert torch.allclose(grid_posterior(nothing_seen), grid_posterior(nothing_seen[:1]).expand_as(post))


def test_refined_grid_resolves_a_narrow_posterior(model_and_digits):
    model, x = model_and_digits
    sharp = VAE(model.config).eval()
    sharp.load_state_dict(model.state_dict())
    with torch.no_grad():
        for p in sharp.decoder.parameters():
            p.mul_(4.0)  # a far more confident decoder: posteriors narrower than the first grid's spacing
    x = x[:2]
    z, area = latent_grid(limit=3.0, size=25)
    log_joint = grid_log_joint(sharp, x, z)
    refined, grids = refined_log_marginal(sharp, x, z, log_joint, size=101)
    brute_z, brute_area = latent_grid(limit=3.0, size=481)
    brute = grid_log_marginal(grid_log_joint(sharp, x, brute_z), brute_area)
    coarse = grid_log_marginal(log_joint, area)
    assert torch.allclose(refined, brute, atol=1e-2)
    assert (coarse - brute).abs().max() > 0.1  # the first grid alone was not enough
    assert all(g[0].shape == (101 * 101, 2) for g in grids)


def test_grid_moments_of_a_gaussian_on_the_grid():
    z, _ = latent_grid(limit=8.0, size=321)
    shift, scale = torch.tensor([0.5, -1.0]), torch.tensor([0.3, 1.5])
    log_density = (-0.5 * ((z - shift) / scale) ** 2).sum(-1)
    mean, sd = grid_moments(grid_posterior(log_density[None])[0], z)
    assert torch.allclose(mean, shift.double(), atol=1e-6) and torch.allclose(sd, scale.double(), atol=1e-4)


def test_box_grid_area_and_bounds():
    z, area = box_grid((-1.0, 0.0), (1.0, 4.0), 5)
    assert area == pytest.approx(0.5 * 1.0)
    assert z.min(0).values.tolist() == [-1.0, 0.0] and z.max(0).values.tolist() == [1.0, 4.0]
    with pytest.raises(ValueError, match="hi > lo"):
        box_grid((0.0, 0.0), (0.0, 1.0), 5)


def test_bad_inputs_raise(model_and_digits):
    model, x = model_and_digits
    with pytest.raises(ValueError, match="size >= 2"):
        latent_grid(size=1)
    with pytest.raises(ValueError, match="coordinates"):
        grid_log_joint(model, x, torch.zeros(5, 3))


def test_grid_peaks_counts_the_modes_above_the_threshold():
    from agm.vae.latent import grid_peaks

    z = torch.linspace(-4, 4, 81)
    zz1, zz2 = torch.meshgrid(z, z, indexing="ij")

    def bump(m1, m2, w):
        return w * torch.exp(-((zz1 - m1) ** 2 + (zz2 - m2) ** 2) / 0.5)

    two = bump(-2, 0, 1.0) + bump(2, 1, 0.5)
    assert grid_peaks(two.flatten(), 81) == 2
    assert grid_peaks((bump(-2, 0, 1.0) + bump(2, 1, 0.005)).flatten(), 81) == 1  # below 1 % of the peak
    assert grid_peaks((bump(-2, 0, 1.0) + bump(2, 1, 0.005)).flatten(), 81, threshold=0.001) == 2
    with pytest.raises(ValueError, match="cells"):
        grid_peaks(two.flatten()[:-1], 81)
