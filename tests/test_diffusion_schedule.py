"""The DDPM schedule against diffusers' DDPMScheduler (a test-only oracle) and against the chain itself."""

import pytest
import torch
from diffusers import DDPMScheduler

from agm.diffusion.schedule import NoiseSchedule, ScheduleConfig

KINDS = {"linear": "linear", "cosine": "squaredcos_cap_v2"}


def pair(kind: str):
    ours = NoiseSchedule(ScheduleConfig(kind=kind))
    ref = DDPMScheduler(num_train_timesteps=1000, beta_schedule=KINDS[kind], clip_sample=False)
    return ours, ref


@pytest.mark.parametrize("kind", KINDS)
def test_betas_and_alphas_cumprod_match_diffusers(kind):
    ours, ref = pair(kind)
    assert torch.allclose(ours.betas.float(), ref.betas, rtol=1e-5, atol=1e-7)
    assert torch.allclose(ours.alphas_cumprod.float(), ref.alphas_cumprod, rtol=1e-4, atol=1e-7)


@pytest.mark.parametrize("kind", KINDS)
def test_q_sample_matches_add_noise(kind, generator):
    ours, ref = pair(kind)
    x0 = torch.rand(4, 1, 28, 28, generator=generator) * 2 - 1
    noise = torch.randn(x0.shape, generator=generator)
    t = torch.tensor([0, 10, 500, 999])
    assert torch.allclose(ours.q_sample(x0, t, noise), ref.add_noise(x0, noise, t), atol=1e-5)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("variance, variance_type", [("beta_tilde", "fixed_small"), ("beta", "fixed_large")])
@pytest.mark.parametrize("t", [999, 500, 37, 1, 0])
def test_step_matches_diffusers(kind, variance, variance_type, t):
    ours = NoiseSchedule(ScheduleConfig(kind=kind))
    ref = DDPMScheduler(num_train_timesteps=1000, beta_schedule=KINDS[kind], clip_sample=False,
                        variance_type=variance_type)
    g = torch.Generator().manual_seed(1)
    xt = torch.randn(2, 1, 28, 28, generator=g)
    eps = torch.randn(2, 1, 28, 28, generator=g)  # a fixed dummy "model output"
    prev, x0_hat = ours.step(eps, t, xt, torch.Generator().manual_seed(7), variance=variance, clip_denoised=False)
    out = ref.step(eps, t, xt, generator=torch.Generator().manual_seed(7))
    assert torch.allclose(x0_hat, out.pred_original_sample, atol=1e-3, rtol=1e-4)
    assert torch.allclose(prev, out.prev_sample, atol=1e-4, rtol=1e-4)


def test_golden_constants_of_the_linear_schedule():
    s = NoiseSchedule()
    assert s.betas[0].item() == pytest.approx(1e-4) and s.betas[-1].item() == pytest.approx(0.02)
    # prod_t (1 - beta_t) for the linear schedule, computed independently with a float64 log-sum
    log_ab = torch.log1p(-torch.linspace(1e-4, 0.02, 1000, dtype=torch.float64)).sum()
    assert s.alphas_cumprod[-1].item() == pytest.approx(log_ab.exp().item(), rel=1e-12)
    assert s.alphas_cumprod[-1].item() < 1e-4  # x_T is almost pure noise
    assert s.posterior_variance[0].item() == 0.0


def test_q_sample_agrees_with_iterating_the_chain(generator):
    s = NoiseSchedule(ScheduleConfig(num_timesteps=200))
    x0 = torch.full((20_000, 1), 0.8, dtype=torch.float64)
    t = 120
    x = x0.clone()
    for k in range(t + 1):  # x_k = sqrt(1 - beta_k) x_{k-1} + sqrt(beta_k) eps, for k = 0..t
        x = (1 - s.betas[k]).sqrt() * x + s.betas[k].sqrt() * torch.randn(x.shape, generator=generator,
                                                                          dtype=torch.float64)
    mean, var = s.alphas_cumprod[t].sqrt() * 0.8, 1 - s.alphas_cumprod[t]
    assert abs(x.mean() - mean) < 5 * (var / len(x)).sqrt()
    assert abs(x.var() - var) < 5 * var * (2 / len(x)) ** 0.5


def test_posterior_is_bayes_rule():
    """q(x_{t-1}|x_t,x_0) ∝ q(x_t|x_{t-1}) q(x_{t-1}|x_0): compare with a product of Gaussians in 1-D."""
    s = NoiseSchedule(ScheduleConfig(kind="cosine"))
    x0, xt = torch.tensor([[0.3]], dtype=torch.float64), torch.tensor([[-0.5]], dtype=torch.float64)
    for t in (1, 50, 700):
        a_prev, beta = s.alphas_cumprod[t - 1], s.betas[t]
        # prior N(sqrt(a_prev) x0, 1 - a_prev) times likelihood in x_{t-1}: N(x_t; sqrt(1-beta) x_{t-1}, beta)
        prec = 1 / (1 - a_prev) + (1 - beta) / beta
        mean = (a_prev.sqrt() * x0 / (1 - a_prev) + (1 - beta).sqrt() * xt / beta) / prec
        ours_mean, ours_var = s.q_posterior(x0, xt, torch.tensor([t]))
        assert torch.allclose(ours_mean, mean) and torch.allclose(ours_var.squeeze(), 1 / prec)


def test_bad_inputs_raise_clear_errors():
    s = NoiseSchedule()
    x = torch.zeros(2, 1, 28, 28)
    with pytest.raises(ValueError, match="timesteps must lie in 0..999"):
        s.q_sample(x, torch.tensor([0, 1000]), x)
    with pytest.raises(ValueError, match="noise shape"):
        s.q_sample(x, 3, torch.zeros(2, 1, 14, 14))
    with pytest.raises(ValueError, match="t must be a scalar"):
        s.q_sample(x, torch.tensor([1, 2, 3]), x)
    with pytest.raises(ValueError, match="variance"):
        s.step(x, 5, x, variance="learned")
    with pytest.raises(ValueError, match="unknown schedule"):
        NoiseSchedule(ScheduleConfig(kind="sigmoid"))
    with pytest.raises(ValueError, match="num_timesteps"):
        NoiseSchedule(ScheduleConfig(num_timesteps=0))
