"""Classifier-free guidance: the guided prediction, label dropout, training on labels, the command line."""

import pytest
import torch
from torch import nn

from agm import checkpoint
from agm.cli import main
from agm.diffusion.ddpm import DDPM, DDPMConfig, sample, training_loss
from agm.diffusion.guidance import ClassifierFreeGuidance, drop_labels
from agm.diffusion.samplers import ddim_sample
from agm.diffusion.schedule import ScheduleConfig
from agm.nn.unet import UNetConfig


def conditional(p_uncond: float = 0.1) -> DDPM:
    # groups=2: with one channel per group, GroupNorm would remove the label embedding's shift entirely
    torch.manual_seed(0)
    return DDPM(DDPMConfig(unet=UNetConfig(channels=8, multipliers=(1, 1), groups=2, num_classes=10),
                           schedule=ScheduleConfig(num_timesteps=50), p_uncond=p_uncond)).eval()


class LabelNet(nn.Module):
    """eps = label value everywhere (null label -> 10): makes the guided combination readable."""

    def forward(self, x, t, labels=None):
        labels = torch.full_like(t, 10) if labels is None else labels
        return torch.ones_like(x) * labels.float()[:, None, None, None]


def test_guided_prediction_is_the_stated_linear_combination():
    net, labels, x, t = LabelNet(), torch.tensor([3, 7]), torch.zeros(2, 1, 4, 4), torch.tensor([5, 9])
    for w in (0.0, 0.5, 2.0, 4.0):
        out = ClassifierFreeGuidance(net, w)(x, t, labels)
        expected = (1 + w) * labels.float() - w * 10.0
        assert torch.allclose(out[:, 0, 0, 0], expected)
        # diffusers' form eps_u + s (eps_c - eps_u) with guidance_scale s = 1 + w
        assert torch.allclose(out[:, 0, 0, 0], 10.0 + (1 + w) * (labels.float() - 10.0))


def test_w_zero_is_the_conditional_and_w_minus_one_the_unconditional_model():
    model = conditional()
    x, t, y = torch.randn(4, 1, 28, 28), torch.tensor([0, 10, 25, 49]), torch.tensor([0, 3, 9, 4])
    with torch.no_grad():
        assert not torch.allclose(model(x, t, y), model(x, t), atol=1e-3)  # the label matters
        assert torch.allclose(ClassifierFreeGuidance(model, 0.0)(x, t, y), model(x, t, y), atol=1e-5)
        assert torch.allclose(ClassifierFreeGuidance(model, -1.0)(x, t, y), model(x, t), atol=1e-5)
        # no labels: the unconditional prediction whatever w is
        assert torch.allclose(ClassifierFreeGuidance(model, 3.0)(x, t), model(x, t), atol=1e-6)


def test_guided_model_runs_through_any_sampler_and_changes_the_sample():
    model, y = conditional(), torch.tensor([1, 8])
    x_T = torch.randn(2, 1, 28, 28, generator=torch.Generator().manual_seed(0))
    plain = ddim_sample(ClassifierFreeGuidance(model, 0.0), model.schedule, x_T, 5, labels=y)
    guided = ddim_sample(ClassifierFreeGuidance(model, 3.0), model.schedule, x_T, 5, labels=y)
    assert torch.allclose(plain, ddim_sample(model, model.schedule, x_T, 5, labels=y), atol=1e-5)
    assert not torch.allclose(plain, guided, atol=1e-3)


@pytest.mark.parametrize("w", [-1.5, float("nan")])
def test_bad_guidance_weight_is_refused(w):
    with pytest.raises(ValueError, match="guidance weight"):
        ClassifierFreeGuidance(LabelNet(), w)


def test_guided_labels_must_be_real_classes():
    guided = ClassifierFreeGuidance(LabelNet(), 1.0)
    with pytest.raises(ValueError, match="0..9"):
        guided(torch.zeros(1, 1, 2, 2), torch.tensor([3]), torch.tensor([10]))  # the null label is not a class
    with pytest.raises(ValueError, match="0..9"):
        guided(torch.zeros(1, 1, 2, 2), torch.tensor([3]), torch.tensor([-1]))


def test_drop_labels_rate_and_determinism():
    labels = torch.arange(20000) % 10
    dropped = drop_labels(labels, 0.1, 10, torch.Generator().manual_seed(0))
    rate = (dropped == 10).float().mean().item()
    assert abs(rate - 0.1) < 4 * (0.1 * 0.9 / len(labels)) ** 0.5  # within 4 standard errors
    kept = dropped != 10
    assert torch.equal(dropped[kept], labels[kept])  # a label is dropped or left alone, never changed
    assert torch.equal(dropped, drop_labels(labels, 0.1, 10, torch.Generator().manual_seed(0)))
    assert torch.equal(drop_labels(labels, 0.0, 10), labels)
    with pytest.raises(ValueError):
        drop_labels(labels, 1.5, 10)


def test_training_loss_trains_on_the_null_label_at_rate_p_uncond(monkeypatch):
    seen = []
    model = conditional(p_uncond=0.5)
    original = model.net.forward
    monkeypatch.setattr(model.net, "forward", lambda x, t, labels=None: seen.append(labels) or original(x, t, labels))
    x0, labels = torch.zeros(4000, 1, 28, 28), torch.arange(4000) % 10
    loss, _ = training_loss(model, x0[:2000], torch.Generator().manual_seed(1), labels[:2000])
    assert torch.isfinite(loss)
    rate = (seen[0] == 10).float().mean().item()
    assert 0.45 < rate < 0.55


def test_config_refuses_label_dropout_without_classes():
    with pytest.raises(ValueError, match="class-conditional"):
        DDPMConfig(p_uncond=0.1)
    with pytest.raises(ValueError, match="p_uncond"):
        DDPMConfig(unet=UNetConfig(num_classes=10), p_uncond=1.0)


def test_sample_refuses_guidance_on_an_unconditional_model():
    model = DDPM(DDPMConfig(unet=UNetConfig(channels=8, multipliers=(1, 1)),
                            schedule=ScheduleConfig(num_timesteps=50)))
    with pytest.raises(ValueError, match="class-conditional"):
        sample(model, 2, guidance=1.0, steps=2)


@pytest.fixture(scope="module")
def cfg_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("cfg")
    assert main(["train", "ddpm-cfg", "--smoke", "--out-dir", str(d)]) == 0
    return d


def test_command_line_draws_the_requested_label_with_guidance(cfg_dir, tmp_path, monkeypatch, capsys):
    from agm.diffusion import ddpm_cfg

    monkeypatch.setenv("AGM_CHECKPOINTS", str(cfg_dir))
    manifest = checkpoint.read_manifest("ddpm-cfg", cfg_dir)
    assert manifest.config["p_uncond"] == 0.1 and manifest.config["unet"]["num_classes"] == 10
    assert manifest.metrics["sample_guidance"] == ddpm_cfg.GUIDANCE and len(manifest.training["history"]) >= 1
    out = tmp_path / "c.pt"
    assert main(["sample", "ddpm-cfg", "--n", "3", "--label", "4", "--guidance", "2", "--steps", "4",
                 "--out", str(out)]) == 0
    drawn = torch.load(out, weights_only=True)
    assert drawn["labels"].tolist() == [4, 4, 4] and drawn["images"].shape == (3, 1, 28, 28)
    assert main(["sample", "ddpm-cfg", "--n", "2", "--guidance", "-2", "--out", str(out)]) == 2
    assert "guidance weight" in capsys.readouterr().err
    assert main(["sample", "ddpm-cfg", "--n", "2", "--label", "10", "--out", str(out)]) == 2
    with pytest.raises(SystemExit):  # the unconditional model has no --guidance option
        main(["sample", "ddpm", "--n", "2", "--guidance", "1", "--out", str(out)])


# -- classifier guidance ---------------------------------------------------------------------------

class ComponentPosterior(nn.Module):
    """The exact classifier of mixture data: log p(k | x_t) for each component k of a 1-D mixture."""

    def __init__(self, mixture, schedule):
        super().__init__()
        self.mixture, self.schedule = mixture, schedule

    def forward(self, x, t):
        abar = self.schedule.alpha_bar(int(t[0])).item()
        return self.mixture.log_components(x.reshape(-1), abar)[0].log_softmax(1).to(x.dtype)


def test_classifier_guidance_at_scale_one_is_the_exact_conditional_model():
    """∇log p_t(x) + ∇log p(k | x) = ∇log p_t(x | k): guiding the mixture's exact ε with its exact posterior
    over components gives the exact ε of the chosen component alone (Bayes' rule, no approximation)."""
    from agm.diffusion.guidance import ClassifierGuidance
    from agm.diffusion.schedule import NoiseSchedule
    from agm.diffusion.toy import ExactNoisePredictor, GaussianMixture1D

    schedule = NoiseSchedule()
    mixture = GaussianMixture1D(torch.tensor([-0.6, 0.5]), torch.tensor([0.15, 0.25]), torch.tensor([0.3, 0.7]))
    guided = ClassifierGuidance(ExactNoisePredictor(mixture, schedule), ComponentPosterior(mixture, schedule),
                                schedule, scale=1.0)
    x = torch.linspace(-2, 2, 41, dtype=torch.float64).view(-1, 1, 1, 1)
    for k in (0, 1):
        alone = ExactNoisePredictor(GaussianMixture1D(mixture.means[k : k + 1], mixture.stds[k : k + 1],
                                                      torch.ones(1)), schedule)
        for t in (0, 100, 600):
            tt, y = torch.full((41,), t), torch.full((41,), k)
            assert torch.allclose(guided(x, tt, y), alone(x, tt), atol=1e-8)
    unguided = ClassifierGuidance(guided.model, guided.classifier, schedule, scale=0.0)
    tt = torch.full((41,), 300)
    assert torch.allclose(unguided(x, tt, torch.zeros(41, dtype=torch.long)), guided.model(x, tt))


def test_classifier_guidance_bad_input():
    from agm.diffusion.guidance import ClassifierGuidance
    from agm.diffusion.noise_classifier import NoiseClassifier, NoiseClassifierConfig
    from agm.diffusion.schedule import NoiseSchedule

    classifier = NoiseClassifier(NoiseClassifierConfig(channels=8, multipliers=(1, 1)))
    model = conditional()
    with pytest.raises(ValueError, match="trained under"):
        ClassifierGuidance(model, classifier, model.schedule, 1.0)  # T = 50 here, 1000 for the classifier
    with pytest.raises(ValueError, match=">= 0"):
        ClassifierGuidance(model, classifier, NoiseSchedule(), -1.0)
    guided = ClassifierGuidance(lambda x, t: torch.zeros_like(x), classifier, NoiseSchedule(), 2.0)
    x, t = torch.randn(2, 1, 28, 28), torch.tensor([5, 900])
    with pytest.raises(ValueError, match="needs the labels"):
        guided(x, t)
    with pytest.raises(ValueError, match="0..9"):
        guided(x, t, torch.tensor([3, 10]))
    out = guided(x, t, torch.tensor([3, 4]))
    assert out.shape == x.shape and out.abs().sum() > 0  # the classifier's gradient moves the prediction


def test_noise_classifier_shapes_loss_and_accuracy_by_timestep():
    from agm.diffusion.noise_classifier import (
        NoiseClassifier,
        NoiseClassifierConfig,
        accuracy_by_timestep,
        noisy_classification_loss,
    )

    torch.manual_seed(0)
    model = NoiseClassifier(NoiseClassifierConfig(channels=8, multipliers=(1, 1)))
    x0, y = torch.rand(6, 1, 28, 28) * 2 - 1, torch.arange(6)
    loss, logs = noisy_classification_loss(model, x0, y, torch.Generator().manual_seed(0))
    assert loss.ndim == 0 and 0 <= logs["accuracy"] <= 1
    assert loss.item() == pytest.approx(torch.log(torch.tensor(10.0)).item(), rel=0.3)  # near uniform at init
    acc = accuracy_by_timestep(model, (x0 + 1) / 2, y, [0, 999], torch.Generator().manual_seed(0))
    assert len(acc) == 2 and all(0 <= a <= 1 for a in acc)
    with pytest.raises(ValueError, match="1, 28, 28"):
        model(torch.zeros(2, 3, 28, 28), torch.zeros(2, dtype=torch.long))


def test_ddpm_cfg_is_the_ddpm_with_labels_dropout_and_its_own_budget():
    from agm import registry
    from agm.config import to_dict
    from agm.diffusion import ddpm, ddpm_cfg

    cfg, base = to_dict(ddpm_cfg.config()), to_dict(ddpm.DDPMConfig(train=ddpm.default_training().budgeted(0)))
    assert cfg["p_uncond"] == ddpm_cfg.P_UNCOND > 0 and cfg["unet"]["num_classes"] == 10
    assert cfg["schedule"] == base["schedule"] and cfg["train"]["lr"] == base["train"]["lr"]
    spec = registry.get("ddpm-cfg")
    assert spec.conditional and spec.metric_sample_options()["guidance"] == ddpm_cfg.GUIDANCE
    shipped = registry.load_model("ddpm-cfg")[1].config
    assert shipped["p_uncond"] == ddpm_cfg.P_UNCOND and shipped["train"]["steps"] == ddpm_cfg.TRAIN_STEPS


def test_ddpm_cfg_metrics_use_the_sweeps_sampler_at_the_weight_the_stored_sweep_chooses():
    from agm.diffusion import ddpm_cfg, evaluations

    options = {k: v for k, v in ddpm_cfg.METRIC_SAMPLER.items() if k != "guidance"}
    assert options == evaluations.GUIDED_SAMPLER
    rows, _ = evaluations.stored_table("ddpm-cfg", evaluations.CFG)
    assert ddpm_cfg.GUIDANCE == evaluations.chosen_weight(rows)


def test_clean_classifier_on_noisy_images_sees_x_mapped_to_the_unit_interval_and_ignores_t():
    from agm.diffusion.noise_classifier import CleanOnNoisy
    from agm.diffusion.schedule import NoiseSchedule, ScheduleConfig

    seen = []

    class Spy(torch.nn.Module):
        def forward(self, images):
            seen.append(images)
            return images.flatten(1)[:, :10]

    model = CleanOnNoisy(Spy(), NoiseSchedule(ScheduleConfig()))
    x = torch.tensor([-3.0, -1.0, 0.0, 1.0, 2.0]).view(5, 1, 1, 1).expand(5, 1, 28, 28)
    first, second = model(x, torch.zeros(5, dtype=torch.long)), model(x, torch.full((5,), 999))
    assert torch.equal(first, second)
    assert seen[0][:, 0, 0, 0].tolist() == [0.0, 0.0, 0.5, 1.0, 1.0]
