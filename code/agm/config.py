"""Configs as nested dataclasses, and the one way every checkpoint writes and reads them.

A model's config holds its architecture and, in a field of its own, a :class:`TrainConfig`
(``DDPMConfig(unet=UNetConfig(...), schedule=ScheduleConfig(...), train=TrainConfig(...))``).
:func:`to_dict` turns any such tree into plain JSON values; :func:`from_dict` rebuilds it, checking
every key, so a checkpoint written by one version of a config cannot be read silently by another.
"""

from __future__ import annotations

import dataclasses
import math
import typing
from dataclasses import dataclass
from typing import Any, TypeVar

import torch

T = TypeVar("T")


@dataclass
class TrainConfig:
    """How a model is optimized; apart from what it is."""

    steps: int | None = 1000  # optimizer steps; None when the run is counted in epochs
    batch_size: int = 128
    lr: float = 1e-3  # Adam's learning rate
    betas: tuple[float, float] = (0.9, 0.999)  # Adam's moment decays; GANs use beta_1 = 0.5 (Radford et al.)
    lr_final: float | None = None  # cosine decay to this by the last step; None = constant
    warmup_steps: int = 0  # linear learning-rate warm-up
    grad_clip: float | None = None  # bound on the global gradient norm
    ema_decay: float | None = None  # exponential moving average of the weights; None = none
    seed: int = 0
    epochs: int | None = None  # passes over the training set, for a model that counts them (then steps is None)

    def __post_init__(self):
        if (self.steps is None) == (self.epochs is None):
            raise ValueError(f"give exactly one of steps and epochs, got steps={self.steps}, epochs={self.epochs}")
        if (self.steps or self.epochs) < 1 or self.batch_size < 1:
            raise ValueError(f"steps, epochs and batch_size must be positive, got {self}")

    def total_steps(self, examples: int | None = None) -> int:
        """Optimizer steps of the run: ``steps``, or ``epochs`` passes over ``examples`` in batches."""
        if self.epochs is None:
            return self.steps
        if examples is None:
            raise ValueError("a run counted in epochs needs the number of training examples")
        return self.epochs * math.ceil(examples / self.batch_size)

    def budgeted(self, seed: int = 0) -> TrainConfig:
        """This run under the runtime's budget (a smoke run: 20 steps of 32 examples), seeded with ``seed``."""
        from agm.runtime import budget

        return dataclasses.replace(self, steps=budget(self.steps, 20), batch_size=budget(self.batch_size, 32),
                                   seed=seed)

    def adam(self, parameters) -> torch.optim.Adam:
        return torch.optim.Adam(parameters, lr=self.lr, betas=self.betas)

    def scheduler(self, optimizer, steps: int | None = None) -> torch.optim.lr_scheduler.LRScheduler | None:
        """The learning-rate schedule of the run (``steps``: default the run's), or None for a constant rate.

        A linear warm-up over ``warmup_steps`` (factor (s + 1) / warmup_steps at update s), then, when
        ``lr_final`` is set, a cosine decay from lr to lr_final over the remaining steps.
        """
        total = steps or self.total_steps()
        if self.lr_final is None and self.warmup_steps == 0:
            return None
        if self.warmup_steps == 0:
            return torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, total, eta_min=self.lr_final)
        final = 1.0 if self.lr_final is None else self.lr_final / self.lr

        def factor(s: int) -> float:
            if s < self.warmup_steps:
                return (s + 1) / self.warmup_steps
            # $f = f_\text{final} + (1 - f_\text{final})\,\tfrac12\big(1 + \cos(\pi\,u)\big)$, u the decay's progress
            u = min(1.0, (s - self.warmup_steps) / max(1, total - self.warmup_steps))
            return final + (1 - final) * 0.5 * (1 + math.cos(math.pi * u))

        return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def to_dict(config: Any) -> dict[str, Any]:
    """A dataclass tree as nested dicts of JSON values (tuples become lists)."""
    if not dataclasses.is_dataclass(config) or isinstance(config, type):
        raise TypeError(f"expected a dataclass instance, got {type(config).__name__}")
    return _plain(dataclasses.asdict(config))


def _plain(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


def from_dict(cls: type[T], data: dict[str, Any]) -> T:
    """Rebuild ``cls`` from :func:`to_dict`'s output; nested dataclasses and tuples are restored.

    Unknown keys are an error naming them; missing keys take the field's default.
    """
    if not isinstance(data, dict):
        raise TypeError(f"{cls.__name__}: expected a dict, got {type(data).__name__}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        raise ValueError(f"{cls.__name__} has no field(s) {', '.join(unknown)}")
    hints = typing.get_type_hints(cls)
    return cls(**{k: _value(hints[k], v) for k, v in data.items()})


def _value(hint: Any, value: Any) -> Any:
    if value is None:
        return None
    for option in typing.get_args(hint) if typing.get_origin(hint) in (typing.Union, _union_type()) else (hint,):
        if dataclasses.is_dataclass(option) and isinstance(value, dict):
            return from_dict(option, value)
        if (option is tuple or typing.get_origin(option) is tuple) and isinstance(value, list):
            return tuple(value)
    return value


def _union_type():
    import types

    return types.UnionType
