"""How good are a model's features for recognizing digits? Two standard measurements, Chapter 11.

- :func:`nearest_neighbour_accuracy`: each test image takes the label of its nearest training image in
  feature space (Euclidean or cosine), the 1-NN accuracy that Donahue et al. (2017) report for BiGAN;
- :func:`linear_probe`: multinomial logistic regression on the standardized features, trained on the
  training images to its optimum (convex: full-batch L-BFGS in double precision), scored on the test set.

Both read features, (N, d); :func:`features` computes them in batches with gradients off.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

METRICS = ("euclidean", "cosine")


def features(fn: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, batch_size: int = 1000) -> torch.Tensor:
    """fn(x) for x in batches of ``batch_size``, flattened to (N, d), on the CPU."""
    with torch.no_grad():
        return torch.cat([fn(x[i:i + batch_size]).flatten(1).cpu() for i in range(0, len(x), batch_size)])


def _check(train_f: torch.Tensor, train_y: torch.Tensor, test_f: torch.Tensor, test_y: torch.Tensor) -> None:
    if train_f.ndim != 2 or test_f.ndim != 2 or train_f.shape[1] != test_f.shape[1]:
        raise ValueError(f"features must be (N, d) with one d, got {list(train_f.shape)} and {list(test_f.shape)}")
    if len(train_y) != len(train_f) or len(test_y) != len(test_f):
        raise ValueError(f"one label per feature row: {len(train_f)} rows and {len(train_y)} labels (training), "
                         f"{len(test_f)} and {len(test_y)} (test)")


def nearest_neighbours(train_f: torch.Tensor, test_f: torch.Tensor, metric: str = "euclidean",
                       chunk: int = 1000) -> torch.Tensor:
    """For each test row, the index of its nearest training row, (N_test,); ties go to the lower index."""
    if metric not in METRICS:
        raise ValueError(f"unknown metric {metric!r}; choose one of {', '.join(METRICS)}")
    a, b = train_f.double(), test_f.double()
    if metric == "cosine":
        a, b = F.normalize(a, dim=1), F.normalize(b, dim=1)  # cosine distance 1 - <a, b> on unit vectors
    out = []
    for i in range(0, len(b), chunk):
        # $\|b - a\|^2 = \|b\|^2 - 2\langle b, a\rangle + \|a\|^2$; \|b\|^2 is the same for every a and drops out
        scores = (a * a).sum(1) - 2 * b[i:i + chunk] @ a.T  # (chunk, N_train)
        out.append(scores.argmin(1))
    return torch.cat(out)


def nearest_neighbour_accuracy(train_f: torch.Tensor, train_y: torch.Tensor, test_f: torch.Tensor,
                               test_y: torch.Tensor, metric: str = "euclidean") -> float:
    """The share of test rows whose nearest training row (1-NN) has their label."""
    _check(train_f, train_y, test_f, test_y)
    return (train_y[nearest_neighbours(train_f, test_f, metric)] == test_y).double().mean().item()


def logistic_objective(weights: torch.Tensor, x: torch.Tensor, y: torch.Tensor, weight_decay: float) -> torch.Tensor:
    """Mean cross-entropy of softmax(x W + b) plus (weight_decay / 2) ||W||^2; ``weights`` is [W; b], (d + 1, K)."""
    logits = x @ weights[:-1] + weights[-1]
    return F.cross_entropy(logits, y) + 0.5 * weight_decay * weights[:-1].pow(2).sum()


def linear_probe(train_f: torch.Tensor, train_y: torch.Tensor, test_f: torch.Tensor, test_y: torch.Tensor,
                 num_classes: int = 10, weight_decay: float = 1e-4, max_iter: int = 500) -> dict[str, float]:
    """Multinomial logistic regression on the training features, standardized with their own mean and
    standard deviation, fitted by L-BFGS to a gradient norm below 1e-6 (or ``max_iter`` iterations).
    Returns the training and test accuracy, the objective and its final gradient norm."""
    _check(train_f, train_y, test_f, test_y)
    mean, std = train_f.double().mean(0), train_f.double().std(0).clamp_min(1e-12)
    x_train, x_test = (train_f.double() - mean) / std, (test_f.double() - mean) / std
    weights = torch.zeros(x_train.shape[1] + 1, num_classes, dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS([weights], lr=1, max_iter=max_iter, tolerance_grad=1e-6, tolerance_change=0,
                            history_size=20, line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        opt.zero_grad()
        loss = logistic_objective(weights, x_train, train_y, weight_decay)
        loss.backward()
        return loss

    opt.step(closure)
    objective = closure()  # and its gradient at the solution
    with torch.no_grad():
        accuracy = {name: ((x @ weights[:-1] + weights[-1]).argmax(1) == y).double().mean().item()
                    for name, x, y in (("train", x_train, train_y), ("test", x_test, test_y))}
    return {"train_accuracy": accuracy["train"], "test_accuracy": accuracy["test"],
            "objective": objective.item(), "grad_norm": weights.grad.norm().item()}
