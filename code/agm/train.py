"""One small training loop for every gradient-trained model of the book."""

from __future__ import annotations

import math
import sys
from collections.abc import Callable, Iterator

import torch
from torch import nn


def train_loop(
    model: nn.Module,
    loss_fn: Callable[[nn.Module, torch.Tensor], torch.Tensor],
    batches: Iterator[torch.Tensor],
    optimizer: torch.optim.Optimizer,
    steps: int,
    log_every: int = 50,
    desc: str = "train",
    on_step: Callable[[int], None] | None = None,
    grad_clip: float | None = None,
) -> list[dict[str, float]]:
    """Run ``steps`` optimizer steps of ``loss_fn(model, batch)``; return the logged history.

    A progress bar is drawn only when stderr is a terminal (never inside a book build).
    A non-finite loss stops training with an error instead of corrupting the weights.
    ``grad_clip`` bounds the global gradient norm; ``on_step(step)`` runs after each update.
    """
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    model.train()
    history: list[dict[str, float]] = []
    bar = None
    if sys.stderr.isatty():
        from tqdm import tqdm

        bar = tqdm(total=steps, desc=desc, leave=False)
    for step in range(1, steps + 1):
        loss = loss_fn(model, next(batches))
        if not math.isfinite(loss.item()):
            raise FloatingPointError(
                f"{desc}: loss is {loss.item()} at step {step}; the weights were not updated. "
                "Lower the learning rate or check the inputs."
            )
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if grad_clip is not None:
            nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
        optimizer.step()
        if on_step is not None:
            on_step(step)
        if step % log_every == 0 or step == steps:
            history.append({"step": step, "loss": loss.item()})
        if bar is not None:
            bar.update(1)
            bar.set_postfix(loss=f"{loss.item():.4f}")
    if bar is not None:
        bar.close()
    model.eval()
    return history


class EMA:
    """Exponential moving average of a model's parameters, kept in a separate copy of the model.

    After every optimizer step, ``update()`` sets $\\bar\\theta \\leftarrow d\\,\\bar\\theta + (1-d)\\,\\theta$;
    with ``warmup`` the decay is $\\min(d, (1+k)/(10+k))$ at update k, so early averages do not
    remember the random initialization for thousands of steps. Buffers are copied as they are.
    """

    def __init__(self, model: nn.Module, decay: float = 0.999, warmup: bool = True):
        if not 0.0 <= decay < 1.0:
            raise ValueError(f"EMA decay must lie in [0, 1), got {decay}")
        import copy

        self.decay, self.warmup, self.updates = decay, warmup, 0
        self.module = copy.deepcopy(model).eval()
        for p in self.module.parameters():
            p.requires_grad_(False)

    def current_decay(self) -> float:
        if not self.warmup:
            return self.decay
        return min(self.decay, (1 + self.updates) / (10 + self.updates))

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        d = self.current_decay()
        for avg, p in zip(self.module.parameters(), model.parameters(), strict=True):
            avg.lerp_(p.detach(), 1 - d)
        for avg, b in zip(self.module.buffers(), model.buffers(), strict=True):
            avg.copy_(b)
        self.updates += 1
