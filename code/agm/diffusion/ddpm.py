"""Denoising diffusion probabilistic models (Ho et al., 2020), Chapters 29–32.

Three separate pieces, as in diffusers: the noise schedule (:mod:`agm.diffusion.schedule`), the
network (:mod:`agm.nn.unet`) and the samplers (:mod:`agm.diffusion.samplers`). :class:`DDPM` only ties
a U-Net to a schedule; training minimizes L_simple with an EMA of the weights; :func:`bits_per_dim`
estimates the variational bound on test images.
"""

from __future__ import annotations

import argparse
import inspect
import time
from dataclasses import dataclass, field

import torch
from torch import nn

from agm.config import TrainConfig, from_dict, to_dict
from agm.data import batches, check_images, mnist, to_symmetric
from agm.diffusion import losses, parameterization
from agm.diffusion.guidance import ClassifierFreeGuidance, ClassifierGuidance, drop_labels
from agm.diffusion.samplers import SAMPLERS, VARIANCES, ancestral_sample
from agm.diffusion.schedule import NoiseSchedule, ScheduleConfig
from agm.distributions import mean_and_standard_error
from agm.metrics import nats_to_bits_per_dim
from agm.nn.unet import UNet, UNetConfig
from agm.registry import ModelSpec, TrainResult, refuse_labels, register
from agm.runtime import budget, device
from agm.train import EMA, train_loop


def default_training() -> TrainConfig:
    return TrainConfig(steps=4000, batch_size=128, lr=1e-3, warmup_steps=200, grad_clip=1.0, ema_decay=0.999)


@dataclass
class DDPMConfig:
    unet: UNetConfig = field(default_factory=UNetConfig)  # widths 16, 32, 64 at 28x28, 14x14, 7x7
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)  # linear, T = 1000
    train: TrainConfig = field(default_factory=default_training)
    # classifier-free guidance (Ho & Salimans, 2022): the probability that a training label is replaced
    # by the null label, so that one network learns eps(x_t, t, y) and eps(x_t, t, null); 0 = no dropout
    p_uncond: float = 0.0
    # what the network outputs (diffusers' prediction_type): "epsilon", "sample" (x_0) or "v_prediction";
    # the model converts it to ε, so every sampler works unchanged (Chapter 39)
    prediction: str = "epsilon"

    def __post_init__(self):
        parameterization.check_prediction(self.prediction)
        if not 0.0 <= self.p_uncond < 1.0:
            raise ValueError(f"p_uncond must lie in [0, 1), got {self.p_uncond}")
        if self.p_uncond > 0 and self.unet.num_classes == 0:
            raise ValueError("p_uncond > 0 needs a class-conditional U-Net (unet.num_classes > 0)")


# Without gradients a call on more images than this runs in pieces of this many: each piece's activations stay
# in the CPU's cache, where a batch of 500 does not (benchmarks/bench_unet_batch.py times batch against piece).
# Every image's output is computed alone in both, so the numbers agree to float rounding (bit for bit on one thread).
EVAL_CHUNK = 125


class DDPM(nn.Module):
    """A U-Net together with the schedule it was trained for; called, it predicts ε whatever it outputs."""

    def __init__(self, config: DDPMConfig):
        super().__init__()
        self.config = config
        self.schedule = NoiseSchedule(config.schedule)
        self.net = UNet(config.unet)

    def forward(self, xt: torch.Tensor, t: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        if not torch.is_grad_enabled() and len(xt) > EVAL_CHUNK:
            # the numbers of one call, faster: benchmarks/bench_unet_batch.py
            return torch.cat([self(xt[i : i + EVAL_CHUNK], t[i : i + EVAL_CHUNK],
                                   None if labels is None else labels[i : i + EVAL_CHUNK])
                              for i in range(0, len(xt), EVAL_CHUNK)])
        out = self.net(xt, t, labels)
        if self.config.prediction == "epsilon":
            return out
        abar = self.schedule._at(self.schedule.alphas_cumprod, t, xt)
        return parameterization.to_epsilon(self.config.prediction, out, xt, abar)

    @property
    def sample_shape(self) -> tuple[int, int, int]:
        c = self.config.unet
        return c.in_channels, c.resolution, c.resolution


def to_model_space(images: torch.Tensor) -> torch.Tensor:
    """[0, 1] images -> the [-1, 1] data space of the diffusion."""
    return to_symmetric(images)


def to_images(x: torch.Tensor) -> torch.Tensor:
    """[-1, 1] -> [0, 1] images, clamped."""
    return ((x + 1) / 2).clamp(0, 1)


def noise_prediction_error(model: DDPM, x0: torch.Tensor, t: torch.Tensor, eps: torch.Tensor,
                           labels: torch.Tensor | None = None) -> torch.Tensor:
    r"""Per-example $\frac1D\|\epsilon - \epsilon_\theta(x_t, t)\|^2$ at the given t and ε: (B,)."""
    # $x_t = \sqrt{\bar\alpha_t}\,x_0 + \sqrt{1-\bar\alpha_t}\,\epsilon$
    xt = model.schedule.q_sample(x0, t, eps)
    return ((model(xt, t, labels) - eps) ** 2).flatten(1).mean(1)


def prediction_error(model: DDPM, x0: torch.Tensor, t: torch.Tensor, eps: torch.Tensor,
                     labels: torch.Tensor | None = None) -> torch.Tensor:
    r"""Per-example MSE of the network's own output against its target (ε, x_0 or v): (B,).

    For an ε-network this is :func:`noise_prediction_error`; an x_0- or v-network regresses its own
    target, $\frac1D\|x_0 - \hat x_\theta\|^2$ or $\frac1D\|v - \hat v_\theta\|^2$.
    """
    xt = model.schedule.q_sample(x0, t, eps)
    abar = model.schedule._at(model.schedule.alphas_cumprod, t, x0)
    goal = parameterization.target(model.config.prediction, x0, eps, abar)
    return ((model.net(xt, t, labels) - goal) ** 2).flatten(1).mean(1)


def training_loss(model: DDPM, x0: torch.Tensor, generator: torch.Generator | None = None,
                  labels: torch.Tensor | None = None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """L_simple on a batch of [-1, 1] images: t ~ U{0..T-1}, eps ~ N(0, I), regress eps (or x_0, or v) from x_t.

    Returns the loss and, as logs, the timesteps and each example's squared error (for the
    loss-per-timestep diagnostic of Chapter 29). With ``labels`` and ``config.p_uncond`` > 0 each
    label is first replaced by the null label with that probability (classifier-free guidance).
    """
    if labels is not None and model.config.p_uncond > 0:
        labels = drop_labels(labels, model.config.p_uncond, model.config.unet.null_label, generator)
    # $t \sim \mathcal U\{0, \dots, T-1\}$, $\epsilon \sim \mathcal N(0, I)$
    t = torch.randint(model.schedule.num_timesteps, (len(x0),), generator=generator).to(x0.device)  # (B,)
    eps = torch.randn(x0.shape, generator=generator).to(x0.device)  # (B, C, H, W)
    # $L_\text{simple} = \mathbb E\,\|\epsilon - \epsilon_\theta(x_t, t)\|^2$ (mean over pixels and batch)
    mse = prediction_error(model, x0, t, eps, labels)  # (B,): the ε-MSE for an ε-network
    return mse.mean(), {"t": t, "mse": mse.detach()}


def stratified_timesteps(num_timesteps: int, batch: int, generator: torch.Generator | None = None) -> torch.Tensor:
    """One timestep in each of ``batch`` equal ranges of 0..T-1, uniform within its range: (B,).

    Pooled over the batch every t is equally likely, so a mean over the batch stays unbiased for L_simple;
    the variance between the ranges drops out of it.
    """
    # $r_b \sim \mathcal U\{0..T-1\}$, $t_b = \lfloor (bT + r_b) / B \rfloor \in [\lfloor bT/B \rfloor, (b+1)T/B)$
    # (pooled over b, every t is hit by exactly B of the BT pairs $(b, r_b)$)
    r = torch.randint(num_timesteps, (batch,), generator=generator)
    return (torch.arange(batch) * num_timesteps + r) // batch


def stratified_training_loss(model: DDPM, x0: torch.Tensor,
                             generator: torch.Generator | None = None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """:func:`training_loss` with the timesteps of :func:`stratified_timesteps` (unconditional models)."""
    t = stratified_timesteps(model.schedule.num_timesteps, len(x0), generator).to(x0.device)  # (B,)
    eps = torch.randn(x0.shape, generator=generator).to(x0.device)  # (B, C, H, W)
    # $\frac1B\sum_b \|\epsilon_b - \epsilon_\theta(x_{t_b}, t_b)\|^2$, one $t_b$ per stratum
    mse = prediction_error(model, x0, t, eps)  # (B,)
    return mse.mean(), {"t": t, "mse": mse.detach()}


class LossPerTimestep:
    """Running mean of the ε-MSE in ``bins`` equal ranges of t."""

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


def fit(config: DDPMConfig, log=print, log_every: int = 250, examples: torch.Tensor | None = None,
        transform=to_symmetric) -> tuple[DDPM, DDPM, dict]:
    """Train on the 60 000 training images; return (the EMA model, the raw model, diagnostics).

    ``examples`` replaces the images (a latent diffusion model trains on codes of them, Chapter 36);
    ``transform(batch, generator)`` maps a batch of them to the model's data space. Diagnostics: the
    logged loss history, the loss per timestep over the last 10 % of training, and the wall time.
    """
    tc, dev = config.train, device()
    generator = torch.Generator().manual_seed(tc.seed)
    torch.manual_seed(tc.seed)
    x, y = mnist("trainval")
    if examples is not None:
        x = examples
    conditional = config.unet.num_classes > 0
    model = DDPM(config).to(dev)
    ema = EMA(model, tc.ema_decay)
    optimizer = tc.adam(model.parameters())
    per_t = LossPerTimestep(config.schedule.num_timesteps)
    tail_start, start = int(0.9 * tc.steps), time.perf_counter()

    def after_step(step: int, logs: dict) -> None:
        if step > tail_start:
            per_t.add(logs["t"], logs["mse"])
        if step % log_every == 0:
            log(f"ddpm step {step}/{tc.steps}: {time.perf_counter() - start:.0f} s")

    data = batches(x, y if conditional else None, batch_size=tc.batch_size, generator=generator,
                   transform=transform, device=dev, drop_last=True)

    def loss_fn(m: DDPM, batch) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        x0, labels = batch if conditional else (batch, None)
        return training_loss(m, x0, generator, labels)

    history = train_loop(model, loss_fn, data, optimizer, tc.steps,
                         desc="ddpm", on_step=after_step, grad_clip=tc.grad_clip, scheduler=tc.scheduler(optimizer),
                         ema=ema)
    diagnostics = {"history": history, "loss_per_t": per_t.means(), "wall_time_s": time.perf_counter() - start}
    return ema.module.eval(), model.eval(), diagnostics


def draw_noise(model: DDPM, n: int, generator: torch.Generator | None = None) -> torch.Tensor:
    """x_T ~ N(0, I) of the model's sample shape, drawn on the CPU generator, on the model's device."""
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    return torch.randn((n, *model.sample_shape), generator=generator).to(next(model.parameters()).device)


@torch.no_grad()
def sample_chain(model: DDPM, n: int, generator: torch.Generator | None = None, steps: int | None = None,
                 variance: str = "beta_tilde", keep: int = 0, clip_denoised: bool = True,
                 labels: torch.Tensor | None = None) -> tuple[torch.Tensor, list[tuple[int, torch.Tensor]]]:
    """Ancestral sampling x_T -> x_0 (:func:`agm.diffusion.samplers.ancestral_sample`) with its trajectory.

    ``keep`` > 0 also returns that many intermediate states, evenly spaced along the chain, as
    (time index, images in [0, 1]) pairs, x_T first and x_0 last. Returns images in [0, 1].
    """
    model.eval()
    steps = model.schedule.num_timesteps if steps is None else steps
    model.schedule.timesteps(steps)  # validates steps before any work
    positions = set(torch.linspace(0, steps, keep).round().long().tolist()) if keep else set()
    trajectory: list[tuple[int, torch.Tensor]] = []

    def record(t: int, x: torch.Tensor) -> None:
        if len(trajectory_calls) in positions:
            trajectory.append((t, to_images(x).cpu()))
        trajectory_calls.append(t)

    trajectory_calls: list[int] = []
    x = ancestral_sample(model, model.schedule, draw_noise(model, n, generator), steps, variance, clip_denoised,
                         generator, labels, record if keep else None)
    return to_images(x).cpu(), trajectory


SMOKE_SAMPLE_STEPS = 5  # the default chain of a smoke run (a 1000-step chain takes minutes even for 3 images)


def sample(model: DDPM, n: int, generator: torch.Generator | None = None, labels: torch.Tensor | None = None,
           **options) -> torch.Tensor:
    """``spec.sample``: n images in [0, 1] from the chosen sampler (:func:`sample_model_space`'s options)."""
    return to_images(sample_model_space(model, n, generator, labels, **options))


def sample_model_space(model: DDPM, n: int, generator: torch.Generator | None = None,
                       labels: torch.Tensor | None = None, steps: int | None = None, variance: str = "beta_tilde",
                       sampler: str = "ancestral", eta: float = 0.0, clip_denoised: bool | None = None,
                       guidance: float | None = None, solver: str = "heun", langevin_steps: int = 5,
                       step_size: float = 2e-5, classifier: nn.Module | None = None, classifier_scale: float = 1.0,
                       batch_size: int = 500) -> torch.Tensor:
    """n draws x_0 of the model's sample shape from the chosen sampler, in batches of ``batch_size``, on the CPU.

    ``steps`` None is the whole chain, T (under ``AGM_SMOKE``, :data:`SMOKE_SAMPLE_STEPS`). ``clip_denoised`` None
    keeps the sampler's own default, the reference implementation's: on for the
    ancestral and DDIM samplers (Ho et al., diffusers), off for DPM-Solver++. ``guidance`` w (a
    class-conditional model only) samples with the classifier-free guided prediction
    (:class:`agm.diffusion.guidance.ClassifierFreeGuidance`); a noisy-image ``classifier`` steers an
    unconditional model towards ``labels`` with ``classifier_scale``
    (:class:`agm.diffusion.guidance.ClassifierGuidance`). Neither: the network as it is.
    """
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    if classifier is not None and (guidance is not None or labels is None):
        raise ValueError("classifier guidance needs labels, and does not combine with classifier-free guidance")
    if model.config.unet.num_classes == 0:
        if classifier is None:
            refuse_labels(labels)
        if guidance is not None:
            raise ValueError("guidance needs a class-conditional model")
    if sampler not in SAMPLERS:
        raise ValueError(f"sampler must be one of {sorted(SAMPLERS)}, got {sampler!r}")
    if variance not in VARIANCES:
        raise ValueError(f"variance must be one of {VARIANCES}, got {variance!r}")
    steps = budget(model.schedule.num_timesteps, SMOKE_SAMPLE_STEPS) if steps is None else steps
    model.schedule.timesteps(steps)  # validates steps
    options = {"ancestral": {"variance": variance}, "ddim": {"eta": eta}, "pf-ode": {"solver": solver},
               "langevin": {"langevin_steps": langevin_steps, "step_size": step_size}}.get(sampler, {})
    if clip_denoised is not None:
        if "clip_denoised" not in inspect.signature(SAMPLERS[sampler]).parameters:
            raise ValueError(f"the {sampler} sampler has no clipping option")
        options["clip_denoised"] = clip_denoised
    model.eval()
    net = model
    if guidance is not None:
        net = ClassifierFreeGuidance(model, guidance, model.config.unet.num_classes)
    elif classifier is not None:
        net = ClassifierGuidance(model, classifier.to(next(model.parameters()).device).eval(), model.schedule,
                                 classifier_scale)
    out = []
    for i in range(0, n, batch_size):
        m = min(batch_size, n - i)
        y = None if labels is None else labels[i : i + m].to(next(model.parameters()).device)
        x = SAMPLERS[sampler](net, model.schedule, draw_noise(model, m, generator), steps,
                              generator=generator, labels=y, **options)
        out.append(x.cpu())
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
    mean, se = mean_and_standard_error(nats_to_bits_per_dim(totals))
    return {"bits_per_dim": mean, "bits_per_dim_se": se,
            "bits_per_dim_n": len(totals), "bits_per_dim_timesteps_per_image": timesteps_per_image or 0,
            "bits_per_dim_exact_below": exact_below if timesteps_per_image else model.schedule.num_timesteps}


# -- the registered model --------------------------------------------------------------------------

EVAL_STEPS = 50  # sampling steps of the shipped metrics (10 000 samples x 1000 steps is hours on 2 CPU cores)
BOUND_IMAGES = 2000  # test images in the shipped bits/dim estimate
# How the shipped metrics were sampled: the 50-step respaced ancestral chain, x̂_0 not clipped.
METRIC_SAMPLER = {"steps": EVAL_STEPS, "clip_denoised": False}


def build(config: dict) -> DDPM:
    return DDPM(from_dict(DDPMConfig, config))


def train(seed: int = 0, parents: dict | None = None) -> TrainResult:
    config = DDPMConfig(train=default_training().budgeted(seed))
    ema_model, _, diagnostics = fit(config)
    extra = {"loss_per_t": diagnostics["loss_per_t"], "final_loss": diagnostics["history"][-1]["loss"]}
    return TrainResult(ema_model, to_dict(config), steps=config.train.steps, extra=extra)


def evaluate(model: DDPM) -> dict[str, float]:
    test, _ = mnist("test")
    n = budget(BOUND_IMAGES, 20)
    return bits_per_dim(model, test[:n], torch.Generator().manual_seed(0), timesteps_per_image=budget(8, 2),
                        exact_below=budget(16, 2))


def evaluate_full(model: DDPM) -> dict:
    """The sampler tables of Chapters 31, 32 and 40 (:mod:`agm.diffusion.evaluations`), filled incrementally."""
    from agm.diffusion import evaluations  # it samples through this module

    return evaluations.evaluate_full(model)


def add_sample_options(parser: argparse.ArgumentParser, clips: str = "ancestral and ddim") -> None:
    """The sampler options of the command line; ``clips`` says which samplers clip x̂_0 by default."""
    parser.add_argument("--sampler", choices=sorted(SAMPLERS), default="ancestral",
                        help="ancestral (Ho et al., Algorithm 2), ddim (Song et al., eq. 12), dpmsolver++ "
                             "(Lu et al., 2022, second-order multistep), pf-ode (the probability-flow ODE) or "
                             "langevin (annealed Langevin dynamics with the score -eps/sigma)")
    parser.add_argument("--steps", type=int, default=None,
                        help="sampling steps, 1..T (default: T = 1000; under AGM_SMOKE, 5)")
    parser.add_argument("--variance", choices=VARIANCES, default="beta_tilde",
                        help="ancestral: variance of p(x_{t-1}|x_t), the posterior's beta~_t or beta_t")
    parser.add_argument("--eta", type=float, default=0.0, help="ddim: 0 = deterministic, 1 = ancestral-like noise")
    parser.add_argument("--solver", choices=("euler", "heun"), default="heun",
                        help="pf-ode: Euler (= DDIM with eta 0, unclipped) or Heun steps in sigma")
    parser.add_argument("--langevin-steps", type=int, default=5, help="langevin: updates at each noise level")
    parser.add_argument("--step-size", type=float, default=2e-5,
                        help="langevin: epsilon of alpha_i = epsilon sigma_i^2 / sigma_min^2 (Song & Ermon, 2019)")
    clip = parser.add_mutually_exclusive_group()
    clip.add_argument("--clip", dest="clip_denoised", action="store_const", const=True, default=None,
                      help=f"clip the predicted x_0 to [-1, 1] (default: {clips})")
    clip.add_argument("--no-clip", dest="clip_denoised", action="store_const", const=False,
                      help="do not clip the predicted x_0")


register(ModelSpec(
    name="ddpm", chapter=29, summary="DDPM: ε-prediction U-Net, linear schedule, T = 1000, EMA weights",
    build=build, train=train, sample=sample, evaluate=evaluate, evaluate_full=evaluate_full, train_minutes=60.0,
    add_sample_options=add_sample_options, metric_sample_options=lambda: {**METRIC_SAMPLER,
                                                                           "steps": budget(EVAL_STEPS, 5)},
    samples="gray levels",
))

__all__ = ["DDPM", "DDPMConfig", "bits_per_dim", "fit", "noise_prediction_error", "sample", "sample_chain",
           "training_loss"]
