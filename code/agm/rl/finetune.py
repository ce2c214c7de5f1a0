r"""Fine-tuning the autoregressive transformer to draw one digit, Chapters 50–53.

The policy pi_theta starts as the shipped ``ar-transformer`` in its null context, its unconditional mode
p(x) = p(x | null); the reference pi_ref is a frozen copy of it. The score of a sequence is the log-probability
the book's MNIST classifier gives the target digit, R(x) = log p_clf(target | x): the optimum of the
KL-regularized objective E[R] - beta KL(pi || pi_ref) is then pi* ∝ pi_ref · p_clf(target | x)^(1 / beta),
which at beta = 1 is the reference conditioned on the classifier reading the target (Chapter 51).

Four updates over the same rollouts (:data:`METHODS`):

- ``reinforce``: one gradient step on the REINFORCE loss of R with a leave-one-out baseline (Chapter 50);
- ``kl-policy``: the same on the KL-regularized score R(x) - beta log pi(x) / pi_ref(x) (Chapter 51);
- ``ppo``: the clipped surrogate over several epochs of minibatches, per-token KL-penalized rewards, GAE on
  a value head (Chapter 52);
- ``trpo``: the leave-one-out advantages of ``kl-policy`` in a natural-gradient step of bounded KL, by
  conjugate gradient and a backtracking line search (Chapter 53).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.nn.utils import parameters_to_vector, vector_to_parameters

from agm.autoregressive.ar_transformer import ARConfig, ARTransformer, detokenize
from agm.config import TrainConfig
from agm.distributions import categorical_log_prob
from agm.rl.advantages import gae, normalize_advantages
from agm.rl.kl import kl_full, kl_k3, kl_log_ratio, kl_penalized_rewards
from agm.rl.losses import leave_one_out_baseline, ppo_policy_loss, reinforce_loss, value_loss
from agm.rl.policy import PolicyWithValue
from agm.rl.rollout import Rollout, collect_rollout, sequence_log_probs
from agm.rl.trpo import backtracking_line_search, fisher_vector_product, flat_grad, natural_gradient_step
from agm.train import NonFiniteLossError, gradient_step, run_steps

METHODS = ("reinforce", "kl-policy", "ppo", "trpo")
NUM_CLASSES = 10


@dataclass
class PPOConfig:
    clip: float = 0.2  # epsilon of the clipped surrogate (and of the clipped value loss)
    epochs: int = 2  # passes over each rollout
    minibatches: int = 4  # per pass
    gamma: float = 1.0  # no discount: the score arrives once, after a sequence of fixed length
    gae_lambda: float = 1.0
    value_coef: float = 0.5  # weight of the value loss beside the policy loss
    value_lr: float = 1e-3  # Adam's rate for the value head, which starts from zero and must reach the scores

    def __post_init__(self):
        if not 0 < self.clip < 1:
            raise ValueError(f"PPO's clip epsilon must lie in (0, 1), got {self.clip}")
        if self.epochs < 1 or self.minibatches < 1:
            raise ValueError(f"epochs and minibatches must be >= 1, got {self.epochs} and {self.minibatches}")


@dataclass
class TRPOConfig:
    max_kl: float = 0.002  # delta: bound on the mean per-token KL(pi_old || pi_new) of one update
    cg_iters: int = 10
    damping: float = 0.1  # F + damping I, which keeps conjugate gradient stable
    fisher_sequences: int = 8  # Fisher-vector products on this many sequences of each rollout (a subsample)
    backtracks: int = 10

    def __post_init__(self):
        if self.max_kl <= 0 or self.fisher_sequences < 1:
            raise ValueError(f"max_kl must be > 0 and fisher_sequences >= 1, got {self.max_kl}, "
                             f"{self.fisher_sequences}")


def finetune_training(**changes) -> TrainConfig:
    """Updates (``steps``), the learning rate and the gradient clip of a fine-tune; ``batch_size`` is unused."""
    return TrainConfig(**{"steps": 100, "batch_size": 64, "lr": 3e-5, "grad_clip": 1.0} | changes)


@dataclass
class FinetuneConfig:
    method: str = "ppo"  # one of METHODS
    target: int = 7  # the digit to draw
    kl_coef: float = 0.05  # beta of E[R] - beta KL(pi || pi_ref); 0 for plain REINFORCE
    rollout: int = 64  # sequences drawn per update
    snapshots: int = 6  # rollouts whose first sequences the manifest keeps, spread over training
    policy: ARConfig = field(default_factory=ARConfig)  # the reference's architecture
    ppo: PPOConfig = field(default_factory=PPOConfig)
    trpo: TRPOConfig = field(default_factory=TRPOConfig)
    train: TrainConfig = field(default_factory=finetune_training)

    def __post_init__(self):
        if self.method not in METHODS:
            raise ValueError(f"method must be one of {', '.join(METHODS)}, got {self.method!r}")
        if self.target not in range(NUM_CLASSES):
            raise ValueError(f"the target digit must be an integer in 0..{NUM_CLASSES - 1}, got {self.target!r}")
        if self.method == "reinforce" and self.kl_coef != 0:
            raise ValueError("REINFORCE maximizes E[R] alone (kl_coef = 0); kl-policy adds the KL penalty")
        if self.method != "reinforce" and not self.kl_coef > 0:
            raise ValueError(f"the KL coefficient beta must be > 0 for {self.method}, got {self.kl_coef}")
        if self.rollout < 2:
            raise ValueError(f"a rollout needs at least two sequences (for the baseline), got {self.rollout}")


class DigitReward(nn.Module):
    """R(x) = log p_clf(target | x) of token sequences, decoded to binary images, under a frozen classifier."""

    def __init__(self, classifier: nn.Module, target: int, patch: int):
        super().__init__()
        self.classifier, self.target, self.patch = classifier.eval().requires_grad_(False), target, patch

    @torch.no_grad()
    def class_log_probs(self, tokens: torch.Tensor) -> torch.Tensor:
        """log p_clf(y | x) for every digit y, (B, 10)."""
        x = detokenize(tokens, self.patch)
        return self.classifier.head(self.classifier.features(x)).log_softmax(-1)

    def forward(self, tokens: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        return self.class_log_probs(tokens)[:, self.target]  # (B,)


def check_rewards(rollout: Rollout) -> None:
    """A NaN or infinite score stops the run before any update (the checkpoint is written only at the end)."""
    if not torch.isfinite(rollout.rewards).all():
        raise NonFiniteLossError("a reward is NaN or infinite; no update was taken. Check the reward model.")


def kl_regularized_scores(rollout: Rollout, kl_coef: float) -> torch.Tensor:
    r"""$R(x) - \beta \log \pi(x) / \pi_{\rm ref}(x)$ per sequence (B,): the score the KL-regularized objective
    maximizes."""
    return rollout.rewards - kl_coef * kl_log_ratio(rollout.logprobs, rollout.ref_logprobs)


def reinforce_update(policy: ARTransformer, optimizer: torch.optim.Optimizer, rollout: Rollout, kl_coef: float,
                     grad_clip: float | None = None) -> dict:
    """One REINFORCE step on the (KL-regularized) sequence score, with the leave-one-out baseline."""
    scores = kl_regularized_scores(rollout, kl_coef)  # (B,)
    logprobs = sequence_log_probs(policy, rollout.tokens, rollout.labels)  # (B, T), differentiable
    loss, logs = reinforce_loss(logprobs, scores, leave_one_out_baseline(scores))
    return {"loss": gradient_step(loss, optimizer, grad_clip, "reinforce"), **logs}


def ppo_update(policy: PolicyWithValue, optimizer: torch.optim.Optimizer, rollout: Rollout, kl_coef: float,
               config: PPOConfig, generator: torch.Generator, grad_clip: float | None = None) -> dict:
    """PPO's update of one rollout: per-token rewards with the KL penalty, GAE on the value head's values,
    normalized advantages, then ``epochs`` passes of ``minibatches`` clipped-surrogate steps."""
    rewards = kl_penalized_rewards(rollout.rewards, rollout.logprobs, rollout.ref_logprobs, kl_coef)  # (B, T)
    advantages, returns = gae(rewards, rollout.values, config.gamma, config.gae_lambda)  # (B, T) each
    advantages = normalize_advantages(advantages)
    B, sums = len(rollout), {}
    for _ in range(config.epochs):
        for mb in torch.randperm(B, generator=generator).chunk(config.minibatches):
            logits, values = policy(rollout.tokens[mb], None if rollout.labels is None else rollout.labels[mb])
            new_logprobs = categorical_log_prob(logits, rollout.tokens[mb])  # (b, T)
            pg_loss, pg_logs = ppo_policy_loss(new_logprobs, rollout.logprobs[mb], advantages[mb], config.clip)
            v_loss, v_logs = value_loss(values, returns[mb], rollout.values[mb], config.clip)
            loss = pg_loss + config.value_coef * v_loss
            gradient_step(loss, optimizer, grad_clip, "ppo")
            with torch.no_grad():
                logp = logits.log_softmax(-1)
                entropy = -(logp.exp() * logp).sum(-1).mean()  # nats per token
            logs = {"pg_loss": pg_loss.detach(), "value_loss": v_loss.detach(), "entropy": entropy,
                    **pg_logs, **v_logs}
            for k, v in logs.items():
                sums[k] = sums.get(k, 0.0) + float(v)
    count = config.epochs * len(torch.arange(B).chunk(config.minibatches))
    return {k: v / count for k, v in sums.items()}  # means over every minibatch step


def per_token_kl(old_logits: torch.Tensor, new_logits: torch.Tensor) -> torch.Tensor:
    """Mean over positions and sequences of KL(pi_old(. | s_t) || pi_new(. | s_t)), from logits (B, T, K)."""
    return kl_full(old_logits.detach(), new_logits).mean() / old_logits.shape[1]


def policy_fisher_product(policy: nn.Module, tokens: torch.Tensor, labels: torch.Tensor | None,
                          old_logits: torch.Tensor, v: torch.Tensor, damping: float) -> torch.Tensor:
    """(F + damping I) v for the policy's parameters, F the Hessian of the mean per-token KL from ``old_logits``
    (B, T, K) — the policy's own logits on ``tokens`` (B, T), detached — at the current parameters."""
    params = [p for p in policy.parameters() if p.requires_grad]
    # double backpropagation needs attention's plain (math) kernel: the fused CPU kernel has no second derivative
    with sdpa_kernel(SDPBackend.MATH):
        return fisher_vector_product(lambda: per_token_kl(old_logits, policy(tokens, labels)), params, v, damping)


def trpo_update(policy: ARTransformer, rollout: Rollout, kl_coef: float, config: TRPOConfig) -> dict:
    """TRPO's update of one rollout: the surrogate -mean_t A r_t with the leave-one-out advantage A of each
    sequence's KL-regularized score, its natural-gradient step scaled to ``max_kl``, and the line search."""
    scores = kl_regularized_scores(rollout, kl_coef)
    advantages = (scores - leave_one_out_baseline(scores))[:, None].expand_as(rollout.logprobs)  # (B, T)
    params = [p for p in policy.parameters() if p.requires_grad]
    x0 = parameters_to_vector(params).detach()
    with torch.no_grad():
        old_logits = policy(rollout.tokens, rollout.labels)  # (B, T, K)
    fisher_tokens = rollout.tokens[:config.fisher_sequences]
    fisher_labels = None if rollout.labels is None else rollout.labels[:config.fisher_sequences]

    def surrogate(logits: torch.Tensor) -> torch.Tensor:
        # $L(\theta) = -\mathbb{E}_t[A_t\, \pi_\theta(x_t \mid s_t) / \pi_{\rm old}(x_t \mid s_t)]$
        ratio = (categorical_log_prob(logits, rollout.tokens) - rollout.logprobs).exp()
        return -(advantages * ratio).mean()

    last: dict = {}

    def logits_at(x: torch.Tensor) -> torch.Tensor:
        """The policy's logits with parameters x; the line search asks for the loss and the KL at each trial point,
        so the forward pass of the latest point is kept."""
        if last.get("x") is not x:
            vector_to_parameters(x, params)
            last.update(x=x, logits=policy(rollout.tokens, rollout.labels))
        return last["logits"]

    loss_grad = flat_grad(surrogate(policy(rollout.tokens, rollout.labels)), params)

    def fvp(v: torch.Tensor) -> torch.Tensor:
        return policy_fisher_product(policy, fisher_tokens, fisher_labels, old_logits[:config.fisher_sequences], v,
                                     config.damping)

    full_step, expected = natural_gradient_step(loss_grad, fvp, config.max_kl, config.cg_iters)
    x, logs = backtracking_line_search(
        lambda x: surrogate(logits_at(x)), x0, full_step, expected, config.max_kl,
        lambda x: per_token_kl(old_logits, logits_at(x)), config.backtracks)
    vector_to_parameters(x, params)
    return {"expected_improvement": float(expected), **{k: float(v) for k, v in logs.items()}}


def encode_tokens(tokens: torch.Tensor) -> list[str]:
    """Sequences of 16-symbol tokens (B, T) as hexadecimal strings, one per sequence (compact for a manifest)."""
    return ["".join("0123456789abcdef"[t] for t in row) for row in tokens.tolist()]


def decode_tokens(rows: list[str]) -> torch.Tensor:
    """The inverse of :func:`encode_tokens`: (B, T) long."""
    return torch.tensor([[int(c, 16) for c in row] for row in rows], dtype=torch.long)


def make_policy(config: FinetuneConfig) -> nn.Module:
    """An untrained policy of the method's shape: a PolicyWithValue for PPO, the bare transformer otherwise."""
    policy = ARTransformer(config.policy)
    return PolicyWithValue(policy) if config.method == "ppo" else policy


def bare(policy: nn.Module) -> ARTransformer:
    return policy.policy if isinstance(policy, PolicyWithValue) else policy


def finetune(config: FinetuneConfig, reference: ARTransformer, classifier: nn.Module,
             log=print, reward_model: nn.Module | None = None) -> tuple[nn.Module, list[dict], dict]:
    """Fine-tune a copy of ``reference`` by ``config.method``; returns the policy, the logged history (every
    update: reward, fraction of the target, KL estimates, the method's diagnostics, seconds) and snapshots
    of sampled sequences over training. The reward is the classifier's log p(target | x), or, where
    ``reward_model`` is given, its ``score_tokens``; then the classifier's score is logged beside it as
    ``hidden_reward`` (Chapter 54)."""
    if config.policy.patch != 2:
        raise ValueError("the fine-tunes decode 16-symbol tokens: the reference must use 2x2 patches")
    generator = torch.Generator().manual_seed(config.train.seed)
    torch.manual_seed(config.train.seed)
    reference = reference.eval().requires_grad_(False)
    policy = make_policy(config)
    bare(policy).load_state_dict(reference.state_dict())
    digit = DigitReward(classifier, config.target, config.policy.patch)
    reward = digit if reward_model is None else reward_model.eval().requires_grad_(False).score_tokens
    optimizer = None  # TRPO steps without one
    if config.method == "ppo":
        optimizer = torch.optim.Adam([{"params": policy.policy.parameters()},
                                      {"params": policy.value_head.parameters(), "lr": config.ppo.value_lr}],
                                     lr=config.train.lr, betas=config.train.betas)
    elif config.method != "trpo":
        optimizer = config.train.adam(policy.parameters())
    updates = config.train.steps
    keep = {round(1 + i * (updates - 1) / max(1, config.snapshots - 1)) for i in range(config.snapshots)}
    snapshots: dict[str, list[str]] = {}

    def step(s: int) -> dict:
        start = time.perf_counter()
        rollout = collect_rollout(policy, reference, reward, config.rollout, None, generator)
        check_rewards(rollout)
        class_log_probs = digit.class_log_probs(rollout.tokens)
        hits = (class_log_probs.argmax(-1) == config.target).float().mean()
        hidden = {} if reward_model is None else {"hidden_reward": class_log_probs[:, config.target].mean()}
        if s in keep:
            snapshots[str(s)] = encode_tokens(rollout.tokens[:16])
        if config.method == "ppo":
            logs = ppo_update(policy, optimizer, rollout, config.kl_coef, config.ppo, generator, config.train.grad_clip)
        elif config.method == "trpo":
            logs = trpo_update(policy, rollout, config.kl_coef, config.trpo)
        else:
            logs = reinforce_update(policy, optimizer, rollout, config.kl_coef, config.train.grad_clip)
        return {"reward": rollout.rewards.mean(), **hidden, "target_fraction": hits,
                "kl_log_ratio": kl_log_ratio(rollout.logprobs, rollout.ref_logprobs).mean(),
                "kl_k3": kl_k3(rollout.logprobs, rollout.ref_logprobs).mean(), **logs,
                "seconds": time.perf_counter() - start}

    def report(s: int, logs: dict) -> None:
        if s % 10 == 0:
            log(f"{config.method} update {s}: reward {float(logs['reward']):.3f}, target "
                f"{float(logs['target_fraction']):.2f}, KL {float(logs['kl_log_ratio']):.2f}")

    history = run_steps(step, updates, log_every=1, desc=config.method, on_step=report, modules=[policy])
    last = history[-1]
    log(f"{config.method}: {updates} updates, reward {last['reward']:.3f}, target {last['target_fraction']:.2f}")
    return policy.eval(), history, snapshots

