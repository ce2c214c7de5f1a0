"""BiGAN, Chapter 11: the step's losses against a hand computation on pairs, which networks each update
moves, the networks' shapes and refusals, the probe evaluation and a smoke run."""

import copy
import math

import pytest
import torch
import torch.nn.functional as F

from agm.data import mnist
from agm.gan import bigan
from agm.gan.bigan import BiGAN, BiGANConfig


def small() -> BiGAN:
    torch.manual_seed(0)
    return BiGAN(BiGANConfig(latent_dim=8, channels=8, hidden=16))


def optimizers(model: BiGAN):
    opt_ge = torch.optim.Adam(model.generator_side(), lr=1e-3)
    return opt_ge, torch.optim.Adam(model.discriminator.parameters(), lr=1e-3)


# -- oracles --------------------------------------------------------------------------------------------


def test_step_losses_are_the_pair_game_computed_by_hand():
    model = small()
    real = mnist("train")[0][:16]
    reference = copy.deepcopy(model)
    opt_ge, opt_d = optimizers(model)
    logs = bigan.train_step(model, opt_ge, opt_d, real, torch.Generator().manual_seed(3))
    # the same z, drawn from the same seed, through the copy taken before the step
    z = torch.randn(16, 8, generator=torch.Generator().manual_seed(3))
    fake, z_real = reference.generator(z), reference.encoder(real)
    real_logit, fake_logit = reference.discriminator(real, z_real), reference.discriminator(fake, z)
    # D: -log D(x, E(x)) - log(1 - D(G(z), z))
    d_by_hand = F.softplus(-real_logit).mean() + F.softplus(fake_logit).mean()
    assert logs["d_loss"] == pytest.approx(d_by_hand.item(), rel=1e-5)
    assert float(logs["d_real"]) == pytest.approx(torch.sigmoid(real_logit).mean().item(), rel=1e-5)
    # G and E, against the discriminator after its update: the labels swapped
    updated = model.discriminator
    with torch.no_grad():
        ge_by_hand = F.softplus(-updated(fake, z)).mean() + F.softplus(updated(real, z_real)).mean()
    assert logs["g_loss"] == pytest.approx(ge_by_hand.item(), rel=1e-5)


def test_each_update_moves_only_its_own_networks():
    model = small()
    real = mnist("train")[0][:16]
    opt_ge, _ = optimizers(model)
    frozen_d = torch.optim.SGD(model.discriminator.parameters(), lr=0.0)  # a D step that changes nothing
    before = copy.deepcopy(model)
    bigan.train_step(model, opt_ge, frozen_d, real, torch.Generator().manual_seed(0))

    def changed(a, b) -> bool:
        return any(not torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters(), strict=True))

    assert changed(before.generator, model.generator) and changed(before.encoder, model.encoder)
    assert not changed(before.discriminator, model.discriminator)
    # and the discriminator's optimizer holds none of G's or E's parameters
    _, opt_d = optimizers(model)
    held = {id(p) for group in opt_d.param_groups for p in group["params"]}
    assert held.isdisjoint(id(p) for p in model.generator_side())


def test_the_encoder_learns_only_from_real_pairs_and_the_generator_only_from_generated_ones():
    model = small()
    real, z = mnist("train")[0][:8], torch.randn(8, 8)
    fake, z_real = model.generator(z), model.encoder(real)
    real_term = F.softplus(model.logits(real, z_real)).mean()
    fake_term = F.softplus(-model.logits(fake, z)).mean()
    enc = list(model.encoder.parameters())
    gen = list(model.generator.parameters())
    g_total = torch.autograd.grad(real_term + fake_term, enc + gen, retain_graph=True)
    g_real = torch.autograd.grad(real_term, enc, retain_graph=True)
    g_fake = torch.autograd.grad(fake_term, gen)
    for a, b in zip(g_total, g_real + g_fake, strict=True):
        assert torch.allclose(a, b)


# -- properties -----------------------------------------------------------------------------------------


def test_shapes_and_determinism():
    model = small().eval()
    x = mnist("train")[0][:5]
    assert model.encode(x).shape == (5, 8) and model.reconstruct(x).shape == (5, 1, 28, 28)
    assert model.logits(x, torch.randn(5, 8)).shape == (5,)
    a = model.generate(4, torch.Generator().manual_seed(1))
    b = model.generate(4, torch.Generator().manual_seed(1))
    assert torch.equal(a, b) and a.shape == (4, 1, 28, 28) and 0 <= a.min() and a.max() <= 1
    assert torch.equal(model.encode(x), model.encode(x))  # running statistics: no dependence on the batch
    assert torch.allclose(model.encode(x[:2]), model.encode(x)[:2], atol=1e-6)


def test_the_discriminator_separates_one_batch_of_pairs():
    model = small()
    real = mnist("train")[0][:16]
    _, opt_d = optimizers(model)
    z = torch.randn(16, 8, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        fake, z_real = model.generator(z), model.encoder(real)
    for _ in range(60):
        loss = F.softplus(-model.logits(real, z_real)).mean() + F.softplus(model.logits(fake, z)).mean()
        opt_d.zero_grad()
        loss.backward()
        opt_d.step()
    assert loss.item() < 0.05


def test_bad_input_is_refused():
    model = small()
    x = torch.rand(4, 1, 28, 28)
    with pytest.raises(ValueError, match=r"latent must have shape \[B, 8\]"):
        model.logits(x, torch.randn(4, 7))
    with pytest.raises(ValueError, match="one latent per image"):
        model.logits(x, torch.randn(3, 8))
    with pytest.raises(ValueError, match=r"images of shape \[B, 1, 28, 28\]"):
        model.encoder(torch.rand(4, 28, 28))
    with pytest.raises(ValueError, match="not class-conditional"):
        bigan.sample(model, 4, torch.Generator(), torch.zeros(4, dtype=torch.long))


# -- smoke ----------------------------------------------------------------------------------------------


def test_bigan_trains_at_the_smoke_budget_and_its_features_are_probed(monkeypatch):
    monkeypatch.setenv("AGM_SMOKE", "1")
    spec = bigan.spec()
    result = spec.train(0, {})
    assert result.steps == 20
    assert all(math.isfinite(v) for row in result.extra["history"] for v in row.values())
    assert [point["step"] for point in result.extra["fid_curve"]] == [0, 10, 20]
    model = spec.build(result.config)
    model.load_state_dict(result.model.state_dict())
    metrics = spec.evaluate(model.eval())
    assert metrics["probe_n_train"] == 2000 and metrics["probe_n_test"] == 500
    for key in ("nn_accuracy", "nn_accuracy_cosine", "linear_probe_accuracy"):
        assert 0.0 <= metrics[key] <= 1.0
    assert 0.0 < metrics["reconstruction_mse"] < 1.0


def test_probe_table_has_the_encoder_and_both_references(monkeypatch):
    monkeypatch.setenv("AGM_SMOKE", "1")
    model = small().eval()
    table = bigan.probe_table(model, n_train=300, n_test=100)
    assert set(table) == {"encoder", "untrained encoder", "raw pixels"}
    assert table["raw pixels"]["dimensions"] == 784 and table["encoder"]["dimensions"] == 8
    assert all(row["n_train"] == 300 and row["n_test"] == 100 for row in table.values())
    # the untrained reference is seeded: the same numbers twice
    assert bigan.probe_table(model, n_train=300, n_test=100)["untrained encoder"] == table["untrained encoder"]
