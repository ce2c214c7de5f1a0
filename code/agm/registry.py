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
    "agm.gan.gan",
    "agm.gan.dcgan",
    "agm.gan.cgan",
    "agm.gan.wgan",
    "agm.gan.bigan",
    "agm.gan.inversion",
    "agm.gan.dann",
    "agm.vae.vae",
    "agm.vae.beta_vae",
    "agm.vae.vqvae",
    "agm.diffusion.ddpm",
    "agm.diffusion.ddpm_cfg",
    "agm.diffusion.ddpm_prediction",
    "agm.diffusion.latent",
    "agm.diffusion.noise_classifier",
    "agm.autoregressive.made",
    "agm.autoregressive.ar_transformer",
    "agm.rl.models",
    "agm.preference.models",
    "agm.ssm.model",
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
    # (seed, parents) -> trained model, under the runtime's full or smoke budgets; parents maps each
    # name in ``requires`` to its loaded, verified model
    train: Callable[[int, dict[str, nn.Module]], TrainResult]
    evaluate: Callable[[nn.Module], dict[str, float]]  # the metrics the book reports
    # (model, n, generator, labels, **options) -> [n, 1, 28, 28] in [0, 1]; None for models that do
    # not generate images (the metrics' classifier, a reward model)
    sample: Callable[..., torch.Tensor] | None = None
    # what the sampler returns by default, and so what the stored metrics measure
    samples: str = "gray levels"
    requires: tuple[str, ...] = ()  # checkpoints this model is built on; their sha256 is pinned in its manifest
    conditional: bool = False
    num_classes: int = 10
    train_minutes: float = 1.0  # rough time of `train NAME` on 2 CPU cores, for error messages
    add_sample_options: Callable[[argparse.ArgumentParser], None] | None = None
    # sampler options of the shipped metrics, when they differ from the command line's defaults
    metric_sample_options: Callable[[], dict[str, Any]] | None = None
    # an expensive evaluation run once by `evaluate NAME --full`, stored in the manifest
    evaluate_full: Callable[[nn.Module], dict[str, float]] | None = None
    # whether the metrics kit against all test images measures its samples (False for a generator of one digit,
    # which its own ``evaluate`` measures against the test images of that digit)
    kit: bool = True

    @property
    def generative(self) -> bool:
        """Whether the model draws images (and so is measured by the metrics kit)."""
        return self.sample is not None


def unconditional_sample(model: nn.Module, n: int, generator: torch.Generator, labels=None) -> torch.Tensor:
    """``spec.sample`` for a model with a ``sample(n, generator)`` method and no labels."""
    refuse_labels(labels)
    return model.sample(n, generator)


def refuse_labels(labels: torch.Tensor | None) -> None:
    """An unconditional model given labels says so instead of ignoring them."""
    if labels is not None:
        raise ValueError("this model is not class-conditional: it cannot draw given labels")


_REGISTRY: dict[str, ModelSpec] = {}


def register(spec: ModelSpec) -> ModelSpec:
    if spec.name in _REGISTRY and _REGISTRY[spec.name] is not spec:
        raise ValueError(f"model name {spec.name!r} is registered twice")
    if spec.name in spec.requires:
        raise ValueError(f"model {spec.name!r} cannot require itself")
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
    """Build the model from its checkpoint's config and load the verified weights.

    The checkpoint is read from ``directory`` when it holds one, else from the shipped folder; a
    model whose pinned parents are missing or changed is refused (:func:`checkpoint.check_requirements`).
    """
    spec = get(name)
    where = checkpoint.resolve_dir(name, directory)
    state, manifest = checkpoint.load(name, where)
    missing = sorted(set(spec.requires) - set(manifest.requires))
    if missing:
        raise checkpoint.CheckpointError(f"{name}'s manifest pins no sha256 for {', '.join(missing)}; "
                                         f"{checkpoint.rebuild_hint(name)}")
    model = spec.build(state["config"])
    model.load_state_dict(state["state_dict"])
    return model.eval(), manifest


def load_parents(spec: ModelSpec, directory=None) -> tuple[dict[str, nn.Module], dict[str, str]]:
    """The verified models ``spec`` requires, and the sha256 of each, to pin in its manifest."""
    parents, pins = {}, {}
    for parent in spec.requires:
        try:
            parents[parent], manifest = load_model(parent, directory)
        except checkpoint.CheckpointError as e:
            raise checkpoint.CheckpointError(f"{spec.name} requires {parent}, which cannot be loaded: {e}") from e
        pins[parent] = manifest.sha256
    return parents, pins
