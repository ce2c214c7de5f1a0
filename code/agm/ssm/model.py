"""An SSM generator over the tokens of :mod:`agm.autoregressive.ar_transformer`, Chapter 56.

The same tokens (2x2 binary patches in raster order), the same context token (label or null) and the same
exact likelihood as the transformer; the attention blocks are replaced by state-space layers of
:mod:`agm.ssm.layers`, ``kind`` "s4d" (a convolution in training, a recurrence in sampling) or "selective"
(a recurrence in both). Each block is pre-LayerNorm: h <- h + W_out GELU(SSM(W_in LN(h))).
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
from agm.registry import ModelSpec, TrainResult
from agm.ssm.layers import S4D, SelectiveSSM

KINDS = ("s4d", "selective")


@dataclass
class SSMConfig:
    kind: str = "s4d"  # "s4d" or "selective"
    patch: int = 2  # as ARConfig.patch
    width: int = 128  # the residual stream's size
    layers: int = 4
    state: int = 32  # states per channel
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
        self.norm = nn.LayerNorm(C)
        self.inp, self.out = nn.Linear(C, C), nn.Linear(C, C)
        self.ssm = S4D(C, config.state) if config.kind == "s4d" else SelectiveSSM(C, config.state)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        """h (B, L, C) -> (B, L, C), the whole sequence at once."""
        return h + self.out(F.gelu(self.ssm(self.inp(self.norm(h)))))

    def step(self, h: torch.Tensor, state: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        """One position h (B, C) -> (B, C) and the layer's new state."""
        y, state = self.ssm.step(self.inp(self.norm(h)), state)
        return h + self.out(F.gelu(y)), state


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


def trainer(kind: str):
    def train(seed: int = 0, parents: dict | None = None) -> TrainResult:
        from agm.runtime import is_smoke

        config = SSMConfig(kind=kind)
        config.train = config.train.budgeted(seed)
        if is_smoke():
            config.width, config.layers, config.state = 16, 1, 4
        model, history = ar_transformer.fit(config, model_class=SSMModel)
        return TrainResult(model, to_dict(config), steps=config.train.steps, extra={"history": history})

    return train


def sample(model: SSMModel, n: int, generator: torch.Generator, labels: torch.Tensor | None = None,
           temperature: float = 1.0, unconditional: bool = False) -> torch.Tensor:
    """``sample ssm``: the requested digits (default 0..9 in turn), or p(x) with ``unconditional``."""
    return check_images(model.sample(n, generator, None if unconditional else labels, temperature))


def add_sample_options(parser) -> None:
    parser.add_argument("--temperature", type=float, default=1.0, help="divide the logits by this before sampling")
    parser.add_argument("--unconditional", action="store_true", help="the null context: draw from p(x), no label")


SUMMARIES = {"ssm": ("s4d", "diagonal state-space model (S4D) over 2x2-pixel tokens"),
             "ssm-selective": ("selective", "selective-scan SSM (Mamba-style) over 2x2-pixel tokens")}
# registered (agm.registry.MODEL_MODULES and register) once their checkpoints ship
SPECS = {_name: ModelSpec(
    name=_name, chapter=56, summary=_summary, build=build, train=trainer(_kind), sample=sample,
    evaluate=ar_transformer.evaluate, conditional=True, train_minutes=60.0, add_sample_options=add_sample_options,
    metric_sample_options=lambda: {"unconditional": True}, samples="binary images",
) for _name, (_kind, _summary) in SUMMARIES.items()}
