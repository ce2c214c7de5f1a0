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
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import nn

from agm.data import batches, binarize, binarized_test_set, check_images, mnist
from agm.distributions import bernoulli_log_likelihood, mean_and_standard_error
from agm.registry import ModelSpec, TrainResult, refuse_labels, register
from agm.runtime import budget, device
from agm.train import train_loop
from agm.vae.code_prior import CodePrior, CodePriorConfig

GRID = 7  # the code grid is GRID x GRID: two stride-2 convolutions take 28 -> 14 -> 7
CODEBOOK_UPDATES = ("ema", "loss")
TARGETS = ("gray", "binary")


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
    steps: int = 5000
    batch_size: int = 128
    lr: float = 1e-3  # Adam; cosine decay to lr / 10 by the last step
    # the prior over the grid of codes (agm.vae.code_prior)
    prior_width: int = 96
    prior_layers: int = 3
    prior_heads: int = 4
    prior_steps: int = 5000
    prior_batch_size: int = 128
    prior_lr: float = 1e-3  # Adam; cosine decay to prior_lr / 10
    seed: int = 0

    def prior(self) -> CodePriorConfig:
        return CodePriorConfig(vocab_size=self.codebook_size, length=GRID * GRID, width=self.prior_width,
                               layers=self.prior_layers, heads=self.prior_heads)


# -- the quantizer, in small functions -------------------------------------------------------------

def quantize(z_e: torch.Tensor, codebook: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Nearest code of every vector: z_e (..., D), codebook (K, D) -> z_q (..., D), indices (...)."""
    if codebook.ndim != 2 or z_e.shape[-1] != codebook.shape[1]:
        raise ValueError(f"z_e (..., D) and codebook (K, D) must share D, got {list(z_e.shape)} and "
                         f"{list(codebook.shape)}")
    flat = z_e.reshape(-1, codebook.shape[1])  # (N, D)
    # $\|z - e_k\|^2 = \|z\|^2 - 2 z^\top e_k + \|e_k\|^2$
    distances = flat.pow(2).sum(1, keepdim=True) - 2 * flat @ codebook.T + codebook.pow(2).sum(1)  # (N, K)
    # $k(z) = \arg\min_k \|z - e_k\|^2$
    indices = distances.argmin(1)  # (N,)
    return codebook[indices].view(z_e.shape), indices.view(z_e.shape[:-1])


def straight_through(z_e: torch.Tensor, z_q: torch.Tensor) -> torch.Tensor:
    """The value of z_q with the gradient of z_e: the decoder's gradient is copied to the encoder."""
    # $z_e + \mathrm{sg}[z_q - z_e]$
    return z_e + (z_q - z_e).detach()


def vq_losses(z_e: torch.Tensor, z_q: torch.Tensor, beta: float) -> dict[str, torch.Tensor]:
    """The codebook and commitment terms of van den Oord et al. (eq. 3), summed over each image's grid: (B,)."""
    # $\|\mathrm{sg}[z_e] - z_q\|^2$ moves the codes toward the encoder outputs
    codebook = (z_e.detach() - z_q).pow(2).flatten(1).sum(1)
    # $\beta\,\|z_e - \mathrm{sg}[z_q]\|^2$ keeps the encoder outputs near their codes
    commitment = beta * (z_e - z_q.detach()).pow(2).flatten(1).sum(1)
    return {"codebook": codebook, "commitment": commitment}


@torch.no_grad()
def ema_codebook_update(cluster_size: torch.Tensor, embed_sum: torch.Tensor, z_e: torch.Tensor,
                        indices: torch.Tensor, decay: float,
                        epsilon: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One EMA step (the paper's appendix): running counts N (K,), sums m (K, D) -> new (N, m, codebook).

    z_e (N, D) are the batch's encoder outputs, ``indices`` (N,) their nearest codes.
    """
    K = len(cluster_size)
    one_hot = F.one_hot(indices, K).type_as(z_e)  # (N, K)
    # $N_i \leftarrow \gamma N_i + (1 - \gamma)\, n_i$
    cluster_size = decay * cluster_size + (1 - decay) * one_hot.sum(0)
    # $m_i \leftarrow \gamma m_i + (1 - \gamma) \sum_{j: k_j = i} z_{e,j}$
    embed_sum = decay * embed_sum + (1 - decay) * one_hot.T @ z_e
    # Laplace smoothing $\tilde N_i = (N_i + \epsilon)\, n / (n + K\epsilon)$, $n = \sum_i N_i$
    n = cluster_size.sum()
    smoothed = (cluster_size + epsilon) * n / (n + K * epsilon)
    # $e_i = m_i / \tilde N_i$
    return cluster_size, embed_sum, embed_sum / smoothed.unsqueeze(1)


def code_histogram(indices: torch.Tensor, K: int) -> torch.Tensor:
    """How often each of the K codes occurs in ``indices`` (any shape): (K,)."""
    return torch.bincount(indices.flatten().cpu(), minlength=K)


def perplexity(counts: torch.Tensor) -> float:
    """exp(H(p)) of the histogram p = counts / sum: K for uniform use of K codes, 1 for a single code."""
    if counts.ndim != 1 or counts.sum() <= 0 or (counts < 0).any():
        raise ValueError("counts must be a 1-D histogram with a positive total")
    p = counts.double() / counts.sum()
    # $\exp\big(-\sum_k p_k \log p_k\big)$
    return float(torch.exp(-torch.xlogy(p, p).sum()))


# -- the network ------------------------------------------------------------------------------------

class ResidualBlock(nn.Module):
    """h + conv1x1(silu(conv3x3(silu(h)))): the block of van den Oord et al. (2017), with the smooth SiLU
    in place of ReLU so that the decoder's loss is twice differentiable (the straight-through analysis)."""

    def __init__(self, channels: int):
        super().__init__()
        self.body = nn.Sequential(nn.SiLU(), nn.Conv2d(channels, channels // 2, 3, padding=1), nn.SiLU(),
                                  nn.Conv2d(channels // 2, channels, 1))

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return h + self.body(h)


def encoder(config: VQVAEConfig) -> nn.Sequential:
    """(B, 1, 28, 28) -> (B, D, 7, 7)."""
    C = config.channels
    return nn.Sequential(nn.Conv2d(1, C, 4, stride=2, padding=1), nn.SiLU(),  # 28 -> 14
                         nn.Conv2d(C, C, 4, stride=2, padding=1), nn.SiLU(),  # 14 -> 7
                         nn.Conv2d(C, C, 3, padding=1),
                         *[ResidualBlock(C) for _ in range(config.res_blocks)], nn.SiLU(),
                         nn.Conv2d(C, config.code_dim, 1))


def decoder(config: VQVAEConfig) -> nn.Sequential:
    """(B, D, 7, 7) -> Bernoulli logits (B, 1, 28, 28), mirroring the encoder."""
    C = config.channels
    return nn.Sequential(nn.Conv2d(config.code_dim, C, 3, padding=1),
                         *[ResidualBlock(C) for _ in range(config.res_blocks)], nn.SiLU(),
                         nn.ConvTranspose2d(C, C, 4, stride=2, padding=1), nn.SiLU(),  # 7 -> 14
                         nn.ConvTranspose2d(C, 1, 4, stride=2, padding=1))  # 14 -> 28


class VectorQuantizer(nn.Module):
    """The codebook (K, D); the EMA's running counts and sums; how long each code has gone unused."""

    def __init__(self, config: VQVAEConfig):
        super().__init__()
        K, D = config.codebook_size, config.code_dim
        self.config = config
        # small uniform codes, as in the paper's reference code; a gradient only with the codebook loss
        self.codebook = nn.Parameter(torch.empty(K, D).uniform_(-1 / K, 1 / K),
                                     requires_grad=config.codebook_update == "loss")
        self.register_buffer("cluster_size", torch.ones(K))  # N_i, as if each code had held one vector
        self.register_buffer("embed_sum", self.codebook.detach().clone())  # m_i
        self.register_buffer("unused_steps", torch.zeros(K, dtype=torch.long))

    @torch.no_grad()
    def update(self, z_e: torch.Tensor, indices: torch.Tensor, generator: torch.Generator | None = None) -> int:
        """After an optimizer step: the EMA step (if configured), then dead-code restarts; returns #restarts."""
        if self.config.codebook_update == "ema":
            N, m, e = ema_codebook_update(self.cluster_size, self.embed_sum, z_e, indices, self.config.ema_decay,
                                          self.config.ema_epsilon)
            self.cluster_size.copy_(N)
            self.embed_sum.copy_(m)
            self.codebook.copy_(e)
        return restart_dead_codes(self, z_e, indices, self.config.dead_after, generator)


@torch.no_grad()
def restart_dead_codes(vq: VectorQuantizer, z_e: torch.Tensor, indices: torch.Tensor, dead_after: int,
                       generator: torch.Generator | None = None) -> int:
    """Count the steps each code has gone unused; move every code unused for ``dead_after`` steps onto
    a different random encoder output of the batch, z_e (N, D). Returns how many codes moved."""
    used = torch.bincount(indices, minlength=len(vq.codebook)) > 0  # (K,)
    vq.unused_steps.add_(1).masked_fill_(used, 0)
    dead = (vq.unused_steps >= dead_after).nonzero().squeeze(1) if dead_after > 0 else indices[:0]
    if len(dead) == 0:
        return 0
    pick = torch.randperm(len(z_e), generator=generator)[torch.arange(len(dead)) % len(z_e)].to(z_e.device)
    vq.codebook[dead] = z_e[pick]
    vq.embed_sum[dead] = z_e[pick]  # the EMA restarts as if the code had held this one vector
    vq.cluster_size[dead] = 1.0
    vq.unused_steps[dead] = 0
    return len(dead)


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
        self.quantizer = VectorQuantizer(config)
        self.decoder = decoder(config)
        self.prior = CodePrior(config.prior())

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


def fit_autoencoder(model: VQVAE, x: torch.Tensor, generator: torch.Generator, log=print,
                    log_every: int = 100) -> list[dict[str, float]]:
    """Adam on freshly binarized batches; after every step the quantizer's EMA step and restarts."""
    c, dev = model.config, model.quantizer.codebook.device
    params = [p for name, p in model.named_parameters() if p.requires_grad and not name.startswith("prior.")]
    optimizer = torch.optim.Adam(params, lr=c.lr)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, c.steps, eta_min=c.lr / 10)
    data = training_pairs(x, c.batch_size, c.target, generator, dev)
    history: list[dict[str, float]] = []
    restarts, start = 0, time.perf_counter()

    def after_step(step: int, logs: dict) -> None:
        nonlocal restarts  # a running count kept for the log, not a diagnostic passed between functions
        restarts += model.quantizer.update(logs["z_e"].reshape(-1, c.code_dim), logs["indices"].flatten(), generator)
        if step % log_every == 0 or step == c.steps:
            counts = code_histogram(logs["indices"], c.codebook_size)
            history.append({"step": step, "distortion": logs["distortion"].mean().item(),
                            "commitment": logs["commitment"].mean().item(),
                            "codebook": logs["codebook"].mean().item(), "perplexity": perplexity(counts),
                            "codes_used": int((counts > 0).sum()), "restarts": restarts})
            log(f"vq-vae step {step}/{c.steps}: distortion {history[-1]['distortion']:.2f} nats, perplexity "
                f"{history[-1]['perplexity']:.1f}, {time.perf_counter() - start:.0f} s")

    train_loop(model, lambda m, batch: loss(m, *batch), data, optimizer, c.steps, log_every=log_every,
               desc="vq-vae", on_step=after_step, scheduler=schedule)
    return history


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
    c = model.config
    model.eval()
    optimizer = torch.optim.Adam(model.prior.parameters(), lr=c.prior_lr)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, c.prior_steps, eta_min=c.prior_lr / 10)
    history = train_loop(model.prior, prior_loss, code_batches(model, x, c.prior_batch_size, generator), optimizer,
                         c.prior_steps, log_every=log_every, desc="vq-vae prior", scheduler=schedule)
    log(f"vq-vae prior: {c.prior_steps} steps, final cross-entropy {history[-1]['loss']:.2f} nats per image")
    return history


def fit(config: VQVAEConfig, log=print, log_every: int = 100) -> tuple[VQVAE, dict]:
    """Train the autoencoder on the 60 000 training images (dynamically binarized), then the prior."""
    generator = torch.Generator().manual_seed(config.seed)
    torch.manual_seed(config.seed)
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
    return VQVAE(VQVAEConfig(**config))


def train(seed: int = 0, parents: dict | None = None) -> TrainResult:
    config = VQVAEConfig(steps=budget(VQVAEConfig.steps, 20), batch_size=budget(VQVAEConfig.batch_size, 32),
                         prior_steps=budget(VQVAEConfig.prior_steps, 20),
                         prior_batch_size=budget(VQVAEConfig.prior_batch_size, 32), seed=seed)
    model, diagnostics = fit(config, log_every=budget(100, 5))
    return TrainResult(model, asdict(config), steps=config.steps + config.prior_steps, extra=diagnostics)


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
))

__all__ = ["VQVAE", "VQVAEConfig", "code_histogram", "ema_codebook_update", "fit", "loss", "perplexity", "quantize",
           "restart_dead_codes", "sample", "straight_through", "test_report", "vq_losses"]
