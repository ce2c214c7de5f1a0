r"""A rollout: sequences drawn from the policy with what the updates of Chapters 50–53 need about them.

A policy here is an :class:`agm.autoregressive.ar_transformer.ARTransformer` or a
:class:`agm.rl.policy.PolicyWithValue`; the reference pi_ref is a frozen copy of the policy before
fine-tuning. ``reward_fn(tokens, labels)`` scores whole sequences, (B,): for the book, the MNIST classifier's
log-probability of the target digit of the decoded image.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from agm.distributions import categorical_log_prob
from agm.rl.policy import PolicyWithValue


@dataclass
class Rollout:
    tokens: torch.Tensor  # (B, T) long: the sampled sequences
    labels: torch.Tensor | None  # (B,) long: their context labels; None = the null context
    logprobs: torch.Tensor  # (B, T): log pi_old(x_t | y, x_<t) under the policy that sampled them
    ref_logprobs: torch.Tensor  # (B, T): the same under the frozen reference pi_ref
    values: torch.Tensor | None  # (B, T): V(s_t) of the value head at sampling time; None without one
    rewards: torch.Tensor  # (B,): the score R(x) of each whole sequence

    def __post_init__(self):
        if self.tokens.ndim != 2:
            raise ValueError(f"tokens must have shape (B, T), got {list(self.tokens.shape)}")
        B, T = self.tokens.shape
        expected = {"labels": (B,), "logprobs": (B, T), "ref_logprobs": (B, T), "values": (B, T), "rewards": (B,)}
        for name, shape in expected.items():
            value = getattr(self, name)
            if value is not None and tuple(value.shape) != shape:
                raise ValueError(f"a rollout of tokens (B, T) = {[B, T]} needs {name} of shape {list(shape)}, "
                                 f"got {list(value.shape)}")
        if self.logprobs is None or self.ref_logprobs is None or self.rewards is None:
            raise ValueError("a rollout needs logprobs, ref_logprobs and rewards")

    def __len__(self) -> int:
        return len(self.tokens)

    def select(self, index: torch.Tensor) -> Rollout:
        """The rollout of the sequences at ``index`` (a minibatch)."""
        return Rollout(*(None if v is None else v[index] for v in (self.tokens, self.labels, self.logprobs,
                                                                   self.ref_logprobs, self.values, self.rewards)))


def sequence_log_probs(model: nn.Module, tokens: torch.Tensor, labels: torch.Tensor | None = None,
                       batch_size: int | None = None) -> torch.Tensor:
    """log pi(x_t | y, x_<t) (B, T) of every token of sequences (B, T) with context labels (B,) (None: the null
    context) under ``model`` — a policy or the frozen reference — ``batch_size`` sequences per forward pass
    (None: all at once). Differentiable: call it under ``torch.no_grad()`` for a rollout."""
    if tokens.ndim != 2:
        raise ValueError(f"tokens must have shape (B, T), got {list(tokens.shape)}")
    step = batch_size or max(len(tokens), 1)
    return torch.cat([model.token_log_probs(tokens[i:i + step], None if labels is None else labels[i:i + step])
                      for i in range(0, len(tokens), step)])


@torch.no_grad()
def collect_rollout(policy: nn.Module, reference: nn.Module,
                    reward_fn: Callable[[torch.Tensor, torch.Tensor | None], torch.Tensor], n: int,
                    labels: torch.Tensor | None = None, generator: torch.Generator | None = None) -> Rollout:
    """Draw n sequences from ``policy`` (through its KV cache) and record their log-probs under it and under
    ``reference``, the values of its value head (a :class:`PolicyWithValue`; else None) and their rewards."""
    tokens = policy.sample_tokens(n, labels, generator)  # (n, T)
    values = None
    if isinstance(policy, PolicyWithValue):
        logits, values = policy(tokens, labels)  # (n, T, K), (n, T)
        logprobs = categorical_log_prob(logits, tokens)
    else:
        logprobs = sequence_log_probs(policy, tokens, labels)
    ref_logprobs = sequence_log_probs(reference, tokens, labels)
    return Rollout(tokens, labels, logprobs, ref_logprobs, values, reward_fn(tokens, labels))
