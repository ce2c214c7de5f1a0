"""The closed-form 1-D models of agm.diffusion.toy against independent references."""

import math

import pytest
import torch

from agm.diffusion.schedule import NoiseSchedule, ScheduleConfig
from agm.diffusion.toy import GaussianMixture1D, LinearGaussianReverse, normal_log_density
from agm.distributions import gaussian_kl


def two_bumps() -> GaussianMixture1D:
    return GaussianMixture1D(torch.tensor([-0.7, 0.6]), torch.tensor([0.15, 0.25]), torch.tensor([0.4, 0.6]))


@pytest.mark.parametrize("abar", [1.0, 0.9, 0.3, 1e-3])
def test_mixture_score_is_the_autograd_derivative_of_the_log_density(abar):
    """Catches a wrong sign, a missing responsibility or the wrong noised variance in ``score``."""
    mix = GaussianMixture1D(torch.tensor([-0.8, 0.0, 0.7]), torch.tensor([0.1, 0.2, 0.1]),
                            torch.tensor([0.3, 0.3, 0.4]))
    x = torch.linspace(-3, 3, 61, dtype=torch.float64).requires_grad_(True)
    (grad,) = torch.autograd.grad(mix.log_density(x, abar).sum(), x)
    assert torch.allclose(mix.score(x.detach(), abar), grad, atol=1e-10, rtol=1e-10)


def test_mixture_score_properties():
    """One component gives the Gaussian score; a symmetric mixture an odd score; the score has mean zero."""
    one = GaussianMixture1D(torch.tensor([0.3]), torch.tensor([0.5]), torch.tensor([1.0]))
    x = torch.linspace(-2, 2, 9, dtype=torch.float64)
    abar = 0.6
    var = abar * 0.25 + 1 - abar
    assert torch.allclose(one.score(x, abar), -(x - math.sqrt(abar) * 0.3) / var, atol=1e-12)
    sym = GaussianMixture1D(torch.tensor([-0.5, 0.5]), torch.tensor([0.1, 0.1]), torch.tensor([0.5, 0.5]))
    assert torch.allclose(sym.score(x, 0.8), -sym.score(-x, 0.8), atol=1e-12)
    # E_q[d/dx log q] = integral of q' = 0, on a grid wide enough for the tails
    grid = torch.linspace(-6, 6, 24_001, dtype=torch.float64)
    mix = two_bumps()
    mean_score = torch.trapezoid(mix.log_density(grid, 0.5).exp() * mix.score(grid, 0.5), grid)
    assert abs(mean_score.item()) < 1e-8


@pytest.mark.parametrize("abar", [0.95, 0.5, 0.05])
def test_mixture_posterior_of_x0_matches_numerical_bayes_and_tweedie(abar):
    """Mean and variance of q(x_0 | x_t) against prior x likelihood normalized on a grid; the mean against
    Tweedie's formula with the exact score. Catches a wrong gain or a missing within-component variance."""
    mix = two_bumps()
    x = torch.linspace(-1.5, 1.5, 7, dtype=torch.float64)
    mean, var = mix.posterior_x0(x, abar)
    grid = torch.linspace(-4, 4, 80_001, dtype=torch.float64)
    log_post = mix.log_density(grid)[None, :] - (x[:, None] - math.sqrt(abar) * grid) ** 2 / (2 * (1 - abar))
    w = log_post.softmax(1)
    grid_mean = (w * grid).sum(1)
    grid_var = (w * (grid - grid_mean[:, None]) ** 2).sum(1)
    assert torch.allclose(mean, grid_mean, atol=1e-8) and torch.allclose(var, grid_var, atol=1e-8)
    tweedie = (x + (1 - abar) * mix.score(x, abar)) / math.sqrt(abar)
    assert torch.allclose(mean, tweedie, atol=1e-12)
    assert (var > 0).all()


def small_schedule() -> NoiseSchedule:
    return NoiseSchedule(ScheduleConfig(num_timesteps=4, beta_start=0.1, beta_end=0.6))


def random_chain(seed: int = 3) -> LinearGaussianReverse:
    g = torch.Generator().manual_seed(seed)
    return LinearGaussianReverse(0.8 + 0.4 * torch.rand(4, generator=g, dtype=torch.float64),
                                 0.2 * torch.randn(4, generator=g, dtype=torch.float64),
                                 0.05 + 0.3 * torch.rand(4, generator=g, dtype=torch.float64))


def test_linear_gaussian_bound_terms_match_monte_carlo():
    """Each closed-form expectation against draws of x_t ~ q(x_t | x_0) and the KL of agm.distributions:
    catches an off-by-one between the chain's and the schedule's timesteps."""
    schedule, chain = small_schedule(), random_chain()
    x0 = torch.tensor([-1.0, 0.5, 2.0], dtype=torch.float64)
    terms = chain.bound_terms(schedule, x0)
    g = torch.Generator().manual_seed(0)
    n = 400_000
    for i, x in enumerate(x0):
        xs = x.expand(n, 1)
        for t in range(1, 4):
            xt = schedule.q_sample(xs, t, torch.randn(n, 1, generator=g, dtype=torch.float64))
            mean_q, var_q = schedule.q_posterior(xs, xt, torch.tensor(t))
            kl = gaussian_kl(mean_q.flatten(), var_q.log().flatten(), chain.a[t] * xt.flatten() + chain.b[t],
                             chain.s2[t].log())
            tolerance = 5 * kl.std().item() / math.sqrt(n)
            assert terms["kl"][i, t - 1].item() == pytest.approx(kl.mean().item(), abs=tolerance)
        x1 = schedule.q_sample(xs, 0, torch.randn(n, 1, generator=g, dtype=torch.float64)).flatten()
        decoder = -normal_log_density(x, chain.a[0] * x1 + chain.b[0], chain.s2[0])
        tolerance = 5 * decoder.std().item() / math.sqrt(n)
        assert terms["decoder"][i].item() == pytest.approx(decoder.mean().item(), abs=tolerance)
        abar_T = schedule.alphas_cumprod[-1]
        prior = gaussian_kl(abar_T.sqrt() * x, (1 - abar_T).log(), torch.zeros(()), torch.zeros(()))
        assert terms["prior"][i].item() == pytest.approx(prior.item(), rel=1e-12)
    assert torch.allclose(terms["total"], terms["prior"] + terms["kl"].sum(1) + terms["decoder"])


def test_linear_gaussian_bound_gap_is_the_kl_of_the_latent_chains():
    """bound - (-log p(x_0)) = KL(q(x_{1:T}|x_0) || p(x_{1:T}|x_0)) >= 0: two independent closed forms agree."""
    schedule = small_schedule()
    x0 = torch.linspace(-2, 2, 7, dtype=torch.float64)
    for seed in range(5):
        chain = random_chain(seed)
        gap = chain.bound_terms(schedule, x0)["total"] + chain.log_likelihood(x0)
        latent = chain.latent_kl(schedule, x0)
        assert (latent > 0).all()
        assert torch.allclose(gap, latent, atol=1e-10, rtol=1e-10)


def test_linear_gaussian_bound_is_tight_for_the_true_reverse_of_standard_normal_data():
    """For x_0 ~ N(0, 1) the true reverse step is N(sqrt(alpha_t) x_t, beta_t): the bound equals -log N(x_0; 0, 1)."""
    schedule = small_schedule()
    chain = LinearGaussianReverse(schedule.alphas.sqrt(), torch.zeros(4), schedule.betas)
    mean, var = chain.marginal()
    assert mean.item() == pytest.approx(0.0, abs=1e-15) and var.item() == pytest.approx(1.0, abs=1e-12)
    x0 = torch.linspace(-3, 3, 13, dtype=torch.float64)
    total = chain.bound_terms(schedule, x0)["total"]
    assert torch.allclose(total, -normal_log_density(x0, 0.0, 1.0), atol=1e-12)


def test_linear_gaussian_marginal_matches_joint_and_simulation():
    chain = random_chain(1)
    mean, var = chain.marginal()
    joint_mean, joint_cov = chain.joint()
    assert joint_mean[0].item() == pytest.approx(mean.item(), abs=1e-12)
    assert joint_cov[0, 0].item() == pytest.approx(var.item(), abs=1e-12)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(200_000, generator=g, dtype=torch.float64)
    for t in reversed(range(4)):
        x = chain.a[t] * x + chain.b[t] + chain.s2[t].sqrt() * torch.randn(len(x), generator=g, dtype=torch.float64)
    assert x.mean().item() == pytest.approx(mean.item(), abs=5 * math.sqrt(var.item() / len(x)))
    assert x.var().item() == pytest.approx(var.item(), rel=5 * math.sqrt(2 / len(x)))


def test_linear_gaussian_refuses_bad_input():
    with pytest.raises(ValueError, match="same length"):
        LinearGaussianReverse(torch.ones(3), torch.zeros(2), torch.ones(3))
    with pytest.raises(ValueError, match="positive"):
        LinearGaussianReverse(torch.ones(3), torch.zeros(3), torch.tensor([1.0, 0.0, 1.0]))
    with pytest.raises(ValueError, match="steps"):
        chain = LinearGaussianReverse(torch.ones(3), torch.zeros(3), torch.ones(3))
        chain.bound_terms(small_schedule(), torch.zeros(1))


# -- the components as classes: the oracles of guidance --------------------------------------------

def points(lo: float = -2.0, hi: float = 2.0, n: int = 41) -> torch.Tensor:
    return torch.linspace(lo, hi, n, dtype=torch.float64).view(-1, 1, 1, 1)


@pytest.mark.parametrize("t", [0, 150, 700])
def test_component_posterior_is_bayes_rule_and_its_gradient_the_score_difference(t):
    """p_t(k | x) against w_k N(x; mu_k, var_k) / sum_j, written from normal_log_density; and
    d/dx log p_t(k | x) = d/dx log N(x; mu_k, var_k) - d/dx log q_t(x). Catches a posterior at the wrong
    noise level (e.g. the clean components), a missing prior weight or a gradient cut by a detach."""
    from agm.diffusion.toy import ComponentPosterior

    schedule, mix = NoiseSchedule(), two_bumps()
    abar = schedule.alpha_bar(t).item()
    x = points().requires_grad_(True)
    log_post = ComponentPosterior(mix, schedule)(x, torch.full((len(x),), t))
    mu, var = math.sqrt(abar) * mix.means, abar * mix.stds**2 + 1 - abar
    joint = mix.weights.log() + normal_log_density(x.detach().reshape(-1, 1), mu, var)  # (N, K)
    assert torch.allclose(log_post.detach(), joint - joint.logsumexp(1, keepdim=True), atol=1e-10)
    for k in range(2):
        (grad,) = torch.autograd.grad(log_post[:, k].sum(), x, retain_graph=True)
        expected = -(x.detach().reshape(-1) - mu[k]) / var[k] - mix.score(x.detach().reshape(-1), abar)
        assert torch.allclose(grad.reshape(-1), expected, atol=1e-9)


def test_exact_conditional_predictor_is_each_component_alone_and_the_mixture_for_the_null_label():
    """Label k: the exact ε of the one-component mixture k; label K or None: the exact ε of the whole
    mixture (ExactNoisePredictor, computed from the mixture's score). Catches labels mapped to the wrong
    component, a null label that is not the mixture, or the responsibilities at the wrong noise level."""
    from agm.diffusion.toy import ExactConditionalNoisePredictor, ExactNoisePredictor

    schedule, mix = NoiseSchedule(), two_bumps()
    model, x = ExactConditionalNoisePredictor(mix, schedule), points()
    for t in (0, 300, 999):
        tt = torch.full((len(x),), t)
        for k in range(2):
            alone = GaussianMixture1D(mix.means[k : k + 1], mix.stds[k : k + 1], torch.ones(1))
            expected = ExactNoisePredictor(alone, schedule)(x, tt)
            assert torch.allclose(model(x, tt, torch.full_like(tt, k)), expected, atol=1e-10)
        unconditional = ExactNoisePredictor(mix, schedule)(x, tt)
        assert torch.allclose(model(x, tt, torch.full_like(tt, 2)), unconditional, atol=1e-10)
        assert torch.allclose(model(x, tt), unconditional, atol=1e-10)
    mixed = torch.arange(len(x)) % 3  # both components and the null label in one batch
    tt = torch.full((len(x),), 200)
    rows = [model(x[i : i + 1], tt[i : i + 1], mixed[i : i + 1]) for i in range(len(x))]
    assert torch.allclose(model(x, tt, mixed), torch.cat(rows))  # each example gets its own label
    with pytest.raises(ValueError, match="0..2"):
        model(x[:1], tt[:1], torch.tensor([3]))


@pytest.mark.parametrize("t", [-1, 0, 300, 999])
def test_tilted_log_density_is_p_t_times_the_classifier_to_the_power_s(t):
    """log p_t(x) + s log p_t(k | x) written from normal_log_density: at s = 1 it is log w_k N(x; mu_k, var_k)
    (the class-conditional density times p(k)), at s = 0 the mixture; t = -1 is the clean data. Catches the
    wrong noise level, the wrong class, or the scale on the wrong term."""
    from agm.diffusion.toy import tilted_log_density

    schedule, mix = NoiseSchedule(), two_bumps()
    abar = 1.0 if t == -1 else schedule.alphas_cumprod[t].item()
    x = points().reshape(-1)
    mu, var = math.sqrt(abar) * mix.means, abar * mix.stds**2 + 1 - abar
    joint = mix.weights.log() + normal_log_density(x[:, None], mu, var)  # (N, K): log w_k N(x; mu_k, var_k)
    log_p = joint.logsumexp(1)
    for k in range(2):
        assert torch.allclose(tilted_log_density(mix, schedule, x, k, 1.0, t), joint[:, k], atol=1e-10)
        assert torch.allclose(tilted_log_density(mix, schedule, x, k, 0.0, t), log_p, atol=1e-10)
        expected = log_p + 2.5 * (joint[:, k] - log_p)
        assert torch.allclose(tilted_log_density(mix, schedule, x, k, 2.5, t), expected, atol=1e-10)


@pytest.mark.parametrize("w", [-1.0, 0.0, 0.5, 3.0])
def test_classifier_free_guidance_is_classifier_guidance_with_the_implicit_classifier(w):
    """(1 + w) eps(x, k) - w eps(x) = eps(x) - (1 + w) sqrt(1 - abar) grad log p_t(k | x) with the exact
    models of mixture data: CFG at weight w is classifier guidance at scale s = 1 + w by Bayes' rule."""
    from agm.diffusion.guidance import ClassifierFreeGuidance, ClassifierGuidance
    from agm.diffusion.toy import ComponentPosterior, ExactConditionalNoisePredictor, ExactNoisePredictor

    schedule, mix = NoiseSchedule(), two_bumps()
    cfg = ClassifierFreeGuidance(ExactConditionalNoisePredictor(mix, schedule), w, num_classes=2)
    cg = ClassifierGuidance(ExactNoisePredictor(mix, schedule), ComponentPosterior(mix, schedule), schedule, 1 + w)
    x = points()
    for t in (0, 100, 500):
        tt = torch.full((len(x),), t)
        for k in range(2):
            y = torch.full_like(tt, k)
            assert torch.allclose(cfg(x, tt, y), cg(x, tt, y), atol=1e-9)


def test_guidance_oracles_refuse_a_batch_of_timesteps_or_images():
    from agm.diffusion.toy import ComponentPosterior, ExactConditionalNoisePredictor

    schedule, mix = NoiseSchedule(), two_bumps()
    for model in (ComponentPosterior(mix, schedule), ExactConditionalNoisePredictor(mix, schedule)):
        with pytest.raises(ValueError, match="one timestep"):
            model(points(n=2), torch.tensor([3, 4]))
        with pytest.raises(ValueError, match=r"\(B, 1, 1, 1\)"):
            model(torch.zeros(2, 1, 28, 28), torch.tensor([3, 3]))


@pytest.mark.parametrize("eta", [0.0, 0.5, 1.0])
def test_gaussian_ddim_coefficients_are_one_step_of_ddim_step_with_the_exact_predictor(eta):
    from agm.diffusion.samplers import chain_pairs, ddim_step
    from agm.diffusion.toy import ExactNoisePredictor, gaussian_ddim_coefficients

    schedule, c = NoiseSchedule(ScheduleConfig(num_timesteps=50)), 0.5
    gauss = ExactNoisePredictor(GaussianMixture1D(torch.zeros(1), torch.tensor([c]), torch.ones(1)), schedule)
    x = torch.linspace(-3, 3, 7, dtype=torch.float64).view(-1, 1, 1, 1)
    for t, s in chain_pairs(schedule, 5):
        m, sigma = gaussian_ddim_coefficients(schedule, c, t, s, eta)
        out = ddim_step(schedule, gauss(x, torch.full((len(x),), t)), t, s, x, eta, False,
                        torch.Generator().manual_seed(t))
        z = torch.randn(x.shape, generator=torch.Generator().manual_seed(t), dtype=torch.float64)
        noise = sigma * z if eta > 0 and s >= 0 else 0.0
        torch.testing.assert_close(out, m * x + noise, rtol=0, atol=1e-12)


@pytest.mark.parametrize("eta", [0.0, 1.0])
def test_gaussian_ddim_variance_is_that_of_ddim_sample(eta):
    from agm.diffusion.samplers import ddim_sample
    from agm.diffusion.toy import ExactNoisePredictor, gaussian_ddim_variance

    schedule, c, steps, n = NoiseSchedule(ScheduleConfig(num_timesteps=50)), 0.5, 4, 20_000
    gauss = ExactNoisePredictor(GaussianMixture1D(torch.zeros(1), torch.tensor([c]), torch.ones(1)), schedule)
    x_T = torch.randn(n, 1, 1, 1, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    out = ddim_sample(gauss, schedule, x_T, steps, eta=eta, clip_denoised=False,
                      generator=torch.Generator().manual_seed(1))
    v0 = gaussian_ddim_variance(schedule, c, steps, eta)
    if eta == 0:  # deterministic and linear: every output is x_T times sqrt(v_0)
        torch.testing.assert_close(out / x_T, torch.full_like(out, math.sqrt(v0)), rtol=1e-10, atol=0)
    else:  # the sample variance (mean 0 known) has standard deviation v_0 sqrt(2 / n)
        assert abs((out**2).mean().item() - v0) < 4 * v0 * math.sqrt(2 / n)
    assert abs(v0 - c**2) > 1e-3  # four steps do not return the data's variance: the test can tell them apart
