"""Gaussian fits by forward and reverse KL on a grid (Chapter 4), against their closed forms."""

import math

import pytest
import torch

from agm.foundations.gaussian_fit import fit_gaussian, grid_kl, normal_density

GRID = torch.linspace(-10, 10, 4001, dtype=torch.float64)
DX = (GRID[1] - GRID[0]).item()


def test_grid_kl_of_two_gaussians_is_the_closed_form():
    p, q = normal_density(GRID, 0.5, 1.2), normal_density(GRID, -0.3, 0.8)
    closed = math.log(0.8 / 1.2) + (1.2**2 + 0.8**2) / (2 * 0.8**2) - 0.5
    assert grid_kl(p, q, DX).item() == pytest.approx(closed, rel=1e-8)
    assert grid_kl(p, p, DX).item() == pytest.approx(0.0, abs=1e-12)


def test_forward_kl_matches_moments_and_reverse_kl_finds_a_mode():
    p = 0.5 * normal_density(GRID, -2.5, 0.7) + 0.5 * normal_density(GRID, 2.5, 0.7)
    mean = (GRID * p).sum().item() * DX
    std = math.sqrt(((GRID - mean) ** 2 * p).sum().item() * DX)  # sqrt(0.7^2 + 2.5^2)
    fm, fs = fit_gaussian(p, GRID, "forward", init_mean=1.0, steps=1500)
    assert fm == pytest.approx(mean, abs=0.05) and fs == pytest.approx(std, abs=0.05)
    rm, rs = fit_gaussian(p, GRID, "reverse", init_mean=1.0, steps=1500)
    assert rm == pytest.approx(2.5, abs=0.05) and rs == pytest.approx(0.7, abs=0.05)


def test_a_gaussian_target_is_recovered_by_either_divergence():
    p = normal_density(GRID, 1.5, 2.0)
    for divergence in ("forward", "reverse"):
        m, s = fit_gaussian(p, GRID, divergence, steps=1500)
        assert m == pytest.approx(1.5, abs=0.02) and s == pytest.approx(2.0, abs=0.02)


def test_bad_arguments_are_refused():
    with pytest.raises(ValueError, match="forward"):
        fit_gaussian(GRID, GRID, "symmetric")
    with pytest.raises(ValueError, match="same length"):
        fit_gaussian(GRID[:10], GRID, "forward")
