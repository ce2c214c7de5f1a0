"""MADE: the masks make every output a conditional, so the density is exact and normalized."""

import itertools
import math

import pytest
import torch

from agm.autoregressive import made
from agm.autoregressive.made import MADE, MADEConfig, draw_degrees, masks_from_degrees


def small(dim=5, hidden=(16, 16), masks=3, order_agnostic=True, seed=0, direct=True):
    torch.manual_seed(seed)
    model = MADE(MADEConfig(hidden=hidden, masks=masks, order_agnostic=order_agnostic, degrees_seed=seed,
                            direct=direct), dim=dim)
    with torch.no_grad():  # larger weights than the default init: conditionals far from 1/2
        for p in model.parameters():
            p.mul_(3)
    return model.eval()


def all_binary(dim):
    return torch.tensor(list(itertools.product([0.0, 1.0], repeat=dim)))


@pytest.mark.parametrize("order_agnostic,direct", [(False, True), (True, True), (True, False)])
def test_each_logit_depends_only_on_the_pixels_before_it(order_agnostic, direct):
    model = small(dim=7, order_agnostic=order_agnostic, direct=direct)
    x = torch.rand(1, 7)
    for mask in range(model.config.masks):
        jacobian = torch.autograd.functional.jacobian(lambda v, m=mask: model(v, m)[0], x)[:, 0, :]  # (out d, in j)
        position = model.degrees(mask)[0]  # 1-based place of each pixel in the ordering
        allowed = position[None, :] < position[:, None]
        assert (jacobian[~allowed] == 0).all()
        assert (jacobian[allowed] != 0).float().mean() > 0.5  # the masks do not cut everything


def test_hidden_degrees_and_masks_follow_germain_et_al():
    degrees = draw_degrees((50, 40), 10, True, torch.Generator().manual_seed(1))
    assert sorted(degrees[0].tolist()) == list(range(1, 11))
    for d in degrees[1:]:
        assert d.min() >= 1 and d.max() <= 9  # a unit of degree D would feed no output
    hidden1, hidden2, out = masks_from_degrees(degrees)
    assert hidden1.shape == (50, 10) and hidden2.shape == (40, 50) and out.shape == (10, 40)
    assert torch.equal(out, (degrees[0][:, None] > degrees[2][None, :]).float())


@pytest.mark.parametrize("direct", [True, False])
def test_density_sums_to_one_over_all_binary_images_for_every_mask_and_the_ensemble(direct):
    model = small(dim=6, direct=direct)
    x = all_binary(6)
    with torch.no_grad():
        for mask in range(model.config.masks):
            assert torch.logsumexp(model.log_prob(x, mask), 0).item() == pytest.approx(0.0, abs=1e-5)
        assert torch.logsumexp(model.ensemble_log_prob(x), 0).item() == pytest.approx(0.0, abs=1e-5)


def test_ensemble_is_the_mean_of_the_masks_probabilities():
    model = small(dim=4)
    x = all_binary(4)
    with torch.no_grad():
        mean = torch.stack([model.log_prob(x, m).exp() for m in range(3)]).mean(0)
        assert torch.allclose(model.ensemble_log_prob(x).exp(), mean, atol=1e-6)


def test_samples_follow_the_model_density():
    model = small(dim=3, masks=2)
    x = all_binary(3)
    with torch.no_grad():
        p = model.log_prob(x, 1).exp()
    draws = model.sample_flat(20_000, torch.Generator().manual_seed(0), mask=1)
    codes = (draws * torch.tensor([4.0, 2.0, 1.0])).sum(1).long()
    freq = torch.bincount(codes, minlength=8).float() / len(codes)
    se = (p * (1 - p) / len(codes)).sqrt()
    assert ((freq - p).abs() <= 5 * se + 1e-4).all()


def test_sample_draws_binary_images_in_the_ordering():
    model = MADE(MADEConfig(hidden=(8,), masks=2))
    images = model.sample(3, torch.Generator().manual_seed(0), mask=1)
    assert images.shape == (3, 1, 28, 28) and set(images.unique().tolist()) <= {0.0, 1.0}
    again = model.sample(3, torch.Generator().manual_seed(0), mask=1)
    assert torch.equal(images, again)


def test_bad_input_is_refused():
    model = MADE(MADEConfig(hidden=(8,), masks=2))
    with pytest.raises(ValueError, match="784 pixels"):
        model(torch.zeros(2, 1, 14, 14))
    with pytest.raises(ValueError, match="mask must be in"):
        model(torch.zeros(2, 784), mask=2)
    with pytest.raises(ValueError, match="masks >= 1"):
        MADEConfig(masks=0)


def test_one_mask_matches_the_chain_rule_computed_pixel_by_pixel():
    model = small(dim=5, masks=1, order_agnostic=True)
    x = torch.bernoulli(torch.full((4, 5), 0.5), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        total = torch.zeros(4)
        seen = torch.zeros(4, 5)
        for d in model.ordering(0).tolist():  # p(x_d | x_<d) from an input holding only the earlier pixels
            p = torch.sigmoid(model(seen, 0)[:, d])
            total += torch.where(x[:, d] == 1, p, 1 - p).log()
            seen[:, d] = x[:, d]
        assert torch.allclose(model.log_prob(x, 0), total, atol=1e-5)
        assert torch.allclose(model.sequential_log_prob(x, 0), total, atol=1e-5)
    assert math.isfinite(total.sum().item())


def test_sequential_log_prob_detects_a_mask_that_lets_a_pixel_see_itself(monkeypatch):
    model = small(dim=5, masks=1, order_agnostic=False)
    x = torch.ones(2, 5)
    assert torch.allclose(model.sequential_log_prob(x), model.log_prob(x), atol=1e-5)

    def leaky(degrees):  # output d also fed by hidden units of degree d, which see input d
        return masks_from_degrees(degrees)[:-1] + [(degrees[0][:, None] >= degrees[-1][None, :]).float()]

    monkeypatch.setattr(made, "masks_from_degrees", leaky)
    assert not torch.allclose(model.sequential_log_prob(x), model.log_prob(x), atol=1e-3)
