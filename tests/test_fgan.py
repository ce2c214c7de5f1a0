import copy
import shutil

import pytest
import torch

from agm import checkpoint, registry
from agm.cli import main
from agm.foundations import fdiv
from agm.foundations.fgan import FGAN, FGANConfig, critic_loss, generator_loss, train_step


def small(divergence="kl"):
    torch.manual_seed(0)
    return FGAN(FGANConfig(divergence=divergence, hidden=32, latent_dim=8))


def test_shapes_and_range():
    model = small()
    x = model.sample(5, torch.Generator().manual_seed(0))
    assert x.shape == (5, 1, 28, 28) and x.min() >= 0 and x.max() <= 1
    assert model.critic(x).shape == (5,)


def test_sampling_is_deterministic_under_a_seed():
    model = small()
    a = model.sample(4, torch.Generator().manual_seed(3))
    b = model.sample(4, torch.Generator().manual_seed(3))
    assert torch.equal(a, b)


@pytest.mark.parametrize("name", ["kl", "reverse-kl", "jensen-shannon", "gan"])
def test_critic_loss_is_minus_the_fenchel_bound(name):
    model = small(name).eval()  # eval: spectral norm's power iteration does not update weights
    real, fake = torch.rand(6, 1, 28, 28), torch.rand(6, 1, 28, 28)
    expected = -fdiv.fenchel_bound(name, model.critic(real), model.critic(fake))
    assert torch.allclose(critic_loss(model, real, fake), expected)
    d = fdiv.get(name)
    assert torch.allclose(generator_loss(model, fake), -d.activation(model.critic(fake)).mean())


def test_train_step_moves_both_networks_the_right_way():
    model = small("jensen-shannon")
    real = torch.zeros(16, 1, 28, 28)
    real[:, :, 10:18, 10:18] = 1.0
    opt_g = torch.optim.Adam(model.generator.parameters(), lr=1e-3)
    opt_c = torch.optim.Adam(model.critic.parameters(), lr=1e-3)
    g = torch.Generator().manual_seed(0)
    first = train_step(model, opt_g, opt_c, real, g)
    for _ in range(30):
        logs = train_step(model, opt_g, opt_c, real, g)
    assert logs["bound"] > first["bound"]  # the critic learns to tell the two apart

    # one more step: every tensor of both networks moves, and the generator's own step lowers its
    # loss against the critic it was taken against (both evaluated on the step's noise, critic frozen)
    before = copy.deepcopy(model)
    train_step(model, opt_g, opt_c, real, torch.Generator().manual_seed(5))
    for old, new in zip(before.parameters(), model.parameters(), strict=True):
        assert not torch.equal(old, new)
    z = torch.randn(len(real), 8, generator=torch.Generator().manual_seed(5))
    critic = model.critic.eval()
    before.critic = critic
    loss_before = generator_loss(before, before.generator(z)).item()
    loss_after = generator_loss(model, model.generator(z)).item()
    assert loss_after < loss_before


def test_unknown_divergence_fails_early():
    with pytest.raises(ValueError, match="unknown f-divergence"):
        FGAN(FGANConfig(divergence="earth-mover"))


def test_every_fgan_is_registered_with_a_verified_checkpoint():
    names = [n for n in registry.all_specs() if n.startswith("fgan-")]
    assert set(names) == {"fgan-kl", "fgan-reverse-kl", "fgan-jensen-shannon"}
    for name in names:
        assert checkpoint.status(name) == "verified", name
        model, manifest = registry.load_model(name)
        assert model.config.divergence == name.removeprefix("fgan-") == manifest.config["divergence"]


def test_train_and_sample_smoke(tmp_path, monkeypatch):
    for suffix in (".pt", ".json"):  # the metrics' classifier, beside the smoke checkpoint
        shutil.copy(checkpoint.paths("classifier")[0].with_suffix(suffix), tmp_path / f"classifier{suffix}")
    assert main(["train", "fgan-jensen-shannon", "--smoke", "--out-dir", str(tmp_path)]) == 0
    monkeypatch.setenv("AGM_CHECKPOINTS", str(tmp_path))
    out = tmp_path / "samples.pt"
    assert main(["sample", "fgan-jensen-shannon", "--n", "6", "--seed", "2", "--out", str(out)]) == 0
    images = torch.load(out, weights_only=True)["images"]
    assert images.shape == (6, 1, 28, 28) and 0 <= images.min() and images.max() <= 1 and images.std() > 0
