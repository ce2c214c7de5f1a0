r"""Latent diffusion (Rombach et al., 2022), Chapter 36: a diffusion model in an autoencoder's latent space.

``ldm-autoencoder`` maps a digit to a 4x7x7 Gaussian posterior $q(z \mid x)$ — a quarter as many numbers
as pixels, kept on a spatial grid so that a U-Net can work on it — and decodes z to Bernoulli
probabilities of the pixels. It is KL-regularized, as the paper's "KL-f" autoencoders are: a small
weight on $\mathrm{KL}(q(z \mid x) \,\|\, \mathcal N(0, I))$ keeps the latent's scale bounded and its
posteriors wide enough that nearby codes decode to similar images, without the code-book search of
a VQ model (Chapter 23), and leaves z continuous for a Gaussian diffusion. ``ldm`` is the DDPM of
Chapter 29 on ``latent_scale`` x z, z drawn from the posterior of each training image, with a U-Net
of two levels (7x7 and 4x4); it requires the autoencoder, whose weights it carries frozen and whose
sha256 its manifest pins.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass, field, replace

import torch
from torch import nn

from agm.config import TrainConfig, from_dict, to_dict
from agm.data import check_images, mnist
from agm.diffusion import ddpm
from agm.diffusion.ddpm import DDPMConfig
from agm.distributions import bernoulli_log_likelihood, gaussian_kl_to_standard, mean_and_standard_error
from agm.nn.conv import GRID, grid_decoder, grid_encoder
from agm.nn.unet import UNetConfig
from agm.registry import ModelSpec, TrainResult, refuse_labels, register
from agm.runtime import budget, device
from agm.train import fit_examples


def autoencoder_training() -> TrainConfig:
    return TrainConfig(steps=4000, batch_size=128, lr=1e-3, lr_final=1e-4, grad_clip=1.0)


@dataclass
class AutoencoderConfig:
    channels: int = 64  # width of the convolutions, as in the VQ-VAE of Chapter 23
    res_blocks: int = 2  # residual blocks at 7x7 in the encoder and again in the decoder
    latent_channels: int = 4  # z is latent_channels x 7 x 7
    kl_weight: float = 0.01  # nats of distortion one nat of KL costs
    train: TrainConfig = field(default_factory=autoencoder_training)

    def __post_init__(self):
        if self.kl_weight < 0 or self.latent_channels < 1:
            raise ValueError(f"need kl_weight >= 0 and latent_channels >= 1, got {self}")


class LatentAutoencoder(nn.Module):
    """x (B, 1, 28, 28) in [0, 1] -> q(z | x) over (B, C, 7, 7) -> Bernoulli logits of x."""

    def __init__(self, config: AutoencoderConfig):
        super().__init__()
        self.config = c = config
        self.encoder = grid_encoder(c.channels, c.res_blocks, 2 * c.latent_channels)  # mean and log-variance
        self.decoder = grid_decoder(c.channels, c.res_blocks, c.latent_channels)

    @property
    def latent_shape(self) -> tuple[int, int, int]:
        return self.config.latent_channels, GRID, GRID

    def encode(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The posterior's mean and log-variance, each (B, C, 7, 7)."""
        check_images(x)
        mean, logvar = self.encoder(x).chunk(2, dim=1)
        return mean, logvar.clamp(-30.0, 20.0)

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """Bernoulli logits (B, 1, 28, 28) of z (B, C, 7, 7)."""
        if z.ndim != 4 or tuple(z.shape[1:]) != self.latent_shape:
            raise ValueError(f"z must have shape [B, {', '.join(map(str, self.latent_shape))}], got {list(z.shape)}")
        return self.decoder(z)


def autoencoder_loss(model: LatentAutoencoder, x: torch.Tensor,
                     generator: torch.Generator | None = None) -> tuple[torch.Tensor, dict]:
    r"""Batch mean of $-\log p(x \mid z) + \lambda\,\mathrm{KL}(q(z \mid x) \,\|\, \mathcal N(0, I))$, z ~ q(z | x).

    ``x`` holds gray levels, so the distortion is the expected NLL of a fresh binarization (Chapter 23).
    """
    mean, logvar = model.encode(x)
    # $z = \mu + \sigma \odot \epsilon$ (Chapter 19)
    z = mean + (0.5 * logvar).exp() * torch.randn(mean.shape, generator=generator).to(mean.device)
    distortion = -bernoulli_log_likelihood(model.decode(z), x)  # (B,), nats
    kl = gaussian_kl_to_standard(mean.flatten(1), logvar.flatten(1))  # (B,), nats
    loss = (distortion + model.config.kl_weight * kl).mean()
    return loss, {"distortion": distortion.mean().detach(), "kl": kl.mean().detach()}


@torch.no_grad()
def encode_dataset(model: LatentAutoencoder, x: torch.Tensor, batch_size: int = 1000) -> torch.Tensor:
    """The posterior of every image, stacked as (N, 2C, 7, 7): means, then log-variances."""
    dev = next(model.parameters()).device
    return torch.cat([torch.cat(model.encode(x[i : i + batch_size].to(dev)), dim=1).cpu()
                      for i in range(0, len(x), batch_size)])


def posterior_draw(posteriors: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """One z ~ q(z | x) for each stacked (mean, log-variance) row of :func:`encode_dataset`."""
    mean, logvar = posteriors.chunk(2, dim=1)
    return mean + (0.5 * logvar).exp() * torch.randn(mean.shape, generator=generator)


def latent_scale(posteriors: torch.Tensor, generator: torch.Generator | None = None) -> float:
    """Rombach et al.'s scale factor: 1 / the standard deviation of z over one posterior draw per image."""
    return 1.0 / posterior_draw(posteriors, generator).std().item()


@torch.no_grad()
def reconstruction_report(model: LatentAutoencoder, x: torch.Tensor, batch_size: int = 1000) -> dict[str, float]:
    """On gray-level images x, in nats per image: the distortion at the posterior mean and the KL;
    the mean squared error per pixel of the decoded probabilities; and those reconstructions."""
    dev = next(model.parameters()).device
    distortion, kl, images = [], [], []
    for i in range(0, len(x), batch_size):
        batch = x[i : i + batch_size].to(dev)
        mean, logvar = model.encode(batch)
        logits = model.decode(mean)
        distortion.append(-bernoulli_log_likelihood(logits, batch).double().cpu())
        kl.append(gaussian_kl_to_standard(mean.flatten(1), logvar.flatten(1)).double().cpu())
        images.append(torch.sigmoid(logits).cpu())
    distortion, kl, images = torch.cat(distortion), torch.cat(kl), torch.cat(images)
    d_mean, d_se = mean_and_standard_error(distortion)
    return {"distortion_nats": d_mean, "distortion_nats_se": d_se, "kl_nats": kl.mean().item(),
            "mse": (images - x).pow(2).mean().item(), "reconstructions": images}


# -- the latent diffusion model -----------------------------------------------------------------------

def ldm_diffusion_config() -> DDPMConfig:
    """The DDPM of Chapter 29 on 4x7x7 latents: a two-level U-Net (7x7, 4x4), the same schedule and loop."""
    return DDPMConfig(unet=UNetConfig(in_channels=4, resolution=GRID, channels=48, multipliers=(1, 2)))


@dataclass
class LDMConfig:
    autoencoder: AutoencoderConfig = field(default_factory=AutoencoderConfig)  # the parent's, frozen
    diffusion: DDPMConfig = field(default_factory=ldm_diffusion_config)
    latent_scale: float = 1.0  # z is multiplied by this before the diffusion sees it (set from the data)

    def __post_init__(self):
        if self.diffusion.unet.in_channels != self.autoencoder.latent_channels or \
                self.diffusion.unet.resolution != GRID:
            raise ValueError("the diffusion's U-Net must take the autoencoder's latent shape")


class LDM(nn.Module):
    """The frozen autoencoder and the DDPM over its scaled latents."""

    def __init__(self, config: LDMConfig):
        super().__init__()
        self.config = config
        self.autoencoder = LatentAutoencoder(config.autoencoder).requires_grad_(False)
        self.diffusion = ddpm.DDPM(config.diffusion)

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Pixel probabilities (B, 1, 28, 28) of scaled latents, the diffusion's data space."""
        return torch.sigmoid(self.autoencoder.decode(latents / self.config.latent_scale))


def sample_latents(model: LDM, n: int, generator: torch.Generator | None = None, **options) -> torch.Tensor:
    """Scaled latents (n, C, 7, 7) from :func:`agm.diffusion.ddpm.sample_model_space`; clipping is off by
    default, since a latent has no fixed range (diffusers' latent pipelines set ``clip_sample=False``)."""
    if options.get("sampler", "ancestral") in ("ancestral", "ddim"):
        options.setdefault("clip_denoised", False)
    return ddpm.sample_model_space(model.diffusion, n, generator, None, **options)


@torch.no_grad()
def sample(model: LDM, n: int, generator: torch.Generator | None = None, labels=None, batch_size: int = 1000,
           **options) -> torch.Tensor:
    """``spec.sample``: latents drawn by the diffusion, decoded to pixel probabilities in [0, 1]."""
    refuse_labels(labels)
    z = sample_latents(model, n, generator, **options)
    dev = next(model.parameters()).device
    return torch.cat([model.decode(z[i : i + batch_size].to(dev)).cpu() for i in range(0, n, batch_size)])


# -- the registered models ----------------------------------------------------------------------------

def build_autoencoder(config: dict) -> LatentAutoencoder:
    return LatentAutoencoder(from_dict(AutoencoderConfig, config))


def train_autoencoder(seed: int = 0, parents: dict | None = None) -> TrainResult:
    config = AutoencoderConfig(train=autoencoder_training().budgeted(seed))
    torch.manual_seed(seed)
    model = LatentAutoencoder(config).to(device())
    history = fit_examples(model, autoencoder_loss, config.train, mnist("trainval")[0], desc="ldm-autoencoder")
    return TrainResult(model.eval(), to_dict(config), steps=config.train.steps, extra={"history": history})


def evaluate_autoencoder(model: LatentAutoencoder) -> dict[str, float]:
    """Reconstruction of the test set, and the kit on the reconstructions: the best an LDM could reach."""
    from agm.metrics import sample_metrics

    x, _ = mnist("test")
    x = x[: budget(len(x), 500)]
    report = reconstruction_report(model, x)
    kit = sample_metrics(report.pop("reconstructions"))
    return report | {f"reconstruction_{k}": v for k, v in kit.items()}


def build_ldm(config: dict) -> LDM:
    return LDM(from_dict(LDMConfig, config))


def train_ldm(seed: int = 0, parents: dict | None = None) -> TrainResult:
    autoencoder = parents["ldm-autoencoder"].to(device()).eval()
    generator = torch.Generator().manual_seed(seed)
    x, _ = mnist("trainval")
    posteriors = encode_dataset(autoencoder, x[: budget(len(x), 2000)])  # (60000, 2C, 7, 7)
    scale = latent_scale(posteriors, generator)
    diffusion = ldm_diffusion_config()
    diffusion = replace(diffusion, train=diffusion.train.budgeted(seed))
    config = LDMConfig(autoencoder=autoencoder.config, diffusion=diffusion, latent_scale=scale)
    ema, _, diagnostics = ddpm.fit(diffusion, examples=posteriors,
                                   transform=lambda rows, g: scale * posterior_draw(rows, g))
    model = LDM(config)
    model.autoencoder.load_state_dict(autoencoder.state_dict())
    model.diffusion.load_state_dict(ema.state_dict())
    extra = {"loss_per_t": diagnostics["loss_per_t"], "final_loss": diagnostics["history"][-1]["loss"],
             "history": [{"step": h["step"], "loss": h["loss"]} for h in diagnostics["history"]]}
    return TrainResult(model.eval(), to_dict(config), steps=diffusion.train.steps, extra=extra)


def evaluate_ldm(model: LDM) -> dict[str, float]:
    return {"latent_scale": model.config.latent_scale}


def add_sample_options(parser: argparse.ArgumentParser) -> None:
    ddpm.add_sample_options(parser, clips="never, unless --clip")


register(ModelSpec(
    name="ldm-autoencoder", chapter=36,
    summary="KL-regularized autoencoder to a 4x7x7 latent, for latent diffusion",
    build=build_autoencoder, train=train_autoencoder, evaluate=evaluate_autoencoder, train_minutes=15.0,
))

register(ModelSpec(
    name="ldm", chapter=36,
    summary="latent diffusion: a DDPM over the 4x7x7 latents of ldm-autoencoder, decoded to pixels",
    build=build_ldm, train=train_ldm, sample=sample, evaluate=evaluate_ldm, requires=("ldm-autoencoder",),
    train_minutes=40.0, add_sample_options=add_sample_options,
    # the pixel-space ddpm's metric sampler (50 ancestral steps, no clipping), for a like-for-like comparison
    metric_sample_options=lambda: {**ddpm.METRIC_SAMPLER, "steps": budget(ddpm.EVAL_STEPS, 5)},
    samples="decoder means",
))
