r"""The policy and value losses of Chapters 50 and 52: REINFORCE, PPO's clipped surrogate, the value loss.

Log-probabilities are per token, (B, T), of sequences sampled earlier (by pi_old for PPO). Every loss returns
``(loss, logs)``; names follow CleanRL's ``ppo.py`` (``pg_loss1``, ``approx_kl``, ``clipfrac``).
"""

from __future__ import annotations

import torch

Logs = dict[str, torch.Tensor]


def leave_one_out_baseline(rewards: torch.Tensor) -> torch.Tensor:
    """For each of B sequences (B,), the mean reward of the other B - 1 (Kool et al., 2019): a baseline that does
    not depend on the sequence it is subtracted from, so the estimator stays unbiased."""
    if rewards.ndim != 1 or len(rewards) < 2:
        raise ValueError(f"rewards must have shape (B,) with B >= 2, got {list(rewards.shape)}")
    # $b_i = \frac{1}{B-1}\sum_{j \ne i} R_j$
    return (rewards.sum() - rewards) / (len(rewards) - 1)


def reinforce_loss(logprobs: torch.Tensor, rewards: torch.Tensor,
                   baseline: float | torch.Tensor = 0.0) -> tuple[torch.Tensor, Logs]:
    """REINFORCE (Williams, 1992) on whole sequences, from the per-token log-probs (B, T) of B sampled sequences,
    their rewards (B,) and a baseline (a number or one per sequence, (B,)). Rewards and baseline are detached:
    the gradient is the score-function estimate of -grad E[R], (1/B) sum_b -(R_b - b) grad log pi(x_b)."""
    if logprobs.ndim != 2 or rewards.shape != logprobs.shape[:1]:
        raise ValueError(f"need logprobs (B, T) and rewards (B,), got {list(logprobs.shape)} and "
                         f"{list(rewards.shape)}")
    baseline = torch.as_tensor(baseline, dtype=rewards.dtype, device=rewards.device)
    if baseline.ndim and baseline.shape != rewards.shape:
        raise ValueError(f"baseline must be a number or have shape (B,) = {list(rewards.shape)}, "
                         f"got {list(baseline.shape)}")
    # $A_b = R(x_b) - b$
    advantages = (rewards - baseline).detach()
    # $\log \pi_\theta(x_b) = \sum_t \log \pi_\theta(x_{b,t} \mid x_{b,<t})$
    seq_logprobs = logprobs.sum(-1)  # (B,)
    # $\mathcal{L}(\theta) = -\frac1B \sum_b A_b \log \pi_\theta(x_b)$
    loss = -(advantages * seq_logprobs).mean()
    return loss, {"reward": rewards.mean().detach(), "advantage_abs": advantages.abs().mean(),
                  "logprob": seq_logprobs.mean().detach()}


def check_same_shape(**tensors: torch.Tensor) -> None:
    shapes = {name: list(t.shape) for name, t in tensors.items()}
    first = next(iter(shapes.values()))
    if any(s != first for s in shapes.values()):
        raise ValueError(f"{', '.join(shapes)} must have the same shape (B, T) or (N,), got {shapes}")


def ppo_policy_loss(new_logprobs: torch.Tensor, old_logprobs: torch.Tensor, advantages: torch.Tensor,
                    clip_coef: float) -> tuple[torch.Tensor, Logs]:
    """PPO's clipped surrogate (Schulman et al., 2017), to minimize, averaged over all tokens, from the log-probs
    of the sampled tokens under pi_theta (differentiable) and pi_old, and their advantages (all the same shape).

    Logs: ``approx_kl``, the mean of (r - 1) - log r (CleanRL's estimate of KL(pi_old || pi_theta)),
    ``old_approx_kl``, the mean of -log r; ``clipfrac``, the fraction of tokens where the clip binds (the
    clipped term is the larger, so the token's gradient is zero: TRL's ``pg_clipfrac``); ``ratio_outside``,
    the fraction with |r - 1| > epsilon on either side (what CleanRL calls ``clipfrac``)."""
    check_same_shape(new_logprobs=new_logprobs, old_logprobs=old_logprobs, advantages=advantages)
    if clip_coef <= 0:
        raise ValueError(f"clip_coef must be > 0, got {clip_coef}")
    advantages = advantages.detach()
    # $\log r_t = \log \pi_\theta(a_t \mid s_t) - \log \pi_{\mathrm{old}}(a_t \mid s_t)$
    logratio = new_logprobs - old_logprobs.detach()
    ratio = logratio.exp()
    # $-\hat A_t\, r_t$
    pg_loss1 = -advantages * ratio
    # $-\hat A_t\, \mathrm{clip}(r_t, 1 - \epsilon, 1 + \epsilon)$
    pg_loss2 = -advantages * ratio.clamp(1 - clip_coef, 1 + clip_coef)
    # $\mathcal{L}^{\mathrm{CLIP}} = \mathbb{E}_t\big[\max(-\hat A_t r_t, -\hat A_t \mathrm{clip}(r_t))\big]$
    pg_loss = torch.max(pg_loss1, pg_loss2).mean()
    with torch.no_grad():
        # $\widehat{\mathrm{KL}} = \mathbb{E}_t[(r_t - 1) - \log r_t]$
        approx_kl = ((ratio - 1) - logratio).mean()
        logs = {"approx_kl": approx_kl, "old_approx_kl": (-logratio).mean(),
                "clipfrac": (pg_loss2 > pg_loss1).float().mean(),
                "ratio_outside": ((ratio - 1).abs() > clip_coef).float().mean()}
    return pg_loss, logs


def value_loss(values: torch.Tensor, returns: torch.Tensor, old_values: torch.Tensor | None = None,
               clip_coef: float | None = None) -> tuple[torch.Tensor, Logs]:
    """Half the mean squared error of the value head against the returns (all the same shape); with
    ``old_values`` and ``clip_coef``, PPO's clipped form (CleanRL's ``clip_vloss``): the larger of the errors of
    the new value and of the old value moved by at most epsilon towards it. Logs the explained variance
    1 - Var(R - V) / Var(R) and, when clipping, ``value_clipfrac`` (where the clipped error is the larger)."""
    check_same_shape(values=values, returns=returns)
    if (old_values is None) != (clip_coef is None):
        raise ValueError("give both old_values and clip_coef (clipped value loss) or neither")
    returns = returns.detach()
    # $(V_\theta(s_t) - \hat R_t)^2$
    v_loss_unclipped = (values - returns) ** 2
    with torch.no_grad():
        # $1 - \mathrm{Var}(\hat R - V) / \mathrm{Var}(\hat R)$
        explained_variance = 1 - (returns - values).var() / returns.var()
    logs = {"explained_variance": explained_variance}
    if old_values is None:
        # $\mathcal{L}^V = \frac12 \mathbb{E}_t (V_\theta(s_t) - \hat R_t)^2$
        return 0.5 * v_loss_unclipped.mean(), logs
    check_same_shape(values=values, old_values=old_values)
    old_values = old_values.detach()
    # $V^{\mathrm{clip}} = V_{\mathrm{old}} + \mathrm{clip}(V_\theta - V_{\mathrm{old}}, -\epsilon, \epsilon)$
    v_clipped = old_values + (values - old_values).clamp(-clip_coef, clip_coef)
    v_loss_clipped = (v_clipped - returns) ** 2
    # $\mathcal{L}^V = \frac12 \mathbb{E}_t \max\big((V_\theta - \hat R_t)^2, (V^{\mathrm{clip}} - \hat R_t)^2\big)$
    v_loss = 0.5 * torch.max(v_loss_unclipped, v_loss_clipped).mean()
    logs["value_clipfrac"] = (v_loss_clipped > v_loss_unclipped).float().mean().detach()
    return v_loss, logs
