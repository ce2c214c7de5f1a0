"""GANs, Chapters 6, 8 and 11: the losses against closed forms, the networks' properties, smoke runs."""

import copy
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from scipy.optimize import minimize
from scipy.spatial.distance import jensenshannon

from agm.data import mnist
from agm.gan import bigan, dcgan, gan, losses
from agm.gan.training import train_step
from agm.train import NonFiniteLossError, gradient_step

# two distributions on six points, one of them with a zero where the other is not
P = np.array([0.30, 0.25, 0.20, 0.15, 0.10, 0.00])
Q = np.array([0.05, 0.10, 0.15, 0.20, 0.25, 0.25])


def small(kind: str):
    torch.manual_seed(0)
    if kind == "gan":
        return gan.GAN(gan.GANConfig(latent_dim=8, hidden=32))
    if kind == "bigan":
        return bigan.BiGAN(bigan.BiGANConfig(latent_dim=8, channels=8, hidden=16))
    return dcgan.DCGAN(dcgan.DCGANConfig(latent_dim=16, channels=8))


# -- oracles --------------------------------------------------------------------------------------------


def test_discriminator_loss_is_binary_cross_entropy_real_one_fake_zero():
    g = torch.Generator().manual_seed(0)
    real, fake = 5 * torch.randn(64, generator=g), 5 * torch.randn(64, generator=g)
    loss, logs = losses.discriminator_loss(real, fake)
    expected = (F.binary_cross_entropy_with_logits(real, torch.ones(64))
                + F.binary_cross_entropy_with_logits(fake, torch.zeros(64)))
    assert torch.allclose(loss, expected)
    assert torch.allclose(logs["d_real"], torch.sigmoid(real).mean())
    assert torch.allclose(logs["d_fake"], torch.sigmoid(fake).mean())
    # a confident, wrong discriminator: a large finite loss, not inf (log sigmoid written stably)
    loss, _ = losses.discriminator_loss(torch.tensor([-200.0]), torch.tensor([200.0]))
    assert loss.item() == pytest.approx(400.0)


def test_generator_losses_are_their_definitions_and_stay_finite_where_d_saturates():
    logits = torch.linspace(-8, 8, 33)
    d = torch.sigmoid(logits)
    saturating, _ = losses.generator_loss(logits, "saturating")
    non_saturating, _ = losses.generator_loss(logits, "non-saturating")
    assert torch.allclose(saturating, torch.log(1 - d).mean(), atol=1e-5)  # minimized
    assert torch.allclose(non_saturating, -torch.log(d).mean(), atol=1e-5)
    very_confident = torch.tensor([-200.0])  # D(G(z)) = 0 in float32
    assert losses.generator_loss(very_confident, "non-saturating")[0].item() == pytest.approx(200.0)
    with pytest.raises(ValueError, match="unknown generator loss"):
        losses.generator_loss(logits, "wasserstein")


def _discriminator_objective(d: np.ndarray) -> float:
    """The discriminator's objective, written out independently of agm: sum p log D + q log(1 - D)."""
    return float(np.sum(P * np.log(d)) + np.sum(Q * np.log(1 - d)))


def test_optimal_discriminator_maximizes_the_discriminator_objective():
    def negative(a):  # D = sigmoid(a) keeps D in (0, 1)
        return -_discriminator_objective(1 / (1 + np.exp(-a)))

    found = minimize(negative, np.zeros(len(P)), method="L-BFGS-B", options={"gtol": 1e-10, "ftol": 1e-14})
    d_numeric = 1 / (1 + np.exp(-found.x))
    d_star = losses.optimal_discriminator(torch.tensor(P), torch.tensor(Q))
    assert np.allclose(d_star.numpy()[:-1], d_numeric[:-1], atol=1e-3)
    assert d_star[-1] == 0 and d_numeric[-1] < 1e-3  # p = 0 there: D* = 0 exactly
    assert losses.minimax_value(P, Q).item() == pytest.approx(-found.fun, abs=1e-6)
    # and no other discriminator does better
    for seed in range(5):
        d = torch.rand(len(P), generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
        assert losses.minimax_value(P, Q, d) < losses.minimax_value(P, Q)
    assert losses.optimal_discriminator([0.0], [0.0]).item() == 0.5  # neither density: either answer


def test_value_at_the_optimum_is_twice_jensen_shannon_minus_log_4():
    js = jensenshannon(P, Q) ** 2  # scipy returns the square root of JS (natural log by default)
    assert losses.minimax_value(P, Q).item() == pytest.approx(2 * js - math.log(4), abs=1e-10)
    assert losses.minimax_value(P, P).item() == pytest.approx(-math.log(4))  # p = q: the game's minimum
    disjoint = np.array([0.5, 0.5, 0, 0]), np.array([0, 0, 0.5, 0.5])
    assert losses.minimax_value(*disjoint).item() == pytest.approx(0.0)  # JS = log 2
    # densities on a grid: two Gaussians, JS from the grid's probabilities
    x = np.linspace(-12, 12, 4801)
    dx = x[1] - x[0]
    p = np.exp(-0.5 * (x + 1) ** 2) / math.sqrt(2 * math.pi)
    q = np.exp(-0.5 * ((x - 1) / 0.5) ** 2) / (0.5 * math.sqrt(2 * math.pi))
    js = jensenshannon(p * dx, q * dx) ** 2
    assert losses.minimax_value(p, q, dx=dx).item() == pytest.approx(2 * js - math.log(4), abs=1e-6)


@pytest.mark.parametrize("kind", losses.GENERATOR_LOSSES)
def test_generator_logit_gradients_match_their_closed_forms_and_saturate(kind):
    logits = torch.cat([torch.tensor([-30.0]), torch.linspace(-6, 6, 25)]).requires_grad_(True)
    loss, _ = losses.generator_loss(logits, kind)
    (len(logits) * loss).backward()  # the loss is a mean: rescale to per-sample derivatives
    d = torch.sigmoid(logits.detach())
    closed_form = -d if kind == "saturating" else -(1 - d)
    assert torch.allclose(logits.grad, closed_form, atol=1e-6)
    assert torch.allclose(losses.generator_logit_grad(logits.detach(), kind), closed_form, atol=1e-6)
    assert (logits.grad < 0).all()  # descending the loss raises D(G(z))
    # where D(G(z)) -> 0: the saturating gradient vanishes, the non-saturating one tends to -1
    limit = 0.0 if kind == "saturating" else -1.0
    assert logits.grad[0].item() == pytest.approx(limit, abs=1e-12)


# -- properties -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["gan", "dcgan"])
def test_generator_and_discriminator_shapes(kind):
    model = small(kind).train()
    z = model.latents(5)
    assert z.shape == (5, model.config.latent_dim)
    x = model.generator(z)
    assert x.shape == (5, 1, 28, 28) and x.min() >= 0 and x.max() <= 1
    assert model.discriminator(x).shape == (5,)


@pytest.mark.parametrize("kind", ["gan", "dcgan"])
def test_generate_is_deterministic_under_a_seed_and_keeps_the_training_mode(kind):
    model = small(kind).train()
    a = model.generate(6, torch.Generator().manual_seed(3))
    b = model.generate(6, torch.Generator().manual_seed(3))
    c = model.generate(6, torch.Generator().manual_seed(4))
    assert a.shape == (6, 1, 28, 28) and torch.equal(a, b) and not torch.equal(a, c)
    assert model.generator.training  # generating in the middle of training does not switch it off


@pytest.mark.parametrize("kind", ["gan", "dcgan"])
def test_discriminator_rejects_a_wrong_image_shape(kind):
    model = small(kind)
    for bad in (torch.zeros(4, 784), torch.zeros(4, 3, 28, 28), torch.zeros(4, 1, 32, 32)):
        with pytest.raises(ValueError, match=r"\[B, 1, 28, 28\]"):
            model.discriminator(bad)


def test_unknown_generator_loss_fails_when_the_model_is_built():
    with pytest.raises(ValueError, match="unknown generator loss"):
        gan.GAN(gan.GANConfig(loss="minimax"))


def test_dcgan_init_draws_weights_from_a_normal_with_std_0_02():
    model = dcgan.DCGAN(dcgan.DCGANConfig())
    layers = [m for m in model.modules() if isinstance(m, (torch.nn.Conv2d, torch.nn.ConvTranspose2d, torch.nn.Linear))]
    assert len(layers) == 6  # G: projection, two transposed convolutions; D: two convolutions, the logit
    for layer in layers:
        w = layer.weight.detach()
        assert w.std().item() == pytest.approx(0.02, rel=0.1) and abs(w.mean().item()) < 0.003
        if w.numel() > 100_000:  # a normal's tails, which a uniform of the same std (|w| < 0.035) lacks
            assert w.abs().max() > 3.5 * 0.02
        assert layer.bias is None or torch.all(layer.bias == 0)
    for bn in (m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)):
        assert bn.weight.mean().item() == pytest.approx(1.0, abs=0.01) and 0.01 < bn.weight.std().item() < 0.03


@pytest.mark.parametrize("kind", ["gan", "dcgan"])
def test_discriminator_alone_separates_real_digits_from_a_fixed_generator(kind):
    model = small(kind)
    real = mnist("train")[0][:64]
    fake = model.generate(64, torch.Generator().manual_seed(0))
    optimizer = torch.optim.Adam(model.discriminator.parameters(), lr=1e-3)
    model.discriminator.train()
    for step in range(200):
        loss, logs = losses.discriminator_loss(model.discriminator(real), model.discriminator(fake))
        gradient_step(loss, optimizer, step=step)
    assert logs["d_real"] > 0.98 and logs["d_fake"] < 0.02


def test_train_step_moves_both_networks_and_the_generator_step_lowers_its_loss():
    model = small("gan")
    real = mnist("train")[0][:32]
    opt_g = torch.optim.Adam(model.generator.parameters(), lr=1e-3)
    opt_d = torch.optim.Adam(model.discriminator.parameters(), lr=1e-3)
    before = copy.deepcopy(model)
    logs = train_step(model, opt_g, opt_d, real, torch.Generator().manual_seed(5))
    assert set(logs) >= {"d_loss", "g_loss", "d_real", "d_fake"}
    for old, new in zip(before.parameters(), model.parameters(), strict=True):
        assert not torch.equal(old, new)
    # against the discriminator it stepped against (the updated one), on the same z, G's loss fell
    z = torch.randn(32, 8, generator=torch.Generator().manual_seed(5))
    loss_before = losses.generator_loss(model.discriminator(before.generator(z)))[0].item()
    loss_after = losses.generator_loss(model.discriminator(model.generator(z)))[0].item()
    assert loss_after < loss_before


@pytest.mark.parametrize("kind", ["gan", "dcgan", "bigan"])
def test_nan_in_the_data_raises_non_finite_loss_error_before_any_update(kind):
    model = small(kind)
    real = torch.rand(8, 1, 28, 28)
    real[3, 0, 5, 5] = float("nan")
    opt_g = torch.optim.Adam(model.generator_side())
    opt_d = torch.optim.Adam(model.discriminator.parameters())
    before = copy.deepcopy(model)
    step = bigan.train_step if kind == "bigan" else train_step
    with pytest.raises(NonFiniteLossError, match="discriminator"):
        step(model, opt_g, opt_d, real, torch.Generator().manual_seed(0))
    for old, new in zip(before.parameters(), model.parameters(), strict=True):
        assert torch.equal(old, new)


# -- smoke ----------------------------------------------------------------------------------------------


def _finite(history: list[dict]) -> bool:
    return all(math.isfinite(v) for row in history for v in row.values())


def test_gan_trains_at_the_smoke_budget_and_its_spec_samples(monkeypatch):
    monkeypatch.setenv("AGM_SMOKE", "1")
    spec = gan.spec()
    result = spec.train(0, {})
    assert result.steps == 20 and result.config["train"]["batch_size"] == 32
    history = result.extra["history"]
    assert history[-1]["step"] == 20 and _finite(history)
    assert {"d_loss", "g_loss", "d_real", "d_fake"} <= set(history[-1])
    rebuilt = spec.build(result.config)  # the config round-trips into the same architecture
    rebuilt.load_state_dict(result.model.state_dict())
    images = spec.sample(rebuilt, 3, torch.Generator().manual_seed(0))
    assert images.shape == (3, 1, 28, 28) and 0 <= images.min() and images.max() <= 1
    with pytest.raises(ValueError, match="not class-conditional"):
        spec.sample(rebuilt, 3, torch.Generator(), torch.zeros(3, dtype=torch.long))


def test_dcgan_trains_at_the_smoke_budget_and_records_fid_over_training(monkeypatch):
    monkeypatch.setenv("AGM_SMOKE", "1")
    spec = dcgan.spec()
    result = spec.train(0, {})
    assert result.steps == 20 and _finite(result.extra["history"])
    curve = result.extra["fid_curve"]
    assert [point["step"] for point in curve] == [0, 10, 20]
    assert all(point["n_samples"] == 200 and math.isfinite(point["fid"]) and point["fid"] > 0 for point in curve)
    spec.build(result.config).load_state_dict(result.model.state_dict())


@pytest.mark.parametrize("module", ["dcgan", "cgan", "bigan"])
def test_recording_fid_leaves_the_training_run_unchanged(module):
    """The kit's samples (and a conditional GAN's label accuracy) draw from their own generator."""
    from agm.gan import cgan

    family = {"dcgan": (dcgan.DCGANConfig, dcgan.fit), "cgan": (cgan.CGANConfig, cgan.fit),
              "bigan": (bigan.BiGANConfig, bigan.fit)}[module]

    def run(fid_every):
        config = family[0](latent_dim=16, channels=8, fid_every=fid_every, fid_samples=200,
                           train=dcgan.dcgan_training(6, batch_size=16))
        return family[1](config, log=lambda _: None)

    with_fid, logs = run(3)
    without, _ = run(None)
    assert [point["step"] for point in logs["fid"]] == [0, 3, 6]
    for a, b in zip(with_fid.state_dict().values(), without.state_dict().values(), strict=True):
        assert torch.equal(a, b)
