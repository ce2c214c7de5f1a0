"""The metrics kit against closed forms and independent computations."""

import math

import numpy as np
import pytest
import scipy.linalg
import torch

from agm import metrics
from agm.data import mnist


def random_spd(d, rng, rank=None):
    a = rng.normal(size=(d, rank or d))
    return a @ a.T / d


def test_frechet_identical_distributions_is_zero():
    rng = np.random.default_rng(0)
    mu, sigma = rng.normal(size=5), random_spd(5, rng)
    assert metrics.frechet_distance(mu, sigma, mu, sigma) == pytest.approx(0, abs=1e-9)


def test_frechet_equal_covariances_is_squared_mean_distance():
    rng = np.random.default_rng(1)
    mu1, mu2, sigma = rng.normal(size=6), rng.normal(size=6), random_spd(6, rng)
    assert metrics.frechet_distance(mu1, sigma, mu2, sigma) == pytest.approx(((mu1 - mu2) ** 2).sum(), rel=1e-8)


def test_frechet_isotropic_covariances():
    d, a, b = 7, 0.5, 2.0
    zero = np.zeros(d)
    value = metrics.frechet_distance(zero, a**2 * np.eye(d), zero, b**2 * np.eye(d))
    assert value == pytest.approx(d * (a - b) ** 2, rel=1e-10)


@pytest.mark.parametrize("seed", range(3))
def test_frechet_matches_scipy_sqrtm(seed):
    rng = np.random.default_rng(seed)
    mu1, mu2 = rng.normal(size=8), rng.normal(size=8)
    s1, s2 = random_spd(8, rng), random_spd(8, rng)
    covmean = scipy.linalg.sqrtm(s1 @ s2).real
    ref = ((mu1 - mu2) ** 2).sum() + np.trace(s1 + s2 - 2 * covmean)
    assert metrics.frechet_distance(mu1, s1, mu2, s2) == pytest.approx(ref, rel=1e-7)


def test_frechet_handles_singular_covariances():
    rng = np.random.default_rng(3)
    s1, s2 = random_spd(6, rng, rank=2), random_spd(6, rng, rank=3)
    value = metrics.frechet_distance(np.zeros(6), s1, np.ones(6), s2)
    assert np.isfinite(value) and value >= 0
    # a rank-0 covariance: the distance to N(0, S) is tr(S) plus the mean term
    assert metrics.frechet_distance(np.zeros(6), np.zeros((6, 6)), np.ones(6), s2) == pytest.approx(
        6 + np.trace(s2), rel=1e-9)


def test_frechet_rejects_mismatched_shapes():
    with pytest.raises(ValueError):
        metrics.frechet_distance(np.zeros(3), np.eye(3), np.zeros(4), np.eye(4))


def test_inception_score_limits():
    k = 10
    constant = torch.zeros(100, k)
    constant[:, 3] = 1
    assert metrics.inception_score(constant) == pytest.approx(1.0)
    spread = torch.eye(k).repeat(10, 1)
    assert metrics.inception_score(spread) == pytest.approx(k)
    uniform = torch.full((50, k), 1 / k)
    assert metrics.inception_score(uniform) == pytest.approx(1.0)
    with pytest.raises(ValueError):
        metrics.inception_score(torch.rand(5, k))


def test_class_coverage_and_tv():
    probs = torch.eye(10).repeat(10, 1)
    assert metrics.class_coverage(probs) == pytest.approx((1.0, 0.0))
    half = torch.eye(10)[torch.arange(100) % 5]  # only classes 0..4
    coverage, tv = metrics.class_coverage(half)
    assert coverage == pytest.approx(0.5) and tv == pytest.approx(0.5)


def test_precision_recall_on_point_clouds():
    g = torch.Generator().manual_seed(0)
    real = torch.randn(500, 4, generator=g)
    assert metrics.precision_recall(real, real) == (1.0, 1.0)
    far = real + 100
    assert metrics.precision_recall(real, far) == (0.0, 0.0)
    half = real[real[:, 0] > 0]  # a model covering half the data: precise, half the recall
    p, r = metrics.precision_recall(real, half)
    assert p == 1.0 and 0.3 < r < 0.7
    with pytest.raises(ValueError):
        metrics.precision_recall(real, torch.randn(3, 4))


def test_cached_reference_radii_give_the_same_precision_and_recall(test_images):
    """The kit passes the reference set's cached k-NN radii; they must be the ones it would compute."""
    ref = metrics.reference_stats()
    feats, _ = metrics.classifier_outputs(test_images[0][:300])
    cached = metrics.precision_recall(ref["features"], feats, metrics.PR_K, ref[metrics.REFERENCE_RADII])
    assert cached == metrics.precision_recall(ref["features"], feats, metrics.PR_K)
    assert ref[metrics.REFERENCE_RADII].shape == (len(ref["features"]),)


def test_gaussian_stats_need_more_samples_than_dimensions():
    with pytest.raises(ValueError, match="more samples than feature dimensions"):
        metrics.gaussian_stats(torch.randn(10, 128))


def test_nll_helpers():
    assert metrics.nats_to_bits_per_dim(784 * math.log(2)) == pytest.approx(1.0)
    report = metrics.nll_report(torch.tensor([-1.0, -3.0]))
    assert report["test_nll_nats"] == pytest.approx(2.0)
    with pytest.raises(ValueError, match="inf or NaN"):
        metrics.nll_report(torch.tensor([-1.0, -float("inf")]))


# --- on the shipped classifier ------------------------------------------------------------------

@pytest.fixture(scope="module")
def test_images():
    x, y = mnist("test")
    return x, y


def test_real_data_scores_well(test_images):
    x, _ = test_images
    m = metrics.sample_metrics(x[:2000])
    assert m["inception_score"] > 9.5 and m["class_coverage"] == 1.0 and m["class_tv"] < 0.05
    assert m["precision"] == 1.0  # every test image lies in its own k-NN ball of the reference set
    assert m["recall"] > 0.8 and m["n_samples"] == 2000
    blurred = metrics.sample_metrics(torch.nn.functional.avg_pool2d(x[:2000], 3, 1, 1))
    assert blurred["fid"] > 2 * m["fid"]


def test_precision_and_recall_fall_as_classes_are_dropped(test_images):
    x, y = test_images
    ref = metrics.reference_stats()["features"]
    recalls = []
    for kept in (10, 6, 2):
        feats, _ = metrics.classifier_outputs(x[y < kept][:1500])
        p, r = metrics.precision_recall(ref, feats)
        assert p > 0.9
        recalls.append(r)
    assert recalls[0] > recalls[1] > recalls[2]


def test_fid_grows_with_noise(test_images):
    x, _ = test_images
    g = torch.Generator().manual_seed(0)
    fids = [metrics.sample_metrics((x[:1000] + s * torch.randn(x[:1000].shape, generator=g)).clamp(0, 1))["fid"]
            for s in (0.0, 0.2, 0.5)]
    assert fids[0] < fids[1] < fids[2]


def test_shrinkage_floor_bounds_the_covariance_term_and_is_reached_by_scaling():
    rng = np.random.default_rng(3)
    sigma_r, mu = random_spd(8, rng), rng.normal(size=8)
    for c in (0.2, 1.0, 3.0):  # equality for Sigma_g = c Sigma_r
        assert metrics.frechet_distance(mu, c * sigma_r, mu, sigma_r) == pytest.approx(
            metrics.shrinkage_floor(c, np.trace(sigma_r)), rel=1e-8, abs=1e-12)
    for _ in range(50):  # a strict bound for any other covariance, including singular ones
        sigma_g = random_spd(8, rng, rank=int(rng.integers(1, 9)))
        c = np.trace(sigma_g) / np.trace(sigma_r)
        floor = metrics.shrinkage_floor(c, np.trace(sigma_r))
        assert metrics.frechet_distance(mu, sigma_g, mu, sigma_r) >= floor - 1e-9
    with pytest.raises(ValueError, match="non-negative"):
        metrics.shrinkage_floor(-0.1, 1.0)


def test_fid_splits_into_mean_and_covariance_terms(test_images):
    # one class only: far from the reference mean, and narrower than the whole test set
    x, y = test_images
    sevens = x[y == 7][:1000]
    m = metrics.sample_metrics(sevens)
    feats, _ = metrics.classifier_outputs(sevens)
    mu, sigma = metrics.gaussian_stats(feats)
    ref = metrics.reference_stats()
    mu_ref, sigma_ref = ref["mu"].numpy(), ref["sigma"].numpy()
    assert m["fid_mean_term"] == pytest.approx(metrics.frechet_distance(mu, sigma_ref, mu_ref, sigma_ref), rel=1e-6)
    covariance_term = metrics.frechet_distance(mu_ref, sigma, mu_ref, sigma_ref)
    assert m["fid"] == pytest.approx(m["fid_mean_term"] + covariance_term, rel=1e-6)
    assert m["trace_ratio"] == pytest.approx(np.trace(sigma) / np.trace(sigma_ref), rel=1e-9)
    assert m["trace_ratio"] < 0.9 < metrics.sample_metrics(x[:1000])["trace_ratio"]


@pytest.mark.parametrize("bad", [torch.zeros(10, 784), torch.full((200, 1, 28, 28), 1.5)])
def test_sample_metrics_rejects_bad_images(bad):
    with pytest.raises(ValueError):
        metrics.sample_metrics(bad)


def test_sample_metrics_rejects_too_few_samples(test_images):
    with pytest.raises(ValueError, match="more samples than feature dimensions"):
        metrics.sample_metrics(test_images[0][:50])


def test_reference_stats_are_cached_by_classifier_hash(test_images):
    from agm.runtime import data_root

    stats = metrics.reference_stats()
    _, sha = metrics.classifier()
    assert (data_root() / "cache" / f"metrics-reference-{sha[:16]}.pt").is_file()
    assert torch.equal(metrics.reference_stats()["mu"], stats["mu"])


@pytest.mark.parametrize("damage", ["truncated", "wrong shapes"])
def test_a_damaged_reference_cache_is_rebuilt_with_the_same_numbers(damage, tmp_path, monkeypatch):
    from agm.runtime import data_root

    good = metrics.reference_stats()
    _, sha = metrics.classifier()
    cached = data_root() / "cache" / f"metrics-reference-{sha[:16]}.pt"
    (tmp_path / "MNIST").symlink_to(data_root() / "MNIST")
    monkeypatch.setenv("AGM_DATA", str(tmp_path))
    path = tmp_path / "cache" / cached.name
    path.parent.mkdir()
    if damage == "truncated":
        path.write_bytes(cached.read_bytes()[:1000])
    else:
        torch.save({k: v[:5] for k, v in good.items()}, path)
    rebuilt = metrics.reference_stats()
    assert torch.equal(rebuilt["mu"], good["mu"]) and torch.equal(rebuilt["sigma"], good["sigma"])
    assert torch.equal(rebuilt[metrics.REFERENCE_RADII], good[metrics.REFERENCE_RADII])
    assert metrics._cached_stats(path) is not None and not list(path.parent.glob("*.part"))


def test_fid_bias_fit_recovers_an_exact_first_order_model_and_refuses_one_sample_size():
    from agm.metrics import fid_bias_fit

    limit, k = 3.0, 12_000.0
    fid = lambda n: limit + k / n  # noqa: E731
    fit = fid_bias_fit(1_000, fid(1_000), 10_000, fid(10_000))
    assert fit["k"] == pytest.approx(k) and fit["limit"] == pytest.approx(limit)
    assert fit["share_a"] == pytest.approx(12 / 15) and fit["share_b"] == pytest.approx(1.2 / 4.2)
    with pytest.raises(ValueError, match="two different sample sizes"):
        fid_bias_fit(1_000, 5.0, 1_000, 4.0)
