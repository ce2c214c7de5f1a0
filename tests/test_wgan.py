"""WGAN and WGAN-GP, Chapter 10: the dual against sorted W1 and scipy, the penalty against finite
differences, clipping, the critic's properties, smoke runs of both methods."""

import copy
import dataclasses
import math

import numpy as np
import pytest
import torch
from scipy.stats import wasserstein_distance
from torch import nn

from agm.gan import dcgan, wgan
from agm.train import NonFiniteLossError


def small(method: str, **changes) -> wgan.WGAN:
    torch.manual_seed(0)
    make = wgan.wgan_config if method == "clip" else wgan.wgan_gp_config
    return wgan.WGAN(make(**{"latent_dim": 16, "channels": 8} | changes))


def optimizers(model: wgan.WGAN):
    return (wgan.make_optimizer(model.config, model.generator.parameters()),
            wgan.make_optimizer(model.config, model.critic.parameters()))


class Counting:
    """An endless iterator over one batch that counts how often it is drawn from."""

    def __init__(self, batch: torch.Tensor):
        self.batch, self.drawn = batch, 0

    def __next__(self) -> torch.Tensor:
        self.drawn += 1
        return self.batch


# -- oracles: the Kantorovich-Rubinstein dual in 1-D ----------------------------------------------------------


def samples_1d(seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Two 1-D samples of different sizes whose CDFs cross: N(0, 1) against a mixture."""
    rng = np.random.default_rng(seed)
    a = rng.normal(0.0, 1.0, 300)
    b = np.concatenate([rng.normal(-2.0, 0.3, 80), rng.normal(1.5, 0.5, 120)])
    return a, b


def test_wasserstein1_by_sorting_matches_scipy_and_the_order_statistics():
    a, b = samples_1d()
    assert wgan.wasserstein1_sorted(a, b) == pytest.approx(wasserstein_distance(a, b), rel=1e-12)
    assert wgan.wasserstein1_sorted(b, a) == pytest.approx(wgan.wasserstein1_sorted(a, b), rel=1e-12)
    # equal sizes: the mean distance between order statistics
    c = np.random.default_rng(1).exponential(size=300)
    assert wgan.wasserstein1_sorted(a, c) == pytest.approx(np.mean(np.abs(np.sort(a) - np.sort(c))), rel=1e-12)
    assert wgan.wasserstein1_sorted(a, a + 0.7) == pytest.approx(0.7, rel=1e-12)  # a shift moves all mass by 0.7
    assert wgan.wasserstein1_sorted(a, a) == 0.0


def dual_value(knots: torch.Tensor, values: torch.Tensor, a: np.ndarray, b: np.ndarray) -> float:
    """E_a f - E_b f for the piecewise-linear f through (knots, values)."""
    f = lambda s: np.interp(s, knots.numpy(), values.numpy())  # noqa: E731
    return float(np.mean(f(a)) - np.mean(f(b)))


def test_kantorovich_potential_is_1_lipschitz_and_attains_w1():
    a, b = samples_1d()
    w1 = wasserstein_distance(a, b)
    knots, values = wgan.kantorovich_potential(a, b)
    assert torch.all(knots.diff() >= 0)
    assert torch.all(values.diff().abs() <= knots.diff() + 1e-12)  # |f(x) - f(y)| <= |x - y|
    assert dual_value(knots, values, a, b) == pytest.approx(w1, abs=1e-6)
    # the critic loss on this f's scores is minus W1: the W-estimate of the optimal critic is W1
    score = lambda s: torch.as_tensor(np.interp(s, knots.numpy(), values.numpy()))  # noqa: E731
    loss, logs = wgan.critic_loss(score(a), score(b))
    assert loss.item() == pytest.approx(-w1, abs=1e-6) and logs["w_estimate"].item() == pytest.approx(w1, abs=1e-6)


def test_no_other_1_lipschitz_function_beats_the_kantorovich_potential():
    a, b = samples_1d()
    w1 = wasserstein_distance(a, b)
    grid = np.linspace(-4, 4, 81)
    rng = np.random.default_rng(0)
    for _ in range(200):  # random piecewise-linear f with slopes in [-1, 1]
        values = np.concatenate([[0.0], np.cumsum(rng.uniform(-1, 1, 80) * np.diff(grid))])
        assert dual_value(torch.tensor(grid), torch.tensor(values), a, b) <= w1 + 1e-12
    assert abs(a.mean() - b.mean()) < w1  # f(x) = x: the means alone fall short when the CDFs cross


# -- oracles: the gradient penalty and clipping ----------------------------------------------------------------


def small_critic() -> nn.Module:
    """A smooth critic on (B, 1, 3, 4) images in float64, (B,) scores."""
    torch.manual_seed(0)
    return nn.Sequential(nn.Flatten(), nn.Linear(12, 8), nn.Tanh(), nn.Linear(8, 1), nn.Flatten(0)).double()


def central_difference_norms(critic: nn.Module, x: torch.Tensor, h: float = 1e-5) -> torch.Tensor:
    """||grad f(x_i)||_2 for each sample by central differences, coordinate by coordinate: (B,)."""
    flat = x.flatten(1)
    grads = torch.zeros_like(flat)
    with torch.no_grad():
        for j in range(flat.shape[1]):
            step = torch.zeros_like(flat)
            step[:, j] = h
            up, down = critic((flat + step).view_as(x)), critic((flat - step).view_as(x))
            grads[:, j] = (up - down) / (2 * h)
    return grads.norm(dim=1)


def test_gradient_penalty_equals_central_differences_on_the_interpolates():
    g = torch.Generator().manual_seed(0)
    real, fake = torch.rand(6, 1, 3, 4, generator=g, dtype=torch.float64), torch.rand(6, 1, 3, 4, generator=g,
                                                                                     dtype=torch.float64)
    critic = small_critic()
    with torch.no_grad():
        critic[1].weight.mul_(5)  # gradient norms on both sides of 1
    eps = torch.tensor([0.0, 0.1, 0.35, 0.5, 0.9, 1.0], dtype=torch.float64)
    penalty, logs = wgan.gradient_penalty(critic, real, fake, eps=eps)
    x_hat = eps.view(-1, 1, 1, 1) * real + (1 - eps.view(-1, 1, 1, 1)) * fake
    norms = central_difference_norms(critic, x_hat)
    assert (norms < 1).any() and (norms > 1).any()
    assert torch.allclose(penalty, ((norms - 1) ** 2).mean(), rtol=1e-7, atol=1e-10)
    assert torch.allclose(logs["grad_norm"], norms.mean(), rtol=1e-7)


def test_gradient_penalty_differentiates_through_the_gradient():
    """create_graph: d(penalty)/d(weight) by autograd equals a central difference in the weight."""
    g = torch.Generator().manual_seed(1)
    real, fake = torch.rand(4, 1, 3, 4, generator=g, dtype=torch.float64), torch.rand(4, 1, 3, 4, generator=g,
                                                                                     dtype=torch.float64)
    eps = torch.tensor([0.2, 0.4, 0.6, 0.8], dtype=torch.float64)
    critic = small_critic()
    weight = critic[1].weight
    penalty, _ = wgan.gradient_penalty(critic, real, fake, eps=eps)
    (grad,) = torch.autograd.grad(penalty, weight)
    h = 1e-6

    def penalty_at(shift: float) -> float:
        with torch.no_grad():
            weight[0, 3] += shift
        value = wgan.gradient_penalty(critic, real, fake, eps=eps)[0].item()
        with torch.no_grad():
            weight[0, 3] -= shift
        return value

    up, down = penalty_at(h), penalty_at(-h)
    assert grad[0, 3].item() != 0
    assert grad[0, 3].item() == pytest.approx((up - down) / (2 * h), rel=1e-5)


def test_gradient_penalty_draws_one_uniform_eps_per_sample_on_the_segment():
    seen = []

    def half_square(x: torch.Tensor) -> torch.Tensor:  # f(x) = ||x||^2 / 2, grad f(x) = x
        seen.append(x.detach())
        return 0.5 * x.flatten(1).pow(2).sum(1)

    n = 20_000
    penalty, logs = wgan.gradient_penalty(half_square, torch.ones(n, 1), torch.zeros(n, 1),
                                          torch.Generator().manual_seed(0))
    eps = seen[0].squeeze(1)  # x_hat = eps * 1 + (1 - eps) * 0
    assert 0 <= eps.min() < 0.001 and 0.999 < eps.max() <= 1 and eps.mean().item() == pytest.approx(0.5, abs=0.01)
    # $\mathbb{E}[(\epsilon - 1)^2] = 1/3$ for $\epsilon \sim U[0, 1]$
    assert penalty.item() == pytest.approx(1 / 3, abs=0.01) and logs["grad_norm"].item() == pytest.approx(0.5, abs=0.01)
    # on images: each x_hat lies on the segment from its fake to its real, one eps for all of its pixels
    g = torch.Generator().manual_seed(2)
    real, fake = torch.rand(5, 1, 28, 28, generator=g), torch.rand(5, 1, 28, 28, generator=g)
    wgan.gradient_penalty(half_square, real, fake, torch.Generator().manual_seed(3))
    d = (real - fake).flatten(1)  # (5, 784)
    eps = ((seen[1].flatten(1) - fake.flatten(1)) * d).sum(1) / (d * d).sum(1)  # least squares, one per image
    assert torch.allclose(seen[1], fake + eps.view(-1, 1, 1, 1) * (real - fake), atol=1e-6)
    assert eps.unique().numel() == 5 and 0 <= eps.min() and eps.max() <= 1
    again = wgan.gradient_penalty(half_square, real, fake, torch.Generator().manual_seed(3))[0]
    assert torch.equal(again, wgan.gradient_penalty(half_square, real, fake, torch.Generator().manual_seed(3))[0])


def test_clip_weights_clamps_every_critic_parameter_and_leaves_the_rest():
    model = small("clip")
    with torch.no_grad():
        for p in model.critic.parameters():
            p.normal_(0, 0.05)
    before = [p.detach().clone() for p in model.critic.parameters()]
    wgan.clip_weights(model.critic, 0.01)
    for old, new in zip(before, model.critic.parameters(), strict=True):
        assert new.min() >= -0.01 and new.max() <= 0.01
        inside = old.abs() <= 0.01
        assert torch.equal(new[inside], old[inside])  # untouched inside the box
        assert torch.equal(new[~inside], 0.01 * old[~inside].sign())  # on its faces outside
    assert any(isinstance(m, nn.BatchNorm2d) for m in model.critic.modules())  # BatchNorm's scale is clipped too


@pytest.mark.parametrize("method", wgan.METHODS)
def test_train_step_makes_n_critic_critic_updates_and_one_generator_update(method):
    model = small(method, n_critic=3)
    real = Counting(torch.rand(16, 1, 28, 28, generator=torch.Generator().manual_seed(0)))
    opt_g, opt_c = optimizers(model)
    before = copy.deepcopy(model)
    logs = wgan.train_step(model, opt_g, opt_c, real, torch.Generator().manual_seed(1))
    assert real.drawn == 3  # a fresh real batch per critic update
    assert opt_c.state[next(model.critic.parameters())]["step"].item() == 3
    assert opt_g.state[next(model.generator.parameters())]["step"].item() == 1
    for old, new in zip(before.generator.parameters(), model.generator.parameters(), strict=True):
        assert not torch.equal(old, new)
    output_bias = model.critic.net[-1].bias
    for old, new in zip(before.critic.parameters(), model.critic.parameters(), strict=True):
        # f + b has the dual value of f, so the critic's output bias gets no gradient and stays put
        assert torch.equal(old, new) == (new is output_bias)
    assert logs["critic_loss"] == pytest.approx(-logs["w_estimate"].item()
                                                + (10 * logs["gradient_penalty"].item() if method == "gp" else 0),
                                                rel=1e-5, abs=1e-7)
    if method == "clip":  # clipped after every update; DCGAN's N(0, 0.02) start puts many weights past c
        params = torch.cat([p.flatten() for p in model.critic.parameters()])
        assert params.abs().max() <= 0.01 and (params.abs() == 0.01).any()


# -- properties --------------------------------------------------------------------------------------------------


def test_configs_carry_the_papers_settings():
    clip, gp = wgan.wgan_config(), wgan.wgan_gp_config()
    assert (clip.method, clip.clip, clip.n_critic, clip.critic_norm) == ("clip", 0.01, 5, "batch")
    assert (gp.method, gp.gp_weight, gp.n_critic, gp.critic_norm) == ("gp", 10.0, 5, "layer")
    assert clip.train.batch_size == gp.train.batch_size == 64
    model = wgan.WGAN(clip)
    rmsprop = wgan.make_optimizer(clip, model.critic.parameters())
    assert isinstance(rmsprop, torch.optim.RMSprop) and rmsprop.defaults["lr"] == 5e-5
    adam = wgan.make_optimizer(gp, wgan.WGAN(gp).critic.parameters())
    assert isinstance(adam, torch.optim.Adam) and adam.defaults["lr"] == 1e-4 and adam.defaults["betas"] == (0.0, 0.9)


def test_bad_configs_fail_when_made():
    with pytest.raises(ValueError, match="BatchNorm"):
        wgan.wgan_gp_config(critic_norm="batch")
    with pytest.raises(ValueError, match="unknown method"):
        wgan.WGANConfig(method="spectral")
    with pytest.raises(ValueError, match="unknown optimizer"):
        wgan.WGANConfig(optimizer="sgd")
    with pytest.raises(ValueError, match="unknown critic_norm"):
        wgan.WGANConfig(critic_norm="instance")
    with pytest.raises(ValueError, match="n_critic"):
        wgan.WGANConfig(n_critic=0)
    with pytest.raises(KeyError, match="unknown model"):
        wgan.spec("wgan-sn")


@pytest.mark.parametrize("method", wgan.METHODS)
def test_generator_and_critic_shapes(method):
    model = small(method).train()
    z = model.latents(5)
    assert z.shape == (5, 16)
    x = model.generator(z)
    assert x.shape == (5, 1, 28, 28) and x.min() >= 0 and x.max() <= 1
    assert model.critic(x).shape == (5,)


@pytest.mark.parametrize("method", wgan.METHODS)
def test_generate_is_deterministic_under_a_seed_and_keeps_the_training_mode(method):
    model = small(method).train()
    a = model.generate(6, torch.Generator().manual_seed(3))
    b = model.generate(6, torch.Generator().manual_seed(3))
    c = model.generate(6, torch.Generator().manual_seed(4))
    assert a.shape == (6, 1, 28, 28) and torch.equal(a, b) and not torch.equal(a, c)
    assert model.generator.training


def test_gp_critic_has_no_batchnorm_and_scores_each_image_alone():
    gp, clip = small("gp").train(), small("clip").train()
    assert not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in gp.critic.modules())
    assert any(isinstance(m, nn.GroupNorm) and m.num_groups == 1 for m in gp.critic.modules())  # layer norm
    x = torch.rand(8, 1, 28, 28, generator=torch.Generator().manual_seed(0))
    # in training mode: a sample's score does not depend on the rest of its batch, unlike under BatchNorm
    assert torch.allclose(gp.critic(x)[:2], gp.critic(x[:2]), atol=1e-6)
    assert not torch.allclose(clip.critic(x)[:2], clip.critic(x[:2]), atol=1e-6)


def test_dcgan_discriminator_keeps_its_layers_and_takes_the_other_norms():
    config = dcgan.DCGANConfig(channels=8)
    keys = list(dcgan.Discriminator(config).state_dict())
    assert keys == ["net.0.weight", "net.0.bias", "net.2.weight", "net.3.weight", "net.3.bias", "net.3.running_mean",
                    "net.3.running_var", "net.3.num_batches_tracked", "net.6.weight", "net.6.bias"]
    assert list(dcgan.Discriminator(config, norm="layer").state_dict()) == [
        "net.0.weight", "net.0.bias", "net.2.weight", "net.3.weight", "net.3.bias", "net.6.weight", "net.6.bias"]
    bare = dcgan.Discriminator(config, norm="none")
    assert bare.net[2].bias is not None and isinstance(bare.net[3], nn.Identity)  # no norm: the conv keeps its bias
    with pytest.raises(ValueError, match="unknown normalization"):
        dcgan.Discriminator(config, norm="instance")


@pytest.mark.parametrize("method", wgan.METHODS)
def test_critic_rejects_a_wrong_image_shape(method):
    model = small(method)
    for bad in (torch.zeros(4, 784), torch.zeros(4, 3, 28, 28), torch.zeros(4, 1, 32, 32)):
        with pytest.raises(ValueError, match=r"\[B, 1, 28, 28\]"):
            model.critic(bad)


@pytest.mark.parametrize("method", wgan.METHODS)
def test_nan_stops_training_before_any_update(method):
    model = small(method)
    real = torch.rand(8, 1, 28, 28)
    real[3, 0, 5, 5] = float("nan")
    opt_g, opt_c = optimizers(model)
    before = copy.deepcopy(model)
    with pytest.raises(NonFiniteLossError, match=r"critic: loss is nan"):
        wgan.train_step(model, opt_g, opt_c, Counting(real), torch.Generator().manual_seed(0))
    for old, new in zip(before.parameters(), model.parameters(), strict=True):
        assert torch.equal(old, new)


def tiny_fit(method: str, fid_every: int | None, seed: int = 0):
    make = wgan.wgan_config if method == "clip" else wgan.wgan_gp_config
    config = make(latent_dim=16, channels=4, n_critic=2, fid_every=fid_every, fid_samples=200,
                  train=dataclasses.replace(make().train, steps=5, batch_size=16, lr=1e-3, seed=seed))
    return wgan.fit(config, log_every=1, log=lambda _: None)


def test_fit_is_deterministic_under_a_seed():
    a, _ = tiny_fit("gp", None)
    b, _ = tiny_fit("gp", None)
    c, _ = tiny_fit("gp", None, seed=1)
    assert all(torch.equal(p, q) for p, q in zip(a.state_dict().values(), b.state_dict().values(), strict=True))
    assert not torch.equal(a.generator.project.weight, c.generator.project.weight)


def test_w_curve_averages_the_w_estimate_between_fid_points_and_leaves_the_run_unchanged():
    with_fid, logs = tiny_fit("clip", fid_every=2)
    without, _ = tiny_fit("clip", fid_every=None)
    assert [p["step"] for p in logs["fid"]] == [0, 2, 4, 5]
    w = {row["step"]: row["w_estimate"] for row in logs["history"]}  # every step (log_every = 1)
    windows = {2: (1, 2), 4: (3, 4), 5: (5,)}
    assert [p["step"] for p in logs["w_curve"]] == [2, 4, 5]
    for point in logs["w_curve"]:
        assert point["w_estimate"] == pytest.approx(np.mean([w[s] for s in windows[point["step"]]]), rel=1e-12)
    for a, b in zip(with_fid.state_dict().values(), without.state_dict().values(), strict=True):
        assert torch.equal(a, b)


# -- smoke -------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", list(wgan.MODELS))
def test_trains_at_the_smoke_budget_with_fid_and_w_estimate_curves(name, monkeypatch):
    monkeypatch.setenv("AGM_SMOKE", "1")
    spec = wgan.spec(name)
    assert spec.name == name and spec.chapter == 10
    result = spec.train(0, {})
    assert result.steps == 20 and result.config["train"]["batch_size"] == 32
    assert result.config["method"] == ("clip" if name == "wgan" else "gp")
    history = result.extra["history"]
    assert history[-1]["step"] == 20 and {"w_estimate", "critic_loss", "g_loss"} <= set(history[-1])
    assert all(math.isfinite(v) for row in history for v in row.values())
    assert [p["step"] for p in result.extra["fid_curve"]] == [0, 10, 20]
    assert all(p["n_samples"] == 200 and math.isfinite(p["fid"]) for p in result.extra["fid_curve"])
    assert [p["step"] for p in result.extra["w_curve"]] == [10, 20]
    assert all(math.isfinite(p["w_estimate"]) for p in result.extra["w_curve"])
    rebuilt = spec.build(result.config)  # the config round-trips into the same architecture
    rebuilt.load_state_dict(result.model.state_dict())
    images = spec.sample(rebuilt, 3, torch.Generator().manual_seed(0))
    assert images.shape == (3, 1, 28, 28) and 0 <= images.min() and images.max() <= 1
    with pytest.raises(ValueError, match="not class-conditional"):
        spec.sample(rebuilt, 3, torch.Generator(), torch.zeros(3, dtype=torch.long))
