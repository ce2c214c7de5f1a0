r"""Guidance of a noise-prediction model towards a class, Chapters 35 and 41.

Classifier-free guidance (Ho & Salimans, 2022) trains one network on labels that are replaced by a
null label with probability ``p_uncond`` (:func:`drop_labels`) and samples with

$$\tilde\epsilon(x_t, t, y) = (1 + w)\,\epsilon_\theta(x_t, t, y) - w\,\epsilon_\theta(x_t, t, \varnothing),$$

Ho & Salimans' convention: w = 0 is the conditional model, w = -1 the unconditional one, and
diffusers' ``guidance_scale`` is s = 1 + w (its $\epsilon_\varnothing + s(\epsilon_y - \epsilon_\varnothing)$
is the same line). Classifier guidance (Dhariwal & Nichol, 2021) needs no conditional diffusion
model, only a classifier of noisy images p_φ(y | x_t, t), and shifts the prediction by the gradient
of its log-probability:

$$\hat\epsilon(x_t, t, y) = \epsilon_\theta(x_t, t) - s\sqrt{1-\bar\alpha_t}\,\nabla_{x_t}\log p_\phi(y \mid x_t, t).$$

A guided model is itself a noise-prediction model, so every sampler of
:mod:`agm.diffusion.samplers` draws from it unchanged.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from agm.diffusion.schedule import NoiseSchedule


def drop_labels(labels: torch.Tensor, p: float, null_label: int,
                generator: torch.Generator | None = None) -> torch.Tensor:
    """Each label replaced by ``null_label`` with probability ``p``, independently (uniforms on the CPU generator)."""
    if not 0.0 <= p <= 1.0:
        raise ValueError(f"p must lie in [0, 1], got {p}")
    drop = (torch.rand(labels.shape, generator=generator) < p).to(labels.device)
    return torch.where(drop, torch.full_like(labels, null_label), labels)


def check_labels(labels: torch.Tensor, t: torch.Tensor, num_classes: int) -> None:
    if labels.shape != t.shape or ((labels < 0) | (labels >= num_classes)).any():
        raise ValueError(f"labels must be [B] integers in 0..{num_classes - 1}, got {labels.tolist()}")


def check_guidance_weight(w: float) -> None:
    if not w >= -1.0:  # also refuses NaN
        raise ValueError(f"the guidance weight w must be >= -1 (w = -1 is the unconditional model), got {w}")


class ClassifierFreeGuidance(nn.Module):
    r"""The guided prediction $(1+w)\,\epsilon(x, t, y) - w\,\epsilon(x, t, \varnothing)$ of a class-conditional model.

    ``model(x, t, labels)`` must accept ``labels`` None for the null label (as :class:`agm.nn.unet.UNet`
    does). Both predictions come from one forward pass over the doubled batch. Labels None (an
    unconditional draw) returns the unconditional prediction whatever w is.
    """

    def __init__(self, model: nn.Module, w: float, num_classes: int = 10):
        super().__init__()
        check_guidance_weight(w)
        self.model, self.w, self.num_classes = model, float(w), num_classes

    def forward(self, x: torch.Tensor, t: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        if labels is None:
            return self.model(x, t)
        check_labels(labels, t, self.num_classes)
        null = torch.full_like(labels, self.num_classes)
        eps = self.model(torch.cat([x, x]), torch.cat([t, t]), torch.cat([labels, null]))  # (2B, C, H, W)
        eps_cond, eps_uncond = eps.chunk(2)
        # $\tilde\epsilon = (1 + w)\,\epsilon_\theta(x_t, y) - w\,\epsilon_\theta(x_t, \varnothing)$
        return (1 + self.w) * eps_cond - self.w * eps_uncond


class ClassifierGuidance(nn.Module):
    r"""$\epsilon_\theta(x_t, t) - s\sqrt{1-\bar\alpha_t}\,\nabla_{x_t}\log p_\phi(y \mid x_t, t)$: an unconditional
    ε-model steered by a noisy-image classifier (Dhariwal & Nichol, 2021, Algorithm 2 and eq. 14).

    In score terms $\nabla\log p_t(x_t) + s\nabla\log p_\phi(y \mid x_t) = \nabla\log(p_t(x_t)\,p_\phi(y \mid x_t)^s)$,
    since $\epsilon = -\sqrt{1-\bar\alpha_t}\,\nabla\log p_t$. ``classifier(x_t, t)`` returns logits and
    must have been trained under ``schedule``; ``scale`` s >= 0 (0 = the unguided model).
    """

    def __init__(self, model: nn.Module, classifier: nn.Module, schedule: NoiseSchedule, scale: float):
        super().__init__()
        if not scale >= 0:
            raise ValueError(f"the classifier guidance scale must be >= 0, got {scale}")
        trained_for = getattr(getattr(classifier, "config", None), "schedule", None)
        if trained_for is not None and trained_for != schedule.config:
            raise ValueError(f"the classifier was trained under {trained_for}, the diffusion model uses "
                             f"{schedule.config}: retrain the classifier for this schedule")
        self.model, self.classifier, self.schedule, self.scale = model, classifier, schedule, float(scale)

    def forward(self, x: torch.Tensor, t: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        if labels is None:
            raise ValueError("classifier guidance needs the labels to draw")
        eps = self.model(x, t)
        with torch.enable_grad():
            xg = x.detach().requires_grad_(True)
            logits = self.classifier(xg, t)  # (B, classes)
            check_labels(labels, t, logits.shape[1])
            log_p = F.log_softmax(logits, dim=1)[torch.arange(len(x)), labels]  # (B,)
            (grad,) = torch.autograd.grad(log_p.sum(), xg)  # the rows are independent: per-example gradients
        # $\hat\epsilon = \epsilon_\theta - s\sqrt{1-\bar\alpha_t}\,\nabla_{x_t}\log p_\phi(y \mid x_t)$
        a = self.schedule.alphas_cumprod.to(x.device)[t].to(x.dtype).view(-1, 1, 1, 1)
        return eps - self.scale * (1 - a).sqrt() * grad
