r"""An autoregressive transformer over binarized MNIST, Chapters 45–48, and the policy of Modules 6–7.

The image is cut into patches of ``patch`` x ``patch`` binary pixels read in raster order; a patch is one
token, the integer whose bits are its pixels (K = 2^(patch^2) symbols: 2 for single pixels, 16 for 2x2
patches). The likelihood stays exact: p(x) is the product of the T = (28 / patch)^2 token conditionals,
and a token's probability is the probability of its patch of pixels.

A context token stands in front of the sequence: the label y (tokens K..K+9) or the null token K+10. Training
replaces the label by the null token with probability ``p_uncond``, so one network models p(x | y) and
p(x) = p(x | null) (the unconditional model whose NLL the book reports). The decoder is the shared
:class:`agm.nn.transformer.Transformer`, with its KV cache for sampling.

For Modules 6–7 the model is a policy over token sequences: :meth:`ARTransformer.token_log_probs` gives the
exact log-probability of every token of a batch of sequences, :meth:`ARTransformer.sample_tokens` draws
sequences in batches through the cache.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from torch import nn

from agm.config import TrainConfig, from_dict, to_dict
from agm.data import check_images
from agm.distributions import categorical_log_prob
from agm.nn.transformer import Transformer, TransformerConfig, filter_logits
from agm.registry import ModelSpec, TrainResult, register

NUM_CLASSES = 10


def ar_training(steps: int = 10_000, **changes) -> TrainConfig:
    """AdamW-style settings of nanoGPT scaled down: Adam at 1e-3, warm-up, cosine decay to 1e-4, batches of 32."""
    return TrainConfig(**{"steps": steps, "batch_size": 32, "lr": 1e-3, "lr_final": 1e-4, "warmup_steps": 500,
                          "grad_clip": 1.0} | changes)


@dataclass
class ARConfig:
    patch: int = 2  # pixels per side of a token: 1 = 784 binary tokens, 2 = 196 tokens of 16 symbols
    width: int = 128  # the transformer's embedding size C
    layers: int = 4
    heads: int = 4
    positions: str = "learned"  # one of agm.nn.transformer.POSITIONS
    norm: str = "pre"
    residual: bool = True
    p_uncond: float = 0.1  # probability of dropping the label to the null token in training
    train: TrainConfig = field(default_factory=ar_training)

    def __post_init__(self):
        if self.patch not in (1, 2):
            raise ValueError(f"patch must be 1 or 2 (larger patches make the vocabulary 2^(patch^2)), got {self.patch}")
        if not 0 <= self.p_uncond < 1:
            raise ValueError(f"p_uncond must be in [0, 1), got {self.p_uncond}")

    @property
    def side(self) -> int:
        return 28 // self.patch  # tokens per row and per column

    @property
    def symbols(self) -> int:
        return 2 ** (self.patch * self.patch)  # K


def tokenize(x: torch.Tensor, patch: int) -> torch.Tensor:
    """Binary images (B, 1, 28, 28) -> tokens (B, T) in raster order of patches; bit i of a token is pixel i of
    its patch in raster order."""
    B, side = len(x), 28 // patch
    if x.shape[1:] != (1, 28, 28) or not ((x == 0) | (x == 1)).all():
        raise ValueError(f"expected binary images [B, 1, 28, 28], got {list(x.shape)}")
    patches = x.reshape(B, side, patch, side, patch).permute(0, 1, 3, 2, 4).reshape(B, side * side, patch * patch)
    weights = 2 ** torch.arange(patch * patch, device=x.device)  # (P,)
    return (patches.long() * weights).sum(-1)  # (B, T)


def detokenize(tokens: torch.Tensor, patch: int) -> torch.Tensor:
    """The inverse of :func:`tokenize`: tokens (B, T) -> binary images (B, 1, 28, 28)."""
    B, side = len(tokens), 28 // patch
    bits = (tokens[..., None] >> torch.arange(patch * patch, device=tokens.device)) & 1  # (B, T, P)
    grid = bits.reshape(B, side, side, patch, patch).permute(0, 1, 3, 2, 4)
    return grid.reshape(B, 1, 28, 28).float()


class ARTransformer(nn.Module):
    """Context token (label or null) + patch tokens -> logits of each next token, (B, T, K)."""

    def __init__(self, config: ARConfig):
        super().__init__()
        self.config = c = config
        self.symbols, self.length = c.symbols, c.side * c.side
        self.null = self.symbols + NUM_CLASSES  # tokens: symbols 0..K-1, labels K..K+9, null K+10
        self.transformer = Transformer(TransformerConfig(
            vocab_size=self.symbols + NUM_CLASSES + 1, output_size=self.symbols, block_size=self.length,
            width=c.width, layers=c.layers, heads=c.heads, positions=c.positions, norm=c.norm,
            residual=c.residual, grid=(c.side + 1, c.side) if c.positions == "2d" else None))

    def context(self, n: int, labels: torch.Tensor | None, device=None) -> torch.Tensor:
        """The first token of n sequences: label y as token K + y, or the null token where labels is None (n, 1)."""
        if labels is None:
            return torch.full((n, 1), self.null, dtype=torch.long, device=device)
        if labels.shape != (n,) or labels.dtype != torch.long or ((labels < 0) | (labels >= NUM_CLASSES)).any():
            raise ValueError(f"labels must be [{n}] integers (torch.long) in 0..{NUM_CLASSES - 1}, got "
                             f"{labels.dtype} {list(labels.shape)}")
        return (self.symbols + labels).view(n, 1).to(device)

    def check_tokens(self, tokens: torch.Tensor) -> torch.Tensor:
        if tokens.ndim != 2 or tokens.shape[1] != self.length or tokens.dtype != torch.long:
            raise ValueError(f"tokens must be a long tensor [B, {self.length}], got {tokens.dtype} "
                             f"{list(tokens.shape)}")
        if len(tokens) and (tokens.min() < 0 or tokens.max() >= self.symbols):
            raise ValueError(f"tokens must lie in 0..{self.symbols - 1}")
        return tokens

    def forward(self, tokens: torch.Tensor, labels: torch.Tensor | None = None,
                drop: torch.Tensor | None = None) -> torch.Tensor:
        """Logits (B, T, K) of p(t_i | context, t_<i) at every position — teacher forcing, one pass. ``drop``
        (B,) bool puts the null token in place of the label in those rows."""
        self.check_tokens(tokens)
        start = self.context(len(tokens), labels, tokens.device)
        if drop is not None:
            start = start.masked_fill(drop.view(-1, 1).to(start.device), self.null)
        return self.transformer(torch.cat([start, tokens[:, :-1]], 1))

    def token_log_probs(self, tokens: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        """log p(t_i | context, t_<i) of every token, (B, T), in nats."""
        return categorical_log_prob(self(tokens, labels), tokens)

    def log_prob(self, x: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        """log p(x) (labels None) or log p(x | y) of binary images (B, 1, 28, 28), exactly, in nats: (B,)."""
        return self.token_log_probs(tokenize(x, self.config.patch), labels).sum(1)

    @torch.no_grad()
    def sample_tokens(self, n: int, labels: torch.Tensor | None = None, generator: torch.Generator | None = None,
                      temperature: float = 1.0, top_k: int | None = None, top_p: float | None = None,
                      use_cache: bool = True) -> torch.Tensor:
        """n token sequences (n, T) drawn one token at a time (through the KV cache unless ``use_cache`` is off)."""
        if n < 1:
            raise ValueError(f"n must be >= 1, got {n}")
        start = self.context(n, labels, self.transformer.head.weight.device)
        out = self.transformer.generate(start, self.length, generator, temperature, use_cache, top_k, top_p)
        return out[:, 1:]

    def sample(self, n: int, generator: torch.Generator | None = None, labels: torch.Tensor | None = None,
               chunk: int = 500, **options) -> torch.Tensor:
        """n binary images (n, 1, 28, 28) from :meth:`sample_tokens`, ``chunk`` sequences at a time (the KV cache
        of 10 000 sequences would take gigabytes)."""
        pieces = [self.sample_tokens(min(chunk, n - i), None if labels is None else labels[i:i + chunk], generator,
                                     **options) for i in range(0, n, chunk)]
        return detokenize(torch.cat(pieces), self.config.patch).cpu()


def loss(model: nn.Module, batch: tuple[torch.Tensor, torch.Tensor],
         generator: torch.Generator | None = None) -> tuple[torch.Tensor, dict]:
    """Mean NLL per image (nats) of binarized images with their labels, each label dropped to the null token
    with probability p_uncond; logs the NLL of the labelled rows. Any token model with this module's
    interface (``config.patch``, ``config.p_uncond``, ``model(tokens, labels, drop)``) trains with it."""
    x, y = batch
    tokens = tokenize(x, model.config.patch)
    drop = torch.rand(len(y), generator=generator) < model.config.p_uncond  # (B,)
    nll = -categorical_log_prob(model(tokens, y, drop), tokens).sum(1)  # (B,)
    return nll.mean(), {"nll_labelled": nll[~drop].mean().detach() if (~drop).any() else torch.tensor(float("nan"))}


def fit(config, log=print, log_every: int = 500, model_class: type[nn.Module] | None = None
        ) -> tuple[nn.Module, list[dict[str, float]]]:
    """Adam on the 60 000 training images with their labels, re-binarized at every use; the model is
    ``model_class(config)`` (default :class:`ARTransformer`)."""
    from agm.data import binarize, mnist
    from agm.runtime import device
    from agm.train import fit_examples

    torch.manual_seed(config.train.seed)
    x, y = mnist("trainval")
    model = (model_class or ARTransformer)(config).to(device())
    name = type(model).__name__
    history = fit_examples(model, loss, config.train, x, y, transform=binarize, desc=name, log_every=log_every)
    log(f"{name}: {history[-1]['step']} steps, final loss {history[-1]['loss']:.2f}")
    return model.cpu().eval(), history


@torch.no_grad()
def test_nll(model: nn.Module, n: int | None = None, batch_size: int = 250) -> dict[str, float]:
    """Exact -log p(x) (null context) and -log p(x | y) on the first n images of the binarized test set."""
    from agm.data import binarized_test_set
    from agm.metrics import nll_report

    x, y = binarized_test_set()
    x, y = (x[:n], y[:n]) if n else (x, y)
    model.eval()
    uncond = torch.cat([model.log_prob(x[i:i + batch_size]) for i in range(0, len(x), batch_size)])
    cond = torch.cat([model.log_prob(x[i:i + batch_size], y[i:i + batch_size]) for i in range(0, len(x), batch_size)])
    return nll_report(uncond) | {"test_nll_n": len(x), "test_conditional_nll_nats": -cond.double().mean().item()}


@torch.no_grad()
def class_log_likelihoods(model: ARTransformer, x: torch.Tensor) -> torch.Tensor:
    """log p(x | y) of binary images (B, 1, 28, 28) under each of the ten labels, (B, 10), in nats."""
    B = len(x)
    labels = torch.arange(NUM_CLASSES, device=x.device).repeat(B)  # (B * 10,): 0..9 for every image
    return model.log_prob(x.repeat_interleave(NUM_CLASSES, 0), labels).view(B, NUM_CLASSES)


def bayes_posterior(log_likelihoods: torch.Tensor, log_prior: torch.Tensor | None = None) -> torch.Tensor:
    """Bayes' rule in logs, (B, 10): log p(y | x) from log p(x | y) (B, 10) and log p(y) (10,), uniform if None."""
    if log_prior is None:
        log_prior = torch.full((NUM_CLASSES,), -math.log(NUM_CLASSES))
    # $\log p(y \mid x) = \log p(x \mid y) + \log p(y) - \log \sum_{y'} p(x \mid y')\,p(y')$
    joint = log_likelihoods + log_prior.to(log_likelihoods)  # (B, 10)
    return joint - joint.logsumexp(-1, keepdim=True)


def bayes_classify(model: ARTransformer, x: torch.Tensor, log_prior: torch.Tensor | None = None) -> torch.Tensor:
    """The generative classifier: log-posteriors (B, 10) of the labels of binary images; the argmax is the
    most probable label, argmax_y log p(x | y) + log p(y)."""
    return bayes_posterior(class_log_likelihoods(model, x), log_prior)


def sampling_log_probs(logits: torch.Tensor, tokens: torch.Tensor, temperature: float = 1.0,
                       top_k: int | None = None, top_p: float | None = None) -> torch.Tensor:
    """log q(t_i | t_<i), (B, T), of ``tokens`` under the rule by which :meth:`Transformer.generate` draws them
    from ``logits`` (B, T, K): the softmax of the logits divided by the temperature, restricted by
    :func:`filter_logits` (-inf for a token the filter removes)."""
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    # $q(k \mid t_{<i}) \propto \exp(\ell_k / \tau)$ over the symbols the filter keeps
    return categorical_log_prob(filter_logits(logits.float() / temperature, top_k, top_p), tokens)


def build(config: dict) -> ARTransformer:
    return ARTransformer(from_dict(ARConfig, config))


def train(seed: int = 0, parents: dict | None = None) -> TrainResult:
    from agm.runtime import is_smoke

    config = ARConfig()
    config.train = config.train.budgeted(seed)
    if is_smoke():
        config.width, config.layers = 32, 1
    model, history = fit(config)
    return TrainResult(model, to_dict(config), steps=config.train.steps, extra={"history": history})


def evaluate(model: ARTransformer) -> dict[str, float]:
    """The exact test NLL on all 10 000 binarized test images (smoke: 100)."""
    from agm.runtime import budget

    return test_nll(model, n=budget(None, 100))


def evaluate_full(model: ARTransformer) -> dict:
    """``evaluate ar-transformer --full``: the exact NLL of the shipped model on all 10 000 binarized test images,
    then the ablations of Chapters 46–47, each cell stored as it finishes (:mod:`agm.autoregressive.ablations`)."""
    from agm import checkpoint
    from agm.autoregressive import ablations

    nll = evaluate(model)
    checkpoint.update_metrics("ar-transformer", nll)
    return nll | {ablations.KEY: ablations.fill()}


def sample(model: ARTransformer, n: int, generator: torch.Generator, labels: torch.Tensor | None = None,
           temperature: float = 1.0, top_k: int | None = None, top_p: float | None = None,
           unconditional: bool = False) -> torch.Tensor:
    """``sample ar-transformer``: the requested digits (default 0..9 in turn), or p(x) with ``unconditional``."""
    labels = None if unconditional else labels
    return check_images(model.sample(n, generator, labels, temperature=temperature, top_k=top_k, top_p=top_p))


def add_sample_options(parser) -> None:
    parser.add_argument("--temperature", type=float, default=1.0, help="divide the logits by this before sampling")
    parser.add_argument("--top-k", dest="top_k", type=int, default=None, help="sample among the k likeliest tokens")
    parser.add_argument("--top-p", dest="top_p", type=float, default=None,
                        help="sample among the smallest set of tokens of probability >= p (nucleus)")
    parser.add_argument("--unconditional", action="store_true", help="the null context: draw from p(x), no label")


SPEC = ModelSpec(
    name="ar-transformer", chapter=45, summary="decoder-only transformer over 2x2-pixel tokens, label or null context",
    build=build, train=train, sample=sample, evaluate=evaluate, evaluate_full=evaluate_full, conditional=True,
    train_minutes=120.0,
    add_sample_options=add_sample_options, metric_sample_options=lambda: {"unconditional": True},
    samples="binary images",
)
register(SPEC)
