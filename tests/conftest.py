import os

import pytest
import torch

from agm.data import IDX_FILES, raw_dir
from agm.runtime import set_threads


@pytest.fixture(scope="session", autouse=True)
def _mnist_present():
    missing = [n for n in IDX_FILES if not (raw_dir() / n).is_file()]
    if missing:
        pytest.exit(f"MNIST is missing from {raw_dir()}: run `make data` (python -m agm data) first", returncode=1)


@pytest.fixture(scope="session", autouse=True)
def _threads():
    """Honour AGM_THREADS in tests as the command line does (default: every core, shared among xdist workers)."""
    workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
    set_threads(None if "AGM_THREADS" in os.environ else max(1, (os.cpu_count() or 1) // workers))


@pytest.fixture
def generator():
    return torch.Generator().manual_seed(0)
