r"""MADE, the masked autoencoder for distribution estimation (Germain et al., 2015), Chapter 42.

An MLP from the D = 784 binary pixels to D logits whose weights are multiplied by 0/1 masks, so that the
logit of pixel d sees only the pixels before d in an ordering: the outputs are the conditionals
p(x_d | x_<d) of the chain rule, and one forward pass gives the exact log-likelihood of an image.

The masks come from degrees (Germain et al., Section 4). Input d has degree m(d), its position in the
ordering (1..D); hidden unit k of layer l draws a degree m^l(k) uniformly from {min m^{l-1}, ..., D - 1}.
A hidden connection k' -> k is kept when m^l(k) >= m^{l-1}(k'), an output connection k -> d when
m(d) > m^L(k). A unit of degree m then depends on the inputs of degree <= m only, and output d on the
inputs before it.

Connectivity-agnostic training (Germain et al., Section 4.2): :attr:`MADEConfig.masks` sets of hidden
degrees, fixed by the seed, are cycled through minibatch by minibatch, all with the raster ordering of the
pixels (``order_agnostic`` also permutes the ordering with each set). Each set is a different
autoregressive model sharing the weights; the test likelihood averages their probabilities,
p(x) = (1/K) sum_k p_k(x), which is exact for the mixture and at least as good as their mean log-likelihood.
The degrees are buffers of the model, so the masks travel with the weights.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from agm.config import TrainConfig, from_dict, to_dict
from agm.data import check_images
from agm.registry import ModelSpec, TrainResult, refuse_labels, register
from agm.train import fit_examples

D = 28 * 28


def made_training(epochs: int = 150, **changes) -> TrainConfig:
    """Adam at 1e-3 with a cosine decay to 1e-5, batches of 100, ``epochs`` passes over the training images."""
    return TrainConfig(**{"steps": None, "epochs": epochs, "batch_size": 100, "lr": 1e-3, "lr_final": 1e-5} | changes)


@dataclass
class MADEConfig:
    hidden: tuple[int, ...] = (500,)  # widths of the masked hidden layers (Germain et al.: one layer of 500)
    masks: int = 32  # sets of hidden degrees cycled over minibatches, and averaged at test time
    order_agnostic: bool = False  # also draw a new pixel ordering with each set (False: raster order)
    direct: bool = True  # also connect input j to output d directly when j comes before d (Germain et al.)
    degrees_seed: int = 0  # the sets of degrees are drawn from this seed
    train: TrainConfig = field(default_factory=made_training)

    def __post_init__(self):
        if self.masks < 1 or not self.hidden or min(self.hidden) < 1:
            raise ValueError(f"need masks >= 1 and at least one hidden layer of positive width, got {self}")


def draw_degrees(hidden: tuple[int, ...], dim: int, order_agnostic: bool,
                 generator: torch.Generator) -> list[torch.Tensor]:
    """Degrees of the inputs (a permutation of 1..dim) and of each hidden layer's units, as long tensors."""
    inputs = torch.randperm(dim, generator=generator) + 1 if order_agnostic else torch.arange(1, dim + 1)
    degrees = [inputs]
    for width in hidden:
        low = int(degrees[-1].min())
        degrees.append(torch.randint(low, dim, (width,), generator=generator))  # uniform on {low, ..., dim - 1}
    return degrees


def masks_from_degrees(degrees: list[torch.Tensor]) -> list[torch.Tensor]:
    """The 0/1 weight masks, each (out, in), of the hidden layers and of the output layer."""
    # hidden: M[k, k'] = 1[m^l(k) >= m^{l-1}(k')]; output: M[d, k] = 1[m(d) > m^L(k)]
    hidden = [(d_out[:, None] >= d_in[None, :]).float() for d_in, d_out in zip(degrees[:-1], degrees[1:], strict=True)]
    return hidden + [(degrees[0][:, None] > degrees[-1][None, :]).float()]


class MADE(nn.Module):
    """Masked MLP: binary images -> the D logits of p(x_d = 1 | x_<d), under one of ``config.masks`` masks."""

    def __init__(self, config: MADEConfig, dim: int = D):
        super().__init__()
        self.config, self.dim = config, dim
        sizes = [dim, *config.hidden, dim]
        self.layers = nn.ModuleList(nn.Linear(a, b) for a, b in zip(sizes[:-1], sizes[1:], strict=True))
        self.direct = nn.Linear(dim, dim, bias=False) if config.direct else None
        generator = torch.Generator().manual_seed(config.degrees_seed)
        sets = [draw_degrees(config.hidden, dim, config.order_agnostic, generator) for _ in range(config.masks)]
        for layer in range(len(sizes) - 1):  # degrees[i][layer]: (masks, width of that layer)
            self.register_buffer(f"degrees{layer}", torch.stack([s[layer] for s in sets]))

    def degrees(self, mask: int) -> list[torch.Tensor]:
        return [getattr(self, f"degrees{layer}")[mask] for layer in range(len(self.layers))]

    def ordering(self, mask: int) -> torch.Tensor:
        """The pixel indices in the order in which mask ``mask`` generates them."""
        return torch.argsort(self.degrees(mask)[0])

    def forward(self, x: torch.Tensor, mask: int = 0) -> torch.Tensor:
        """Logits (B, D) of each pixel given the pixels before it, for x of shape (B, 1, 28, 28) or (B, D)."""
        if not 0 <= mask < self.config.masks:
            raise ValueError(f"mask must be in [0, {self.config.masks}), got {mask}")
        h = x.reshape(len(x), -1)
        if h.shape[1] != self.dim:
            raise ValueError(f"expected {self.dim} pixels per image, got input of shape {list(x.shape)}")
        degrees = self.degrees(mask)
        x_flat = h
        for i, (layer, m) in enumerate(zip(self.layers, masks_from_degrees(degrees), strict=True)):
            h = F.linear(h, layer.weight * m, layer.bias)
            if i < len(self.layers) - 1:
                h = F.relu(h)
        if self.direct is not None:  # a logistic regression on the earlier pixels, as in a fully visible SBN
            # $M_{dj} = 1[m(d) > m(j)]$
            h = h + F.linear(x_flat, self.direct.weight * (degrees[0][:, None] > degrees[0][None, :]))
        return h

    def log_prob(self, x: torch.Tensor, mask: int = 0) -> torch.Tensor:
        """log p_mask(x) in nats per image, exactly: the sum of the D conditionals' Bernoulli log-likelihoods."""
        flat = x.reshape(len(x), -1)
        return -F.binary_cross_entropy_with_logits(self(flat, mask), flat, reduction="none").sum(1)

    def mask_log_probs(self, x: torch.Tensor, masks: int | None = None) -> torch.Tensor:
        """log p_k(x) under each of the first K = ``masks`` masks (default all), (K, B)."""
        return torch.stack([self.log_prob(x, m) for m in range(masks or self.config.masks)])

    def ensemble_log_prob(self, x: torch.Tensor, masks: int | None = None) -> torch.Tensor:
        """log of (1/K) sum_k p_k(x) over the first K = ``masks`` masks (default all): the mixture's exact density."""
        logs = self.mask_log_probs(x, masks)  # (K, B)
        # $\log \frac{1}{K}\sum_k p_k(x)$
        return torch.logsumexp(logs, 0) - math.log(len(logs))

    @torch.no_grad()
    def sequential_log_prob(self, x: torch.Tensor, mask: int = 0) -> torch.Tensor:
        """log p_mask(x) the slow way, one conditional per forward pass from an input holding only the pixels
        before it: D passes where :meth:`log_prob` needs one (the two agree when the masks are right)."""
        flat = x.reshape(len(x), -1)
        seen, total = torch.zeros_like(flat), torch.zeros(len(flat), device=flat.device)
        for d in self.ordering(mask).tolist():
            # $\log p(x_d \mid x_{<d})$ from the prefix alone
            total -= F.binary_cross_entropy_with_logits(self(seen, mask)[:, d], flat[:, d], reduction="none")
            seen[:, d] = flat[:, d]
        return total

    @torch.no_grad()
    def sample_flat(self, n: int, generator: torch.Generator | None = None, mask: int = 0) -> torch.Tensor:
        """n binary vectors (n, D) drawn pixel by pixel in the ordering of ``mask``: D forward passes."""
        dev = next(self.parameters()).device
        x = torch.zeros(n, self.dim, device=dev)
        for d in self.ordering(mask).tolist():
            p = torch.sigmoid(self(x, mask)[:, d])
            x[:, d] = torch.bernoulli(p.cpu(), generator=generator).to(dev)
        return x

    def sample(self, n: int, generator: torch.Generator | None = None, mask: int = 0) -> torch.Tensor:
        """n binary images (n, 1, 28, 28) from :meth:`sample_flat`."""
        return self.sample_flat(n, generator, mask).reshape(n, 1, 28, 28)


def loss(model: MADE, x: torch.Tensor, step: int) -> torch.Tensor:
    """Mean NLL (nats per image) of a binarized batch under mask ``step mod K``: each minibatch trains one model."""
    return -model.log_prob(x, step % model.config.masks).mean()


def fit(config: MADEConfig, log=print, log_every: int = 1000) -> tuple[MADE, list[dict[str, float]]]:
    """Adam on the 60 000 training images, re-binarized at every use (dynamic binarization)."""
    from agm.data import binarize, mnist
    from agm.runtime import device

    torch.manual_seed(config.train.seed)
    x, _ = mnist("trainval")
    model = MADE(config).to(device())
    masks = itertools.count()  # minibatch i trains mask i mod K
    history = fit_examples(model, lambda m, batch, generator: loss(m, batch, next(masks)), config.train, x,
                           transform=binarize, desc=f"made K={config.masks}", log_every=log_every)
    log(f"made: {history[-1]['step']} steps, final loss {history[-1]['loss']:.2f}")
    return model.cpu().eval(), history


# -- the registered model ----------------------------------------------------------------------------------

# Published anchors (static binarization; the book's test set is binarized once with a fixed seed)
MADE_NLL = 88.04  # Germain et al. (2015): one hidden layer, 32 masks
NADE_NLL = 88.33  # Uria et al. (2016)
PIXELCNN_NLL = 81.30  # van den Oord, Kalchbrenner and Kavukcuoglu (2016), the MNIST table of Pixel RNN


@torch.no_grad()
def test_nll(model: MADE, n: int | None = None, masks: int | None = None) -> dict[str, float]:
    """Exact -log p(x) of the K-mask ensemble on the first n images of the binarized test set, with the NLL of
    mask 0 alone and the mean over masks of each mask's NLL."""
    from agm.data import binarized_test_set
    from agm.metrics import nll_report

    x, _ = binarized_test_set()
    x = x[:n] if n else x
    model.eval()
    logs = torch.cat([model.mask_log_probs(x[i:i + 500], masks) for i in range(0, len(x), 500)], 1)  # (K, N)
    ensemble = torch.logsumexp(logs.double(), 0) - math.log(len(logs))
    return nll_report(ensemble) | {"test_nll_n": len(x), "test_nll_masks": len(logs),
                                   "test_nll_nats_one_mask": -logs[0].double().mean().item(),
                                   "test_nll_nats_mean_of_masks": -logs.double().mean().item()}


def build(config: dict) -> MADE:
    return MADE(from_dict(MADEConfig, config))


def train(seed: int = 0, parents: dict | None = None) -> TrainResult:
    from agm.runtime import budget, is_smoke

    config = MADEConfig(train=made_training(budget(made_training().epochs, 1), batch_size=budget(100, 2000),
                                            seed=seed))
    if is_smoke():  # a small network and two masks, same code
        config.hidden, config.masks = (64,), 2
    model, history = fit(config)
    return TrainResult(model, to_dict(config), steps=history[-1]["step"], extra={"history": history})


def evaluate(model: MADE) -> dict[str, float]:
    """The exact test NLL of the mask ensemble on all 10 000 binarized test images (smoke: 100)."""
    from agm.runtime import budget

    return test_nll(model, n=budget(None, 100))


def sample(model: MADE, n: int, generator: torch.Generator, labels=None, mask: int = 0) -> torch.Tensor:
    """``sample made``: binary images in the ordering of one mask."""
    refuse_labels(labels)
    return check_images(model.sample(n, generator, mask))


def add_sample_options(parser) -> None:
    parser.add_argument("--mask", type=int, default=0, help="which of the trained masks (orderings) draws")


SPEC = ModelSpec(
    name="made", chapter=42, summary="MADE: one masked hidden layer of 500 over 784 binary pixels, 32 masks",
    build=build, train=train, sample=sample, evaluate=evaluate, train_minutes=60.0,
    add_sample_options=add_sample_options, samples="binary images",
)
register(SPEC)
