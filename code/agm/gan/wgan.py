"""WGAN (Arjovsky, Chintala & Bottou, 2017) and WGAN-GP (Gulrajani et al., 2017) on MNIST, Chapter 10.

A critic f estimates the Wasserstein-1 distance through the Kantorovich–Rubinstein dual,
W1(P, Q) = sup over 1-Lipschitz f of E_P f - E_Q f, and the generator descends -E_z f(G(z)).
The two methods differ in how they keep f (close to) Lipschitz:

- ``clip`` (``wgan``): every critic parameter is clamped to [-c, c] after each critic update,
  c = 0.01; RMSProp at 5e-5; DCGAN's critic with its BatchNorm (Arjovsky et al., Algorithm 1);
- ``gp`` (``wgan-gp``): the penalty lambda E[(||grad f(x_hat)||_2 - 1)^2] on random interpolates x_hat
  of real and generated images, lambda = 10; Adam at 1e-4 with betas (0, 0.9); layer normalization in
  the critic in place of BatchNorm, which would couple the per-sample gradients that the penalty
  constrains (Gulrajani et al., Algorithm 1 and Section 4).

Both make n_critic = 5 critic updates, each on a fresh real batch and fresh z, per generator update.
Arjovsky et al.'s code also makes 100 critic updates per generator update for the first 25 generator
updates and every 500th; their Algorithm 1 does not, and neither does this module. The networks are
DCGAN's (:mod:`agm.gan.dcgan`); the critic's output is a score f(x) in R, not a logit.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from dataclasses import dataclass, field

import torch
from torch import nn

from agm.config import TrainConfig, from_dict, to_dict
from agm.data import batches, mnist
from agm.gan.dcgan import NORMS, Discriminator, Generator, init_weights
from agm.gan.training import fid_point, sample
from agm.registry import ModelSpec, TrainResult, refuse_labels, register
from agm.runtime import budget, device
from agm.train import gradient_step, run_steps

METHODS = ("clip", "gp")  # how the critic is kept Lipschitz: weight clipping or a gradient penalty
OPTIMIZERS = ("rmsprop", "adam")
# Seconds per generator step (n_critic = 5 critic updates and one generator update, batch 64, C = 32), measured
# over 10-20 steps at AGM_THREADS=1 on a 2-core machine shared with other jobs, where DCGAN's step (batch 128,
# C = 64) took 0.60-0.82 s: clipping 0.31-0.51 s, the gradient penalty 0.72-0.94 s; a FID point of 2000 samples
# took 8.5-10.4 s. A first run of 2800 clipping steps with 15 FID points took 16.6 min, so 4000 steps of
# `train wgan` with 21 FID points take about 24 min; 1800 steps of `train wgan-gp` with 19 FID points, 25-31 min.
WGAN_STEPS = 4000
WGAN_GP_STEPS = 1800


def wgan_training(steps: int = WGAN_STEPS, **changes) -> TrainConfig:
    """``steps`` generator updates on batches of 64; RMSProp at 5e-5 (Arjovsky et al.)."""
    return TrainConfig(**{"steps": steps, "batch_size": 64, "lr": 5e-5} | changes)


def wgan_gp_training(steps: int = WGAN_GP_STEPS, **changes) -> TrainConfig:
    """``steps`` generator updates on batches of 64; Adam at 1e-4 with betas (0, 0.9) (Gulrajani et al.)."""
    return TrainConfig(**{"steps": steps, "batch_size": 64, "lr": 1e-4, "betas": (0.0, 0.9)} | changes)


@dataclass
class WGANConfig:
    method: str = "clip"  # "clip" (Arjovsky et al.) or "gp" (Gulrajani et al.)
    latent_dim: int = 100  # DCGAN's 100-d z
    channels: int = 32  # C of DCGAN's networks, (2C, 7, 7) <-> (C, 14, 14); half of dcgan's: 5 critic updates a step
    critic_norm: str = "batch"  # the critic's hidden normalization: "batch", "layer" or "none"
    clip: float = 0.01  # c: critic parameters are clamped to [-c, c] after each update (method "clip")
    gp_weight: float = 10.0  # lambda, the gradient penalty's weight (method "gp")
    n_critic: int = 5  # critic updates per generator update
    optimizer: str = "rmsprop"  # "rmsprop" (Arjovsky et al.: momentum destabilized the critic) or "adam"
    fid_every: int | None = 200  # generator steps between FID measurements during fit; None = none
    fid_samples: int = 2000  # samples per FID measurement during fit
    train: TrainConfig = field(default_factory=wgan_training)  # steps count generator updates

    def __post_init__(self):
        if self.method not in METHODS:
            raise ValueError(f"unknown method {self.method!r}; choose one of {', '.join(METHODS)}")
        if self.optimizer not in OPTIMIZERS:
            raise ValueError(f"unknown optimizer {self.optimizer!r}; choose one of {', '.join(OPTIMIZERS)}")
        if self.critic_norm not in NORMS:
            raise ValueError(f"unknown critic_norm {self.critic_norm!r}; choose one of {', '.join(NORMS)}")
        if self.method == "gp" and self.critic_norm == "batch":
            raise ValueError("the gradient penalty constrains each sample's gradient, which BatchNorm makes depend "
                             "on the rest of the batch: use critic_norm 'layer' or 'none' (Gulrajani et al.)")
        if self.n_critic < 1:
            raise ValueError(f"n_critic must be >= 1, got {self.n_critic}")


def wgan_config(**changes) -> WGANConfig:
    """Arjovsky et al.: clipping at c = 0.01, RMSProp at 5e-5, n_critic = 5, BatchNorm in the critic."""
    return WGANConfig(**{"method": "clip", "critic_norm": "batch", "optimizer": "rmsprop", "fid_every": 200,
                         "train": wgan_training()} | changes)


def wgan_gp_config(**changes) -> WGANConfig:
    """Gulrajani et al.: lambda = 10, Adam at 1e-4 with betas (0, 0.9), n_critic = 5, layer norm in the critic."""
    return WGANConfig(**{"method": "gp", "critic_norm": "layer", "optimizer": "adam", "fid_every": 100,
                         "train": wgan_gp_training()} | changes)


class WGAN(nn.Module):
    """DCGAN's generator G(z), z ~ N(0, I), against a critic f(x) in R: DCGAN's discriminator with the
    hidden normalization ``config.critic_norm``, its output read as a score instead of a logit."""

    conditional = False  # what agm.gan.training's fid_point asks of a GAN

    def __init__(self, config: WGANConfig):
        super().__init__()
        self.config = config
        self.generator = Generator(config)
        self.critic = Discriminator(config, norm=config.critic_norm)
        self.apply(init_weights)

    def latents(self, n: int, generator: torch.Generator | None = None) -> torch.Tensor:
        """z ~ N(0, I), (n, L), drawn on the CPU generator and moved to the model's device."""
        return torch.randn(n, self.config.latent_dim, generator=generator).to(next(self.parameters()).device)

    @torch.no_grad()
    def generate(self, n: int, generator: torch.Generator | None = None, labels=None) -> torch.Tensor:
        """n images G(z) in [0, 1], (n, 1, 28, 28) on the CPU; the generator's BatchNorm uses running statistics."""
        refuse_labels(labels)
        was_training = self.generator.training
        self.generator.eval()
        x = self.generator(self.latents(n, generator)).cpu()
        self.generator.train(was_training)
        return x


# -- the losses ----------------------------------------------------------------------------------------------


def critic_loss(real_scores: torch.Tensor, fake_scores: torch.Tensor) -> tuple[torch.Tensor, dict]:
    """Minus the dual objective on scores f(x), (B,), and f(G(z)), (B,): the critic ascends the W-estimate."""
    # $\hat W = \mathbb{E}_{x\sim P}[f(x)] - \mathbb{E}_z[f(G(z))]$; in expectation at most $K\,W_1$ for a K-Lipschitz f
    w_estimate = real_scores.mean() - fake_scores.mean()
    logs = {"w_estimate": w_estimate.detach(), "critic_real": real_scores.mean().detach(),
            "critic_fake": fake_scores.mean().detach()}
    return -w_estimate, logs


def generator_loss(fake_scores: torch.Tensor) -> tuple[torch.Tensor, dict]:
    """The generator's loss on the critic's scores of its samples, (B,): it raises them."""
    # $\mathcal{L}_G = -\mathbb{E}_z[f(G(z))]$
    loss = -fake_scores.mean()
    return loss, {}


def gradient_penalty(critic: nn.Module, real: torch.Tensor, fake: torch.Tensor,
                     generator: torch.Generator | None = None,
                     eps: torch.Tensor | None = None) -> tuple[torch.Tensor, dict]:
    """E[(||grad f(x_hat)||_2 - 1)^2] at x_hat = eps x + (1 - eps) x_tilde, one eps ~ U[0, 1] per sample
    (drawn from ``generator`` unless given, (B,)). The graph of the gradient is kept, so the penalty's own
    gradient reaches the critic's weights. ``critic`` maps (B, ...) to (B,) with no coupling across the batch."""
    if eps is None:
        eps = torch.rand(len(real), generator=generator).to(real.device)  # (B,), drawn on the CPU generator
    eps = eps.to(real.dtype).view(-1, *[1] * (real.ndim - 1))  # (B, 1, 1, 1)
    # $\hat x = \epsilon x + (1 - \epsilon)\tilde x$
    x_hat = (eps * real + (1 - eps) * fake).detach().requires_grad_(True)
    # $\nabla_{\hat x} f(\hat x)$ for every sample at once: the sum's gradient in each sample is that sample's own
    (grad,) = torch.autograd.grad(critic(x_hat).sum(), x_hat, create_graph=True)
    grad_norm = grad.flatten(1).norm(dim=1)  # (B,)
    # $\mathbb{E}\big[(\|\nabla f(\hat x)\|_2 - 1)^2\big]$
    penalty = ((grad_norm - 1) ** 2).mean()
    return penalty, {"grad_norm": grad_norm.mean().detach()}


@torch.no_grad()
def clip_weights(critic: nn.Module, c: float) -> None:
    """Clamp every parameter of the critic to [-c, c] in place (Arjovsky et al., Algorithm 1)."""
    for p in critic.parameters():
        # $w \leftarrow \mathrm{clip}(w, -c, c)$
        p.clamp_(-c, c)


# -- the 1-D oracle: W1 by sorting, and the dual's optimal critic ------------------------------------------------


def _pooled_cdfs(a, b) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The sorted pooled samples x_k, (N + M,), and the empirical CDFs F_a, F_b at x_0..x_{N+M-2}."""
    a = torch.as_tensor(a, dtype=torch.float64).flatten().sort().values
    b = torch.as_tensor(b, dtype=torch.float64).flatten().sort().values
    x = torch.cat([a, b]).sort().values
    # $F_a(x) = \#\{i : a_i \le x\} / N$
    F_a = torch.searchsorted(a, x[:-1], right=True).double() / len(a)
    F_b = torch.searchsorted(b, x[:-1], right=True).double() / len(b)
    return x, F_a, F_b


def wasserstein1_sorted(a, b) -> float:
    """W1 between the empirical distributions of 1-D samples a and b, from their sorted pooled samples.

    The CDFs are steps that change only at the pooled samples; for len(a) == len(b) this is the mean of
    |a_(i) - b_(i)| over the order statistics."""
    x, F_a, F_b = _pooled_cdfs(a, b)
    # $W_1 = \int |F_a(x) - F_b(x)|\,dx = \sum_k |F_a(x_k) - F_b(x_k)|\,(x_{k+1} - x_k)$
    return float(((F_a - F_b).abs() * x.diff()).sum())


def kantorovich_potential(a, b) -> tuple[torch.Tensor, torch.Tensor]:
    """A 1-Lipschitz f with E_a f - E_b f = W1(a, b): piecewise linear through the sorted pooled samples x_k,
    slope sign(F_b - F_a) on [x_k, x_{k+1}], f(x_0) = 0. Returns the knots x_k and the values f(x_k),
    (N + M,) each; f between them is the linear interpolation."""
    x, F_a, F_b = _pooled_cdfs(a, b)
    # $f' = \mathrm{sign}(F_b - F_a)$: $\mathbb{E}_a f - \mathbb{E}_b f = \int f'(F_b - F_a)\,dx = \int |F_a - F_b|\,dx$
    slope = torch.sign(F_b - F_a)
    values = torch.cat([x.new_zeros(1), torch.cumsum(slope * x.diff(), 0)])
    return x, values


# -- training --------------------------------------------------------------------------------------------------


def make_optimizer(config: WGANConfig, parameters) -> torch.optim.Optimizer:
    """RMSProp or Adam at ``config.train.lr`` (Adam with ``config.train.betas``)."""
    if config.optimizer == "rmsprop":
        return torch.optim.RMSprop(parameters, lr=config.train.lr)
    return config.train.adam(parameters)


def critic_step(model: WGAN, opt_c: torch.optim.Optimizer, real: torch.Tensor,
                generator: torch.Generator) -> dict:
    """One critic update on real images (B, 1, 28, 28) and as many fresh samples G(z)."""
    config = model.config
    with torch.no_grad():
        fake = model.generator(model.latents(len(real), generator))  # (B, 1, 28, 28), no gradient to G
    loss, logs = critic_loss(model.critic(real), model.critic(fake))
    if config.method == "gp":
        penalty, gp_logs = gradient_penalty(model.critic, real, fake, generator)
        # $\mathcal{L}_f = \mathbb{E}_z f(G(z)) - \mathbb{E}_x f(x) + \lambda\,\mathbb{E}(\|\nabla f(\hat x)\|_2 - 1)^2$
        loss = loss + config.gp_weight * penalty
        logs |= {"gradient_penalty": penalty.detach(), **gp_logs}
    value = gradient_step(loss, opt_c, desc=f"WGAN ({config.method}) critic")
    if config.method == "clip":
        clip_weights(model.critic, config.clip)  # weights in a compact set: f is K-Lipschitz for some K
    return {"critic_loss": value, **logs}


def train_step(model: WGAN, opt_g: torch.optim.Optimizer, opt_c: torch.optim.Optimizer,
               real: Iterator[torch.Tensor], generator: torch.Generator) -> dict:
    """n_critic critic updates, each on the next real batch and fresh z, then one generator update.
    The logs are the last critic update's (its W-estimate comes before that update) and the generator's."""
    # 1. the critic approaches the sup of the dual for the current generator
    for _ in range(model.config.n_critic):
        batch = next(real)  # (B, 1, 28, 28)
        critic_logs = critic_step(model, opt_c, batch, generator)
    # 2. the generator descends -E f(G(z)) against the critic just trained
    fake = model.generator(model.latents(len(batch), generator))  # (B, 1, 28, 28)
    g_loss, g_logs = generator_loss(model.critic(fake))
    g_value = gradient_step(g_loss, opt_g, desc=f"WGAN ({model.config.method}) generator")
    return {**critic_logs, "g_loss": g_value, **g_logs}


def fit(config: WGANConfig, log_every: int = 25, log=print) -> tuple[WGAN, dict]:
    """Train from an initialization seeded with ``config.train.seed`` on shuffled epochs of the 60 000 training
    images. Returns the model and ``{"history": [...], "fid": [...], "w_curve": [...]}``: with ``fid_every``, the
    kit on ``fid_samples`` samples at step 0, every ``fid_every`` generator steps and the last, and at each of
    those steps after 0 the W-estimate averaged over the generator steps since the previous one."""
    torch.manual_seed(config.train.seed)
    train, desc = config.train, f"wgan ({config.method})"
    generator = torch.Generator().manual_seed(train.seed)
    x, _ = mnist("trainval")
    dev = device()
    model = WGAN(config).to(dev)
    opt_g = make_optimizer(config, model.generator.parameters())
    opt_c = make_optimizer(config, model.critic.parameters())
    real = batches(x, batch_size=train.batch_size, generator=generator, device=dev, drop_last=True)
    fid = [fid_point(model, 0, config.fid_samples)] if config.fid_every else []
    w_curve, window = [], []

    def after_step(step: int, logs: dict) -> None:
        window.append(float(logs["w_estimate"]))
        last = step == train.steps
        if config.fid_every and (step % config.fid_every == 0 or last):
            fid.append(fid_point(model, step, config.fid_samples))
            w_curve.append({"step": step, "w_estimate": sum(window) / len(window)})
            window.clear()
            log(f"{desc} step {step}: FID (MNIST classifier) {fid[-1]['fid']:.2f}, "
                f"mean W-estimate {w_curve[-1]['w_estimate']:.4f}")
        if step % log_every == 0 or last:
            log(f"{desc} step {step}: W-estimate {float(logs['w_estimate']):.4f}, g_loss {logs['g_loss']:.4f}")

    history = run_steps(lambda step: train_step(model, opt_g, opt_c, real, generator), train.steps, log_every,
                        desc=desc, on_step=after_step, modules=[model])
    return model.cpu().eval(), {"history": history, "fid": fid, "w_curve": w_curve}


# -- the models' entries ---------------------------------------------------------------------------------------

MODELS = {"wgan": wgan_config, "wgan-gp": wgan_gp_config}  # registered name -> its paper's config
SUMMARIES = {"wgan": "WGAN on MNIST: DCGAN's networks, a weight-clipped critic",
             "wgan-gp": "WGAN-GP on MNIST: DCGAN's networks, a gradient-penalized critic with layer norm"}
TRAIN_MINUTES = {"wgan": 25.0, "wgan-gp": 25.0}


def build(config: dict) -> WGAN:
    return WGAN(from_dict(WGANConfig, config))


def trainer(name: str):
    def train(seed: int = 0, parents: dict | None = None) -> TrainResult:
        """``train NAME``: the paper's config under the runtime's budget, with FID and W-estimate over training."""
        paper = MODELS[name]()
        config = dataclasses.replace(paper, fid_every=budget(paper.fid_every, 10),
                                     fid_samples=budget(paper.fid_samples, 200), train=paper.train.budgeted(seed))
        model, logs = fit(config)
        return TrainResult(model, to_dict(config), steps=config.train.steps,
                           extra={"history": logs["history"], "fid_curve": logs["fid"], "w_curve": logs["w_curve"]})

    return train


def spec(name: str) -> ModelSpec:
    """The entry of ``wgan`` or ``wgan-gp`` for :mod:`agm.registry`; registered once its checkpoint is shipped."""
    if name not in MODELS:
        raise KeyError(f"unknown model {name!r}; choose one of {', '.join(MODELS)}")
    return ModelSpec(
        name=name, chapter=10, summary=SUMMARIES[name], build=build, train=trainer(name),
        evaluate=lambda model: {}, sample=sample, train_minutes=TRAIN_MINUTES[name], samples="generator outputs",
    )


for _name in MODELS:
    register(spec(_name))
