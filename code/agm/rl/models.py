r"""The fine-tuned policies of Chapters 50–53 as models of the book: ``reinforce``, ``kl-policy``, ``ppo``, ``trpo``.

Each requires the ``ar-transformer`` (its starting point and reference) and the ``classifier`` (its reward), and
is measured by :func:`policy_report` on unconditional samples: the share the classifier reads as the target, the
KL to the reference per sequence, and the kit against the test images of the target digit.
"""

from __future__ import annotations

import math
import os

import numpy as np
import torch
from torch import nn

from agm.autoregressive.ar_transformer import ARConfig, ARTransformer, detokenize
from agm.config import from_dict, to_dict
from agm.data import check_images
from agm.registry import ModelSpec, TrainResult, refuse_labels, register
from agm.rl import finetune
from agm.rl.finetune import FinetuneConfig, bare
from agm.rl.kl import kl_full
from agm.runtime import budget

# beta and the learning rate of each method; everything else is FinetuneConfig's default
SETTINGS = {
    "reinforce": {"kl_coef": 0.0, "lr": 5e-5},
    "kl-policy": {"kl_coef": 0.1, "lr": 5e-5},
    "ppo": {"kl_coef": 0.1, "lr": 1e-5},
    "trpo": {"kl_coef": 0.1, "lr": 0.0},  # TRPO's step is set by max_kl, not by a learning rate
}
CHAPTERS = {"reinforce": 50, "kl-policy": 51, "ppo": 52, "trpo": 53}
SUMMARIES = {
    "reinforce": "ar-transformer fine-tuned by REINFORCE with a leave-one-out baseline to draw sevens",
    "kl-policy": "ar-transformer fine-tuned by REINFORCE on the KL-regularized score E[R] - beta KL",
    "ppo": "ar-transformer fine-tuned by PPO (clipped surrogate, value head, GAE) to draw sevens",
    "trpo": "ar-transformer fine-tuned by TRPO (natural gradient, conjugate gradient, line search)",
}


def config_for(method: str, policy: ARConfig, seed: int = 0) -> FinetuneConfig:
    setting = SETTINGS[method]
    config = FinetuneConfig(method=method, kl_coef=setting["kl_coef"], policy=policy,
                            rollout=budget(64, 8), train=finetune.finetune_training(lr=setting["lr"]))
    config.train = config.train.budgeted(seed)
    config.train.steps = budget(config.train.steps, 3)
    return config


def build(config: dict) -> nn.Module:
    return finetune.make_policy(from_dict(FinetuneConfig, config))


def trainer(method: str):
    def train(seed: int = 0, parents: dict | None = None) -> TrainResult:
        reference, classifier = parents["ar-transformer"], parents["classifier"]
        config = config_for(method, reference.config, seed)
        policy, history, snapshots = finetune.finetune(config, reference, classifier)
        return TrainResult(policy, to_dict(config), steps=config.train.steps,
                           extra={"history": history, "snapshots": snapshots})
    return train


@torch.no_grad()
def sequence_kl(policy: nn.Module, reference: ARTransformer, tokens: torch.Tensor, batch_size: int = 250
                ) -> torch.Tensor:
    """KL(pi || pi_ref) of each sequence (B,) sampled from pi: the per-token KL over the vocabulary, summed."""
    out = []
    for i in range(0, len(tokens), batch_size):
        t = tokens[i:i + batch_size]
        out.append(kl_full(bare(policy)(t), reference(t)))
    return torch.cat(out)


@torch.no_grad()
def policy_samples(policy: nn.Module, n: int, generator: torch.Generator) -> torch.Tensor:
    """n unconditional token sequences (n, T) of ``policy``, 500 at a time."""
    return torch.cat([bare(policy).sample_tokens(min(500, n - i), None, generator) for i in range(0, n, 500)])


@torch.no_grad()
def policy_report(policy: nn.Module, reference: ARTransformer, target: int, n: int,
                  generator: torch.Generator, tokens: torch.Tensor | None = None) -> dict[str, float]:
    """n unconditional samples of ``policy`` (or the given ``tokens``, drawn from it): the kit against the test
    images of ``target`` (:func:`agm.metrics.digit_metrics`), the mean classifier log-probability of the target,
    and the KL to the reference in nats per sequence with its standard error."""
    from agm.metrics import classifier_outputs, digit_metrics

    tokens = policy_samples(policy, n, generator) if tokens is None else tokens
    images = detokenize(tokens, bare(policy).config.patch)
    kl = sequence_kl(policy, reference, tokens).double()
    probs = classifier_outputs(images)[1][:, target].double()
    return digit_metrics(images, target) | {
        "reward": probs.clamp_min(1e-30).log().mean().item(),
        "kl_to_reference": kl.mean().item(), "kl_to_reference_se": (kl.std() / math.sqrt(len(kl))).item()}


def reference_report(n: int, target: int = FinetuneConfig.target) -> dict[str, float]:
    """:func:`policy_report` of the shipped ``ar-transformer`` itself on n samples (its KL is zero), the row every
    fine-tune is compared with; cached in data/cache, keyed by the sha256 of the reference and the classifier."""
    import json

    from agm import registry
    from agm.runtime import data_root

    reference, manifest = registry.load_model("ar-transformer")
    _, classifier_manifest = registry.load_model("classifier")
    key = f"{manifest.sha256[:12]}-{classifier_manifest.sha256[:12]}-{target}-{n}"
    path = data_root() / "cache" / f"policy-reference-{key}.json"
    if path.is_file():
        return json.loads(path.read_text())
    report = policy_report(reference, reference, target, n, torch.Generator().manual_seed(0))
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".{os.getpid()}.part")
    tmp.write_text(json.dumps(report))
    os.replace(tmp, path)
    return report


def evaluate(policy: nn.Module, tokens: torch.Tensor | None = None) -> dict[str, float]:
    """:func:`policy_report` on 1 000 samples (smoke: 130, just above what the FID of 128 features needs), or on
    ``tokens`` drawn from the policy, against the shipped reference."""
    from agm import registry

    reference, _ = registry.load_model("ar-transformer")
    return policy_report(policy, reference, FinetuneConfig.target, report_samples(), torch.Generator().manual_seed(0),
                         tokens)


def report_samples() -> int:
    return budget(1000, 130)


FRONTIER_BETAS = (0.03, 0.3)  # PPO's other KL coefficients, beside the shipped ppo's 0.1


def frontier_report(policy: nn.Module, reference: ARTransformer, method: str, beta: float, seconds: float) -> dict:
    """A point of the reward-vs-KL frontier: :func:`policy_report` on 500 samples (smoke: 130) — the mean hidden
    score log p_clf(7 | x) as ``reward``, the KL to the reference, the share read as 7, the kit against test
    sevens — with the method, its KL coefficient and its training seconds."""
    report = policy_report(policy, reference, FinetuneConfig.target, budget(500, 130), torch.Generator().manual_seed(0))
    return {"method": method, "beta": beta, "seconds": seconds, **report}


def dominated(reward, kl, other_reward, other_kl) -> np.ndarray:
    """For each point (reward[i], kl[i]) of one frontier, whether a point of another reaches a higher reward at a
    lower KL to the reference (bool, one per point)."""
    reward, kl = np.asarray(reward, float)[:, None], np.asarray(kl, float)[:, None]
    return ((np.asarray(other_reward, float)[None] > reward) & (np.asarray(other_kl, float)[None] < kl)).any(1)


def ppo_beta_run(beta: float, log=print) -> dict:
    """PPO from the shipped reference at KL coefficient ``beta``, otherwise as the shipped ``ppo``."""
    import time

    from agm import registry

    reference, _ = registry.load_model("ar-transformer")
    classifier, _ = registry.load_model("classifier")
    config = config_for("ppo", reference.config)
    config.kl_coef = beta
    start = time.perf_counter()
    policy, _, _ = finetune.finetune(config, reference, classifier, log=log)
    return frontier_report(policy, reference, "ppo", beta, time.perf_counter() - start)


def evaluate_ppo_full(policy: nn.Module, log=print) -> dict:
    """``evaluate ppo --full``: PPO at the other coefficients of :data:`FRONTIER_BETAS` (with ``evaluate dpo
    --full``, the reward-vs-KL frontier of Chapter 55), each stored under ``frontier`` as it finishes."""
    import functools

    from agm import checkpoint

    plan = {f"ppo/beta{beta:g}": functools.partial(ppo_beta_run, beta, log=log) for beta in FRONTIER_BETAS}
    return {"frontier": checkpoint.fill_cells("ppo", "frontier", plan, log)}


def sample(policy: nn.Module, n: int, generator: torch.Generator, labels: torch.Tensor | None = None) -> torch.Tensor:
    """``sample NAME``: n unconditional draws of the fine-tuned policy (binary images)."""
    refuse_labels(labels)
    return check_images(bare(policy).sample(n, generator))


SPECS = {method: ModelSpec(
    name=method, chapter=CHAPTERS[method], summary=SUMMARIES[method], build=build, train=trainer(method),
    evaluate=evaluate, sample=sample, samples="binary images", requires=("ar-transformer", "classifier"),
    train_minutes=30.0, kit=False) for method in finetune.METHODS}


TABLE_COLUMNS = {"target_fraction": "share read as target", "kl_to_reference": "KL to reference (nats)",
                 "digit_fid": "FID to test images of the target", "digit_precision": "precision",
                 "digit_recall": "recall"}


# the policies the table compares: these fine-tunes and those of Chapters 54–55 (PPO on a learned reward, DPO)
TABLE_MODELS = (*finetune.METHODS, "ppo-rm", "dpo")


def finetune_table(reference_n: int) -> list[dict]:
    """One row per policy of :data:`TABLE_MODELS` with a verified checkpoint, after the reference's own row (measured on
    ``reference_n`` samples): the metrics stored by ``train NAME``, the wall time of the run and the median
    seconds per update."""
    import statistics

    from agm import checkpoint, registry

    rows = [{"model": "reference (ar-transformer)", "chapter": 48,
             **{label: reference_report(reference_n).get(key) for key, label in TABLE_COLUMNS.items()}}]
    for name, spec in registry.all_specs().items():
        if name not in TABLE_MODELS or checkpoint.status(name) != "verified":
            continue
        manifest = checkpoint.read_manifest(name)
        seconds = [h["seconds"] for h in manifest.training.get("history", []) if "seconds" in h]  # DPO has no rollouts
        rows.append({"model": name, "chapter": spec.chapter,
                     **{label: manifest.metrics.get(key) for key, label in TABLE_COLUMNS.items()},
                     "updates": manifest.steps, "seconds per update": statistics.median(seconds) if seconds else None,
                     "training time (min)": manifest.wall_time_s / 60})
    return rows


SPECS["ppo"].evaluate_full = evaluate_ppo_full
SHIPPED = ("reinforce", "kl-policy", "ppo", "trpo")  # the fine-tunes whose checkpoints ship with the book
for _name in SHIPPED:
    register(SPECS[_name])
