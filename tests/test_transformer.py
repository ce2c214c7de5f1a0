"""The decoder-only transformer of Chapter 44: teacher forcing, generation with and without the KV cache,
the parameter count of a block."""

import pytest
import torch

from agm.nn import parameter_count
from agm.nn.transformer import (
    Block,
    Transformer,
    TransformerConfig,
    block_gradient_norms,
    counting_attention_pairs,
    generation_cost,
    parameter_formula,
    rotate,
    sinusoidal_shift,
    sinusoidal_table,
)


def small(**fields) -> Transformer:
    torch.manual_seed(0)
    fields = {"vocab_size": 6, "block_size": 16, "width": 16, "heads": 2, "layers": 2} | fields
    return Transformer(TransformerConfig(**fields)).eval()


def test_one_forward_pass_gives_the_logits_of_every_prefix():
    model = small()
    tokens = torch.randint(6, (3, 16), generator=torch.Generator().manual_seed(1))
    full = model(tokens)
    prefixwise = torch.stack([model(tokens[:, : t + 1])[:, -1] for t in range(16)], 1)
    assert torch.allclose(full, prefixwise, atol=1e-5)


@pytest.mark.parametrize("positions", ["learned", "rotary", "none"])
def test_cached_and_uncached_generation_draw_the_same_tokens(positions):
    model = small(positions=positions)
    prefix = torch.zeros(4, 1, dtype=torch.long)
    cached = model.generate(prefix, 15, torch.Generator().manual_seed(3))
    uncached = model.generate(prefix, 15, torch.Generator().manual_seed(3), use_cache=False)
    assert torch.equal(cached, uncached) and cached.shape == (4, 16)
    assert not torch.equal(cached, model.generate(prefix, 15, torch.Generator().manual_seed(4)))


def test_only_the_cached_path_feeds_one_token_at_a_time():
    """The switch changes the work: the first layer sees T = 1 per step with the cache, the whole sequence without."""
    model, seen = small(), []
    hook = model.blocks[0].attn.register_forward_hook(lambda m, args, out: seen.append(args[0].shape[1]))
    for use_cache, expected in ((True, [2] + [1] * 5), (False, [2, 3, 4, 5, 6, 7])):
        seen.clear()
        model.generate(torch.zeros(1, 2, dtype=torch.long), 6, torch.Generator().manual_seed(0), use_cache=use_cache)
        assert seen == expected
    hook.remove()


@pytest.mark.parametrize("width,ratio", [(8, 4), (32, 4), (24, 2)])
def test_a_block_has_4_plus_2r_width_squared_plus_r_plus_9_width_parameters(width, ratio):
    block = Block(TransformerConfig(width=width, heads=4, mlp_ratio=ratio))
    assert parameter_count(block) == (4 + 2 * ratio) * width**2 + (ratio + 9) * width


@pytest.mark.parametrize("changes", [{}, {"width": 32, "layers": 2}, {"width": 64, "mlp_ratio": 2},
                                     {"vocab_size": 17, "output_size": 16, "block_size": 64}])
def test_parameter_formula_counts_every_parameter(changes):
    config = TransformerConfig(**changes)
    assert parameter_formula(config) == parameter_count(Transformer(config))


@pytest.mark.parametrize("use_cache", [True, False])
def test_generation_cost_matches_pytorchs_flop_counter_and_the_pairs_each_layer_scores(use_cache):
    from torch.utils.flop_counter import FlopCounterMode

    torch.manual_seed(0)
    model = Transformer(TransformerConfig(vocab_size=9, output_size=8, block_size=16, width=16, heads=2, layers=2))
    with counting_attention_pairs(model) as pairs, FlopCounterMode(display=False) as counter:
        model.generate(torch.full((3, 1), 8), 7, torch.Generator().manual_seed(0), use_cache=use_cache)
    assert (counter.get_total_flops() // 3, sum(pairs)) == generation_cost(model.config, 7, use_cache)
    with counting_attention_pairs(model) as after:  # leaving the block removes its hooks
        pass
    model(torch.zeros(1, 3, dtype=torch.long))
    assert after == [] and all(not block.attn._forward_hooks for block in model.blocks)


@pytest.mark.parametrize("width", [16, 17])
@pytest.mark.parametrize("offset", [1, 5, 40, -3])
def test_a_fixed_rotation_moves_every_sinusoidal_row_offset_positions_on(width, offset):
    table = sinusoidal_table(100, width).double()  # (T, C)
    R = sinusoidal_shift(offset, width)
    p = torch.arange(max(0, -offset), min(100, 100 - offset))
    assert torch.allclose(table[p] @ R.T, table[p + offset], atol=1e-5)
    assert torch.allclose(R @ R.T, torch.eye(width, dtype=torch.float64), atol=1e-12)  # a rotation
    assert not torch.allclose(table[p] @ sinusoidal_shift(offset + 1, width).T, table[p + offset], atol=1e-2)


def test_rotary_scores_depend_only_on_the_difference_of_positions():
    g = torch.Generator().manual_seed(0)
    q, k = torch.randn(2, 3, 20, 8, generator=g, dtype=torch.float64).unbind(0)  # (H, T, d) each
    pos = torch.arange(20)
    scores = rotate(q, pos) @ rotate(k, pos).transpose(-1, -2)  # (H, T, T)
    shifted = rotate(q, pos + 57) @ rotate(k, pos + 57).transpose(-1, -2)
    assert torch.allclose(scores, shifted, atol=1e-4)
    m, n = 3, 11  # q_m . k_n = q_m . R_{n-m} k_n
    assert torch.allclose(scores[:, m, n], (q[:, m] * rotate(k[:, n : n + 1], torch.tensor([n - m]))[:, 0]).sum(-1))
    assert torch.allclose(rotate(q, pos).norm(dim=-1), q.norm(dim=-1))
    assert not torch.allclose(scores, q @ k.transpose(-1, -2), atol=1e-2)


@pytest.mark.parametrize("norm", ["pre", "post"])
def test_block_gradient_norms_are_the_norms_backward_gives_block_by_block(norm):
    model = small(norm=norm, layers=3).train()
    tokens = torch.randint(0, 6, (4, 10), generator=torch.Generator().manual_seed(1))
    loss = model(tokens).logsumexp(-1).mean()
    norms = block_gradient_norms(model, loss, retain_graph=True)
    assert all(p.grad is None for p in model.parameters())
    loss.backward()
    expected = [torch.cat([p.grad.flatten() for p in block.parameters()]).norm().item() for block in model.blocks]
    assert norms == pytest.approx(expected, rel=1e-5) and len(set(norms)) == 3


def test_without_residuals_a_dead_block_cuts_the_gradient_of_every_block_below_it():
    model = small(residual=False, layers=3)
    with torch.no_grad():
        for p in model.blocks[1].mlp[2].parameters():
            p.zero_()  # block 2 now outputs zeros whatever its input
    norms = block_gradient_norms(model, model(torch.randint(0, 6, (2, 8))).sum())
    assert norms[0] == 0 and norms[1] > 0 and norms[2] > 0
