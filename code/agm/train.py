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
) -> list[dict[str, float]]:
    """Run ``steps`` optimizer steps of ``loss_fn(model, batch)``; return the logged history.

    A progress bar is drawn only when stderr is a terminal (never inside a book build).
    A non-finite loss stops training with an error instead of corrupting the weights.
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
