r"""GAN inversion on the DCGAN of Chapter 8, Chapter 12: given an image x, find a latent z with G(z) close to x.

Three methods, each returning latents (N, L) for images (N, 1, 28, 28):

- :func:`optimize_latents` — gradient descent on the pixel error ||G(z) - x||^2 over z (Adam), from
  ``restarts`` random starts per image, keeping the best (Creswell & Bharath, 2018; Lipton & Tripathi, 2017);
- an encoder E trained once by *latent regression*: on generated pairs (G(z), z), minimize ||E(G(z)) - z||^2
  (Donahue et al., 2017; the encoder of Zhu et al., 2016); inverting is then one forward pass;
- hybrid: the encoder's E(x) as the start of the optimization (Zhu et al., 2016).

The encoder is DCGAN's discriminator's convolutions with a linear map to z (:class:`agm.gan.bigan.Encoder`). It
is registered as ``dcgan-encoder``, which requires ``dcgan``: it inverts that generator and no other.
"""

from __future__ import annotations

import copy
import time
from dataclasses import dataclass, field

import torch
from torch import nn

from agm.config import TrainConfig, from_dict, to_dict
from agm.gan.bigan import Encoder
from agm.gan.training import check_image_shape
from agm.registry import ModelSpec, TrainResult, register
from agm.runtime import budget, device
from agm.train import gradient_step, run_steps

# 0.02-0.03 s per step at AGM_THREADS=1 (batch 64, C = 32); 6000 steps take about 3 min.
ENCODER_STEPS = 6000


@dataclass
class EncoderConfig:
    latent_dim: int = 100  # the generator's (dcgan's 100-d z)
    channels: int = 32  # C of the encoder's convolutions
    train: TrainConfig = field(default_factory=lambda: TrainConfig(steps=ENCODER_STEPS, batch_size=64, lr=2e-4,
                                                                   betas=(0.5, 0.999)))


@dataclass
class InversionResult:
    latents: torch.Tensor  # (N, L): the latent found for each image
    pixel_mse: torch.Tensor  # (N,): mean squared pixel error of G(z) against x
    seconds: float  # wall-clock time of the whole batch
    restart_errors: torch.Tensor | None = None  # (R, N): the error each restart reached (optimization only)


def pixel_error(generator: nn.Module, z: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """Mean squared pixel error of G(z) against x, per image: (N,)."""
    return (generator(z) - x).pow(2).flatten(1).mean(1)


def optimize_latents(generator: nn.Module, x: torch.Tensor, start: torch.Tensor | None = None, restarts: int = 1,
                     steps: int = 300, lr: float = 0.05, rng: torch.Generator | None = None,
                     latent_dim: int | None = None) -> InversionResult:
    """z* = argmin_z ||G(z) - x||^2 by Adam, from ``restarts`` starts per image, best kept (N images, (N, 1, 28, 28)).

    The starts are ``start`` (N, L) when given (a hybrid with an encoder; then ``restarts`` must be 1), else
    z ~ N(0, I) drawn from ``rng`` in ``latent_dim`` dimensions (default: a DCGAN generator's). All N x restarts
    latents are optimized as one batch; the generator is in eval mode (BatchNorm with running statistics), so
    each latent's error is its own and the sum's gradient with respect to one latent is that latent's gradient.
    The generator's weights are not changed."""
    check_image_shape(x)
    if start is not None and restarts != 1:
        raise ValueError("a given start is one start per image: use restarts=1")
    was_training = generator.training
    generator.eval()
    for p in generator.parameters():
        p.requires_grad_(False)
    begin = time.perf_counter()
    try:
        n = len(x)
        latent_dim = start.shape[1] if start is not None else latent_dim or generator.project.in_features
        if start is None:
            z0 = torch.randn(restarts, n, latent_dim, generator=rng)
        else:
            z0 = start.detach().clone()[None]  # (1, N, L)
        z = z0.reshape(restarts * n, latent_dim).requires_grad_(True)
        target = x.repeat(restarts, 1, 1, 1)  # (R N, 1, 28, 28): restart r of image i at row r N + i
        opt = torch.optim.Adam([z], lr=lr)
        for _ in range(steps):
            # $\min_z \sum_i \|G(z_i) - x_i\|^2$: the images do not interact, so one sum optimizes each
            loss = pixel_error(generator, z, target).sum()
            gradient_step(loss, opt, desc="GAN inversion")
        with torch.no_grad():
            errors = pixel_error(generator, z, target).view(restarts, n)
            best = errors.argmin(0)  # (N,): the best restart of each image
            latents = z.detach().view(restarts, n, latent_dim)[best, torch.arange(n)]
            final = errors[best, torch.arange(n)]
    finally:
        for p in generator.parameters():
            p.requires_grad_(True)
        generator.train(was_training)
    return InversionResult(latents, final, time.perf_counter() - begin, errors)


def encode_latents(encoder: nn.Module, generator: nn.Module, x: torch.Tensor) -> InversionResult:
    """z = E(x) in one forward pass, with the pixel error of G(E(x)); both networks in eval mode."""
    check_image_shape(x)
    enc_mode, gen_mode = encoder.training, generator.training
    encoder.eval()
    generator.eval()
    begin = time.perf_counter()
    with torch.no_grad():
        z = encoder(x)
        seconds = time.perf_counter() - begin
        errors = pixel_error(generator, z, x)
    encoder.train(enc_mode)
    generator.train(gen_mode)
    return InversionResult(z, errors, seconds)


def generator_jacobians(generator: nn.Module, z: torch.Tensor, h: float = 1e-5, chunk: int = 16) -> torch.Tensor:
    """The Jacobians dG/dz at latents z (N, L), (N, D, L) with D the pixels, by central differences on a float64
    copy of the generator in eval mode: one batch of 2L shifted latents per point, ``chunk`` points at a time."""
    g64 = copy.deepcopy(generator).double().eval()
    z = z.detach().double()
    n, latent_dim = z.shape
    shifts = h * torch.eye(latent_dim, dtype=torch.float64)  # (L, L): one coordinate step per row
    out = []
    with torch.no_grad():
        for i in range(0, n, chunk):
            points = z[i:i + chunk, None, :]  # (c, 1, L)
            # $\partial G / \partial z_j \approx (G(z + h e_j) - G(z - h e_j)) / 2h$
            shifted = torch.cat([points + shifts, points - shifts], dim=1)  # (c, 2L, L)
            images = g64(shifted.reshape(-1, latent_dim)).reshape(len(points), 2, latent_dim, -1)  # (c, 2, L, D)
            out.append(((images[:, 0] - images[:, 1]) / (2 * h)).transpose(1, 2))  # (c, D, L)
    return torch.cat(out)


def latent_regression_loss(encoder: nn.Module, generator: nn.Module, z: torch.Tensor) -> tuple[torch.Tensor, dict]:
    """||E(G(z)) - z||^2 summed over coordinates, averaged over the batch, on fresh generated images."""
    with torch.no_grad():
        x = generator(z)  # (B, 1, 28, 28), no gradient to G
    # $\mathcal{L}_E = \mathbb{E}_z \|E(G(z)) - z\|^2$
    loss = (encoder(x) - z).pow(2).sum(1).mean()
    return loss, {"relative_error": (loss / z.pow(2).sum(1).mean()).detach()}


def fit_encoder(generator: nn.Module, config: EncoderConfig, log_every: int = 500, log=print) -> tuple[Encoder, dict]:
    """Train E by latent regression against the fixed generator (eval mode) from a seeded initialization."""
    torch.manual_seed(config.train.seed)
    rng = torch.Generator().manual_seed(config.train.seed)
    dev = device()
    encoder = Encoder(config).to(dev)
    generator = generator.to(dev).eval()
    for p in generator.parameters():
        p.requires_grad_(False)
    opt = config.train.adam(encoder.parameters())

    def step_fn(step: int) -> dict:
        z = torch.randn(config.train.batch_size, config.latent_dim, generator=rng).to(dev)
        loss, logs = latent_regression_loss(encoder, generator, z)
        return {"loss": gradient_step(loss, opt, desc="latent regression", step=step), **logs}

    def after_step(step: int, logs: dict) -> None:
        if step % log_every == 0 or step == config.train.steps:
            relative = float(logs["relative_error"])
            log(f"dcgan-encoder step {step}: loss {logs['loss']:.4f}, relative error {relative:.4f}")

    history = run_steps(step_fn, config.train.steps, log_every, desc="dcgan-encoder", on_step=after_step,
                        modules=[encoder])
    for p in generator.parameters():
        p.requires_grad_(True)
    return encoder.cpu().eval(), {"history": history}


def fit_toy_regressor(g_fn, steps: int = 1500, seed: int = 0, hidden: int = 64, batch_size: int = 256,
                      lr: float = 3e-3) -> nn.Module:
    """Latent regression in one dimension: a network E: R -> R with two tanh layers of ``hidden`` units, trained
    by Adam on E[(E(g(z)) - z)^2] for z ~ N(0, 1) drawn fresh each step (Chapter 12's check of the optimum)."""
    torch.manual_seed(seed)
    net = nn.Sequential(nn.Linear(1, hidden), nn.Tanh(), nn.Linear(hidden, hidden), nn.Tanh(), nn.Linear(hidden, 1))
    opt = torch.optim.Adam(net.parameters(), lr=lr)
    rng = torch.Generator().manual_seed(seed)
    for step in range(1, steps + 1):
        z = torch.randn(batch_size, 1, generator=rng)
        gradient_step(((net(g_fn(z)) - z) ** 2).mean(), opt, desc="latent regression (1-D)", step=step)
    return net.eval()


def reconstruction_report(generator: nn.Module, result: InversionResult, x: torch.Tensor) -> dict[str, float]:
    """Mean pixel MSE of G(z*) against x, the share of images for which the kit's classifier reads the same digit
    in x and G(z*), and seconds per image."""
    from agm.metrics import classifier_outputs

    with torch.no_grad():
        recon = generator.eval()(result.latents)
    agree = (classifier_outputs(x)[1].argmax(1) == classifier_outputs(recon)[1].argmax(1)).double().mean().item()
    return {"pixel_mse": result.pixel_mse.mean().item(), "label_agreement": agree,
            "seconds_per_image": result.seconds / len(x)}


def evaluate(encoder: Encoder, n: int | None = None) -> dict[str, float]:
    """The encoder's inversion of ``dcgan`` on n held-out test digits (1000; smoke 100), by
    :func:`reconstruction_report`."""
    from agm import registry
    from agm.data import mnist

    generator = registry.load_model("dcgan")[0].generator
    x = mnist("test")[0][: n or budget(1000, 100)]
    report = reconstruction_report(generator, encode_latents(encoder, generator, x), x)
    return {"pixel_mse": report["pixel_mse"], "label_agreement": report["label_agreement"], "n_test": len(x)}


def build(config: dict) -> Encoder:
    return Encoder(from_dict(EncoderConfig, config))


def train(seed: int = 0, parents: dict | None = None) -> TrainResult:
    """``train dcgan-encoder``: latent regression against the shipped dcgan's generator."""
    config = EncoderConfig()
    config.train = config.train.budgeted(seed)
    encoder, logs = fit_encoder(parents["dcgan"].generator, config)
    return TrainResult(encoder, to_dict(config), steps=config.train.steps, extra={"history": logs["history"]})


register(ModelSpec(
    name="dcgan-encoder", chapter=12, summary="an encoder that inverts dcgan's generator, trained by latent regression",
    build=build, train=train, evaluate=evaluate, requires=("dcgan",), train_minutes=4.0,
))
