"""The model registry: every model of the book, by name, for the command line and the results page.

A model module registers a :class:`ModelSpec` when imported; :data:`MODEL_MODULES` lists
those modules, so adding a model to the book means adding one line here.
"""

from __future__ import annotations

import argparse
import importlib
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from agm import checkpoint

MODEL_MODULES = [
    "agm.foundations.bernoulli",
    "agm.foundations.mixture",
    "agm.foundations.fgan",
    "agm.vae.vae",
    "agm.vae.beta_vae",
    "agm.vae.vqvae",
    "agm.diffusion.ddpm",
    "agm.classifier",
]


@dataclass
class TrainResult:
    model: nn.Module
    config: dict[str, Any]
    steps: int
    extra: dict[str, Any] = field(default_factory=dict)  # training diagnostics for the manifest


@dataclass
class ModelSpec:
    """What the command line needs to train, load, sample and evaluate one model."""

    name: str
    chapter: int
    summary: str
    build: Callable[[dict[str, Any]], nn.Module]  # config -> untrained model
    train: Callable[[int], TrainResult]  # (seed) -> trained model, under the runtime's full or smoke budgets
    sample: Callable[..., torch.Tensor]  # (model, n, generator, labels, **options) -> [n, 1, 28, 28]
    evaluate: Callable[[nn.Module], dict[str, float]]  # the metrics the book reports
    conditional: bool = False
    generative: bool = True  # False for helpers such as the metrics' classifier
    num_classes: int = 10
    train_minutes: float = 1.0  # rough time of `train NAME` on 2 CPU cores, for error messages
    add_sample_options: Callable[[argparse.ArgumentParser], None] | None = None
    # sampler options of the shipped metrics, when they differ from the command line's defaults
    metric_sample_options: Callable[[], dict[str, Any]] | None = None
    # an expensive evaluation run once by `evaluate NAME --full`, stored in the manifest
    evaluate_full: Callable[[nn.Module], dict[str, float]] | None = None


def unconditional_sample(model: nn.Module, n: int, generator: torch.Generator, labels=None) -> torch.Tensor:
    """``spec.sample`` for a model with a ``sample(n, generator)`` method and no labels."""
    return model.sample(n, generator)


_REGISTRY: dict[str, ModelSpec] = {}


def register(spec: ModelSpec) -> ModelSpec:
    if spec.name in _REGISTRY and _REGISTRY[spec.name] is not spec:
        raise ValueError(f"model name {spec.name!r} is registered twice")
    _REGISTRY[spec.name] = spec
    return spec


def all_specs() -> dict[str, ModelSpec]:
    for module in MODEL_MODULES:
        importlib.import_module(module)
    return dict(sorted(_REGISTRY.items(), key=lambda kv: (kv[1].chapter, kv[0])))


def get(name: str) -> ModelSpec:
    specs = all_specs()
    if name not in specs:
        raise KeyError(f"unknown model {name!r}; known models: {', '.join(specs)}")
    return specs[name]


def state_of(model: nn.Module, config: dict[str, Any]) -> dict[str, Any]:
    return {"config": config, "state_dict": model.state_dict()}


def load_model(name: str, directory=None) -> tuple[nn.Module, checkpoint.Manifest]:
    """Build the model from its checkpoint's config and load the verified weights."""
    spec = get(name)
    state, manifest = checkpoint.load(name, directory)
    model = spec.build(state["config"])
    model.load_state_dict(state["state_dict"])
    return model.eval(), manifest
