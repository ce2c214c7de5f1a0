"""The conditional GAN of Chapter 9: the projection discriminator against hand computations and its optimum,
the label accuracy of the metrics kit, the networks' properties, a smoke run."""

import copy
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from agm import metrics
from agm.data import mnist
from agm.gan import cgan, dcgan, gan, losses
from agm.gan.training import train_step
from agm.train import NonFiniteLossError, gradient_step


def small() -> cgan.CGAN:
    torch.manual_seed(0)
    return cgan.CGAN(cgan.CGANConfig(latent_dim=16, channels=8, label_dim=10))


def digits(n: int) -> torch.Tensor:
    return torch.arange(n) % 10


# -- oracles --------------------------------------------------------------------------------------------


def test_discriminator_logit_is_dcgans_logit_plus_the_projection_computed_by_hand():
    model = small()
    d = model.discriminator.eval()
    # DCGAN's discriminator with the same weights: phi is its network up to the logit, psi its logit layer
    reference = dcgan.Discriminator(dcgan.DCGANConfig(channels=8)).eval()
    last = len(reference.net) - 1
    reference.load_state_dict({(f"net.{k[4:]}" if k.startswith("phi.") else f"net.{last}.{k[4:]}"): v
                               for k, v in d.state_dict().items() if not k.startswith("embed.")})
    x, y = mnist("train")[0][:12], digits(12)
    phi = reference.net[:-1](x)  # (12, 2C * 49)
    v = d.embed.weight.detach()  # (10, 2C * 49)
    # the inner product through a one-hot matrix product, not an embedding lookup
    by_hand = reference(x) + ((phi @ v.T) * F.one_hot(y, 10)).sum(1)
    with torch.no_grad():
        assert torch.allclose(d(x, y), by_hand, atol=1e-5)
        # with every v_y = 0 the projection discriminator is DCGAN's
        d.embed.weight.zero_()
        assert torch.allclose(d(x, y), reference(x), atol=1e-6)


def _quasi_normals(per_class: int, classes: int, seed: int) -> torch.Tensor:
    """Scrambled-Sobol N(0, I_2) draws, one low-discrepancy block per class: the sample's error is far below
    Monte Carlo's, so the fitted logit can be held to the exact ratio."""
    blocks = []
    for k in range(classes):
        u = torch.quasirandom.SobolEngine(2, scramble=True, seed=seed + k).draw(per_class, dtype=torch.float64)
        blocks.append(math.sqrt(2) * torch.erfinv(2 * u - 1))
    return torch.cat(blocks)  # (classes * per_class, 2)


def test_projection_trained_to_optimum_is_the_log_density_ratio_of_the_pairs():
    # p(x | y) = N(mu_y, I), q(x | y) = N(nu_y, I), the same label marginal: on phi(x) = [x, 1],
    # log p(x, y) / q(x, y) = <mu_y - nu_y, x> - (|mu_y|^2 - |nu_y|^2) / 2 = <v_y, phi(x)>, projection form
    mu = torch.tensor([[1.0, 0.0], [-1.0, 1.0], [0.0, -1.5]], dtype=torch.float64)
    nu = torch.tensor([[0.0, 0.5], [-0.5, 0.0], [1.0, -1.0]], dtype=torch.float64)
    classes, per_class = len(mu), 1000
    y = torch.arange(classes).repeat_interleave(per_class)
    x_real, x_fake = mu[y] + _quasi_normals(per_class, classes, 0), nu[y] + _quasi_normals(per_class, classes, 100)

    def phi(x):
        return torch.cat([x, torch.ones(len(x), 1, dtype=x.dtype)], dim=1)

    def log_ratio(x, y):
        return ((mu[y] - nu[y]) * x).sum(1) - ((mu[y] ** 2).sum(1) - (nu[y] ** 2).sum(1)) / 2

    def fit(project: bool):
        psi, embed = nn.Linear(3, 1).double(), nn.Embedding(classes, 3).double()
        nn.init.zeros_(embed.weight)
        params = [*psi.parameters(), *([embed.weight] if project else [])]
        opt = torch.optim.LBFGS(params, max_iter=100, line_search_fn="strong_wolfe")

        def closure():
            opt.zero_grad()
            loss, _ = losses.discriminator_loss(cgan.projection_logit(phi(x_real), psi, embed, y),
                                                cgan.projection_logit(phi(x_fake), psi, embed, y))
            loss.backward()
            return loss

        opt.step(closure)
        return lambda x, y: cgan.projection_logit(phi(x), psi, embed, y).detach()

    x_test = torch.randn(600, 2, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    y_test = digits(600) % classes
    truth = log_ratio(x_test, y_test)
    assert (fit(project=True)(x_test, y_test) - truth).abs().max() < 0.05
    # psi alone (every v_y frozen at 0) cannot see y: it misses the ratio by a wide margin
    assert (fit(project=False)(x_test, y_test) - truth).abs().mean() > 0.5


def test_label_accuracy_counts_per_requested_class(monkeypatch):
    predicted = torch.tensor([0, 0, 1, 2, 2, 2, 1])
    requested = torch.tensor([0, 1, 1, 2, 2, 0, 0])

    def outputs(images):  # the classifier replaced by fixed predictions
        return torch.zeros(len(images), 4), F.one_hot(predicted, 10).float()

    monkeypatch.setattr(metrics, "classifier_outputs", outputs)
    accuracy, per_class = metrics.label_accuracy(torch.zeros(7, 1, 28, 28), requested)
    assert accuracy == pytest.approx(4 / 7)
    assert per_class[:3].tolist() == pytest.approx([1 / 3, 1 / 2, 1.0])
    assert per_class.shape == (10,) and torch.isnan(per_class[3:]).all()  # never requested
    for bad in (requested[:6], requested.float(), torch.tensor([0, 1, 1, 2, 2, 0, 10])):
        with pytest.raises(ValueError, match=r"labels must be \[7\] integers in 0..9"):
            metrics.label_accuracy(torch.zeros(7, 1, 28, 28), bad)


def test_label_accuracy_of_real_digits_with_their_labels_and_with_wrong_ones():
    x, y = mnist("test")
    x, y = x[:500], y[:500]
    accuracy, per_class = metrics.label_accuracy(x, y)
    assert accuracy > 0.98 and (per_class > 0.9).all()  # the kit's classifier reaches 99.3 % on the test set
    shifted, _ = metrics.label_accuracy(x, (y + 1) % 10)
    assert shifted < 0.02


# -- properties -----------------------------------------------------------------------------------------


def test_generator_and_discriminator_shapes():
    model = small().train()
    z, y = model.latents(5), digits(5)
    assert z.shape == (5, 16)
    x = model.generator(z, y)
    assert x.shape == (5, 1, 28, 28) and x.min() >= 0 and x.max() <= 1
    assert model.discriminator(x, y).shape == (5,)
    assert model.discriminator.phi(x).shape == (5, 2 * 8 * 49)


def test_generate_is_deterministic_under_a_seed_and_keeps_the_training_mode():
    model = small().train()
    a = model.generate(6, torch.Generator().manual_seed(3), digits(6))
    b = model.generate(6, torch.Generator().manual_seed(3), digits(6))
    c = model.generate(6, torch.Generator().manual_seed(4), digits(6))
    assert a.shape == (6, 1, 28, 28) and torch.equal(a, b) and not torch.equal(a, c)
    assert model.generator.training


def test_changing_only_the_label_changes_the_image():
    model = small().eval()
    z = model.latents(1, torch.Generator().manual_seed(0)).expand(10, -1)  # one z for every digit
    with torch.no_grad():
        images = model.generator(z, torch.arange(10)).flatten(1)  # (10, 784)
        again = model.generator(z, torch.arange(10)).flatten(1)
    assert torch.equal(images, again)
    gaps = torch.cdist(images, images) + torch.eye(10)
    assert gaps.min() > 1e-3  # ten different images


def test_sample_draws_the_digits_in_turn_by_default_and_refuses_bad_labels():
    model = small()
    default = cgan.sample(model, 12, torch.Generator().manual_seed(0))
    assert torch.equal(default, cgan.sample(model, 12, torch.Generator().manual_seed(0), digits(12)))
    sevens = cgan.sample(model, 12, torch.Generator().manual_seed(0), torch.full((12,), 7))
    assert sevens.shape == (12, 1, 28, 28) and not torch.equal(default, sevens)
    for bad in (torch.tensor([3, 10]), torch.tensor([-1, 2]), torch.tensor([1, 2, 3]), torch.tensor([1.0, 2.0])):
        with pytest.raises(ValueError, match=r"labels must be \[2\] integers"):
            cgan.sample(model, 2, torch.Generator(), bad)
    with pytest.raises(ValueError, match="needs labels"):
        model.generate(2, torch.Generator())


def test_networks_refuse_bad_labels_and_a_wrong_image_shape():
    model = small()
    x, z = torch.rand(4, 1, 28, 28), model.latents(4)
    for bad in (torch.tensor([0, 1, 2, 10]), torch.tensor([0, 1, 2]), torch.tensor([0, 1, 2, -3])):
        with pytest.raises(ValueError, match=r"0\.\.9"):
            model.generator(z, bad)
        with pytest.raises(ValueError, match=r"0\.\.9"):
            model.discriminator(x, bad)
    for bad in (torch.zeros(4, 784), torch.zeros(4, 3, 28, 28), torch.zeros(4, 1, 32, 32)):
        with pytest.raises(ValueError, match=r"\[B, 1, 28, 28\]"):
            model.discriminator(bad, digits(4))


def test_an_unconditional_gan_still_refuses_labels():
    torch.manual_seed(0)
    model = gan.GAN(gan.GANConfig(latent_dim=8, hidden=32))
    with pytest.raises(ValueError, match="not class-conditional"):
        model.generate(3, torch.Generator(), digits(3))


def test_init_follows_dcgan_and_the_embeddings_their_own_scales():
    model = cgan.CGAN(cgan.CGANConfig())
    layers = [m for m in model.modules() if isinstance(m, (nn.Conv2d, nn.ConvTranspose2d, nn.Linear))]
    assert len(layers) == 6  # G: projection, two transposed convolutions; D: two convolutions, psi
    for layer in layers:
        assert layer.weight.std().item() == pytest.approx(0.02, rel=0.1)
        assert layer.bias is None or torch.all(layer.bias == 0)
    # v_y like psi's weights; e_y on the scale of z
    assert model.discriminator.embed.weight.std().item() == pytest.approx(0.02, rel=0.1)
    assert model.generator.embed.weight.std().item() == pytest.approx(1.0, rel=0.3)


def test_gradients_reach_exactly_the_embedding_rows_of_the_labels_used():
    model = small().train()
    y = torch.tensor([1, 4, 4, 7])
    loss, _ = losses.generator_loss(model.logits(model.fake(model.latents(4), y), y))
    loss.backward()
    for embed in (model.generator.embed, model.discriminator.embed):
        rows = embed.weight.grad.abs().sum(1)  # (10,)
        used = torch.zeros(10, dtype=torch.bool)
        used[y] = True
        assert (rows[used] > 0).all() and (rows[~used] == 0).all()


def test_discriminator_alone_learns_whether_the_label_fits_the_image():
    # the same real images on both sides, with their own labels against shifted ones: only the projection
    # term can tell the sides apart (an unconditional discriminator is stuck at D = 1/2)
    model = small()
    x, y = mnist("train")
    x, y = x[:64], y[:64]
    optimizer = torch.optim.Adam(model.discriminator.parameters(), lr=1e-3)
    model.discriminator.train()
    for step in range(60):
        loss, logs = losses.discriminator_loss(model.logits(x, y), model.logits(x, (y + 3) % 10))
        gradient_step(loss, optimizer, step=step)
    assert logs["d_real"] > 0.9 and logs["d_fake"] < 0.1


def test_train_step_moves_both_networks_and_both_embeddings():
    model = small()
    real, y = mnist("train")[0][:32], mnist("train")[1][:32]
    opt_g = torch.optim.Adam(model.generator.parameters(), lr=1e-3)
    opt_d = torch.optim.Adam(model.discriminator.parameters(), lr=1e-3)
    before = copy.deepcopy(model)
    logs = train_step(model, opt_g, opt_d, real, torch.Generator().manual_seed(5), y)
    assert set(logs) >= {"d_loss", "g_loss", "d_real", "d_fake"}
    for (name, old), new in zip(before.named_parameters(), model.parameters(), strict=True):
        assert not torch.equal(old, new), name
    with pytest.raises(ValueError, match="needs labels"):
        train_step(model, opt_g, opt_d, real, torch.Generator())


def test_nan_in_the_data_raises_non_finite_loss_error_before_any_update():
    model = small()
    real = torch.rand(8, 1, 28, 28)
    real[3, 0, 5, 5] = float("nan")
    opt_g = torch.optim.Adam(model.generator.parameters())
    opt_d = torch.optim.Adam(model.discriminator.parameters())
    before = copy.deepcopy(model)
    with pytest.raises(NonFiniteLossError, match="discriminator"):
        train_step(model, opt_g, opt_d, real, torch.Generator().manual_seed(0), digits(8))
    for old, new in zip(before.parameters(), model.parameters(), strict=True):
        assert torch.equal(old, new)


# -- smoke ----------------------------------------------------------------------------------------------


def test_cgan_trains_at_the_smoke_budget_and_records_fid_and_label_accuracy(monkeypatch):
    monkeypatch.setenv("AGM_SMOKE", "1")
    spec = cgan.spec()
    assert spec.name == "cgan" and spec.chapter == 9 and spec.conditional and spec.num_classes == 10
    result = spec.train(0, {})
    assert result.steps == 20 and result.config["train"]["batch_size"] == 32
    history = result.extra["history"]
    assert history[-1]["step"] == 20 and all(math.isfinite(v) for row in history for v in row.values())
    curve = result.extra["fid_curve"]
    assert [point["step"] for point in curve] == [0, 10, 20]
    for point in curve:
        assert point["n_samples"] == 200 and math.isfinite(point["fid"]) and 0 <= point["label_accuracy"] <= 1
        assert len(point["label_accuracy_per_class"]) == 10  # 200 samples: every digit requested 20 times
        assert sum(point["label_accuracy_per_class"]) / 10 == pytest.approx(point["label_accuracy"])
    rebuilt = spec.build(result.config)  # the config round-trips into the same architecture
    rebuilt.load_state_dict(result.model.state_dict())
    images = spec.sample(rebuilt, 4, torch.Generator().manual_seed(0), torch.full((4,), 3))
    assert images.shape == (4, 1, 28, 28) and 0 <= images.min() and images.max() <= 1
    evaluated = spec.evaluate(rebuilt)
    assert 0 <= evaluated["label_accuracy"] <= 1 and {f"label_accuracy_{c}" for c in range(10)} <= set(evaluated)
