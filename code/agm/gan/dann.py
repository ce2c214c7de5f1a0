r"""Domain-adversarial training (Ganin & Lempitsky, 2015; Ganin et al., 2016) on an MNIST-only shift, Chapter 13.

The source domain is MNIST as it is, with labels; the target domain is the same digits seen through another
"sensor", without labels: ``noise`` adds Gaussian noise of standard deviation ``noise_sigma`` to every pixel
and clips to [0, 1] (the noise of each image fixed by a seed), ``invert`` maps x -> 1 - x (black digits on
white). Both shifts keep every label and every stroke and change only the pixels' statistics, so a classifier
that fails on the target fails because of the shift alone.

A feature extractor f = F(x) feeds two heads: a label classifier C(f) trained on source labels, and a domain
classifier D(f) that tells source features from target ones. D is attached through a gradient-reversal layer:
the identity forward, -lambda times the gradient backward, so one backward pass trains D to separate the domains
and F to make them inseparable (Ganin et al., Section 5).

Networks and schedules are Ganin et al.'s for MNIST -> MNIST-M: F has two 5x5 convolutions (32 and 48
channels) with max pooling, C two hidden layers of 100, D one of 100; SGD with momentum 0.9 at
mu_p = 0.01 / (1 + 10 p)^0.75 and lambda_p = 2 / (1 + exp(-10 p)) - 1 over training progress p in [0, 1].

Three settings of one training loop (:data:`SETTINGS`): ``source-only`` (labels from the source, no domain
head), ``dann`` (the same plus the domain head), ``target-only`` (labels from the target: the upper bound).
"""

from __future__ import annotations

import dataclasses
import functools
import math
import statistics
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from agm import checkpoint
from agm.config import TrainConfig, from_dict, to_dict
from agm.data import batches, mnist
from agm.gan.training import check_image_shape
from agm.registry import ModelSpec, TrainResult, register
from agm.runtime import budget, device
from agm.train import gradient_step, run_steps

SETTINGS = ("source-only", "dann", "target-only")
SHIFTS = ("noise", "invert")
SEEDS = (0, 1, 2)
NOISE_SEEDS = {"trainval": 1, "test": 2}  # the target images' noise, fixed per split
# 0.02-0.03 s per step at AGM_THREADS=1 (64 source and 64 target images): 4000 steps take about 2 min, and the
# nine runs of `evaluate dann --full` (three settings, three seeds) about 18 min.
DANN_STEPS = 3000


def invert(x: torch.Tensor) -> torch.Tensor:
    """Gray levels x -> 1 - x (white digits on black become black on white)."""
    return 1 - x


def add_noise(x: torch.Tensor, sigma: float, seed: int) -> torch.Tensor:
    """x + sigma * N(0, 1) per pixel, clipped to [0, 1]; the same noise for the same seed."""
    noise = torch.randn(x.shape, generator=torch.Generator().manual_seed(seed))
    return (x + sigma * noise).clamp(0, 1)


def to_target(x: torch.Tensor, shift: str, sigma: float, split: str) -> torch.Tensor:
    """The target domain's view of the images x of ``split`` ("trainval" or "test")."""
    if shift not in SHIFTS:
        raise ValueError(f"unknown shift {shift!r}; choose one of {', '.join(SHIFTS)}")
    return invert(x) if shift == "invert" else add_noise(x, sigma, NOISE_SEEDS[split])


@dataclass
class DANNConfig:
    setting: str = "dann"  # "source-only", "dann" or "target-only"
    shift: str = "noise"  # the target domain: "noise" or "invert" (to_target)
    noise_sigma: float = 1.0  # standard deviation of the target's pixel noise (shift "noise")
    hidden: int = 100  # units of the label classifier's two hidden layers and the domain classifier's one
    lr: float = 0.01  # mu_0 of the annealed rate mu_p = mu_0 / (1 + alpha p)^beta
    alpha: float = 10.0
    beta: float = 0.75
    gamma: float = 10.0  # lambda_p = 2 / (1 + exp(-gamma p)) - 1
    momentum: float = 0.9
    train: TrainConfig = field(default_factory=lambda: TrainConfig(steps=DANN_STEPS, batch_size=64))

    def __post_init__(self):
        if self.setting not in SETTINGS:
            raise ValueError(f"unknown setting {self.setting!r}; choose one of {', '.join(SETTINGS)}")
        if self.shift not in SHIFTS:
            raise ValueError(f"unknown shift {self.shift!r}; choose one of {', '.join(SHIFTS)}")


class GradientReversal(torch.autograd.Function):
    """The identity forward; -lambda times the incoming gradient backward (no gradient for lambda)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, lam: float) -> torch.Tensor:
        ctx.lam = lam
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        # $\partial \mathcal{L} / \partial x = -\lambda\, \partial \mathcal{L} / \partial R(x)$
        return -ctx.lam * grad, None


def reverse_gradient(x: torch.Tensor, lam: float) -> torch.Tensor:
    return GradientReversal.apply(x, lam)


class DANN(nn.Module):
    """Feature extractor F, label classifier C and domain classifier D (Ganin et al.'s MNIST networks)."""

    def __init__(self, config: DANNConfig):
        super().__init__()
        self.config = config
        H = config.hidden
        self.features = nn.Sequential(
            nn.Conv2d(1, 32, 5), nn.ReLU(), nn.MaxPool2d(2),  # 28 -> 24 -> 12
            nn.Conv2d(32, 48, 5), nn.ReLU(), nn.MaxPool2d(2),  # 12 -> 8 -> 4
            nn.Flatten(),  # (B, 48 * 4 * 4)
        )
        self.classifier = nn.Sequential(nn.Linear(768, H), nn.ReLU(), nn.Linear(H, H), nn.ReLU(), nn.Linear(H, 10))
        self.domain = nn.Sequential(nn.Linear(768, H), nn.ReLU(), nn.Linear(H, 1))  # logit of "target"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Class logits, (B, 10)."""
        return self.classifier(self.features(check_image_shape(x)))

    def domain_logits(self, x: torch.Tensor, lam: float = 1.0) -> torch.Tensor:
        """The domain classifier's logit of "target" through the gradient reversal, (B,)."""
        return self.domain(reverse_gradient(self.features(check_image_shape(x)), lam)).squeeze(1)


def domain_gradients(model: DANN, x: torch.Tensor, domains: torch.Tensor, lam: float,
                     through_reversal: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """Gradients of the domain classifier's cross-entropy on (x, domains) for the feature extractor and for the
    domain head, flattened: through the reversal layer, or around it (the plain gradient) for comparison."""
    model.zero_grad()
    features = model.features(check_image_shape(x))
    logits = model.domain(reverse_gradient(features, lam) if through_reversal else features).squeeze(1)
    F.binary_cross_entropy_with_logits(logits, domains).backward()
    return (torch.cat([p.grad.flatten() for p in model.features.parameters()]),
            torch.cat([p.grad.flatten() for p in model.domain.parameters()]))


def schedules(config: DANNConfig, p: float) -> tuple[float, float]:
    """The learning rate mu_p and the reversal weight lambda_p at training progress p in [0, 1]."""
    # $\mu_p = \mu_0 / (1 + \alpha p)^\beta$, $\lambda_p = 2 / (1 + e^{-\gamma p}) - 1$
    return config.lr / (1 + config.alpha * p) ** config.beta, 2 / (1 + math.exp(-config.gamma * p)) - 1


def dann_loss(model: DANN, source: torch.Tensor, labels: torch.Tensor, target: torch.Tensor,
              lam: float) -> tuple[torch.Tensor, dict]:
    """Cross-entropy of the labels on the source batch plus the domain classifier's binary cross-entropy on both
    batches (source 0, target 1), whose gradient reaches F reversed and scaled by lambda."""
    class_loss = F.cross_entropy(model(source), labels)
    logits = model.domain_logits(torch.cat([source, target]), lam)  # (2B,)
    domains = torch.cat([torch.zeros(len(source)), torch.ones(len(target))]).to(logits.device)
    domain_loss = F.binary_cross_entropy_with_logits(logits, domains)
    accuracy = ((logits > 0).float() == domains).float().mean()
    return class_loss + domain_loss, {"class_loss": class_loss.detach(), "domain_loss": domain_loss.detach(),
                                      "domain_accuracy": accuracy.detach()}


def accuracy(model: DANN, x: torch.Tensor, y: torch.Tensor, batch_size: int = 1000) -> float:
    """The share of images whose largest class logit is their label (model in eval mode, no gradients)."""
    dev = next(model.parameters()).device
    with torch.no_grad():
        hits = sum((model(x[i:i + batch_size].to(dev)).argmax(1).cpu() == y[i:i + batch_size]).sum().item()
                   for i in range(0, len(x), batch_size))
    return hits / len(x)


def fit(config: DANNConfig, log_every: int = 50, log=print, print_every: int = 500) -> tuple[DANN, dict]:
    """Train one setting from a seeded initialization on the 60 000 training images: source batches of MNIST
    with labels, target batches of their target-domain copies (:func:`to_target`) drawn in an independent order
    (labels unused by ``dann``). The history keeps the logs every ``log_every`` steps."""
    torch.manual_seed(config.train.seed)
    train = config.train
    rng = torch.Generator().manual_seed(train.seed)
    x, y = mnist("trainval")
    dev = device()
    model = DANN(config).to(dev)
    opt = torch.optim.SGD(model.parameters(), lr=config.lr, momentum=config.momentum)
    source = batches(x, y, batch_size=train.batch_size, generator=rng, device=dev, drop_last=True)
    target = batches(to_target(x, config.shift, config.noise_sigma, "trainval"), y, batch_size=train.batch_size,
                     generator=rng, device=dev, drop_last=True)

    def step_fn(step: int) -> dict:
        lr, lam = schedules(config, (step - 1) / train.steps)
        for group in opt.param_groups:
            group["lr"] = lr
        (xs, ys), (xt, yt) = next(source), next(target)
        if config.setting == "dann":
            loss, logs = dann_loss(model, xs, ys, xt, lam)
        else:  # labels from one domain only, no domain head
            xb, yb = (xs, ys) if config.setting == "source-only" else (xt, yt)
            loss = F.cross_entropy(model(xb), yb)
            logs = {"class_loss": loss.detach()}
        return {"loss": gradient_step(loss, opt, desc=f"{config.setting} step", step=step), "lr": lr, "lambda": lam,
                **logs}

    def after_step(step: int, logs: dict) -> None:
        if step % print_every == 0 or step == train.steps:
            log(f"{config.setting} step {step}: loss {logs['loss']:.4f}")

    history = run_steps(step_fn, train.steps, log_every, desc=config.setting, on_step=after_step, modules=[model])
    return model.cpu().eval(), {"history": history}


def evaluate(model: DANN, n: int | None = None) -> dict[str, float]:
    """Accuracy on the source and the target test sets (10 000 images each; smoke 500)."""
    x, y = mnist("test")
    target = to_target(x, model.config.shift, model.config.noise_sigma, "test")
    n = n or budget(len(x), 500)
    return {"source_accuracy": accuracy(model, x[:n], y[:n]), "target_accuracy": accuracy(model, target[:n], y[:n]),
            "n_test": n}


def seed_run(shift: str, setting: str, seed: int, steps: int | None = None, log=print) -> dict[str, float]:
    """``setting`` on ``shift`` at ``seed``, trained for ``steps`` (default: the shipped run's, under the budget):
    source and target accuracy, and for DANN how well the domain classifier separates the domains at the end."""
    config = DANNConfig(setting=setting, shift=shift)
    config.train = dataclasses.replace(config.train.budgeted(seed), steps=steps or budget(DANN_STEPS, 20))
    model, logs = fit(config, log=log)
    result = evaluate(model)
    if setting == "dann":  # the mean over the last tenth of the logged history
        late = [h["domain_accuracy"] for h in logs["history"][-max(1, len(logs["history"]) // 10):]]
        result["final_domain_accuracy"] = statistics.fmean(late)
    log(f"{shift} {setting} seed {seed}: {result}")
    return result


def summarize(shift: str, runs: dict[str, dict], settings=SETTINGS, seeds=SEEDS) -> dict[str, dict]:
    """The table of ``runs`` (keyed ``setting/seed<k>``): each accuracy's mean and standard deviation over seeds."""
    summary = {}
    for setting in settings:
        done = [runs[f"{setting}/seed{seed}"] for seed in seeds]
        for metric in ("source_accuracy", "target_accuracy"):
            values = [d[metric] for d in done]
            summary[f"{setting}/{metric}"] = {"mean": statistics.fmean(values),
                                               "sd": statistics.stdev(values) if len(values) > 1 else 0.0,
                                               "values": values}
    return {"shift": shift, "runs": {k: runs[k] for k in (f"{a}/seed{b}" for a in settings for b in seeds)},
            "summary": summary}


def seed_table(shift: str = "noise", settings=SETTINGS, steps: int | None = None, seeds=SEEDS,
               log=print) -> dict[str, dict]:
    """``settings`` on ``shift`` at every seed (:func:`seed_run`), summarized."""
    runs = {f"{setting}/seed{seed}": seed_run(shift, setting, seed, steps, log)
            for setting in settings for seed in seeds}
    return summarize(shift, runs, settings, seeds)


def build(config: dict) -> DANN:
    return DANN(from_dict(DANNConfig, config))


def trainer(setting: str):
    def train(seed: int = 0, parents: dict | None = None) -> TrainResult:
        config = DANNConfig(setting=setting)
        config.train = config.train.budgeted(seed)
        model, logs = fit(config)
        return TrainResult(model, to_dict(config), steps=config.train.steps, extra={"history": logs["history"]})

    return train


def evaluate_full(model: DANN, log=print) -> dict:
    """``evaluate dann --full``: source-only, DANN and target-only at seeds 0, 1, 2 on the noisy target, and
    source-only and DANN on the inverted one (fifteen runs of a few minutes each). Each run is stored in the
    manifest under ``seed_runs`` as it finishes, so an interrupted evaluation resumes where it stopped."""
    tables = {"noise": SETTINGS, "invert": ("source-only", "dann")}
    plan = {f"{shift}/{setting}/seed{seed}": functools.partial(seed_run, shift, setting, seed, log=log)
            for shift, settings in tables.items() for setting in settings for seed in SEEDS}
    cells = checkpoint.fill_cells("dann", "seed_runs", plan, log)
    runs = {shift: {k.split("/", 1)[1]: v for k, v in cells.items() if k.startswith(f"{shift}/")} for shift in tables}
    return {"seed_table": summarize("noise", runs["noise"]),
            "seed_table_invert": summarize("invert", runs["invert"], tables["invert"])}


MODELS = {"dann": "dann", "dann-source-only": "source-only"}  # registered name -> setting
SUMMARIES = {"dann": "domain-adversarial network: MNIST -> MNIST under heavy pixel noise, gradient reversal",
             "dann-source-only": "DANN's networks trained on source labels alone (the baseline)"}


def spec(name: str) -> ModelSpec:
    """The entry of ``dann`` or ``dann-source-only`` for :mod:`agm.registry`."""
    if name not in MODELS:
        raise KeyError(f"unknown model {name!r}; choose one of {', '.join(MODELS)}")
    return ModelSpec(name=name, chapter=13, summary=SUMMARIES[name], build=build, train=trainer(MODELS[name]),
                     evaluate=evaluate, evaluate_full=evaluate_full if name == "dann" else None,
                     train_minutes=11.0 if name == "dann" else 4.0)


for _name in MODELS:
    register(spec(_name))
