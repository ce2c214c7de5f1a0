"""Module 7's losses: the Bradley–Terry reward-model loss and DPO, against hand computations."""

import copy
import math

import pytest
import torch

from agm.autoregressive.ar_transformer import ARConfig, ARTransformer
from agm.preference.losses import bradley_terry_loss, dpo_loss
from agm.rl.rollout import sequence_log_probs


def test_bradley_terry_loss_is_minus_log_sigmoid_of_the_reward_difference():
    g = torch.Generator().manual_seed(0)
    r_chosen, r_rejected = torch.randn(6, generator=g), torch.randn(6, generator=g)
    loss, logs = bradley_terry_loss(r_chosen, r_rejected)
    assert torch.allclose(loss, -torch.log(torch.sigmoid(r_chosen - r_rejected)).mean())
    assert logs["accuracy"] == (r_chosen > r_rejected).float().mean()
    # one pair by hand: r_c - r_r = 1 gives log(1 + e^-1) = 0.313262
    assert bradley_terry_loss(torch.tensor([1.0]), torch.tensor([0.0]))[0].item() == pytest.approx(0.313262, abs=1e-6)


def test_bradley_terry_loss_stays_finite_for_a_badly_wrong_reward():
    """log(sigmoid(-200)) underflows to -inf in float32; the loss is 200 and its gradient -1."""
    r_chosen = torch.tensor([-100.0], requires_grad=True)
    loss, logs = bradley_terry_loss(r_chosen, torch.tensor([100.0]))
    loss.backward()
    assert loss.item() == pytest.approx(200.0) and r_chosen.grad.item() == pytest.approx(-1.0)
    assert logs["accuracy"] == 0 and logs["margin"] == -200


def test_dpo_loss_by_hand():
    """beta = 1/2, two pairs.
    Pair 1: log-ratios pi/pi_ref of chosen -10 - (-11) = 1 and rejected -12 - (-11) = -1: h = 2, beta h = 1,
      loss log(1 + e^-1) = 0.313262; implicit rewards 0.5 and -0.5, ordered correctly.
    Pair 2: chosen -5 - (-5) = 0, rejected -4 - (-5) = 1: h = -1, beta h = -1/2, loss log(1 + e^(1/2)) = 0.974077;
      implicit rewards 0 and 0.5, ordered wrongly.
    Means: loss 0.643669, chosen rewards 0.25, rejected 0, accuracy 1/2, margin (1 - 0.5) / 2 = 0.25.
    Gradient in the chosen log-prob: -beta sigmoid(-beta h) / B = -0.5 * 0.268941 / 2 = -0.067235 and
    -0.5 * 0.622459 / 2 = -0.155615; in the rejected log-prob the opposite."""
    policy_chosen = torch.tensor([-10.0, -5.0], requires_grad=True)
    policy_rejected = torch.tensor([-12.0, -4.0], requires_grad=True)
    loss, logs = dpo_loss(policy_chosen, policy_rejected, torch.tensor([-11.0, -5.0]), torch.tensor([-11.0, -5.0]),
                          beta=0.5)
    assert loss.item() == pytest.approx(0.643669, abs=1e-6)
    assert logs["chosen_rewards"].item() == pytest.approx(0.25) and logs["rejected_rewards"].item() == pytest.approx(0)
    assert logs["reward_accuracy"].item() == 0.5 and logs["margin"].item() == pytest.approx(0.25)
    loss.backward()
    assert torch.allclose(policy_chosen.grad, torch.tensor([-0.067235, -0.155615]), atol=1e-6)
    assert torch.allclose(policy_rejected.grad, -policy_chosen.grad)


def test_dpo_is_the_bradley_terry_loss_of_the_implicit_rewards():
    g = torch.Generator().manual_seed(1)
    pc, pr, rc, rr = (-10 * torch.rand(5, generator=g) for _ in range(4))
    loss, logs = dpo_loss(pc, pr, rc, rr, beta=0.3)
    bt_loss, bt_logs = bradley_terry_loss(0.3 * (pc - rc), 0.3 * (pr - rr))
    assert torch.allclose(loss, bt_loss) and logs["reward_accuracy"] == bt_logs["accuracy"]


def test_at_initialization_dpo_is_log_2_and_pushes_chosen_up_and_rejected_down():
    logps = torch.tensor([-130.0, -95.0, -150.0])
    chosen, rejected = logps.clone().requires_grad_(), (logps - 7).requires_grad_()
    loss, logs = dpo_loss(chosen, rejected, chosen.detach(), rejected.detach(), beta=0.1)
    assert loss.item() == pytest.approx(math.log(2)) and logs["reward_accuracy"] == 0 and logs["margin"] == 0
    loss.backward()
    # d/dx of -log sigmoid(beta x) at x = 0 is -beta / 2, over B = 3 pairs: descent raises the chosen log-prob
    assert torch.allclose(chosen.grad, torch.full((3,), -0.1 / 2 / 3))
    assert torch.allclose(rejected.grad, torch.full((3,), 0.1 / 2 / 3))


def test_one_dpo_step_on_a_policy_raises_the_implicit_reward_margin():
    torch.manual_seed(0)
    policy = ARTransformer(ARConfig(width=16, layers=1, heads=2))
    reference = copy.deepcopy(policy).eval().requires_grad_(False)
    g = torch.Generator().manual_seed(0)
    chosen, rejected = torch.randint(16, (2, 4, 196), generator=g)
    labels = torch.tensor([0, 3, 3, 9])
    with torch.no_grad():
        ref_c, ref_r = (sequence_log_probs(reference, t, labels).sum(1) for t in (chosen, rejected))

    def loss_and_logs():
        pc, pr = (sequence_log_probs(policy, t, labels).sum(1) for t in (chosen, rejected))
        return dpo_loss(pc, pr, ref_c, ref_r, beta=0.1)

    loss, logs = loss_and_logs()
    assert loss.item() == pytest.approx(math.log(2), abs=1e-5)
    loss.backward()
    with torch.no_grad():  # one plain gradient-descent step
        for p in policy.parameters():
            p -= 1e-2 * p.grad
    after, after_logs = loss_and_logs()
    assert after < loss and after_logs["margin"] > 0 and after_logs["chosen_rewards"] > 0
    assert after_logs["rejected_rewards"] < 0


def test_preference_losses_refuse_mismatched_shapes():
    with pytest.raises(ValueError, match=r"must each have shape \(B,\)"):
        bradley_terry_loss(torch.zeros(3), torch.zeros(4))
    with pytest.raises(ValueError, match=r"must each have shape \(B,\)"):
        dpo_loss(torch.zeros(3, 2), torch.zeros(3, 2), torch.zeros(3, 2), torch.zeros(3, 2), beta=0.1)
    with pytest.raises(ValueError, match="beta"):
        dpo_loss(torch.zeros(3), torch.zeros(3), torch.zeros(3), torch.zeros(3), beta=0.0)
