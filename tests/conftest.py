import pytest
import torch

from agm.data import IDX_FILES, raw_dir


@pytest.fixture(scope="session", autouse=True)
def _mnist_present():
    missing = [n for n in IDX_FILES if not (raw_dir() / n).is_file()]
    if missing:
        pytest.exit(f"MNIST is missing from {raw_dir()}: run `make data` (python -m agm data) first", returncode=1)


@pytest.fixture
def generator():
    return torch.Generator().manual_seed(0)
