"""An SSM generator over the tokens of :mod:`agm.autoregressive.ar_transformer`, Chapter 56.

The same tokens (2x2 binary patches in raster order), the same context token (label or null) and the same
exact likelihood as the transformer; the attention blocks are replaced by state-space layers of
:mod:`agm.ssm.layers`, ``kind`` "s4d" (a convolution in training, a recurrence in sampling) or "selective"
(a recurrence in both). Each block is the transformer's block with attention replaced by the SSM, pre-LayerNorm:
h <- h + W_out GELU(SSM(W_in LN(h))), then h <- h + MLP(LN(h)) with the transformer's MLP.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from agm.autoregressive import ar_transformer
from agm.autoregressive.ar_transformer import NUM_CLASSES, ar_training, detokenize, tokenize
from agm.config import TrainConfig, from_dict, to_dict
from agm.data import check_images
from agm.distributions import categorical_log_prob
from agm.nn.transformer import feed_forward
from agm.registry import ModelSpec, TrainResult, register
from agm.ssm.layers import S4D, SelectiveSSM

KINDS = ("s4d", "selective")


@dataclass
class SSMConfig:
    kind: str = "s4d"  # "s4d" or "selective"
    patch: int = 2  # as ARConfig.patch
    width: int = 64  # the residual stream's size (the transformer ablations' baseline of Chapters 46-47)
    layers: int = 6
    state: int = 32  # states per channel (s4d: complex, in conjugate pairs; selective: real)
    mlp_ratio: int = 4  # the MLP sublayer's hidden width / width, as in the transformer
    scan: str = "sequential"  # selective only: "sequential" or "parallel" (the same numbers; Chapter 56 times both)
    p_uncond: float = 0.1  # label dropped to the null token in training
    train: TrainConfig = field(default_factory=ar_training)

    def __post_init__(self):
        if self.kind not in KINDS:
            raise ValueError(f"kind must be one of {KINDS}, got {self.kind!r}")
        if self.patch not in (1, 2):
            raise ValueError(f"patch must be 1 or 2, got {self.patch}")


class SSMBlock(nn.Module):
    def __init__(self, config: SSMConfig):
        super().__init__()
        C = config.width
        self.norm, self.norm_mlp = nn.LayerNorm(C), nn.LayerNorm(C)
        self.inp, self.out = nn.Linear(C, C), nn.Linear(C, C)
        self.ssm = S4D(C, config.state) if config.kind == "s4d" else SelectiveSSM(C, config.state, scan=config.scan)
        self.mlp = feed_forward(C, config.mlp_ratio)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        """h (B, L, C) -> (B, L, C), the whole sequence at once."""
        # $h \leftarrow h + W_o\,\mathrm{GELU}(\mathrm{SSM}(W_i\,\mathrm{LN}(h)))$
        h = h + self.out(F.gelu(self.ssm(self.inp(self.norm(h)))))
        # $h \leftarrow h + \mathrm{MLP}(\mathrm{LN}(h))$
        return h + self.mlp(self.norm_mlp(h))

    def step(self, h: torch.Tensor, state: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        """One position h (B, C) -> (B, C) and the layer's new state."""
        y, state = self.ssm.step(self.inp(self.norm(h)), state)
        h = h + self.out(F.gelu(y))
        return h + self.mlp(self.norm_mlp(h)), state


class SSMModel(nn.Module):
    """Context token + patch tokens -> logits of each next token (B, T, K), through SSM blocks."""

    def __init__(self, config: SSMConfig):
        super().__init__()
        self.config = c = config
        self.symbols, self.length = 2 ** (c.patch * c.patch), (28 // c.patch) ** 2
        self.null = self.symbols + NUM_CLASSES
        self.embed = nn.Embedding(self.symbols + NUM_CLASSES + 1, c.width)
        self.blocks = nn.ModuleList(SSMBlock(c) for _ in range(c.layers))
        self.norm = nn.LayerNorm(c.width)
        self.head = nn.Linear(c.width, self.symbols)

    def context(self, n: int, labels: torch.Tensor | None) -> torch.Tensor:
        """Label y as token K + y, or the null token where labels is None: (n,)."""
        if labels is None:
            return torch.full((n,), self.null, dtype=torch.long, device=self.head.weight.device)
        if labels.shape != (n,) or labels.dtype != torch.long or ((labels < 0) | (labels >= NUM_CLASSES)).any():
            raise ValueError(f"labels must be [{n}] integers (torch.long) in 0..{NUM_CLASSES - 1}")
        return (self.symbols + labels).to(self.head.weight.device)

    def forward(self, tokens: torch.Tensor, labels: torch.Tensor | None = None,
                drop: torch.Tensor | None = None) -> torch.Tensor:
        """Logits (B, T, K) of p(t_i | context, t_<i), every position in one pass (teacher forcing); ``drop`` (B,)
        bool puts the null token in place of the label in those rows."""
        if tokens.ndim != 2 or tokens.shape[1] != self.length or tokens.dtype != torch.long:
            raise ValueError(f"tokens must be a long tensor [B, {self.length}], got {tokens.dtype} "
                             f"{list(tokens.shape)}")
        start = self.context(len(tokens), labels)
        if drop is not None:
            start = start.masked_fill(drop.to(start.device), self.null)
        inputs = torch.cat([start[:, None], tokens[:, :-1]], 1)  # (B, T)
        h = self.embed(inputs)
        for block in self.blocks:
            h = block(h)
        return self.head(self.norm(h))

    def token_log_probs(self, tokens: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        """log p(t_i | context, t_<i) of every token, (B, T)."""
        return categorical_log_prob(self(tokens, labels), tokens)

    def log_prob(self, x: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        """log p(x) or log p(x | y) of binary images (B, 1, 28, 28), exactly, in nats: (B,)."""
        return self.token_log_probs(tokenize(x, self.config.patch), labels).sum(1)

    @torch.no_grad()
    def sample_tokens(self, n: int, labels: torch.Tensor | None = None, generator: torch.Generator | None = None,
                      temperature: float = 1.0) -> torch.Tensor:
        """n sequences (n, T), one token per step through the layers' states: constant work per token."""
        if n < 1 or temperature <= 0:
            raise ValueError(f"need n >= 1 and temperature > 0, got {n} and {temperature}")
        token, states, out = self.context(n, labels), [None] * len(self.blocks), []
        for _ in range(self.length):
            h = self.embed(token)  # (n, C)
            for i, block in enumerate(self.blocks):
                h, states[i] = block.step(h, states[i])
            probs = (self.head(self.norm(h)).float() / temperature).softmax(-1)
            token = torch.multinomial(probs.cpu(), 1, generator=generator).squeeze(1).to(h.device)
            out.append(token)
        return torch.stack(out, 1)

    def sample(self, n: int, generator: torch.Generator | None = None, labels: torch.Tensor | None = None,
               temperature: float = 1.0) -> torch.Tensor:
        return detokenize(self.sample_tokens(n, labels, generator, temperature), self.config.patch).cpu()


# -- the registered models: the same tokens, loss, schedule and evaluation as ar-transformer -----------------

def build(config: dict) -> SSMModel:
    return SSMModel(from_dict(SSMConfig, config))


STATES = {"s4d": 32, "selective": 16}  # S4D: 16 conjugate pairs; selective: Mamba's d_state


def budget_config(kind: str, seed: int = 0, steps: int | None = None) -> SSMConfig:
    """The SSM at the budget of the transformer baseline of Chapters 46-47 (its width, depth, steps, batch,
    schedule, label dropout and seed): the two models differ only in attention versus the SSM."""
    from agm.autoregressive.ablations import variant_config

    base = variant_config("pre-LN", seed, steps)
    return SSMConfig(kind=kind, width=base.width, layers=base.layers, state=STATES[kind], p_uncond=base.p_uncond,
                     train=base.train)


def config_at_budget(kind: str, seed: int = 0) -> SSMConfig:
    """:func:`budget_config` as trained (smoke: a tiny model at the smoke budget)."""
    from agm.runtime import is_smoke

    config = budget_config(kind, seed)
    if is_smoke():
        config.width, config.layers, config.state = 16, 1, 4
    return config


def trainer(kind: str):
    def train(seed: int = 0, parents: dict | None = None) -> TrainResult:
        from agm.autoregressive.ablations import TEST_IMAGES
        from agm.runtime import budget

        config = config_at_budget(kind, seed)
        model, history = ar_transformer.fit(config, model_class=SSMModel)
        # the NLL on the test images of the transformer ablations, for Chapter 56's comparison at equal budget
        comparison = ar_transformer.test_nll(model, n=budget(TEST_IMAGES, 100))
        return TrainResult(model, to_dict(config), steps=config.train.steps,
                           extra={"history": history, "comparison": comparison})

    return train


SEEDS = (1, 2)  # the seeds beyond the shipped model's, as the transformer ablations have them


def seed_runs(name: str, kind: str):
    """``evaluate NAME --full``: the same SSM trained again at each seed of SEEDS and measured as the transformer
    ablations are (:func:`agm.autoregressive.ablations.run_config`), each run stored as it finishes (resumable)."""
    def evaluate_full(model: SSMModel) -> dict:
        from agm import checkpoint
        from agm.autoregressive.ablations import run_config

        plan = {f"seed{s}": (lambda s=s: run_config(config_at_budget(kind, s), SSMModel)) for s in SEEDS}
        return {"seeds": checkpoint.fill_cells(name, "seeds", plan)}

    return evaluate_full


def sample(model: SSMModel, n: int, generator: torch.Generator, labels: torch.Tensor | None = None,
           temperature: float = 1.0, unconditional: bool = False) -> torch.Tensor:
    """``sample ssm``: the requested digits (default 0..9 in turn), or p(x) with ``unconditional``."""
    return check_images(model.sample(n, generator, None if unconditional else labels, temperature))


def add_sample_options(parser) -> None:
    parser.add_argument("--temperature", type=float, default=1.0, help="divide the logits by this before sampling")
    parser.add_argument("--unconditional", action="store_true", help="the null context: draw from p(x), no label")


SUMMARIES = {"ssm": ("s4d", "diagonal state-space model (S4D) over 2x2-pixel tokens"),
             "ssm-selective": ("selective", "selective-scan SSM (Mamba-style) over 2x2-pixel tokens")}
SPECS = {_name: ModelSpec(
    name=_name, chapter=56, summary=_summary, build=build, train=trainer(_kind), sample=sample,
    evaluate=ar_transformer.evaluate, conditional=True, train_minutes=60.0, add_sample_options=add_sample_options,
    metric_sample_options=lambda: {"unconditional": True}, samples="binary images",
    evaluate_full=seed_runs(_name, _kind),
) for _name, (_kind, _summary) in SUMMARIES.items()}
for _spec in SPECS.values():
    register(_spec)
