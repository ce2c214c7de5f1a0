"""The β-VAE: rate and distortion against independent computations, the β-weighted loss, the
linear Gaussian β-VAE against its closed form, bad inputs, and `train beta-vae --smoke`."""

import copy
import dataclasses
import math

import pytest
import torch

from agm import checkpoint, registry
from agm.cli import main
from agm.data import binarize, mnist
from agm.vae.beta_vae import (
    BETAS,
    CHOSEN_BETA,
    fit_linear_gaussian,
    linear_gaussian_optimum,
    linear_gaussian_terms,
    pack_images,
    rate_distortion,
    sweep,
    traverse,
    unpack_images,
)
from agm.vae.vae import VAE, VAEConfig, elbo_terms, loss


def small(**kw) -> VAE:
    torch.manual_seed(0)
    return VAE(VAEConfig(latent_dim=4, hidden=(32,), **kw)).eval()


@pytest.fixture(scope="module")
def digits():
    x, _ = mnist("test")
    return binarize(x[:16], torch.Generator().manual_seed(0))


def test_rate_and_distortion_match_torch_distributions(digits):
    model = small()
    rd = rate_distortion(model, digits, torch.Generator().manual_seed(3))
    # the same draw z = mu + sigma * eps, scored by torch.distributions instead of agm's formulas
    with torch.no_grad():
        mu, logvar = model.encode(digits)
        eps = torch.randn((1, *mu.shape), generator=torch.Generator().manual_seed(3))[0]
        z = mu + (0.5 * logvar).exp() * eps
        log_lik = torch.distributions.Bernoulli(logits=model.decode(z)).log_prob(digits).flatten(1).sum(1)
        q = torch.distributions.Normal(mu, (0.5 * logvar).exp())
        kl = torch.distributions.kl_divergence(q, torch.distributions.Normal(0.0, 1.0)).sum(1)
    assert rd["rate"] == pytest.approx(kl.mean().item(), rel=1e-5)
    assert rd["distortion"] == pytest.approx(-log_lik.mean().item(), rel=1e-5)
    assert rd["n"] == len(digits)


def test_rate_plus_distortion_is_minus_the_elbo(digits):
    model = small()
    rd = rate_distortion(model, digits, torch.Generator().manual_seed(4))
    with torch.no_grad():
        terms = elbo_terms(model, digits, torch.Generator().manual_seed(4))
    elbo = (terms["reconstruction"] - terms["kl"]).mean().item()
    assert rd["elbo"] == pytest.approx(elbo, rel=1e-6)
    assert rd["distortion"] + rd["rate"] == pytest.approx(-elbo, rel=1e-6)
    # batching changes the draws, never the closed-form rate
    batched = rate_distortion(model, digits, torch.Generator().manual_seed(4), batch_size=5)
    assert batched["rate"] == pytest.approx(rd["rate"], rel=1e-6)


@pytest.mark.parametrize("beta,other", [(0.0, 1.0), (0.5, 4.0), (8.0, 2.0)])
def test_beta_weights_exactly_the_kl_term(digits, beta, other):
    model = small(beta=beta)
    twin = copy.deepcopy(model)  # the same weights, another beta
    twin.config = dataclasses.replace(model.config, beta=other)
    a = loss(model, digits, torch.Generator().manual_seed(5))
    b = loss(twin, digits, torch.Generator().manual_seed(5))
    with torch.no_grad():
        terms = elbo_terms(model, digits, torch.Generator().manual_seed(5))
    assert (a - b).item() == pytest.approx((beta - other) * terms["kl"].mean().item(), rel=1e-4, abs=1e-4)
    if beta == 0.0:
        assert a.item() == pytest.approx(-terms["reconstruction"].mean().item(), rel=1e-6)


def test_linear_gaussian_terms_match_monte_carlo(generator):
    s2 = torch.tensor([4.0, 0.5], dtype=torch.float64)
    a, b = torch.tensor([0.7, -1.2], dtype=torch.float64), torch.tensor([1.1, 0.3], dtype=torch.float64)
    logvar = torch.tensor([-0.5, 0.4], dtype=torch.float64)
    rate, distortion = linear_gaussian_terms(a, logvar, b, s2)
    n = 400_000
    x = torch.randn(n, 2, generator=generator, dtype=torch.float64) * s2.sqrt()
    q = torch.distributions.Normal(a * x, (0.5 * logvar).exp())
    z = q.sample()
    mc_rate = (q.log_prob(z) - torch.distributions.Normal(0.0, 1.0).log_prob(z)).mean(0)
    mc_distortion = -torch.distributions.Normal(b * z, 1.0).log_prob(x).mean(0)
    assert torch.allclose(mc_rate, rate, atol=0.02)
    assert torch.allclose(mc_distortion, distortion, atol=0.02)


def test_gradient_descent_finds_the_closed_form_optimum_and_its_slope_is_minus_beta():
    s2 = torch.tensor([6.0, 3.0, 1.5, 0.75], dtype=torch.float64)
    betas = (0.5, 2.0, 4.0)
    rate, distortion = fit_linear_gaussian(betas, s2)
    for i, beta in enumerate(betas):
        r_star, d_star = linear_gaussian_optimum(beta, s2)
        assert torch.allclose(rate[i], r_star, atol=1e-3) and torch.allclose(distortion[i], d_star, atol=1e-3)
        assert torch.equal(r_star == 0, s2 <= beta)  # coordinates with s^2 <= beta are switched off
        # slope of the frontier D*(R) = log(2 pi)/2 + s^2 exp(-2R)/2 at the optimum, where R > 0
        on = r_star > 0
        assert torch.allclose(-s2[on] * torch.exp(-2 * r_star[on]), torch.full_like(s2[on], -beta))


def test_bad_inputs_raise_clear_errors(digits):
    for betas in ([1.0, -0.5], [float("nan")], [float("inf")]):
        with pytest.raises(ValueError, match="beta must be a finite number >= 0"):
            sweep(betas, epochs=1)  # refused before any training
    with pytest.raises(ValueError, match="at least one beta"):
        sweep([], epochs=1)
    with pytest.raises(ValueError, match="must not repeat"):
        sweep([1.0, 1.0], epochs=1)
    with pytest.raises(ValueError, match=">= 0"):
        fit_linear_gaussian([-1.0], torch.ones(2))
    with pytest.raises(ValueError, match=">= 0"):
        linear_gaussian_optimum(-0.1, torch.ones(2))
    with pytest.raises(ValueError, match="beta >= 0"):
        VAE(VAEConfig(beta=-1.0))
    model = small()
    with pytest.raises(ValueError, match="one image"):
        traverse(model, digits[:2], [0], torch.zeros(3))
    with pytest.raises(ValueError, match="dims must lie in 0..3"):
        traverse(model, digits[:1], [4], torch.zeros(3))
    with pytest.raises(ValueError, match="multiple of 784"):
        unpack_images("AAAA")


def test_traversal_changes_only_the_chosen_coordinate(digits):
    model = small()
    values = torch.linspace(-3, 3, 5)
    frames = traverse(model, digits[:1], [0, 2], values)
    assert frames.shape == (2, 5, 1, 28, 28)
    with torch.no_grad():
        mu, _ = model.encode(digits[:1])
        for i, d in enumerate((0, 2)):
            z = mu.repeat(5, 1)
            z[:, d] = values
            assert torch.allclose(frames[i], torch.sigmoid(model.decode(z)))
        # setting the coordinate to its own posterior mean gives the reconstruction at the mean
        at_mean = traverse(model, digits[:1], [1], mu[0, 1:2])
        assert torch.allclose(at_mean[0, 0], torch.sigmoid(model.decode(mu))[0])


def test_packed_images_round_trip_to_8_bits(generator):
    images = torch.rand(3, 1, 28, 28, generator=generator)
    back = unpack_images(pack_images(images))
    assert back.shape == images.shape and (back - images).abs().max() <= 0.5 / 255 + 1e-6


@pytest.fixture(scope="module")
def smoke_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("beta-vae")
    assert main(["train", "beta-vae", "--smoke", "--out-dir", str(d)]) == 0
    return d


def test_train_smoke_writes_the_sweep_and_keeps_the_chosen_beta(smoke_dir, tmp_path, monkeypatch):
    manifest = checkpoint.read_manifest("beta-vae", smoke_dir)
    table = manifest.training["sweep"]
    assert [row["beta"] for row in table] == list(BETAS)
    for row in table:
        assert row["rate"] >= 0 and row["distortion"] > 0 and 0 <= row["active_units"] <= manifest.config["latent_dim"]
        assert row["elbo"] == pytest.approx(-(row["rate"] + row["distortion"]), rel=1e-6)
        assert len(row["kl_per_unit"]) == manifest.config["latent_dim"]
        assert sum(row["kl_per_unit"]) == pytest.approx(row["rate"], rel=1e-4)
    assert manifest.config["beta"] == CHOSEN_BETA == manifest.training["chosen_beta"]
    # the checkpoint is the sweep's model for the chosen beta: re-measuring it gives its row back
    model, _ = registry.load_model("beta-vae", smoke_dir)
    row = table[BETAS.index(CHOSEN_BETA)]
    from agm.data import binarized_test_set

    again = rate_distortion(model, binarized_test_set()[0][: row["n"]], torch.Generator().manual_seed(0))
    assert again["rate"] == pytest.approx(row["rate"], rel=1e-5)
    assert again["distortion"] == pytest.approx(row["distortion"], rel=1e-5)
    gallery = manifest.training["gallery"]
    assert [g["beta"] for g in gallery] == list(BETAS)
    assert unpack_images(gallery[0]["samples"]).shape == (8, 1, 28, 28)
    assert manifest.metrics["rate_nats"] == pytest.approx(again["rate"], rel=1e-5)
    assert math.isfinite(manifest.metrics["test_nll_nats"])
    monkeypatch.setenv("AGM_CHECKPOINTS", str(smoke_dir))
    out = tmp_path / "b.pt"
    assert main(["sample", "beta-vae", "--n", "4", "--seed", "0", "--out", str(out)]) == 0
    assert torch.load(out, weights_only=True)["images"].shape == (4, 1, 28, 28)
