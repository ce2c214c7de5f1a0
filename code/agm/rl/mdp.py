r"""Markov decision processes, Chapter 49: a finite MDP solved exactly, and the value of a prefix of the token MDP.

A finite (tabular) MDP holds P[s, a, s'] = p(s' | s, a), shape (S, A, S), the expected reward r[s, a], shape
(S, A), and a discount gamma in [0, 1). A stochastic policy is a matrix pi[s, a] = pi(a | s), shape (S, A), whose
rows sum to one. Policy evaluation three ways (a linear solve, the Bellman operator iterated to its fixed
point, Monte-Carlo returns of simulated episodes), and value iteration for the optimal value.

The token MDP of the autoregressive transformer has a state for every prefix, 16^t of them after t tokens, so
no table holds its values: :func:`prefix_values` estimates V(s_t) = E[R(x) | prefix] by sampling continuations.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch

from agm.autoregressive.ar_transformer import ARTransformer

ATOL = 1e-6  # how far a row of probabilities may sum from one


@dataclass
class TabularMDP:
    P: torch.Tensor  # (S, A, S): P[s, a, s'] = p(s' | s, a)
    r: torch.Tensor  # (S, A): expected reward of action a in state s
    gamma: float  # discount, in [0, 1) so that every value is finite

    def __post_init__(self):
        if self.P.ndim != 3 or self.P.shape[0] != self.P.shape[2]:
            raise ValueError(f"P must have shape (S, A, S), got {list(self.P.shape)}")
        if self.r.shape != self.P.shape[:2]:
            raise ValueError(f"r must have shape (S, A) = {list(self.P.shape[:2])}, got {list(self.r.shape)}")
        if (self.P < 0).any() or not torch.allclose(self.P.sum(-1), torch.ones_like(self.P[..., 0]), atol=ATOL):
            raise ValueError("every row P[s, a, :] must be a probability vector (non-negative, summing to 1)")
        if not 0 <= self.gamma < 1:
            raise ValueError(f"gamma must lie in [0, 1) for an infinite-horizon MDP, got {self.gamma}")

    @property
    def states(self) -> int:
        return self.P.shape[0]

    @property
    def actions(self) -> int:
        return self.P.shape[1]


def check_policy(mdp: TabularMDP, policy: torch.Tensor) -> None:
    if policy.shape != (mdp.states, mdp.actions):
        raise ValueError(f"a policy must have shape (S, A) = {[mdp.states, mdp.actions]}, got {list(policy.shape)}")
    if (policy < 0).any() or not torch.allclose(policy.sum(-1), torch.ones_like(policy[:, 0]), atol=ATOL):
        raise ValueError("every row pi[s, :] of a policy must be a probability vector (non-negative, summing to 1)")


def chain_mdp(n: int = 5, slip: float = 0.1, near: float = 0.2, far: float = 1.0, gamma: float = 0.9) -> TabularMDP:
    """A corridor of n cells, actions 0 = left and 1 = right; a move goes the other way with probability ``slip``
    (walls keep the agent in place). Every step in the left end pays ``near``, every step in the right end ``far``."""
    if n < 2 or not 0 <= slip <= 1:
        raise ValueError(f"need n >= 2 cells and slip in [0, 1], got {n} and {slip}")
    P = torch.zeros(n, 2, n, dtype=torch.float64)
    for s in range(n):
        left, right = max(s - 1, 0), min(s + 1, n - 1)
        P[s, 0, left] += 1 - slip
        P[s, 0, right] += slip
        P[s, 1, right] += 1 - slip
        P[s, 1, left] += slip
    r = torch.zeros(n, 2, dtype=torch.float64)
    r[0], r[-1] = near, far
    return TabularMDP(P, r, gamma)


def random_mdp(states: int, actions: int, gamma: float, generator: torch.Generator) -> TabularMDP:
    """Transitions drawn uniformly from the simplex (Dirichlet(1)) and standard normal rewards."""
    P = -torch.rand(states, actions, states, generator=generator, dtype=torch.float64).log()  # Exp(1) draws
    r = torch.randn(states, actions, generator=generator, dtype=torch.float64)
    return TabularMDP(P / P.sum(-1, keepdim=True), r, gamma)


def policy_dynamics(mdp: TabularMDP, policy: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The Markov chain a policy induces: P_pi (S, S) and r_pi (S,)."""
    check_policy(mdp, policy)
    # $P_\pi(s' \mid s) = \sum_a \pi(a \mid s)\, p(s' \mid s, a)$
    P_pi = torch.einsum("sa,sat->st", policy, mdp.P)
    # $r_\pi(s) = \sum_a \pi(a \mid s)\, r(s, a)$
    r_pi = (policy * mdp.r).sum(-1)
    return P_pi, r_pi


def evaluate_policy(mdp: TabularMDP, policy: torch.Tensor) -> torch.Tensor:
    """V^pi (S,) exactly, by one linear solve of the Bellman expectation equation."""
    P_pi, r_pi = policy_dynamics(mdp, policy)
    # $V^\pi = (I - \gamma P_\pi)^{-1} r_\pi$
    return torch.linalg.solve(torch.eye(mdp.states, dtype=P_pi.dtype) - mdp.gamma * P_pi, r_pi)


def action_values(mdp: TabularMDP, V: torch.Tensor) -> torch.Tensor:
    """Q (S, A) from state values V (S,): one step of the dynamics, then V."""
    if V.shape != (mdp.states,):
        raise ValueError(f"V must have shape (S,) = [{mdp.states}], got {list(V.shape)}")
    # $Q(s, a) = r(s, a) + \gamma \sum_{s'} p(s' \mid s, a)\, V(s')$
    return mdp.r + mdp.gamma * mdp.P @ V


def bellman_operator(mdp: TabularMDP, policy: torch.Tensor, V: torch.Tensor) -> torch.Tensor:
    """One application of the Bellman expectation operator T^pi to V (S,)."""
    P_pi, r_pi = policy_dynamics(mdp, policy)
    # $(T^\pi V)(s) = r_\pi(s) + \gamma \sum_{s'} P_\pi(s' \mid s)\, V(s')$
    return r_pi + mdp.gamma * P_pi @ V


def iterative_policy_evaluation(mdp: TabularMDP, policy: torch.Tensor, sweeps: int,
                                V0: torch.Tensor | None = None) -> torch.Tensor:
    """V_0 = V0 (default 0) and V_{k+1} = T^pi V_k for k < ``sweeps``: every iterate, (sweeps + 1, S)."""
    if sweeps < 0:
        raise ValueError(f"sweeps must be >= 0, got {sweeps}")
    V = torch.zeros(mdp.states, dtype=mdp.r.dtype) if V0 is None else V0
    iterates = [V]
    for _ in range(sweeps):
        V = bellman_operator(mdp, policy, V)
        iterates.append(V)
    return torch.stack(iterates)


def truncation_horizon(gamma: float, r_max: float, tol: float) -> int:
    """The fewest steps H after which the rest of any return, at most gamma^H r_max / (1 - gamma), is below tol."""
    if not 0 < gamma < 1 or r_max <= 0 or tol <= 0:
        raise ValueError(f"need gamma in (0, 1), r_max > 0 and tol > 0, got {gamma}, {r_max}, {tol}")
    # $\gamma^H r_{\max} / (1 - \gamma) \le \mathrm{tol}$
    return max(0, math.ceil(math.log(tol * (1 - gamma) / r_max) / math.log(gamma)))


def sample_rows(probs: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """One index from each row of probabilities (N, K), by inverting the cumulative sums: (N,)."""
    u = torch.rand(len(probs), 1, generator=generator, dtype=probs.dtype)  # (N, 1)
    # $k = \#\{j : \sum_{i \le j} p_i \le u\}$
    return (probs.cumsum(-1) <= u).sum(-1).clamp(max=probs.shape[-1] - 1)


def monte_carlo_returns(mdp: TabularMDP, policy: torch.Tensor, starts: torch.Tensor, horizon: int,
                        generator: torch.Generator | None = None) -> torch.Tensor:
    """The discounted return of one simulated episode from each start state (N,), cut after ``horizon`` steps: (N,)."""
    check_policy(mdp, policy)
    if starts.ndim != 1 or starts.dtype != torch.long or ((starts < 0) | (starts >= mdp.states)).any():
        raise ValueError(f"starts must be a 1-D long tensor of states in 0..{mdp.states - 1}")
    s, G = starts.clone(), torch.zeros(len(starts), dtype=mdp.r.dtype)
    for t in range(horizon):
        a = sample_rows(policy[s], generator)  # (N,): a_t ~ pi(. | s_t)
        # $G_0 \mathrel{+}= \gamma^t r(s_t, a_t)$
        G += mdp.gamma ** t * mdp.r[s, a]
        s = sample_rows(mdp.P[s, a], generator)  # (N,): s_{t+1} ~ p(. | s_t, a_t)
    return G


def greedy_policy(Q: torch.Tensor) -> torch.Tensor:
    """The deterministic policy (S, A), one-hot, that picks argmax_a Q(s, a) (the first action in a tie)."""
    return torch.nn.functional.one_hot(Q.argmax(-1), Q.shape[-1]).to(Q.dtype)


def value_iteration(mdp: TabularMDP, tol: float = 1e-10, max_sweeps: int = 100_000
                    ) -> tuple[torch.Tensor, torch.Tensor, int]:
    """V* (S,), a greedy policy (S, A) and the number of sweeps, iterating the Bellman optimality operator until
    a sweep changes no value by ``tol`` or more (then every value is within gamma tol / (1 - gamma) of V*)."""
    V = torch.zeros(mdp.states, dtype=mdp.r.dtype)
    for sweep in range(1, max_sweeps + 1):
        # $V_{k+1}(s) = \max_a \big[r(s, a) + \gamma \sum_{s'} p(s' \mid s, a) V_k(s')\big]$
        V_next = action_values(mdp, V).max(-1).values
        if (V_next - V).abs().max() < tol:
            return V_next, greedy_policy(action_values(mdp, V_next)), sweep
        V = V_next
    raise RuntimeError(f"value iteration did not reach tol {tol} in {max_sweeps} sweeps")


# -- the token MDP: the value of a prefix, by sampling continuations ------------------------------------------


@dataclass
class PrefixValues:
    values: torch.Tensor  # (B,): Monte-Carlo estimate of V(s_t) = E[R(x) | prefix]
    standard_errors: torch.Tensor  # (B,): sd of the rewards / sqrt(n); NaN for n = 1
    rewards: torch.Tensor  # (B, n): R of every completed sequence
    tokens: torch.Tensor  # (B, n, T): the completed sequences, prefix included


@torch.no_grad()
def continue_prefixes(policy: ARTransformer, prefixes: torch.Tensor, n: int, generator: torch.Generator | None = None,
                      labels: torch.Tensor | None = None, chunk: int = 128) -> torch.Tensor:
    """n completions (B, n, T) of each prefix (B, t) drawn from ``policy`` in the context ``labels`` (B,) (None: the
    null context), ``chunk`` sequences at a time. A full-length prefix (t = T) is its own only completion."""
    T = policy.length
    if prefixes.ndim != 2 or prefixes.dtype != torch.long or prefixes.shape[1] > T or n < 1:
        raise ValueError(f"need prefixes of shape (B, t <= {T}), long, and n >= 1, got {list(prefixes.shape)}, n = {n}")
    B, t = prefixes.shape
    rows = prefixes.repeat_interleave(n, 0)  # (B n, t)
    if t == T:
        return rows.view(B, n, T)
    row_labels = None if labels is None else labels.repeat_interleave(n, 0)
    pieces = []
    for i in range(0, B * n, chunk):
        start = policy.context(len(rows[i:i + chunk]), None if labels is None else row_labels[i:i + chunk])
        # $x_{t:T} \sim \pi(\cdot \mid c, x_{<t})$, one token at a time
        pieces.append(policy.transformer.generate(torch.cat([start, rows[i:i + chunk]], 1), T - t, generator)[:, 1:])
    return torch.cat(pieces).view(B, n, T)


def prefix_values(policy: ARTransformer, reward_fn: Callable[[torch.Tensor, torch.Tensor | None], torch.Tensor],
                  prefixes: torch.Tensor, n: int, generator: torch.Generator | None = None,
                  labels: torch.Tensor | None = None, chunk: int = 128) -> PrefixValues:
    """V(s_t) of each prefix (B, t) of the token MDP, the mean reward of n sampled completions, and its standard
    error; ``reward_fn(tokens, labels)`` scores whole sequences (N, T) -> (N,)."""
    tokens = continue_prefixes(policy, prefixes, n, generator, labels, chunk)  # (B, n, T)
    B, T = len(prefixes), tokens.shape[-1]
    rewards = reward_fn(tokens.view(B * n, T), None if labels is None else labels.repeat_interleave(n, 0)).view(B, n)
    # $\hat V(s_t) = \frac1n \sum_i R(x^{(i)})$, $x^{(i)}_{<t}$ = the prefix
    values = rewards.mean(1)
    # $\mathrm{se} = \mathrm{sd}(R) / \sqrt n$
    standard_errors = rewards.std(1) / math.sqrt(n) if n > 1 else torch.full_like(values, float("nan"))
    return PrefixValues(values, standard_errors, rewards, tokens)
