r"""Guidance of a noise-prediction model towards a class, Chapters 35 and 41.

Classifier-free guidance (Ho & Salimans, 2022) trains one network on labels that are replaced by a
null label with probability ``p_uncond`` (:func:`drop_labels`) and samples with

$$\tilde\epsilon(x_t, t, y) = (1 + w)\,\epsilon_\theta(x_t, t, y) - w\,\epsilon_\theta(x_t, t, \varnothing),$$

Ho & Salimans' convention: w = 0 is the conditional model, w = -1 the unconditional one, and
diffusers' ``guidance_scale`` is s = 1 + w (its $\epsilon_\varnothing + s(\epsilon_y - \epsilon_\varnothing)$
is the same line). A guided model is itself a noise-prediction model, so every sampler of
:mod:`agm.diffusion.samplers` draws from it unchanged.
"""

from __future__ import annotations

import torch
from torch import nn


def drop_labels(labels: torch.Tensor, p: float, null_label: int,
                generator: torch.Generator | None = None) -> torch.Tensor:
    """Each label replaced by ``null_label`` with probability ``p``, independently (uniforms on the CPU generator)."""
    if not 0.0 <= p <= 1.0:
        raise ValueError(f"p must lie in [0, 1], got {p}")
    drop = (torch.rand(labels.shape, generator=generator) < p).to(labels.device)
    return torch.where(drop, torch.full_like(labels, null_label), labels)


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
        if labels.shape != t.shape or ((labels < 0) | (labels >= self.num_classes)).any():
            raise ValueError(f"labels must be [B] integers in 0..{self.num_classes - 1}, got {labels.tolist()}")
        null = torch.full_like(labels, self.num_classes)
        eps = self.model(torch.cat([x, x]), torch.cat([t, t]), torch.cat([labels, null]))  # (2B, C, H, W)
        eps_cond, eps_uncond = eps.chunk(2)
        # $\tilde\epsilon = (1 + w)\,\epsilon_\theta(x_t, y) - w\,\epsilon_\theta(x_t, \varnothing)$
        return (1 + self.w) * eps_cond - self.w * eps_uncond
