r"""The models of Chapters 54–55: ``preference-pairs`` (the data), ``reward-model``, ``ppo-rm`` (PPO on the learned
reward) and ``dpo``.

``preference-pairs`` holds 6 000 pairs of samples of the shipped ``ar-transformer`` labelled by an annotator whose
hidden score is the ``classifier``'s log p(7 | x) (:mod:`agm.preference.pairs`), drawn once and shipped like a
checkpoint. ``reward-model`` and ``dpo`` learn from it and require it; the last ``held_out`` pairs are never trained
on. ``ppo-rm`` and ``dpo`` are measured as the fine-tunes of Chapters 50–53 are (:func:`agm.rl.models.policy_report`),
so that the results page compares them in one table.
"""

from __future__ import annotations

import torch
from torch import nn

from agm.autoregressive.ar_transformer import ARTransformer
from agm.config import from_dict, to_dict
from agm.preference import dpo, reward_model
from agm.preference.dpo import DPOConfig
from agm.preference.pairs import PairsConfig, PairsData, PreferencePairs, annotator_accuracy, cached_pairs
from agm.preference.reward_model import RewardModel, RewardModelConfig
from agm.registry import ModelSpec, TrainResult, register
from agm.rl import finetune
from agm.rl import models as rl_models
from agm.rl.finetune import FinetuneConfig
from agm.runtime import budget

REWARD_HACKING = {"kl_coef": 0.01, "lr": 2e-5}  # ppo-rm: a weak KL penalty, so that the learned reward is pushed


def pair_budget() -> dict[str, int]:
    """How many pairs the learners read and how many of the last they hold out (smoke: the first few dozen)."""
    return {"pairs": budget(PairsConfig.pairs, 48), "held_out": budget(1000, 8)}


def pairs_of(parents: dict[str, nn.Module], n: int) -> PreferencePairs:
    """The first n pairs of the ``preference-pairs`` among ``parents``."""
    return parents["preference-pairs"].pairs(n)


def shipped_parents() -> dict[str, nn.Module]:
    """The shipped reference, classifier and pairs."""
    from agm import registry

    return {name: registry.load_model(name)[0] for name in ("ar-transformer", "classifier", "preference-pairs")}


# preference-pairs ------------------------------------------------------------------------------------------


def train_pairs(seed: int = 0, parents: dict | None = None) -> TrainResult:
    """Draw the pairs (``--seed`` seeds the draw); cached in data/cache by the parents' weights."""
    config = PairsConfig(pairs=pair_budget()["pairs"], seed=seed, length=parents["ar-transformer"].length)
    pairs = cached_pairs(parents["ar-transformer"], parents["classifier"], config.pairs, config.seed)
    return TrainResult(PairsData.of(pairs, config), to_dict(config), steps=1)


def evaluate_pairs(data: PairsData) -> dict[str, float]:
    """The annotator's ceiling over all pairs, and the share of pairs with at least one sample the classifier
    finds likelier a seven than not."""
    pairs = data.pairs()
    half = torch.log(torch.tensor(0.5))
    return {"pairs": len(pairs), "ceiling": annotator_accuracy(pairs),
            "with_a_seven": ((pairs.chosen_scores > half) | (pairs.rejected_scores > half)).float().mean().item()}


# reward-model ----------------------------------------------------------------------------------------------


def reward_model_config(seed: int = 0) -> RewardModelConfig:
    train = reward_model.reward_model_training(epochs=budget(3, 1), batch_size=budget(64, 8), seed=seed)
    return RewardModelConfig(**pair_budget(), train=train)


def train_reward_model(seed: int = 0, parents: dict | None = None) -> TrainResult:
    config = reward_model_config(seed)
    pairs = pairs_of(parents, config.pairs)
    model, history = reward_model.fit(config, pairs)
    train_pairs, held_out = pairs.split(config.held_out)
    extra = {"history": history, "train_report": reward_model.reward_report(model, train_pairs)}
    return TrainResult(model, to_dict(config), steps=config.train.total_steps(len(train_pairs)), extra=extra)


def evaluate_reward_model(model: RewardModel) -> dict[str, float]:
    """:func:`agm.preference.reward_model.reward_report` on the held-out pairs."""
    from agm import registry

    pairs = registry.load_model("preference-pairs")[0].pairs(model.config.pairs)
    return reward_model.reward_report(model, pairs.split(model.config.held_out)[1])


# ppo-rm ----------------------------------------------------------------------------------------------------


def ppo_rm_config(policy, seed: int = 0) -> FinetuneConfig:
    config = rl_models.config_for("ppo", policy, seed)
    config.kl_coef, config.train.lr = REWARD_HACKING["kl_coef"], REWARD_HACKING["lr"]
    return config


def train_ppo_rm(seed: int = 0, parents: dict | None = None) -> TrainResult:
    """PPO on the learned reward; the history logs the hidden score beside it at every update, and the run
    records the learned reward of the samples its evaluation draws (``final_learned_reward``)."""
    reference, learned = parents["ar-transformer"], parents["reward-model"]
    config = ppo_rm_config(reference.config, seed)
    policy, history, snapshots = finetune.finetune(config, reference, parents["classifier"], reward_model=learned)
    tokens = rl_models.policy_samples(policy, rl_models.report_samples(), torch.Generator().manual_seed(0))
    with torch.no_grad():
        final = learned.score_tokens(tokens).mean().item()
    return TrainResult(policy, to_dict(config), steps=config.train.steps,
                       extra={"history": history, "snapshots": snapshots, "final_learned_reward": final})


def build_finetune(config: dict) -> nn.Module:
    return finetune.make_policy(from_dict(FinetuneConfig, config))


# dpo -------------------------------------------------------------------------------------------------------


def dpo_config(policy, seed: int = 0, beta: float = DPOConfig.beta) -> DPOConfig:
    train = dpo.dpo_training(epochs=budget(3, 1), batch_size=budget(32, 8), seed=seed)
    return DPOConfig(beta=beta, policy=policy, train=train, **pair_budget())


def train_dpo(seed: int = 0, parents: dict | None = None) -> TrainResult:
    reference = parents["ar-transformer"]
    config = dpo_config(reference.config, seed)
    policy, history = dpo.fit(config, reference, pairs_of(parents, config.pairs))
    return TrainResult(policy, to_dict(config), steps=config.train.total_steps(config.pairs - config.held_out),
                       extra={"history": history})


def build_dpo(config: dict) -> nn.Module:
    return ARTransformer(from_dict(DPOConfig, config).policy)


def evaluate_dpo(policy: nn.Module) -> dict[str, float]:
    """The fine-tunes' report, and the share of held-out pairs whose implicit rewards order the annotator's
    label (``held_out_accuracy``)."""
    config = dpo_config(policy.config)
    parents = shipped_parents()
    held_out = pairs_of(parents, config.pairs).split(config.held_out)[1]
    chosen, rejected = dpo.implicit_rewards(policy, parents["ar-transformer"], held_out, config.beta)
    return rl_models.evaluate(policy) | {"held_out_accuracy": (chosen > rejected).float().mean().item()}


# the reward-vs-KL frontier -------------------------------------------------------------------------------

FRONTIER_BETAS = (0.03, 0.3)  # DPO's other KL coefficients, beside the shipped dpo's 0.1


def dpo_beta_run(beta: float, log=print) -> dict:
    """DPO from the shipped reference at coefficient ``beta``, trained as the shipped ``dpo`` is, and measured as
    PPO's frontier runs are (:func:`agm.rl.models.frontier_report`)."""
    import time

    parents = shipped_parents()
    reference = parents["ar-transformer"]
    start = time.perf_counter()
    config = dpo_config(reference.config, beta=beta)
    policy, _ = dpo.fit(config, reference, pairs_of(parents, config.pairs))
    return rl_models.frontier_report(policy, reference, "dpo", beta, time.perf_counter() - start)


def evaluate_dpo_full(policy: nn.Module, log=print) -> dict:
    """``evaluate dpo --full``: DPO at the other coefficients of :data:`FRONTIER_BETAS` (with ``evaluate ppo
    --full``, the reward-vs-KL frontier of Chapter 55), each stored under ``frontier`` as it finishes."""
    import functools

    from agm import checkpoint

    plan = {f"dpo/beta{beta:g}": functools.partial(dpo_beta_run, beta, log=log) for beta in FRONTIER_BETAS}
    return {"frontier": checkpoint.fill_cells("dpo", "frontier", plan, log)}


def build_reward_model(config: dict) -> RewardModel:
    return RewardModel(from_dict(RewardModelConfig, config))


PARENTS = ("ar-transformer", "classifier")
SPECS = {
    "preference-pairs": ModelSpec(
        name="preference-pairs", chapter=54, build=lambda c: PairsData(from_dict(PairsConfig, c)), train=train_pairs,
        evaluate=evaluate_pairs, requires=PARENTS, train_minutes=10.0,
        summary="pairs of ar-transformer samples labelled by a Bradley–Terry annotator scoring sevens (data)"),
    "reward-model": ModelSpec(
        name="reward-model", chapter=54, build=build_reward_model, train=train_reward_model,
        evaluate=evaluate_reward_model, requires=("preference-pairs",), train_minutes=2.0,
        summary="Bradley–Terry reward model learned from pairwise preferences between ar-transformer samples"),
    "ppo-rm": ModelSpec(
        name="ppo-rm", chapter=54, build=build_finetune, train=train_ppo_rm, evaluate=rl_models.evaluate,
        sample=rl_models.sample, samples="binary images", requires=(*PARENTS, "reward-model"), train_minutes=30.0,
        kit=False, summary="ar-transformer fine-tuned by PPO on the learned reward model (reward hacking)"),
    "dpo": ModelSpec(
        name="dpo", chapter=55, build=build_dpo, train=train_dpo, evaluate=evaluate_dpo, sample=rl_models.sample,
        samples="binary images", requires=(*PARENTS, "preference-pairs"), train_minutes=15.0, kit=False,
        evaluate_full=evaluate_dpo_full,
        summary="ar-transformer fine-tuned by direct preference optimization on the pairs"),
}
for _spec in SPECS.values():
    register(_spec)
