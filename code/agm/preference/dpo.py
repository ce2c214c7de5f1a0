r"""Direct preference optimization of the autoregressive transformer (Chapter 55).

The policy pi_theta starts as the shipped ``ar-transformer`` in its null context and the frozen reference
pi_ref is the same checkpoint, as in Chapters 50–53. DPO (Rafailov et al., 2023) fits the policy to the
annotator's pairs of :mod:`agm.preference.pairs` by the Bradley–Terry likelihood of its implicit reward
beta log pi_theta(x) / pi_ref(x): no reward model, no sampling during training. The log-probabilities are exact
sums over the 196 tokens of each sequence.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from agm.autoregressive.ar_transformer import ARConfig, ARTransformer
from agm.config import TrainConfig
from agm.preference.losses import dpo_loss
from agm.preference.pairs import PreferencePairs
from agm.train import fit_examples


def dpo_training(**changes) -> TrainConfig:
    """Three passes over the training pairs in batches of 32 pairs, Adam at 3e-5 (in a probe at this rate, the
    held-out accuracy of the implicit rewards still rose at the third pass; at 1e-5, two passes left it lower)."""
    return TrainConfig(**{"steps": None, "epochs": 3, "batch_size": 32, "lr": 3e-5, "grad_clip": 1.0} | changes)


@dataclass
class DPOConfig:
    beta: float = 0.1  # of the implicit reward beta log pi / pi_ref, the KL coefficient of the objective
    pairs: int = 6000  # the reward model's pairs (the same draw); the last ``held_out`` are never trained on
    held_out: int = 1000
    policy: ARConfig = field(default_factory=ARConfig)  # the reference's architecture
    train: TrainConfig = field(default_factory=dpo_training)

    def __post_init__(self):
        if not self.beta > 0:
            raise ValueError(f"DPO's beta must be > 0, got {self.beta}")
        if not 0 < self.held_out < self.pairs:
            raise ValueError(f"held_out must lie in 1..pairs - 1, got {self.held_out} of {self.pairs}")


def sequence_log_prob(model: nn.Module, tokens: torch.Tensor, batch_size: int | None = None) -> torch.Tensor:
    """log pi(x) = sum_t log pi(x_t | null, x_<t) of sequences (B, T) in the null context, (B,), ``batch_size``
    sequences per forward pass (None: all at once). Differentiable."""
    step = batch_size or max(len(tokens), 1)
    return torch.cat([model.token_log_probs(tokens[i:i + step]).sum(1) for i in range(0, len(tokens), step)])


@torch.no_grad()
def implicit_rewards(policy: nn.Module, reference: nn.Module, pairs: PreferencePairs, beta: float,
                     batch_size: int = 250) -> tuple[torch.Tensor, torch.Tensor]:
    """beta log pi(x) / pi_ref(x) of every chosen and every rejected sequence, (N,) each."""
    def reward(tokens):
        return beta * (sequence_log_prob(policy, tokens, batch_size) - sequence_log_prob(reference, tokens, batch_size))
    return reward(pairs.chosen), reward(pairs.rejected)


def fit(config: DPOConfig, reference: ARTransformer, pairs: PreferencePairs) -> tuple[ARTransformer, list[dict]]:
    """DPO on the first ``len(pairs) - held_out`` pairs from a copy of ``reference``; returns the policy and its
    logged history (loss, implicit rewards, their accuracy and margin)."""
    train_pairs, _ = pairs.split(config.held_out)
    reference = reference.eval().requires_grad_(False)
    with torch.no_grad():  # the reference's log-probs never change: computed once
        ref_chosen = sequence_log_prob(reference, train_pairs.chosen, 250)
        ref_rejected = sequence_log_prob(reference, train_pairs.rejected, 250)
    torch.manual_seed(config.train.seed)
    policy = ARTransformer(config.policy)
    policy.load_state_dict(reference.state_dict())

    def loss(model: ARTransformer, index: torch.Tensor, generator) -> tuple[torch.Tensor, dict]:
        logps = sequence_log_prob(model, torch.cat([train_pairs.chosen[index], train_pairs.rejected[index]]))
        chosen, rejected = logps.chunk(2)  # one forward pass over the 2b sequences
        return dpo_loss(chosen, rejected, ref_chosen[index], ref_rejected[index], config.beta)

    history = fit_examples(policy, loss, config.train, torch.arange(len(train_pairs)), desc="dpo", log_every=10)
    return policy.eval(), history


def population_dpo_loss(logits: torch.Tensor, ref_logits: torch.Tensor, rewards: torch.Tensor,
                        beta: float) -> torch.Tensor:
    r"""The DPO loss of the categorical policy softmax(``logits``) over N outcomes in expectation over its data:
    two outcomes drawn from pi_ref x pi_ref, pi_ref = softmax(``ref_logits``), and labelled by the Bradley–Terry
    probabilities sigmoid(r(a) - r(b)) of ``rewards`` (N,). Every (chosen, rejected) pair is enumerated, so the
    value is exact; differentiable in ``logits``."""
    if not (logits.ndim == 1 and logits.shape == ref_logits.shape == rewards.shape and len(logits) > 0):
        raise ValueError(f"logits, ref_logits and rewards must each have shape (N,), got {list(logits.shape)}, "
                         f"{list(ref_logits.shape)} and {list(rewards.shape)}")
    if not beta > 0:
        raise ValueError(f"beta must be > 0, got {beta}")
    logsigmoid = torch.nn.functional.logsigmoid
    log_ref = ref_logits.log_softmax(0)
    # $\hat r(x) = \beta \log \pi_\theta(x) / \pi_{\mathrm{ref}}(x)$, the implicit reward (N,)
    implicit = beta * (logits.log_softmax(0) - log_ref)
    # $P(a \succ b) = 2\,\pi_{\rm ref}(a)\,\pi_{\rm ref}(b)\,\sigma(r(a) - r(b))$, drawn as (a, b) or (b, a); (N, N)
    weights = 2 * (log_ref[:, None] + log_ref[None, :] + logsigmoid(rewards[:, None] - rewards[None, :])).exp()
    # $\mathcal{L} = -\sum_{a, b} P(a \succ b)\, \log\sigma(\hat r(a) - \hat r(b))$
    return -(weights * logsigmoid(implicit[:, None] - implicit[None, :])).sum()
