"""DPO's population loss on an enumerable policy (Chapter 55): its minimizer is the tilted reference of Chapter 51."""

import math

import pytest
import torch

from agm.preference.dpo import population_dpo_loss
from agm.preference.losses import dpo_loss
from agm.rl.tilted import tilt

REWARDS = torch.tensor([1.0, -0.5, 2.0, 0.0, 3.0, -1.0, 0.5, 0.5, 4.0], dtype=torch.float64)


def reference_logits(seed: int = 1) -> torch.Tensor:
    return torch.randn(len(REWARDS), generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def minimize(ref_logits: torch.Tensor, rewards: torch.Tensor, beta: float, start: torch.Tensor) -> torch.Tensor:
    logits = start.clone().requires_grad_(True)
    optimizer = torch.optim.LBFGS([logits], lr=1, max_iter=500, tolerance_grad=1e-13, tolerance_change=1e-15,
                                  line_search_fn="strong_wolfe")

    def closure():
        optimizer.zero_grad()
        loss = population_dpo_loss(logits, ref_logits, rewards, beta)
        loss.backward()
        return loss

    optimizer.step(closure)
    return logits.detach()


@pytest.mark.parametrize("beta", [0.5, 1.0, 3.0])
def test_the_minimizer_of_the_population_dpo_loss_is_the_tilted_reference(beta):
    """The theorem of Chapter 55: pairs from pi_ref x pi_ref labelled by Bradley–Terry with r, and the DPO loss at
    beta is minimized by pi_ref exp(r / beta) / Z — from the reference and from a random start alike. A loss that
    dropped the reference's log-probs, or the factor beta, would land elsewhere."""
    ref_logits = reference_logits()
    target = tilt(ref_logits.log_softmax(0), REWARDS, beta).exp()
    for start in (ref_logits, 3 * reference_logits(seed=2)):
        found = minimize(ref_logits, REWARDS, beta, start).softmax(0)
        assert torch.allclose(found, target, atol=1e-7), (found - target).abs().max()


def test_the_minimum_is_the_expected_entropy_of_the_labels():
    """At the optimum every pair's predicted preference equals the annotator's, so the loss is the mean binary
    entropy of the labels; any other policy does worse."""
    ref_logits, beta = reference_logits(), 0.7
    log_ref = ref_logits.log_softmax(0)
    p = torch.sigmoid(REWARDS[:, None] - REWARDS[None, :])  # P(a chosen over b)
    entropy = -(p * p.log() + (1 - p) * (1 - p).log())
    expected = (log_ref[:, None] + log_ref[None, :]).exp().mul(entropy).sum()
    at_optimum = population_dpo_loss(tilt(log_ref, REWARDS, beta), ref_logits, REWARDS, beta)
    assert at_optimum.item() == pytest.approx(expected.item(), abs=1e-12)
    g = torch.Generator().manual_seed(3)
    for _ in range(20):
        other = torch.randn(len(REWARDS), generator=g, dtype=torch.float64)
        assert population_dpo_loss(other, ref_logits, REWARDS, beta) > at_optimum


def test_the_population_loss_is_dpo_loss_averaged_over_every_draw_and_label():
    """The oracle follows the data: draw a then b from pi_ref, label a the chosen one with probability
    sigmoid(r(a) - r(b)), and score the pair with losses.dpo_loss; averaged over every draw and both labels."""
    ref_logits, beta = reference_logits(), 0.4
    logits = torch.randn(len(REWARDS), generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    log_pi, log_ref = logits.log_softmax(0), ref_logits.log_softmax(0)

    def pair_loss(chosen: int, rejected: int) -> torch.Tensor:
        c, r = slice(chosen, chosen + 1), slice(rejected, rejected + 1)
        return dpo_loss(log_pi[c], log_pi[r], log_ref[c], log_ref[r], beta)[0]

    total = torch.zeros((), dtype=torch.float64)
    for a in range(len(REWARDS)):
        for b in range(len(REWARDS)):
            p_a = torch.sigmoid(REWARDS[a] - REWARDS[b])
            total += log_ref[a].exp() * log_ref[b].exp() * (p_a * pair_loss(a, b) + (1 - p_a) * pair_loss(b, a))
    assert population_dpo_loss(logits, ref_logits, REWARDS, beta).item() == pytest.approx(total.item(), abs=1e-12)


def test_the_population_loss_is_log_2_at_the_reference_and_blind_to_constants():
    """At pi = pi_ref every implicit reward is zero. Adding a constant to every reward changes no label
    probability, and adding one to every logit changes no probability: neither may change the loss."""
    ref_logits, beta = reference_logits(), 0.25
    logits = torch.randn(len(REWARDS), generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    assert population_dpo_loss(ref_logits, ref_logits, REWARDS, beta).item() == pytest.approx(math.log(2), abs=1e-12)
    value = population_dpo_loss(logits, ref_logits, REWARDS, beta)
    assert population_dpo_loss(logits, ref_logits, REWARDS + 7.5, beta).item() == pytest.approx(value.item(), abs=1e-12)
    assert population_dpo_loss(logits - 2.0, ref_logits, REWARDS, beta).item() == pytest.approx(value.item(), abs=1e-12)
    # but scaling the rewards changes the labels, and so the loss
    assert abs(population_dpo_loss(logits, ref_logits, 2 * REWARDS, beta).item() - value.item()) > 1e-3


def test_the_gradient_weighs_each_pair_by_how_wrong_its_implicit_rewards_are():
    """d/d logits of the population loss = -beta sum_{a,b} P(a > b) sigmoid(r^(b) - r^(a)) (e_a - e_b): the
    softmax's normalization cancels between the two log-probs of a pair."""
    ref_logits, beta = reference_logits(), 0.6
    logits = torch.randn(len(REWARDS), generator=torch.Generator().manual_seed(6), dtype=torch.float64)
    theta = logits.clone().requires_grad_(True)
    (autograd,) = torch.autograd.grad(population_dpo_loss(theta, ref_logits, REWARDS, beta), theta)
    log_ref = ref_logits.log_softmax(0)
    implicit = beta * (logits.log_softmax(0) - log_ref)
    # P(a chosen over b): the pair drawn as (a, b) or as (b, a), and a preferred
    p = 2 * (log_ref[:, None] + log_ref[None, :]).exp() * torch.sigmoid(REWARDS[:, None] - REWARDS[None, :])
    weight = p * torch.sigmoid(implicit[None, :] - implicit[:, None])  # (a, b): P(a > b) sigmoid(r^_b - r^_a)
    by_hand = -beta * (weight.sum(1) - weight.sum(0))  # e_a collects row a, -e_b collects column b
    assert torch.allclose(autograd, by_hand, atol=1e-12)


def test_population_dpo_loss_refuses_bad_input():
    ref_logits = reference_logits()
    with pytest.raises(ValueError, match=r"shape \(N,\)"):
        population_dpo_loss(ref_logits[:3], ref_logits, REWARDS, 1.0)
    with pytest.raises(ValueError, match=r"shape \(N,\)"):
        population_dpo_loss(ref_logits[None], ref_logits[None], REWARDS[None], 1.0)
    with pytest.raises(ValueError, match="beta"):
        population_dpo_loss(ref_logits, ref_logits, REWARDS, 0.0)
