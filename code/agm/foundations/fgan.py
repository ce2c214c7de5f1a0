"""f-GAN (Nowozin, Cseke & Tomioka, 2016) on MNIST, Chapter 4: one generator, one critic, any f.

The critic V maximizes the Fenchel bound E_P[g_f(V(x))] - E_Q[f*(g_f(V(x)))]; the generator
maximizes E_Q[g_f(V(G(z)))], the paper's alternative generator objective, which has the same fixed
points as the saddle point and does not saturate early in training.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from agm.config import TrainConfig, from_dict, to_dict
from agm.data import batches, mnist
from agm.foundations import fdiv
from agm.nn.mlp import MLPGenerator
from agm.registry import ModelSpec, TrainResult, register, unconditional_sample
from agm.runtime import budget, device
from agm.train import gradient_step, run_steps


def fgan_training(steps: int = 10_000, **changes) -> TrainConfig:
    """``steps`` alternating critic/generator updates on batches of 64; Adam at 1e-4 with beta_1 = 0.5 (DCGAN)."""
    return TrainConfig(**{"steps": steps, "batch_size": 64, "lr": 1e-4, "betas": (0.5, 0.999)} | changes)


@dataclass
class FGANConfig:
    divergence: str = "kl"  # a key of agm.foundations.fdiv.DIVERGENCES
    latent_dim: int = 64
    hidden: int = 512
    train: TrainConfig = field(default_factory=fgan_training)  # one optimizer each for critic and generator


class Critic(nn.Module):
    """Spectrally normalized layers keep V Lipschitz, so f*(g_f(V)) cannot explode (e.g. e^(t-1) for KL)."""

    def __init__(self, config: FGANConfig):
        super().__init__()
        h = config.hidden
        sn = nn.utils.parametrizations.spectral_norm
        self.net = nn.Sequential(
            nn.Flatten(), sn(nn.Linear(784, h)), nn.LeakyReLU(0.2),
            sn(nn.Linear(h, h // 2)), nn.LeakyReLU(0.2), sn(nn.Linear(h // 2, 1)),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x).squeeze(1)  # unconstrained output v, (B,)


class FGAN(nn.Module):
    def __init__(self, config: FGANConfig):
        super().__init__()
        fdiv.get(config.divergence)  # fail early on an unknown divergence
        self.config = config
        self.generator = MLPGenerator(config.latent_dim, config.hidden)
        self.critic = Critic(config)

    @torch.no_grad()
    def sample(self, n: int, generator: torch.Generator | None = None) -> torch.Tensor:
        self.generator.eval()
        dev = next(self.parameters()).device
        z = torch.randn(n, self.config.latent_dim, generator=generator).to(dev)  # drawn on the CPU generator
        return self.generator(z).cpu()


def critic_loss(model: FGAN, real: torch.Tensor, fake: torch.Tensor) -> torch.Tensor:
    """Minus the Fenchel lower bound on D_f(P_data || Q_G)."""
    return -fdiv.fenchel_bound(model.config.divergence, model.critic(real), model.critic(fake))


def generator_loss(model: FGAN, fake: torch.Tensor) -> torch.Tensor:
    """$-\\mathbb{E}_z[g_f(V(G(z)))]$."""
    return -fdiv.get(model.config.divergence).activation(model.critic(fake)).mean()


def train_step(model: FGAN, opt_g, opt_c, real: torch.Tensor, generator: torch.Generator) -> dict[str, float]:
    """One critic update, then one generator update, on a batch of real images."""
    z = torch.randn(len(real), model.config.latent_dim, generator=generator).to(real.device)
    fake = model.generator(z)
    desc = f"f-GAN ({model.config.divergence})"
    loss_c = gradient_step(critic_loss(model, real, fake.detach()), opt_c, desc=desc)
    loss_g = gradient_step(generator_loss(model, fake), opt_g, desc=desc)
    return {"bound": -loss_c, "generator_loss": loss_g}


def fit(config: FGANConfig, log_every: int = 500, log=print) -> tuple[FGAN, list[dict[str, float]]]:
    """Alternating updates through :func:`agm.train.run_steps`, on shuffled epochs of the training images."""
    train = config.train
    generator = torch.Generator().manual_seed(train.seed)
    torch.manual_seed(train.seed)
    x, _ = mnist("trainval")
    dev = device()
    model = FGAN(config).to(dev)
    opt_g, opt_c = train.adam(model.generator.parameters()), train.adam(model.critic.parameters())
    real = batches(x, batch_size=train.batch_size, generator=generator, device=dev, drop_last=True)

    def report(step: int, logs: dict) -> None:
        if step % log_every == 0 or step == train.steps:
            log(f"{config.divergence} step {step}: bound {logs['bound']:.4f}")

    history = run_steps(lambda step: train_step(model, opt_g, opt_c, next(real), generator), train.steps,
                        log_every, desc=f"f-GAN ({config.divergence})", on_step=report, modules=[model])
    return model.cpu().eval(), history


def build(config: dict) -> FGAN:
    return FGAN(from_dict(FGANConfig, config))


def trainer(divergence: str):
    def train(seed: int = 0, parents: dict | None = None) -> TrainResult:
        config = FGANConfig(divergence=divergence, train=fgan_training(budget(fgan_training().steps, 30), seed=seed))
        model, _ = fit(config)
        return TrainResult(model, to_dict(config), steps=config.train.steps)

    return train


TRAINED = ("kl", "reverse-kl", "jensen-shannon")

for _name in TRAINED:
    register(ModelSpec(
        name=f"fgan-{_name}", chapter=4, summary=f"f-GAN on MNIST minimizing the {_name} divergence (MLPs)",
        build=build, train=trainer(_name), evaluate=lambda model: {}, sample=unconditional_sample,
        train_minutes=10.0,
        samples="generator outputs",
    ))
