"""DDPM: EMA, respacing, the ancestral sampler, the bound estimator and the command line."""

import math

import pytest
import torch
from diffusers import DDPMScheduler
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
    training_loss,
)
from agm.diffusion.schedule import NoiseSchedule, ScheduleConfig
from agm.metrics import nats_to_bits_per_dim
from agm.train import EMA


def tiny(num_timesteps: int = 1000, **kw) -> DDPM:
    torch.manual_seed(0)
    return DDPM(DDPMConfig(channels=8, multipliers=(1, 1, 1), num_timesteps=num_timesteps, **kw)).eval()


class ZeroNet(nn.Module):
    """Predicts no noise at all: the sampler must then reproduce the schedule's own recursion."""

    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.zeros(()))

    def forward(self, x, t):
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


def test_respaced_steps_match_diffusers_ddpm_with_fewer_inference_steps():
    """diffusers' DDPMScheduler.set_timesteps(S) takes the same kind of shortened chain ("trailing" spacing
    puts the first step at T-1, as ours); compare one step at each kept timestep with a fixed model output."""
    s = NoiseSchedule()
    ref = DDPMScheduler(num_train_timesteps=1000, clip_sample=False, timestep_spacing="trailing")
    ref.set_timesteps(10)
    ref_tau = sorted(int(t) for t in ref.timesteps)
    g = torch.Generator().manual_seed(0)
    xt, eps = torch.randn(2, 1, 28, 28, generator=g), torch.randn(2, 1, 28, 28, generator=g)
    ours_sched = NoiseSchedule(ScheduleConfig(num_timesteps=10),
                               betas=1 - s.alphas_cumprod[ref_tau] / torch.cat(
                                   [torch.ones(1, dtype=torch.float64), s.alphas_cumprod[ref_tau][:-1]]))
    for i, t in enumerate(ref_tau):
        if i == 0:
            continue  # diffusers adds noise on its last step (its t = 99 > 0); ours adds none at the end
        prev, _ = ours_sched.step(eps, i, xt, torch.Generator().manual_seed(7), variance="beta_tilde")
        expected = ref.step(eps, t, xt, generator=torch.Generator().manual_seed(7)).prev_sample
        assert torch.allclose(prev, expected, atol=1e-4, rtol=1e-4), t


# -- sampler ----------------------------------------------------------------------------------------

def test_sampler_shapes_range_determinism_and_trajectory():
    model = tiny(num_timesteps=20)
    a, traj = sample_chain(model, 3, torch.Generator().manual_seed(1), keep=5)
    b, _ = sample_chain(model, 3, torch.Generator().manual_seed(1))
    assert a.shape == (3, 1, 28, 28) and 0 <= a.min() and a.max() <= 1
    assert torch.equal(a, b)
    assert [t for t, _ in traj] == [20, 15, 10, 5, 0]
    assert torch.equal(traj[-1][1], a)


def test_zero_noise_prediction_follows_the_posterior_mean_recursion():
    """With eps_theta = 0 and no noise at t = 0, one step from x_1 is x_0_hat = x_1 / sqrt(alpha_bar_0)."""
    model = tiny(num_timesteps=1)
    model.net = ZeroNet()
    g = torch.Generator().manual_seed(3)
    x1 = torch.randn((2, 1, 28, 28), generator=torch.Generator().manual_seed(3))
    out, _ = sample_chain(model, 2, g)
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


# -- training ------------------------------------------------------------------------------------------

def test_training_loss_is_l_simple_and_reports_timesteps():
    model = tiny(num_timesteps=50)
    x0 = torch.rand(6, 1, 28, 28) * 2 - 1
    loss, t, mse = training_loss(model, x0, torch.Generator().manual_seed(0), per_example=True)
    assert t.shape == (6,) and ((0 <= t) & (t < 50)).all()
    assert loss.item() == pytest.approx(mse.mean().item(), rel=1e-5)


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
    exact = torch.stack([bound_terms(model, images, torch.Generator().manual_seed(s))["total"] for s in range(30)])
    mixed = torch.stack([bound_terms(model, images, torch.Generator().manual_seed(500 + s), timesteps_per_image=1,
                                     exact_below=2)["total"] for s in range(120)])
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
    out = tmp_path / "d.pt"
    assert main(["sample", "ddpm", "--n", "4", "--steps", "10", "--variance", "beta", "--out", str(out)]) == 0
    images = torch.load(out, weights_only=True)["images"]
    assert images.shape == (4, 1, 28, 28)
    with pytest.raises(SystemExit):
        main(["sample", "ddpm", "--n", "4", "--variance", "learned", "--out", str(out)])


def test_sample_rejects_bad_steps(smoke_dir, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("AGM_CHECKPOINTS", str(smoke_dir))
    assert main(["sample", "ddpm", "--n", "2", "--steps", "0", "--out", str(tmp_path / "x.pt")]) == 2
    assert "steps must lie in 1..1000" in capsys.readouterr().err
