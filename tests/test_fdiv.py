"""f-divergences against closed forms, exact enumeration and the definition of the conjugate."""

import math

import pytest
import torch

from agm.data import mnist
from agm.foundations import fdiv
from agm.foundations.bernoulli import BernoulliConfig, IndependentBernoulli

NAMES = list(fdiv.DIVERGENCES)


@pytest.fixture(scope="module")
def class_models():
    """Independent-pixel Bernoulli models of the digits 3 and 8 (real MNIST)."""
    x, y = mnist("trainval")
    def fit(c):
        return IndependentBernoulli(BernoulliConfig(alpha=1.0)).fit(x[y == c]).probs.flatten().double()
    return fit(3), fit(8)


@pytest.mark.parametrize("name", NAMES)
def test_generator_is_convex_and_vanishes_at_one(name):
    f = fdiv.get(name).f
    # every generator vanishes at 1, except the GAN objective's, which is shifted by -log 4
    f_at_one = -math.log(4) if name == "gan" else 0.0
    assert f(torch.tensor(1.0, dtype=torch.float64)).item() == pytest.approx(f_at_one, abs=1e-12)
    u = torch.logspace(-3, 3, 2001, dtype=torch.float64)
    values = f(u)
    # convexity on a non-uniform grid: slopes of consecutive chords are non-decreasing
    slopes = values.diff() / u.diff()
    assert (slopes.diff() >= -1e-9).all()


@pytest.mark.parametrize("name", NAMES)
def test_conjugate_is_the_supremum(name):
    d = fdiv.get(name)
    u = torch.logspace(-7, 7, 400_001, dtype=torch.float64)
    lo, hi = d.conjugate_domain
    t = torch.linspace(max(lo + 0.05, -1.9), min(hi, 3.0) - 0.05, 25, dtype=torch.float64)
    sup = (t[:, None] * u[None, :] - d.f(u)[None, :]).max(1).values
    assert torch.allclose(sup, d.conjugate(t), atol=1e-4, rtol=1e-5), (sup, d.conjugate(t))


@pytest.mark.parametrize("name", NAMES)
def test_activation_lands_in_the_conjugate_domain(name):
    d = fdiv.get(name)
    t = d.activation(torch.linspace(-30, 30, 1001, dtype=torch.float64))
    lo, hi = d.conjugate_domain
    assert (t >= lo).all() and (t <= hi).all() and torch.isfinite(d.conjugate(t)).all()


def test_kl_closed_form_matches_monte_carlo_on_mnist_digit_models(class_models, generator):
    p, q = class_models
    x = torch.bernoulli(p.expand(20_000, -1), generator=generator)  # samples of P
    log_ratio = fdiv.bernoulli_log_prob(x, p) - fdiv.bernoulli_log_prob(x, q)
    estimate, se = log_ratio.mean(), log_ratio.std() / math.sqrt(len(x))
    assert abs(estimate - fdiv.bernoulli_kl(p, q)) < 5 * se


@pytest.mark.parametrize("name", NAMES)
def test_monte_carlo_matches_exact_enumeration(class_models, name, generator):
    p, q = (m[14 * 28 + 8 : 14 * 28 + 20] for m in class_models)  # 12 pixels of the middle row
    exact = fdiv.bernoulli_exact(name, p, q)
    x = torch.bernoulli(q.expand(200_000, -1), generator=generator)  # samples of Q
    log_ratio = fdiv.bernoulli_log_prob(x, p) - fdiv.bernoulli_log_prob(x, q)
    values = fdiv.get(name).f(log_ratio.exp())
    assert abs(fdiv.divergence_from_ratios(name, log_ratio) - exact) < 5 * values.std() / math.sqrt(len(x)) + 1e-9


def test_enumeration_agrees_with_the_kl_closed_form(class_models):
    p, q = (m[14 * 28 + 8 : 14 * 28 + 20] for m in class_models)
    assert torch.allclose(fdiv.bernoulli_exact("kl", p, q), fdiv.bernoulli_kl(p, q), rtol=1e-10)


def test_named_divergences_match_their_definitions(class_models):
    p, q = (m[14 * 28 + 8 : 14 * 28 + 18] for m in class_models)
    states = ((torch.arange(2**10)[:, None] >> torch.arange(10)) & 1).double()
    pp, qq = fdiv.bernoulli_log_prob(states, p).exp(), fdiv.bernoulli_log_prob(states, q).exp()
    m = (pp + qq) / 2
    js = 0.5 * (pp * (pp / m).log()).sum() + 0.5 * (qq * (qq / m).log()).sum()
    assert torch.allclose(fdiv.bernoulli_exact("jensen-shannon", p, q), js)
    assert torch.allclose(fdiv.bernoulli_exact("total-variation", p, q), 0.5 * (pp - qq).abs().sum())
    assert torch.allclose(fdiv.bernoulli_exact("gan", p, q), 2 * js - math.log(4))
    assert torch.allclose(fdiv.bernoulli_exact("reverse-kl", p, q), (qq * (qq / pp).log()).sum())
    # products of per-pixel sums: Bhattacharyya coefficient and 1 + chi^2 factorize over pixels
    bc = (torch.sqrt(p * q) + torch.sqrt((1 - p) * (1 - q))).prod()
    assert torch.allclose(fdiv.bernoulli_exact("squared-hellinger", p, q), 2 - 2 * bc)
    chi2 = (p**2 / q + (1 - p) ** 2 / (1 - q)).prod() - 1
    assert torch.allclose(fdiv.bernoulli_exact("pearson-chi2", p, q), chi2)


@pytest.mark.parametrize("name", NAMES)
def test_divergences_are_non_negative_and_zero_on_equal_models(class_models, name):
    p, q = (m[14 * 28 + 8 : 14 * 28 + 18] for m in class_models)
    gan_offset = -math.log(4) if name == "gan" else 0.0
    assert fdiv.bernoulli_exact(name, p, q) >= gan_offset
    assert fdiv.bernoulli_exact(name, p, p) == pytest.approx(gan_offset, abs=1e-12)


def test_fenchel_bound_is_tight_at_the_optimal_critic(class_models):
    """With T* = f'(p/q) the bound equals the divergence (KL: T* = 1 + log r; chi2: T* = 2(r - 1))."""
    p, q = (m[14 * 28 + 8 : 14 * 28 + 18] for m in class_models)
    states = ((torch.arange(2**10)[:, None] >> torch.arange(10)) & 1).double()
    pp, qq = fdiv.bernoulli_log_prob(states, p).exp(), fdiv.bernoulli_log_prob(states, q).exp()
    r = pp / qq
    for name, t_star in [("kl", 1 + r.log()), ("pearson-chi2", 2 * (r - 1))]:
        d = fdiv.get(name)
        bound = (pp * t_star).sum() - (qq * d.conjugate(t_star)).sum()
        assert torch.allclose(bound, fdiv.bernoulli_exact(name, p, q))
        worse = (pp * 0.5 * t_star).sum() - (qq * d.conjugate(0.5 * t_star)).sum()
        assert worse < bound


def test_fenchel_bound_estimator_and_bad_names():
    v = torch.zeros(10)
    assert fdiv.fenchel_bound("kl", v, v) == pytest.approx(-math.exp(-1))
    with pytest.raises(ValueError, match="unknown f-divergence"):
        fdiv.get("wasserstein")
    with pytest.raises(ValueError, match="at most 20 pixels"):
        fdiv.bernoulli_exact("kl", torch.full((30,), 0.5), torch.full((30,), 0.5))


def test_trained_critic_approaches_the_divergence_from_below(class_models, generator):
    p, q = (m[14 * 28 + 10 : 14 * 28 + 16].float() for m in class_models)
    def draw(probs):
        return (lambda n: torch.bernoulli(probs.expand(n, -1), generator=generator))
    torch.manual_seed(0)
    for name in ("kl", "jensen-shannon"):
        exact = fdiv.bernoulli_exact(name, p.double(), q.double()).item()
        _, history = fdiv.fit_critic(name, draw(p), draw(q), dim=6, steps=600, eval_every=100)
        final = history[-1][1]
        assert 0.8 * exact < final < exact * 1.05 + 0.01, (name, final, exact)
        assert history[0][1] < final


@pytest.mark.parametrize("name", list(fdiv.DIVERGENCES))
def test_exact_divergence_follows_the_conventions_where_q_vanishes(name):
    d = fdiv.get(name)
    # the slope f'(inf) = lim f(u)/u, approached numerically where it is finite
    u = torch.tensor(1e12, dtype=torch.float64)
    if math.isfinite(d.slope_at_infinity):
        assert (d.f(u) / u).item() == pytest.approx(d.slope_at_infinity, abs=1e-9 + 1e-3 * abs(d.slope_at_infinity))
    else:
        assert (d.f(u) / u).item() > 20  # grows without bound (log u at u = 1e12 is about 27.6)
    p = torch.tensor([0.5, 0.3, 0.2, 0.0], dtype=torch.float64)
    q = torch.tensor([0.6, 0.4, 0.0, 0.0], dtype=torch.float64)  # q = 0 < p at index 2; both zero at index 3
    value = fdiv.divergence_exact(name, p, q)
    expected = (q[:2] * d.f(p[:2] / q[:2])).sum() + 0.2 * d.slope_at_infinity
    assert not torch.isnan(value)
    assert value.item() == expected.item() or value.item() == pytest.approx(expected.item())  # inf == inf for KL
    # the limit of q_eps -> q from inside: mass eps moved onto index 2
    eps = 1e-9
    q_eps = torch.tensor([0.6 - eps, 0.4, eps, 0.0], dtype=torch.float64)
    near = fdiv.divergence_exact(name, p, q_eps).item()
    if math.isfinite(d.slope_at_infinity):
        assert near == pytest.approx(value.item(), abs=1e-4)  # Hellinger converges as sqrt(eps)
    else:
        assert near > 1.0
