"""Policy-gradient estimators measured exactly (agm.rl.enumerate, Chapter 50): the tabular policy against hand
computations and its own sampler, gradients against finite differences, and the estimators' means and variances
against closed forms."""

import numpy as np
import pytest
import torch

from agm.rl.enumerate import (
    BASELINES,
    TabularPolicy,
    all_sequences,
    batch_moments,
    exact_gradient,
    expected_return,
    moments,
    optimal_baseline,
    policy_gradient_estimates,
    rollout_gradient,
    score_vectors,
    sequence_index,
    total_variance,
)
from agm.rl.losses import leave_one_out_baseline, reinforce_loss

K, T = 3, 3  # 27 sequences, 3 + 9 + 27 = 39 parameters


@pytest.fixture
def policy():
    return TabularPolicy(K, T, torch.Generator().manual_seed(0))


def terminal(rewards: torch.Tensor) -> torch.Tensor:
    """(N, T) step rewards that are zero but at the last step, where they are ``rewards`` (N,)."""
    out = torch.zeros(len(rewards), T, dtype=torch.float64)
    out[:, -1] = rewards
    return out


def causal_step_rewards(seed: int = 3) -> torch.Tensor:
    """(K^T, T) rewards r_t(x_<=t): step t's reward depends on the sequence only through its first t + 1 tokens."""
    g = torch.Generator().manual_seed(seed)
    seqs = all_sequences(K, T)
    tables = [torch.randn((K,) * (t + 1), generator=g, dtype=torch.float64) for t in range(T)]
    return torch.stack([tables[t][tuple(seqs[:, :t + 1].T)] for t in range(T)], 1)


def log_reward(seed: int = 4) -> torch.Tensor:
    """A reward shaped like the book's, log sigmoid(a(x)) < 0 with a(x) ~ N(-2, 4): a log-probability."""
    g = torch.Generator().manual_seed(seed)
    return torch.nn.functional.logsigmoid(-2 + 2 * torch.randn(K**T, generator=g, dtype=torch.float64))


def test_sequences_are_listed_in_base_k_order_and_indexed_back():
    """Catches an enumeration whose row order disagrees with sequence_index (every table lookup would be wrong)."""
    seqs = all_sequences(K, T)
    assert seqs.shape == (K**T, T) and len(seqs.unique(dim=0)) == K**T
    assert seqs[5].tolist() == [0, 1, 2]  # 5 = 0·9 + 1·3 + 2
    assert torch.equal(sequence_index(seqs, K), torch.arange(K**T))


def test_sequence_log_probs_are_the_product_of_the_prefix_softmaxes(policy):
    """Catches a prefix indexed the wrong way (e.g. theta_2[x_1, x_0]) or a conditional on the wrong step."""
    x = torch.tensor([[2, 0, 1], [1, 1, 0]])
    by_hand = torch.stack([
        torch.stack([policy.logits[0].log_softmax(-1)[a], policy.logits[1][a].log_softmax(-1)[b],
                     policy.logits[2][a, b].log_softmax(-1)[c]]) for a, b, c in x.tolist()])
    assert torch.allclose(policy.token_log_probs(x), by_hand, atol=1e-12)
    assert policy.sequence_probs().sum().item() == pytest.approx(1.0, abs=1e-12)


def test_ancestral_samples_follow_the_enumerated_law(policy):
    """Catches a sampler that reads the logits of another prefix: frequencies of 200 000 draws within 5 standard
    errors of pi(x) for every sequence."""
    n = 200_000
    draws = policy.sample_tokens(n, generator=torch.Generator().manual_seed(1))
    freq = torch.bincount(sequence_index(draws, K), minlength=K**T).double() / n
    p = policy.sequence_probs().detach()
    assert ((freq - p).abs() / (p * (1 - p) / n).sqrt()).max() < 5


def test_exact_gradient_matches_central_finite_differences(policy):
    """Catches a gradient that misses a parameter or is detached from the enumerated expectation."""
    step_rewards = causal_step_rewards()
    exact = exact_gradient(policy, step_rewards)
    flat = torch.cat([p.detach().reshape(-1) for p in policy.parameters()])
    h, numeric = 1e-6, torch.empty_like(flat)
    for i in range(len(flat)):
        values = []
        for sign in (1, -1):
            shifted = flat.clone()
            shifted[i] += sign * h
            torch.nn.utils.vector_to_parameters(shifted, policy.parameters())
            values.append(expected_return(policy, step_rewards).item())
        numeric[i] = (values[0] - values[1]) / (2 * h)
    assert torch.allclose(exact, numeric, atol=1e-8)


def test_scores_match_finite_differences_and_have_mean_zero(policy):
    """Catches a wrong score (the sign, a token left out); the mean-zero identity E[grad log pi] = 0 is what makes
    a baseline harmless."""
    seqs = all_sequences(K, T)
    scores = score_vectors(policy, seqs)  # (27, 39)
    flat = torch.cat([p.detach().reshape(-1) for p in policy.parameters()])
    h, numeric = 1e-6, torch.empty_like(scores)
    for i in range(len(flat)):
        logs = []
        for sign in (1, -1):
            shifted = flat.clone()
            shifted[i] += sign * h
            torch.nn.utils.vector_to_parameters(shifted, policy.parameters())
            logs.append(policy.token_log_probs(seqs).sum(1).detach())
        numeric[:, i] = (logs[0] - logs[1]) / (2 * h)
    torch.nn.utils.vector_to_parameters(flat, policy.parameters())
    assert torch.allclose(scores, numeric, atol=1e-8)
    assert torch.allclose(score_vectors(policy, seqs, per_token=True).sum(1), scores, atol=1e-14)
    assert policy.sequence_probs().detach() @ scores == pytest.approx(torch.zeros(scores.shape[1]), abs=1e-14)


def test_score_function_estimate_averages_to_the_exact_gradient(policy):
    """Theorem: E_pi[R grad log pi] = grad E_pi[R], and so for the estimate with any constant baseline."""
    rewards = log_reward()
    exact = exact_gradient(policy, terminal(rewards))
    probs, scores = policy.sequence_probs().detach(), score_vectors(policy, all_sequences(K, T))
    for b in (0.0, -1.3):
        mean, _ = moments(probs, (rewards - b)[:, None] * scores)
        assert torch.allclose(mean, exact, atol=1e-14)


def test_reward_to_go_and_whole_return_are_both_unbiased_and_agree_for_a_terminal_reward(policy):
    """The policy gradient theorem with per-step rewards r_t(x_<=t): weighting each token's score by its
    reward-to-go keeps the mean at the exact gradient; a reward-to-go that dropped r_t (G_{t+1}) would not. With
    a terminal reward only, every G_t is R and the two estimates coincide."""
    seqs, probs = all_sequences(K, T), policy.sequence_probs().detach()
    token_scores = score_vectors(policy, seqs, per_token=True)  # (27, 3, 39)
    step_rewards = causal_step_rewards()
    exact = exact_gradient(policy, step_rewards)
    for to_go in (True, False):
        mean, _ = moments(probs, policy_gradient_estimates(token_scores, step_rewards, to_go))
        assert torch.allclose(mean, exact, atol=1e-13)
    shifted = torch.cat([step_rewards[:, 1:], torch.zeros(K**T, 1, dtype=torch.float64)], 1)  # G_{t+1} in place of G_t
    wrong, _ = moments(probs, (torch.flip(torch.flip(shifted, [1]).cumsum(1), [1])[..., None] * token_scores).sum(1))
    assert (wrong - exact).abs().max() > 1e-3
    rewards = log_reward()
    assert torch.allclose(policy_gradient_estimates(token_scores, terminal(rewards), True),
                          policy_gradient_estimates(token_scores, terminal(rewards), False), atol=1e-14)
    assert torch.allclose(policy_gradient_estimates(token_scores, terminal(rewards)),
                          rewards[:, None] * token_scores.sum(1), atol=1e-14)


@pytest.mark.parametrize("kind", BASELINES)
def test_rollout_gradient_is_minus_the_gradient_of_reinforce_loss(policy, kind):
    """Catches a sign or a scale (sum for mean) that differs between the page's estimate and the library's loss."""
    seqs = policy.sample_tokens(6, generator=torch.Generator().manual_seed(2))
    rewards = log_reward()[sequence_index(seqs, K)]
    baseline = {"none": 0.0, "mean": rewards.mean(), "leave-one-out": leave_one_out_baseline(rewards)}[kind]
    loss, _ = reinforce_loss(policy.token_log_probs(seqs), rewards, baseline)
    params = list(policy.parameters())
    by_loss = -torch.cat([g.reshape(-1) for g in torch.autograd.grad(loss, params)])
    assert torch.allclose(rollout_gradient(score_vectors(policy, seqs), rewards, baseline), by_loss, atol=1e-13)


def test_the_optimal_constant_baseline_and_its_saving_in_closed_form(policy):
    """V(b) = E[(R - b)^2 ||s||^2] - ||g||^2 is a parabola with vertex b* = E[R ||s||^2] / E||s||^2 and
    curvature E||s||^2: V(b) - V(b*) = (b - b*)^2 E||s||^2. Catches b* replaced by E[R]."""
    rewards = log_reward()
    probs, scores = policy.sequence_probs().detach(), score_vectors(policy, all_sequences(K, T))
    b_star = optimal_baseline(probs, scores, rewards)
    curvature = float(probs @ scores.pow(2).sum(1))
    v_star = moments(probs, (rewards - b_star)[:, None] * scores)[1]
    for b in (0.0, float(probs @ rewards), b_star - 0.5, b_star + 0.2):
        v = moments(probs, (rewards - b)[:, None] * scores)[1]
        assert v - v_star == pytest.approx((b - b_star) ** 2 * curvature, rel=1e-9, abs=1e-13)
    assert abs(b_star - float(probs @ rewards)) > 1e-3  # here b* is not E[R]: the check above can tell them apart


def test_batch_moments_against_closed_forms(policy):
    """Over every rollout of B independent draws: without a baseline the mean is the gradient and the variance
    that of one draw over B; leave-one-out keeps the mean (Kool et al., 2019); the rollout's own mean shrinks
    it by (B - 1) / B and is the leave-one-out estimate times that factor, variance included."""
    rewards = log_reward()
    probs, scores = policy.sequence_probs().detach(), score_vectors(policy, all_sequences(K, T))
    exact = exact_gradient(policy, terminal(rewards))
    single = moments(probs, rewards[:, None] * scores)[1]
    B = 3
    out = {kind: batch_moments(probs, scores, rewards, B, kind) for kind in BASELINES}
    assert torch.allclose(out["none"][0], exact, atol=1e-13)
    assert out["none"][1] == pytest.approx(single / B, rel=1e-10)
    assert torch.allclose(out["leave-one-out"][0], exact, atol=1e-13)
    assert torch.allclose(out["mean"][0], (B - 1) / B * exact, atol=1e-13)
    assert out["mean"][1] == pytest.approx(((B - 1) / B) ** 2 * out["leave-one-out"][1], rel=1e-10)
    assert out["leave-one-out"][1] < out["none"][1]  # rewards far from zero, as log-probabilities are
    one = batch_moments(probs, scores, rewards, 1, "none")
    assert torch.allclose(one[0], exact, atol=1e-13) and one[1] == pytest.approx(single, rel=1e-12)


def test_total_variance_is_the_trace_of_the_unbiased_sample_covariance():
    x = torch.randn(7, 4, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    assert total_variance(x) == pytest.approx(np.trace(np.cov(x.numpy(), rowvar=False)), rel=1e-12)
    with pytest.raises(ValueError, match="R >= 2"):
        total_variance(x[:1])


def test_bad_input_is_refused(policy):
    with pytest.raises(ValueError, match="no context labels"):
        policy.sample_tokens(2, torch.tensor([7, 7]))
    with pytest.raises(ValueError, match=r"\[B, 3\]"):
        policy.token_log_probs(torch.zeros(2, 4, dtype=torch.long))
    with pytest.raises(ValueError, match="0..2"):
        policy.token_log_probs(torch.full((2, 3), 3))
    with pytest.raises(ValueError, match="baseline must be one of"):
        batch_moments(torch.ones(2) / 2, torch.ones(2, 1), torch.ones(2), 2, "median")
