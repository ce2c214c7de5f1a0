r"""Losses of learning from pairwise preferences (Chapters 54–55): the Bradley–Terry reward model and DPO.

Every input is one number per pair, (B,): the rewards of the chosen and rejected samples, or their log-probs
log pi(x) = sum_t log pi(x_t | y, x_<t) under the policy and the frozen reference.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

Logs = dict[str, torch.Tensor]


def check_pairs(**tensors: torch.Tensor) -> None:
    shapes = {name: list(t.shape) for name, t in tensors.items()}
    first = next(iter(tensors.values()))
    if first.ndim != 1 or any(t.shape != first.shape for t in tensors.values()):
        raise ValueError(f"{', '.join(shapes)} must each have shape (B,), one value per pair, got {shapes}")


def bradley_terry_loss(r_chosen: torch.Tensor, r_rejected: torch.Tensor) -> tuple[torch.Tensor, Logs]:
    """The negative log-likelihood of the observed preferences under Bradley and Terry's (1952) model,
    P(chosen > rejected) = sigmoid(r_chosen - r_rejected), averaged over pairs; logs the fraction of pairs
    the rewards order correctly (``accuracy``) and the mean ``margin`` r_chosen - r_rejected."""
    check_pairs(r_chosen=r_chosen, r_rejected=r_rejected)
    # $r_c - r_r$
    margin = r_chosen - r_rejected
    # $\mathcal{L} = -\mathbb{E}\,\log \sigma(r_c - r_r)$
    loss = -F.logsigmoid(margin).mean()
    return loss, {"accuracy": (margin > 0).float().mean().detach(), "margin": margin.mean().detach()}


def dpo_loss(policy_chosen_logps: torch.Tensor, policy_rejected_logps: torch.Tensor,
             ref_chosen_logps: torch.Tensor, ref_rejected_logps: torch.Tensor,
             beta: float) -> tuple[torch.Tensor, Logs]:
    """Direct preference optimization (Rafailov et al., 2023), TRL's ``sigmoid`` loss: the Bradley–Terry loss of
    the implicit rewards beta log pi(x) / pi_ref(x), from sequence log-probs (B,). Logs the means of the
    implicit rewards of the chosen and rejected samples, ``reward_accuracy`` (the fraction of pairs where the
    chosen one's is larger) and their ``margin``."""
    check_pairs(policy_chosen_logps=policy_chosen_logps, policy_rejected_logps=policy_rejected_logps,
                ref_chosen_logps=ref_chosen_logps, ref_rejected_logps=ref_rejected_logps)
    if beta <= 0:
        raise ValueError(f"beta must be > 0, got {beta}")
    # $h = \log\frac{\pi_\theta(x_c)}{\pi_{\mathrm{ref}}(x_c)} - \log\frac{\pi_\theta(x_r)}{\pi_{\mathrm{ref}}(x_r)}$
    logits = (policy_chosen_logps - ref_chosen_logps) - (policy_rejected_logps - ref_rejected_logps)
    # $\mathcal{L}_{\mathrm{DPO}} = -\mathbb{E}\,\log \sigma(\beta h)$
    loss = -F.logsigmoid(beta * logits).mean()
    with torch.no_grad():
        # $\hat r(x) = \beta \log \frac{\pi_\theta(x)}{\pi_{\mathrm{ref}}(x)}$, the implicit reward
        chosen_rewards = beta * (policy_chosen_logps - ref_chosen_logps)
        rejected_rewards = beta * (policy_rejected_logps - ref_rejected_logps)
        logs = {"chosen_rewards": chosen_rewards.mean(), "rejected_rewards": rejected_rewards.mean(),
                "reward_accuracy": (chosen_rewards > rejected_rewards).float().mean(),
                "margin": (chosen_rewards - rejected_rewards).mean()}
    return loss, logs
