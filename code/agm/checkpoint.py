"""Checkpoints: ``NAME.pt`` (weights + config) beside ``NAME.json`` (the manifest).

The manifest records how the file was made (config, command, steps, wall time, hardware)
and what it reached (metrics), and its sha256, which every load verifies before
``torch.load(..., weights_only=True)`` reads a byte of it.
"""

from __future__ import annotations

import json
import os
import platform
import tempfile
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch

from agm.data import sha256_file
from agm.runtime import checkpoint_dir, hardware


class CheckpointError(RuntimeError):
    """A checkpoint is missing, corrupt or inconsistent; the message names the command that rebuilds it."""


@dataclass
class Manifest:
    name: str
    config: dict[str, Any]
    command: str
    steps: int
    wall_time_s: float
    hardware: str
    metrics: dict[str, Any] = field(default_factory=dict)
    training: dict[str, Any] = field(default_factory=dict)  # diagnostics of the run, e.g. loss per timestep
    requires: dict[str, str] = field(default_factory=dict)  # parent checkpoint -> its sha256 when this one was made
    sha256: str = ""
    file: str = ""
    torch_version: str = torch.__version__
    python_version: str = platform.python_version()
    created: str = ""


def paths(name: str, directory: Path | None = None) -> tuple[Path, Path]:
    d = Path(directory or checkpoint_dir())
    return d / f"{name}.pt", d / f"{name}.json"


def rebuild_hint(name: str) -> str:
    return f"rebuild it with `python -m agm train {name}`"


def resolve_dir(name: str, directory: Path | None = None) -> Path:
    """Where ``name`` is read from: ``directory`` if it holds a manifest of that name, else the shipped folder.

    A model trained into another folder (a smoke run, ``--out-dir``) finds its parents beside it
    first, then among the shipped checkpoints.
    """
    if directory is not None and paths(name, directory)[1].is_file():
        return Path(directory)
    return Path(checkpoint_dir())


def stale_requirements(pins: dict[str, str], directory: Path | None = None) -> list[str]:
    """The pinned parents whose checkpoint is missing or no longer has the pinned sha256, one line each."""
    problems = []
    for parent, pinned in sorted(pins.items()):
        where = resolve_dir(parent, directory)
        state = status(parent, where)
        if state != "verified":
            problems.append(f"{parent} is {state}")
            continue
        current = read_manifest(parent, where).sha256
        if current != pinned:
            problems.append(f"{parent} has changed (pinned sha256 {pinned[:12]}…, now {current[:12]}…)")
    return problems


def check_requirements(name: str, manifest: Manifest, directory: Path | None = None) -> None:
    """Refuse a checkpoint whose parents are missing or changed, naming the commands that rebuild both."""
    problems = stale_requirements(manifest.requires, directory)
    if problems:
        commands = " && ".join(f"python -m agm train {n}" for n in [*sorted(manifest.requires), name])
        raise CheckpointError(f"{name} was trained on other parents: {'; '.join(problems)}; "
                              f"rebuild them in order with `{commands}`")


def save(name: str, state: dict[str, Any], manifest: Manifest, directory: Path | None = None) -> Manifest:
    """Write the weights atomically, then the manifest carrying their sha256."""
    pt, js = paths(name, directory)
    pt.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=pt.parent, prefix=f".{pt.name}.", suffix=".part")
    os.close(fd)
    try:
        torch.save(state, tmp)
        os.chmod(tmp, 0o644)
        os.replace(tmp, pt)
    finally:
        Path(tmp).unlink(missing_ok=True)
    manifest.sha256 = sha256_file(pt)
    manifest.file = pt.name
    manifest.created = datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
    js.write_text(json.dumps(asdict(manifest), indent=2, sort_keys=True) + "\n")
    return manifest


def read_manifest(name: str, directory: Path | None = None) -> Manifest:
    _, js = paths(name, directory)
    if not js.is_file():
        raise CheckpointError(f"no checkpoint manifest for {name!r} at {js}; {rebuild_hint(name)}")
    try:
        return Manifest(**json.loads(js.read_text()))
    except (json.JSONDecodeError, TypeError) as e:
        raise CheckpointError(f"the manifest {js} is unreadable ({e}); {rebuild_hint(name)}") from e


def status(name: str, directory: Path | None = None) -> str:
    """'verified', 'missing' or 'corrupt' — never raises."""
    pt, _ = paths(name, directory)
    try:
        m = read_manifest(name, directory)
    except CheckpointError:
        return "missing"
    if not pt.is_file():
        return "missing"
    return "verified" if sha256_file(pt) == m.sha256 else "corrupt"


def load(name: str, directory: Path | None = None) -> tuple[dict[str, Any], Manifest]:
    """Verify the sha256 against the manifest, then load with ``weights_only=True``."""
    pt, _ = paths(name, directory)
    m = read_manifest(name, directory)
    if not pt.is_file():
        raise CheckpointError(f"checkpoint file {pt} is missing; {rebuild_hint(name)}")
    digest = sha256_file(pt)
    if digest != m.sha256:
        raise CheckpointError(
            f"checkpoint {pt} is corrupt or was modified: sha256 {digest[:12]}… != manifest "
            f"{m.sha256[:12]}…; {rebuild_hint(name)}"
        )
    check_requirements(name, m, directory)
    state = torch.load(pt, map_location="cpu", weights_only=True)
    return state, m


def new_manifest(name: str, config: dict[str, Any], steps: int, wall_time_s: float,
                 metrics: dict[str, Any], command: str | None = None,
                 training: dict[str, Any] | None = None, requires: dict[str, str] | None = None) -> Manifest:
    return Manifest(name=name, config=config, command=command or f"python -m agm train {name}",
                    steps=steps, wall_time_s=round(wall_time_s, 1), hardware=hardware(),
                    metrics=metrics, training=training or {}, requires=requires or {})


def fill_cells(name: str, key: str, plan: dict[str, Callable[[], dict]], log: Callable[[str], None] = print,
               directory: Path | None = None) -> dict[str, dict]:
    """Measure each cell of ``plan`` that the manifest of ``name`` lacks under ``metrics[key]``, storing
    each as soon as it is done, so that an expensive evaluation stopped at any point resumes where it
    stopped. Each cell is merged into the cells stored at the time it is written, so processes filling
    different cells of one manifest keep each other's. Returns every cell stored under ``key``."""
    def stored() -> dict[str, dict]:
        return dict(read_manifest(name, directory).metrics.get(key, {}))

    for cell, measure in plan.items():
        if cell in stored():
            continue
        log(f"{name}: {key} {cell} ...")
        result = measure()
        update_metrics(name, {key: stored() | {cell: result}}, directory)
    return stored()


def update_metrics(name: str, metrics: dict[str, Any], directory: Path | None = None,
                   drop: Iterable[str] = ()) -> Manifest:
    """Merge ``metrics`` into the manifest of a verified checkpoint, first removing the keys in ``drop``; the
    weights are not touched."""
    if status(name, directory) != "verified":
        raise CheckpointError(f"checkpoint {name!r} is missing or corrupt; {rebuild_hint(name)}")
    manifest = read_manifest(name, directory)
    for key in drop:
        manifest.metrics.pop(key, None)
    manifest.metrics.update(metrics)
    _, js = paths(name, directory)
    tmp = js.with_suffix(".json.part")
    tmp.write_text(json.dumps(asdict(manifest), indent=2, sort_keys=True) + "\n")
    os.replace(tmp, js)
    return manifest
