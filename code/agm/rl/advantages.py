r"""Returns and advantages of a batch of token sequences (Chapters 49–52).

Every row of a (B, T) tensor is one episode of T steps, step t emitting token t. The convention is
*terminal-only*: every episode ends after its last step, so nothing follows it (the value of the state
after step T - 1 is zero), unless a ``bootstrap`` value (B,) is given for episodes cut short. The
sequences of this book all end after T = 196 tokens, so ``dones`` are never needed.
"""

from __future__ import annotations

import torch


def check_rewards(rewards: torch.Tensor, values: torch.Tensor | None = None,
                  bootstrap: torch.Tensor | None = None) -> None:
    if rewards.ndim != 2:
        raise ValueError(f"rewards must have shape (B, T), got {list(rewards.shape)}")
    if bootstrap is not None and bootstrap.shape != rewards.shape[:1]:
        raise ValueError(f"bootstrap must have shape (B,) = {list(rewards.shape[:1])}, got {list(bootstrap.shape)}")
    if values is not None and values.shape != rewards.shape:
        raise ValueError(f"values must have the shape of rewards (B, T) = {list(rewards.shape)}, "
                         f"got {list(values.shape)}")


def discounted_returns(rewards: torch.Tensor, gamma: float,
                       bootstrap: torch.Tensor | None = None) -> torch.Tensor:
    """The return G_t of every step (B, T) of episodes with per-step ``rewards`` (B, T), by a reverse scan."""
    check_rewards(rewards, bootstrap=bootstrap)
    if not 0 <= gamma <= 1:
        raise ValueError(f"gamma must lie in [0, 1], got {gamma}")
    returns = torch.empty_like(rewards)
    # $G_T = 0$ at the end of an episode, or $V(s_T)$ for one cut short
    g = torch.zeros_like(rewards[:, 0]) if bootstrap is None else bootstrap
    for t in reversed(range(rewards.shape[1])):
        # $G_t = r_t + \gamma G_{t+1}$
        g = rewards[:, t] + gamma * g
        returns[:, t] = g
    return returns


def gae(rewards: torch.Tensor, values: torch.Tensor, gamma: float, lam: float,
        bootstrap: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalized advantage estimation (Schulman et al., 2016): advantages and returns (B, T) from per-step
    ``rewards`` and values V(s_t) (B, T); the returns A_t + V(s_t) are the value head's targets."""
    check_rewards(rewards, values, bootstrap)
    if not (0 <= gamma <= 1 and 0 <= lam <= 1):
        raise ValueError(f"gamma and lam must lie in [0, 1], got {gamma} and {lam}")
    advantages = torch.empty_like(rewards)
    # $V(s_T) = 0$ after the last step (terminal), or the bootstrap value of an episode cut short
    next_value = torch.zeros_like(values[:, 0]) if bootstrap is None else bootstrap
    last_gae = torch.zeros_like(values[:, 0])
    for t in reversed(range(rewards.shape[1])):
        # $\delta_t = r_t + \gamma V(s_{t+1}) - V(s_t)$
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        # $\hat A_t = \delta_t + \gamma\lambda \hat A_{t+1}$
        last_gae = delta + gamma * lam * last_gae
        advantages[:, t] = last_gae
        next_value = values[:, t]
    # $\hat R_t = \hat A_t + V(s_t)$
    return advantages, advantages + values


def normalize_advantages(advantages: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """Advantages shifted and scaled to mean 0 and standard deviation 1 over all their entries ("whitening").
    CleanRL's PPO (``norm_adv=True``) and TRL's PPO do this by default; the PPO loss itself does not."""
    if advantages.numel() < 2:
        raise ValueError(f"need at least two advantages to normalize, got shape {list(advantages.shape)}")
    # $\tilde A = (A - \bar A) / (\mathrm{sd}(A) + \epsilon)$
    return (advantages - advantages.mean()) / (advantages.std() + eps)
