r"""A reward model learned from pairwise preferences (Chapter 54).

A small convolutional network r_phi scores an image; it is fitted to the annotator's choices of
:mod:`agm.preference.pairs` by the Bradley–Terry likelihood, P(chosen > rejected) = sigmoid(r_phi(x_c) - r_phi(x_r)).
It never sees the hidden score, only which of two samples was chosen; Bradley–Terry identifies the reward up to an
additive constant, so r_phi can at best recover log p_clf(7 | x) + c. Images enter as the binary pictures the
policy's tokens decode to.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from agm.autoregressive.ar_transformer import detokenize
from agm.config import TrainConfig
from agm.preference.losses import bradley_terry_loss
from agm.preference.pairs import PreferencePairs, annotator_accuracy
from agm.train import fit_examples


def reward_model_training(**changes) -> TrainConfig:
    """Three passes over the training pairs in batches of 64; Adam at 1e-3 with a cosine decay."""
    return TrainConfig(**{"steps": None, "epochs": 3, "batch_size": 64, "lr": 1e-3, "lr_final": 1e-4} | changes)


@dataclass
class RewardModelConfig:
    width: int = 16  # channels of the first convolution (the second has twice as many)
    hidden: int = 64  # units of the layer before the scalar output
    pairs: int = 6000  # pairs drawn from the reference; the last ``held_out`` are never trained on
    held_out: int = 1000
    patch: int = 2  # the policy's tokens are 2x2 patches
    train: TrainConfig = field(default_factory=reward_model_training)

    def __post_init__(self):
        if not 0 < self.held_out < self.pairs:
            raise ValueError(f"held_out must lie in 1..pairs - 1, got {self.held_out} of {self.pairs}")


class RewardModel(nn.Module):
    """Binary images (B, 1, 28, 28) -> a scalar reward each, (B,)."""

    def __init__(self, config: RewardModelConfig):
        super().__init__()
        self.config = config
        w = config.width
        self.net = nn.Sequential(
            nn.Conv2d(1, w, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),  # (B, w, 14, 14)
            nn.Conv2d(w, 2 * w, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),  # (B, 2w, 7, 7)
            nn.Flatten(), nn.Linear(2 * w * 49, config.hidden), nn.ReLU(), nn.Linear(config.hidden, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.ndim != 4 or x.shape[1:] != (1, 28, 28):
            raise ValueError(f"expected images [B, 1, 28, 28], got {list(x.shape)}")
        return self.net(x - 0.5).squeeze(-1)

    def score_tokens(self, tokens: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        """r_phi of token sequences (B, T), decoded to images: the reward a policy is fine-tuned on."""
        return self(detokenize(tokens, self.config.patch))


def pair_loss(model: RewardModel, chosen: torch.Tensor, rejected: torch.Tensor) -> tuple[torch.Tensor, dict]:
    """The Bradley–Terry loss of r_phi on pairs of token sequences (B, T)."""
    return bradley_terry_loss(model.score_tokens(chosen), model.score_tokens(rejected))


def fit(config: RewardModelConfig, pairs: PreferencePairs) -> tuple[RewardModel, list[dict]]:
    """Fit r_phi to the first ``len(pairs) - held_out`` pairs; returns the model and its logged history."""
    train_pairs, _ = pairs.split(config.held_out)
    torch.manual_seed(config.train.seed)
    model = RewardModel(config)
    history = fit_examples(model, lambda m, batch, g: pair_loss(m, *batch), config.train, train_pairs.chosen,
                           train_pairs.rejected, desc="reward-model", log_every=20)
    return model.eval(), history


@torch.no_grad()
def score_pairs(model: RewardModel, pairs: PreferencePairs, batch_size: int = 1000) -> tuple[torch.Tensor, ...]:
    """r_phi of every chosen and every rejected sequence, (N,) each."""
    def scores(tokens):
        return torch.cat([model.score_tokens(tokens[i:i + batch_size]) for i in range(0, len(tokens), batch_size)])
    return scores(pairs.chosen), scores(pairs.rejected)


def spearman(a: torch.Tensor, b: torch.Tensor) -> float:
    """Spearman's rank correlation of two samples (N,) without ties."""
    ranks = [x.argsort().argsort().double() for x in (a, b)]
    return torch.corrcoef(torch.stack(ranks))[0, 1].item()


@torch.no_grad()
def reward_report(model: RewardModel, pairs: PreferencePairs) -> dict[str, float]:
    """How r_phi does on ``pairs``: the share of labels it agrees with (``accuracy``), beside the annotator's
    ceiling; the share of pairs it orders as the hidden score does; and the rank correlation of r_phi with the
    hidden score over all the pairs' samples."""
    r_c, r_r = score_pairs(model, pairs)
    s_c, s_r = pairs.chosen_scores, pairs.rejected_scores
    return {"accuracy": (r_c > r_r).float().mean().item(), "ceiling": annotator_accuracy(pairs),
            "order_agreement": ((r_c > r_r) == (s_c > s_r)).float().mean().item(),
            "spearman": spearman(torch.cat([r_c, r_r]), torch.cat([s_c, s_r])), "pairs": len(pairs)}
