r"""Reward hacking by direct optimization (Chapter 54): projected gradient ascent on the pixels of images
against a learned reward.

A reward model is trained on the pictures a policy draws; nothing constrains it elsewhere. Climbing its
gradient from a sample, with the pixels relaxed to [0, 1], finds the directions in which it is most easily
fooled. The chapter measures what the hidden criterion makes of the result.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from agm.data import check_images


def pixel_ascent(reward: Callable[[torch.Tensor], torch.Tensor], images: torch.Tensor, steps: int,
                 step_size: float, callback: Callable[[int, torch.Tensor], None] | None = None
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    r"""Projected gradient ascent on each image separately,
    $x_{k+1} = \Pi_{[0,1]}\big(x_k + \eta\, \nabla_x r(x_k)\big)$, for ``steps`` steps of size $\eta$.

    ``reward`` maps images (B, 1, 28, 28) to one value each, (B,), and must treat the images independently
    (no batch statistics). ``callback(k, x_k)`` sees every iterate, k = 0..steps. Returns the last iterate and
    the reward of every iterate, (steps + 1, B). The reward's parameters are left as they were.
    """
    check_images(images)
    if not isinstance(steps, int) or steps < 0:
        raise ValueError(f"steps must be an integer >= 0, got {steps!r}")
    if not step_size > 0:
        raise ValueError(f"step_size must be > 0, got {step_size}")
    x = images.detach().clone()
    rewards = []
    for k in range(steps + 1):
        if callback is not None:
            callback(k, x)
        x.requires_grad_(True)
        r = reward(x)  # (B,)
        if r.shape != (len(x),):
            raise ValueError(f"reward must return one value per image, shape ({len(x)},), got {list(r.shape)}")
        rewards.append(r.detach())
        if k == steps:
            break
        # $\nabla_x r(x)$ of each image: the images do not interact, so the gradient of the sum is per image
        (grad,) = torch.autograd.grad(r.sum(), x)
        with torch.no_grad():
            # $x \leftarrow \Pi_{[0,1]}(x + \eta \nabla_x r)$
            x = (x + step_size * grad).clamp(0.0, 1.0)
    return x.detach(), torch.stack(rewards)
