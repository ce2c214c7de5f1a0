r"""A classifier of noisy images p_φ(y | x_t, t), for classifier guidance (Dhariwal & Nichol, 2021), Chapters 35 and 41.

The down path of the U-Net of Chapter 30 — residual blocks that see the timestep embedding —
followed by global average pooling and a linear layer over the ten digits. It is trained with
cross-entropy on x_t ~ q(x_t | x_0) at t ~ U{0..T-1}, under the schedule of the diffusion model it
will guide; :class:`agm.diffusion.guidance.ClassifierGuidance` refuses a model with another schedule.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from agm.config import TrainConfig, from_dict, to_dict
from agm.data import mnist, to_symmetric
from agm.diffusion.schedule import NoiseSchedule, ScheduleConfig
from agm.nn.unet import ResBlock, timestep_embedding
from agm.registry import ModelSpec, TrainResult, register
from agm.runtime import budget, device
from agm.train import fit_examples


def noise_classifier_training() -> TrainConfig:
    return TrainConfig(steps=3000, batch_size=128, lr=1e-3, lr_final=1e-5, warmup_steps=100, grad_clip=1.0)


@dataclass
class NoiseClassifierConfig:
    channels: int = 16  # width of the first level, as in the U-Net it guides
    multipliers: tuple[int, ...] = (1, 2, 4)  # one level per resolution: 28, 14, 7
    groups: int = 8
    num_classes: int = 10
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)  # that of the model it guides
    train: TrainConfig = field(default_factory=noise_classifier_training)


class NoiseClassifier(nn.Module):
    def __init__(self, config: NoiseClassifierConfig):
        super().__init__()
        self.config = cfg = config
        self.schedule = NoiseSchedule(cfg.schedule)
        c, t_dim = cfg.channels, 4 * cfg.channels
        self.t_mlp = nn.Sequential(nn.Linear(c, t_dim), nn.SiLU(), nn.Linear(t_dim, t_dim))
        self.stem = nn.Conv2d(1, c, 3, padding=1)
        widths = [c * m for m in cfg.multipliers]
        self.blocks = nn.ModuleList(ResBlock(w_in, w, t_dim, cfg.groups, 0.0)
                                    for w_in, w in zip([c, *widths[:-1]], widths, strict=True))
        self.down = nn.ModuleList(nn.Conv2d(w, w, 3, stride=2, padding=1) for w in widths[:-1])
        self.head = nn.Sequential(nn.GroupNorm(cfg.groups, widths[-1]), nn.SiLU(), nn.AdaptiveAvgPool2d(1),
                                  nn.Flatten(), nn.Linear(widths[-1], cfg.num_classes))

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """Logits ``[B, num_classes]`` of x_t ``[B, 1, 28, 28]`` (in [-1, 1] scale) at timesteps ``t`` ``[B]``."""
        if x.ndim != 4 or tuple(x.shape[1:]) != (1, 28, 28) or t.shape != (len(x),):
            raise ValueError(f"need x [B, 1, 28, 28] and t [B], got {list(x.shape)} and {list(t.shape)}")
        emb = self.t_mlp(timestep_embedding(t, self.config.channels))  # (B, 4C)
        h = self.stem(x)
        for i, block in enumerate(self.blocks):
            h = block(h, emb)  # (B, w_i, H_i, W_i)
            if i < len(self.down):
                h = self.down[i](h)
        return self.head(h)


def noisy_classification_loss(model: NoiseClassifier, x0: torch.Tensor, y: torch.Tensor,
                              generator: torch.Generator | None = None) -> tuple[torch.Tensor, dict]:
    r"""Cross-entropy $-\log p_\phi(y \mid x_t, t)$ at $t \sim \mathcal U\{0..T-1\}$, $x_t \sim q(x_t \mid x_0)$."""
    t = torch.randint(model.schedule.num_timesteps, (len(x0),), generator=generator).to(x0.device)
    eps = torch.randn(x0.shape, generator=generator).to(x0.device)
    # $x_t = \sqrt{\bar\alpha_t}\,x_0 + \sqrt{1-\bar\alpha_t}\,\epsilon$
    logits = model(model.schedule.q_sample(x0, t, eps), t)
    return F.cross_entropy(logits, y), {"accuracy": (logits.argmax(1) == y).float().mean()}


@torch.no_grad()
def accuracy_by_timestep(model: NoiseClassifier, x0: torch.Tensor, y: torch.Tensor, timesteps: list[int],
                         generator: torch.Generator | None = None, batch_size: int = 1000) -> list[float]:
    """Test accuracy at each of ``timesteps``, on [0, 1] images ``x0`` noised once per timestep."""
    model.eval()
    dev, out = next(model.parameters()).device, []
    for t in timesteps:
        correct = 0
        for i in range(0, len(x0), batch_size):
            xb = to_symmetric(x0[i : i + batch_size]).to(dev)
            tt = torch.full((len(xb),), t, dtype=torch.long, device=dev)
            xt = model.schedule.q_sample(xb, tt, torch.randn(xb.shape, generator=generator).to(dev))
            correct += (model(xt, tt).argmax(1).cpu() == y[i : i + batch_size]).sum().item()
        out.append(correct / len(x0))
    return out


class CleanOnNoisy(nn.Module):
    """A classifier of clean [0, 1] images handed x_t mapped back to [0, 1] and clamped; it ignores t.

    The baseline that :func:`accuracy_by_timestep` measures beside the time-conditioned classifier,
    noising with ``schedule``.
    """

    def __init__(self, classifier: nn.Module, schedule: NoiseSchedule):
        super().__init__()
        self.classifier, self.schedule = classifier, schedule

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return self.classifier(((x + 1) / 2).clamp(0, 1))


# -- the registered model --------------------------------------------------------------------------

ACCURACY_TIMESTEPS = [0, 100, 200, 300, 400, 500, 600, 700, 800, 900, 999]


def build(config: dict) -> NoiseClassifier:
    return NoiseClassifier(from_dict(NoiseClassifierConfig, config))


def train(seed: int = 0, parents: dict | None = None) -> TrainResult:
    config = NoiseClassifierConfig(train=noise_classifier_training().budgeted(seed))
    torch.manual_seed(seed)
    model = NoiseClassifier(config).to(device())
    x, y = mnist("trainval")
    history = fit_examples(model, lambda m, b, g: noisy_classification_loss(m, *b, g), config.train, x, y,
                           transform=to_symmetric, desc="noise-classifier")
    return TrainResult(model.eval(), to_dict(config), steps=config.train.steps, extra={"history": history})


def evaluate(model: NoiseClassifier) -> dict[str, float]:
    x, y = mnist("test")
    n = budget(len(x), 200)
    timesteps = budget(ACCURACY_TIMESTEPS, [0, 500, 999])
    acc = accuracy_by_timestep(model, x[:n], y[:n], timesteps, torch.Generator().manual_seed(0))
    return {"accuracy_n": n, **{f"accuracy_t{t}": a for t, a in zip(timesteps, acc, strict=True)}}


def evaluate_full(model: NoiseClassifier) -> dict:
    from agm.diffusion import evaluations  # it loads and samples ddpm

    return evaluations.evaluate_classifier_guidance_full(model)


register(ModelSpec(
    name="noise-classifier", chapter=35,
    summary="time-conditioned classifier p(y | x_t, t) for classifier guidance (U-Net down path)",
    build=build, train=train, evaluate=evaluate, evaluate_full=evaluate_full, train_minutes=20.0,
))
