import pytest
import torch

from agm.nn import parameter_count
from agm.nn.unet import UNet, UNetConfig, timestep_embedding


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


def test_conditional_network_uses_labels_and_the_null_label():
    """labels None is the null label (index num_classes), the unconditional input of classifier-free guidance."""
    model = small(num_classes=10).eval()
    x, t = torch.randn(2, 1, 28, 28), torch.tensor([5, 6])
    with torch.no_grad():
        cond = model(x, t, torch.tensor([1, 2]))
        null = model(x, t, torch.tensor([10, 10]))
        assert cond.shape == (2, 1, 28, 28) and not torch.allclose(cond, null)
        assert torch.equal(model(x, t), null)
        torch.nn.init.normal_(model.label_emb.weight)  # distinct label embeddings give distinct predictions
        assert not torch.allclose(model(x, t, torch.tensor([1, 1])), model(x, t, torch.tensor([2, 2])))
    with pytest.raises(ValueError, match="labels must be"):
        model(x, t, torch.tensor([11, 0]))
    with pytest.raises(ValueError, match="not class-conditional"):
        small()(x, t, torch.tensor([1, 2]))


def test_latent_shaped_input_with_two_levels_and_odd_size():
    """A 4 x 7 x 7 latent: 7 -> 4 -> back to 7 (the transposed convolution's 8 is cropped)."""
    model = UNet(UNetConfig(in_channels=4, resolution=7, channels=16, groups=4, multipliers=(1, 2),
                            num_classes=10)).eval()
    x, t = torch.randn(3, 4, 7, 7), torch.tensor([0, 500, 999])
    out = model(x, t, torch.tensor([0, 10, 9]))
    assert out.shape == (3, 4, 7, 7) and torch.isfinite(out).all()
    with pytest.raises(ValueError, match=r"\[B, 4, 7, 7\]"):
        model(torch.randn(3, 1, 28, 28), t)


def test_attention_matches_torch_multihead_attention():
    """The shared layer with nn.MultiheadAttention's weights computes the same function (oracle)."""
    from agm.nn.attention import SelfAttention

    torch.manual_seed(0)
    ours, ref = SelfAttention(16, 4), torch.nn.MultiheadAttention(16, 4, batch_first=True)
    with torch.no_grad():
        ref.in_proj_weight.copy_(ours.qkv.weight)
        ref.in_proj_bias.copy_(ours.qkv.bias)
        ref.out_proj.weight.copy_(ours.out.weight)
        ref.out_proj.bias.copy_(ours.out.bias)
        h = torch.randn(3, 49, 16)
        assert torch.allclose(ours(h), ref(h, h, h, need_weights=False)[0], atol=1e-5)


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


def test_cost_per_resolution_counts_multiply_adds_by_hand():
    """One 3x3 convolution 1 -> 16 channels at 28x28 does 9 * 1 * 16 * 784 multiply-adds per image."""
    from agm.diffusion.diagnostics import cost_per_resolution

    class Stem(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = torch.nn.Conv2d(1, 16, 3, padding=1)
            self.down = torch.nn.Conv2d(16, 8, 3, stride=2, padding=1)

        def forward(self, x, t):
            return self.down(self.conv(x))

    cost = cost_per_resolution(Stem(), torch.randn(2, 1, 28, 28), torch.zeros(2, dtype=torch.long), repeats=1)
    assert cost[28]["multiply_adds"] == 9 * 16 * 784 and cost[14]["multiply_adds"] == 9 * 16 * 8 * 196
    assert list(cost) == [28, 14] and all(c["seconds"] > 0 for c in cost.values())


def test_cost_per_resolution_agrees_with_torch_flop_counter_on_the_unet():
    """Every convolution and transposed convolution of a U-Net: PyTorch counts 2 FLOPs per multiply-add."""
    from torch.utils.flop_counter import FlopCounterMode

    from agm.diffusion.diagnostics import cost_per_resolution

    net = UNet(UNetConfig(channels=8, multipliers=(1, 2, 2), attention=False))
    x, t = torch.randn(1, 1, 28, 28), torch.zeros(1, dtype=torch.long)
    ours = sum(c["multiply_adds"] for c in cost_per_resolution(net, x, t, repeats=1).values())
    counter = FlopCounterMode(display=False)
    with counter, torch.no_grad():
        net(x, t)
    convolutions = {str(op): n for op, n in counter.get_flop_counts()["Global"].items()}["aten.convolution"]
    assert ours == convolutions // 2
