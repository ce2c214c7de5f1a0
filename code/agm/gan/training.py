"""What the GANs of Chapters 6, 8 and 9 share: the pair of networks, the alternating update, the training run.

One step is one discriminator update on real images and G(z), then one generator update against
the updated discriminator (Goodfellow et al., 2014, Algorithm 1 with k = 1), each with its own Adam.
A conditional GAN (Chapter 9) does the same on pairs (x, y): G(z, y) against a discriminator l(x, y).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from agm.config import TrainConfig
from agm.data import batches, mnist
from agm.gan.losses import check_generator_loss, discriminator_loss, generator_loss
from agm.registry import refuse_labels
from agm.runtime import device
from agm.train import gradient_step, run_steps

IMAGE_SHAPE = (1, 28, 28)


def check_image_shape(x: torch.Tensor) -> torch.Tensor:
    """A discriminator's input must be a batch of MNIST images, (B, 1, 28, 28)."""
    if x.ndim != 4 or tuple(x.shape[1:]) != IMAGE_SHAPE:
        raise ValueError(f"the discriminator takes images of shape [B, 1, 28, 28], got {list(x.shape)}")
    return x


class Adversarial(nn.Module):
    """A generator x = G(z), z ~ N(0, I), and a discriminator with logit l(x), D(x) = sigmoid(l(x)).

    ``config`` needs ``latent_dim`` and ``loss`` (a generator loss of :mod:`agm.gan.losses`). A
    conditional subclass sets ``conditional = True``: its networks are G(z, y) and l(x, y), its config
    has ``num_classes``, and :meth:`fake`, :meth:`logits` and :meth:`generate` then require labels y.
    """

    conditional = False

    def __init__(self, config, generator: nn.Module, discriminator: nn.Module):
        super().__init__()
        check_generator_loss(config.loss)  # fail early on an unknown loss
        self.config = config
        self.generator = generator
        self.discriminator = discriminator

    def latents(self, n: int, generator: torch.Generator | None = None) -> torch.Tensor:
        """z ~ N(0, I), (n, L), drawn on the CPU generator and moved to the model's device."""
        return torch.randn(n, self.config.latent_dim, generator=generator).to(next(self.parameters()).device)

    def _labels(self, labels: torch.Tensor | None) -> tuple[torch.Tensor, ...]:
        """The networks' extra argument: (y,) for a conditional GAN, () for an unconditional one."""
        if (labels is not None) != self.conditional:
            raise ValueError("a conditional GAN needs labels y" if self.conditional else
                             "this GAN is not class-conditional: it takes no labels")
        return () if labels is None else (labels,)

    def generator_side(self) -> list[nn.Parameter]:
        """The parameters that the generator's optimizer updates: G's (a BiGAN adds its encoder's)."""
        return list(self.generator.parameters())

    def fake(self, z: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        """G(z), or G(z, y) for a conditional GAN: (B, 1, 28, 28)."""
        return self.generator(z, *self._labels(labels))

    def logits(self, x: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        """l(x), or l(x, y) for a conditional GAN: (B,)."""
        return self.discriminator(x, *self._labels(labels))

    @torch.no_grad()
    def generate(self, n: int, generator: torch.Generator | None = None,
                 labels: torch.Tensor | None = None) -> torch.Tensor:
        """n images G(z) (G(z, y) given n labels) in [0, 1], (n, 1, 28, 28) on the CPU; BatchNorm layers use
        their running statistics."""
        was_training = self.generator.training
        self.generator.eval()
        z = self.latents(n, generator)  # (n, L)
        x = self.fake(z, None if labels is None else labels.to(z.device)).cpu()
        self.generator.train(was_training)
        return x


def train_step(model: Adversarial, opt_g: torch.optim.Optimizer, opt_d: torch.optim.Optimizer,
               real: torch.Tensor, generator: torch.Generator, labels: torch.Tensor | None = None) -> dict[str, float]:
    """One discriminator update, then one generator update, on a batch of real images (B, 1, 28, 28).

    A conditional GAN takes the real images' labels (B,) and draws its samples for the same labels, so
    real and generated pairs (x, y) have the same label marginal and differ only in x given y.
    """
    fake = model.fake(model.latents(len(real), generator), labels)  # (B, 1, 28, 28)
    # 1. the discriminator ascends V(D, G) on real images and detached samples
    d_loss, d_logs = discriminator_loss(model.logits(real, labels), model.logits(fake.detach(), labels))
    d_value = gradient_step(d_loss, opt_d, desc="GAN discriminator")
    # 2. the generator descends its loss against the discriminator just updated
    g_loss, g_logs = generator_loss(model.logits(fake, labels), model.config.loss)
    g_value = gradient_step(g_loss, opt_g, desc=f"GAN generator ({model.config.loss})")
    return {"d_loss": d_value, "g_loss": g_value, **d_logs, **g_logs}


def fid_point(model: Adversarial, step: int, n: int, seed: int = 0) -> dict[str, float]:
    """The metrics kit (FID (MNIST classifier) and the rest) on n samples of the generator at ``step``.

    The latents come from a generator of their own, the same at every step, so the training run's
    random stream does not depend on how often this is called. A conditional GAN draws the digits
    0..9 in turn and also reports the kit classifier's agreement with them (:func:`agm.metrics.label_accuracy`).
    """
    from agm.metrics import label_accuracy, sample_metrics

    labels = torch.arange(n) % model.config.num_classes if model.conditional else None
    images = model.generate(n, torch.Generator().manual_seed(seed), labels)
    point = {"step": step, **sample_metrics(images)}
    if labels is not None:
        accuracy, per_class = label_accuracy(images, labels, model.config.num_classes)
        point |= {"label_accuracy": accuracy, "label_accuracy_per_class": per_class.tolist()}
    return point


def fit_adversarial(model: Adversarial, train: TrainConfig, desc: str, log_every: int = 500, log=print,
                    fid_every: int | None = None, fid_samples: int = 2000,
                    step: Callable[..., dict] = train_step) -> tuple[Adversarial, dict]:
    """Alternating updates ``step(model, opt_g, opt_d, real, generator, labels)`` (:func:`train_step` unless
    given) through :func:`agm.train.run_steps` on shuffled epochs of the 60 000 training images (gray
    levels in [0, 1]), with their labels for a conditional GAN. Returns the model and
    ``{"history": [...], "fid": [...]}``; with ``fid_every``, the kit on ``fid_samples`` samples at step 0,
    every ``fid_every`` steps and the last."""
    generator = torch.Generator().manual_seed(train.seed)
    x, y = mnist("trainval")
    dev = device()
    model = model.to(dev)
    opt_g, opt_d = train.adam(model.generator_side()), train.adam(model.discriminator.parameters())
    data = batches(x, y if model.conditional else None, batch_size=train.batch_size, generator=generator,
                   device=dev, drop_last=True)  # images (B, 1, 28, 28), or (images, labels (B,))
    fid = [fid_point(model, 0, fid_samples)] if fid_every else []

    def step_fn(_: int) -> dict[str, float]:
        real, labels = next(data) if model.conditional else (next(data), None)
        return step(model, opt_g, opt_d, real, generator, labels)

    def after_step(step: int, logs: dict) -> None:
        last = step == train.steps
        if fid_every and (step % fid_every == 0 or last):
            fid.append(fid_point(model, step, fid_samples))
            accuracy = f", label accuracy {fid[-1]['label_accuracy']:.3f}" if model.conditional else ""
            log(f"{desc} step {step}: FID (MNIST classifier) {fid[-1]['fid']:.2f}{accuracy}")
        if step % log_every == 0 or last:
            log(f"{desc} step {step}: d_loss {logs['d_loss']:.4f}, g_loss {logs['g_loss']:.4f}, "
                f"D(x) {float(logs['d_real']):.3f}, D(G(z)) {float(logs['d_fake']):.3f}")

    history = run_steps(step_fn, train.steps, log_every, desc=desc, on_step=after_step, modules=[model])
    return model.cpu().eval(), {"history": history, "fid": fid}


def sample(model: Adversarial, n: int, generator: torch.Generator, labels=None) -> torch.Tensor:
    """``spec.sample`` of an unconditional GAN: G(z) for n latents, (n, 1, 28, 28) in [0, 1]."""
    refuse_labels(labels)
    return model.generate(n, generator)
