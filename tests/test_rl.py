"""Module 6's building blocks: returns and GAE, KL estimators, REINFORCE and PPO losses, TRPO's pieces, the value
head and rollouts — against loops, enumeration and hand computations."""

import copy
import itertools
import math

import pytest
import torch

from agm.autoregressive.ar_transformer import ARConfig, ARTransformer
from agm.nn.attention import KVCache
from agm.nn.transformer import Transformer, TransformerConfig
from agm.rl.advantages import discounted_returns, gae, normalize_advantages
from agm.rl.kl import kl_full, kl_k3, kl_log_ratio, kl_penalized_rewards
from agm.rl.losses import leave_one_out_baseline, ppo_policy_loss, reinforce_loss, value_loss
from agm.rl.policy import PolicyWithValue
from agm.rl.rollout import Rollout, collect_rollout, sequence_log_probs
from agm.rl.trpo import (
    backtracking_line_search,
    conjugate_gradient,
    fisher_vector_product,
    natural_gradient_step,
)

# -- returns and GAE, against plain loops --------------------------------------------------------------------


def loop_returns(rewards, gamma, bootstrap=None):
    out = []
    for b, row in enumerate(rewards.tolist()):
        g, G = 0.0 if bootstrap is None else bootstrap[b].item(), []
        for r in reversed(row):
            g = r + gamma * g
            G.insert(0, g)
        out.append(G)
    return torch.tensor(out, dtype=torch.float64)


def loop_gae(rewards, values, gamma, lam, bootstrap=None):
    """Schulman et al. (2016), eq. 16 summed directly: A_t = sum_l (gamma lam)^l delta_{t+l}."""
    B, T = rewards.shape
    out = []
    for b in range(B):
        v = values[b].tolist() + [0.0 if bootstrap is None else bootstrap[b].item()]
        deltas = [rewards[b, t].item() + gamma * v[t + 1] - v[t] for t in range(T)]
        out.append([sum((gamma * lam) ** l * deltas[t + l] for l in range(T - t)) for t in range(T)])
    return torch.tensor(out, dtype=torch.float64)


@pytest.mark.parametrize("with_bootstrap", [False, True])
def test_gae_and_returns_match_the_loop_oracles(with_bootstrap):
    g = torch.Generator().manual_seed(0)
    rewards, values = torch.randn(4, 7, generator=g, dtype=torch.float64), torch.randn(4, 7, generator=g,
                                                                                     dtype=torch.float64)
    bootstrap = torch.randn(4, generator=g, dtype=torch.float64) if with_bootstrap else None
    advantages, returns = gae(rewards, values, 0.9, 0.8, bootstrap)
    assert torch.allclose(advantages, loop_gae(rewards, values, 0.9, 0.8, bootstrap), atol=1e-12)
    assert torch.allclose(returns, advantages + values)
    assert torch.allclose(discounted_returns(rewards, 0.9, bootstrap), loop_returns(rewards, 0.9, bootstrap),
                          atol=1e-12)


def test_gae_with_lambda_one_is_return_minus_value_and_with_lambda_zero_the_td_error():
    g = torch.Generator().manual_seed(1)
    rewards, values = torch.randn(3, 5, generator=g, dtype=torch.float64), torch.randn(3, 5, generator=g,
                                                                                     dtype=torch.float64)
    a1, r1 = gae(rewards, values, 0.95, 1.0)
    assert torch.allclose(a1, discounted_returns(rewards, 0.95) - values) and torch.allclose(
        r1, discounted_returns(rewards, 0.95))
    a0, _ = gae(rewards, values, 0.95, 0.0)
    next_values = torch.cat([values[:, 1:], torch.zeros(3, 1, dtype=torch.float64)], 1)  # V(s_T) = 0: terminal
    assert torch.allclose(a0, rewards + 0.95 * next_values - values)


def test_a_terminal_reward_reaches_every_step_discounted():
    rewards = torch.tensor([[0.0, 0.0, 0.0, 2.0]])
    assert torch.allclose(discounted_returns(rewards, 0.5), torch.tensor([[0.25, 0.5, 1.0, 2.0]]))


def test_returns_and_gae_refuse_bad_shapes():
    with pytest.raises(ValueError, match=r"\(B, T\)"):
        discounted_returns(torch.zeros(5), 0.9)
    with pytest.raises(ValueError, match=r"values must have the shape of rewards \(B, T\)"):
        gae(torch.zeros(2, 5), torch.zeros(2, 4), 0.9, 0.9)
    with pytest.raises(ValueError, match=r"bootstrap must have shape \(B,\)"):
        gae(torch.zeros(2, 5), torch.zeros(2, 5), 0.9, 0.9, bootstrap=torch.zeros(5))
    with pytest.raises(ValueError, match="gamma"):
        discounted_returns(torch.zeros(2, 5), 1.5)


def test_normalized_advantages_have_mean_zero_and_unit_deviation():
    a = normalize_advantages(torch.tensor([[1.0, 2.0], [3.0, 10.0]]))
    assert a.mean().abs() < 1e-6 and (a.std() - 1).abs() < 1e-6 and a.argmax() == 3


# -- KL estimators, against enumeration of all 27 sequences ---------------------------------------------------

START, K, T = 3, 3, 3  # symbols 0..2 and a start token 3; sequences of 3 tokens


def toy_policy(seed: int) -> Transformer:
    torch.manual_seed(seed)
    return Transformer(TransformerConfig(vocab_size=K + 1, output_size=K, block_size=T, width=8, heads=2,
                                         layers=1)).eval()


def toy_logits(model: Transformer, tokens: torch.Tensor) -> torch.Tensor:
    inputs = torch.cat([torch.full((len(tokens), 1), START), tokens[:, :-1]], 1)
    return model(inputs)  # (B, T, K)


def gathered(logits, tokens):
    return logits.log_softmax(-1).gather(-1, tokens.unsqueeze(-1)).squeeze(-1)  # (B, T)


@torch.no_grad()
def estimators_on(pi: Transformer, ref: Transformer, tokens: torch.Tensor) -> dict[str, torch.Tensor]:
    logits, ref_logits = toy_logits(pi, tokens).double(), toy_logits(ref, tokens).double()
    logp, ref_logp = gathered(logits, tokens), gathered(ref_logits, tokens)
    return {"log_ratio": kl_log_ratio(logp, ref_logp), "k3": kl_k3(logp, ref_logp),
            "full": kl_full(logits, ref_logits), "seq_logp": logp.sum(-1), "seq_ref_logp": ref_logp.sum(-1)}


@pytest.fixture(scope="module")
def kl_example():
    pi, ref = toy_policy(0), toy_policy(1)
    every = torch.tensor(list(itertools.product(range(K), repeat=T)))  # (27, 3)
    exact = estimators_on(pi, ref, every)
    p = exact["seq_logp"].exp()
    assert abs(p.sum().item() - 1) < 1e-6  # the 27 sequences are all there is
    kl = (p * (exact["seq_logp"] - exact["seq_ref_logp"])).sum()
    return pi, ref, p, kl, exact


def test_every_kl_estimator_is_unbiased_by_enumeration(kl_example):
    _, _, p, kl, exact = kl_example
    assert kl > 0.5  # a KL worth estimating (0.89 nats)
    for name in ("log_ratio", "k3", "full"):
        assert torch.allclose((p * exact[name]).sum(), kl, atol=1e-9), name
    assert (exact["k3"] >= 0).all() and (exact["log_ratio"] < 0).any()  # k3 is never negative, k1 can be


def test_kl_estimators_match_the_exact_kl_over_samples(kl_example):
    pi, ref, _, kl, _ = kl_example
    inputs = torch.full((20_000, 1), START)
    tokens = pi.generate(inputs, T, torch.Generator().manual_seed(0))[:, 1:]
    est = estimators_on(pi, ref, tokens)
    for name in ("log_ratio", "k3", "full"):
        values = est[name]
        se = values.std() / math.sqrt(len(values))
        assert abs(values.mean() - kl) < 4 * se, (name, values.mean().item(), kl.item(), se.item())


def test_the_full_distribution_kl_has_lower_variance_than_the_log_ratio(kl_example):
    _, _, p, kl, exact = kl_example
    variance = {name: (p * (exact[name] - kl) ** 2).sum() for name in ("log_ratio", "full")}
    assert variance["full"] < 0.5 * variance["log_ratio"], variance


def test_kl_estimators_vanish_when_the_policy_is_the_reference():
    tokens = torch.randint(K, (5, T), generator=torch.Generator().manual_seed(0))
    est = estimators_on(toy_policy(0), toy_policy(0), tokens)
    assert all(est[name].abs().max() < 1e-6 for name in ("log_ratio", "k3", "full"))


def test_kl_penalized_rewards_sum_to_the_score_minus_beta_times_the_log_ratio():
    g = torch.Generator().manual_seed(0)
    logp, ref_logp, scores = -torch.rand(4, 6, generator=g), -torch.rand(4, 6, generator=g), torch.randn(4, generator=g)
    rewards = kl_penalized_rewards(scores, logp, ref_logp, kl_coef=0.1)
    assert torch.allclose(rewards.sum(1), scores - 0.1 * kl_log_ratio(logp, ref_logp))
    assert torch.allclose(rewards[:, :-1], -0.1 * (logp - ref_logp)[:, :-1])  # the score only at the last token
    with pytest.raises(ValueError, match=r"scores must have shape \(B,\)"):
        kl_penalized_rewards(scores[:3], logp, ref_logp, 0.1)


def test_kl_estimators_refuse_mismatched_shapes():
    with pytest.raises(ValueError, match=r"must both have shape \(B, T\)"):
        kl_log_ratio(torch.zeros(2, 3), torch.zeros(2, 4))
    with pytest.raises(ValueError, match=r"must both have shape \(B, T, K\)"):
        kl_full(torch.zeros(2, 3), torch.zeros(2, 3))


# -- REINFORCE ------------------------------------------------------------------------------------------------


def test_reinforce_gradient_is_the_score_function_estimator_by_hand():
    """Two independent binary tokens, p(x_t = 1) = sigmoid(theta_t), at theta = (log 3, 0): sigmoid = (0.75, 0.5).
    Sequences x1 = (1, 0), x2 = (0, 1) with rewards (3, 1) and baseline 2: advantages (1, -1).
    grad log p(x) = x - sigmoid(theta): for x1 (0.25, -0.5), for x2 (-0.75, 0.5).
    Score-function estimate of grad E[R]: (1/2)[1 * (0.25, -0.5) - 1 * (-0.75, 0.5)] = (0.5, -0.5);
    the loss's gradient is its negative, (-0.5, 0.5)."""
    theta = torch.tensor([math.log(3.0), 0.0], requires_grad=True)
    x = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    logprobs = -torch.nn.functional.binary_cross_entropy_with_logits(theta.expand(2, 2), x, reduction="none")
    loss, logs = reinforce_loss(logprobs, torch.tensor([3.0, 1.0]), baseline=2.0)
    loss.backward()
    assert torch.allclose(theta.grad, torch.tensor([-0.5, 0.5]))
    assert logs["reward"] == 2.0


def test_a_baseline_per_sequence_is_subtracted_row_by_row_and_gets_no_gradient():
    logprobs = torch.tensor([[-1.0, -2.0], [-0.5, -0.5], [-3.0, 0.0]], requires_grad=True)
    rewards = torch.tensor([1.0, 2.0, 6.0])
    baseline = leave_one_out_baseline(rewards)
    assert torch.allclose(baseline, torch.tensor([4.0, 3.5, 1.5]))  # means of the other two
    loss, _ = reinforce_loss(logprobs, rewards, baseline)
    loss.backward()
    # d loss / d logprobs[b, t] = -(R_b - b_b) / B, the same at every token of a sequence
    assert torch.allclose(logprobs.grad, (-(rewards - baseline) / 3).unsqueeze(1).expand(3, 2))


def test_reinforce_refuses_bad_shapes():
    with pytest.raises(ValueError, match=r"logprobs \(B, T\) and rewards \(B,\)"):
        reinforce_loss(torch.zeros(3, 2), torch.zeros(2))
    with pytest.raises(ValueError, match=r"baseline must be a number or have shape \(B,\)"):
        reinforce_loss(torch.zeros(3, 2), torch.zeros(3), torch.zeros(2))
    with pytest.raises(ValueError, match="B >= 2"):
        leave_one_out_baseline(torch.zeros(1))


# -- PPO ------------------------------------------------------------------------------------------------------


def test_ppo_loss_is_the_plain_surrogate_when_every_ratio_is_inside_the_band():
    g = torch.Generator().manual_seed(0)
    old = -torch.rand(4, 5, generator=g)
    new = (old + 0.15 * (torch.rand(4, 5, generator=g) - 0.5)).requires_grad_()  # |log r| < 0.075 < log 1.2
    advantages = torch.randn(4, 5, generator=g)
    loss, logs = ppo_policy_loss(new, old, advantages, clip_coef=0.2)
    surrogate = -((new - old).exp() * advantages).mean()
    assert torch.allclose(loss, surrogate)
    (grad,) = torch.autograd.grad(loss, new)
    (grad_surrogate,) = torch.autograd.grad(surrogate, new)
    assert torch.allclose(grad, grad_surrogate)
    assert logs["clipfrac"] == 0 and logs["ratio_outside"] == 0


def test_ppo_gradient_vanishes_exactly_where_the_clip_binds_and_clipfrac_counts_those():
    ratio = torch.tensor([1.5, 1.5, 0.5, 0.5, 1.1])
    advantages = torch.tensor([1.0, -1.0, -1.0, 1.0, 1.0])
    # clip binds: r > 1 + eps with A > 0 (token 0), r < 1 - eps with A < 0 (token 2)
    binds = torch.tensor([True, False, True, False, False])
    new = ratio.log().requires_grad_()
    loss, logs = ppo_policy_loss(new, torch.zeros(5), advantages, clip_coef=0.2)
    (grad,) = torch.autograd.grad(loss, new)
    # where it does not bind the token's term is -A r / N, whose derivative in log r is -A r / N
    assert torch.allclose(grad, torch.where(binds, 0.0, -advantages * ratio / 5))
    assert logs["clipfrac"] == pytest.approx(2 / 5) and logs["ratio_outside"] == pytest.approx(4 / 5)
    # the loss's value: the clipped terms -1.2 (token 0) and 0.8 (token 2), the others -A r
    assert loss.item() == pytest.approx((-1.2 + 1.5 + 0.8 - 0.5 - 1.1) / 5)


def test_ppo_approx_kl_by_hand():
    """log r = (log 2, -log 2): r = (2, 1/2); (r - 1) - log r = (1 - log 2, -1/2 + log 2), mean 1/4;
    the mean of -log r is 0."""
    old = torch.tensor([-1.0, -1.0])
    new = old + torch.tensor([math.log(2.0), -math.log(2.0)])
    _, logs = ppo_policy_loss(new, old, torch.ones(2), clip_coef=0.2)
    assert logs["approx_kl"].item() == pytest.approx(0.25, abs=1e-6)
    assert logs["old_approx_kl"].item() == pytest.approx(0.0, abs=1e-6)


def test_ppo_loss_refuses_mismatched_shapes():
    with pytest.raises(ValueError, match="same shape"):
        ppo_policy_loss(torch.zeros(2, 3), torch.zeros(2, 3), torch.zeros(2), 0.2)


def test_value_loss_unclipped_and_clipped_by_hand():
    values, returns = torch.tensor([1.0, 1.0], requires_grad=True), torch.tensor([2.0, 0.5])
    plain, logs = value_loss(values, returns)
    assert plain.item() == pytest.approx(0.5 * (1.0 + 0.25) / 2)
    # old values 0, eps 0.2: clipped values 0.2; errors (1, 0.25) unclipped and (3.24, 0.09) clipped;
    # the larger: 3.24 (clipped: no gradient) and 0.25 (unclipped: gradient 0.5 * 2 * (1 - 0.5) / 2 = 0.25)
    clipped, logs = value_loss(values, returns, old_values=torch.zeros(2), clip_coef=0.2)
    assert clipped.item() == pytest.approx(0.5 * (3.24 + 0.25) / 2)
    (grad,) = torch.autograd.grad(clipped, values)
    assert torch.allclose(grad, torch.tensor([0.0, 0.25]))
    assert logs["value_clipfrac"] == 0.5
    with pytest.raises(ValueError, match="both old_values and clip_coef"):
        value_loss(values, returns, old_values=torch.zeros(2))


def test_explained_variance_is_one_for_perfect_values_and_zero_for_the_mean():
    returns = torch.tensor([1.0, 2.0, 4.0])
    assert value_loss(returns.clone(), returns)[1]["explained_variance"] == 1.0
    assert value_loss(returns.mean().expand(3), returns)[1]["explained_variance"].abs() < 1e-6


# -- TRPO -----------------------------------------------------------------------------------------------------


def test_conjugate_gradient_solves_a_random_spd_system():
    g = torch.Generator().manual_seed(0)
    M = torch.randn(8, 8, generator=g, dtype=torch.float64)
    A, b = M @ M.T + 0.5 * torch.eye(8, dtype=torch.float64), torch.randn(8, generator=g, dtype=torch.float64)
    x = conjugate_gradient(lambda v: A @ v, b, iters=8, tol=0.0)
    assert torch.allclose(x, torch.linalg.solve(A, b), atol=1e-8)
    few = conjugate_gradient(lambda v: A @ v, b, iters=2)
    assert (A @ few - b).norm() > 1e-3  # two products are not enough: the iteration count is honoured


def softmax_policy_kl(states: torch.Tensor, old_W: torch.Tensor, W: torch.Tensor) -> torch.Tensor:
    """Mean over states of KL(pi_old || pi_W), pi_W(. | s) = softmax(s W): a linear policy of 6 parameters."""
    log_old, log_new = (states @ old_W).log_softmax(-1), (states @ W).log_softmax(-1)
    return (log_old.exp() * (log_old - log_new)).sum(-1).mean()


def test_fisher_vector_product_is_the_hessian_of_the_kl_times_v():
    g = torch.Generator().manual_seed(0)
    states = torch.randn(5, 2, generator=g, dtype=torch.float64)
    W = torch.nn.Parameter(torch.randn(2, 3, generator=g, dtype=torch.float64))
    v = torch.randn(6, generator=g, dtype=torch.float64)
    old_W = W.detach().clone()
    fvp = fisher_vector_product(lambda: softmax_policy_kl(states, old_W, W), [W], v, damping=0.1)
    H = torch.autograd.functional.hessian(lambda w: softmax_policy_kl(states, old_W, w), W.detach()).reshape(6, 6)
    assert torch.allclose(fvp, H @ v + 0.1 * v, atol=1e-10)
    assert H.abs().max() > 1e-2  # a Hessian that is not zero


def test_fisher_vector_product_of_a_categorical_is_diag_p_minus_p_p_transpose():
    """Logits theta of one categorical: the Fisher matrix is diag(p) - p p^T (closed form)."""
    theta = torch.nn.Parameter(torch.tensor([0.3, -1.0, 2.0], dtype=torch.float64))
    old = theta.detach().clone()
    p = old.softmax(-1)

    def kl():
        return (p * (old.log_softmax(-1) - theta.log_softmax(-1))).sum()

    v = torch.tensor([1.0, 2.0, -1.0], dtype=torch.float64)
    assert torch.allclose(fisher_vector_product(kl, [theta], v), (torch.diag(p) - p.outer(p)) @ v, atol=1e-12)


def test_natural_gradient_step_puts_the_quadratic_kl_at_max_kl():
    g = torch.Generator().manual_seed(0)
    M = torch.randn(4, 4, generator=g, dtype=torch.float64)
    F, grad = M @ M.T + torch.eye(4, dtype=torch.float64), torch.randn(4, generator=g, dtype=torch.float64)
    step, expected = natural_gradient_step(grad, lambda v: F @ v, max_kl=0.01, cg_iters=4)
    assert (0.5 * step @ F @ step).item() == pytest.approx(0.01)
    direction = -torch.linalg.solve(F, grad)
    assert torch.allclose(step / step.norm(), direction / direction.norm(), atol=1e-8)
    assert expected > 0 and torch.allclose(expected, -(grad @ step))


def quadratic_problem():
    """f(x) = |x - target|^2 / 2 from x = 0, 'KL' |x|^2 / 2; |target|^2 = 4, so the full step has KL 2."""
    target = torch.tensor([2.0, 0.0])
    return (lambda x: 0.5 * (x - target).square().sum()), (lambda x: 0.5 * x.square().sum()), target


def test_line_search_shrinks_a_step_that_breaks_the_kl_limit():
    f, kl, target = quadratic_problem()
    # KL(a * target) = 2 a^2 <= 0.1 first at a = 1/8 (1/4 gives 0.125); there f drops 2 - 2 (7/8)^2 = 0.46875,
    # above 0.1 * (1/8) * 4, a tenth of the expected first-order decrease
    x, logs = backtracking_line_search(f, torch.zeros(2), target, expected_improvement=4.0, max_kl=0.1, kl_fn=kl)
    assert logs["accepted"] and logs["backtracks"] == 3 and logs["step_fraction"] == 0.125
    assert torch.allclose(x, target / 8) and logs["kl"] <= 0.1
    assert logs["improvement"] == pytest.approx(0.46875)


def test_line_search_accepts_a_step_within_the_limit_and_refuses_one_that_does_not_improve():
    f, kl, target = quadratic_problem()
    x, logs = backtracking_line_search(f, torch.zeros(2), target, 4.0, max_kl=10.0, kl_fn=kl)
    assert logs["accepted"] and logs["step_fraction"] == 1.0 and torch.equal(x, target)
    start = torch.zeros(2)
    x, logs = backtracking_line_search(f, start, -target, 4.0, max_kl=10.0, kl_fn=kl)  # uphill: f only grows
    assert not logs["accepted"] and torch.equal(x, start)
    # overshooting to 2.1 * target makes f worse at a = 1; a = 1/2 lands near the minimum and is accepted
    x, logs = backtracking_line_search(f, start, 2.1 * target, 8.4, max_kl=10.0, kl_fn=kl)
    assert logs["accepted"] and logs["backtracks"] == 1



def test_line_search_refuses_a_decrease_short_of_a_tenth_of_the_expected_one():
    f, kl, target = quadratic_problem()
    # a claimed first-order decrease of 100: a fraction a of the step gains 2 - 2 (1 - a)^2 < 0.1 * a * 100 always
    x, logs = backtracking_line_search(f, torch.zeros(2), target, 100.0, max_kl=10.0, kl_fn=kl)
    assert not logs["accepted"] and torch.equal(x, torch.zeros(2))
    x, logs = backtracking_line_search(f, torch.zeros(2), target, 100.0, max_kl=10.0, kl_fn=kl, accept_ratio=0.0)
    assert logs["accepted"] and logs["step_fraction"] == 1.0
    # with accept_ratio 0 only "the loss decreased" remains: a step along which the loss is flat still fails it
    x, logs = backtracking_line_search(lambda x: torch.tensor(1.0), torch.zeros(2), target, 0.0, max_kl=10.0, kl_fn=kl,
                                       accept_ratio=0.0)
    assert not logs["accepted"]

# -- the value head and the transformer's final hidden states ----------------------------------------------------


@pytest.mark.parametrize("norm", ["pre", "post"])
def test_the_head_of_the_final_hidden_states_is_the_forward_pass(norm):
    torch.manual_seed(0)
    model = Transformer(TransformerConfig(vocab_size=7, block_size=10, width=16, heads=2, layers=2, norm=norm)).eval()
    tokens = torch.randint(7, (3, 10), generator=torch.Generator().manual_seed(0))
    features = model.features(tokens)
    assert features.shape == (3, 10, 16) and torch.equal(model.head(features), model(tokens))
    h = model.embed(tokens)  # by hand: embeddings, blocks, then the final LayerNorm (pre) or nothing (post)
    for block in model.blocks:
        h = block(h)
    assert torch.allclose(features, model.ln(h) if norm == "pre" else h, atol=1e-6)
    cache = KVCache()  # and through the KV cache, position by position
    parts = [model.features(tokens[:, :4], cache)] + [model.features(tokens[:, i:i + 1], cache) for i in range(4, 10)]
    assert torch.allclose(torch.cat(parts, 1), features, atol=1e-5)


def tiny_ar(seed: int = 0) -> ARTransformer:
    torch.manual_seed(seed)
    return ARTransformer(ARConfig(width=16, layers=1, heads=2)).eval()


def random_tokens(n: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(16, (n, 196), generator=torch.Generator().manual_seed(seed))


def test_policy_with_value_gives_the_policy_logits_and_keeps_its_parameter_names():
    policy = tiny_ar()
    actor_critic = PolicyWithValue(policy)
    tokens, labels = random_tokens(3), torch.tensor([7, 0, 3])
    logits, values = actor_critic(tokens, labels)
    assert torch.allclose(logits, policy(tokens, labels), atol=1e-6) and values.shape == (3, 196)
    assert torch.allclose(actor_critic.token_log_probs(tokens), policy.token_log_probs(tokens), atol=1e-6)
    keys = set(actor_critic.state_dict())
    assert keys == {f"policy.{k}" for k in policy.state_dict()} | {"value_head.weight", "value_head.bias"}
    actor_critic.policy.load_state_dict(tiny_ar(seed=1).state_dict())  # a checkpoint of the policy loads as is


def test_the_value_of_position_t_depends_only_on_the_context_and_earlier_tokens():
    actor_critic = PolicyWithValue(tiny_ar())
    torch.nn.init.normal_(actor_critic.value_head.weight)
    tokens = random_tokens(2)
    changed = tokens.clone()
    changed[:, 100] = (changed[:, 100] + 1) % 16
    _, v1 = actor_critic(tokens)
    _, v2 = actor_critic(changed)
    assert torch.allclose(v1[:, :101], v2[:, :101], atol=1e-6)  # V(s_t), t <= 100, has not seen token 100
    assert not torch.allclose(v1[:, 101:], v2[:, 101:])
    _, v_label = actor_critic(tokens, torch.tensor([1, 2]))
    assert not torch.allclose(v1[:, 0], v_label[:, 0])  # the first state is the context token alone


# -- rollouts ---------------------------------------------------------------------------------------------------


def test_sequence_log_probs_in_chunks_match_one_pass_and_stay_differentiable():
    policy, tokens, labels = tiny_ar(), random_tokens(5), torch.tensor([0, 1, 2, 3, 4])
    whole = sequence_log_probs(policy, tokens, labels)
    assert whole.shape == (5, 196) and whole.requires_grad
    assert torch.allclose(whole, policy.token_log_probs(tokens, labels))
    assert torch.allclose(sequence_log_probs(policy, tokens, labels, batch_size=2), whole, atol=1e-6)
    with pytest.raises(ValueError, match=r"\(B, T\)"):
        sequence_log_probs(policy, tokens[0], labels)


def first_token_reward(tokens, labels):
    return (tokens[:, 0] == 0).float()


def test_a_rollout_records_the_sampled_tokens_log_probs_values_and_rewards():
    actor_critic, reference = PolicyWithValue(tiny_ar(0)), tiny_ar(1)
    labels = torch.tensor([1, 7, 7, 2])
    rollout = collect_rollout(actor_critic, reference, first_token_reward, 4, labels, torch.Generator().manual_seed(0))
    again = collect_rollout(actor_critic, reference, first_token_reward, 4, labels, torch.Generator().manual_seed(0))
    assert torch.equal(rollout.tokens, again.tokens) and torch.equal(rollout.logprobs, again.logprobs)
    assert torch.equal(rollout.tokens, actor_critic.policy.sample_tokens(4, labels, torch.Generator().manual_seed(0)))
    assert torch.allclose(rollout.logprobs, actor_critic.policy.token_log_probs(rollout.tokens, labels), atol=1e-6)
    assert torch.allclose(rollout.ref_logprobs, reference.token_log_probs(rollout.tokens, labels), atol=1e-6)
    assert rollout.values.shape == (4, 196) and torch.equal(rollout.rewards, first_token_reward(rollout.tokens, None))
    assert not rollout.logprobs.requires_grad
    half = rollout.select(torch.tensor([0, 2]))
    assert len(half) == 2 and torch.equal(half.labels, labels[[0, 2]])
    assert torch.equal(half.values, rollout.values[[0, 2]]) and torch.equal(half.tokens, rollout.tokens[[0, 2]])


def test_a_rollout_against_a_copy_of_the_policy_has_zero_kl_and_no_values():
    policy = tiny_ar()
    rollout = collect_rollout(policy, copy.deepcopy(policy), first_token_reward, 3,
                              generator=torch.Generator().manual_seed(0))
    assert rollout.values is None and rollout.labels is None
    assert kl_log_ratio(rollout.logprobs, rollout.ref_logprobs).abs().max() < 1e-5


def test_a_rollout_refuses_mismatched_shapes():
    tokens = torch.zeros(3, 5, dtype=torch.long)
    with pytest.raises(ValueError, match=r"needs ref_logprobs of shape \[3, 5\]"):
        Rollout(tokens, None, torch.zeros(3, 5), torch.zeros(3, 4), None, torch.zeros(3))
    with pytest.raises(ValueError, match=r"needs rewards of shape \[3\]"):
        Rollout(tokens, None, torch.zeros(3, 5), torch.zeros(3, 5), None, torch.zeros(3, 1))
