"""The feature probes of Chapter 11: 1-NN against brute-force distances, the linear probe against SciPy's optimizer."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from scipy.optimize import minimize
from scipy.spatial.distance import cdist

from agm import probe


def blobs(n: int, d: int = 5, classes: int = 3, seed: int = 0, spread: float = 1.0):
    g = torch.Generator().manual_seed(seed)
    centres = 3 * torch.randn(classes, d, generator=g)
    y = torch.arange(n) % classes
    return centres[y] + spread * torch.randn(n, d, generator=g), y


@pytest.mark.parametrize("metric", ["euclidean", "cosine"])
def test_nearest_neighbours_match_brute_force_distances(metric):
    train_f, _ = blobs(300, seed=1)
    test_f, _ = blobs(70, seed=2)
    expected = cdist(test_f.numpy(), train_f.numpy(), metric=metric).argmin(1)
    assert np.array_equal(probe.nearest_neighbours(train_f, test_f, metric, chunk=16).numpy(), expected)


def test_nearest_neighbour_accuracy_counts_matching_labels():
    train_f = torch.tensor([[0.0], [10.0], [20.0]])
    train_y = torch.tensor([0, 1, 2])
    test_f = torch.tensor([[1.0], [9.0], [19.0], [12.0]])
    test_y = torch.tensor([0, 1, 1, 1])  # the third is nearest to class 2: 3 of 4 right
    assert probe.nearest_neighbour_accuracy(train_f, train_y, test_f, test_y) == 0.75


def test_linear_probe_reaches_scipys_optimum_of_the_same_objective():
    train_f, train_y = blobs(200, d=4, seed=3, spread=2.5)  # overlapping classes: a finite optimum
    test_f, test_y = blobs(100, d=4, seed=4, spread=2.5)
    decay = 1e-2
    result = probe.linear_probe(train_f, train_y, test_f, test_y, num_classes=3, weight_decay=decay)
    x = (train_f.double() - train_f.double().mean(0)) / train_f.double().std(0)

    def objective(w):
        weights = torch.tensor(w).view(5, 3).requires_grad_(True)
        value = probe.logistic_objective(weights, x, train_y, decay)
        value.backward()
        return value.item(), weights.grad.flatten().numpy()

    reference = minimize(objective, np.zeros(15), jac=True, method="L-BFGS-B", options={"gtol": 1e-10, "ftol": 0})
    assert result["grad_norm"] < 1e-5
    assert result["objective"] == pytest.approx(reference.fun, abs=1e-9)
    # the objective is strictly convex with the decay: scipy's weights give the same test accuracy
    w = torch.tensor(reference.x).view(5, 3)
    x_test = (test_f.double() - train_f.double().mean(0)) / train_f.double().std(0)
    accuracy = ((x_test @ w[:-1] + w[-1]).argmax(1) == test_y).double().mean().item()
    assert result["test_accuracy"] == accuracy


def test_logistic_objective_is_cross_entropy_plus_the_decay_by_hand():
    g = torch.Generator().manual_seed(0)
    x, y, w = torch.randn(6, 2, generator=g), torch.tensor([0, 1, 2, 0, 1, 2]), torch.randn(3, 3, generator=g)
    logits = x @ w[:2] + w[2]
    by_hand = -(logits.log_softmax(1)[torch.arange(6), y]).mean() + 0.5 * 0.1 * (w[:2] ** 2).sum()
    assert probe.logistic_objective(w, x, y, 0.1).item() == pytest.approx(by_hand.item(), rel=1e-6)
    assert F.cross_entropy(logits, y).item() == pytest.approx(probe.logistic_objective(w, x, y, 0.0).item())


def test_linearly_separable_features_are_probed_perfectly():
    train_f, train_y = blobs(150, seed=5, spread=0.1)
    test_f, test_y = blobs(60, seed=5, spread=0.1)
    result = probe.linear_probe(train_f, train_y, test_f, test_y, num_classes=3)
    assert result["train_accuracy"] == 1.0 and result["test_accuracy"] == 1.0
    assert probe.nearest_neighbour_accuracy(train_f, train_y, test_f, test_y) == 1.0


def test_features_are_computed_in_batches_without_gradients():
    layer = torch.nn.Linear(4, 2)
    x = torch.randn(25, 4)
    out = probe.features(layer, x, batch_size=7)
    assert out.shape == (25, 2) and not out.requires_grad
    assert torch.allclose(out, layer(x).detach())


def test_bad_input_is_refused():
    f, y = blobs(10)
    with pytest.raises(ValueError, match="unknown metric"):
        probe.nearest_neighbour_accuracy(f, y, f, y, metric="manhattan")
    with pytest.raises(ValueError, match=r"\(N, d\) with one d"):
        probe.linear_probe(f, y, f[:, :3], y)
    with pytest.raises(ValueError, match="one label per feature row"):
        probe.nearest_neighbour_accuracy(f, y[:-1], f, y)
