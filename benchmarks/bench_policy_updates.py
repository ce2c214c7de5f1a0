"""Time one update of each fine-tuning method of Chapters 50–53, and DPO's step, on the shipped reference.

Every update starts from the same weights and the same rollout of 64 unconditional sequences, drawn once; the
rollout itself (sampling through the KV cache and scoring) is timed separately, because every on-policy method
pays it once per update and DPO never does.

    python benchmarks/bench_policy_updates.py [--repeats 3] [--rollout 64]
"""

import argparse
import copy
import statistics
import time

import torch

from agm import registry
from agm.preference import dpo
from agm.preference.losses import dpo_loss
from agm.rl import finetune
from agm.rl.finetune import DigitReward, FinetuneConfig, PPOConfig, TRPOConfig
from agm.rl.models import SETTINGS
from agm.rl.rollout import collect_rollout
from agm.runtime import hardware, set_threads


def timed(fn, repeats: int) -> list[float]:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return times


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--rollout", type=int, default=64)
    args = p.parse_args()
    set_threads()
    reference, _ = registry.load_model("ar-transformer")
    classifier, _ = registry.load_model("classifier")
    reward = DigitReward(classifier, FinetuneConfig.target, reference.config.patch)
    generator = torch.Generator().manual_seed(0)
    results = {"rollout": timed(lambda: collect_rollout(reference, reference, reward, args.rollout, None, generator),
                                args.repeats)}
    rollout = collect_rollout(reference, reference, reward, args.rollout, None, generator)

    def update(method: str):
        config = FinetuneConfig(method=method, kl_coef=SETTINGS[method]["kl_coef"], policy=reference.config)
        policy = finetune.make_policy(config)
        finetune.bare(policy).load_state_dict(reference.state_dict())
        lr = SETTINGS[method]["lr"]
        if method == "ppo":  # the value head's values belong in PPO's rollout
            ppo_rollout = collect_rollout(policy, reference, reward, args.rollout, None, generator)
            optimizer = torch.optim.Adam(policy.parameters(), lr=lr)
            return lambda: finetune.ppo_update(policy, optimizer, ppo_rollout, config.kl_coef, PPOConfig(), generator,
                                               1.0)
        if method == "trpo":
            return lambda: finetune.trpo_update(policy, rollout, config.kl_coef, TRPOConfig())
        optimizer = torch.optim.Adam(policy.parameters(), lr=lr)
        return lambda: finetune.reinforce_update(policy, optimizer, rollout, config.kl_coef, 1.0)

    for method in finetune.METHODS:
        results[method] = timed(update(method), args.repeats)

    # DPO: one step on 32 pairs (64 sequences, the same count as a rollout), reference log-probs precomputed
    policy = copy.deepcopy(reference).requires_grad_(True)
    optimizer = torch.optim.Adam(policy.parameters(), lr=1e-5)
    chosen, rejected = rollout.tokens.chunk(2)
    with torch.no_grad():
        ref_c, ref_r = dpo.sequence_log_prob(reference, chosen), dpo.sequence_log_prob(reference, rejected)

    def dpo_step():
        c, r = dpo.sequence_log_prob(policy, torch.cat([chosen, rejected])).chunk(2)
        loss, _ = dpo_loss(c, r, ref_c, ref_r, 0.1)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()

    results["dpo step"] = timed(dpo_step, args.repeats)
    print(f"{hardware()}; {args.rollout} sequences of {reference.length} tokens, {args.repeats} repeats")
    print(f"{'':<12} {'best (s)':>9} {'median (s)':>11}")
    for name, times in results.items():
        print(f"{name:<12} {min(times):>9.2f} {statistics.median(times):>11.2f}")


if __name__ == "__main__":
    main()
