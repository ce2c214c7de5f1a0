import pytest
import torch

from agm.diffusion.unet import UNet, UNetConfig, parameter_count, timestep_embedding


def small(**kw) -> UNet:
    torch.manual_seed(0)
    return UNet(UNetConfig(channels=16, groups=4, **kw))


@pytest.mark.parametrize("batch", [1, 2, 5])
def test_shapes_for_every_batch_size_and_timestep(batch):
    model = small().eval()
    for t in (0, 1, 500, 999):
        out = model(torch.randn(batch, 1, 28, 28), torch.full((batch,), t))
        assert out.shape == (batch, 1, 28, 28) and torch.isfinite(out).all()


def test_timestep_embedding():
    e = timestep_embedding(torch.tensor([0, 1, 999]), 32)
    assert e.shape == (3, 32)
    assert torch.allclose(e[0, :16], torch.ones(16)) and torch.allclose(e[0, 16:], torch.zeros(16))
    assert not torch.allclose(e[1], e[2])


def test_the_time_embedding_ablation_makes_the_network_blind_to_t():
    x = torch.randn(2, 1, 28, 28)
    blind, seeing = small(time_embedding=False).eval(), small().eval()
    t1, t2 = torch.tensor([3, 3]), torch.tensor([900, 900])
    assert torch.allclose(blind(x, t1), blind(x, t2))
    assert not torch.allclose(seeing(x, t1), seeing(x, t2))


def test_attention_ablation_removes_parameters():
    assert parameter_count(small(attention=False)) < parameter_count(small())


def test_conditional_network_needs_labels():
    model = small(num_classes=10).eval()
    x, t = torch.randn(2, 1, 28, 28), torch.tensor([5, 6])
    assert model(x, t, torch.tensor([1, 2])).shape == (2, 1, 28, 28)
    with pytest.raises(ValueError, match="pass labels"):
        model(x, t)


def test_bad_inputs_raise():
    model = small()
    with pytest.raises(ValueError, match=r"\[B, 1, 28, 28\]"):
        model(torch.randn(2, 28, 28), torch.tensor([1, 2]))
    with pytest.raises(ValueError, match="t must have shape"):
        model(torch.randn(2, 1, 28, 28), torch.tensor([1]))


def test_overfits_a_single_batch():
    torch.manual_seed(0)
    model = UNet(UNetConfig(channels=8, groups=4, blocks_per_level=1))
    g = torch.Generator().manual_seed(0)
    x, t = torch.randn(4, 1, 28, 28, generator=g), torch.randint(0, 1000, (4,), generator=g)
    target = torch.randn(4, 1, 28, 28, generator=g)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    first = None
    for _ in range(100):
        loss = ((model(x, t) - target) ** 2).mean()
        first = first if first is not None else loss.item()
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert loss.item() < 0.1 * first
