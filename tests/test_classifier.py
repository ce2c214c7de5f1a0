import pytest
import torch

from agm import registry
from agm.classifier import ClassifierConfig, MNISTClassifier, accuracy, random_shift
from agm.cli import main
from agm.data import mnist


def test_shipped_classifier_reaches_99_3_percent():
    model, manifest = registry.load_model("classifier")
    x, y = mnist("test")
    acc = accuracy(model, x, y)
    assert acc >= 0.993
    assert manifest.metrics["test_accuracy"] == pytest.approx(acc, abs=1e-4)


def test_shapes_of_logits_and_features():
    model = MNISTClassifier(ClassifierConfig(features=16)).eval()
    x = torch.rand(5, 1, 28, 28)
    assert model(x).shape == (5, 10) and model.features(x).shape == (5, 16)


def test_random_shift_moves_pixels_without_losing_them(generator):
    x = torch.zeros(8, 1, 28, 28)
    x[:, 0, 10:18, 10:18] = torch.rand(8, 8, 8, generator=generator)
    shifted = random_shift(x, 2, generator)
    assert torch.allclose(shifted.sum((1, 2, 3)), x.sum((1, 2, 3)))
    assert not torch.equal(shifted, x)
    assert torch.equal(random_shift(x, 0, generator), x)


def test_classifier_has_nothing_to_sample(tmp_path, capsys):
    spec = registry.get("classifier")
    assert not spec.generative and spec.sample is None
    assert main(["sample", "classifier", "--n", "4", "--out", str(tmp_path / "x.pt")]) == 2
    assert "nothing to sample" in capsys.readouterr().err


def test_train_classifier_smoke_stores_the_accuracy_of_its_weights(tmp_path):
    """The manifest's accuracy (smoke: the first 1 000 test images) is that of the weights saved beside it."""
    assert main(["train", "classifier", "--smoke", "--out-dir", str(tmp_path)]) == 0
    model, manifest = registry.load_model("classifier", tmp_path)
    x, y = mnist("test")
    assert manifest.metrics["test_accuracy"] == pytest.approx(accuracy(model, x[:1000], y[:1000]), abs=1e-9)
