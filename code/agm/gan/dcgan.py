"""DCGAN (Radford, Metz & Chintala, 2016) on MNIST, Chapter 8: the paper's architecture rules at 28x28.

- no pooling: the generator upsamples with stride-2 transposed convolutions (7 -> 14 -> 28), the
  discriminator downsamples with stride-2 convolutions (28 -> 14 -> 7);
- BatchNorm in both networks, except the generator's output layer and the discriminator's input layer;
- no hidden fully connected layers: z is projected by one matrix multiplication and reshaped to
  (2C, 7, 7); the discriminator's last feature map is flattened into a single logit;
- ReLU in the generator, LeakyReLU(0.2) in the discriminator;
- weights from N(0, 0.02); Adam at 2e-4 with beta_1 = 0.5.

The output is a sigmoid, not the paper's tanh: sigmoid(a) = (1 + tanh(a / 2)) / 2 is the same
bounded, saturating output moved to [0, 1], so the generator draws MNIST's gray levels directly and
the discriminator sees real and generated images on the scale the metrics kit measures. The latent
is z ~ N(0, I) in 100 dimensions (the paper draws it uniformly from [-1, 1]^100).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from agm.config import TrainConfig, from_dict, to_dict
from agm.gan.training import Adversarial, check_image_shape, fit_adversarial, sample
from agm.registry import ModelSpec, TrainResult, register
from agm.runtime import budget

INIT_STD = 0.02  # Radford et al.: "all weights were initialized from a zero-centered Normal distribution with std 0.02"
# The paper's width and batch are too slow here: with C = 64 and batches of 128, 2500 steps (5.3 passes over the
# training images) took 33 min at AGM_THREADS=1 on a 2-core machine shared with other jobs and ended at FID 466
# (2000 samples). C = 32 with batches of 64 costs about 0.07 s per step and reached FID 540 after 4000 steps
# (5 min): 20 000 steps (21 passes) and 21 FID points take about 25 min, inside the 30 min of `train dcgan`.
DCGAN_STEPS = 20_000


def dcgan_training(steps: int = DCGAN_STEPS, **changes) -> TrainConfig:
    """``steps`` alternating updates on batches of 64 (the paper: 128); Adam at 2e-4 with beta_1 = 0.5 (the paper's)."""
    return TrainConfig(**{"steps": steps, "batch_size": 64, "lr": 2e-4, "betas": (0.5, 0.999)} | changes)


@dataclass
class DCGANConfig:
    latent_dim: int = 100  # the paper's 100-d z
    channels: int = 32  # C: the generator's maps are (2C, 7, 7) -> (C, 14, 14) -> (1, 28, 28); D mirrors them
    loss: str = "non-saturating"  # the generator's loss (the paper uses the non-saturating one)
    fid_every: int | None = 1000  # steps between FID measurements during fit; None = none
    fid_samples: int = 2000  # samples per FID measurement during fit
    train: TrainConfig = field(default_factory=dcgan_training)  # one Adam each for generator and discriminator


class Generator(nn.Module):
    def __init__(self, config: DCGANConfig):
        super().__init__()
        C = config.channels
        self.project = nn.Linear(config.latent_dim, 2 * C * 7 * 7, bias=False)  # z -> (2C, 7, 7)
        self.net = nn.Sequential(
            nn.BatchNorm2d(2 * C), nn.ReLU(),
            nn.ConvTranspose2d(2 * C, C, 4, stride=2, padding=1, bias=False),  # 7 -> 14
            nn.BatchNorm2d(C), nn.ReLU(),
            nn.ConvTranspose2d(C, 1, 4, stride=2, padding=1), nn.Sigmoid(),  # 14 -> 28, no BatchNorm
        )

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        h = self.project(z).view(len(z), -1, 7, 7)  # (B, 2C, 7, 7)
        return self.net(h)  # (B, 1, 28, 28) in [0, 1]


NORMS = ("batch", "layer", "none")  # the discriminator's hidden normalization


def feature_norm(kind: str, channels: int) -> nn.Module:
    """BatchNorm (DCGAN), layer normalization over each image's (C, H, W) (WGAN-GP's critic), or none."""
    if kind == "batch":
        return nn.BatchNorm2d(channels)
    if kind == "layer":
        return nn.GroupNorm(1, channels)  # one group: mean and variance over (C, H, W), a scale and shift per channel
    if kind == "none":
        return nn.Identity()
    raise ValueError(f"unknown normalization {kind!r}; choose one of {', '.join(NORMS)}")


class Discriminator(nn.Module):
    def __init__(self, config: DCGANConfig, norm: str = "batch"):
        super().__init__()
        C = config.channels
        self.net = nn.Sequential(
            nn.Conv2d(1, C, 4, stride=2, padding=1), nn.LeakyReLU(0.2),  # 28 -> 14, no BatchNorm on the input layer
            nn.Conv2d(C, 2 * C, 4, stride=2, padding=1, bias=norm == "none"),  # 14 -> 7; a norm's shift is the bias
            feature_norm(norm, 2 * C), nn.LeakyReLU(0.2),
            nn.Flatten(), nn.Linear(2 * C * 7 * 7, 1),  # (B, 2C * 49) -> the logit
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(check_image_shape(x)).squeeze(1)  # logit l(x), D(x) = sigmoid(l(x)): (B,)


def init_weights(module: nn.Module) -> None:
    """Weights from N(0, 0.02) and biases 0; BatchNorm scales from N(1, 0.02) (as in the paper's code)."""
    if isinstance(module, (nn.Conv2d, nn.ConvTranspose2d, nn.Linear)):
        nn.init.normal_(module.weight, 0.0, INIT_STD)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, nn.BatchNorm2d):
        nn.init.normal_(module.weight, 1.0, INIT_STD)
        nn.init.zeros_(module.bias)


class DCGAN(Adversarial):
    def __init__(self, config: DCGANConfig):
        super().__init__(config, Generator(config), Discriminator(config))
        self.apply(init_weights)


def fit(config: DCGANConfig, log_every: int = 500, log=print) -> tuple[DCGAN, dict]:
    """Train from an initialization seeded with ``config.train.seed``; returns the model and
    ``{"history": [...], "fid": [...]}``, the kit measured every ``config.fid_every`` steps."""
    torch.manual_seed(config.train.seed)
    return fit_adversarial(DCGAN(config), config.train, f"dcgan ({config.loss})", log_every, log,
                           fid_every=config.fid_every, fid_samples=config.fid_samples)


def build(config: dict) -> DCGAN:
    return DCGAN(from_dict(DCGANConfig, config))


def train(seed: int = 0, parents: dict | None = None) -> TrainResult:
    """``train dcgan``: the default config under the runtime's budget, with FID over training."""
    config = DCGANConfig(fid_every=budget(1000, 10), fid_samples=budget(2000, 200),
                         train=dcgan_training().budgeted(seed))
    model, logs = fit(config)
    return TrainResult(model, to_dict(config), steps=config.train.steps,
                       extra={"history": logs["history"], "fid_curve": logs["fid"]})


def spec() -> ModelSpec:
    """The model's entry for :mod:`agm.registry`."""
    return ModelSpec(
        name="dcgan", chapter=8, summary="DCGAN on MNIST: strided (transposed) convolutions with BatchNorm",
        build=build, train=train, evaluate=lambda model: {}, sample=sample,
        train_minutes=22.0, samples="generator outputs",
    )


register(spec())
