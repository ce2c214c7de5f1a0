r"""The autoregressive transformer as an actor-critic for PPO (Chapter 52): one value head on its hidden states.

The value V(s_t) of position t is read from the same final hidden states (after the last LayerNorm) from which
the policy's head reads pi(x_t | y, x_<t): the state s_t is the context and the tokens before t, so values and
logits line up position by position, (B, T). By default the head reads those states detached: the value loss
then trains the head alone, and the policy moves only by its own loss (a shared trunk, as in CleanRL's Atari
agent, is ``detach_value=False``). The wrapped policy's parameters keep their names under
``policy.``, so a checkpoint of the ``ar-transformer`` loads into ``PolicyWithValue.policy`` unchanged.
"""

from __future__ import annotations

import torch
from torch import nn

from agm.autoregressive.ar_transformer import ARTransformer
from agm.distributions import categorical_log_prob


class PolicyWithValue(nn.Module):
    """An :class:`ARTransformer` policy and a linear value head on its final hidden states."""

    def __init__(self, policy: ARTransformer, detach_value: bool = True):
        super().__init__()
        self.policy = policy
        # True: the value loss trains the head alone and never moves the policy's features (nor its logits)
        self.detach_value = detach_value
        self.value_head = nn.Linear(policy.config.width, 1)
        nn.init.zeros_(self.value_head.weight)  # V = 0 at the start: the first advantages are the returns
        nn.init.zeros_(self.value_head.bias)

    def forward(self, tokens: torch.Tensor, labels: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Logits (B, T, K) of pi(x_t | y, x_<t) — those of the policy itself — and values V(s_t) (B, T)."""
        p = self.policy
        p.check_tokens(tokens)
        inputs = torch.cat([p.context(len(tokens), labels, tokens.device), tokens[:, :-1]], 1)  # (B, T)
        h = p.transformer.features(inputs)  # (B, T, C)
        return p.transformer.head(h), self.value_head(h.detach() if self.detach_value else h).squeeze(-1)

    def token_log_probs(self, tokens: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        """log pi(x_t | y, x_<t) of every token, (B, T), as :meth:`ARTransformer.token_log_probs`."""
        logits, _ = self(tokens, labels)
        return categorical_log_prob(logits, tokens)

    def sample_tokens(self, n: int, labels: torch.Tensor | None = None,
                      generator: torch.Generator | None = None) -> torch.Tensor:
        """n sequences (n, T) drawn from the policy at temperature 1 (on-policy)."""
        return self.policy.sample_tokens(n, labels, generator)
