"""Where the code runs: repository paths, smoke budgets, device, seeds, threads."""

from __future__ import annotations

import os
import random
from pathlib import Path

import numpy as np
import torch

# code/agm/runtime.py -> the repository root is two levels above the package.
REPO_ROOT = Path(__file__).resolve().parents[2]


def repo_path(*parts: str) -> Path:
    return REPO_ROOT.joinpath(*parts)


def data_root() -> Path:
    """Folder that holds ``MNIST/raw``; ``AGM_DATA`` overrides ``<repo>/data``."""
    return Path(os.environ.get("AGM_DATA", repo_path("data")))


def checkpoint_dir() -> Path:
    """Folder of shipped checkpoints; ``AGM_CHECKPOINTS`` overrides ``<repo>/checkpoints``."""
    return Path(os.environ.get("AGM_CHECKPOINTS", repo_path("checkpoints")))


def is_smoke() -> bool:
    """True when ``AGM_SMOKE=1``: every budget shrinks, every code path stays the same."""
    return os.environ.get("AGM_SMOKE", "0") not in ("", "0", "false", "False")


def budget(full, smoke):
    """The one switch between full and smoke budgets (steps, sample counts, data sizes)."""
    return smoke if is_smoke() else full


def device() -> torch.device:
    """cuda -> mps -> cpu, whichever is available first; ``AGM_DEVICE`` forces one."""
    forced = os.environ.get("AGM_DEVICE")
    if forced:
        return torch.device(forced)
    if torch.cuda.is_available():
        return torch.device("cuda")
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


def seed_everything(seed: int) -> torch.Generator:
    """Seed Python, NumPy and torch; return a CPU generator seeded the same way."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    return torch.Generator().manual_seed(seed)


def set_threads(n: int | None = None) -> int:
    """Use ``n`` intra-op threads (default: ``AGM_THREADS`` or every core)."""
    n = n or int(os.environ.get("AGM_THREADS", "0")) or (os.cpu_count() or 1)
    torch.set_num_threads(n)
    return n


def hardware() -> str:
    """One line describing where this process computes (for manifests and pages)."""
    dev = device()
    if dev.type == "cuda":
        return f"cuda: {torch.cuda.get_device_name(dev)}"
    return f"{dev.type}: {os.cpu_count()} logical cores, {torch.get_num_threads()} torch threads"


def best_seconds(fn, repeats: int = 3) -> float:
    """The shortest wall time of ``repeats`` calls of ``fn()``: the least disturbed by other work on the machine."""
    import time

    if repeats < 1:
        raise ValueError(f"repeats must be >= 1, got {repeats}")
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)
