"""f-divergences (Chapters 2–4): generators f, convex conjugates f*, the f-GAN output activations.

D_f(P || Q) = E_Q[ f(p(x) / q(x)) ] for convex f with f(1) = 0. Each divergence carries the
output activation g_f of Nowozin et al. (2016, Table 2), which maps a critic's unconstrained output
v into the domain of f*, so that E_P[g_f(V)] - E_Q[f*(g_f(V))] is a lower bound on D_f.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from agm.distributions import bernoulli_log_prob
from agm.train import train_loop

Fn = Callable[[torch.Tensor], torch.Tensor]
LOG2 = math.log(2.0)


@dataclass(frozen=True)
class FDivergence:
    name: str
    f: Fn  # generator, convex on u > 0, with f(1) = 0 (the GAN generator: f(1) = -log 4)
    conjugate: Fn  # f*(t) = sup_u { t u - f(u) }
    activation: Fn  # g_f: R -> dom f*
    conjugate_domain: tuple[float, float]  # (lo, hi): where f* is finite and g_f takes its values
    formula: str  # D_f in LaTeX, for the book's table
    slope_at_infinity: float  # f'(inf) = lim f(u)/u: the weight of mass of P where q = 0 (Chapter 2's conventions)
    f_tex: str = ""
    conjugate_tex: str = ""
    activation_tex: str = ""


def _xlogx(u: torch.Tensor) -> torch.Tensor:
    return torch.xlogy(u, u)


DIVERGENCES: dict[str, FDivergence] = {
    d.name: d
    for d in [
        FDivergence(
            "kl", f=_xlogx,  # $f(u) = u\log u$
            conjugate=lambda t: torch.exp(t - 1), activation=lambda v: v,
            conjugate_domain=(-math.inf, math.inf), formula=r"\int p \log\frac{p}{q}", slope_at_infinity=math.inf,
            f_tex=r"u \log u", conjugate_tex=r"e^{t-1}", activation_tex=r"v",
        ),
        FDivergence(
            "reverse-kl", f=lambda u: -torch.log(u),  # $f(u) = -\log u$
            conjugate=lambda t: -1 - torch.log(-t), activation=lambda v: -torch.exp(-v),
            conjugate_domain=(-math.inf, 0.0), formula=r"\int q \log\frac{q}{p}", slope_at_infinity=0.0,
            f_tex=r"-\log u", conjugate_tex=r"-1-\log(-t)", activation_tex=r"-e^{-v}",
        ),
        FDivergence(
            # $f(u) = \tfrac12[u\log u - (u+1)\log\tfrac{u+1}{2}]$: exactly JS, bounded by log 2.
            # (Nowozin et al. list twice this generator, whose divergence is 2 JS.)
            "jensen-shannon", f=lambda u: 0.5 * (_xlogx(u) - (u + 1) * torch.log((u + 1) / 2)),
            conjugate=lambda t: -0.5 * torch.log(2 - torch.exp(2 * t)),
            activation=lambda v: 0.5 * (LOG2 - F.softplus(-v)),
            conjugate_domain=(-math.inf, 0.5 * LOG2),
            formula=r"\tfrac12 \int p \log\frac{2p}{p+q} + q \log\frac{2q}{p+q}", slope_at_infinity=0.5 * LOG2,
            f_tex=r"\tfrac12\big[u\log u-(u+1)\log\tfrac{u+1}{2}\big]", conjugate_tex=r"-\tfrac12\log(2-e^{2t})",
            activation_tex=r"\tfrac12\big(\log 2-\log(1+e^{-v})\big)",
        ),
        FDivergence(
            "total-variation", f=lambda u: 0.5 * (u - 1).abs(),  # $f(u) = \tfrac12|u-1|$
            conjugate=lambda t: t, activation=lambda v: 0.5 * torch.tanh(v),
            conjugate_domain=(-0.5, 0.5), formula=r"\tfrac12 \int \lvert p - q\rvert", slope_at_infinity=0.5,
            f_tex=r"\tfrac12\lvert u-1\rvert", conjugate_tex=r"t", activation_tex=r"\tfrac12\tanh v",
        ),
        FDivergence(
            "pearson-chi2", f=lambda u: (u - 1) ** 2,  # $f(u) = (u-1)^2$
            conjugate=lambda t: t**2 / 4 + t, activation=lambda v: v,
            # with f extended to all of R, as in Nowozin et al.; for t >= -2 it is also the
            # conjugate over u >= 0, and for t < -2 it bounds that conjugate from above.
            conjugate_domain=(-math.inf, math.inf), formula=r"\int \frac{(p-q)^2}{q}", slope_at_infinity=math.inf,
            f_tex=r"(u-1)^2", conjugate_tex=r"\tfrac14 t^2+t", activation_tex=r"v",
        ),
        FDivergence(
            "squared-hellinger", f=lambda u: (torch.sqrt(u) - 1) ** 2,  # $f(u) = (\sqrt u - 1)^2$
            conjugate=lambda t: t / (1 - t), activation=lambda v: 1 - torch.exp(-v),
            conjugate_domain=(-math.inf, 1.0), formula=r"\int (\sqrt p - \sqrt q)^2", slope_at_infinity=1.0,
            f_tex=r"(\sqrt u-1)^2", conjugate_tex=r"\frac{t}{1-t}", activation_tex=r"1-e^{-v}",
        ),
        FDivergence(
            # $f(u) = u\log u - (u+1)\log(u+1)$: the GAN objective, 2 JS - log 4.
            "gan", f=lambda u: _xlogx(u) - (u + 1) * torch.log(u + 1),
            conjugate=lambda t: -torch.log(1 - torch.exp(t)), activation=lambda v: -F.softplus(-v),
            conjugate_domain=(-math.inf, 0.0), formula=r"\int p \log\frac{2p}{p+q} + q\log\frac{2q}{p+q} - \log 4",
            slope_at_infinity=0.0,
            f_tex=r"u\log u-(u+1)\log(u+1)", conjugate_tex=r"-\log(1-e^{t})", activation_tex=r"-\log(1+e^{-v})",
        ),
    ]
}


def get(name: str) -> FDivergence:
    if name not in DIVERGENCES:
        raise ValueError(f"unknown f-divergence {name!r}; choose one of {', '.join(DIVERGENCES)}")
    return DIVERGENCES[name]


def divergence_from_ratios(name: str, log_ratio: torch.Tensor) -> torch.Tensor:
    """Monte Carlo D_f(P||Q) = E_Q[f(p/q)] from log p(x) - log q(x) at samples x ~ Q."""
    # $D_f(P\|Q) \approx \frac1n \sum_i f\big(p(x_i)/q(x_i)\big),\ x_i \sim Q$
    return get(name).f(log_ratio.double().exp()).mean()


def fenchel_bound(name: str, v_p: torch.Tensor, v_q: torch.Tensor) -> torch.Tensor:
    """The variational lower bound E_P[T] - E_Q[f*(T)] with T = g_f(V), critic outputs V on P and Q."""
    d = get(name)
    # $D_f(P\|Q) \ge \mathbb{E}_P[T(x)] - \mathbb{E}_Q[f^*(T(x))]$
    return d.activation(v_p).mean() - d.conjugate(d.activation(v_q)).mean()


# --- exact values for independent-pixel Bernoulli models (the book's MNIST-derived references) ---

def binary_states(dims: int) -> torch.Tensor:
    """All 2^dims binary images of ``dims`` pixels, ``[2^dims, dims]``; row s holds the bits of s."""
    return ((torch.arange(2**dims)[:, None] >> torch.arange(dims)) & 1).double()


def bernoulli_pmf(probs: torch.Tensor) -> torch.Tensor:
    """The probability of every state of :func:`binary_states` under independent pixels ``probs`` (D <= 20)."""
    probs = probs.double().flatten()
    if len(probs) > 20:
        raise ValueError(f"exact enumeration needs at most 20 pixels, got {len(probs)}")
    return bernoulli_log_prob(binary_states(len(probs)), probs).exp()


def divergence_exact(name: str, p: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """D_f(P||Q) between two distributions on the same finite set, given as probability vectors, with Chapter 2's
    conventions where q vanishes: 0 where p does too, p f'(inf) where it does not (+inf for KL)."""
    d, seen = get(name), q > 0
    # $D_f(P\|Q) = \sum_{q(x) > 0} q(x) f(p(x)/q(x)) + f'(\infty) \sum_{q(x) = 0} p(x)$
    inside = (q[seen] * d.f(p[seen] / q[seen])).sum()
    outside = p[~seen].sum()
    return inside + (outside * d.slope_at_infinity if outside > 0 else torch.zeros_like(inside))


def bernoulli_kl(p: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """KL between independent-pixel Bernoulli models: a sum of per-pixel KLs."""
    p, q = p.double().flatten(), q.double().flatten()
    # $\mathrm{KL}(P\|Q) = \sum_d p_d\log\frac{p_d}{q_d} + (1-p_d)\log\frac{1-p_d}{1-q_d}$
    return (torch.xlogy(p, p / q) + torch.xlogy(1 - p, (1 - p) / (1 - q))).sum()


def bernoulli_exact(name: str, p: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """D_f between independent-pixel Bernoulli models by summing over all 2^D images (D <= 20)."""
    return divergence_exact(name, bernoulli_pmf(p), bernoulli_pmf(q))


# --- estimating a divergence with a trained critic (Chapter 3) ----------------------------------

def critic_mlp(dim: int, hidden: int = 64) -> torch.nn.Module:
    """A small critic V: R^dim -> R."""
    return torch.nn.Sequential(
        torch.nn.Linear(dim, hidden), torch.nn.ReLU(),
        torch.nn.Linear(hidden, hidden), torch.nn.ReLU(),
        torch.nn.Linear(hidden, 1), torch.nn.Flatten(0),
    )


def fit_critic(
    name: str, sample_p: Callable[[int], torch.Tensor], sample_q: Callable[[int], torch.Tensor], dim: int,
    steps: int, batch_size: int = 256, lr: float = 1e-3, eval_every: int = 50, eval_size: int = 20_000,
) -> tuple[torch.nn.Module, list[tuple[int, float]]]:
    """Maximize the Fenchel bound over a critic; return it and the bound on held-out samples over training."""
    critic = critic_mlp(dim)
    held_p, held_q = sample_p(eval_size), sample_q(eval_size)
    pairs = ((sample_p(batch_size), sample_q(batch_size)) for _ in itertools.count())

    def loss_fn(critic: torch.nn.Module, batch: tuple[torch.Tensor, torch.Tensor]):
        bound = fenchel_bound(name, critic(batch[0]), critic(batch[1]))
        return -bound, {"bound": bound.detach()}

    held_out = []

    def evaluate(step: int, logs: dict) -> None:
        if step % eval_every == 0 or step == steps:
            with torch.no_grad():
                held_out.append((step, fenchel_bound(name, critic(held_p), critic(held_q)).item()))

    train_loop(critic, loss_fn, pairs, torch.optim.Adam(critic.parameters(), lr=lr), steps,
               log_every=eval_every, desc=f"critic ({name})", on_step=evaluate)
    return critic, held_out
