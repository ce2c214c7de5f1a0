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
    """Honour AGM_THREADS in tests as the command line does (default: every core, shared among xdist workers).

    The share is written to AGM_THREADS, which ``python -m agm train`` and ``evaluate`` read: else each call of
    ``main`` in a test would give its worker every core, and two workers on two cores would run four threads."""
    workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
    os.environ.setdefault("AGM_THREADS", str(max(1, (os.cpu_count() or 1) // workers)))
    set_threads()


@pytest.fixture(autouse=True)
def _keep_threads():
    """A test that sets torch's thread count itself gives the session's count back."""
    threads = torch.get_num_threads()
    yield
    if torch.get_num_threads() != threads:
        torch.set_num_threads(threads)


@pytest.fixture
def generator():
    return torch.Generator().manual_seed(0)


@pytest.fixture(scope="module")
def reference():
    """A small untrained policy of the fine-tunes' shape (16-symbol tokens, 196 per image): the reference of the
    tests of Chapters 50–55."""
    from agm.autoregressive.ar_transformer import ARConfig, ARTransformer

    torch.manual_seed(0)
    return ARTransformer(ARConfig(width=16, layers=1, heads=2)).eval()


@pytest.fixture(scope="module")
def classifier():
    """A small untrained MNIST classifier, the shape of the kit's: the reward of the tests of Chapters 50–55."""
    from agm.classifier import ClassifierConfig, MNISTClassifier

    torch.manual_seed(0)
    return MNISTClassifier(ClassifierConfig(width=4, features=8)).eval()

