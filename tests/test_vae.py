"""The VAE's pieces against closed forms and Monte Carlo, and the bounds' ordering."""

import math

import pytest
import torch

from agm import checkpoint
from agm.cli import main
from agm.data import binarize, mnist
from agm.vae.vae import (
    VAE,
    VAEConfig,
    elbo_of,
    elbo_terms,
    gaussian_kl_to_standard,
    importance_sampled_log_likelihood,
    iwae_bound,
    loss,
    optimize_local_posterior,
    reconstruction_log_likelihood,
    reparameterize,
)


def small(**kw) -> VAE:
    torch.manual_seed(0)
    return VAE(VAEConfig(latent_dim=4, hidden=(32,), **kw))


@pytest.fixture(scope="module")
def digits():
    x, _ = mnist("test")
    return binarize(x[:16], torch.Generator().manual_seed(0))


def test_gaussian_kl_matches_torch_and_monte_carlo(generator):
    mu, logvar = torch.randn(5, 3, generator=generator), torch.randn(5, 3, generator=generator)
    q = torch.distributions.Normal(mu, (0.5 * logvar).exp())
    p = torch.distributions.Normal(torch.zeros(3), torch.ones(3))
    ref = torch.distributions.kl_divergence(q, p).sum(-1)
    assert torch.allclose(gaussian_kl_to_standard(mu, logvar), ref, atol=1e-5)
    z = q.sample((200_000,))
    mc = (q.log_prob(z) - p.log_prob(z)).sum(-1).mean(0)
    assert torch.allclose(mc, ref, rtol=0.02, atol=0.02)


def test_reparameterized_draws_have_the_right_moments_and_gradients(generator):
    mu = torch.tensor([[1.0, -2.0]], requires_grad=True)
    logvar = torch.tensor([[0.0, math.log(4.0)]], requires_grad=True)
    z = reparameterize(mu, logvar, 100_000, generator)
    assert z.shape == (100_000, 1, 2)
    assert torch.allclose(z.mean(0), mu.detach(), atol=0.03)
    assert torch.allclose(z.std(0), torch.tensor([[1.0, 2.0]]), atol=0.03)
    z.mean().backward()  # d/dmu E[z] = 1 / (number of coordinates)
    assert torch.allclose(mu.grad, torch.full((1, 2), 0.5))


def test_iwae_bound_is_above_the_elbo_and_grows_with_k(digits):
    model = small().eval()
    with torch.no_grad():
        g = torch.Generator().manual_seed(1)
        terms = [elbo_terms(model, digits, g) for _ in range(200)]
        elbo = torch.stack([t["reconstruction"] - t["kl"] for t in terms]).mean()
        bounds = {k: torch.stack([iwae_bound(model, digits, k, g) for _ in range(50)]).mean().item()
                  for k in (1, 5, 50)}
    # L_1 is the ELBO (with the KL in closed form the two estimates share their mean)
    assert abs(bounds[1] - elbo.item()) < 0.05 * abs(elbo.item())
    assert bounds[1] < bounds[5] < bounds[50]
    ll = importance_sampled_log_likelihood(model, digits, k=2000, chunk=300, generator=g).mean().item()
    assert bounds[50] < ll + 1.0


@pytest.mark.parametrize("beta", [0.0, 0.5, 4.0])
def test_loss_is_minus_the_beta_elbo(digits, beta):
    """The loss against the beta-ELBO assembled from torch.distributions with the same noise draw."""
    model = small(beta=beta)
    with torch.no_grad():
        mu, logvar = model.encode(digits)
        eps = torch.randn(mu.shape, generator=torch.Generator().manual_seed(2))
        q = torch.distributions.Normal(mu, (0.5 * logvar).exp())
        z = q.loc + q.scale * eps
        rec = torch.distributions.Bernoulli(logits=model.decode(z)).log_prob(digits).flatten(1).sum(1)
        kl = torch.distributions.kl_divergence(q, torch.distributions.Normal(0.0, 1.0)).sum(1)
        expected = -(rec - beta * kl).mean().item()
        assert loss(model, digits, torch.Generator().manual_seed(2)).item() == pytest.approx(expected, rel=1e-5)


def test_bad_inputs_raise_clear_errors(digits):
    with pytest.raises(ValueError, match="beta >= 0"):
        VAE(VAEConfig(beta=-1.0))
    with pytest.raises(ValueError, match="k >= 1"):
        VAE(VAEConfig(k=0))
    model = small()
    with pytest.raises(ValueError, match="k must be >= 1"):
        iwae_bound(model, digits, 0)
    with pytest.raises(ValueError, match=r"\[N, 1, 28, 28\]"):
        model.encode(torch.zeros(2, 784))


def test_sampling_shapes_and_determinism():
    model = small()
    a = model.sample(3, torch.Generator().manual_seed(0))
    b = model.sample(3, torch.Generator().manual_seed(0), mean=False)
    assert a.shape == b.shape == (3, 1, 28, 28) and 0 <= a.min() and a.max() <= 1
    assert set(b.unique().tolist()) <= {0.0, 1.0}
    assert torch.equal(a, model.sample(3, torch.Generator().manual_seed(0)))


def test_local_posterior_optimization_raises_the_elbo(digits):
    model = small().eval()
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        mu, logvar = model.encode(digits)
        before = elbo_of(model, digits, mu, logvar, samples=500, generator=g)
    mu_opt, logvar_opt = optimize_local_posterior(model, digits, steps=100, samples=8, lr=0.05, generator=g)
    with torch.no_grad():
        after = elbo_of(model, digits, mu_opt, logvar_opt, samples=500, generator=g)
    assert (after > before).float().mean() > 0.9 and after.mean() > before.mean() + 1.0
    assert all(p.requires_grad for p in model.parameters())  # the model is handed back trainable
    with pytest.raises(ValueError, match="steps and samples"):
        optimize_local_posterior(model, digits, steps=0)


def test_elbo_of_the_encoders_q_is_the_elbo(digits):
    model = small().eval()
    with torch.no_grad():
        mu, logvar = model.encode(digits)
        a = elbo_of(model, digits, mu, logvar, samples=4000, generator=torch.Generator().manual_seed(4))
        terms = [elbo_terms(model, digits, torch.Generator().manual_seed(s)) for s in range(400)]
    b = torch.stack([t["reconstruction"] - t["kl"] for t in terms]).mean(0)
    assert torch.allclose(a, b, atol=0.5)


def test_reconstruction_log_likelihood_is_the_bernoulli_log_pmf_per_draw_and_image(digits, generator):
    """f_b(z) = log p(x_b | z) for draws (n, B, L), against torch.distributions.Bernoulli pixel by pixel."""
    model = small().eval()
    z = torch.randn(3, len(digits), 4, generator=generator)  # (n, B, L)
    with torch.no_grad():
        values = reconstruction_log_likelihood(model, digits, z)
        ref = torch.stack([torch.distributions.Bernoulli(logits=model.decoder(z[i]).view(-1, 1, 28, 28))
                           .log_prob(digits).flatten(1).sum(1) for i in range(3)])  # (n, B)
    assert values.shape == (3, len(digits)) and torch.allclose(values, ref, rtol=1e-5)
    # each value is its own image's: permuting the images permutes the values
    perm = torch.randperm(len(digits), generator=generator)
    with torch.no_grad():
        assert torch.allclose(reconstruction_log_likelihood(model, digits[perm], z[:, perm]), values[:, perm])


@pytest.fixture(scope="module")
def smoke_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("vae")
    assert main(["train", "vae", "--smoke", "--out-dir", str(d)]) == 0
    return d


def test_train_smoke_and_sample(smoke_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("AGM_CHECKPOINTS", str(smoke_dir))
    manifest = checkpoint.read_manifest("vae", smoke_dir)
    assert manifest.config["train"]["epochs"] == 1 and manifest.metrics["test_nll_nats"] > 0
    out = tmp_path / "v.pt"
    assert main(["sample", "vae", "--n", "16", "--seed", "0", "--out", str(out)]) == 0
    images = torch.load(out, weights_only=True)["images"]
    assert images.shape == (16, 1, 28, 28) and 0 < images.mean() < 1
    assert main(["sample", "vae", "--n", "16", "--seed", "0", "--binary", "--out", str(out)]) == 0
    assert set(torch.load(out, weights_only=True)["images"].unique().tolist()) <= {0.0, 1.0}


def test_train_iwae_smoke_trains_on_the_k_sample_bound(tmp_path):
    from agm.vae.vae import IWAE_K

    assert main(["train", "iwae", "--smoke", "--out-dir", str(tmp_path)]) == 0
    manifest = checkpoint.read_manifest("iwae", tmp_path)
    assert manifest.config["k"] == IWAE_K > 1 and manifest.metrics["test_nll_nats"] > 0


def test_iwae_bound_curve_rises_with_k_and_respects_the_sample_cap(digits):
    from agm.vae.vae import iwae_bound_curve

    model = small().eval()
    curve = iwae_bound_curve(model, digits[:4], [1, 10, 100], repeats=4, max_samples=200,
                             generator=torch.Generator().manual_seed(0))
    assert len(curve) == 3 and curve[0] < curve[1] < curve[2]
    again = iwae_bound_curve(model, digits[:4], [1, 10, 100], repeats=4, max_samples=200,
                             generator=torch.Generator().manual_seed(0))
    assert curve == again
