r"""Policy-gradient estimators measured exactly (Chapter 50).

A :class:`TabularPolicy` is an autoregressive policy with a free logit vector for every prefix, small enough that
every sequence can be listed: the expected return and its gradient are finite sums, and so are the mean and the
total variance of REINFORCE's estimate, from one draw (:func:`moments`) or from a rollout of several
(:func:`batch_moments`). :func:`score_vectors` gives the score of each sequence under any policy with
``token_log_probs`` — the book's transformer included — for measuring the estimator on it by sampling.
"""

from __future__ import annotations

import torch
from torch import nn

from agm.distributions import categorical_log_prob
from agm.rl.advantages import discounted_returns
from agm.rl.losses import leave_one_out_baseline

BASELINES = ("none", "mean", "leave-one-out")


def all_sequences(symbols: int, steps: int) -> torch.Tensor:
    """Every sequence of ``steps`` symbols from 0..symbols-1, (symbols**steps, steps), in lexicographic order:
    row i is i written in base ``symbols`` (see :func:`sequence_index`)."""
    if symbols < 1 or steps < 1:
        raise ValueError(f"symbols and steps must be >= 1, got {symbols} and {steps}")
    return torch.cartesian_prod(*[torch.arange(symbols)] * steps).view(-1, steps)


def sequence_index(tokens: torch.Tensor, symbols: int) -> torch.Tensor:
    """The row of each sequence (B, T) in :func:`all_sequences`, (B,)."""
    # $i = \sum_t x_t K^{T-1-t}$
    powers = symbols ** torch.arange(tokens.shape[-1] - 1, -1, -1, device=tokens.device)
    return (tokens * powers).sum(-1)


class TabularPolicy(nn.Module):
    """pi(x_t | x_<t) = softmax(theta_t[x_<t]) with a free logit vector theta_t[x_<t] (K,) for every prefix:
    K + K^2 + ... + K^T parameters in float64. Same interface as the transformer: ``token_log_probs`` and
    ``sample_tokens`` (the null context only)."""

    def __init__(self, symbols: int, steps: int, generator: torch.Generator | None = None, scale: float = 1.0):
        super().__init__()
        self.symbols, self.length = symbols, steps
        # theta_t has shape (K,) * t + (K,): one logit vector per prefix of length t
        self.logits = nn.ParameterList(
            nn.Parameter(scale * torch.randn((symbols,) * (t + 1), generator=generator, dtype=torch.float64))
            for t in range(steps))

    def prefix_logits(self, tokens: torch.Tensor, t: int) -> torch.Tensor:
        """theta_t[x_<t] (B, K) for the prefixes of length t of sequences (B, >= t)."""
        return self.logits[t][tuple(tokens[:, :t].T)].expand(len(tokens), self.symbols)

    def check(self, tokens: torch.Tensor | None, labels: torch.Tensor | None) -> None:
        if labels is not None:
            raise ValueError("a tabular policy has no context labels (only the null context)")
        if tokens is None:
            return
        if tokens.ndim != 2 or tokens.shape[1] != self.length or tokens.dtype != torch.long:
            raise ValueError(f"tokens must be a long tensor [B, {self.length}], got {tokens.dtype} "
                             f"{list(tokens.shape)}")
        if len(tokens) and (tokens.min() < 0 or tokens.max() >= self.symbols):
            raise ValueError(f"tokens must lie in 0..{self.symbols - 1}")

    def token_log_probs(self, tokens: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        """log pi(x_t | x_<t) of every token, (B, T)."""
        self.check(tokens, labels)
        # $\log\pi(x_t \mid x_{<t}) = \theta_t[x_{<t}]_{x_t} - \log\sum_k e^{\theta_t[x_{<t}]_k}$
        return torch.stack([categorical_log_prob(self.prefix_logits(tokens, t), tokens[:, t])
                            for t in range(self.length)], 1)

    @torch.no_grad()
    def sample_tokens(self, n: int, labels: torch.Tensor | None = None,
                      generator: torch.Generator | None = None) -> torch.Tensor:
        """n sequences (n, T) drawn one token at a time (ancestral sampling)."""
        self.check(None, labels)
        tokens = torch.empty(n, 0, dtype=torch.long)
        for t in range(self.length):
            probs = self.prefix_logits(tokens, t).softmax(-1)  # (n, K)
            tokens = torch.cat([tokens, torch.multinomial(probs, 1, generator=generator)], 1)
        return tokens

    def sequence_probs(self) -> torch.Tensor:
        """pi(x) of every sequence of :func:`all_sequences`, (K^T,), differentiable."""
        # $\pi(x) = \prod_t \pi(x_t \mid x_{<t})$
        return self.token_log_probs(all_sequences(self.symbols, self.length)).sum(1).exp()


def expected_return(policy: TabularPolicy, step_rewards: torch.Tensor) -> torch.Tensor:
    """E_pi[sum_t r_t] by enumeration, differentiable; ``step_rewards`` (K^T, T) holds the reward after each step
    of each sequence of :func:`all_sequences` (a terminal reward: zeros but in the last column)."""
    # $J(\theta) = \sum_x \pi_\theta(x) \sum_t r_t(x_{\le t})$
    return policy.sequence_probs() @ step_rewards.sum(1)


def flat(grads: tuple[torch.Tensor | None, ...], params: list[torch.Tensor]) -> torch.Tensor:
    return torch.cat([(torch.zeros_like(p) if g is None else g).reshape(-1) for g, p in zip(grads, params,
                                                                                             strict=True)])


def exact_gradient(policy: TabularPolicy, step_rewards: torch.Tensor) -> torch.Tensor:
    """grad_theta E_pi[sum_t r_t] (P,) by automatic differentiation through the enumerated expectation."""
    params = list(policy.parameters())
    return flat(torch.autograd.grad(expected_return(policy, step_rewards), params, allow_unused=True), params)


def score_vectors(policy: nn.Module, tokens: torch.Tensor, per_token: bool = False) -> torch.Tensor:
    """The score grad_theta log pi(x) of each sequence (B, P), one backward pass per sequence; with ``per_token``,
    the score of each token grad_theta log pi(x_t | x_<t) (B, T, P), whose sum over t is the sequence's."""
    params = [p for p in policy.parameters() if p.requires_grad]
    rows = []
    for x in tokens:
        logp = policy.token_log_probs(x[None])[0]  # (T,)
        terms = logp if per_token else logp.sum()[None]
        # $s_t = \nabla_\theta \log \pi(x_t \mid x_{<t})$, or $s = \nabla_\theta \log\pi(x) = \sum_t s_t$
        rows.append(torch.stack([flat(torch.autograd.grad(term, params, retain_graph=True, allow_unused=True), params)
                                 for term in terms]))
    out = torch.stack(rows)  # (B, T or 1, P)
    return out if per_token else out[:, 0]


def policy_gradient_estimates(token_scores: torch.Tensor, step_rewards: torch.Tensor,
                              reward_to_go: bool = True) -> torch.Tensor:
    """The score-function estimate of grad E[sum_t r_t] from each sequence (B, P), given its token scores
    (B, T, P) and rewards (B, T): sum_t grad log pi(x_t | x_<t) G_t with the reward-to-go G_t (the policy
    gradient theorem), or with the whole return G_0 at every step (``reward_to_go=False``)."""
    # $G_t = \sum_{t' \ge t} r_{t'}$ (no discount)
    returns = discounted_returns(step_rewards, 1.0)  # (B, T)
    weights = returns if reward_to_go else returns[:, :1].expand_as(returns)
    # $\hat g = \sum_t \nabla_\theta \log\pi(x_t \mid x_{<t})\, G_t$
    return (weights[..., None] * token_scores).sum(1)


def rollout_gradient(scores: torch.Tensor, rewards: torch.Tensor,
                     baseline: float | torch.Tensor = 0.0) -> torch.Tensor:
    """REINFORCE's estimate of grad E[R] from one rollout (P,), from the scores (B, P) and rewards (B,) of its B
    sequences and a baseline (a number or (B,)): minus the gradient of :func:`agm.rl.losses.reinforce_loss`."""
    # $\hat g = \frac1B \sum_b \big(R(x_b) - b_b\big)\, \nabla_\theta \log \pi_\theta(x_b)$
    advantages = rewards - torch.as_tensor(baseline, dtype=rewards.dtype)
    return (advantages[:, None] * scores).mean(0)


def moments(probs: torch.Tensor, values: torch.Tensor) -> tuple[torch.Tensor, float]:
    """Mean (P,) and total variance (the trace of the covariance) of a vector that takes the value values[m]
    (M, P) with probability probs[m] (M,)."""
    mean = probs @ values
    # $\operatorname{tr}\operatorname{Cov}[v] = \mathbb{E}\,\|v - \mathbb{E} v\|^2$
    return mean, float(probs @ (values - mean).pow(2).sum(1))


def optimal_baseline(probs: torch.Tensor, scores: torch.Tensor, rewards: torch.Tensor) -> float:
    """The constant b that minimizes the total variance of (R(x) - b) grad log pi(x), x ~ pi, from the
    probabilities (N,), scores (N, P) and rewards (N,) of every sequence."""
    sq_norms = scores.pow(2).sum(1)
    # $b^\star = \mathbb{E}\big[R\,\|\nabla\log\pi\|^2\big] \,/\, \mathbb{E}\,\|\nabla\log\pi\|^2$
    return float((probs * rewards * sq_norms).sum() / (probs * sq_norms).sum())


def batch_baseline(rewards: torch.Tensor, kind: str) -> torch.Tensor:
    """The baseline of each draw of rollouts (..., B): ``none`` (zero), ``mean`` (the rollout's mean reward, the
    draw's own included) or ``leave-one-out`` (the mean reward of the other B - 1)."""
    if kind == "none":
        return torch.zeros_like(rewards)
    if kind == "mean":
        return rewards.mean(-1, keepdim=True).expand_as(rewards)
    if kind == "leave-one-out":
        return torch.vmap(leave_one_out_baseline)(rewards.reshape(-1, rewards.shape[-1])).view_as(rewards)
    raise ValueError(f"baseline must be one of {', '.join(BASELINES)}, got {kind!r}")


def batch_moments(probs: torch.Tensor, scores: torch.Tensor, rewards: torch.Tensor, batch_size: int,
                  baseline: str) -> tuple[torch.Tensor, float]:
    """Exact mean (P,) and total variance of REINFORCE's estimate from a rollout of ``batch_size`` independent
    draws, over all N^B rollouts, from the probabilities (N,), scores (N, P) and rewards (N,) of the N sequences,
    with the baseline named by ``baseline`` (:func:`batch_baseline`)."""
    batches = all_sequences(len(probs), batch_size)  # (N^B, B): which sequence each draw is
    # $P(x_1, \dots, x_B) = \prod_b \pi(x_b)$
    p = probs[batches].prod(1)  # (N^B,)
    r = rewards[batches]  # (N^B, B)
    advantages = r - batch_baseline(r, baseline)
    estimates = (advantages[..., None] * scores[batches]).mean(1)  # (N^B, P)
    return moments(p, estimates)


def total_variance(samples: torch.Tensor) -> float:
    """Unbiased estimate of the total variance (trace of the covariance) of a vector from R >= 2 independent
    draws of it (R, P)."""
    if samples.ndim != 2 or len(samples) < 2:
        raise ValueError(f"need (R, P) samples with R >= 2, got {list(samples.shape)}")
    # $\frac{1}{R-1} \sum_r \|\hat g_r - \bar g\|^2$
    return float((samples - samples.mean(0)).pow(2).sum() / (len(samples) - 1))
