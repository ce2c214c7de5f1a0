"""State-space layers: the discretization, the two modes of S4D, the selective scan, and the token model."""

import math

import pytest
import torch

from agm.autoregressive.ar_transformer import tokenize
from agm.ssm.layers import S4D, SelectiveSSM, discretize_zoh, parallel_scan, sequential_scan
from agm.ssm.model import SSMConfig, SSMModel


def test_zero_order_hold_matches_the_matrix_exponential_of_the_augmented_system():
    # exp([[A, B], [0, 0]] dt) = [[Ā, B̄], [0, 1]] (Van Loan): an independent route to the same numbers
    for A, B, dt in [(-0.7, 1.3, 0.2), (complex(-0.5, 3.0), complex(0.4, -1.0), 0.05)]:
        M = torch.tensor([[A, B], [0, 0]], dtype=torch.complex128) * dt
        E = torch.linalg.matrix_exp(M)
        dA, dB = discretize_zoh(torch.tensor(A, dtype=torch.complex128), torch.tensor(B, dtype=torch.complex128),
                                torch.tensor(dt, dtype=torch.float64))
        assert torch.allclose(dA, E[0, 0]) and torch.allclose(dB, E[0, 1])


def s4d(seed=0, channels=3, state=8):
    torch.manual_seed(seed)
    layer = S4D(channels, state).double()
    with torch.no_grad():
        layer.log_dt.fill_(-1.0)  # steps near 0.37: kernels that do not vanish within a few positions
    return layer


def test_s4d_kernel_is_c_times_powers_of_a_bar_times_b_bar():
    layer = s4d()
    dA, dB, C = layer.discrete()
    direct = torch.stack([2 * (C * dA ** l * dB).sum(-1).real for l in range(12)], 1)  # (H, L)
    assert torch.allclose(layer.kernel(12), direct, atol=1e-10)


def test_s4d_convolution_mode_equals_recurrent_mode_and_is_causal():
    layer = s4d()
    u = torch.randn(2, 20, 3, dtype=torch.float64)
    y = layer(u)
    state, steps = None, []
    for t in range(20):
        out, state = layer.step(u[:, t], state)
        steps.append(out)
    assert torch.allclose(y, torch.stack(steps, 1), atol=1e-9)
    assert torch.allclose(layer.recurrent(u), torch.stack(steps, 1), atol=1e-12)  # the same steps, as one call
    v = u.clone()
    v[:, 12:] += 1.0
    assert torch.allclose(layer(v)[:, :12], y[:, :12], atol=1e-9) and not torch.allclose(layer(v)[:, 12], y[:, 12])


def test_selective_scan_matches_an_explicit_loop_over_channels_and_states():
    torch.manual_seed(1)
    layer = SelectiveSSM(4, state=3).double()
    x = torch.randn(2, 6, 4, dtype=torch.float64)
    y = layer(x)
    delta, B, C = layer.parameters_at(x)  # (2, 6, 4), (2, 6, 3), (2, 6, 3)
    A = -torch.exp(layer.A_log)
    expected = torch.zeros_like(y)
    for b in range(2):
        for d in range(4):
            h = torch.zeros(3, dtype=torch.float64)
            for t in range(6):
                h = torch.exp(delta[b, t, d] * A[d]) * h + delta[b, t, d] * B[b, t] * x[b, t, d]
                expected[b, t, d] = (C[b, t] * h).sum() + layer.D[d] * x[b, t, d]
    assert torch.allclose(y, expected, atol=1e-10)


def test_selective_scan_with_constant_parameters_is_a_convolution(monkeypatch):
    torch.manual_seed(2)
    layer = SelectiveSSM(2, state=3).double()
    x = torch.randn(1, 8, 2, dtype=torch.float64)
    delta, B, C = torch.tensor([0.3, 0.7]).double(), torch.randn(3).double(), torch.randn(3).double()
    monkeypatch.setattr(layer, "parameters_at", lambda v: (delta.expand(*v.shape[:-1], 2), B.expand(*v.shape[:-1], 3),
                                                           C.expand(*v.shape[:-1], 3)))
    A = -torch.exp(layer.A_log)  # (2, 3)
    # kernel $K_l = \sum_n C_n e^{l \Delta A_n} \Delta B_n$ per channel
    K = torch.stack([(C * torch.exp(l * delta[:, None] * A) * delta[:, None] * B).sum(-1) for l in range(8)])  # (L, D)
    conv = torch.stack([sum(K[l] * x[0, t - l] for l in range(t + 1)) for t in range(8)])  # (L, D)
    with torch.no_grad():
        assert torch.allclose(layer(x)[0], conv + layer.D * x[0], atol=1e-10)


@pytest.mark.parametrize("kind", ["s4d", "selective"])
def test_token_model_teacher_forcing_equals_recurrent_sampling_path(kind):
    torch.manual_seed(0)
    model = SSMModel(SSMConfig(kind=kind, width=16, layers=2, state=4)).eval()
    tokens = model.sample_tokens(2, torch.tensor([3, 5]), torch.Generator().manual_seed(0))
    assert tokens.shape == (2, 196) and tokens.max() < 16
    with torch.no_grad():  # the logits of one pass, replayed one position at a time through the states
        logits = model(tokens, torch.tensor([3, 5]))
        token, states = model.context(2, torch.tensor([3, 5])), [None, None]
        for t in range(196):
            h = model.embed(token)
            for i, block in enumerate(model.blocks):
                h, states[i] = block.step(h, states[i])
            assert torch.allclose(model.head(model.norm(h)), logits[:, t], atol=1e-4)
            token = tokens[:, t]
    x = torch.bernoulli(torch.full((2, 1, 28, 28), 0.2), generator=torch.Generator().manual_seed(1))
    assert torch.allclose(model.log_prob(x), model.token_log_probs(tokenize(x, 2)).sum(1))


def test_token_model_refuses_bad_input():
    model = SSMModel(SSMConfig(width=8, layers=1, state=4))
    with pytest.raises(ValueError, match="tokens must be"):
        model(torch.zeros(2, 10, dtype=torch.long))
    with pytest.raises(ValueError, match="labels must be"):
        model.sample_tokens(2, torch.tensor([1, 11]))
    with pytest.raises(ValueError, match="kind must be"):
        SSMConfig(kind="lstm")
    with pytest.raises(ValueError, match="state must be even"):
        S4D(4, 5)


def test_parallel_scan_equals_the_sequential_recurrence_at_lengths_that_are_not_powers_of_two():
    g = torch.Generator().manual_seed(3)
    for length in (1, 2, 5, 16, 37):
        decay = torch.rand(2, length, 3, 4, generator=g, dtype=torch.float64)
        drive = torch.randn(2, length, 3, 4, generator=g, dtype=torch.float64)
        h, expected = torch.zeros(2, 3, 4, dtype=torch.float64), []
        for t in range(length):  # $h_t = a_t h_{t-1} + b_t$, $h_{-1} = 0$
            h = decay[:, t] * h + drive[:, t]
            expected.append(h)
        expected = torch.stack(expected, 1)
        assert torch.allclose(sequential_scan(decay, drive), expected, atol=1e-12)
        assert torch.allclose(parallel_scan(decay, drive), expected, atol=1e-12)


def test_selective_layer_gives_the_same_outputs_and_gradients_with_either_scan():
    torch.manual_seed(4)
    layer = SelectiveSSM(5, state=3).double()
    x = torch.randn(2, 11, 5, dtype=torch.float64, requires_grad=True)
    outputs, grads = {}, {}
    for scan in ("sequential", "parallel"):
        layer.scan = scan
        outputs[scan] = layer(x)
        grads[scan] = torch.autograd.grad(outputs[scan].square().sum(), [x, layer.A_log])
    assert torch.allclose(outputs["sequential"], outputs["parallel"], atol=1e-12)
    assert all(torch.allclose(a, b, atol=1e-10) for a, b in zip(grads["sequential"], grads["parallel"], strict=True))
    with pytest.raises(ValueError, match="scan must be one of"):
        SelectiveSSM(5, scan="blelloch")


@pytest.mark.parametrize("kind", ["s4d", "selective"])
def test_the_ssms_train_at_the_budget_of_the_transformer_baseline_they_are_compared_with(kind):
    from agm.autoregressive.ablations import variant_config
    from agm.ssm.model import budget_config

    ssm, transformer = budget_config(kind, seed=2), variant_config("pre-LN", seed=2)
    assert (ssm.width, ssm.layers, ssm.patch, ssm.p_uncond) == (transformer.width, transformer.layers,
                                                                 transformer.patch, transformer.p_uncond)
    assert ssm.train == transformer.train and ssm.train.seed == 2


def test_evaluate_full_stores_one_run_per_extra_seed_at_the_budget_and_resumes(tmp_path, monkeypatch):
    from agm import checkpoint
    from agm.ssm.model import SEEDS, SPECS

    monkeypatch.setenv("AGM_SMOKE", "1")
    monkeypatch.setenv("AGM_CHECKPOINTS", str(tmp_path))
    model = SSMModel(SSMConfig(width=16, layers=1, state=4))
    checkpoint.save("ssm", {"state_dict": model.state_dict()}, checkpoint.new_manifest("ssm", {}, 0, 0.0, {}), tmp_path)
    cells = SPECS["ssm"].evaluate_full(model)["seeds"]
    assert set(cells) == {f"seed{s}" for s in SEEDS}
    assert all(c["steps"] == 20 and c["test_nll_n"] == 100 and math.isfinite(c["test_nll_nats"])
               for c in cells.values())
    assert cells["seed1"]["curve"]["loss"] != cells["seed2"]["curve"]["loss"]  # the seed reaches the run
    assert checkpoint.read_manifest("ssm").metrics["seeds"] == cells
    monkeypatch.setattr("agm.autoregressive.ablations.run_config",
                        lambda *a: pytest.fail("a stored seed was trained again"))
    assert SPECS["ssm"].evaluate_full(model)["seeds"] == cells


def test_selective_step_sizes_start_log_uniform_between_dt_min_and_dt_max_as_in_mamba():
    torch.manual_seed(5)
    layer = SelectiveSSM(4000, state=2, dt_min=1e-3, dt_max=1e-1)
    dt = torch.nn.functional.softplus(layer.dt.bias.detach())  # Δ at a zero input
    assert dt.min() >= 1e-3 * (1 - 1e-4) and dt.max() <= 1e-1 * (1 + 1e-4)
    # log-uniform: the median is the geometric mean of the ends
    assert abs(dt.log().median().item() - 0.5 * (math.log(1e-3) + math.log(1e-1))) < 0.1
