"""Projected gradient ascent on pixels against a reward (Chapter 54), against closed forms and properties."""

import pytest
import torch

from agm.preference.hacking import pixel_ascent
from agm.preference.reward_model import RewardModel, RewardModelConfig


def images(n: int, seed: int = 0, dtype=torch.float64) -> torch.Tensor:
    return torch.rand(n, 1, 28, 28, generator=torch.Generator().manual_seed(seed), dtype=dtype)


def test_a_linear_reward_moves_every_pixel_at_a_constant_rate_until_the_box_stops_it():
    """r(x) = <w, x>: the gradient is w everywhere, so after k steps x_k = clip(x_0 + k eta w, 0, 1) exactly,
    and the reward of each iterate is <w, x_k>."""
    g = torch.Generator().manual_seed(1)
    w = torch.randn(1, 28, 28, generator=g, dtype=torch.float64)
    x0, eta, steps = images(3), 0.05, 7
    out, rewards = pixel_ascent(lambda x: (x * w).sum((1, 2, 3)), x0, steps, eta)
    assert torch.allclose(out, (x0 + steps * eta * w).clamp(0, 1), atol=1e-12)
    for k in range(steps + 1):
        assert torch.allclose(rewards[k], ((x0 + k * eta * w).clamp(0, 1) * w).sum((1, 2, 3)), atol=1e-10)


def test_a_concave_quadratic_rises_monotonically_to_the_projection_of_its_peak():
    """r(x) = -||x - c||^2 has an L = 2 Lipschitz gradient; with eta = 1/4 < 1/L every step raises r, and the
    iterates converge to the projection of c onto the box, clip(c, 0, 1) (c lies partly outside it)."""
    c = 2 * images(1, seed=2) - 0.5  # values in [-0.5, 1.5]
    out, rewards = pixel_ascent(lambda x: -((x - c) ** 2).sum((1, 2, 3)), images(2), 60, 0.25)
    assert (rewards[1:] >= rewards[:-1] - 1e-12).all() and (rewards[1:] > rewards[:-1]).any()
    assert torch.allclose(out, c.clamp(0, 1).expand_as(out), atol=1e-8)


def test_small_steps_raise_a_reward_model_at_every_step_and_stay_in_the_box():
    torch.manual_seed(0)
    model = RewardModel(RewardModelConfig()).double()
    _, rewards = pixel_ascent(model, images(4, seed=3), 10, 1e-3)
    assert (rewards[1:] > rewards[:-1]).all()
    out, _ = pixel_ascent(model, images(4, seed=3), 5, 100.0)  # steps far too large: the box still holds
    assert out.min() >= 0 and out.max() <= 1 and (out == 0).any() and (out == 1).any()


def test_zero_steps_return_the_input_and_the_callback_sees_every_iterate():
    model = RewardModel(RewardModelConfig())
    x0 = images(2, dtype=torch.float32)
    seen = []
    out, rewards = pixel_ascent(model, x0, 0, 0.1, callback=lambda k, x: seen.append(k))
    assert torch.equal(out, x0) and rewards.shape == (1, 2) and seen == [0]
    seen.clear()
    before = x0.clone()
    out, rewards = pixel_ascent(model, x0, 3, 0.1, callback=lambda k, x: seen.append(k))
    assert seen == [0, 1, 2, 3] and rewards.shape == (4, 2) and torch.equal(x0, before)  # input untouched
    assert torch.allclose(rewards[-1], model(out).detach())


def test_the_reward_models_weights_get_no_gradient():
    model = RewardModel(RewardModelConfig())
    pixel_ascent(model, images(2, dtype=torch.float32), 2, 0.1)
    assert all(p.grad is None for p in model.parameters()) and all(p.requires_grad for p in model.parameters())


@pytest.mark.parametrize("bad, match", [
    (torch.rand(2, 28, 28), "shape"),  # no channel
    (torch.rand(2, 3, 28, 28), "shape"),  # three channels
    (torch.rand(2, 1, 28, 28) + 1, r"\[0, 1\]"),  # pixels outside the box
])
def test_bad_images_raise(bad, match):
    with pytest.raises(ValueError, match=match):
        pixel_ascent(lambda x: x.sum((1, 2, 3)), bad, 1, 0.1)


def test_bad_settings_and_a_reward_of_the_wrong_shape_raise():
    x = images(2, dtype=torch.float32)
    with pytest.raises(ValueError, match="steps"):
        pixel_ascent(lambda x: x.sum((1, 2, 3)), x, -1, 0.1)
    with pytest.raises(ValueError, match="step_size"):
        pixel_ascent(lambda x: x.sum((1, 2, 3)), x, 1, 0.0)
    with pytest.raises(ValueError, match="one value per image"):
        pixel_ascent(lambda x: x.sum(), x, 1, 0.1)
