"""GAN inversion, Chapter 12: optimization recovers a latent that made the image, the restarts keep each image's
best, the encoder's latent regression against a hand computation, refusals and a smoke run."""

import copy

import pytest
import torch

from agm.gan import dcgan, inversion


def small_generator() -> dcgan.Generator:
    """PyTorch's default initialization (not DCGAN's N(0, 0.02)), so that G(z) varies visibly with z."""
    torch.manual_seed(0)
    g = dcgan.Generator(dcgan.DCGANConfig(latent_dim=6, channels=4))
    with torch.no_grad():  # running statistics from one large batch
        g.train()(torch.randn(256, 6))
    return g.eval()


# -- oracles --------------------------------------------------------------------------------------------


def test_optimization_recovers_images_that_the_generator_made():
    g = small_generator()
    z_true = torch.randn(5, 6, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        x = g(z_true)
    result = inversion.optimize_latents(g, x, restarts=2, steps=200, lr=0.05, rng=torch.Generator().manual_seed(2))
    start = inversion.pixel_error(g, torch.zeros(5, 6), x)
    assert result.latents.shape == (5, 6) and result.pixel_mse.shape == (5,)
    # an exact preimage exists: the error falls by orders of magnitude from the prior's mean
    assert (result.pixel_mse < 1e-3 * start).all()
    assert torch.allclose(result.pixel_mse, inversion.pixel_error(g, result.latents, x).detach(), rtol=1e-5)


def test_restarts_keep_each_images_best_and_batching_changes_nothing():
    g = small_generator()
    x = torch.rand(4, 1, 28, 28, generator=torch.Generator().manual_seed(3))  # not in the range of G
    joint = inversion.optimize_latents(g, x, restarts=3, steps=30, rng=torch.Generator().manual_seed(4))
    # the same three starts, optimized one restart at a time
    starts = torch.randn(3, 4, 6, generator=torch.Generator().manual_seed(4))
    single = [inversion.optimize_latents(g, x, start=starts[r], steps=30) for r in range(3)]
    errors = torch.stack([s.pixel_mse for s in single])  # (3, 4)
    assert torch.allclose(joint.pixel_mse, errors.min(0).values, rtol=1e-4, atol=1e-7)
    best = errors.argmin(0)
    expected = torch.stack([single[int(best[i])].latents[i] for i in range(4)])
    assert torch.allclose(joint.latents, expected, atol=1e-4)


def test_optimization_leaves_the_generator_and_its_mode_unchanged():
    g = small_generator().train()
    before = copy.deepcopy(g.state_dict())
    inversion.optimize_latents(g, torch.rand(2, 1, 28, 28), steps=5, rng=torch.Generator().manual_seed(0))
    assert g.training and all(p.requires_grad for p in g.parameters())
    for k, v in g.state_dict().items():
        assert torch.equal(v, before[k])


def test_latent_regression_loss_by_hand():
    g = small_generator()
    config = inversion.EncoderConfig(latent_dim=6, channels=4)
    torch.manual_seed(0)
    encoder = inversion.Encoder(config).eval()  # running statistics: each image's code is its own
    z = torch.randn(8, 6)
    loss, logs = inversion.latent_regression_loss(encoder, g, z)
    by_hand = sum(((encoder(g(z[i:i + 1])) - z[i]) ** 2).sum() for i in range(8)) / 8
    assert loss.item() == pytest.approx(by_hand.item(), rel=1e-5)
    assert float(logs["relative_error"]) == pytest.approx(by_hand.item() / (z ** 2).sum(1).mean().item(), rel=1e-5)
    # no gradient reaches the generator
    loss.backward()
    assert all(p.grad is None for p in g.parameters())


# -- properties and refusals ----------------------------------------------------------------------------


def test_encoder_learns_to_invert_a_small_generator():
    g = small_generator()
    config = inversion.EncoderConfig(latent_dim=6, channels=8,
                                     train=inversion.EncoderConfig().train.__class__(steps=150, batch_size=32, lr=2e-3))
    encoder, logs = inversion.fit_encoder(g, config, log_every=25, log=lambda _: None)
    history = logs["history"]
    assert history[-1]["relative_error"] < 0.5 * history[0]["relative_error"]


def test_bad_input_is_refused():
    g = small_generator()
    with pytest.raises(ValueError, match=r"images of shape \[B, 1, 28, 28\]"):
        inversion.optimize_latents(g, torch.rand(2, 28, 28))
    with pytest.raises(ValueError, match="restarts=1"):
        inversion.optimize_latents(g, torch.rand(2, 1, 28, 28), start=torch.zeros(2, 6), restarts=2)
    config = inversion.EncoderConfig(latent_dim=6, channels=4)
    with pytest.raises(ValueError, match=r"images of shape"):
        inversion.encode_latents(inversion.Encoder(config), g, torch.rand(2, 784))


def test_toy_latent_regression_learns_the_inverse_or_the_conditional_mean():
    """Chapter 12's proposition: G one-to-one -> E = G^{-1}; G(z) = z^2 -> E = E[z | z^2] = 0."""
    grid = torch.linspace(-1.2, 1.2, 25)[:, None]
    cubic = inversion.fit_toy_regressor(lambda z: z ** 3 + z, steps=600)
    square = inversion.fit_toy_regressor(lambda z: z ** 2, steps=600)
    with torch.no_grad():
        assert (cubic(grid ** 3 + grid) - grid).abs().max() < 0.15
        assert square(grid ** 2).abs().max() < 0.2


def test_central_difference_jacobians_match_autograd():
    g = small_generator()
    z = torch.randn(3, 6, generator=torch.Generator().manual_seed(5))
    jac = inversion.generator_jacobians(g, z, chunk=2)
    assert jac.shape == (3, 784, 6) and jac.dtype == torch.float64
    g64 = copy.deepcopy(g).double()
    for i in range(3):
        exact = torch.autograd.functional.jacobian(lambda v: g64(v[None]).flatten(), z[i].double())
        assert torch.allclose(jac[i], exact, rtol=1e-6, atol=1e-9)


def test_reconstruction_report_of_exact_preimages():
    g = small_generator()
    z = torch.randn(4, 6, generator=torch.Generator().manual_seed(8))
    with torch.no_grad():
        x = g(z)
    result = inversion.InversionResult(z, inversion.pixel_error(g, z, x).detach(), seconds=2.0)
    report = inversion.reconstruction_report(g, result, x)
    assert report == {"pixel_mse": 0.0, "label_agreement": 1.0, "seconds_per_image": 0.5}
