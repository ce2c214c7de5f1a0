"""Measurements of a trained noise-prediction network, for Chapter 30: where its output looks."""

from __future__ import annotations

import torch
from torch import nn


class StopGradientBranch(nn.Module):
    """The same output as a residual module f(x) = x + g(x); gradients pass only through the identity x.

    Replacing the U-Net's attention layer by this wrapper keeps the forward pass and blocks the
    route that attention gives a gradient: x + sg[f(x) - x].
    """

    def __init__(self, module: nn.Module):
        super().__init__()
        self.module = module

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + (self.module(x) - x).detach()


def output_sensitivity(model: nn.Module, x0: torch.Tensor, t: int, pixel: tuple[int, int],
                       generator: torch.Generator | None = None) -> torch.Tensor:
    """Mean over images of |∂ ε_θ(x_t, t)[pixel] / ∂ x_t|, a map of x_t's shape (C, H, W).

    ``x0`` (B, C, H, W) in [-1, 1] is noised to x_t ~ q(x_t | x_0) with draws from ``generator``.
    """
    row, col = pixel
    tt = torch.full((len(x0),), t, dtype=torch.long)
    # $x_t = \sqrt{\bar\alpha_t}\,x_0 + \sqrt{1-\bar\alpha_t}\,\epsilon$
    xt = model.schedule.q_sample(x0, tt, torch.randn(x0.shape, generator=generator)).requires_grad_(True)
    model(xt, tt)[:, 0, row, col].sum().backward()
    return xt.grad.abs().mean(0)
