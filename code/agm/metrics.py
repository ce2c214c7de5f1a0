"""The metrics kit shared by every chapter. Likelihoods first.

Conventions. A model of binarized images reports its negative log-likelihood in **nats per
image**, ``-E[log p(x)]`` with natural logarithms. A model of 8-bit images reports **bits per
dimension** of the discrete data, ``-E[log2 P(k)] / D``; when it is a density p on [0, 1]^D fitted
to uniformly dequantized data ``y = (k + u) / 256``, ``-E[log2 p(y)] / D + 8`` bounds it from above.
Nats per image convert to bits/dim as ``nats / (D ln 2)``, D = 784 for MNIST.
"""

from __future__ import annotations

import math
import os
import pickle
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch

from agm.data import binarized_test_set, check_images, mnist
from agm.runtime import checkpoint_dir, data_root, device

PIXELS = 28 * 28


def binarized_test_nll(model) -> dict[str, float]:
    """NLL report of a model with ``log_prob`` on the test set binarized once with a fixed seed."""
    x, _ = binarized_test_set()
    with torch.no_grad():
        return nll_report(model.log_prob(x))


def nats_to_bits_per_dim(nats_per_image: float, dims: int = PIXELS) -> float:
    """``nats / (D ln 2)``: the same quantity in bits, averaged over the D dimensions."""
    return nats_per_image / (dims * math.log(2))


def nll_report(log_probs: torch.Tensor, prefix: str = "test") -> dict[str, float]:
    """Mean NLL (nats per image), its standard error, and the same in bits/dim."""
    if log_probs.ndim != 1 or len(log_probs) < 2:
        raise ValueError(f"log_probs must be a 1-D tensor of at least two values, got {list(log_probs.shape)}")
    if not torch.isfinite(log_probs).all():
        raise ValueError("log_probs contains inf or NaN: the model gives zero probability to some image")
    nll = -log_probs.double()
    mean = nll.mean().item()
    return {
        f"{prefix}_nll_nats": mean,
        f"{prefix}_nll_nats_se": (nll.std() / math.sqrt(len(nll))).item(),
        f"{prefix}_bits_per_dim": nats_to_bits_per_dim(mean),
    }


# --- sample quality on the MNIST classifier ----------------------------------------------------
#
# "FID (MNIST classifier)": the Fréchet distance between Gaussians fitted to the classifier's
# penultimate features of generated images and of the 10 000 test images; Inception Score on its
# softmax; precision/recall with k-nearest-neighbour manifolds in the same feature space;
# class coverage of the predicted labels. The test set's statistics are computed once per
# classifier checkpoint and cached in data/cache/ (git-ignored), keyed by its sha256.

def _psd_sqrt(a: np.ndarray) -> np.ndarray:
    """Symmetric square root of a positive semi-definite matrix (tiny negative eigenvalues -> 0)."""
    w, v = np.linalg.eigh((a + a.T) / 2)
    return (v * np.sqrt(np.clip(w, 0, None))) @ v.T


def frechet_distance(mu1, sigma1, mu2, sigma2) -> float:
    """Squared 2-Wasserstein distance between N(mu1, sigma1) and N(mu2, sigma2).

    Computed with symmetric eigendecompositions, so singular covariances are fine.
    """
    # $d^2 = \|\mu_1-\mu_2\|^2 + \mathrm{tr}(\Sigma_1 + \Sigma_2 - 2(\Sigma_1^{1/2}\Sigma_2\Sigma_1^{1/2})^{1/2})$
    mu1, mu2 = np.asarray(mu1, np.float64), np.asarray(mu2, np.float64)
    sigma1, sigma2 = np.atleast_2d(np.asarray(sigma1, np.float64)), np.atleast_2d(np.asarray(sigma2, np.float64))
    if mu1.shape != mu2.shape or mu1.ndim != 1 or sigma1.shape != sigma2.shape or sigma1.shape != (len(mu1),) * 2:
        raise ValueError(f"shapes do not match: mu {mu1.shape}, {mu2.shape}; sigma {sigma1.shape}, {sigma2.shape}")
    root1 = _psd_sqrt(sigma1)
    # $\operatorname{tr}(\Sigma_1^{1/2}\Sigma_2\Sigma_1^{1/2})^{1/2} = \sum_i \sqrt{\lambda_i}$
    eig = np.linalg.eigvalsh(root1 @ sigma2 @ root1)
    tr_covmean = np.sqrt(np.clip(eig, 0, None)).sum()
    return float(((mu1 - mu2) ** 2).sum() + np.trace(sigma1) + np.trace(sigma2) - 2 * tr_covmean)


def shrinkage_floor(trace_ratio: float, trace_reference: float) -> float:
    """The least covariance term of the Fréchet distance for a trace ratio c = tr Σ_g / tr Σ_r (Chapter 41):
    (1 - √c)² tr Σ_r, reached by Σ_g = c Σ_r."""
    if not (trace_ratio >= 0 and trace_reference >= 0):
        raise ValueError(f"traces must be non-negative, got ratio {trace_ratio} and reference {trace_reference}")
    # Bures term $\ge (1-\sqrt c)^2\,\mathrm{tr}\,\Sigma_r$, with equality at $\Sigma_g = c\,\Sigma_r$
    return (1 - math.sqrt(trace_ratio)) ** 2 * trace_reference


def fid_bias_fit(n_a: int, fid_a: float, n_b: int, fid_b: float) -> dict[str, float]:
    r"""FID at two sample sizes through the first-order model $\mathrm{FID}_n = \mathrm{FID}_\infty + k/n$.

    Returns ``k``, the extrapolation ``limit`` to infinite n, and the bias share $(k/n)/\mathrm{FID}_n$ at each n
    (``share_a``, ``share_b``): the part of each number that the finite sample contributes (Chong & Forsyth, 2020).
    """
    if n_a == n_b:
        raise ValueError(f"two different sample sizes are needed, got {n_a} twice")
    # $k = (\mathrm{FID}_a - \mathrm{FID}_b) / (1/n_a - 1/n_b)$
    k = (fid_a - fid_b) / (1 / n_a - 1 / n_b)
    return {"k": k, "limit": fid_a - k / n_a, "share_a": k / n_a / fid_a, "share_b": k / n_b / fid_b}


def gaussian_stats(features: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    """Mean and (unbiased) covariance of ``[N, d]`` features, in float64."""
    n, d = features.shape
    if n <= d:
        raise ValueError(f"FID needs more samples than feature dimensions ({d}); got {n}")
    f = features.double().numpy()
    return f.mean(0), np.cov(f, rowvar=False)


def inception_score(probs: torch.Tensor) -> float:
    """$\\exp \\mathbb{E}_x \\mathrm{KL}(p(y|x) \\| p(y))$ with $p(y)$ the average of $p(y|x)$."""
    if probs.ndim != 2 or not torch.allclose(probs.sum(1), torch.ones(len(probs), dtype=probs.dtype), atol=1e-4):
        raise ValueError("probs must be [N, K] with rows summing to one")
    p = probs.double()
    p_y = p.mean(0, keepdim=True)
    kl = (torch.xlogy(p, p) - torch.xlogy(p, p_y)).sum(1)
    return float(kl.mean().exp())


def class_histogram(probs: torch.Tensor) -> torch.Tensor:
    """Fraction of images assigned (argmax) to each class."""
    return torch.bincount(probs.argmax(1), minlength=probs.shape[1]).double() / len(probs)


def class_coverage(probs: torch.Tensor) -> tuple[float, float]:
    """(coverage, tv): the fraction of classes that receive at least half their uniform share
    1/(2K) of the predicted labels, and the total-variation distance of the predicted class
    histogram from uniform, 1/2 sum_c |h_c - 1/K|."""
    h = class_histogram(probs)
    k = len(h)
    return float((h >= 0.5 / k).double().mean()), float(0.5 * (h - 1 / k).abs().sum())


def _kth_neighbour_radii(x: torch.Tensor, k: int, chunk: int = 1024) -> torch.Tensor:
    """Distance from each row of x to its k-th nearest other row."""
    radii = []
    for i in range(0, len(x), chunk):
        d = torch.cdist(x[i : i + chunk], x)  # (chunk, N)
        radii.append(d.kthvalue(k + 1, dim=1).values)  # +1 skips the point itself
    return torch.cat(radii)


def _inside_manifold(query: torch.Tensor, support: torch.Tensor, radii: torch.Tensor, chunk: int = 1024):
    """For each query, whether it lies in some ball B(support_j, radii_j)."""
    inside = []
    for i in range(0, len(query), chunk):
        d = torch.cdist(query[i : i + chunk], support)  # (chunk, M)
        inside.append((d <= radii[None, :]).any(1))
    return torch.cat(inside)


def precision_recall(real: torch.Tensor, fake: torch.Tensor, k: int = 3,
                     real_radii: torch.Tensor | None = None) -> tuple[float, float]:
    """Kynkäänniemi et al. (2019): precision = share of fakes inside the real manifold,
    recall = share of reals inside the fake manifold; a manifold is the union of k-NN balls.

    ``real_radii``: the k-NN radii of ``real``, when already known (the reference set's are cached).
    """
    if real.ndim != 2 or fake.ndim != 2 or real.shape[1] != fake.shape[1]:
        raise ValueError(f"features must be [N, d] with the same d, got {list(real.shape)}, {list(fake.shape)}")
    if min(len(real), len(fake)) <= k:
        raise ValueError(f"precision/recall with k={k} needs more than {k} points in each set")
    real, fake = real.float(), fake.float()
    radii = _kth_neighbour_radii(real, k) if real_radii is None else real_radii
    precision = _inside_manifold(fake, real, radii).double().mean()
    recall = _inside_manifold(real, fake, _kth_neighbour_radii(fake, k)).double().mean()
    return float(precision), float(recall)


@lru_cache(maxsize=2)
def _classifier(directory: str):
    from agm import registry

    model, manifest = registry.load_model("classifier", Path(directory))
    return model.to(device()), manifest.sha256


def classifier():
    """The shipped MNIST classifier (sha256-verified) and its checkpoint's sha256."""
    return _classifier(str(checkpoint_dir()))


@torch.no_grad()
def classifier_outputs(images: torch.Tensor, batch_size: int = 1000) -> tuple[torch.Tensor, torch.Tensor]:
    """Penultimate features ``[N, d]`` and class probabilities ``[N, 10]`` of images in [0, 1]."""
    check_images(images)
    model, _ = classifier()
    dev = next(model.parameters()).device
    feats, probs = [], []
    for i in range(0, len(images), batch_size):
        f = model.features(images[i : i + batch_size].to(dev))
        feats.append(f.cpu())
        probs.append(model.head(f).softmax(1).cpu())
    return torch.cat(feats), torch.cat(probs)


def label_accuracy(images: torch.Tensor, labels: torch.Tensor, num_classes: int = 10) -> tuple[float, torch.Tensor]:
    """How often the classifier reads the requested digit in samples of a conditional model: the share of
    ``images`` whose predicted class (the argmax) equals ``labels``, overall and per requested class
    (``[num_classes]``, NaN for a class never requested)."""
    labels = torch.as_tensor(labels).cpu()
    in_range = labels.dtype == torch.long and bool(((labels >= 0) & (labels < num_classes)).all())
    if labels.shape != (len(images),) or not in_range:
        raise ValueError(f"labels must be [{len(images)}] integers in 0..{num_classes - 1}, got shape "
                         f"{list(labels.shape)} and dtype {labels.dtype}")
    predicted = classifier_outputs(images)[1].argmax(1)  # (N,)
    correct = (predicted == labels).double()  # (N,)
    # per requested class c: $\#\{i : y_i = c,\ \hat y_i = c\} \,/\, \#\{i : y_i = c\}$
    hits = torch.bincount(labels, weights=correct, minlength=num_classes)  # (K,)
    per_class = hits / torch.bincount(labels, minlength=num_classes)  # (K,), 0 / 0 = NaN
    return correct.mean().item(), per_class


PR_K = 3  # the k of the kit's precision and recall
REFERENCE_RADII = f"radii_k{PR_K}"


def _cached_stats(path: Path) -> dict[str, torch.Tensor] | None:
    """The statistics cached at ``path``, or None where the file is missing, unreadable (truncated, overwritten)
    or not of the shapes :func:`reference_stats` writes: the cache is derived data, so it is then rebuilt."""
    if not path.is_file():
        return None
    try:
        stats = torch.load(path, map_location="cpu", weights_only=True)
    except (RuntimeError, EOFError, OSError, ValueError, pickle.UnpicklingError):
        return None
    if not isinstance(stats, dict) or not all(isinstance(stats.get(k), torch.Tensor)
                                              for k in ("features", "probs", "mu", "sigma")):
        return None
    n, d = stats["features"].shape if stats["features"].ndim == 2 else (0, 0)
    shapes_ok = (n > 0 and stats["probs"].shape == (n, 10) and stats["mu"].shape == (d,)
                 and stats["sigma"].shape == (d, d))
    radii = stats.get(REFERENCE_RADII)
    return stats if shapes_ok and (radii is None or radii.shape == (n,)) else None


def reference_stats() -> dict[str, torch.Tensor]:
    """Features, mean, covariance and k-NN radii of the 10 000 test images, cached per classifier sha256.

    A cache that cannot be read is rebuilt; the cache is written whole or not at all, so that processes
    scoring samples at the same time never read a half-written file.
    """
    _, sha = classifier()
    path = data_root() / "cache" / f"metrics-reference-{sha[:16]}.pt"
    stats = _cached_stats(path)
    if stats is not None and REFERENCE_RADII in stats:
        return stats
    if stats is None:
        x, _ = mnist("test")
        feats, probs = classifier_outputs(x)
        mu, sigma = gaussian_stats(feats)
        stats = {"features": feats, "probs": probs, "mu": torch.from_numpy(mu), "sigma": torch.from_numpy(sigma)}
    stats[REFERENCE_RADII] = _kth_neighbour_radii(stats["features"].float(), PR_K)
    path.parent.mkdir(parents=True, exist_ok=True)
    part = path.with_name(f"{path.name}.{os.getpid()}.part")
    torch.save(stats, part)
    os.replace(part, path)
    return stats


def sample_metrics(images: torch.Tensor, k: int = PR_K) -> dict[str, float]:
    """The kit: FID (MNIST classifier) with its mean term, the feature spread, IS, precision, recall and class
    coverage of ``images``."""
    check_images(images)
    ref = reference_stats()
    feats, probs = classifier_outputs(images)
    mu, sigma = gaussian_stats(feats)
    precision, recall = precision_recall(ref["features"], feats, k, ref[REFERENCE_RADII] if k == PR_K else None)
    coverage, tv = class_coverage(probs)
    mu_ref, sigma_ref = ref["mu"].numpy(), ref["sigma"].numpy()
    return {
        "fid": frechet_distance(mu, sigma, mu_ref, sigma_ref),
        # the FID's mean term $\|\mu_g-\mu_r\|^2$ (the rest is the covariance term)
        "fid_mean_term": float(((mu - mu_ref) ** 2).sum()),
        # the spread of the features against the real one, $\mathrm{tr}\,\Sigma_g/\mathrm{tr}\,\Sigma_r$
        "trace_ratio": float(np.trace(sigma) / np.trace(sigma_ref)),
        "inception_score": inception_score(probs),
        "precision": precision,
        "recall": recall,
        "class_coverage": coverage,
        "class_tv": tv,
        "n_samples": len(images),
    }


def real_reference(n: int, seed: int = 0) -> dict[str, float]:
    """The kit on ``n`` random real training images: the real-data reference at that n (not a bound: the
    test images themselves would score better)."""
    x, _ = mnist("trainval")
    idx = torch.randperm(len(x), generator=torch.Generator().manual_seed(seed))[:n]
    return sample_metrics(x[idx])


@lru_cache(maxsize=10)
def _digit_reference(digit: int, classifier_sha256: str) -> dict[str, torch.Tensor]:
    ref = reference_stats()
    _, y = mnist("test")
    feats = ref["features"][y == digit]
    mu, sigma = gaussian_stats(feats)
    return {"features": feats, "mu": torch.from_numpy(mu), "sigma": torch.from_numpy(sigma),
            REFERENCE_RADII: _kth_neighbour_radii(feats.float(), PR_K)}


def digit_reference(digit: int) -> dict[str, torch.Tensor]:
    """Features, mean, covariance and k-NN radii of the test images of one digit (about 1 000 of them)."""
    if digit not in range(10):
        raise ValueError(f"digit must be an integer in 0..9, got {digit!r}")
    return _digit_reference(digit, classifier()[1])


def digit_metrics(images: torch.Tensor, digit: int) -> dict[str, float]:
    """The kit against the test images of one digit, for a generator asked to draw only that digit: the share of
    ``images`` the classifier reads as ``digit``, the FID (MNIST classifier) to that digit's test images, and
    precision and recall against them."""
    check_images(images)
    ref = digit_reference(digit)
    feats, probs = classifier_outputs(images)
    mu, sigma = gaussian_stats(feats)
    precision, recall = precision_recall(ref["features"], feats, PR_K, ref[REFERENCE_RADII])
    return {"target_fraction": float((probs.argmax(1) == digit).double().mean()),
            "digit_fid": frechet_distance(mu, sigma, ref["mu"].numpy(), ref["sigma"].numpy()),
            "digit_precision": precision, "digit_recall": recall, "n_samples": len(images)}
