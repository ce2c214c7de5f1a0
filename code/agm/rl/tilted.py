r"""The optimum of the KL-regularized objective, the reference tilted by its reward (Chapter 51).

J(pi) = E_pi[R] - beta KL(pi || pi_ref) is maximized over all distributions by pi* ∝ pi_ref exp(R / beta), with
J(pi*) = beta log Z. On a set small enough to enumerate, :func:`tilt` and :func:`regularized_objective` compute
both exactly. On images, :func:`tilted_estimates` estimates what pi* would achieve from samples of pi_ref alone,
by self-normalized importance sampling with weights exp(R(x_i) / beta).
"""

from __future__ import annotations

import math

import torch


def check_beta(beta: float) -> None:
    if not (isinstance(beta, int | float) and math.isfinite(beta) and beta > 0):
        raise ValueError(f"beta must be a finite number > 0, got {beta!r}")


def check_vector(name: str, value: torch.Tensor, length: int | None = None) -> None:
    if value.ndim != 1 or len(value) == 0 or (length is not None and len(value) != length):
        expected = "(N,)" if length is None else f"(N,) = [{length}]"
        raise ValueError(f"{name} must have shape {expected} with N >= 1, got {list(value.shape)}")
    if not torch.isfinite(value).all():
        raise ValueError(f"{name} must be finite")


def tilt(log_ref: torch.Tensor, rewards: torch.Tensor, beta: float) -> torch.Tensor:
    """log pi*(x) (N,) of the reference tilted by its reward, over N enumerated outcomes with log pi_ref (N,)."""
    check_beta(beta)
    check_vector("log_ref", log_ref)
    check_vector("rewards", rewards, len(log_ref))
    # $\pi^*(x) = \pi_{\rm ref}(x)\, e^{R(x)/\beta} / Z$
    return (log_ref + rewards / beta).log_softmax(0)


def regularized_objective(log_pi: torch.Tensor, log_ref: torch.Tensor, rewards: torch.Tensor,
                          beta: float) -> torch.Tensor:
    """J(pi) = E_pi[R] - beta KL(pi || pi_ref) over N enumerated outcomes, from log pi, log pi_ref and R (N,)."""
    check_beta(beta)
    check_vector("log_pi", log_pi)
    check_vector("log_ref", log_ref, len(log_pi))
    check_vector("rewards", rewards, len(log_pi))
    pi = log_pi.exp()
    # $J(\pi) = \sum_x \pi(x) R(x) - \beta \sum_x \pi(x) \log \frac{\pi(x)}{\pi_{\rm ref}(x)}$
    return (pi * rewards).sum() - beta * (pi * (log_pi - log_ref)).sum()


def tilted_estimates(rewards: torch.Tensor, beta: float, log_base: torch.Tensor | None = None,
                     statistics: dict[str, torch.Tensor] | None = None) -> dict[str, float]:
    r"""What pi* ∝ pi_ref exp(R / beta) achieves, from N outcomes x_i of pi_ref with their rewards R(x_i) (N,).

    ``log_base`` (N,) weighs the outcomes by pi_ref (log-weights, any constant shift): None for N samples of
    pi_ref, each of weight 1/N; log pi_ref(x_i) when the x_i are every outcome of an enumerable pi_ref, and then
    every estimate is exact. ``statistics`` maps names to values f(x_i) (N,) whose mean under pi* is wanted.

    Returns ``log_partition`` (log Z), ``objective`` (J(pi*) = beta log Z), ``reward`` (E_pi*[R]), ``kl``
    (KL(pi* || pi_ref) = E_pi*[R] / beta - log Z), ``ess`` ((sum w)^2 / sum w^2 of the normalized weights,
    as a count of outcomes when ``log_base`` is None), ``ess_fraction`` (E_ref[w]^2 / E_ref[w^2], in (0, 1]),
    and the mean under pi* of every statistic.
    """
    check_beta(beta)
    check_vector("rewards", rewards)
    n = len(rewards)
    rewards = rewards.double()
    log_base = torch.zeros(n, dtype=torch.float64) if log_base is None else log_base.double()
    check_vector("log_base", log_base, n)
    statistics = statistics or {}
    reserved = {"log_partition", "objective", "reward", "kl", "ess", "ess_fraction"}
    for name, values in statistics.items():
        if name in reserved:
            raise ValueError(f"a statistic may not be called {name!r}: that name is one of the estimates")
        check_vector(f"statistic {name!r}", values, n)
    # $\bar b_i = b_i / \sum_j b_j$: the reference's weight of each outcome ($1/N$ for samples)
    log_b = log_base.log_softmax(0)
    # $\log w_i = R(x_i)/\beta$, the tilt; $\bar w_i \propto \bar b_i w_i$, the weights of $\pi^*$
    log_tilted = log_b + rewards / beta
    # $\log \hat Z = \log \sum_i \bar b_i\, e^{R(x_i)/\beta}$
    log_z = torch.logsumexp(log_tilted, 0)
    w = (log_tilted - log_z).exp()  # (N,), sums to one
    # $\hat{\mathbb{E}}_{\pi^*}[R] = \sum_i \bar w_i R(x_i)$
    reward = (w * rewards).sum()
    # $\widehat{\mathrm{KL}}(\pi^* \| \pi_{\rm ref}) = \hat{\mathbb{E}}_{\pi^*}[R]/\beta - \log \hat Z$
    kl = reward / beta - log_z
    # $\mathrm{ESS}/N$ with base weights: $(\sum_i \bar b_i e^{R_i/\beta})^2 / \sum_i \bar b_i e^{2R_i/\beta}$
    # $= 1 / \sum_i \bar w_i^2 / \bar b_i$
    ess_fraction = 1 / (w.pow(2) / log_b.exp()).sum()
    out = {"log_partition": log_z.item(), "objective": beta * log_z.item(), "reward": reward.item(),
           "kl": kl.item(), "ess": 1 / w.pow(2).sum().item(), "ess_fraction": ess_fraction.item()}
    return out | {name: (w * values.double()).sum().item() for name, values in statistics.items()}
