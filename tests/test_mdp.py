"""Chapter 49's MDP machinery: policy evaluation three ways, value iteration, and the value of a prefix of the token
MDP — against a hand-computed case, each other, enumeration of every deterministic policy, and exact logits."""

import itertools

import pytest
import torch

from agm.autoregressive.ar_transformer import ARConfig, ARTransformer
from agm.rl.mdp import (
    TabularMDP,
    action_values,
    bellman_operator,
    chain_mdp,
    continue_prefixes,
    evaluate_policy,
    greedy_policy,
    iterative_policy_evaluation,
    monte_carlo_returns,
    prefix_values,
    random_mdp,
    sample_rows,
    truncation_horizon,
    value_iteration,
)


def random_policy(mdp: TabularMDP, generator: torch.Generator) -> torch.Tensor:
    p = torch.rand(mdp.states, mdp.actions, generator=generator, dtype=torch.float64) + 0.1
    return p / p.sum(-1, keepdim=True)


@pytest.fixture
def example():
    g = torch.Generator().manual_seed(0)
    mdp = random_mdp(4, 3, 0.8, g)
    return mdp, random_policy(mdp, g)


# -- policy evaluation --------------------------------------------------------------------------------------------


def test_two_state_values_match_the_hand_computed_inverse():
    """Catches a wrong linear system (P_pi transposed, gamma missing): a 2x2 inverse by hand, one action."""
    p, q, gamma, r0, r1 = 0.3, 0.6, 0.9, 1.0, -2.0
    P = torch.tensor([[[1 - p, p]], [[q, 1 - q]]], dtype=torch.float64)  # (2, 1, 2)
    mdp = TabularMDP(P, torch.tensor([[r0], [r1]], dtype=torch.float64), gamma)
    a, b, c, d = 1 - gamma * (1 - p), -gamma * p, -gamma * q, 1 - gamma * (1 - q)  # I - gamma P
    det = a * d - b * c
    expected = torch.tensor([(d * r0 - b * r1) / det, (-c * r0 + a * r1) / det], dtype=torch.float64)
    V = evaluate_policy(mdp, torch.ones(2, 1, dtype=torch.float64))
    assert torch.allclose(V, expected, atol=1e-12)


def test_the_linear_solve_is_the_fixed_point_of_the_iterated_bellman_operator(example):
    """Catches a Bellman operator or a solve that disagree: after k sweeps from 0 the error is <= gamma^k |V|."""
    mdp, pi = example
    V = evaluate_policy(mdp, pi)
    iterates = iterative_policy_evaluation(mdp, pi, 150)
    errors = (iterates - V).abs().max(1).values
    assert torch.allclose(bellman_operator(mdp, pi, V), V, atol=1e-12)
    assert (errors <= mdp.gamma ** torch.arange(151) * V.abs().max() + 1e-12).all()
    assert errors[-1] < 1e-12


def test_the_bellman_operator_is_a_gamma_contraction_in_the_sup_norm(example):
    """Catches a discount applied to the reward or not at all: |T U - T V| <= gamma |U - V|, nearly tight."""
    mdp, pi = example
    g = torch.Generator().manual_seed(1)
    U, V = torch.randn(mdp.states, generator=g, dtype=torch.float64), torch.randn(mdp.states, generator=g,
                                                                                  dtype=torch.float64)
    gap = (bellman_operator(mdp, pi, U) - bellman_operator(mdp, pi, V)).abs().max()
    assert gap <= mdp.gamma * (U - V).abs().max() + 1e-12
    shift = torch.full((mdp.states,), 1.0, dtype=torch.float64)  # a constant shift contracts by exactly gamma
    assert torch.allclose(bellman_operator(mdp, pi, V + shift) - bellman_operator(mdp, pi, V), mdp.gamma * shift)


def test_monte_carlo_returns_match_the_linear_solve_within_their_standard_error(example):
    """Catches a simulation that samples the wrong rows or discounts wrongly: the mean return from each state is
    within 4 standard errors of V^pi, plus the truncation bound of the horizon."""
    mdp, pi = example
    n, tol = 4000, 1e-4
    horizon = truncation_horizon(mdp.gamma, mdp.r.abs().max().item(), tol)
    starts = torch.arange(mdp.states).repeat_interleave(n)
    G = monte_carlo_returns(mdp, pi, starts, horizon, torch.Generator().manual_seed(2)).view(mdp.states, n)
    V = evaluate_policy(mdp, pi)
    se = G.std(1) / n ** 0.5
    assert ((G.mean(1) - V).abs() < 4 * se + tol).all()


def test_monte_carlo_returns_are_shaped_like_the_starts_and_repeat_under_a_seed(example):
    """Catches a simulation that ignores its generator (the chapter's numbers would change from build to build)."""
    mdp, pi = example
    starts = torch.tensor([0, 3, 3, 1, 2])
    first = monte_carlo_returns(mdp, pi, starts, 10, torch.Generator().manual_seed(3))
    again = monte_carlo_returns(mdp, pi, starts, 10, torch.Generator().manual_seed(3))
    other = monte_carlo_returns(mdp, pi, starts, 10, torch.Generator().manual_seed(4))
    assert first.shape == (5,) and torch.equal(first, again) and not torch.equal(first, other)


def test_a_horizon_of_zero_steps_returns_nothing_and_one_step_the_first_reward():
    """Catches an off-by-one in the discount exponent: one step of a deterministic policy earns r(s, a) undiscounted."""
    mdp = chain_mdp(n=3, slip=0.0, near=0.5, far=2.0, gamma=0.5)
    right = torch.tensor([[0.0, 1.0]] * 3, dtype=torch.float64)
    starts = torch.tensor([0, 1, 2])
    assert torch.equal(monte_carlo_returns(mdp, right, starts, 0), torch.zeros(3, dtype=torch.float64))
    assert torch.allclose(monte_carlo_returns(mdp, right, starts, 1), mdp.r[:, 1])
    # two steps to the right from cell 1: r(1) + gamma r(2) = 0 + 0.5 * 2
    assert monte_carlo_returns(mdp, right, torch.tensor([1]), 2).item() == pytest.approx(1.0)


def test_sample_rows_draws_each_index_with_its_probability():
    """Catches an inverse-CDF off by one: frequencies within 4 standard errors of the probabilities."""
    probs = torch.tensor([0.1, 0.0, 0.6, 0.3], dtype=torch.float64)
    n = 40_000
    draws = sample_rows(probs.expand(n, 4), torch.Generator().manual_seed(5))
    freq = torch.bincount(draws, minlength=4).double() / n
    assert ((freq - probs).abs() <= 4 * (probs * (1 - probs) / n).sqrt() + 1e-12).all()
    assert freq[1] == 0


def test_truncation_horizon_is_the_fewest_steps_that_bound_the_tail():
    """Catches a horizon too short for the stated tolerance, or needlessly long."""
    gamma, r_max, tol = 0.9, 2.0, 1e-3
    H = truncation_horizon(gamma, r_max, tol)
    assert gamma ** H * r_max / (1 - gamma) <= tol < gamma ** (H - 1) * r_max / (1 - gamma)


def test_advantages_average_to_zero_under_the_policy(example):
    """Catches action values that are not those of V^pi: E_{a~pi}[Q(s, a) - V(s)] = 0 in every state."""
    mdp, pi = example
    V = evaluate_policy(mdp, pi)
    A = action_values(mdp, V) - V[:, None]
    assert torch.allclose((pi * A).sum(-1), torch.zeros(mdp.states, dtype=torch.float64), atol=1e-12)
    assert A.abs().max() > 1e-3  # the advantages themselves are not all zero


# -- value iteration ----------------------------------------------------------------------------------------------


def test_value_iteration_beats_or_ties_every_deterministic_policy():
    """Catches a wrong optimality operator (min, a missing max, no discount): on a 3-state, 3-action MDP the
    values of all 27 deterministic policies lie below V*, and the best of them attains it."""
    mdp = random_mdp(3, 3, 0.7, torch.Generator().manual_seed(6))
    V_star, policy, _ = value_iteration(mdp, tol=1e-12)
    eye = torch.eye(3, dtype=torch.float64)
    values = torch.stack([evaluate_policy(mdp, eye[list(choice)])
                          for choice in itertools.product(range(3), repeat=3)])  # (27, S)
    assert (values <= V_star + 1e-9).all()
    assert torch.allclose(values.max(0).values, V_star, atol=1e-9)
    assert torch.allclose(evaluate_policy(mdp, policy), V_star, atol=1e-9)


def test_value_iteration_returns_the_greedy_policy_of_its_values_and_a_fixed_point():
    """Catches a returned policy that is not greedy for the returned values, or values that are not T*'s fixed point."""
    mdp = random_mdp(5, 2, 0.9, torch.Generator().manual_seed(7))
    V_star, policy, sweeps = value_iteration(mdp, tol=1e-12)
    Q = action_values(mdp, V_star)
    assert torch.equal(policy, greedy_policy(Q)) and (policy.sum(-1) == 1).all()
    assert torch.allclose(Q.max(-1).values, V_star, atol=1e-10)  # the Bellman optimality equation
    assert sweeps > 1


def test_the_chain_moves_as_documented_and_its_optimal_policy_depends_on_gamma():
    """Catches a chain whose actions are swapped or whose slip goes the wrong way; with a short horizon (gamma 0.5)
    the near reward wins in the left cell, with a long one (0.9) every cell heads right."""
    mdp = chain_mdp(n=4, slip=0.2)
    assert mdp.P[1, 0, 0] == pytest.approx(0.8) and mdp.P[1, 0, 2] == pytest.approx(0.2)
    assert mdp.P[3, 1, 3] == pytest.approx(0.8) and mdp.P[0, 0, 0] == pytest.approx(0.8)
    assert value_iteration(chain_mdp(gamma=0.9))[1].argmax(-1).tolist() == [1] * 5
    assert value_iteration(chain_mdp(gamma=0.5))[1].argmax(-1)[0].item() == 0


def test_bad_mdps_and_policies_raise():
    """Catches silent acceptance of a kernel or policy that is not a distribution, gamma outside [0, 1), bad shapes."""
    P = torch.full((3, 2, 3), 1 / 3, dtype=torch.float64)
    r = torch.zeros(3, 2, dtype=torch.float64)
    with pytest.raises(ValueError, match="probability"):
        TabularMDP(P * 1.1, r, 0.9)
    with pytest.raises(ValueError, match="shape"):
        TabularMDP(P[:, :, :2], r, 0.9)
    with pytest.raises(ValueError, match="shape"):
        TabularMDP(P, r[:2], 0.9)
    for gamma in (1.0, -0.1):
        with pytest.raises(ValueError, match="gamma"):
            TabularMDP(P, r, gamma)
    mdp = TabularMDP(P, r, 0.9)
    with pytest.raises(ValueError, match="probability"):
        evaluate_policy(mdp, torch.full((3, 2), 0.6, dtype=torch.float64))
    with pytest.raises(ValueError, match="shape"):
        evaluate_policy(mdp, torch.full((3, 3), 1 / 3, dtype=torch.float64))
    with pytest.raises(ValueError, match="shape"):
        action_values(mdp, torch.zeros(2, dtype=torch.float64))
    with pytest.raises(ValueError, match="starts"):
        monte_carlo_returns(mdp, torch.full((3, 2), 0.5, dtype=torch.float64), torch.tensor([3]), 5)
    with pytest.raises(ValueError, match="sweeps"):
        iterative_policy_evaluation(mdp, torch.full((3, 2), 0.5, dtype=torch.float64), -1)


# -- the token MDP --------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    return ARTransformer(ARConfig(width=16, layers=1, heads=2)).eval()


def mean_token(tokens: torch.Tensor, labels=None) -> torch.Tensor:
    return tokens.double().mean(1)


def test_a_full_length_prefix_is_valued_at_exactly_its_reward(tiny):
    """Catches sampling after a finished sequence or scoring something else: V(s_T) = R(x), with zero error."""
    x = torch.randint(0, tiny.symbols, (3, tiny.length), generator=torch.Generator().manual_seed(8))
    result = prefix_values(tiny, mean_token, x, 4)
    assert torch.equal(result.values, mean_token(x)) and torch.equal(result.standard_errors, torch.zeros(3,
                                                                                                     dtype=torch.float64))
    assert torch.equal(result.tokens, x[:, None].expand(3, 4, tiny.length))


@pytest.mark.parametrize("with_labels", [False, True])
def test_the_value_one_token_from_the_end_is_the_policy_average_of_the_reward(tiny, with_labels):
    """Catches continuations drawn from the wrong context or position: with one token left,
    V(s_{T-1}) = sum_k pi(k | s_{T-1}) R(prefix, k), from the logits, within 4 standard errors."""
    g = torch.Generator().manual_seed(9)
    x = torch.randint(0, tiny.symbols, (2, tiny.length), generator=g)
    labels = torch.tensor([3, 8]) if with_labels else None
    last = lambda tokens, labels=None: tokens[:, -1].double()  # R = the value of the last token  # noqa: E731
    result = prefix_values(tiny, last, x[:, :-1], 3000, g, labels)
    with torch.no_grad():
        probs = tiny(x, labels)[:, -1].softmax(-1).double()  # (2, K): pi(. | s_{T-1})
    exact = (probs * torch.arange(tiny.symbols)).sum(-1)
    assert ((result.values - exact).abs() < 4 * result.standard_errors).all()
    assert torch.equal(result.tokens[..., :-1], x[:, None, :-1].expand(2, 3000, tiny.length - 1))


def test_continuations_keep_the_prefix_and_repeat_under_a_seed_in_chunks(tiny):
    """Catches chunks that lose or reorder rows: every completion starts with its own prefix."""
    prefixes = torch.randint(0, tiny.symbols, (2, 5), generator=torch.Generator().manual_seed(10))
    one = continue_prefixes(tiny, prefixes, 3, torch.Generator().manual_seed(11), chunk=2)
    again = continue_prefixes(tiny, prefixes, 3, torch.Generator().manual_seed(11), chunk=2)
    assert one.shape == (2, 3, tiny.length) and torch.equal(one[..., :5], prefixes[:, None].expand(2, 3, 5))
    assert torch.equal(one, again)
    assert not torch.equal(one[:, 0], one[:, 1])  # the continuations differ from one another
    empty = continue_prefixes(tiny, prefixes[:, :0], 2, torch.Generator().manual_seed(12))  # t = 0: the context alone
    assert empty.shape == (2, 2, tiny.length)


def test_prefix_values_refuse_bad_prefixes(tiny):
    """Catches prefixes longer than a sequence, without a batch dimension or not token ids, and n = 0."""
    with pytest.raises(ValueError, match="prefixes"):
        continue_prefixes(tiny, torch.zeros(2, tiny.length + 1, dtype=torch.long), 2)
    with pytest.raises(ValueError, match="prefixes"):
        continue_prefixes(tiny, torch.zeros(5, dtype=torch.long), 2)
    with pytest.raises(ValueError, match="prefixes"):
        continue_prefixes(tiny, torch.zeros(2, 3), 2)
    with pytest.raises(ValueError, match="n >= 1"):
        prefix_values(tiny, mean_token, torch.zeros(2, 3, dtype=torch.long), 0)
