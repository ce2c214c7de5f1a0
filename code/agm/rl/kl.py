r"""KL(pi || pi_ref) of token sequences drawn from pi, estimated per sequence (Chapter 51).

By the chain rule, KL(pi || pi_ref) over whole sequences is E_pi[sum_t KL_t], the sum over positions of the
KL between the two next-token distributions at the prefix drawn so far. Three unbiased estimators, each a
(B,) tensor, one value per sampled sequence:

- :func:`kl_log_ratio`: sum_t log pi(x_t) / pi_ref(x_t) at the sampled tokens (k1 in Schulman's note);
- :func:`kl_k3`: sum_t (r_t - 1) - log r_t with r_t = pi_ref(x_t) / pi(x_t), never negative (k3);
- :func:`kl_full`: sum_t KL_t, the per-token KL computed over the whole vocabulary.

:func:`kl_penalized_rewards` turns a sequence score into the per-token rewards of the KL-regularized
objective, as in Ziegler et al. (2019) and TRL.
"""

from __future__ import annotations

import torch


def check_pair(a: torch.Tensor, b: torch.Tensor, names: tuple[str, str], ndim: int, shape: str) -> None:
    if a.ndim != ndim or a.shape != b.shape:
        raise ValueError(f"{names[0]} and {names[1]} must both have shape {shape}, got {list(a.shape)} and "
                         f"{list(b.shape)}")


def kl_log_ratio(logp: torch.Tensor, ref_logp: torch.Tensor) -> torch.Tensor:
    """Per sequence (B,): the summed log-ratio at the sampled tokens, from log-probs (B, T) under pi and pi_ref."""
    check_pair(logp, ref_logp, ("logp", "ref_logp"), 2, "(B, T)")
    # $\hat{\mathrm{KL}}_1 = \sum_t \log \pi(x_t \mid x_{<t}) - \log \pi_{\mathrm{ref}}(x_t \mid x_{<t})$
    return (logp - ref_logp).sum(-1)


def kl_k3(logp: torch.Tensor, ref_logp: torch.Tensor) -> torch.Tensor:
    """Per sequence (B,): Schulman's k3 estimator summed over tokens, from log-probs (B, T) under pi and pi_ref."""
    check_pair(logp, ref_logp, ("logp", "ref_logp"), 2, "(B, T)")
    # $\log r_t = \log \pi_{\mathrm{ref}}(x_t \mid x_{<t}) - \log \pi(x_t \mid x_{<t})$
    log_ratio = ref_logp - logp
    # $\hat{\mathrm{KL}}_3 = \sum_t (r_t - 1) - \log r_t$, each term $\ge 0$
    return (log_ratio.exp() - 1 - log_ratio).sum(-1)


def kl_full(logits: torch.Tensor, ref_logits: torch.Tensor) -> torch.Tensor:
    """Per sequence (B,): the per-token KL over the whole vocabulary summed over positions, from logits (B, T, K)
    of pi and pi_ref at the prefixes of the sampled sequences."""
    check_pair(logits, ref_logits, ("logits", "ref_logits"), 3, "(B, T, K)")
    logp, ref_logp = logits.log_softmax(-1), ref_logits.log_softmax(-1)  # (B, T, K)
    # $\mathrm{KL}_t = \sum_k \pi(k \mid x_{<t}) \big(\log \pi(k \mid x_{<t}) - \log \pi_{\rm ref}(k \mid x_{<t})\big)$
    per_token = (logp.exp() * (logp - ref_logp)).sum(-1)  # (B, T)
    return per_token.sum(-1)


def kl_penalized_rewards(scores: torch.Tensor, logp: torch.Tensor, ref_logp: torch.Tensor,
                         kl_coef: float) -> torch.Tensor:
    """Per-token rewards (B, T) of the KL-regularized objective E[score] - beta KL(pi || pi_ref): minus beta
    times the log-ratio at every token, plus the sequence's score (B,) at its last token. Their sum over t is
    score - beta * :func:`kl_log_ratio`. Detached: rewards are constants of the update."""
    check_pair(logp, ref_logp, ("logp", "ref_logp"), 2, "(B, T)")
    if scores.shape != logp.shape[:1]:
        raise ValueError(f"scores must have shape (B,) = {list(logp.shape[:1])}, got {list(scores.shape)}")
    # $r_t = -\beta \big(\log \pi(x_t \mid x_{<t}) - \log \pi_{\mathrm{ref}}(x_t \mid x_{<t})\big)$
    rewards = -kl_coef * (logp - ref_logp).detach()
    # $r_{T-1} \mathrel{+}= R(x)$: the score arrives with the last token
    rewards[:, -1] += scores.detach()
    return rewards
