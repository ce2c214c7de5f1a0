"""The MNIST classifier behind the metrics kit: its penultimate features feed FID and
precision/recall, its softmax the Inception Score and class coverage.

Trained on the 50 000 images of the ``train`` split (``valid`` picks the best epoch); the
``test`` split is the metrics' reference set and is never seen in training.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from agm.config import TrainConfig, from_dict, to_dict
from agm.data import batches, mnist
from agm.registry import ModelSpec, TrainResult, register
from agm.runtime import budget, device
from agm.train import train_loop


def classifier_training(epochs: int = 8, **changes) -> TrainConfig:
    """``epochs`` passes in batches of 128; Adam with a one-cycle learning rate peaking at 2e-3."""
    return TrainConfig(**{"steps": None, "epochs": epochs, "batch_size": 128, "lr": 2e-3} | changes)


@dataclass
class ClassifierConfig:
    width: int = 32  # channels of the first conv block (the second has twice as many)
    features: int = 128  # dimension of the penultimate layer used by FID and precision/recall
    dropout: float = 0.3
    max_shift: int = 2  # training augmentation: random translations of up to this many pixels
    train: TrainConfig = field(default_factory=classifier_training)


class MNISTClassifier(nn.Module):
    def __init__(self, config: ClassifierConfig):
        super().__init__()
        self.config = config
        w = config.width

        def block(c_in: int, c_out: int) -> nn.Sequential:
            return nn.Sequential(
                nn.Conv2d(c_in, c_out, 3, padding=1), nn.BatchNorm2d(c_out), nn.ReLU(),
                nn.Conv2d(c_out, c_out, 3, padding=1), nn.BatchNorm2d(c_out), nn.ReLU(),
                nn.MaxPool2d(2),
            )

        self.body = nn.Sequential(block(1, w), block(w, 2 * w), nn.Flatten())  # (B, 2w * 7 * 7)
        self.embed = nn.Sequential(nn.Linear(2 * w * 49, config.features), nn.ReLU())
        self.head = nn.Sequential(nn.Dropout(config.dropout), nn.Linear(config.features, 10))

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """Penultimate activations ``[B, features]`` of images in [0, 1]."""
        return self.embed(self.body(x - 0.5))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))  # logits (B, 10)


def random_shift(x: torch.Tensor, max_shift: int, generator: torch.Generator) -> torch.Tensor:
    """Translate each image by up to ``max_shift`` pixels (zero fill)."""
    if max_shift == 0:
        return x
    padded = F.pad(x, [max_shift] * 4)
    dx, dy = torch.randint(0, 2 * max_shift + 1, (2, len(x)), generator=generator)
    rows = (torch.arange(28)[None, :] + dy[:, None])[:, :, None]  # (B, 28, 1)
    cols = (torch.arange(28)[None, :] + dx[:, None])[:, None, :]  # (B, 1, 28)
    return padded[torch.arange(len(x))[:, None, None], 0, rows, cols].unsqueeze(1)


@torch.no_grad()
def accuracy(model: MNISTClassifier, x: torch.Tensor, y: torch.Tensor, batch_size: int = 1000) -> float:
    model.eval()
    dev = next(model.parameters()).device
    correct = sum((model(x[i : i + batch_size].to(dev)).argmax(1).cpu() == y[i : i + batch_size]).sum().item()
                  for i in range(0, len(x), batch_size))
    return correct / len(x)


def classification_loss(model: MNISTClassifier, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    x, y = batch
    return F.cross_entropy(model(x), y)


def augmented_batches(x, y, config: ClassifierConfig, generator: torch.Generator, dev: torch.device):
    """One epoch of shuffled, randomly shifted batches (agm.data.batches with a random-shift transform)."""
    return batches(x, y, batch_size=config.train.batch_size, generator=generator, device=dev, epochs=1,
                   transform=lambda images, g: random_shift(images, config.max_shift, g))


def fit(config: ClassifierConfig, n_train: int | None = None, log=print) -> MNISTClassifier:
    """Adam with a one-cycle learning rate; keeps the weights of the best validation epoch."""
    train = config.train
    generator = torch.Generator().manual_seed(train.seed)
    torch.manual_seed(train.seed)
    x, y = mnist("train")
    x, y = x[:n_train], y[:n_train]
    xv, yv = mnist("valid")
    xv, yv = xv[: budget(None, 1000)], yv[: budget(None, 1000)]
    dev = device()
    model = MNISTClassifier(config).to(dev)
    opt = train.adam(model.parameters())
    per_epoch = train.total_steps(len(x)) // train.epochs
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=train.lr, total_steps=train.total_steps(len(x)))
    best, best_state = -1.0, None
    for epoch in range(train.epochs):
        train_loop(model, classification_loss, augmented_batches(x, y, config, generator, dev), opt,
                   steps=per_epoch, log_every=per_epoch, desc=f"epoch {epoch + 1}", scheduler=sched)
        val = accuracy(model, xv, yv)
        log(f"epoch {epoch + 1}/{train.epochs}: validation accuracy {val:.4f}")
        if val > best:
            best, best_state = val, {k: v.detach().clone() for k, v in model.state_dict().items()}
    model.load_state_dict(best_state)
    return model.cpu().eval()


def build(config: dict) -> MNISTClassifier:
    return MNISTClassifier(from_dict(ClassifierConfig, config))


def train(seed: int = 0, parents: dict | None = None) -> TrainResult:
    config = ClassifierConfig(train=classifier_training(budget(classifier_training().epochs, 1), seed=seed))
    model = fit(config, n_train=budget(None, 2000))
    return TrainResult(model, to_dict(config), steps=config.train.epochs)


def evaluate(model: MNISTClassifier) -> dict[str, float]:
    n = budget(None, 1000)
    x, y = mnist("test")
    xv, yv = mnist("valid")
    x, y, xv, yv = x[:n], y[:n], xv[:n], yv[:n]
    return {"test_accuracy": accuracy(model, x, y), "valid_accuracy": accuracy(model, xv, yv)}


register(ModelSpec(
    name="classifier", chapter=14, summary="MNIST CNN classifier (features for FID, IS, precision/recall)",
    build=build, train=train, evaluate=evaluate, train_minutes=10.0,
))
