"""ε, x_0 and v predictions: exact conversions, against diffusers, and inside the DDPM."""

import pytest
import torch
from diffusers import DDPMScheduler

from agm.diffusion import parameterization as P
from agm.diffusion.ddpm import DDPM, DDPMConfig, training_loss
from agm.diffusion.schedule import NoiseSchedule, ScheduleConfig
from agm.nn.unet import UNetConfig


def draws(seed=0):
    g = torch.Generator().manual_seed(seed)
    x0, eps = torch.randn(4, 1, 6, 6, generator=g, dtype=torch.float64), torch.randn(4, 1, 6, 6, generator=g,
                                                                                      dtype=torch.float64)
    abar = torch.tensor([0.9999, 0.7, 0.2, 4e-5], dtype=torch.float64).view(-1, 1, 1, 1)
    return x0, eps, abar, abar.sqrt() * x0 + (1 - abar).sqrt() * eps


@pytest.mark.parametrize("prediction", P.PREDICTIONS)
def test_every_parameterization_recovers_eps_and_x0_exactly(prediction):
    x0, eps, abar, xt = draws()
    out = P.target(prediction, x0, eps, abar)
    assert torch.allclose(P.to_epsilon(prediction, out, xt, abar), eps, atol=1e-9)
    assert torch.allclose(P.to_sample(prediction, out, xt, abar), x0, atol=1e-6)


def test_velocity_matches_diffusers_get_velocity():
    ref = DDPMScheduler(num_train_timesteps=1000, beta_schedule="linear")
    x0, eps, _, _ = draws(1)
    t = torch.tensor([0, 10, 500, 999])
    abar = NoiseSchedule().alphas_cumprod[t].view(-1, 1, 1, 1)
    assert torch.allclose(P.velocity(x0, eps, abar), ref.get_velocity(x0, eps, t).double(), atol=1e-5)


@pytest.mark.parametrize("prediction", ["sample", "v_prediction"])
def test_a_step_on_the_converted_eps_is_diffusers_step_for_that_prediction_type(prediction):
    ref = DDPMScheduler(num_train_timesteps=1000, beta_schedule="linear", prediction_type=prediction,
                        clip_sample=False, variance_type="fixed_small")
    schedule = NoiseSchedule()
    x0, eps = (v.float() for v in draws(2)[:2])  # float32, so that both draw the same step noise
    for t in (999, 400, 3):
        abar = schedule.alphas_cumprod[t].float()
        xt = abar.sqrt() * x0 + (1 - abar).sqrt() * eps
        out = 0.9 * P.target(prediction, x0, eps, abar)  # an imperfect network output of that type
        ours = schedule.step(P.to_epsilon(prediction, out, xt, abar), t, xt, torch.Generator().manual_seed(5),
                             clip_denoised=False)[0]
        theirs = ref.step(out, t, xt, generator=torch.Generator().manual_seed(5)).prev_sample
        assert torch.allclose(ours, theirs, atol=1e-4)


def test_score_of_gaussian_data_is_the_closed_form():
    """Data N(m, s²): E[ε | x_t] gives -ε/√(1-ā) = -(x_t - √ā m)/(ā s² + 1 - ā), the score of q_t."""
    m, s, abar = 0.3, 0.5, torch.tensor(0.4, dtype=torch.float64)
    xt = torch.linspace(-2, 2, 9, dtype=torch.float64)
    var = abar * s**2 + 1 - abar
    eps_star = (1 - abar).sqrt() * (xt - abar.sqrt() * m) / var
    assert torch.allclose(P.score(eps_star, abar), -(xt - abar.sqrt() * m) / var)


class TargetNet(torch.nn.Module):
    """Outputs the exact target of its prediction type for a known ε (x_0 recovered from x_t and ε)."""

    def __init__(self, prediction, schedule, eps):
        super().__init__()
        self.prediction, self.schedule, self.eps = prediction, schedule, eps

    def forward(self, xt, t, labels=None):
        abar = self.schedule.alphas_cumprod[t].view(-1, 1, 1, 1).float()
        x0 = (xt - (1 - abar).sqrt() * self.eps) / abar.sqrt()
        return P.target(self.prediction, x0, self.eps, abar)


@pytest.mark.parametrize("prediction", P.PREDICTIONS)
def test_ddpm_predicts_eps_and_trains_on_its_own_target(prediction):
    model = DDPM(DDPMConfig(unet=UNetConfig(channels=8, multipliers=(1, 1), groups=2),
                            schedule=ScheduleConfig(num_timesteps=100), prediction=prediction))
    x0 = torch.rand(3, 1, 28, 28) * 2 - 1
    g = torch.Generator().manual_seed(3)  # training_loss draws t, then ε, from its generator
    t, eps = torch.randint(100, (3,), generator=g), torch.randn(x0.shape, generator=g)
    model.net = TargetNet(prediction, model.schedule, eps)
    loss, logs = training_loss(model, x0, torch.Generator().manual_seed(3))
    assert torch.equal(logs["t"], t) and loss.item() < 1e-8
    assert torch.allclose(model(model.schedule.q_sample(x0, t, eps), t), eps, atol=1e-3)


def test_unknown_prediction_type_is_refused():
    with pytest.raises(ValueError, match="prediction"):
        DDPMConfig(prediction="score")
    with pytest.raises(ValueError, match="prediction"):
        P.to_epsilon("x0", torch.zeros(1), torch.zeros(1), torch.ones(1))


def test_registered_x0_and_v_models_are_ddpm_with_another_target():
    from agm.config import to_dict
    from agm.diffusion import ddpm, ddpm_prediction

    reference = to_dict(DDPMConfig(train=ddpm.default_training()))
    for name, prediction in {"ddpm-x0": "sample", "ddpm-v": "v_prediction"}.items():
        config = to_dict(ddpm_prediction.config(prediction))
        assert config["prediction"] == prediction
        config["prediction"], config["train"]["steps"], config["train"]["batch_size"] = (
            "epsilon", reference["train"]["steps"], reference["train"]["batch_size"])  # undo the smoke budget
        assert config == reference, name


@pytest.mark.parametrize("prediction", P.PREDICTIONS)
def test_each_target_mse_is_the_eps_mse_times_its_weight(prediction):
    g = torch.Generator().manual_seed(5)
    x0, eps, eps_hat = (torch.randn(4, 1, 28, 28, generator=g, dtype=torch.float64) for _ in range(3))
    abar = torch.tensor([0.9999, 0.5, 0.01, 4e-5], dtype=torch.float64).view(-1, 1, 1, 1)
    xt = abar.sqrt() * x0 + (1 - abar).sqrt() * eps
    x0_hat = P.to_sample("epsilon", eps_hat, xt, abar)
    truth, estimate = P.target(prediction, x0, eps, abar), P.target(prediction, x0_hat, eps_hat, abar)
    snr = abar / (1 - abar)  # the closed forms: 1, 1/SNR, 1 + 1/SNR
    expected = {"epsilon": torch.ones_like(snr), "sample": 1 / snr, "v_prediction": 1 + 1 / snr}[prediction]
    ratio = (estimate - truth).pow(2).sum((1, 2, 3)) / (eps_hat - eps).pow(2).sum((1, 2, 3))
    assert torch.allclose(ratio, expected.flatten(), rtol=1e-9)
    assert torch.allclose(P.epsilon_mse_weight(prediction, abar), expected, rtol=1e-6)


def test_errors_by_timestep_of_a_model_that_predicts_zero():
    from agm.diffusion.diagnostics import errors_by_timestep

    class Zero(torch.nn.Module):
        schedule = NoiseSchedule(ScheduleConfig())

        def forward(self, xt, t, labels=None):
            return torch.zeros_like(xt)

    x0 = torch.rand(64, 1, 28, 28) * 2 - 1
    timesteps = [0, 500, 999]
    errors = errors_by_timestep(Zero(), x0, timesteps, torch.Generator().manual_seed(0))
    abar = Zero.schedule.alphas_cumprod[timesteps]
    # ε̂ = 0: the ε-error is ε itself (unit variance), and the others follow by their weights
    assert errors["epsilon"] == pytest.approx([1.0] * 3, abs=0.02)
    for prediction in ("sample", "v_prediction"):
        weight = P.epsilon_mse_weight(prediction, abar).tolist()
        expected = [w * e for w, e in zip(weight, errors["epsilon"], strict=True)]
        assert errors[prediction] == pytest.approx(expected, rel=1e-3)
