r"""A conditional GAN on MNIST, Chapter 9: the DCGAN of Chapter 8 (:mod:`agm.gan.dcgan`) given the digit y.

- generator (Mirza & Osindero, 2014): a learned label embedding e_y concatenated to z, then DCGAN's
  generator. Its first layer is linear, so W [z; e_y] = W_z z + W_e e_y: the label adds a learned vector
  per class to the (2C, 7, 7) map, the family that concatenating a one-hot y gives once E >= 10.
- discriminator (Miyato & Koyama, 2018): DCGAN's convolutions give features phi(x), (B, 2C * 49), and
  the logit is the projection l(x, y) = psi(phi(x)) + <v_y, phi(x)>, psi DCGAN's own logit layer.

Why projection: the optimal discriminator's logit is the log density ratio of real and generated pairs,
  l*(x, y) = log p(x, y) / q(x, y) = log p(y | x) / q(y | x) + log p(x) / q(x).
Write each conditional as a softmax on shared features, log p(y | x) = <v^p_y, phi(x)> - log Z^p(x), and
the same for q: then l* = <v^p_y - v^q_y, phi(x)> + [log p(x) / q(x) - log Z^p(x) + log Z^q(x)], an inner
product with one vector per class plus a function of x alone, psi(phi(x)). Feeding y to the
discriminator's input instead (concatenation) leaves the network to find this form by itself.

The generated pairs take the real batch's labels (:func:`agm.gan.training.train_step`): real and
generated pairs then have the same label marginal and can differ only in x given y.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from agm.config import TrainConfig, from_dict, to_dict
from agm.gan import dcgan
from agm.gan.training import Adversarial, check_image_shape, fit_adversarial
from agm.registry import ModelSpec, TrainResult, register
from agm.runtime import budget

# DCGAN's width and run (:mod:`agm.gan.dcgan`): 0.11 s per step against DCGAN's 0.08 s, measured over 60 steps at
# AGM_THREADS=1 (batch 64, C = 32, a 2-core machine shared with other jobs), and 8.5-12 s per measurement of
# 2000 samples with the label accuracy: 20 000 steps and 21 measurements take about 40 min on one core.
CGAN_STEPS = dcgan.DCGAN_STEPS


def cgan_training(steps: int = CGAN_STEPS, **changes) -> TrainConfig:
    """DCGAN's run (:func:`agm.gan.dcgan.dcgan_training`): batches of 64, Adam at 2e-4 with beta_1 = 0.5."""
    return dcgan.dcgan_training(steps, **changes)


@dataclass
class CGANConfig:
    latent_dim: int = 100  # DCGAN's 100-d z
    channels: int = 32  # C: DCGAN's maps (2C, 7, 7) and (C, 14, 14) in both networks
    num_classes: int = 10  # the digits 0..9
    label_dim: int = 10  # E: the generator's label embedding e_y (E >= num_classes: as rich as a one-hot y)
    loss: str = "non-saturating"  # the generator's loss
    fid_every: int | None = 1000  # steps between measurements (FID, label accuracy) during fit; None = none
    fid_samples: int = 2000  # samples per measurement during fit
    train: TrainConfig = field(default_factory=cgan_training)  # one Adam each for generator and discriminator

    def as_dcgan(self, generator_input: int) -> dcgan.DCGANConfig:
        """The DCGAN whose networks these are, its generator taking a ``generator_input``-d vector."""
        return dcgan.DCGANConfig(latent_dim=generator_input, channels=self.channels)


def check_labels(labels: torch.Tensor, n: int, num_classes: int) -> torch.Tensor:
    """Labels must be n integers (torch.long) in 0..num_classes - 1."""
    ok = (isinstance(labels, torch.Tensor) and labels.shape == (n,) and labels.dtype == torch.long
          and bool(((labels >= 0) & (labels < num_classes)).all()))
    if not ok:
        got = f"shape {list(labels.shape)}, dtype {labels.dtype}" if isinstance(labels, torch.Tensor) else repr(labels)
        raise ValueError(f"labels must be [{n}] integers (torch.long) in 0..{num_classes - 1}, got {got}")
    return labels


def projection_logit(phi: torch.Tensor, psi: nn.Linear, embed: nn.Embedding, labels: torch.Tensor) -> torch.Tensor:
    """The projection discriminator's logit on features phi (B, F) and labels y (B,): (B,)."""
    # $l(x, y) = \psi(\phi(x)) + \langle v_y, \phi(x) \rangle$
    return psi(phi).squeeze(1) + (embed(labels) * phi).sum(1)


class Generator(nn.Module):
    """G(z, y) = DCGAN's generator on [z; e_y]."""

    def __init__(self, config: CGANConfig):
        super().__init__()
        self.num_classes = config.num_classes
        # e_y keeps nn.Embedding's N(0, 1) init, the scale of z and of a one-hot code's 1 (N(0, 0.02)
        # would leave the label almost silent in W_e e_y until Adam had grown it)
        self.embed = nn.Embedding(config.num_classes, config.label_dim)
        self.net = dcgan.Generator(config.as_dcgan(config.latent_dim + config.label_dim))

    def forward(self, z: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        check_labels(labels, len(z), self.num_classes)
        zy = torch.cat([z, self.embed(labels)], dim=1)  # (B, L + E)
        return self.net(zy)  # (B, 1, 28, 28) in [0, 1]


class Discriminator(nn.Module):
    """The projection discriminator on DCGAN's discriminator: phi is its network up to the logit, psi the logit."""

    def __init__(self, config: CGANConfig):
        super().__init__()
        self.num_classes = config.num_classes
        net = dcgan.Discriminator(config.as_dcgan(config.latent_dim)).net
        self.phi = net[:-1]  # (B, 1, 28, 28) -> (B, 2C * 49), flattened after BatchNorm and LeakyReLU
        self.psi = net[-1]  # (B, 2C * 49) -> (B, 1): the unconditional term
        # v_y, one per class, drawn like psi's weights (N(0, 0.02)): both terms start on the same scale
        self.embed = nn.Embedding(config.num_classes, self.psi.in_features)
        nn.init.normal_(self.embed.weight, 0.0, dcgan.INIT_STD)

    def forward(self, x: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        phi = self.phi(check_image_shape(x))  # (B, 2C * 49)
        return projection_logit(phi, self.psi, self.embed, check_labels(labels, len(x), self.num_classes))  # (B,)


class CGAN(Adversarial):
    conditional = True

    def __init__(self, config: CGANConfig):
        super().__init__(config, Generator(config), Discriminator(config))
        self.apply(dcgan.init_weights)  # convolutions and linear layers N(0, 0.02); embeddings as set above


def fit(config: CGANConfig, log_every: int = 500, log=print) -> tuple[CGAN, dict]:
    """Train from an initialization seeded with ``config.train.seed``; returns the model and
    ``{"history": [...], "fid": [...]}``, the kit and the label accuracy every ``config.fid_every`` steps."""
    torch.manual_seed(config.train.seed)
    return fit_adversarial(CGAN(config), config.train, f"cgan ({config.loss})", log_every, log,
                           fid_every=config.fid_every, fid_samples=config.fid_samples)


def sample(model: CGAN, n: int, generator: torch.Generator, labels: torch.Tensor | None = None) -> torch.Tensor:
    """``spec.sample``: G(z, y) for n latents and n labels (None: the digits 0..9 in turn), (n, 1, 28, 28)."""
    if labels is None:
        labels = torch.arange(n) % model.config.num_classes
    return model.generate(n, generator, check_labels(labels, n, model.config.num_classes))


def evaluate(model: CGAN, n: int | None = None, seed: int = 0) -> dict[str, float]:
    """The label accuracy of n samples (10 000; smoke 500) drawn for the digits 0..9 in turn, overall and per digit."""
    from agm.metrics import label_accuracy

    n = n or budget(10_000, 500)
    labels = torch.arange(n) % model.config.num_classes
    images = sample(model, n, torch.Generator().manual_seed(seed), labels)
    accuracy, per_class = label_accuracy(images, labels, model.config.num_classes)
    return {"label_accuracy": accuracy, **{f"label_accuracy_{c}": a for c, a in enumerate(per_class.tolist())}}


def build(config: dict) -> CGAN:
    return CGAN(from_dict(CGANConfig, config))


def train(seed: int = 0, parents: dict | None = None) -> TrainResult:
    """``train cgan``: the default config under the runtime's budget, with FID and label accuracy over training."""
    config = CGANConfig(fid_every=budget(1000, 10), fid_samples=budget(2000, 200),
                        train=cgan_training().budgeted(seed))
    model, logs = fit(config)
    return TrainResult(model, to_dict(config), steps=config.train.steps,
                       extra={"history": logs["history"], "fid_curve": logs["fid"]})


def spec() -> ModelSpec:
    """The model's entry for :mod:`agm.registry`."""
    return ModelSpec(
        name="cgan", chapter=9,
        summary="conditional DCGAN on MNIST: label embedding in G, projection discriminator",
        build=build, train=train, evaluate=evaluate, sample=sample, conditional=True, num_classes=10,
        train_minutes=40.0, samples="generator outputs",
    )


register(spec())
