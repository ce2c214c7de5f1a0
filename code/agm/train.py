"""One training loop for every gradient-trained model of the book.

Two forms share one core, :func:`run_steps`:

- :func:`train_loop` — one model, one optimizer: ``loss_fn(model, batch)`` returns ``loss`` or
  ``(loss, logs)``; the loop takes the gradient step.
- :func:`run_steps` — any update: ``step_fn(step)`` does its own optimizer steps (a critic and a
  generator, inner critic steps, a gradient penalty, PPO epochs over a rollout, a line search) and
  returns its logs. :func:`gradient_step` is the one place a loss becomes an update.

Logs are a dict of numbers (or 0-d tensors); every ``log_every`` steps they enter the returned
history as ``{"step": s, **logs}``. Tensors that are not scalars travel to ``on_step(step, logs)``
only, for diagnostics accumulated over every step. A non-finite loss stops before the update.
"""

from __future__ import annotations

import copy
import math
import sys
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import torch
from torch import nn

Logs = dict[str, Any]


class NonFiniteLossError(FloatingPointError):
    """A loss came out NaN or infinite; the weights were not updated."""


def check_finite(loss: torch.Tensor, desc: str, step: int | None = None) -> float:
    value = loss.item()
    if not math.isfinite(value):
        where = f" at step {step}" if step is not None else ""
        raise NonFiniteLossError(f"{desc}: loss is {value}{where}; the weights were not updated. "
                                 "Lower the learning rate or check the inputs.")
    return value


def gradient_step(loss: torch.Tensor, optimizer: torch.optim.Optimizer, grad_clip: float | None = None,
                  desc: str = "train", step: int | None = None) -> float:
    """zero_grad, backward, optional global-norm clipping, step; returns the loss as a float."""
    value = check_finite(loss, desc, step)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    if grad_clip is not None:
        params = [p for group in optimizer.param_groups for p in group["params"]]
        nn.utils.clip_grad_norm_(params, grad_clip)
    optimizer.step()
    return value


def split_logs(out: torch.Tensor | tuple[torch.Tensor, Logs]) -> tuple[torch.Tensor, Logs]:
    """A loss function's result as ``(loss, logs)``, whichever form it returned."""
    if isinstance(out, tuple):
        loss, logs = out
        return loss, dict(logs)
    return out, {}


def scalars(logs: Logs) -> dict[str, float]:
    """The entries of ``logs`` that are numbers or 0-d tensors, as floats (what the history keeps)."""
    out = {}
    for k, v in logs.items():
        if isinstance(v, torch.Tensor):
            if v.ndim == 0:
                out[k] = v.item()
        elif isinstance(v, (int, float)) and not isinstance(v, bool):
            out[k] = float(v)
    return out


def run_steps(step_fn: Callable[[int], Logs], steps: int, log_every: int = 50, desc: str = "train",
              on_step: Callable[[int, Logs], None] | None = None,
              modules: Iterable[nn.Module] = ()) -> list[dict[str, float]]:
    """Call ``step_fn(step)`` for step = 1..steps; keep its scalar logs every ``log_every`` steps.

    ``modules`` are put in training mode before and evaluation mode after. A progress bar is drawn
    only when stderr is a terminal (never inside a book build).
    """
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    if log_every < 1:
        raise ValueError(f"log_every must be >= 1, got {log_every}")
    modules = list(modules)
    for m in modules:
        m.train()
    history: list[dict[str, float]] = []
    bar = None
    if sys.stderr.isatty():
        from tqdm import tqdm

        bar = tqdm(total=steps, desc=desc, leave=False)
    try:
        for step in range(1, steps + 1):
            logs = step_fn(step)
            if on_step is not None:
                on_step(step, logs)
            if step % log_every == 0 or step == steps:
                history.append({"step": step, **scalars(logs)})
            if bar is not None:
                bar.update(1)
                if "loss" in logs:
                    bar.set_postfix(loss=f"{float(logs['loss']):.4f}")
    finally:
        if bar is not None:
            bar.close()
        for m in modules:
            m.eval()
    return history


def train_loop(
    model: nn.Module,
    loss_fn: Callable[[nn.Module, Any], torch.Tensor | tuple[torch.Tensor, Logs]],
    batches: Iterator[Any],
    optimizer: torch.optim.Optimizer,
    steps: int,
    log_every: int = 50,
    desc: str = "train",
    on_step: Callable[[int, Logs], None] | None = None,
    grad_clip: float | None = None,
    scheduler: torch.optim.lr_scheduler.LRScheduler | None = None,
    ema: EMA | None = None,
) -> list[dict[str, float]]:
    """``steps`` optimizer steps of ``loss_fn(model, next(batches))``; returns the logged history.

    The history holds ``loss`` and the scalar logs of the loss function; ``scheduler.step()`` and
    ``ema.update(model)`` follow every update; ``on_step(step, logs)`` runs after them.
    """

    def step_fn(step: int) -> Logs:
        loss, logs = split_logs(loss_fn(model, next(batches)))
        value = gradient_step(loss, optimizer, grad_clip, desc, step)
        if scheduler is not None:
            scheduler.step()
        if ema is not None:
            ema.update(model)
        return {"loss": value, **logs}

    return run_steps(step_fn, steps, log_every, desc, on_step, modules=[model])


class EMA:
    """Exponential moving average of a model's parameters, kept in a separate copy of the model.

    After every optimizer step, ``update()`` sets $\\bar\\theta \\leftarrow d\\,\\bar\\theta + (1-d)\\,\\theta$;
    with ``warmup`` the decay is $\\min(d, (1+k)/(10+k))$ at update k, so early averages do not
    remember the random initialization for thousands of steps. Buffers are copied as they are.
    """

    def __init__(self, model: nn.Module, decay: float = 0.999, warmup: bool = True):
        if not 0.0 <= decay < 1.0:
            raise ValueError(f"EMA decay must lie in [0, 1), got {decay}")
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


def ema_along(values: torch.Tensor, decay: float, warmup: bool = True) -> tuple[float, float]:
    """Run :class:`EMA` over a scalar parameter taking ``values[0], values[1], ...`` in turn.

    Returns the final average and the weight the initial value still carries in it: the product of
    the decays used (1 update per later value). The setting of Chapter 29's warm-up comparison.
    """
    if values.ndim != 1 or len(values) < 2:
        raise ValueError(f"values must be a 1-D tensor of at least two entries, got {list(values.shape)}")
    param = nn.Parameter(values[:1].clone())
    holder = nn.ParameterList([param])
    ema = EMA(holder, decay=decay, warmup=warmup)
    weight_of_init = 1.0
    for value in values[1:]:
        weight_of_init *= ema.current_decay()
        with torch.no_grad():
            param.fill_(value)
        ema.update(holder)
    return ema.module[0].item(), weight_of_init


def fit_examples(model: nn.Module, loss_fn: Callable[[nn.Module, Any, torch.Generator], Any], train: Any,
                 x: torch.Tensor, y: torch.Tensor | None = None, transform=None, desc: str = "train",
                 log_every: int = 100) -> list[dict[str, float]]:
    """One supervised run over ``x`` (and labels ``y``) under the :class:`agm.config.TrainConfig` ``train``.

    Adam with the run's learning-rate schedule and gradient clipping, shuffled batches drawn by a
    generator seeded with ``train.seed`` (which ``loss_fn(model, batch, generator)`` also draws from),
    ``train.total_steps(len(x))`` updates (``steps``, or ``epochs`` passes). Returns the logged history.
    """
    from agm.data import batches

    generator = torch.Generator().manual_seed(train.seed)
    dev = next(model.parameters()).device
    optimizer = train.adam(model.parameters())
    steps = train.total_steps(len(x))
    data = batches(x, y, batch_size=train.batch_size, generator=generator, transform=transform, device=dev,
                   drop_last=True)
    return train_loop(model, lambda m, b: loss_fn(m, b, generator), data, optimizer, steps, desc=desc,
                      grad_clip=train.grad_clip, scheduler=train.scheduler(optimizer, steps), log_every=log_every)
