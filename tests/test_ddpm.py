"""DDPM: EMA, respacing, the ancestral sampler, the bound estimator and the command line."""

import math

import pytest
import torch
from diffusers import DDIMScheduler, DDPMScheduler
from torch import nn

from agm import checkpoint
from agm.cli import main
from agm.diffusion import losses
from agm.diffusion.ddpm import (
    DDPM,
    DDPMConfig,
    LossPerTimestep,
    bound_terms,
    sample,
    sample_chain,
    stratified_timesteps,
    stratified_training_loss,
    training_loss,
)
from agm.diffusion.samplers import ancestral_sample, ddim_sample, ddim_step
from agm.diffusion.schedule import NoiseSchedule, ScheduleConfig
from agm.metrics import nats_to_bits_per_dim
from agm.nn.unet import UNetConfig
from agm.train import EMA


def tiny(num_timesteps: int = 1000, **kw) -> DDPM:
    torch.manual_seed(0)
    return DDPM(DDPMConfig(unet=UNetConfig(channels=8, multipliers=(1, 1, 1), **kw),
                           schedule=ScheduleConfig(num_timesteps=num_timesteps))).eval()


class ZeroNet(nn.Module):
    """Predicts no noise at all: the sampler must then reproduce the schedule's own recursion."""

    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.zeros(()))

    def forward(self, x, t, labels=None):
        return torch.zeros_like(x) * self.w


# -- EMA -----------------------------------------------------------------------------------------

def test_ema_is_the_exponential_average_of_the_parameter_path():
    model = nn.Linear(1, 1, bias=False)
    ema = EMA(model, decay=0.9, warmup=False)
    expected = model.weight.item()
    for value in (1.0, -2.0, 0.5, 3.0):
        with torch.no_grad():
            model.weight.fill_(value)
        ema.update(model)
        expected = 0.9 * expected + 0.1 * value
    assert ema.module.weight.item() == pytest.approx(expected, rel=1e-6)
    assert not ema.module.weight.requires_grad


def test_ema_warmup_and_bad_decay():
    ema = EMA(nn.Linear(1, 1), decay=0.999)
    assert ema.current_decay() == pytest.approx(0.1)  # (1 + 0) / (10 + 0)
    with pytest.raises(ValueError, match="decay"):
        EMA(nn.Linear(1, 1), decay=1.0)


# -- respacing -------------------------------------------------------------------------------------

def test_respacing_keeps_the_marginals_and_the_full_chain_is_unchanged():
    s = NoiseSchedule()
    full, tau = s.respaced(1000)
    assert torch.equal(tau, torch.arange(1000)) and torch.allclose(full.betas, s.betas, rtol=1e-12)
    short, tau = s.respaced(50)
    assert tau[0] == 0 and tau[-1] == 999 and len(tau) == 50
    assert torch.allclose(short.alphas_cumprod, s.alphas_cumprod[tau], rtol=1e-10)
    with pytest.raises(ValueError, match="steps must lie in 1..1000"):
        s.respaced(0)


def test_respaced_schedule_matches_diffusers_custom_timesteps():
    """respaced(S) is the chain diffusers' DDPMScheduler walks with set_timesteps(timesteps=tau): at each kept
    timestep, diffusers' current beta (1 - alpha_bar_t / alpha_bar_prev) is the respaced schedule's beta."""
    s = NoiseSchedule()
    short, tau = s.respaced(20)
    ref = DDPMScheduler(num_train_timesteps=1000, clip_sample=False)
    ref.set_timesteps(timesteps=tau.flip(0).tolist())
    for i, t in enumerate(tau.tolist()):
        prev = ref.previous_timestep(t)
        a_prev = ref.alphas_cumprod[prev] if prev >= 0 else torch.tensor(1.0)
        expected = 1 - ref.alphas_cumprod[t] / a_prev
        assert short.betas[i].item() == pytest.approx(expected.item(), rel=1e-3), t  # diffusers: float32
        assert prev == (tau[i - 1].item() if i > 0 else -1)


@pytest.mark.parametrize("clip", [True, False])
@pytest.mark.parametrize("steps", [None, 7])
def test_whole_ancestral_chain_matches_a_loop_over_diffusers_ddpm_scheduler(clip, steps):
    """The same network, the same x_T and the same noise draws: our chain equals diffusers' step() loop."""
    T = 40
    model = tiny(num_timesteps=T)
    tau = model.schedule.timesteps(steps or T)
    ref = DDPMScheduler(num_train_timesteps=T, clip_sample=clip, variance_type="fixed_small")
    ref.set_timesteps(timesteps=tau.flip(0).tolist())
    g = torch.Generator().manual_seed(11)
    x = torch.randn(2, 1, 28, 28, generator=g)
    x_ref = x.clone()
    with torch.no_grad():
        for t in ref.timesteps:
            eps = model(x_ref, torch.full((2,), int(t)))
            x_ref = ref.step(eps, int(t), x_ref, generator=g).prev_sample
    ours = ancestral_sample(model, model.schedule, x, steps, clip_denoised=clip,
                            generator=_after_draw(11))
    assert torch.allclose(ours, x_ref, atol=1e-4, rtol=1e-4)


def _after_draw(seed: int) -> torch.Generator:
    """A generator seeded with ``seed`` that has already drawn one x_T of shape (2, 1, 28, 28)."""
    g = torch.Generator().manual_seed(seed)
    torch.randn(2, 1, 28, 28, generator=g)
    return g


@pytest.mark.parametrize("rederive", [False, True])
@pytest.mark.parametrize("clip", [True, False])
@pytest.mark.parametrize("eta", [0.0, 1.0])
def test_ddim_step_matches_diffusers_ddim_scheduler(clip, eta, rederive):
    """diffusers steps from t to t - T // S; compare single steps with a fixed model output."""
    s = NoiseSchedule()
    ref = DDIMScheduler(num_train_timesteps=1000, beta_schedule="linear", clip_sample=clip, set_alpha_to_one=True)
    ref.set_timesteps(10)
    g = torch.Generator().manual_seed(0)
    xt, eps = torch.randn(2, 1, 28, 28, generator=g) * 2, torch.randn(2, 1, 28, 28, generator=g)
    for t in (900, 500, 100):
        ours = ddim_step(s, eps, t, t - 100, xt, eta, clip, torch.Generator().manual_seed(3), rederive)
        expected = ref.step(eps, t, xt, eta=eta, generator=torch.Generator().manual_seed(3),
                            use_clipped_model_output=rederive).prev_sample
        assert torch.allclose(ours, expected, atol=1e-4, rtol=1e-4), t


def test_rederiving_eps_keeps_the_step_consistent_with_the_clipped_prediction():
    """With eps re-derived, x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) eps holds for the clipped x0, so a step to
    t itself returns x_t; keeping the network's eps does not once clipping bites."""
    s = NoiseSchedule()
    g = torch.Generator().manual_seed(0)
    xt, eps = torch.randn(2, 1, 28, 28, generator=g) * 2, torch.randn(2, 1, 28, 28, generator=g)
    kept = ddim_step(s, eps, 100, 100, xt, 0.0, True)
    rederived = ddim_step(s, eps, 100, 100, xt, 0.0, True, use_clipped_model_output=True)
    assert torch.allclose(rederived, xt, atol=1e-5) and not torch.allclose(kept, xt, atol=1e-2)


def test_deterministic_ddim_is_deterministic_and_eta_one_is_not():
    model = tiny(num_timesteps=20)
    x_T = torch.randn(2, 1, 28, 28, generator=torch.Generator().manual_seed(0))
    a = ddim_sample(model, model.schedule, x_T, 5, eta=0.0, generator=torch.Generator().manual_seed(1))
    b = ddim_sample(model, model.schedule, x_T, 5, eta=0.0, generator=torch.Generator().manual_seed(2))
    c = ddim_sample(model, model.schedule, x_T, 5, eta=1.0, generator=torch.Generator().manual_seed(2))
    assert torch.equal(a, b) and not torch.allclose(a, c)


def test_clipping_projects_the_predicted_x0_onto_the_data_range():
    """A network whose x0-prediction lies far outside [-1, 1]: with clipping the last step returns x0 in range."""
    model = tiny(num_timesteps=5)
    model.net = ZeroNet()
    x_T = torch.full((1, 1, 28, 28), 3.0)  # x0_hat = x_t / sqrt(alpha_bar_t) > 1 everywhere
    clipped = ancestral_sample(model, model.schedule, x_T, clip_denoised=True, generator=torch.Generator())
    unclipped = ancestral_sample(model, model.schedule, x_T, clip_denoised=False, generator=torch.Generator())
    assert clipped.max() <= 1.0 + 1e-6 and unclipped.min() > 1.5


def test_callback_sees_every_state_with_the_papers_time_index():
    model = tiny(num_timesteps=10)
    seen = []
    ancestral_sample(model, model.schedule, torch.randn(1, 1, 28, 28), 4, callback=lambda t, x: seen.append(t))
    tau = model.schedule.timesteps(4).tolist()
    assert seen == [10, *[t + 1 for t in reversed(tau[:-1])], 0]


# -- sampler ----------------------------------------------------------------------------------------

def test_sampler_shapes_range_determinism_and_trajectory():
    model = tiny(num_timesteps=20)
    a, traj = sample_chain(model, 3, torch.Generator().manual_seed(1), keep=5)
    c = sample(model, 3, torch.Generator().manual_seed(1))
    b, _ = sample_chain(model, 3, torch.Generator().manual_seed(1))
    assert a.shape == (3, 1, 28, 28) and 0 <= a.min() and a.max() <= 1
    assert torch.equal(a, b) and torch.equal(a, c)
    assert [t for t, _ in traj] == [20, 15, 10, 5, 0]
    assert torch.equal(traj[-1][1], a)


def test_zero_noise_prediction_follows_the_posterior_mean_recursion():
    """With eps_theta = 0 and no noise at t = 0, one step from x_1 is x_0_hat = x_1 / sqrt(alpha_bar_0)."""
    model = tiny(num_timesteps=1)
    model.net = ZeroNet()
    g = torch.Generator().manual_seed(3)
    x1 = torch.randn((2, 1, 28, 28), generator=torch.Generator().manual_seed(3))
    out, _ = sample_chain(model, 2, g, clip_denoised=False)
    expected = ((x1 / model.schedule.alphas_cumprod[0].sqrt()).float() + 1) / 2
    assert torch.allclose(out, expected.clamp(0, 1), atol=1e-6)


def test_sampler_bad_inputs():
    model = tiny(num_timesteps=10)
    with pytest.raises(ValueError, match="steps must lie in 1..10"):
        sample(model, 2, steps=0)
    with pytest.raises(ValueError, match="steps must lie"):
        sample(model, 2, steps=11)
    with pytest.raises(ValueError, match="variance"):
        sample(model, 2, variance="learned")
    with pytest.raises(ValueError, match="n must be"):
        sample(model, 0)
    with pytest.raises(ValueError, match=r"\[B, 1, 28, 28\]"):
        model(torch.zeros(2, 1, 32, 32), torch.zeros(2, dtype=torch.long))
    with pytest.raises(ValueError, match="not class-conditional"):
        sample(model, 2, labels=torch.zeros(2, dtype=torch.long))
    with pytest.raises(ValueError, match="sampler"):
        sample(model, 2, sampler="euler")


# -- training ------------------------------------------------------------------------------------------

@pytest.mark.parametrize("n_classes", [0, 10])
def test_a_large_batch_without_gradients_runs_in_pieces_with_the_numbers_of_one_call(n_classes, monkeypatch):
    """Evaluation in pieces of EVAL_CHUNK is invisible: the one-call output to float rounding, labels kept per piece."""
    import agm.diffusion.ddpm as ddpm_module

    model = tiny(num_classes=n_classes)
    x, t = torch.randn(7, 1, 28, 28), torch.randint(0, 1000, (7,))
    labels = torch.arange(7) % 10 if n_classes else None
    with torch.no_grad():
        whole = model(x, t, labels)
        calls = []
        monkeypatch.setattr(ddpm_module, "EVAL_CHUNK", 3)
        original = model.net.forward
        monkeypatch.setattr(model.net, "forward", lambda *a: calls.append(len(a[0])) or original(*a))
        pieces = model(x, t, labels)
    assert calls == [3, 3, 1] and torch.allclose(pieces, whole, rtol=0, atol=1e-5)
    calls.clear()
    model(x, t, labels).sum().backward()  # with gradients: one call, so autograd sees one graph
    assert calls == [7]


def test_training_loss_is_l_simple_and_reports_timesteps():
    """Recomputed from the closed form x_t = sqrt(abar) x0 + sqrt(1 - abar) eps with the same draws."""
    model = tiny(num_timesteps=50)
    x0 = torch.rand(6, 1, 28, 28) * 2 - 1
    loss, logs = training_loss(model, x0, torch.Generator().manual_seed(0))
    g = torch.Generator().manual_seed(0)
    t = torch.randint(50, (6,), generator=g)
    eps = torch.randn(x0.shape, generator=g)
    abar = model.schedule.alphas_cumprod[t].float().view(-1, 1, 1, 1)
    with torch.no_grad():
        expected = ((model(abar.sqrt() * x0 + (1 - abar).sqrt() * eps, t) - eps) ** 2).mean()
    assert torch.equal(logs["t"], t) and logs["mse"].shape == (6,)
    assert loss.item() == pytest.approx(expected.item(), rel=1e-5)


def test_stratified_timesteps_draw_one_t_per_stratum_and_every_t_equally_often_pooled():
    assert torch.equal(stratified_timesteps(50, 50, torch.Generator().manual_seed(0)), torch.arange(50))
    T, B, n = 10, 3, 20_000  # B does not divide T: strata of 3 or 4 timesteps
    g = torch.Generator().manual_seed(1)
    draws = torch.stack([stratified_timesteps(T, B, g) for _ in range(n)])  # (n, B)
    b = torch.arange(B)
    assert ((draws >= b * T // B) & (draws * B < (b + 1) * T)).all()  # t_b in [floor(bT/B), (b+1)T/B)
    counts = torch.bincount(draws.flatten(), minlength=T).double()
    expected = n * B / T
    assert ((counts - expected).abs() < 5 * math.sqrt(expected)).all(), counts


def test_stratified_training_loss_is_unbiased_and_less_noisy_when_the_error_depends_on_t():
    model = tiny(num_timesteps=100)
    x0 = torch.rand(8, 1, 28, 28, generator=torch.Generator().manual_seed(1)) * 2 - 1
    loss, logs = stratified_training_loss(model, x0, torch.Generator().manual_seed(0))
    g = torch.Generator().manual_seed(0)
    t = stratified_timesteps(100, 8, g)
    eps = torch.randn(x0.shape, generator=g)
    abar = model.schedule.alphas_cumprod[t].float().view(-1, 1, 1, 1)
    with torch.no_grad():
        expected = ((model(abar.sqrt() * x0 + (1 - abar).sqrt() * eps, t) - eps) ** 2).mean()
    assert torch.equal(logs["t"], t) and loss.item() == pytest.approx(expected.item(), rel=1e-5)

    class Echo(nn.Module):  # predicts x_t itself: an error that changes strongly with t
        def forward(self, x, t, labels=None):
            return x

    model.net = Echo()
    g_u, g_s = torch.Generator().manual_seed(2), torch.Generator().manual_seed(3)
    uniform = torch.tensor([training_loss(model, x0, g_u)[0].item() for _ in range(300)])
    stratified = torch.tensor([stratified_training_loss(model, x0, g_s)[0].item() for _ in range(300)])
    se = math.sqrt((uniform.var() + stratified.var()).item() / 300)
    assert abs(uniform.mean().item() - stratified.mean().item()) < 5 * se
    assert stratified.var() < 0.2 * uniform.var()


def test_loss_per_timestep_bins():
    tracker = LossPerTimestep(100, bins=4)
    tracker.add(torch.tensor([0, 10, 30, 99]), torch.tensor([1.0, 3.0, 5.0, 7.0]))
    assert tracker.means() == [2.0, 5.0, 0.0, 7.0]


# -- the bound ---------------------------------------------------------------------------------------------

def test_monte_carlo_bound_is_unbiased_for_the_exact_sum():
    """T * (a uniform t's term) has the exact sum over t as its mean: compare the two within 4 standard errors."""
    model = tiny(num_timesteps=4)
    images = torch.rand(2, 1, 28, 28, generator=torch.Generator().manual_seed(0))
    exact = torch.stack([bound_terms(model, images, torch.Generator().manual_seed(s))["total"] for s in range(30)])
    mc = torch.stack([bound_terms(model, images, torch.Generator().manual_seed(100 + s), timesteps_per_image=1)["total"]
                      for s in range(120)])
    se = (exact.var(0) / len(exact) + mc.var(0) / len(mc)).sqrt()
    assert ((exact.mean(0) - mc.mean(0)).abs() < 4 * se).all()
    assert (mc.std(0) > exact.std(0)).all()  # the price of one network call instead of T


def test_exact_small_timesteps_keep_the_estimate_unbiased():
    model = tiny(num_timesteps=4)
    images = torch.rand(2, 1, 28, 28, generator=torch.Generator().manual_seed(0))
    # 30 exact and 120 mixed estimates of each image, as independent rows of one batch each (draws, 2)
    exact = bound_terms(model, images.repeat(30, 1, 1, 1), torch.Generator().manual_seed(0))["total"].view(30, 2)
    mixed = bound_terms(model, images.repeat(120, 1, 1, 1), torch.Generator().manual_seed(500), timesteps_per_image=1,
                        exact_below=2)["total"].view(120, 2)
    se = (exact.var(0) / len(exact) + mixed.var(0) / len(mixed)).sqrt()
    assert ((exact.mean(0) - mixed.mean(0)).abs() < 4 * se).all()
    with pytest.raises(ValueError, match="exact_below"):
        bound_terms(model, images, timesteps_per_image=1, exact_below=4)


def test_bound_terms_match_the_ELBO_terms_at_every_t():
    model = tiny(num_timesteps=6)
    images = torch.rand(2, 1, 28, 28, generator=torch.Generator().manual_seed(0))
    out = bound_terms(model, images, torch.Generator().manual_seed(5))
    # recompute with the same noise draws, term by term
    g = torch.Generator().manual_seed(5)
    x0 = 2 * (torch.round(images * 255) / 255) - 1
    total = losses.prior_term(model.schedule, x0).double()
    for t in range(6):
        tt = torch.full((2,), t)
        eps = torch.randn(x0.shape, generator=g)
        xt = model.schedule.q_sample(x0, tt, eps)
        with torch.no_grad():
            total += losses.vlb_terms(model.schedule, model(xt, tt), x0, xt, tt, "beta").double()
    assert torch.allclose(out["total"], total, rtol=1e-6)


def test_bits_per_dim_conversion_and_bad_inputs():
    assert nats_to_bits_per_dim(784 * math.log(2)) == pytest.approx(1.0)
    model = tiny(num_timesteps=4)
    with pytest.raises(ValueError, match="timesteps_per_image"):
        bound_terms(model, torch.rand(1, 1, 28, 28), timesteps_per_image=0)
    with pytest.raises(ValueError, match=r"\[N, 1, 28, 28\]"):
        bound_terms(model, torch.rand(1, 28, 28))


# -- command line --------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def smoke_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("ddpm")
    assert main(["train", "ddpm", "--smoke", "--out-dir", str(d)]) == 0
    return d


def test_train_smoke_and_sample(smoke_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("AGM_CHECKPOINTS", str(smoke_dir))
    manifest = checkpoint.read_manifest("ddpm", smoke_dir)
    assert manifest.metrics["sample_steps"] == 5 and len(manifest.training["loss_per_t"]) == 20
    assert manifest.metrics["sample_clip_denoised"] is False
    out = tmp_path / "d.pt"
    assert main(["sample", "ddpm", "--n", "4", "--steps", "10", "--variance", "beta", "--out", str(out)]) == 0
    images = torch.load(out, weights_only=True)["images"]
    assert images.shape == (4, 1, 28, 28)
    ddim = tmp_path / "ddim.pt"
    assert main(["sample", "ddpm", "--n", "4", "--sampler", "ddim", "--steps", "10", "--eta", "0", "--no-clip",
                 "--out", str(ddim)]) == 0
    assert not torch.equal(torch.load(ddim, weights_only=True)["images"], images)
    assert main(["sample", "ddpm", "--n", "2", "--label", "3", "--out", str(ddim)]) == 2  # unconditional
    with pytest.raises(SystemExit):
        main(["sample", "ddpm", "--n", "4", "--variance", "learned", "--out", str(out)])
    dpm = tmp_path / "dpm.pt"
    for clip in ("--clip", "--no-clip"):
        assert main(["sample", "ddpm", "--n", "3", "--sampler", "dpmsolver++", "--steps", "6", clip, "--seed", "2",
                     "--out", str(dpm)]) == 0
        assert torch.load(dpm, weights_only=True)["images"].shape == (3, 1, 28, 28)
    with pytest.raises(SystemExit):  # one clipping choice at a time
        main(["sample", "ddpm", "--n", "2", "--clip", "--no-clip", "--out", str(dpm)])
    for options in (["--sampler", "pf-ode", "--solver", "euler"], ["--sampler", "pf-ode"],
                    ["--sampler", "langevin", "--langevin-steps", "2", "--step-size", "1e-5"]):
        assert main(["sample", "ddpm", "--n", "2", "--steps", "3", *options, "--out", str(dpm)]) == 0
        assert torch.load(dpm, weights_only=True)["images"].shape == (2, 1, 28, 28)
    assert main(["sample", "ddpm", "--n", "2", "--sampler", "pf-ode", "--clip", "--out", str(dpm)]) == 2
    assert main(["sample", "ddpm", "--n", "2", "--sampler", "langevin", "--langevin-steps", "0",
                 "--out", str(dpm)]) == 2


def test_sample_rejects_bad_steps(smoke_dir, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("AGM_CHECKPOINTS", str(smoke_dir))
    assert main(["sample", "ddpm", "--n", "2", "--steps", "0", "--out", str(tmp_path / "x.pt")]) == 2
    assert "steps must lie in 1..1000" in capsys.readouterr().err


@pytest.mark.parametrize("steps", [5, 10, 20])
def test_dpm_solver_chain_matches_diffusers_dpm_solver_multistep(steps):
    """DPM-Solver++(2M) against diffusers' DPMSolverMultistepScheduler driven with the same timesteps."""
    from diffusers import DPMSolverMultistepScheduler

    from agm.diffusion.samplers import dpm_solver_sample

    T = 100
    model = tiny(num_timesteps=T)
    tau = model.schedule.timesteps(steps)
    ref = DPMSolverMultistepScheduler(num_train_timesteps=T, algorithm_type="dpmsolver++", solver_order=2,
                                      final_sigmas_type="zero")
    ref.set_timesteps(timesteps=tau.flip(0).tolist())
    x = torch.randn(2, 1, 28, 28, generator=torch.Generator().manual_seed(5))
    x_ref = x.clone()
    with torch.no_grad():
        for t in ref.timesteps:
            x_ref = ref.step(model(x_ref, torch.full((2,), int(t))), int(t), x_ref).prev_sample
    ours = dpm_solver_sample(model, model.schedule, x, steps)
    assert torch.allclose(ours, x_ref, atol=1e-4, rtol=1e-4)


def test_dpm_solver_solves_the_probability_flow_ode_of_gaussian_data():
    """For data N(0, c^2 I) the exact ε-model is x_t sqrt(1-ab) / (ab c^2 + 1 - ab); the ODE maps x_T to
    x_0 = x_T c / sqrt(ab_T c^2 + 1 - ab_T) in closed form. DPM-Solver++ converges at second order in the
    number of steps, DDIM (the same ODE at first order) at first order."""
    from agm.diffusion.samplers import dpm_solver_sample

    c = 0.5
    schedule = NoiseSchedule()
    exact_model = _exact_gaussian_model(schedule, c)
    x_T = torch.randn(4, 1, 28, 28, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    ab_T = schedule.alphas_cumprod[-1]
    exact = x_T * c / (ab_T * c**2 + 1 - ab_T).sqrt()
    def errors(steps):
        dpm = dpm_solver_sample(exact_model, schedule, x_T, steps)
        ddim = ddim_sample(exact_model, schedule, x_T, steps, clip_denoised=False)
        return (dpm - exact).abs().max().item(), (ddim - exact).abs().max().item()

    (dpm_200, ddim_200), (dpm_1000, ddim_1000) = errors(200), errors(1000)
    assert dpm_200 < ddim_200 / 4 and dpm_1000 < 1e-3
    assert dpm_200 / dpm_1000 > 12 and 3 < ddim_200 / ddim_1000 < 8  # 5x the steps: ~25x and ~5x


def test_multistep_line_miss_is_the_interpolation_error_of_a_quadratic_in_lambda():
    """A model whose data prediction is D = f(λ_t): the line through the last two D's misses f at λ_0 by
    the interpolation error, (λ_0 - λ_r)(λ_0 - λ_t) for f = λ², and not at all for f linear."""
    from agm.diffusion.diagnostics import multistep_line_miss

    schedule = NoiseSchedule()
    ab = schedule.alphas_cumprod

    def with_data_prediction(f):
        class Prescribed(nn.Module):  # ε = (x_t - sqrt(ab) D) / sqrt(1 - ab), so that D_θ(x_t, t) = f(λ_t)
            def forward(self, x, t, labels=None):
                a = ab[t].view(-1, 1, 1, 1).to(x.dtype)
                return (x - a.sqrt() * f(0.5 * (a / (1 - a)).log())) / (1 - a).sqrt()

        return Prescribed()

    x_T = torch.randn(2, 1, 4, 4, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    lam = lambda k: 0.5 * math.log(ab[k] / (1 - ab[k]))  # noqa: E731
    lam_r, lam_t, lam_0 = lam(222), lam(111), lam(0)  # 10 steps over T = 1000: ..., 222, 111, 0
    miss = multistep_line_miss(with_data_prediction(lambda l: l**2), schedule, x_T, 10)
    assert miss == pytest.approx(abs((lam_0 - lam_r) * (lam_0 - lam_t)) / lam_0**2, rel=1e-9)
    assert multistep_line_miss(with_data_prediction(lambda l: 0.3 + 0.2 * l), schedule, x_T, 10) < 1e-12
    with pytest.raises(ValueError, match="steps >= 3"):
        multistep_line_miss(with_data_prediction(lambda l: l), schedule, x_T, 2)


def _exact_gaussian_model(schedule: NoiseSchedule, c: float) -> nn.Module:
    """The exact ε-model of data N(0, c^2 I): E[ε | x_t] = x_t sqrt(1 - ab) / (ab c^2 + 1 - ab)."""

    class Exact(nn.Module):
        def forward(self, x, t, labels=None):
            ab = schedule.alphas_cumprod[t].view(-1, 1, 1, 1).to(x.dtype)
            return x * (1 - ab).sqrt() / (ab * c**2 + 1 - ab)

    return Exact()


def test_ddim_inversion_then_decoding_returns_the_input():
    """Encode x_0 -> x_T and decode with DDIM (η = 0): the round trip's error shrinks with the steps."""
    from agm.diffusion.samplers import ddim_invert

    schedule = NoiseSchedule()
    model = _exact_gaussian_model(schedule, 0.5)
    x0 = 0.5 * torch.randn(3, 1, 28, 28, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    errors = {}
    for steps in (20, 100, 1000):
        x_T = ddim_invert(model, schedule, x0, steps)
        back = ddim_sample(model, schedule, x_T, steps, clip_denoised=False)
        errors[steps] = (back - x0).abs().max().item()
    assert errors[1000] < 0.02 and errors[1000] < errors[100] < errors[20]
    times = []
    ddim_invert(model, schedule, x0, 5, callback=lambda t, x: times.append(t))
    assert times[0] == 0 and times[-1] == schedule.num_timesteps and times == sorted(times)


def test_slerp_keeps_the_norm_and_the_end_points():
    from agm.diffusion.samplers import slerp

    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(2, 1, 28, 28, generator=g), torch.randn(2, 1, 28, 28, generator=g)
    assert torch.allclose(slerp(a, b, 0.0), a, atol=1e-5) and torch.allclose(slerp(a, b, 1.0), b, atol=1e-5)
    mid = slerp(a, b, 0.5)
    assert torch.allclose(mid.flatten(1).norm(dim=1), a.flatten(1).norm(dim=1), rtol=0.05)  # high-dimensional
    assert (((a + b) / 2).flatten(1).norm(dim=1) < 0.8 * mid.flatten(1).norm(dim=1)).all()  # lerp shrinks
    with pytest.raises(ValueError, match="one shape"):
        slerp(a, b[:1], 0.5)


def test_slerp_of_parallel_tensors_is_the_chord_not_nan():
    """θ = 0 makes the formula 0/0: slerp(a, a) must return a, slerp(a, 2a) the point on the segment."""
    from agm.diffusion.samplers import slerp

    a = torch.randn(2, 1, 28, 28, generator=torch.Generator().manual_seed(0))
    assert torch.allclose(slerp(a, a, 0.3), a, atol=1e-6)
    assert torch.allclose(slerp(a, 2 * a, 0.5), 1.5 * a, atol=1e-5)
    nearly = a + 1e-3 * torch.randn(a.shape, generator=torch.Generator().manual_seed(1))  # just above the switch
    assert torch.allclose(slerp(a, nearly, 0.5), (a + nearly) / 2, atol=1e-4)


@pytest.mark.parametrize("t, s", [(999, 998), (500, 499), (500, 400), (10, -1)])
def test_ddim_with_eta_one_is_the_ancestral_step(t, s):
    """η = 1 gives σ² = β̃ of the (respaced) step, and the update is the posterior mean plus that noise."""
    schedule = NoiseSchedule()
    g = torch.Generator().manual_seed(0)
    x, eps = torch.randn(2, 1, 28, 28, generator=g), torch.randn(2, 1, 28, 28, generator=g)
    ddim = ddim_step(schedule, eps, t, s, x, eta=1.0, clip_denoised=False, generator=torch.Generator().manual_seed(4))
    ancestral = schedule.step(eps, t, x, torch.Generator().manual_seed(4), "beta_tilde", prev_t=s,
                              clip_denoised=False)[0]
    assert torch.allclose(ddim, ancestral, atol=1e-5)
