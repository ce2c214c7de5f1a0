"""The KL-regularized optimum pi* ∝ pi_ref exp(R / beta) and its importance-sampling estimates (Chapter 51): against
enumeration of a small distribution, against the exact estimates of the empirical distribution, and properties."""

import math

import pytest
import torch

from agm.rl.tilted import regularized_objective, tilt, tilted_estimates

N = 12  # outcomes of the enumerable reference


@pytest.fixture
def example():
    g = torch.Generator().manual_seed(0)
    log_ref = torch.randn(N, generator=g, dtype=torch.float64).mul(1.5).log_softmax(0)
    rewards = torch.randn(N, generator=g, dtype=torch.float64).mul(2.0) - 3.0
    feature = (torch.rand(N, generator=g, dtype=torch.float64) < 0.4).double()  # an indicator, as "reads a seven"
    return log_ref, rewards, feature


def kl(log_p: torch.Tensor, log_q: torch.Tensor) -> float:
    return (log_p.exp() * (log_p - log_q)).sum().item()


@pytest.mark.parametrize("beta", [0.2, 1.0, 4.0])
def test_estimates_on_every_outcome_weighted_by_pi_ref_are_the_exact_tilted_quantities(example, beta):
    """Catches a wrong tilt (R instead of R / beta), weights not normalized, or a wrong KL or ESS formula."""
    log_ref, rewards, feature = example
    log_star = (log_ref + rewards / beta) - torch.logsumexp(log_ref + rewards / beta, 0)  # written out here
    star = log_star.exp()
    est = tilted_estimates(rewards, beta, log_base=log_ref, statistics={"feature": feature})
    assert est["log_partition"] == pytest.approx(torch.logsumexp(log_ref + rewards / beta, 0).item(), abs=1e-12)
    assert est["objective"] == pytest.approx(beta * est["log_partition"], abs=1e-12)
    assert est["reward"] == pytest.approx((star * rewards).sum().item(), abs=1e-12)
    assert est["kl"] == pytest.approx(kl(log_star, log_ref), abs=1e-12)
    assert est["feature"] == pytest.approx((star * feature).sum().item(), abs=1e-12)
    # E_ref[w]^2 / E_ref[w^2] with w = pi* / pi_ref, summed directly
    ratio = star / log_ref.exp()
    assert est["ess_fraction"] == pytest.approx(1 / (log_ref.exp() * ratio**2).sum().item(), abs=1e-12)
    assert torch.allclose(tilt(log_ref, rewards, beta), log_star, atol=1e-12)


@pytest.mark.parametrize("beta", [0.2, 1.0, 4.0])
def test_the_objective_is_beta_log_z_minus_beta_kl_to_the_optimum(example, beta):
    """J(pi) = beta log Z - beta KL(pi || pi*) for any pi (the Gibbs variational principle), so pi* is the maximum
    and reaches beta log Z. Catches a sign or a factor beta wrong in the objective or in the tilt."""
    log_ref, rewards, _ = example
    log_star = tilt(log_ref, rewards, beta)
    log_z = torch.logsumexp(log_ref + rewards / beta, 0).item()
    assert regularized_objective(log_star, log_ref, rewards, beta).item() == pytest.approx(beta * log_z, abs=1e-12)
    g = torch.Generator().manual_seed(1)
    for _ in range(20):
        log_pi = torch.randn(N, generator=g, dtype=torch.float64).mul(2).log_softmax(0)
        value = regularized_objective(log_pi, log_ref, rewards, beta).item()
        assert value == pytest.approx(beta * log_z - beta * kl(log_pi, log_star), abs=1e-10)
        assert value < beta * log_z


def test_samples_are_the_empirical_distribution_enumerated(example):
    """N samples of pi_ref give exactly the estimates of their empirical distribution (each distinct outcome with
    its count as weight): catches a sample path that weighs the draws other than 1/N."""
    log_ref, rewards, feature = example
    draws = torch.multinomial(log_ref.exp(), 500, replacement=True, generator=torch.Generator().manual_seed(2))
    counts = torch.bincount(draws, minlength=N).double()
    seen = counts > 0
    from_samples = tilted_estimates(rewards[draws], 0.5, statistics={"feature": feature[draws]})
    enumerated = tilted_estimates(rewards[seen], 0.5, log_base=counts[seen].log(),
                                  statistics={"feature": feature[seen]})
    for key in ("log_partition", "reward", "kl", "feature", "ess_fraction"):
        assert from_samples[key] == pytest.approx(enumerated[key], abs=1e-12), key
    assert from_samples["ess"] == pytest.approx(500 * from_samples["ess_fraction"], rel=1e-12)


def test_many_samples_approach_the_exact_values(example):
    """Self-normalized importance sampling is consistent: 200 000 draws of pi_ref land near the enumerated pi*."""
    log_ref, rewards, feature = example
    exact = tilted_estimates(rewards, 1.0, log_base=log_ref, statistics={"feature": feature})
    draws = torch.multinomial(log_ref.exp(), 200_000, replacement=True, generator=torch.Generator().manual_seed(3))
    est = tilted_estimates(rewards[draws], 1.0, statistics={"feature": feature[draws]})
    for key in ("log_partition", "reward", "kl", "feature", "ess_fraction"):
        assert est[key] == pytest.approx(exact[key], abs=0.02), key


def test_kl_estimate_is_capped_by_the_effective_sample_size():
    """The sample estimate is the KL of the reweighted draws to uniform ones: 0 <= KL <= log(N / ESS) <= log N,
    however large the true KL is. Catches a KL or ESS estimate that forgets the self-normalization."""
    g = torch.Generator().manual_seed(4)
    n = 64
    for beta in (0.01, 0.1, 1.0, 10.0):
        est = tilted_estimates(torch.randn(n, generator=g) * 3, beta)
        assert 0 <= est["kl"] <= math.log(n / est["ess"]) + 1e-12 <= math.log(n) + 1e-12
        assert 1 - 1e-9 <= est["ess"] <= n + 1e-9


def test_a_smaller_beta_moves_further_and_scores_higher(example):
    """d E_pi*[R] / d(1/beta) = Var_pi*(R) >= 0 and d KL / d(1/beta) = Var_pi*(R) / beta >= 0: the reward and the
    KL of pi* both grow as beta falls, exactly and on samples. Catches a tilt by exp(-R / beta) or by exp(R beta)."""
    log_ref, rewards, _ = example
    draws = torch.multinomial(log_ref.exp(), 300, replacement=True, generator=torch.Generator().manual_seed(5))
    betas = [10.0, 3.0, 1.0, 0.3, 0.1]
    for base, r in ((log_ref, rewards), (None, rewards[draws])):
        runs = [tilted_estimates(r, b, log_base=base) for b in betas]
        assert all(a["reward"] < b["reward"] and a["kl"] < b["kl"] for a, b in zip(runs, runs[1:], strict=False))
        assert runs[-1]["reward"] == pytest.approx(r.max().item(), abs=0.05)  # nearly all weight on the best


def test_constant_rewards_leave_the_reference_and_shifts_cancel(example):
    """R constant: pi* = pi_ref, KL 0, ESS N. R + c: log Z moves by c / beta, nothing else does; a constant added to
    the log-weights of the base changes nothing."""
    log_ref, rewards, feature = example
    flat = tilted_estimates(torch.full((N,), -2.0, dtype=torch.float64), 0.5)
    assert flat["kl"] == pytest.approx(0, abs=1e-12) and flat["ess"] == pytest.approx(N)
    assert flat["log_partition"] == pytest.approx(-4.0)
    a = tilted_estimates(rewards, 0.5, log_base=log_ref, statistics={"feature": feature})
    b = tilted_estimates(rewards + 3.0, 0.5, log_base=log_ref + 7.0, statistics={"feature": feature})
    assert b["log_partition"] == pytest.approx(a["log_partition"] + 6.0, abs=1e-12)
    for key in ("kl", "feature", "ess_fraction"):
        assert b[key] == pytest.approx(a[key], abs=1e-12)


def test_tiny_beta_does_not_overflow():
    """Weights exp(R / beta) of 10^400 are handled in log space: the estimate puts its weight on the best draw."""
    est = tilted_estimates(torch.tensor([-0.1, -5.0, -0.2]), 1e-4)
    assert all(math.isfinite(v) for v in est.values())
    assert est["reward"] == pytest.approx(-0.1) and est["ess"] == pytest.approx(1.0)


@pytest.mark.parametrize("kwargs, message", [
    ({"beta": 0.0}, "beta must be"),
    ({"beta": -1.0}, "beta must be"),
    ({"beta": math.inf}, "beta must be"),
    ({"beta": math.nan}, "beta must be"),
    ({"rewards": torch.zeros(2, 3)}, r"rewards must have shape \(N,\)"),
    ({"rewards": torch.zeros(0)}, r"rewards must have shape \(N,\)"),
    ({"rewards": torch.tensor([0.0, math.nan])}, "rewards must be finite"),
    ({"rewards": torch.tensor([0.0, -math.inf])}, "rewards must be finite"),
    ({"log_base": torch.zeros(3)}, r"log_base must have shape \(N,\) = \[2\]"),
    ({"statistics": {"share": torch.zeros(3)}}, r"statistic 'share' must have shape"),
    ({"statistics": {"kl": torch.zeros(2)}}, "may not be called 'kl'"),
])
def test_bad_input_is_refused(kwargs, message):
    args = {"rewards": torch.tensor([-1.0, -2.0]), "beta": 1.0} | kwargs
    with pytest.raises(ValueError, match=message):
        tilted_estimates(**args)


def test_tilt_and_objective_refuse_mismatched_shapes():
    with pytest.raises(ValueError, match=r"rewards must have shape \(N,\) = \[3\]"):
        tilt(torch.zeros(3), torch.zeros(4), 1.0)
    with pytest.raises(ValueError, match=r"log_ref must have shape \(N,\) = \[3\]"):
        regularized_objective(torch.zeros(3), torch.zeros(2), torch.zeros(3), 1.0)
    with pytest.raises(ValueError, match="beta must be"):
        tilt(torch.zeros(3), torch.zeros(3), 0.0)
