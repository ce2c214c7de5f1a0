"""Fine-tuning a token policy (Chapters 50–53): the policy-gradient estimators and the KL-regularized optimum by
enumeration on a two-step policy, conjugate gradient against the explicit Fisher system, and the four updates of
:mod:`agm.rl.finetune` on a small transformer."""

import copy
import itertools
import math

import pytest
import torch

from agm.autoregressive.ar_transformer import ARConfig
from agm.rl import finetune
from agm.rl.finetune import DigitReward, FinetuneConfig, PPOConfig, TRPOConfig
from agm.rl.kl import kl_full
from agm.rl.losses import leave_one_out_baseline, reinforce_loss
from agm.rl.policy import PolicyWithValue
from agm.rl.rollout import collect_rollout
from agm.rl.trpo import conjugate_gradient, fisher_vector_product
from agm.train import NonFiniteLossError

# -- a two-step categorical policy, small enough to enumerate -------------------------------------------------

K = 3  # symbols per step; sequences (a1, a2): 9 of them
REWARD = torch.tensor([[1.0, -0.5, 2.0], [0.0, 3.0, -1.0], [0.5, 0.5, 4.0]], dtype=torch.float64)


def two_step(theta1: torch.Tensor, theta2: torch.Tensor):
    """log pi(a1) (K,) and log pi(a2 | a1) (K, K) of the policy with logits theta1 (K,) and theta2 (K, K)."""
    return theta1.log_softmax(-1), theta2.log_softmax(-1)


def sequences():
    return list(itertools.product(range(K), repeat=2))


def per_token_log_probs(theta1, theta2, seq) -> torch.Tensor:
    """(1, 2): log pi(a1), log pi(a2 | a1) of one sequence — the (B, T) layout of the book's losses."""
    l1, l2 = two_step(theta1, theta2)
    return torch.stack([l1[seq[0]], l2[seq[0], seq[1]]])[None]


@pytest.fixture
def params():
    g = torch.Generator().manual_seed(0)
    return (torch.randn(K, generator=g, dtype=torch.float64).requires_grad_(),
            torch.randn(K, K, generator=g, dtype=torch.float64).requires_grad_())


def exact_gradient(theta1, theta2) -> torch.Tensor:
    """grad of E_pi[R] by autograd through the enumerated expectation."""
    l1, l2 = two_step(theta1, theta2)
    expected = sum((l1[a] + l2[a, b]).exp() * REWARD[a, b] for a, b in sequences())
    return torch.cat([g.reshape(-1) for g in torch.autograd.grad(expected, (theta1, theta2))])


def estimator_gradient(theta1, theta2, seqs, rewards, baseline) -> torch.Tensor:
    """The gradient of REINFORCE's loss on the sequences ``seqs``, as one flat vector (minus: ascent direction)."""
    logprobs = torch.cat([per_token_log_probs(theta1, theta2, s) for s in seqs])
    loss, _ = reinforce_loss(logprobs, rewards, baseline)
    return -torch.cat([g.reshape(-1) for g in torch.autograd.grad(loss, (theta1, theta2))])


def probability(theta1, theta2, seq) -> float:
    return per_token_log_probs(theta1, theta2, seq).sum().exp().item()


@pytest.mark.parametrize("baseline", [0.0, 1.7])
def test_reinforce_averages_to_the_exact_gradient_by_enumeration(params, baseline):
    """Any constant baseline leaves the mean of the score-function estimator at grad E[R]."""
    theta1, theta2 = params
    mean = sum(probability(theta1, theta2, s) * estimator_gradient(theta1, theta2, [s], REWARD[s][None], baseline)
               for s in sequences())
    assert torch.allclose(mean, exact_gradient(theta1, theta2), atol=1e-12)


def test_the_leave_one_out_baseline_is_unbiased_and_lowers_the_variance(params):
    """Over every pair of independent draws (enumerated), the leave-one-out estimator has the exact mean and a
    smaller total variance than the same pair without a baseline, for rewards shifted by a constant (as the
    classifier's log-probabilities, all negative, are): the shift leaves grad E[R] alone and inflates only the
    variance of the estimator without a baseline."""
    theta1, theta2 = params
    exact = exact_gradient(theta1, theta2)
    moments = {"none": [0, 0], "loo": [0, 0]}
    for s1, s2 in itertools.product(sequences(), repeat=2):
        p = probability(theta1, theta2, s1) * probability(theta1, theta2, s2)
        rewards = torch.stack([REWARD[s1], REWARD[s2]]) - 5.0
        for name, baseline in (("none", 0.0), ("loo", leave_one_out_baseline(rewards))):
            g = estimator_gradient(theta1, theta2, [s1, s2], rewards, baseline)
            moments[name][0] = moments[name][0] + p * g
            moments[name][1] = moments[name][1] + p * (g - exact).pow(2).sum()
    assert torch.allclose(moments["loo"][0], exact, atol=1e-12)
    assert torch.allclose(moments["none"][0], exact, atol=1e-12)
    assert moments["loo"][1] < 0.5 * moments["none"][1]


def regularized_objective(log_pi: torch.Tensor, log_ref: torch.Tensor, rewards: torch.Tensor, beta: float):
    """E_pi[R] - beta KL(pi || pi_ref) over an enumerated set of outcomes."""
    pi = log_pi.exp()
    return (pi * rewards).sum() - beta * (pi * (log_pi - log_ref)).sum()


@pytest.mark.parametrize("beta", [0.3, 1.0, 5.0])
def test_the_kl_regularized_optimum_is_the_reference_tilted_by_exp_r_over_beta(beta):
    """pi* ∝ pi_ref exp(R / beta) reaches beta log Z, and every other distribution (random logits, or pi* moved a
    little) reaches less."""
    g = torch.Generator().manual_seed(1)
    log_ref = torch.randn(9, generator=g, dtype=torch.float64).log_softmax(-1)
    rewards = REWARD.reshape(-1)
    log_star = (log_ref + rewards / beta).log_softmax(-1)
    best = regularized_objective(log_star, log_ref, rewards, beta)
    assert best.item() == pytest.approx(beta * torch.logsumexp(log_ref + rewards / beta, 0).item(), abs=1e-12)
    for _ in range(200):
        other = (log_star + 0.05 * torch.randn(9, generator=g, dtype=torch.float64)).log_softmax(-1)
        assert regularized_objective(other, log_ref, rewards, beta) < best
        random = torch.randn(9, generator=g, dtype=torch.float64).log_softmax(-1)
        assert regularized_objective(random, log_ref, rewards, beta) < best


def test_conjugate_gradient_solves_the_explicit_fisher_system_of_a_small_policy():
    """On the two-step policy: F is the Hessian of KL(pi_old || pi) (explicit, 12 x 12); conjugate gradient over
    Fisher-vector products reaches (F + damping I)^{-1} g of a direct solve."""
    g = torch.Generator().manual_seed(2)
    theta = torch.randn(K + K * K, generator=g, dtype=torch.float64)
    old = theta.clone()

    def kl_at(t: torch.Tensor) -> torch.Tensor:
        l1o, l2o = two_step(old[:K], old[K:].view(K, K))
        l1, l2 = two_step(t[:K], t[K:].view(K, K))
        # KL of the joint: the first step's KL plus the second's, weighted by pi_old(a1)
        step2 = (l2o.exp() * (l2o - l2)).sum(-1)
        return (l1o.exp() * (l1o - l1)).sum() + (l1o.exp() * step2).sum()

    F = torch.autograd.functional.hessian(kl_at, theta)
    param = theta.clone().requires_grad_()
    grad = torch.randn(K + K * K, generator=g, dtype=torch.float64)
    damping = 0.1
    x = conjugate_gradient(lambda v: fisher_vector_product(lambda: kl_at(param), [param], v, damping), grad,
                           iters=50, tol=1e-20)
    direct = torch.linalg.solve(F + damping * torch.eye(len(theta), dtype=torch.float64), grad)
    assert torch.allclose(x, direct, atol=1e-8)
    assert torch.linalg.matrix_rank(F) < len(theta)  # softmax logits: F is singular, which is why damping is there


# -- the updates on a small transformer -----------------------------------------------------------------------

SMALL = ARConfig(width=16, layers=1, heads=2)




def small_config(method: str, **changes) -> FinetuneConfig:
    beta = 0.0 if method == "reinforce" else 0.1
    return FinetuneConfig(method=method, kl_coef=beta, rollout=8, snapshots=2, policy=SMALL,
                          ppo=PPOConfig(epochs=1, minibatches=2), trpo=TRPOConfig(fisher_sequences=4, cg_iters=3),
                          train=finetune.finetune_training(steps=2, lr=1e-3), **changes)


@pytest.mark.parametrize("method", finetune.METHODS)
def test_each_method_runs_logs_and_moves_the_policy(method, reference, classifier):
    policy, history, snapshots = finetune.finetune(small_config(method), reference, classifier, log=lambda s: None)
    assert [h["step"] for h in history] == [1, 2] and sorted(snapshots, key=int) == ["1", "2"]
    assert all(len(row) == reference.length for row in snapshots["1"])
    assert history[0]["kl_log_ratio"] == pytest.approx(0.0, abs=1e-5)  # the first rollout: policy = reference
    assert all(0 <= h["target_fraction"] <= 1 and h["seconds"] > 0 for h in history)
    moved = max((p - q).abs().max().item() for p, q in zip(finetune.bare(policy).parameters(), reference.parameters(),
                                                            strict=True))
    assert moved > 0
    if method == "ppo":
        assert isinstance(policy, PolicyWithValue) and {"clipfrac", "approx_kl", "entropy"} <= set(history[0])
    if method == "trpo":
        # the line search keeps the measured per-token KL of an accepted step inside the trust region
        assert all(h["kl"] <= small_config(method).trpo.max_kl for h in history)


def test_the_kl_to_the_reference_is_zero_at_initialization(reference, classifier):
    policy = finetune.make_policy(small_config("ppo"))
    finetune.bare(policy).load_state_dict(reference.state_dict())
    rollout = collect_rollout(policy, reference, DigitReward(classifier, 7, 2), 4,
                              generator=torch.Generator().manual_seed(0))
    assert torch.allclose(rollout.logprobs, rollout.ref_logprobs, atol=1e-5)
    assert kl_full(finetune.bare(policy)(rollout.tokens), reference(rollout.tokens)).abs().max() < 1e-5


def test_the_digit_reward_is_the_classifiers_log_probability_of_the_target(classifier):
    tokens = torch.randint(0, 16, (5, 196), generator=torch.Generator().manual_seed(0))
    reward = DigitReward(classifier, 3, 2)
    log_probs = reward.class_log_probs(tokens)
    assert torch.allclose(log_probs.exp().sum(-1), torch.ones(5), atol=1e-5)
    assert torch.equal(reward(tokens), log_probs[:, 3])


def test_a_nan_reward_stops_before_any_update(reference, classifier, monkeypatch):
    monkeypatch.setattr(DigitReward, "forward", lambda self, tokens, labels=None: torch.full((len(tokens),), math.nan))
    before = copy.deepcopy(reference.state_dict())
    with pytest.raises(NonFiniteLossError, match="reward"):
        finetune.finetune(small_config("ppo"), reference, classifier, log=lambda s: None)
    assert all(torch.equal(before[k], v) for k, v in reference.state_dict().items())


@pytest.mark.parametrize("changes, message", [
    ({"method": "kl-policy", "kl_coef": 0.0}, "beta must be > 0"),
    ({"method": "ppo", "kl_coef": -0.1}, "beta must be > 0"),
    ({"method": "reinforce", "kl_coef": 0.1}, "kl_coef = 0"),
    ({"target": 10}, "target digit"),
    ({"method": "a2c"}, "method must be one of"),
    ({"rollout": 1}, "at least two"),
])
def test_bad_settings_are_refused(changes, message):
    with pytest.raises(ValueError, match=message):
        FinetuneConfig(**changes)


@pytest.mark.parametrize("clip", [0.0, 1.0, -0.2, 1.5])
def test_a_clip_epsilon_outside_zero_one_is_refused(clip):
    with pytest.raises(ValueError, match=r"\(0, 1\)"):
        PPOConfig(clip=clip)


def test_token_strings_round_trip():
    tokens = torch.randint(0, 16, (3, 196), generator=torch.Generator().manual_seed(0))
    rows = finetune.encode_tokens(tokens)
    assert all(len(r) == 196 for r in rows) and torch.equal(finetune.decode_tokens(rows), tokens)


def test_the_report_of_the_reference_against_itself_has_zero_kl_and_scores_its_samples(reference):
    from agm.rl import models

    report = models.policy_report(reference, reference, 7, 130, torch.Generator().manual_seed(0))
    assert report["n_samples"] == 130 and abs(report["kl_to_reference"]) < 1e-4
    assert 0 <= report["target_fraction"] <= 1 and report["digit_fid"] > 0 and report["reward"] < 0
    moved = copy.deepcopy(reference)
    with torch.no_grad():
        moved.transformer.head.bias.add_(torch.linspace(-1, 1, 16))
    assert models.policy_report(moved, reference, 7, 130, torch.Generator().manual_seed(0))["kl_to_reference"] > 0.1


def test_the_policy_fisher_product_is_the_fisher_vector_product_of_the_mean_per_token_kl(reference):
    """The product TRPO and Chapter 53 use equals the generic double-backpropagation product of the same KL."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    from agm.rl.trpo import fisher_vector_product

    policy = copy.deepcopy(reference).requires_grad_(True)
    tokens = torch.randint(0, 16, (2, 196), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        old_logits = policy(tokens)
    params = list(policy.parameters())
    v = torch.randn(sum(p.numel() for p in params), generator=torch.Generator().manual_seed(1))
    got = finetune.policy_fisher_product(policy, tokens, None, old_logits, v, 0.1)
    with sdpa_kernel(SDPBackend.MATH):
        want = fisher_vector_product(lambda: finetune.per_token_kl(old_logits, policy(tokens)), params, v, 0.1)
    assert torch.allclose(got, want, atol=1e-6) and (got - 0.1 * v).abs().max() > 0  # F v is not zero


def test_best_seconds_is_the_shortest_of_the_repeats_and_refuses_none():
    from agm.runtime import best_seconds

    calls = []
    assert best_seconds(lambda: calls.append(1), repeats=3) >= 0 and len(calls) == 3
    with pytest.raises(ValueError, match="repeats"):
        best_seconds(lambda: None, repeats=0)


def test_a_frontier_point_is_dominated_only_by_a_higher_reward_at_a_lower_kl():
    """By hand: (reward -1, KL 5) is beaten by (-0.5, 4); (-1, 3) by nothing (the other point is further away);
    ties in either coordinate do not dominate."""
    from agm.rl.models import dominated

    assert dominated([-1.0, -1.0], [5.0, 3.0], [-0.5], [4.0]).tolist() == [True, False]
    assert dominated([-1.0], [5.0], [-1.0, -0.5], [4.0, 5.0]).tolist() == [False]
