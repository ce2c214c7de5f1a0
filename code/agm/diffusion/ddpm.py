"""Denoising diffusion probabilistic models (Ho et al., 2020), Chapters 29–32.

Three separate pieces, as in diffusers: the noise schedule (:mod:`agm.diffusion.schedule`), the
network (:mod:`agm.diffusion.unet`) and the samplers here. :class:`DDPM` only ties a U-Net to a
schedule; training minimizes L_simple with an EMA of the weights; sampling is the ancestral chain
with either variance choice; :func:`bits_per_dim` estimates the variational bound on test images.
"""

from __future__ import annotations

import argparse
import math
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass

import torch
from torch import nn

from agm.data import check_images, mnist
from agm.diffusion import losses
from agm.diffusion.schedule import NoiseSchedule, ScheduleConfig
from agm.diffusion.unet import UNet, UNetConfig
from agm.metrics import nats_to_bits_per_dim
from agm.registry import ModelSpec, TrainResult, register
from agm.runtime import budget, device
from agm.train import EMA, train_loop

VARIANCES = ("beta_tilde", "beta")


@dataclass
class DDPMConfig:
    # the network (agm.diffusion.unet.UNetConfig)
    channels: int = 16
    multipliers: tuple[int, int, int] = (1, 2, 4)  # widths 16, 32, 64 at 28x28, 14x14, 7x7
    blocks_per_level: int = 1
    attention: bool = True
    time_embedding: bool = True
    dropout: float = 0.0
    # the forward process (agm.diffusion.schedule.ScheduleConfig)
    num_timesteps: int = 1000
    schedule: str = "linear"
    # the optimization
    steps: int = 4000
    batch_size: int = 128
    lr: float = 1e-3
    warmup_steps: int = 200  # linear learning-rate warm-up
    grad_clip: float = 1.0
    ema_decay: float = 0.999
    seed: int = 0

    def unet(self) -> UNetConfig:
        return UNetConfig(channels=self.channels, multipliers=tuple(self.multipliers),
                          blocks_per_level=self.blocks_per_level,
                          attention=self.attention, time_embedding=self.time_embedding, dropout=self.dropout)

    def noise_schedule(self) -> NoiseSchedule:
        return NoiseSchedule(ScheduleConfig(num_timesteps=self.num_timesteps, kind=self.schedule))


class DDPM(nn.Module):
    """An ε-prediction network together with the schedule it was trained for."""

    def __init__(self, config: DDPMConfig):
        super().__init__()
        self.config = config
        self.schedule = config.noise_schedule()
        self.net = UNet(config.unet())

    def forward(self, xt: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return self.net(xt, t)


def to_model_space(images: torch.Tensor) -> torch.Tensor:
    """[0, 1] images -> the [-1, 1] data space of the diffusion."""
    return 2 * images - 1


def to_images(x: torch.Tensor) -> torch.Tensor:
    return ((x + 1) / 2).clamp(0, 1)


def training_loss(model: DDPM, x0: torch.Tensor, generator: torch.Generator | None = None,
                  per_example: bool = False) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """L_simple on a batch of [-1, 1] images: t ~ U{0..T-1}, eps ~ N(0, I), regress eps from x_t.

    With ``per_example`` also return the timesteps and each example's mean squared error, for the
    loss-per-timestep diagnostic of Chapter 29.
    """
    t = torch.randint(model.schedule.num_timesteps, (len(x0),), generator=generator).to(x0.device)
    eps = torch.randn(x0.shape, generator=generator).to(x0.device)
    eps_pred = model(model.schedule.q_sample(x0, t, eps), t)
    loss = losses.simple_loss(eps_pred, eps)
    if per_example:
        return loss, t, ((eps_pred - eps) ** 2).flatten(1).mean(1).detach()
    return loss


class LossPerTimestep:
    """Running mean of the ε-MSE in ``bins`` equal ranges of t, over the last ``window`` batches."""

    def __init__(self, num_timesteps: int, bins: int = 20):
        self.num_timesteps, self.bins = num_timesteps, bins
        self.total = torch.zeros(bins, dtype=torch.float64)
        self.count = torch.zeros(bins, dtype=torch.float64)

    def add(self, t: torch.Tensor, mse: torch.Tensor) -> None:
        b = (t.cpu() * self.bins // self.num_timesteps).long()
        self.total.index_add_(0, b, mse.cpu().double())
        self.count.index_add_(0, b, torch.ones_like(mse.cpu().double()))

    def reset(self) -> None:
        self.total.zero_()
        self.count.zero_()

    def means(self) -> list[float]:
        return (self.total / self.count.clamp(min=1)).tolist()


def _batches(x: torch.Tensor, batch_size: int, generator: torch.Generator, dev: torch.device) -> Iterator[torch.Tensor]:
    while True:
        order = torch.randperm(len(x), generator=generator)
        for i in range(0, len(x) - batch_size + 1, batch_size):
            yield to_model_space(x[order[i : i + batch_size]]).to(dev)


def fit(config: DDPMConfig, log=print, log_every: int = 250) -> tuple[DDPM, DDPM, dict]:
    """Train on the 60 000 training images; return (the EMA model, the raw model, diagnostics).

    Diagnostics: the logged loss history, the loss per timestep over the last 10 % of training,
    and the wall time.
    """
    dev = device()
    generator = torch.Generator().manual_seed(config.seed)
    torch.manual_seed(config.seed)
    x, _ = mnist("trainval")
    model = DDPM(config).to(dev)
    ema = EMA(model, config.ema_decay)
    optimizer = torch.optim.Adam(model.parameters(), lr=config.lr)
    warmup = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: min(1.0, (s + 1) / max(1, config.warmup_steps)))
    per_t = LossPerTimestep(config.num_timesteps)
    tail_start = int(0.9 * config.steps)
    step = 0
    start = time.perf_counter()

    def loss_fn(m: DDPM, x0: torch.Tensor) -> torch.Tensor:
        loss, t, mse = training_loss(m, x0, generator, per_example=True)
        if step >= tail_start:
            per_t.add(t, mse)
        return loss

    def on_step(s: int) -> None:
        nonlocal step
        step = s
        ema.update(model)
        warmup.step()
        if s % log_every == 0:
            log(f"ddpm step {s}/{config.steps}: {time.perf_counter() - start:.0f} s")

    history = train_loop(model, loss_fn, _batches(x, config.batch_size, generator, dev), optimizer,
                         config.steps, desc="ddpm", on_step=on_step, grad_clip=config.grad_clip)
    diagnostics = {"history": history, "loss_per_t": per_t.means(), "wall_time_s": time.perf_counter() - start}
    return ema.module.eval(), model.eval(), diagnostics


def _check_sampling(model: DDPM, n: int, steps: int | None, variance: str) -> int:
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    steps = model.schedule.num_timesteps if steps is None else steps
    if not 1 <= steps <= model.schedule.num_timesteps:
        raise ValueError(f"steps must lie in 1..{model.schedule.num_timesteps}, got {steps}")
    if variance not in VARIANCES:
        raise ValueError(f"variance must be one of {VARIANCES}, got {variance!r}")
    return steps


@torch.no_grad()
def sample_chain(model: DDPM, n: int, generator: torch.Generator | None = None, steps: int | None = None,
                 variance: str = "beta_tilde", keep: int = 0) -> tuple[torch.Tensor, list[tuple[int, torch.Tensor]]]:
    """Ancestral sampling x_T ~ N(0, I) -> x_0 (Ho et al., Algorithm 2); no noise at the last step.

    ``steps`` < T walks an evenly spaced subsequence of the timesteps (:meth:`NoiseSchedule.respaced`).
    ``keep`` > 0 also returns that many intermediate states, evenly spaced along the chain, as
    (timestep, images in [0, 1]) pairs, x_T first and x_0 last.
    Returns images in [0, 1], shape [n, 1, 28, 28].
    """
    steps = _check_sampling(model, n, steps, variance)
    model.eval()
    dev = next(model.parameters()).device
    schedule, tau = model.schedule.respaced(steps)
    x = torch.randn((n, 1, 28, 28), generator=generator).to(dev)
    # chain position p = the state after p denoising steps; its 1-based time is tau[-1] + 1 = T at p = 0
    positions = set(torch.linspace(0, steps, keep).round().long().tolist()) if keep else set()
    trajectory = [(int(tau[-1]) + 1, to_images(x).cpu())] if 0 in positions else []
    for p, i in enumerate(reversed(range(steps)), start=1):
        t = torch.full((n,), int(tau[i]), device=dev)
        x, _ = schedule.step(model(x, t), i, x, generator, variance)
        if p in positions:
            trajectory.append((int(tau[i - 1]) + 1 if i > 0 else 0, to_images(x).cpu()))
    return to_images(x).cpu(), trajectory


def sample(model: DDPM, n: int, generator: torch.Generator | None = None, labels=None, steps: int | None = None,
           variance: str = "beta_tilde", batch_size: int = 500) -> torch.Tensor:
    """``spec.sample``: n images in [0, 1] by ancestral sampling, in batches of ``batch_size``."""
    steps = _check_sampling(model, n, steps, variance)
    out = [sample_chain(model, min(batch_size, n - i), generator, steps, variance)[0] for i in range(0, n, batch_size)]
    return torch.cat(out)


@torch.no_grad()
def bound_terms(model: DDPM, images: torch.Tensor, generator: torch.Generator | None = None,
                timesteps_per_image: int | None = None, variance: str = "beta",
                exact_below: int = 0) -> dict[str, torch.Tensor]:
    """Per-image terms of the variational bound on -log p(x_0), in nats, for 8-bit images in [0, 1].

    L_T is exact. The sum over t of L_{t-1} (including the discretized decoder L_0 at t = 0) is exact
    when ``timesteps_per_image`` is None (T network calls per image). Otherwise the terms with
    t < ``exact_below`` are computed exactly — they are the largest and would dominate the variance —
    and the rest of the sum is the unbiased Monte-Carlo estimate (T - exact_below) * mean of K terms
    at timesteps drawn uniformly from exact_below..T-1, K = ``timesteps_per_image``.
    """
    check_images(images)
    model.eval()
    dev = next(model.parameters()).device
    schedule, T = model.schedule, model.schedule.num_timesteps
    x0 = to_model_space(torch.round(images * 255) / 255).to(dev)
    prior = losses.prior_term(schedule, x0)

    def term(t: torch.Tensor) -> torch.Tensor:
        t = t.to(dev)
        eps = torch.randn(x0.shape, generator=generator).to(dev)
        xt = schedule.q_sample(x0, t, eps)
        return losses.vlb_terms(schedule, model(xt, t), x0, xt, t, variance).double()

    n = len(x0)
    if timesteps_per_image is None:
        diffusion = sum(term(torch.full((n,), t)) for t in range(T))
    else:
        if timesteps_per_image < 1:
            raise ValueError(f"timesteps_per_image must be >= 1, got {timesteps_per_image}")
        if not 0 <= exact_below < T:
            raise ValueError(f"exact_below must lie in 0..{T - 1}, got {exact_below}")
        exact = sum((term(torch.full((n,), t)) for t in range(exact_below)), torch.zeros(n, dtype=torch.float64))
        draws = torch.randint(exact_below, T, (timesteps_per_image, n), generator=generator)
        sampled = sum(term(draws[k]) for k in range(timesteps_per_image))
        diffusion = exact.to(dev) + sampled * ((T - exact_below) / timesteps_per_image)
    return {"prior": prior.double(), "diffusion": diffusion, "total": prior.double() + diffusion}


def bits_per_dim(model: DDPM, images: torch.Tensor, generator: torch.Generator | None = None,
                 timesteps_per_image: int | None = 4, exact_below: int = 16,
                 batch_size: int = 250) -> dict[str, float]:
    """The bound in bits/dim averaged over ``images``, with its standard error over images.

    The discretized decoder assigns probability to each 8-bit gray level; uniformly dequantized data
    y = (k + u) / 256 then has the density P(k) * 256^D on [0, 1]^D, whose -log2 density per dimension
    on the [0, 256) scale is the same number, so this is also the bound on dequantized images.
    """
    totals = torch.cat([bound_terms(model, images[i : i + batch_size], generator, timesteps_per_image,
                                    exact_below=exact_below if timesteps_per_image else 0)["total"].cpu()
                        for i in range(0, len(images), batch_size)])
    bpd = nats_to_bits_per_dim(totals)
    return {"bits_per_dim": float(bpd.mean()), "bits_per_dim_se": float(bpd.std() / math.sqrt(len(bpd))),
            "bits_per_dim_n": len(bpd), "bits_per_dim_timesteps_per_image": timesteps_per_image or 0,
            "bits_per_dim_exact_below": exact_below if timesteps_per_image else model.schedule.num_timesteps}


# -- the registered model --------------------------------------------------------------------------

EVAL_STEPS = 50  # sampling steps of the shipped metrics (10 000 samples x 1000 steps is hours on 2 CPU cores)
BOUND_IMAGES = 2000  # test images in the shipped bits/dim estimate


def build(config: dict) -> DDPM:
    return DDPM(DDPMConfig(**config))


def train(seed: int = 0, parents: dict | None = None) -> TrainResult:
    config = DDPMConfig(steps=budget(DDPMConfig.steps, 20), batch_size=budget(DDPMConfig.batch_size, 32), seed=seed)
    ema_model, _, diagnostics = fit(config)
    extra = {"loss_per_t": diagnostics["loss_per_t"], "final_loss": diagnostics["history"][-1]["loss"]}
    return TrainResult(ema_model, asdict(config), steps=config.steps, extra=extra)


def evaluate(model: DDPM) -> dict[str, float]:
    test, _ = mnist("test")
    n = budget(BOUND_IMAGES, 20)
    return bits_per_dim(model, test[:n], torch.Generator().manual_seed(0), timesteps_per_image=budget(8, 2),
                        exact_below=budget(16, 2))


def add_sample_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--steps", type=int, default=None, help="sampling steps, 1..T (default: T = 1000)")
    parser.add_argument("--variance", choices=("beta", "beta_tilde"), default="beta_tilde",
                        help="variance of p(x_{t-1}|x_t): beta_t or the posterior's beta~_t")


register(ModelSpec(
    name="ddpm", chapter=29, summary="DDPM: ε-prediction U-Net, linear schedule, T = 1000, EMA weights",
    build=build, train=train, sample=sample, evaluate=evaluate, train_minutes=60.0,
    add_sample_options=add_sample_options, metric_sample_options=lambda: {"steps": budget(EVAL_STEPS, 5)},
))

__all__ = ["DDPM", "DDPMConfig", "bits_per_dim", "fit", "sample", "sample_chain", "training_loss"]
