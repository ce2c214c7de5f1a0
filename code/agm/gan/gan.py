"""The GAN of Goodfellow et al. (2014) on MNIST, Chapter 6: an MLP generator against an MLP discriminator.

Images are MNIST's gray levels in [0, 1] (k/255, not binarized); the generator ends in a sigmoid, so
its samples lie in the same range. Training alternates one discriminator and one generator step
(:func:`agm.gan.training.train_step`); ``loss`` picks the generator's loss: the non-saturating
-log D(G(z)) the paper recommends in practice, or the saturating log(1 - D(G(z))) of the minimax game.
The generator is Chapter 4's (:class:`agm.nn.mlp.MLPGenerator`); its BatchNorm keeps the game balanced:
without it, at these settings, the discriminator had won within 3000 steps (D(G(z)) < 0.01, the samples
one noisy blob).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from agm.config import TrainConfig, from_dict, to_dict
from agm.gan.training import Adversarial, check_image_shape, fit_adversarial, sample
from agm.nn.mlp import MLPGenerator
from agm.registry import ModelSpec, TrainResult, register

# 21-23 ms per step measured over 50-100 steps at AGM_THREADS=1 (batch 64, a 2-core machine shared with
# other jobs): 50 000 steps, about 53 passes over the training images, take about 19 min, inside the
# 30 min of `train gan` (the kit's 10 000 samples at the end add under a minute).
GAN_STEPS = 50_000


def gan_training(steps: int = GAN_STEPS, **changes) -> TrainConfig:
    """``steps`` alternating updates on batches of 64; Adam at 2e-4 with beta_1 = 0.5 (Radford et al.)."""
    return TrainConfig(**{"steps": steps, "batch_size": 64, "lr": 2e-4, "betas": (0.5, 0.999)} | changes)


@dataclass
class GANConfig:
    latent_dim: int = 64
    hidden: int = 512  # width of the widest hidden layer of each network
    loss: str = "non-saturating"  # the generator's loss: "non-saturating" or "saturating"
    train: TrainConfig = field(default_factory=gan_training)  # one Adam each for generator and discriminator


class Discriminator(nn.Module):
    def __init__(self, config: GANConfig):
        super().__init__()
        h = config.hidden
        self.net = nn.Sequential(
            nn.Flatten(), nn.Linear(784, h), nn.LeakyReLU(0.2),
            nn.Linear(h, h // 2), nn.LeakyReLU(0.2),
            nn.Linear(h // 2, 1),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(check_image_shape(x)).squeeze(1)  # logit l(x), D(x) = sigmoid(l(x)): (B,)


class GAN(Adversarial):
    def __init__(self, config: GANConfig):
        super().__init__(config, MLPGenerator(config.latent_dim, config.hidden), Discriminator(config))


def fit(config: GANConfig, log_every: int = 500, log=print) -> tuple[GAN, dict]:
    """Train from an initialization seeded with ``config.train.seed``; returns the model and its logs."""
    torch.manual_seed(config.train.seed)
    return fit_adversarial(GAN(config), config.train, f"gan ({config.loss})", log_every, log)


def build(config: dict) -> GAN:
    return GAN(from_dict(GANConfig, config))


def train(seed: int = 0, parents: dict | None = None) -> TrainResult:
    """``train gan``: the default config under the runtime's budget (smoke: 20 steps of 32 images)."""
    config = GANConfig(train=gan_training().budgeted(seed))
    model, logs = fit(config)
    return TrainResult(model, to_dict(config), steps=config.train.steps, extra={"history": logs["history"]})


def spec() -> ModelSpec:
    """The model's entry for :mod:`agm.registry`."""
    return ModelSpec(
        name="gan", chapter=6, summary="GAN on MNIST: MLP generator and discriminator, non-saturating loss",
        build=build, train=train, evaluate=lambda model: {}, sample=sample,
        train_minutes=20.0, samples="generator outputs",
    )


register(spec())
