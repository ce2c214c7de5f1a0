r"""Pairwise preferences between samples of the reference policy (Chapters 54–55).

Two sequences x_a, x_b are drawn from the shipped ``ar-transformer`` in its null context, and an annotator who
never shows its criterion says which it prefers. The book's annotator is simulated: it prefers x_a with the
Bradley–Terry probability of a hidden score s,

    P(x_a > x_b) = sigmoid(s(x_a) - s(x_b)),  s(x) = log p_clf(7 | x),

which is p_clf(7 | x_a) / (p_clf(7 | x_a) + p_clf(7 | x_b)): Bradley and Terry's (1952) form with strengths
p_clf(7 | x). The hidden score is the reward of Chapters 50–53, so a reward model learned from these labels and
DPO on them aim at the same optimum as the fine-tunes there. The labels are random: the hidden score orders a
pair's annotation correctly only with probability sigmoid(|s_a - s_b|), and no model can do better on fresh
labels than :func:`annotator_accuracy`.
"""

from __future__ import annotations

import hashlib
import os
import pickle
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn


@dataclass
class PreferencePairs:
    chosen: torch.Tensor  # (N, T) long: the preferred sequence of each pair
    rejected: torch.Tensor  # (N, T) long: the other one
    chosen_scores: torch.Tensor  # (N,): the hidden score s of the chosen sequence (for measurement only)
    rejected_scores: torch.Tensor  # (N,)

    def __post_init__(self):
        if self.chosen.ndim != 2 or self.chosen.shape != self.rejected.shape:
            raise ValueError(f"chosen and rejected must be token tensors of one shape (N, T), got "
                             f"{list(self.chosen.shape)} and {list(self.rejected.shape)}")
        n = len(self.chosen)
        if self.chosen_scores.shape != (n,) or self.rejected_scores.shape != (n,):
            raise ValueError(f"{n} pairs need scores of shape ({n},), got {list(self.chosen_scores.shape)} and "
                             f"{list(self.rejected_scores.shape)}")

    def __len__(self) -> int:
        return len(self.chosen)

    def select(self, index) -> PreferencePairs:
        return PreferencePairs(self.chosen[index], self.rejected[index], self.chosen_scores[index],
                               self.rejected_scores[index])

    def split(self, held_out: int) -> tuple[PreferencePairs, PreferencePairs]:
        """The first len - held_out pairs to learn from and the last ``held_out`` to measure on."""
        if not 0 < held_out < len(self):
            raise ValueError(f"held_out must lie in 1..{len(self) - 1}, got {held_out}")
        return self.select(slice(0, len(self) - held_out)), self.select(slice(len(self) - held_out, None))

    def state(self) -> dict[str, torch.Tensor]:
        return {"chosen": self.chosen, "rejected": self.rejected, "chosen_scores": self.chosen_scores,
                "rejected_scores": self.rejected_scores}


def label_pairs(a: torch.Tensor, b: torch.Tensor, score_a: torch.Tensor, score_b: torch.Tensor,
                generator: torch.Generator) -> PreferencePairs:
    """The annotator's choice between a[i] and b[i] for every i: a is chosen with probability
    sigmoid(score_a - score_b)."""
    # $P(a \succ b) = \sigma(s(a) - s(b))$
    a_wins = torch.rand(len(a), generator=generator) < torch.sigmoid(score_a - score_b)
    pick = a_wins.view(-1, *[1] * (a.ndim - 1))
    return PreferencePairs(torch.where(pick, a, b), torch.where(pick, b, a), torch.where(a_wins, score_a, score_b),
                           torch.where(a_wins, score_b, score_a))


def annotator_accuracy(pairs: PreferencePairs) -> float:
    """The expected share of pairs whose label the hidden score itself orders correctly,
    mean sigmoid(|s_a - s_b|): the ceiling of any model's accuracy on fresh labels from the annotator."""
    return torch.sigmoid((pairs.chosen_scores - pairs.rejected_scores).abs()).mean().item()


@torch.no_grad()
def sample_pairs(reference: torch.nn.Module, score: Callable[[torch.Tensor], torch.Tensor], n: int,
                 generator: torch.Generator, chunk: int = 500) -> PreferencePairs:
    """n pairs of unconditional samples of ``reference``, labelled by the annotator of hidden score ``score``
    (tokens (B, T) -> (B,))."""
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    tokens = torch.cat([reference.sample_tokens(min(chunk, 2 * n - i), None, generator)
                        for i in range(0, 2 * n, chunk)])
    scores = torch.cat([score(tokens[i:i + chunk]) for i in range(0, 2 * n, chunk)])
    return label_pairs(tokens[:n], tokens[n:], scores[:n], scores[n:], generator)


def state_digest(model: torch.nn.Module) -> str:
    """sha256 of a model's weights (names, shapes and values), to key what is cached about it."""
    h = hashlib.sha256()
    for name, value in sorted(model.state_dict().items()):
        h.update(name.encode())
        h.update(str(list(value.shape)).encode())
        h.update(value.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


def cached_pairs(reference: torch.nn.Module, classifier: torch.nn.Module, n: int, seed: int = 0) -> PreferencePairs:
    """:func:`sample_pairs` of ``reference`` under the hidden score log p_clf(7 | x) of ``classifier``: n pairs,
    drawn once with ``seed`` and cached in data/cache, keyed by both models' weights, so that the reward model,
    DPO and the chapters see the same pairs."""
    from agm.rl.finetune import DigitReward, FinetuneConfig
    from agm.runtime import data_root

    key = f"{state_digest(reference)[:12]}-{state_digest(classifier)[:12]}-{n}-{seed}"
    path = data_root() / "cache" / f"preference-pairs-{key}.pt"
    if path.is_file():
        try:
            return PreferencePairs(**torch.load(path, weights_only=True))
        except (RuntimeError, TypeError, ValueError, EOFError, pickle.UnpicklingError):
            path.unlink()  # a damaged cache file is drawn again
    score = DigitReward(classifier, FinetuneConfig.target, reference.config.patch)
    pairs = sample_pairs(reference, score, n, torch.Generator().manual_seed(seed))
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".{os.getpid()}.part")
    torch.save(pairs.state(), tmp)
    os.replace(tmp, path)
    return pairs


@dataclass
class PairsConfig:
    pairs: int = 6000  # drawn from the reference; the learners hold the last of them out
    seed: int = 0  # of the draw and of the annotator's choices
    length: int = 196  # tokens per sequence


class PairsData(nn.Module):
    """The pairs as a checkpoint the models of Chapters 54–55 require: tokens in 16 symbols stored as uint8
    buffers, the hidden scores as float32, so that a fresh clone reads them instead of sampling them again."""

    def __init__(self, config: PairsConfig):
        super().__init__()
        self.config = config
        n, T = config.pairs, config.length
        for name in ("chosen", "rejected"):
            self.register_buffer(name, torch.zeros(n, T, dtype=torch.uint8))
        for name in ("chosen_scores", "rejected_scores"):
            self.register_buffer(name, torch.zeros(n))

    @classmethod
    def of(cls, pairs: PreferencePairs, config: PairsConfig) -> PairsData:
        if pairs.chosen.shape != (config.pairs, config.length) or pairs.chosen.max() > 255:
            raise ValueError(f"expected {config.pairs} pairs of {config.length} tokens in 0..255, got "
                             f"{list(pairs.chosen.shape)}")
        data = cls(config)
        for name, value in pairs.state().items():
            getattr(data, name).copy_(value)
        return data

    def pairs(self, n: int | None = None) -> PreferencePairs:
        """The first n pairs (all by default) with long tokens."""
        n = len(self.chosen) if n is None else n
        if not 0 < n <= len(self.chosen):
            raise ValueError(f"asked for {n} pairs; this draw holds {len(self.chosen)}")
        return PreferencePairs(self.chosen[:n].long(), self.rejected[:n].long(), self.chosen_scores[:n].float(),
                               self.rejected_scores[:n].float())
