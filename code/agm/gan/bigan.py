r"""BiGAN (Donahue, Krähenbühl & Darrell, 2017) / ALI (Dumoulin et al., 2017) on MNIST, Chapter 11.

A generator x = G(z) and an encoder z = E(x) play against one discriminator over pairs (x, z): real
pairs (x, E(x)) with x from the data, generated pairs (G(z), z) with z ~ N(0, I). At the optimum the
two joint distributions agree, and E inverts G (Donahue et al., Theorem 2). The discriminator ascends
the GAN value on pairs; the generator and the encoder descend it together, with the labels of the two
kinds of pair swapped (the non-saturating form, as Donahue et al.'s code does).

Networks: DCGAN's generator (:mod:`agm.gan.dcgan`); an encoder that mirrors it, DCGAN's discriminator's
convolutions with a linear map to z; and a joint discriminator that reads x through the same
convolutions and z through a linear layer, then concatenates the two into a small MLP. The encoder is
deterministic, as in BiGAN (ALI's is Gaussian). The latent is z ~ N(0, I) in 50 dimensions (Donahue et al.
draw theirs uniformly from a cube).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from agm.config import TrainConfig, from_dict, to_dict
from agm.data import mnist
from agm.gan import dcgan
from agm.gan.losses import discriminator_loss
from agm.gan.training import Adversarial, check_image_shape, fit_adversarial, sample
from agm.registry import ModelSpec, TrainResult, refuse_labels, register
from agm.runtime import budget
from agm.train import gradient_step

# 0.13-0.21 s per step at AGM_THREADS=1 (batch 64, C = 32) on a 2-core machine shared with other jobs, and
# about 10 s per FID point of 2000 samples: 10 000 steps with 11 points took 27.6 min.
BIGAN_STEPS = 10_000


def bigan_training(steps: int = BIGAN_STEPS, **changes) -> TrainConfig:
    """DCGAN's optimizer (:func:`agm.gan.dcgan.dcgan_training`): batches of 64, Adam at 2e-4 with beta_1 = 0.5."""
    return dcgan.dcgan_training(steps, **changes)


@dataclass
class BiGANConfig:
    latent_dim: int = 50  # half of DCGAN's 100: the codes are the features that the probes read
    channels: int = 32  # C of DCGAN's networks, in G, E and the discriminator's image path
    hidden: int = 256  # the discriminator's z path and joint layer
    loss: str = "non-saturating"  # the generator's and the encoder's: swapped labels
    fid_every: int | None = 1000  # steps between FID measurements during fit; None = none
    fid_samples: int = 2000  # samples per FID measurement during fit
    train: TrainConfig = field(default_factory=bigan_training)  # one Adam for G and E together, one for D


def check_latent_shape(z: torch.Tensor, latent_dim: int) -> torch.Tensor:
    if z.ndim != 2 or z.shape[1] != latent_dim:
        raise ValueError(f"the latent must have shape [B, {latent_dim}], got {list(z.shape)}")
    return z


class Encoder(nn.Module):
    """E(x): DCGAN's discriminator's convolutions (28 -> 14 -> 7), then one linear map to z, (B, L)."""

    def __init__(self, config: BiGANConfig):
        super().__init__()
        C = config.channels
        self.net = nn.Sequential(
            nn.Conv2d(1, C, 4, stride=2, padding=1), nn.LeakyReLU(0.2),  # 28 -> 14
            nn.Conv2d(C, 2 * C, 4, stride=2, padding=1, bias=False), nn.BatchNorm2d(2 * C), nn.LeakyReLU(0.2),  # -> 7
            nn.Flatten(), nn.Linear(2 * C * 7 * 7, config.latent_dim),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(check_image_shape(x))


class JointDiscriminator(nn.Module):
    """The logit l(x, z), (B,): x through DCGAN's discriminator's convolutions, z through a linear layer,
    the two concatenated into an MLP with one hidden layer."""

    def __init__(self, config: BiGANConfig):
        super().__init__()
        C, H = config.channels, config.hidden
        self.latent_dim = config.latent_dim
        self.x_path = nn.Sequential(
            nn.Conv2d(1, C, 4, stride=2, padding=1), nn.LeakyReLU(0.2),
            nn.Conv2d(C, 2 * C, 4, stride=2, padding=1, bias=False), nn.BatchNorm2d(2 * C), nn.LeakyReLU(0.2),
            nn.Flatten(),  # (B, 2C * 49)
        )
        self.z_path = nn.Sequential(nn.Linear(config.latent_dim, H), nn.LeakyReLU(0.2))  # (B, H)
        self.joint = nn.Sequential(nn.Linear(2 * C * 7 * 7 + H, H), nn.LeakyReLU(0.2), nn.Linear(H, 1))

    def forward(self, x: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        check_latent_shape(z, self.latent_dim)
        if len(x) != len(z):
            raise ValueError(f"one latent per image: {len(x)} images and {len(z)} latents")
        h = torch.cat([self.x_path(check_image_shape(x)), self.z_path(z)], dim=1)
        return self.joint(h).squeeze(1)


class BiGAN(Adversarial):
    """G(z), E(x) and the joint discriminator l(x, z); :meth:`logits` takes pairs."""

    def __init__(self, config: BiGANConfig):
        super().__init__(config, dcgan.Generator(config), JointDiscriminator(config))
        self.encoder = Encoder(config)
        self.apply(dcgan.init_weights)

    def generator_side(self) -> list[nn.Parameter]:
        """G's and E's parameters: one optimizer moves both against the discriminator."""
        return [*self.generator.parameters(), *self.encoder.parameters()]

    def logits(self, x: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        """l(x, z) on pairs: (B, 1, 28, 28) images and (B, L) latents -> (B,)."""
        return self.discriminator(x, z)

    @torch.no_grad()
    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """E(x) for images (B, 1, 28, 28) in [0, 1], (B, L) on the CPU; BatchNorm uses running statistics."""
        was_training = self.encoder.training
        self.encoder.eval()
        z = self.encoder(x.to(next(self.parameters()).device)).cpu()
        self.encoder.train(was_training)
        return z

    @torch.no_grad()
    def reconstruct(self, x: torch.Tensor) -> torch.Tensor:
        """G(E(x)), (B, 1, 28, 28) on the CPU, both networks with running statistics."""
        z = self.encode(x)
        was_training = self.generator.training
        self.generator.eval()
        out = self.generator(z.to(next(self.parameters()).device)).cpu()
        self.generator.train(was_training)
        return out


def train_step(model: BiGAN, opt_ge: torch.optim.Optimizer, opt_d: torch.optim.Optimizer, real: torch.Tensor,
               generator: torch.Generator, labels: torch.Tensor | None = None) -> dict[str, float]:
    """One discriminator update on the pairs (x, E(x)) and (G(z), z), then one update of G and E together."""
    refuse_labels(labels)
    z = model.latents(len(real), generator)  # (B, L)
    fake, z_real = model.generator(z), model.encoder(real)  # (B, 1, 28, 28), (B, L)
    # 1. the discriminator: real pairs (x, E(x)) against generated pairs (G(z), z), both detached
    d_loss, d_logs = discriminator_loss(model.logits(real, z_real.detach()), model.logits(fake.detach(), z))
    d_value = gradient_step(d_loss, opt_d, desc="BiGAN discriminator")
    # 2. G and E against the updated discriminator, the pairs' labels swapped:
    # $-\log D(G(z), z) - \log(1 - D(x, E(x)))$
    ge_loss, _ = discriminator_loss(model.logits(fake, z), model.logits(real, z_real))
    ge_value = gradient_step(ge_loss, opt_ge, desc="BiGAN generator and encoder")
    return {"d_loss": d_value, "g_loss": ge_value, **d_logs}


def fit(config: BiGANConfig, log_every: int = 500, log=print) -> tuple[BiGAN, dict]:
    """Train from an initialization seeded with ``config.train.seed``; returns the model and
    ``{"history": [...], "fid": [...]}``, the kit on the generator's samples every ``config.fid_every`` steps."""
    torch.manual_seed(config.train.seed)
    return fit_adversarial(BiGAN(config), config.train, "bigan", log_every, log, fid_every=config.fid_every,
                           fid_samples=config.fid_samples, step=train_step)


def probe_scores(fn, n_train: int | None = None, n_test: int | None = None) -> dict[str, float]:
    """1-NN (Euclidean and cosine) and linear-probe test accuracy of the features fn(x), fitted on the first
    ``n_train`` training images (60 000; smoke 2000) and tested on the first ``n_test`` test images (10 000; 500)."""
    from agm import probe

    x_train, y_train = mnist("trainval")
    x_test, y_test = mnist("test")
    n_train, n_test = n_train or budget(len(x_train), 2000), n_test or budget(len(x_test), 500)
    x_train, y_train, x_test, y_test = x_train[:n_train], y_train[:n_train], x_test[:n_test], y_test[:n_test]
    f_train, f_test = probe.features(fn, x_train), probe.features(fn, x_test)
    linear = probe.linear_probe(f_train, y_train, f_test, y_test)
    return {"dimensions": f_train.shape[1],
            "nn_accuracy": probe.nearest_neighbour_accuracy(f_train, y_train, f_test, y_test),
            "nn_accuracy_cosine": probe.nearest_neighbour_accuracy(f_train, y_train, f_test, y_test, "cosine"),
            "linear_probe_accuracy": linear["test_accuracy"], "linear_probe_train_accuracy": linear["train_accuracy"],
            "n_train": n_train, "n_test": n_test}


def evaluate(model: BiGAN) -> dict[str, float]:
    """The encoder's features E(x) under :func:`probe_scores`, and the pixel MSE of the reconstructions G(E(x))
    of the test images (10 000; smoke 500)."""
    from agm import probe

    scores = probe_scores(model.encode)
    x_test = mnist("test")[0][: scores["n_test"]]
    reconstructions = probe.features(model.reconstruct, x_test).view_as(x_test)
    return {"nn_accuracy": scores["nn_accuracy"], "nn_accuracy_cosine": scores["nn_accuracy_cosine"],
            "linear_probe_accuracy": scores["linear_probe_accuracy"],
            "linear_probe_train_accuracy": scores["linear_probe_train_accuracy"],
            "reconstruction_mse": (reconstructions - x_test).pow(2).mean().item(),
            "probe_n_train": scores["n_train"], "probe_n_test": scores["n_test"]}


def probe_table(model: BiGAN, n_train: int | None = None, n_test: int | None = None) -> dict[str, dict[str, float]]:
    """:func:`probe_scores` of three feature extractors: the encoder E(x), the same architecture untrained (seed 0),
    and the raw pixels."""
    torch.manual_seed(0)
    untrained = BiGAN(model.config).eval()
    extractors = {"encoder": model.encode, "untrained encoder": untrained.encode, "raw pixels": lambda x: x}
    return {name: probe_scores(fn, n_train, n_test) for name, fn in extractors.items()}


def evaluate_full(model: BiGAN) -> dict:
    """``evaluate bigan --full``: :func:`probe_table` on all 60 000 training and 10 000 test images (minutes: the
    raw pixels' 1-NN and linear probe in 784 dimensions)."""
    return {"probe_table": probe_table(model)}


def build(config: dict) -> BiGAN:
    return BiGAN(from_dict(BiGANConfig, config))


def train(seed: int = 0, parents: dict | None = None) -> TrainResult:
    """``train bigan``: the default config under the runtime's budget, with FID over training."""
    config = BiGANConfig(fid_every=budget(1000, 10), fid_samples=budget(2000, 200),
                         train=bigan_training().budgeted(seed))
    model, logs = fit(config)
    return TrainResult(model, to_dict(config), steps=config.train.steps,
                       extra={"history": logs["history"], "fid_curve": logs["fid"]})


def spec() -> ModelSpec:
    """The model's entry for :mod:`agm.registry`."""
    return ModelSpec(
        name="bigan", chapter=11, summary="BiGAN on MNIST: DCGAN's generator, an encoder, a joint discriminator",
        build=build, train=train, evaluate=evaluate, evaluate_full=evaluate_full, sample=sample, train_minutes=28.0,
        samples="generator outputs",
    )


register(spec())
