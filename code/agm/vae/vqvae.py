"""Vector-quantized variational autoencoders (van den Oord et al., 2017), Chapter 23.

A convolutional encoder maps a binarized digit to a 7x7 grid of D-dimensional vectors z_e; each is
replaced by its nearest entry of a codebook of K vectors (z_q); a decoder maps z_q to Bernoulli
logits. Gradients pass the quantizer by the straight-through estimator; the codebook follows the
encoder outputs by exponential moving averages (online k-means) or by the codebook loss; a code left
unused for ``dead_after`` steps is restarted at an encoder output of the current batch. New digits
come from a causal-transformer prior over the 49 codes (:mod:`agm.vae.code_prior`), trained after the
autoencoder on the codes of the training set.
"""

from __future__ import annotations

import argparse
import math
import time
from collections.abc import Iterator
from dataclasses import dataclass, field

import torch
from torch import nn

from agm.config import TrainConfig, from_dict, to_dict
from agm.data import batches, binarize, binarized_test_set, check_images, mnist
from agm.distributions import bernoulli_log_likelihood, mean_and_standard_error
from agm.nn.conv import GRID, grid_decoder, grid_encoder
from agm.registry import ModelSpec, TrainResult, refuse_labels, register
from agm.runtime import budget, device
from agm.train import gradient_step, run_steps, train_loop
from agm.vae.code_prior import CodePrior, CodePriorConfig
from agm.vae.quantizer import (
    CODEBOOK_UPDATES,
    VectorQuantizer,
    code_histogram,
    perplexity,
    quantize,
    straight_through,
    vq_losses,
)

TARGETS = ("gray", "binary")


def vqvae_training(steps: int = 5000, **changes) -> TrainConfig:
    """Adam at 1e-3 with a cosine decay to 1e-4 over ``steps``, batches of 128 (autoencoder and prior alike)."""
    return TrainConfig(**{"steps": steps, "batch_size": 128, "lr": 1e-3, "lr_final": 1e-4} | changes)


@dataclass
class VQVAEConfig:
    # the autoencoder
    channels: int = 64  # width of every convolution of the encoder and decoder
    res_blocks: int = 2  # residual blocks at 7x7, in the encoder and again in the decoder
    codebook_size: int = 32  # K codes; at most 49 log K nats per image
    code_dim: int = 16  # D, the dimension of a code vector
    beta: float = 0.25  # commitment weight (the paper's value)
    codebook_update: str = "ema"  # "ema": moving averages (online k-means); "loss": Adam on the codebook term
    ema_decay: float = 0.99  # gamma of the moving averages
    ema_epsilon: float = 1e-5  # Laplace smoothing of the cluster sizes
    dead_after: int = 100  # restart a code unused for this many steps at an encoder output; 0 = never
    target: str = "gray"  # decoder target: "gray" levels (expected NLL of a fresh binarization) or the "binary" input
    train: TrainConfig = field(default_factory=vqvae_training)
    # the prior over the grid of codes (agm.vae.code_prior), trained after the autoencoder
    prior: CodePriorConfig = field(default_factory=CodePriorConfig)
    prior_train: TrainConfig = field(default_factory=vqvae_training)


# -- the network ------------------------------------------------------------------------------------

def encoder(config: VQVAEConfig) -> nn.Sequential:
    """(B, 1, 28, 28) -> (B, D, 7, 7)."""
    return grid_encoder(config.channels, config.res_blocks, config.code_dim)


def decoder(config: VQVAEConfig) -> nn.Sequential:
    """(B, D, 7, 7) -> Bernoulli logits (B, 1, 28, 28), mirroring the encoder."""
    return grid_decoder(config.channels, config.res_blocks, config.code_dim)


class VQVAE(nn.Module):
    """Encoder, quantizer and decoder, and the prior over the code grid that turns them into a sampler."""

    def __init__(self, config: VQVAEConfig):
        super().__init__()
        if config.target not in TARGETS:
            raise ValueError(f"target must be one of {TARGETS}, got {config.target!r}")
        if config.codebook_update not in CODEBOOK_UPDATES:
            raise ValueError(f"codebook_update must be one of {CODEBOOK_UPDATES}, got {config.codebook_update!r}")
        if config.codebook_size < 2 or config.code_dim < 1 or config.beta < 0 or not 0 <= config.ema_decay < 1:
            raise ValueError(f"need codebook_size >= 2, code_dim >= 1, beta >= 0, 0 <= ema_decay < 1; got {config}")
        self.config = config
        self.encoder = encoder(config)
        self.quantizer = VectorQuantizer(config.codebook_size, config.code_dim, config.codebook_update,
                                         config.ema_decay, config.ema_epsilon, config.dead_after)
        self.decoder = decoder(config)
        self.prior = CodePrior(config.prior, config.codebook_size, GRID * GRID)

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """Encoder outputs z_e, channels last: (B, 7, 7, D)."""
        check_images(x)
        return self.encoder(x).permute(0, 2, 3, 1)

    def decode(self, z_q: torch.Tensor) -> torch.Tensor:
        """Bernoulli logits (B, 1, 28, 28) from a grid of code vectors (B, 7, 7, D)."""
        return self.decoder(z_q.permute(0, 3, 1, 2))

    def codes(self, x: torch.Tensor) -> torch.Tensor:
        """The nearest-code indices of each image: (B, 7, 7)."""
        return quantize(self.encode(x), self.quantizer.codebook)[1]

    def decode_codes(self, codes: torch.Tensor) -> torch.Tensor:
        """Bernoulli logits (B, 1, 28, 28) of a grid of code indices (B, 7, 7)."""
        K = self.config.codebook_size
        if codes.ndim != 3 or tuple(codes.shape[1:]) != (GRID, GRID) or codes.dtype != torch.long:
            raise ValueError(f"codes must be a long tensor [B, {GRID}, {GRID}], got {codes.dtype} {list(codes.shape)}")
        if len(codes) and (codes.min() < 0 or codes.max() >= K):
            raise ValueError(f"codes must lie in 0..{K - 1}")
        return self.decode(self.quantizer.codebook[codes])

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        z_e = self.encode(x)  # (B, 7, 7, D)
        z_q, indices = quantize(z_e, self.quantizer.codebook)  # (B, 7, 7, D), (B, 7, 7)
        logits = self.decode(straight_through(z_e, z_q))  # (B, 1, 28, 28)
        return {"logits": logits, "z_e": z_e, "z_q": z_q, "indices": indices}

    @torch.no_grad()
    def sample(self, n: int, generator: torch.Generator | None = None, temperature: float = 1.0,
               prior: str = "learned", mean: bool = True) -> torch.Tensor:
        """Codes from the learned prior (or uniformly at random), decoded: pixel probabilities or one draw."""
        if prior == "learned":
            codes = self.prior.sample(n, generator, temperature).view(n, GRID, GRID)
        elif prior == "uniform":
            codes = torch.randint(self.config.codebook_size, (n, GRID, GRID), generator=generator)
        else:
            raise ValueError(f"prior must be 'learned' or 'uniform', got {prior!r}")
        dev = self.quantizer.codebook.device
        probs = torch.sigmoid(self.decode_codes(codes.to(dev))).cpu()
        return probs if mean else torch.bernoulli(probs, generator=generator)


# -- training -----------------------------------------------------------------------------------------

def decoder_nll(model: VQVAE, z: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """-log p(target | z) in nats per image, the decoder reading the grid z (B, 7, 7, D) directly: (B,).

    At z = z_e + sg[z_q - z_e] it is the distortion term of :func:`loss`; as a function of z, the decoder's loss
    l(z) whose gradient at z_q the straight-through estimator hands to the encoder (Chapter 23).
    """
    # $\ell(z) = -\log p_\theta(x \mid z)$, Bernoulli pixels with logits $\mathrm{dec}_\theta(z)$
    return -bernoulli_log_likelihood(model.decode(z), target)


def loss(model: VQVAE, x: torch.Tensor, target: torch.Tensor | None = None) -> tuple[torch.Tensor, dict]:
    """The batch mean of -log p(target|z_q(x)) + [codebook term, codebook loss only] + commitment term.

    ``target`` defaults to the input x; gray levels in [0, 1] give the expected -log p of a fresh
    binarization. Returns the loss and the per-image terms (detached) with the batch's z_e and codes.
    """
    out = model(x)
    distortion = -bernoulli_log_likelihood(out["logits"], x if target is None else target)  # (B,), nats
    vq = vq_losses(out["z_e"], out["z_q"], model.config.beta)
    total = distortion + vq["commitment"]
    if model.config.codebook_update == "loss":
        total = total + vq["codebook"]
    terms = {"distortion": distortion, **vq, "z_e": out["z_e"], "indices": out["indices"]}
    return total.mean(), {k: v.detach() for k, v in terms.items()}


def autoencoder_step(model: VQVAE, optimizer: torch.optim.Optimizer, scheduler,
                     batch: tuple[torch.Tensor, torch.Tensor], generator: torch.Generator) -> dict[str, float]:
    """One Adam step on the loss, then the quantizer's EMA step and restarts; the batch's diagnostics."""
    value, terms = loss(model, *batch)
    loss_value = gradient_step(value, optimizer, desc="vq-vae")
    scheduler.step()
    model.quantizer.update(terms["z_e"].reshape(-1, model.config.code_dim), terms["indices"].flatten(), generator)
    counts = code_histogram(terms["indices"], model.config.codebook_size)
    return {"loss": loss_value, "distortion": terms["distortion"].mean().item(),
            "commitment": terms["commitment"].mean().item(), "codebook": terms["codebook"].mean().item(),
            "perplexity": perplexity(counts), "codes_used": int((counts > 0).sum()),
            "restarts": model.quantizer.restarts}


def fit_autoencoder(model: VQVAE, x: torch.Tensor, generator: torch.Generator, log=print,
                    log_every: int = 100) -> list[dict[str, float]]:
    """Adam on freshly binarized batches; after every step the quantizer's EMA step and restarts."""
    c, train, dev = model.config, model.config.train, model.quantizer.codebook.device
    params = [p for name, p in model.named_parameters() if p.requires_grad and not name.startswith("prior.")]
    optimizer = train.adam(params)
    scheduler = train.scheduler(optimizer)
    data = training_pairs(x, train.batch_size, c.target, generator, dev)
    start = time.perf_counter()

    def report(step: int, logs: dict) -> None:
        if step % log_every == 0 or step == train.steps:
            log(f"vq-vae step {step}/{train.steps}: distortion {logs['distortion']:.2f} nats, perplexity "
                f"{logs['perplexity']:.1f}, {time.perf_counter() - start:.0f} s")

    return run_steps(lambda step: autoencoder_step(model, optimizer, scheduler, next(data), generator), train.steps,
                     log_every, desc="vq-vae", on_step=report, modules=[model])


def training_pairs(x: torch.Tensor, batch_size: int, target: str, generator: torch.Generator,
                   dev: torch.device | None = None) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Endless (input, target) batches: a fresh binarization of gray images x, and x itself or the input."""

    def pair(images: torch.Tensor, g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        binary = binarize(images, g)
        return binary, (images if target == "gray" else binary)

    return batches(x, batch_size=batch_size, generator=generator, transform=pair, device=dev, drop_last=True)


def code_batches(model: VQVAE, x: torch.Tensor, batch_size: int, generator: torch.Generator) -> Iterator[torch.Tensor]:
    """Endless batches of the code sequences (B, 49) of freshly binarized training images."""
    dev = model.quantizer.codebook.device

    @torch.no_grad()
    def codes(images: torch.Tensor, g: torch.Generator) -> torch.Tensor:
        return model.codes(binarize(images, g).to(dev)).flatten(1)

    return batches(x, batch_size=batch_size, generator=generator, transform=codes, drop_last=True)


def prior_loss(prior: CodePrior, codes: torch.Tensor) -> torch.Tensor:
    """Cross-entropy of the codes under the prior, -log p(c), in nats per image (batch mean)."""
    return -prior.log_prob(codes).mean()


def fit_prior(model: VQVAE, x: torch.Tensor, generator: torch.Generator, log=print,
              log_every: int = 100) -> list[dict[str, float]]:
    """The autoencoder frozen, Adam on the prior's cross-entropy of the training set's codes."""
    train = model.config.prior_train
    model.eval()
    optimizer = train.adam(model.prior.parameters())
    history = train_loop(model.prior, prior_loss, code_batches(model, x, train.batch_size, generator), optimizer,
                         train.steps, log_every=log_every, desc="vq-vae prior", scheduler=train.scheduler(optimizer))
    log(f"vq-vae prior: {train.steps} steps, final cross-entropy {history[-1]['loss']:.2f} nats per image")
    return history


def fit(config: VQVAEConfig, log=print, log_every: int = 100) -> tuple[VQVAE, dict]:
    """Train the autoencoder on the 60 000 training images (dynamically binarized), then the prior."""
    generator = torch.Generator().manual_seed(config.train.seed)
    torch.manual_seed(config.train.seed)
    x, _ = mnist("trainval")
    model = VQVAE(config).to(device())
    start = time.perf_counter()
    autoencoder = fit_autoencoder(model, x, generator, log, log_every)
    middle = time.perf_counter()
    prior = fit_prior(model, x, generator, log, log_every)
    times = {"autoencoder_s": middle - start, "prior_s": time.perf_counter() - middle}
    return model.eval(), {"autoencoder": autoencoder, "prior": prior, "wall_time": times}


# -- evaluation -------------------------------------------------------------------------------------

@torch.no_grad()
def test_report(model: VQVAE, n: int | None = None, batch_size: int = 500) -> dict[str, float]:
    """On the first n images of the binarized test set, in nats per image: the distortion -log p(x|z_q),
    the rate -log p(z) of the codes under the prior, their sum (an upper bound on -log p(x)), and the
    codebook's perplexity and usage."""
    x, _ = binarized_test_set()
    x = x[:n] if n else x
    model.eval()
    dev = model.quantizer.codebook.device
    distortion, rate, codes = [], [], []
    for i in range(0, len(x), batch_size):
        batch = x[i : i + batch_size].to(dev)
        out = model(batch)
        distortion.append(-bernoulli_log_likelihood(out["logits"], batch).double().cpu())
        rate.append(-model.prior.log_prob(out["indices"].flatten(1)).double().cpu())
        codes.append(out["indices"].cpu())
    distortion, rate = torch.cat(distortion), torch.cat(rate)
    bound = distortion + rate
    bound_mean, bound_se = mean_and_standard_error(bound)
    counts = code_histogram(torch.cat(codes), model.config.codebook_size)
    return {"test_distortion_nats": distortion.mean().item(), "test_prior_rate_nats": rate.mean().item(),
            "test_nll_bound_nats": bound_mean, "test_nll_bound_nats_se": bound_se,
            "uniform_prior_rate_nats": GRID * GRID * math.log(model.config.codebook_size),
            "codebook_perplexity": perplexity(counts), "codes_used": int((counts > 0).sum()),
            "test_report_n": len(x)}


# -- the registered model ---------------------------------------------------------------------------

def build(config: dict) -> VQVAE:
    return VQVAE(from_dict(VQVAEConfig, config))


def train(seed: int = 0, parents: dict | None = None) -> TrainResult:
    steps, batch_size = budget(vqvae_training().steps, 20), budget(vqvae_training().batch_size, 32)
    config = VQVAEConfig(train=vqvae_training(steps, batch_size=batch_size, seed=seed),
                         prior_train=vqvae_training(steps, batch_size=batch_size, seed=seed))
    model, diagnostics = fit(config, log_every=budget(100, 5))
    return TrainResult(model, to_dict(config), steps=config.train.steps + config.prior_train.steps, extra=diagnostics)


def evaluate(model: VQVAE) -> dict[str, float]:
    return test_report(model, n=budget(5000, 100))


def sample(model: VQVAE, n: int, generator: torch.Generator, labels=None, temperature: float = 1.0,
           prior: str = "learned", mean: bool = True, batch_size: int = 1000) -> torch.Tensor:
    """``sample vq-vae``: codes from the prior, decoded to pixel probabilities (or one Bernoulli draw)."""
    refuse_labels(labels)
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    return torch.cat([model.sample(min(batch_size, n - i), generator, temperature, prior, mean)
                      for i in range(0, n, batch_size)])


def add_sample_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--temperature", type=float, default=1.0, help="softmax temperature of the prior (> 0)")
    parser.add_argument("--prior", choices=("learned", "uniform"), default="learned",
                        help="draw the codes from the learned prior or uniformly at random")
    parser.add_argument("--binary", dest="mean", action="store_false",
                        help="one Bernoulli draw of each pixel instead of the decoder's probabilities")


register(ModelSpec(
    name="vq-vae", chapter=23,
    summary="VQ-VAE: 7x7 grid of K = 32 codes, EMA codebook, Bernoulli decoder; causal-transformer prior",
    build=build, train=train, sample=sample, evaluate=evaluate, train_minutes=30.0,
    add_sample_options=add_sample_options,
    samples="decoder means",
))

__all__ = ["VQVAE", "VQVAEConfig", "autoencoder_step", "fit", "fit_autoencoder", "fit_prior", "loss", "sample",
           "test_report", "vqvae_training"]
