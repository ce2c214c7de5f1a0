"""Latent diffusion: the KL-regularized autoencoder's loss, the latent scale, and the LDM around a DDPM."""

import math
import shutil

import pytest
import torch
from torch.distributions import Normal, kl_divergence

from agm import checkpoint, registry
from agm.cli import main
from agm.diffusion import ddpm, latent
from agm.diffusion.latent import (
    LDM,
    AutoencoderConfig,
    LatentAutoencoder,
    LDMConfig,
    autoencoder_loss,
    latent_scale,
    posterior_draw,
)
from agm.nn.unet import UNetConfig
from agm.runtime import checkpoint_dir


def small_autoencoder(**changes):
    return LatentAutoencoder(AutoencoderConfig(channels=8, res_blocks=1, **changes))


def test_autoencoder_loss_against_torch_distributions():
    torch.manual_seed(0)
    model = small_autoencoder(kl_weight=0.3)
    x = torch.rand(5, 1, 28, 28)
    loss, logs = autoencoder_loss(model, x, torch.Generator().manual_seed(1))
    mean, logvar = model.encode(x)
    q = Normal(mean, (0.5 * logvar).exp())
    z = mean + q.scale * torch.randn(mean.shape, generator=torch.Generator().manual_seed(1))
    p = torch.sigmoid(model.decode(z))
    distortion = -(x * p.log() + (1 - x) * (1 - p).log()).sum((1, 2, 3))  # expected NLL of a fresh binarization
    kl = kl_divergence(q, Normal(0.0, 1.0)).sum((1, 2, 3))
    assert torch.allclose(logs["distortion"], distortion.mean(), rtol=1e-4)
    assert torch.allclose(logs["kl"], kl.mean(), rtol=1e-4)
    assert torch.allclose(loss, (distortion + 0.3 * kl).mean(), rtol=1e-4)


def test_encoder_and_decoder_keep_the_latent_grid_and_refuse_other_shapes():
    model = small_autoencoder()
    mean, logvar = model.encode(torch.rand(3, 1, 28, 28))
    assert mean.shape == logvar.shape == (3, 4, 7, 7)
    assert model.decode(mean).shape == (3, 1, 28, 28)
    with pytest.raises(ValueError, match="shape"):
        model.decode(torch.zeros(3, 4, 8, 8))
    with pytest.raises(ValueError):
        model.encode(torch.rand(3, 28, 28))


def test_latent_scale_is_one_over_the_standard_deviation_of_the_draws():
    g = torch.Generator().manual_seed(0)
    means = 3.0 * torch.randn(20000, 4, 7, 7, generator=g)
    logvars = torch.full_like(means, math.log(4.0))  # z = mean + 2 noise: variance 9 + 4
    scale = latent_scale(torch.cat([means, logvars], dim=1), torch.Generator().manual_seed(1))
    assert scale == pytest.approx(1 / math.sqrt(13.0), rel=2e-3)
    draws = posterior_draw(torch.cat([means, logvars], dim=1)[:4], torch.Generator().manual_seed(2))
    assert draws.shape == (4, 4, 7, 7)


def test_ldm_refuses_a_unet_of_another_shape_than_the_latent():
    diffusion = ddpm.DDPMConfig(unet=UNetConfig(in_channels=3, resolution=7, channels=8, multipliers=(1, 2)))
    with pytest.raises(ValueError, match="latent shape"):
        LDMConfig(diffusion=diffusion)


def test_ldm_samples_latents_unclipped_by_default_and_decodes_them(monkeypatch):
    diffusion = ddpm.DDPMConfig(unet=UNetConfig(in_channels=4, resolution=7, channels=8, multipliers=(1, 2)))
    model = LDM(LDMConfig(autoencoder=AutoencoderConfig(channels=8, res_blocks=1), diffusion=diffusion,
                          latent_scale=0.5)).eval()
    seen = []
    original = ddpm.sample_model_space

    def spy(*args, **options):
        seen.append(options)
        return original(*args, **options)

    monkeypatch.setattr(ddpm, "sample_model_space", spy)
    images = latent.sample(model, 3, torch.Generator().manual_seed(0), steps=2)
    latent.sample(model, 2, torch.Generator().manual_seed(0), sampler="ddim", steps=2, clip_denoised=True)
    latent.sample(model, 2, torch.Generator().manual_seed(0), sampler="ddim", steps=2)
    latent.sample(model, 2, torch.Generator().manual_seed(0), sampler="dpmsolver++", steps=2)
    assert [o.get("clip_denoised") for o in seen] == [False, True, False, None]
    assert images.shape == (3, 1, 28, 28) and 0 <= images.min() and images.max() <= 1
    z = latent.sample_latents(model, 3, torch.Generator().manual_seed(0), steps=2)
    assert torch.allclose(images, model.decode(z))  # the same x_T: the images are the decoded latents
    with pytest.raises(ValueError, match="class-conditional"):
        latent.sample(model, 2, None, torch.zeros(2, dtype=torch.long))


def test_trained_ldm_carries_its_parents_weights_and_pins_its_sha256(tmp_path):
    for name in ("classifier", "ldm-autoencoder"):
        for suffix in (".pt", ".json"):
            shutil.copy(checkpoint_dir() / f"{name}{suffix}", tmp_path / f"{name}{suffix}")
    assert main(["train", "ldm", "--smoke", "--out-dir", str(tmp_path)]) == 0
    model, manifest = registry.load_model("ldm", tmp_path)
    parent, parent_manifest = registry.load_model("ldm-autoencoder", tmp_path)
    assert manifest.requires == {"ldm-autoencoder": parent_manifest.sha256}
    for key, value in parent.state_dict().items():
        assert torch.equal(model.autoencoder.state_dict()[key], value), key
    assert not any(p.requires_grad for p in model.autoencoder.parameters())
    (tmp_path / "ldm-autoencoder.pt").write_bytes(b"changed")
    with pytest.raises(checkpoint.CheckpointError):
        registry.load_model("ldm", tmp_path)


def test_decoder_probabilities_are_the_sigmoid_of_the_logits_at_the_scaled_latent():
    model = LDM(LDMConfig(autoencoder=AutoencoderConfig(channels=8, res_blocks=1),
                          diffusion=ddpm.DDPMConfig(unet=UNetConfig(in_channels=4, resolution=7, channels=8,
                                                                    multipliers=(1, 2))),
                          latent_scale=0.25))
    z = torch.randn(2, 4, 7, 7)
    expected = torch.sigmoid(model.autoencoder.decode(z / 0.25))
    assert torch.allclose(model.decode(z), expected)
