"""The probability-flow ODE, its likelihood with exact and Hutchinson traces, and annealed Langevin."""

import math

import pytest
import torch
from torch import nn

from agm.diffusion.ddpm import DDPM, DDPMConfig
from agm.diffusion.likelihood import (
    hutchinson_trace,
    jacobian_trace,
    ode_bits_per_dim,
    path_timesteps,
    probability_flow_log_likelihood,
    rademacher,
)
from agm.diffusion.samplers import ddim_sample, langevin_sample, probability_flow_sample, sigma_ve
from agm.diffusion.schedule import NoiseSchedule, ScheduleConfig
from agm.diffusion.toy import ExactNoisePredictor, GaussianMixture1D
from agm.nn.unet import UNetConfig

MIXTURE = GaussianMixture1D(means=torch.tensor([-0.6, 0.5]), stds=torch.tensor([0.15, 0.25]),
                            weights=torch.tensor([0.3, 0.7]))


def test_ode_drift_is_minus_sigma_times_the_score_of_the_noised_data():
    """dx̄/dσ = ε*(√ā x̄, t) = -σ ∇ log p_σ(x̄), p_σ the data convolved with N(0, σ²): an independent closed form."""
    schedule = NoiseSchedule()
    model = ExactNoisePredictor(MIXTURE, schedule)
    xbar = torch.linspace(-1.5, 1.5, 31, dtype=torch.float64).view(-1, 1, 1, 1)
    for t in (0, 50, 300, 999):
        sigma = sigma_ve(schedule, t).item()
        drift = model(schedule.alpha_bar(t).sqrt() * xbar, torch.full((31,), t)).flatten()
        smoothed = GaussianMixture1D(MIXTURE.means, (MIXTURE.stds**2 + sigma**2).sqrt(), MIXTURE.weights)
        x = xbar.flatten().clone().requires_grad_(True)
        (score,) = torch.autograd.grad(smoothed.log_density(x).sum(), x)
        assert torch.allclose(drift, -sigma * score, rtol=1e-6, atol=1e-9)


def tiny() -> DDPM:
    torch.manual_seed(0)
    return DDPM(DDPMConfig(unet=UNetConfig(channels=8, multipliers=(1, 1), groups=2),
                           schedule=ScheduleConfig(num_timesteps=100))).eval()


@pytest.mark.parametrize("steps", [1, 4, 10])
def test_euler_on_the_ode_is_unclipped_ddim(steps):
    model = tiny()
    x_T = torch.randn(2, 1, 28, 28, generator=torch.Generator().manual_seed(0))
    euler = probability_flow_sample(model, model.schedule, x_T, steps, solver="euler")
    assert torch.allclose(euler, ddim_sample(model, model.schedule, x_T, steps, clip_denoised=False), atol=1e-4)


def test_call_counter_counts_each_samplers_network_calls_and_changes_nothing():
    """Euler, DDIM and DPM-Solver++ call the network once a step, Heun 2S - 1 times (its last step is Euler)."""
    from agm.diffusion.diagnostics import CallCounter
    from agm.diffusion.samplers import dpm_solver_sample

    model = tiny()
    x_T = torch.randn(2, 1, 28, 28, generator=torch.Generator().manual_seed(0))
    runs = {"heun": (lambda m: probability_flow_sample(m, model.schedule, x_T, 4, "heun"), 7),
            "euler": (lambda m: probability_flow_sample(m, model.schedule, x_T, 4, "euler"), 4),
            "ddim": (lambda m: ddim_sample(m, model.schedule, x_T, 5, clip_denoised=False), 5),
            "dpm": (lambda m: dpm_solver_sample(m, model.schedule, x_T, 6), 6)}
    for name, (run, calls) in runs.items():
        counted = CallCounter(model)
        out = run(counted)
        assert counted.calls == calls, name
        assert torch.equal(out, run(model)), name  # the wrapper passes the network's output through

    class Conditional(nn.Module):  # labels, when given, reach the network
        def forward(self, x, t, labels=None):
            return x * 0 if labels is None else x * 0 + labels.view(-1, 1, 1, 1)

    counted = CallCounter(Conditional())
    assert torch.equal(counted(x_T, torch.zeros(2, dtype=torch.long), torch.tensor([1.0, 2.0]))[:, 0, 0, 0],
                       torch.tensor([1.0, 2.0])) and counted.calls == 1


def test_heun_converges_at_second_order_and_euler_at_first():
    """Data N(0, c²): the exact flow is x̄(σ) = x̄_T √((c² + σ²)/(c² + σ_T²)), so x_0 is known in closed form."""
    c, schedule = 0.5, NoiseSchedule()
    model = ExactNoisePredictor(GaussianMixture1D(torch.zeros(1), torch.tensor([c]), torch.ones(1)), schedule)
    x_T = torch.randn(64, 1, 1, 1, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    ab_T = schedule.alphas_cumprod[-1]
    exact = x_T * c / (ab_T * c**2 + 1 - ab_T).sqrt()

    def error(steps, solver):
        return (probability_flow_sample(model, schedule, x_T, steps, solver) - exact).abs().max().item()

    # the last step (to σ = 0) is Euler for both: compare on chains long enough for the rest to show
    heun = error(100, "heun") / error(200, "heun")
    euler = error(100, "euler") / error(200, "euler")
    assert error(200, "heun") < error(200, "euler") / 3
    assert heun > 3 and 1.5 < euler < 2.6


def test_jacobian_trace_matches_torch_autograd_functional():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Flatten(), nn.Linear(12, 16), nn.Tanh(), nn.Linear(16, 12), nn.Unflatten(1, (3, 2, 2)))
    x = torch.randn(3, 3, 2, 2)
    _, trace = jacobian_trace(net, x)
    for b in range(3):
        jac = torch.autograd.functional.jacobian(lambda v: net(v[None])[0], x[b]).reshape(12, 12)
        assert trace[b].item() == pytest.approx(jac.trace().item(), rel=1e-5)


def test_hutchinson_is_unbiased_for_the_trace_of_a_small_network():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.SiLU(), nn.Conv2d(4, 1, 3, padding=1))
    x = torch.randn(2, 1, 5, 5)
    _, exact = jacobian_trace(net, x)
    probes = rademacher((4000, *x.shape), torch.Generator().manual_seed(1))
    terms = torch.stack([hutchinson_trace(net, x, probes[k : k + 1])[1] for k in range(0, 4000, 40)])
    _, mean = hutchinson_trace(net, x, probes)
    # each of the 100 single-probe terms is an unbiased draw; their spread sets the tolerance
    se = terms.std(0) / math.sqrt(4000)
    assert ((mean - exact).abs() < 4 * se + 1e-6).all()
    assert set(probes.unique().tolist()) == {-1.0, 1.0}
    with pytest.raises(ValueError, match="probes"):
        hutchinson_trace(net, x, probes[:, :1])


def test_ode_likelihood_of_a_mixture_matches_its_closed_form():
    """With the exact ε, log p at the smallest level σ_0 is the mixture smoothed by N(0, σ_0²), exactly."""
    schedule = NoiseSchedule()
    model = ExactNoisePredictor(MIXTURE, schedule)
    x0 = torch.tensor([-0.7, -0.2, 0.3, 0.55, 1.0], dtype=torch.float64).view(-1, 1, 1, 1)
    sigma_0 = sigma_ve(schedule, 0).item()
    smoothed = GaussianMixture1D(MIXTURE.means, (MIXTURE.stds**2 + sigma_0**2).sqrt(), MIXTURE.weights)
    truth = smoothed.log_density(x0.flatten())

    def error(steps, solver):
        out = probability_flow_log_likelihood(model, schedule, x0, steps=steps, solver=solver, probes=None)
        return (out["log_prob"] - truth).abs().max().item()

    # what is left at 500 Heun steps is the prior: N(0, I) stands in for the true q(x_T), off by O(sqrt(abar_T))
    assert error(500, "heun") < 5e-3
    assert error(100, "heun") / error(200, "heun") > 3 and 1.7 < error(100, "euler") / error(200, "euler") < 2.3
    exact = probability_flow_log_likelihood(model, schedule, x0, steps=200, solver="heun", probes=None)
    # in one dimension a Rademacher probe gives z J z = J exactly
    hutch = probability_flow_log_likelihood(model, schedule, x0, steps=200, probes=1, generator=torch.Generator())
    assert torch.allclose(hutch["log_prob"], exact["log_prob"], atol=1e-9)
    assert exact["x_T"].shape == x0.shape


def test_ode_likelihood_bad_input_and_bits_per_dim():
    model = ExactNoisePredictor(MIXTURE, NoiseSchedule())
    x0 = torch.zeros(2, 1, 1, 1, dtype=torch.float64)
    with pytest.raises(ValueError, match="solver"):
        probability_flow_log_likelihood(model, model.schedule, x0, 10, solver="rk4")
    with pytest.raises(ValueError, match="probes"):
        probability_flow_log_likelihood(model, model.schedule, x0, 10, probes=0)
    with pytest.raises(ValueError, match="2 timesteps"):
        probability_flow_log_likelihood(model, model.schedule, x0, 1)
    # uniform density on [-1, 1]^D is 2^-D: 1 bit per dimension on [-1, 1] is 8 bits on 0..256
    assert ode_bits_per_dim(torch.tensor(-784 * math.log(2.0)), 784).item() == pytest.approx(8.0)


def test_annealed_langevin_with_the_exact_score_draws_the_mixture():
    schedule = NoiseSchedule()
    model = ExactNoisePredictor(MIXTURE, schedule)
    g = torch.Generator().manual_seed(0)
    x_T = torch.randn(4000, 1, 1, 1, generator=g, dtype=torch.float64)
    levels = []
    x = langevin_sample(model, schedule, x_T, steps=100, langevin_steps=20, generator=g,
                        callback=lambda t, _: levels.append(t))
    draws = MIXTURE.sample(200000, torch.Generator().manual_seed(1))
    # a Markov chain with a finite step: close to the target, not exact (5 steps a level leave the spread 7 % wide)
    assert abs(x.mean().item() - draws.mean().item()) < 0.02
    assert abs(x.std().item() - draws.std().item()) < 0.02
    assert abs((x < 0).double().mean().item() - 0.3) < 0.04  # the weight of the left mode
    assert levels[0] == schedule.num_timesteps and levels[-1] == 0 and levels == sorted(levels, reverse=True)


def test_sampler_options_are_checked():
    model = tiny()
    x_T = torch.randn(1, 1, 28, 28)
    with pytest.raises(ValueError, match="solver"):
        probability_flow_sample(model, model.schedule, x_T, 3, solver="rk45")
    with pytest.raises(ValueError, match="langevin_steps"):
        langevin_sample(model, model.schedule, x_T, 3, langevin_steps=0)
    with pytest.raises(ValueError, match="step_size"):
        langevin_sample(model, model.schedule, x_T, 3, step_size=-1.0)
    with pytest.raises(ValueError, match="unconditional"):
        ExactNoisePredictor(MIXTURE, model.schedule)(x_T, torch.zeros(1, dtype=torch.long), torch.zeros(1))


def test_log_sigma_path_is_even_in_log_sigma_where_the_integer_grid_allows():
    schedule = NoiseSchedule()
    tau = path_timesteps(schedule, 20, "log-sigma")
    assert tau[0] == 0 and tau[-1] == schedule.num_timesteps - 1 and tau == sorted(set(tau)) and len(tau) == 20
    gaps = torch.stack([sigma_ve(schedule, t) for t in tau]).log().diff()
    assert gaps.max() / gaps.min() < 1.6  # levels 1/19 of the log-range apart, rounded to integer timesteps
    assert len(path_timesteps(schedule, 200, "log-sigma")) < 200  # near t = 0 the grid is coarser than the levels
    assert path_timesteps(schedule, 20) == schedule.timesteps(20).tolist()
    with pytest.raises(ValueError, match="spacing"):
        path_timesteps(schedule, 20, "cosine")


def test_ode_likelihood_of_data_narrower_than_the_smallest_noise_level():
    """Atoms of width << σ_0, as 8-bit pixels are: there ∇·f grows like 1/σ down to σ_0.

    The trapezoid in log σ on a log-σ path integrates it in 40 steps; the same steps even in t,
    which leave a single step across the first decade of σ, do not.
    """
    narrow = GaussianMixture1D(means=torch.tensor([-1.0, 0.2, 1.0]), stds=torch.tensor([0.002, 0.3, 0.002]),
                               weights=torch.tensor([0.4, 0.4, 0.2]))
    schedule = NoiseSchedule()
    model = ExactNoisePredictor(narrow, schedule)
    x0 = torch.tensor([-1.003, -0.999, -0.5, 0.0, 0.3, 0.9, 1.001], dtype=torch.float64).view(-1, 1, 1, 1)
    sigma_0 = sigma_ve(schedule, 0).item()
    smoothed = GaussianMixture1D(narrow.means, (narrow.stds**2 + sigma_0**2).sqrt(), narrow.weights)
    truth = smoothed.log_density(x0.flatten())

    def error(spacing):
        out = probability_flow_log_likelihood(model, schedule, x0, 40, probes=None, spacing=spacing)
        return (out["log_prob"] - truth).abs().max().item()

    assert error("log-sigma") < 0.05 and error("uniform") > 1
