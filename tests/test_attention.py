"""The attention weights of agm.nn.attention against torch's scaled_dot_product_attention, and the properties
Chapter 43 derives: causality, permutation equivariance, the parameter count of the head split."""

import pytest
import torch
import torch.nn.functional as F

from agm.nn import parameter_count
from agm.nn.attention import SelfAttention, attention_weights


def qkv(generator, B=2, H=3, T=7, S=7, d=5):
    q = torch.randn(B, H, T, d, generator=generator, dtype=torch.float64)
    k, v = (torch.randn(B, H, S, d, generator=generator, dtype=torch.float64) for _ in range(2))
    return q, k, v


@pytest.mark.parametrize("causal", [False, True])
def test_weights_times_values_match_scaled_dot_product_attention(generator, causal):
    """Oracle: softmax(q k^T / sqrt(d) + M) v is torch's fused attention, with and without the causal mask."""
    q, k, v = qkv(generator)
    ours = attention_weights(q, k, causal) @ v
    assert torch.allclose(ours, F.scaled_dot_product_attention(q, k, v, is_causal=causal), atol=1e-12)


def test_a_given_scale_matches_scaled_dot_product_attention(generator):
    q, k, v = qkv(generator, S=9)
    ours = attention_weights(q, k, scale=0.3) @ v
    assert torch.allclose(ours, F.scaled_dot_product_attention(q, k, v, scale=0.3), atol=1e-12)


def test_causal_queries_are_the_last_positions_when_there_are_fewer_queries_than_keys(generator):
    """With a cache the T new queries sit at positions S-T..S-1: they see every key up to their own."""
    q, k, v = qkv(generator, T=3, S=8)
    allowed = torch.ones(3, 8, dtype=torch.bool).tril(8 - 3)  # query i sees keys 0..5+i
    reference = F.scaled_dot_product_attention(q, k, v, attn_mask=allowed)
    assert torch.allclose(attention_weights(q, k, causal=True) @ v, reference, atol=1e-12)
    full_q = torch.cat([torch.randn(2, 3, 5, 5, generator=generator, dtype=torch.float64), q], 2)
    assert torch.allclose(attention_weights(q, k, True), attention_weights(full_q, k, True)[..., -3:, :])


def test_weights_are_a_distribution_with_nothing_on_later_positions(generator):
    q, k, _ = qkv(generator, T=6, S=6)
    w = attention_weights(q, k, causal=True)
    assert torch.allclose(w.sum(-1), torch.ones(2, 3, 6, dtype=torch.float64))
    past = torch.ones(6, 6, dtype=torch.bool).tril()
    assert (w[..., ~past] == 0).all() and (w[..., past] > 0).all()
    assert (attention_weights(q, k) > 0).all()  # unmasked: every position gets some weight


@pytest.mark.parametrize("causal", [False, True])
def test_the_layer_is_its_weights_times_its_values(causal):
    """SelfAttention.forward (fused kernel) equals out(concat_h W_h V_h) with the weights of .weights()."""
    torch.manual_seed(0)
    layer = SelfAttention(12, 3, causal=causal).double()
    h = torch.randn(2, 5, 12, dtype=torch.float64)
    _, _, v = layer.split_heads(h)
    by_weights = layer.out((layer.weights(h) @ v).transpose(1, 2).reshape(2, 5, 12))
    assert torch.allclose(layer(h), by_weights, atol=1e-12)


def test_causal_output_does_not_depend_on_later_inputs():
    torch.manual_seed(0)
    layer = SelfAttention(8, 2, causal=True).double()
    jac = torch.autograd.functional.jacobian(lambda x: layer(x[None])[0], torch.randn(6, 8, dtype=torch.float64))
    blocks = jac.pow(2).sum((1, 3))  # (T, T): |d y_i / d x_j|^2
    past = torch.ones(6, 6, dtype=torch.bool).tril()
    assert (blocks[~past] == 0).all() and (blocks[past] > 0).all()


def test_without_a_mask_attention_is_permutation_equivariant_and_with_one_it_is_not():
    torch.manual_seed(0)
    h, perm = torch.randn(1, 9, 8, dtype=torch.float64), torch.randperm(9)
    for causal, equivariant in ((False, True), (True, False)):
        layer = SelfAttention(8, 2, causal=causal).double()
        assert torch.allclose(layer(h[:, perm]), layer(h)[:, perm], atol=1e-12) == equivariant


@pytest.mark.parametrize("heads", [1, 2, 4, 8])
def test_parameter_count_is_four_width_squared_whatever_the_heads(heads):
    assert parameter_count(SelfAttention(16, heads)) == 4 * 16**2 + 4 * 16
