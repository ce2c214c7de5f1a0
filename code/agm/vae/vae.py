"""Variational autoencoders on dynamically binarized MNIST (Kingma & Welling, 2014), Chapters 18–21.

A Gaussian encoder q(z|x) = N(mu(x), diag sigma^2(x)), a Bernoulli decoder p(x|z) with logits from an
MLP, the prior p(z) = N(0, I). The same network is trained by the ELBO (k = 1), the beta-weighted ELBO
(Chapter 22) or the importance-weighted bound of Burda et al. (2016) with k samples.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from agm.config import TrainConfig, from_dict, to_dict
from agm.data import check_images
from agm.distributions import bernoulli_log_likelihood, diagonal_gaussian_log_prob, gaussian_kl_to_standard
from agm.registry import ModelSpec, TrainResult, refuse_labels, register
from agm.train import gradient_step, run_steps, train_loop
from agm.vae.bounds import iwae_bound_from_log_weights


def vae_training(epochs: int = 250, **changes) -> TrainConfig:
    """Adam at 1e-3 with a cosine decay to 1e-4, batches of 100, ``epochs`` passes over the training images."""
    return TrainConfig(**{"steps": None, "epochs": epochs, "batch_size": 100, "lr": 1e-3, "lr_final": 1e-4} | changes)


@dataclass
class VAEConfig:
    latent_dim: int = 32
    hidden: tuple[int, ...] = (512, 256)  # encoder widths; the decoder mirrors them
    k: int = 1  # samples per image in the training bound: 1 = ELBO (VAE), > 1 = IWAE
    beta: float = 1.0  # weight of the KL term (Chapter 22); 1 = the ELBO
    train: TrainConfig = field(default_factory=vae_training)  # each pass re-binarizes the images


def mlp(sizes: list[int]) -> nn.Sequential:
    layers: list[nn.Module] = []
    for i, (a, b) in enumerate(zip(sizes[:-1], sizes[1:], strict=True)):
        layers.append(nn.Linear(a, b))
        if i < len(sizes) - 2:
            layers.append(nn.Tanh())
    return nn.Sequential(*layers)


class VAE(nn.Module):
    def __init__(self, config: VAEConfig):
        super().__init__()
        if config.latent_dim < 1 or config.k < 1 or config.beta < 0:
            raise ValueError(f"need latent_dim >= 1, k >= 1 and beta >= 0, got {config}")
        self.config = config
        h = list(config.hidden)
        self.encoder = mlp([784, *h, 2 * config.latent_dim])  # -> (mu, log sigma^2)
        self.decoder = mlp([config.latent_dim, *reversed(h), 784])  # -> Bernoulli logits

    def encode(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Parameters of q(z|x): mean and log-variance, each (B, L)."""
        check_images(x)
        mu, logvar = self.encoder(x.flatten(1)).chunk(2, dim=1)
        return mu, logvar

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """Bernoulli logits of p(x|z), (..., 1, 28, 28) for z of shape (..., L)."""
        return self.decoder(z).view(*z.shape[:-1], 1, 28, 28)

    @torch.no_grad()
    def sample(self, n: int, generator: torch.Generator | None = None, mean: bool = True) -> torch.Tensor:
        """z ~ N(0, I), then the decoder's pixel probabilities (``mean``) or one Bernoulli draw of them."""
        dev = next(self.parameters()).device
        z = torch.randn(n, self.config.latent_dim, generator=generator).to(dev)  # drawn on the CPU generator
        probs = torch.sigmoid(self.decode(z)).cpu()
        return probs if mean else torch.bernoulli(probs, generator=generator)


def reparameterize(mu: torch.Tensor, logvar: torch.Tensor, k: int = 1,
                   generator: torch.Generator | None = None) -> torch.Tensor:
    """k draws z = mu + sigma * eps, eps ~ N(0, I): (k, B, L), differentiable in mu and logvar."""
    eps = torch.randn((k, *mu.shape), generator=generator).to(mu.device)
    return mu + (0.5 * logvar).exp() * eps


def reconstruction_log_likelihood(model: VAE, x: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
    """log p(x_b | z) of each image x (B, 1, 28, 28) under the decoder at draws z (..., B, L): (..., B).

    With the decoder fixed, ``functools.partial(reconstruction_log_likelihood, model, x)`` is the integrand
    f_b(z) of the reconstruction term E_q[log p(x_b | z)], in the form the estimators of Chapter 19 take.
    """
    # $f_b(z) = \log p_\theta(x_b \mid z) = \sum_d x_{bd}\log\sigma(\ell_d) + (1 - x_{bd})\log(1 - \sigma(\ell_d))$
    return bernoulli_log_likelihood(model.decode(z), x)


def elbo_terms(model: VAE, x: torch.Tensor, generator: torch.Generator | None = None) -> dict[str, torch.Tensor]:
    """Per image: the reconstruction term E_q[log p(x|z)] (one sample) and the closed-form KL (the rate)."""
    mu, logvar = model.encode(x)
    z = reparameterize(mu, logvar, 1, generator)[0]
    return {"reconstruction": bernoulli_log_likelihood(model.decode(z), x), "kl": gaussian_kl_to_standard(mu, logvar)}


def elbo_of(model: VAE, x: torch.Tensor, mu: torch.Tensor, logvar: torch.Tensor, samples: int = 1,
            generator: torch.Generator | None = None) -> torch.Tensor:
    """The ELBO per image for a given Gaussian q = N(mu, diag e^logvar), its expectation over ``samples`` draws."""
    z = reparameterize(mu, logvar, samples, generator)  # (S, B, L)
    # $\mathcal{L} = \mathbb{E}_q[\log p(x|z)] - \mathrm{KL}(q \,\|\, p(z))$
    return bernoulli_log_likelihood(model.decode(z), x).mean(0) - gaussian_kl_to_standard(mu, logvar)


def optimize_local_posterior(model: VAE, x: torch.Tensor, steps: int = 300, samples: int = 16, lr: float = 1e-2,
                             generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Non-amortized inference: start from the encoder's q(z|x) and ascend each image's own ELBO.

    The decoder stays fixed; only the per-image (mu, log sigma^2) move. The improvement over the
    encoder's ELBO is the amortization gap (Cremer et al., 2018).
    """
    if steps < 1 or samples < 1:
        raise ValueError(f"steps and samples must be >= 1, got {steps} and {samples}")
    mu, logvar = (t.detach().clone().requires_grad_(True) for t in model.encode(x))
    optimizer = torch.optim.Adam([mu, logvar], lr=lr)

    def step(i: int) -> dict[str, float]:
        loss = -elbo_of(model, x, mu, logvar, samples, generator).sum()
        return {"loss": gradient_step(loss, optimizer, desc="local posterior", step=i)}

    model.requires_grad_(False)
    try:
        run_steps(step, steps, log_every=steps, desc="local posterior")
    finally:
        model.requires_grad_(True)
    return mu.detach(), logvar.detach()


def log_importance_weights(model: VAE, x: torch.Tensor, k: int,
                           generator: torch.Generator | None = None) -> torch.Tensor:
    """log w_i = log p(x, z_i) - log q(z_i | x) for z_1..z_k ~ q(z|x): (k, B)."""
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    mu, logvar = model.encode(x)
    z = reparameterize(mu, logvar, k, generator)  # (k, B, L)
    log_prior = diagonal_gaussian_log_prob(z)  # log N(z; 0, I)
    log_q = diagonal_gaussian_log_prob(z, mu, logvar)  # log q(z | x)
    return bernoulli_log_likelihood(model.decode(z), x) + log_prior - log_q


def iwae_bound(model: VAE, x: torch.Tensor, k: int, generator: torch.Generator | None = None) -> torch.Tensor:
    """L_k = log (1/k) sum_i w_i per image (Burda et al., 2016): L_1 is the ELBO, L_k <= log p(x)."""
    return iwae_bound_from_log_weights(log_importance_weights(model, x, k, generator))


def loss(model: VAE, x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """The training loss per image, averaged over the batch: -ELBO_beta for k = 1, -L_k for k > 1."""
    if model.config.k == 1:
        terms = elbo_terms(model, x, generator)
        return -(terms["reconstruction"] - model.config.beta * terms["kl"]).mean()
    return -iwae_bound(model, x, model.config.k, generator).mean()


@torch.no_grad()
def iwae_bound_curve(model: VAE, x: torch.Tensor, ks: list[int], repeats: int, max_samples: int = 10_000,
                     generator: torch.Generator | None = None) -> list[float]:
    """For each k, the mean over images of L_k averaged over independent repetitions, at most
    ``repeats`` of them and k * repetitions <= ``max_samples`` (at least one)."""
    curve = []
    for k in ks:
        runs = max(1, min(repeats, max_samples // k))
        curve.append(torch.stack([iwae_bound(model, x, k, generator).mean() for _ in range(runs)]).mean().item())
    return curve


@torch.no_grad()
def importance_sampled_log_likelihood(model: VAE, x: torch.Tensor, k: int = 5000, chunk: int = 500,
                                      generator: torch.Generator | None = None) -> torch.Tensor:
    """log p(x) ~ L_k per image for large k, accumulated over chunks of samples (memory stays bounded)."""
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    parts = [log_importance_weights(model, x, min(chunk, k - i), generator) for i in range(0, k, chunk)]
    return iwae_bound_from_log_weights(torch.cat(parts))


def fit(config: VAEConfig, log=print, log_every: int = 600) -> tuple[VAE, list[dict[str, float]]]:
    """Adam on the 60 000 training images, re-binarized at every use (dynamic binarization)."""
    from agm.data import batches, binarize, mnist
    from agm.runtime import device

    train = config.train
    generator = torch.Generator().manual_seed(train.seed)
    torch.manual_seed(train.seed)
    x, _ = mnist("trainval")
    dev = device()
    model = VAE(config).to(dev)
    optimizer = train.adam(model.parameters())
    steps = train.total_steps(len(x))
    history = train_loop(model, lambda m, batch: loss(m, batch, generator),
                         batches(x, batch_size=train.batch_size, generator=generator, transform=binarize, device=dev),
                         optimizer, steps,
                         log_every=log_every, desc=f"vae k={config.k} beta={config.beta}",
                         scheduler=train.scheduler(optimizer, steps))
    log(f"vae: {steps} steps, final loss {history[-1]['loss']:.2f}")
    return model.cpu().eval(), history


# -- the registered models ---------------------------------------------------------------------------

NLL_K = 5000  # importance samples of the book's test NLL (Burda et al. report k = 5000)
# Published anchors (Burda et al., 2016, Table 1: one stochastic layer, dynamic binarization, k = 5000)
BURDA_VAE_NLL = 86.76  # VAE trained on the ELBO (k = 1)
BURDA_IWAE5_NLL = 85.54  # IWAE trained with k = 5
BURDA_IWAE_NLL = 84.78  # IWAE trained with k = 50
BURDA_EPOCHS = sum(3**i for i in range(8))  # their schedule: 3^i passes at learning rate 0.001 * 10^(-i/7), i < 8
IWAE_K = 5  # samples per image in the training bound of the shipped `iwae`


def test_nll(model: VAE, n: int | None = None, k: int = NLL_K, seed: int = 0) -> dict[str, float]:
    """-log p(x) by importance sampling with k samples on the first n images of the binarized test set."""
    from agm.data import binarized_test_set
    from agm.metrics import nll_report

    x, _ = binarized_test_set()
    x = x[:n] if n else x
    generator = torch.Generator().manual_seed(seed)
    log_px = torch.cat([importance_sampled_log_likelihood(model, x[i : i + 100], k, generator=generator)
                        for i in range(0, len(x), 100)])
    return nll_report(log_px) | {"test_nll_k": k, "test_nll_n": len(x)}


def build(config: dict) -> VAE:
    return VAE(from_dict(VAEConfig, config))


def trainer(epochs: int, **fields):
    """``train NAME`` for a VAE with these config fields, trained for ``epochs`` (one in smoke mode)."""
    def train(seed: int = 0, parents: dict | None = None) -> TrainResult:
        from agm.runtime import budget

        config = VAEConfig(train=vae_training(budget(epochs, 1), batch_size=budget(100, 2000), seed=seed), **fields)
        model, history = fit(config)
        steps = history[-1]["step"]
        return TrainResult(model, to_dict(config), steps=steps, extra={"history": history})

    return train


def evaluate(model: VAE) -> dict[str, float]:
    """The quick estimate stored by `train`: a subset of the test set, fewer importance samples."""
    from agm.runtime import budget

    return test_nll(model, n=budget(1000, 20), k=budget(1000, 10))


def evaluate_full(model: VAE) -> dict[str, float]:
    """`evaluate NAME --full`: all 10 000 test images, k = 5000."""
    return {f"full_{key}": value for key, value in test_nll(model).items()}


def sample(model: VAE, n: int, generator: torch.Generator, labels=None, mean: bool = True) -> torch.Tensor:
    """``sample vae``: decoder means (pixel probabilities) by default, or one Bernoulli draw of them."""
    refuse_labels(labels)
    return model.sample(n, generator, mean=mean)


def add_sample_options(parser) -> None:
    parser.add_argument("--binary", dest="mean", action="store_false",
                        help="one Bernoulli draw of each pixel instead of the decoder's probabilities")


register(ModelSpec(
    name="vae", chapter=20, summary="VAE: Gaussian encoder, Bernoulli decoder, 32-d latent, trained on the ELBO",
    build=build, train=trainer(vae_training().epochs), sample=sample, evaluate=evaluate,
    evaluate_full=evaluate_full, train_minutes=45.0, add_sample_options=add_sample_options,
    samples="decoder means",
))

register(ModelSpec(
    name="iwae", chapter=20,
    summary=f"IWAE: the VAE's network trained on the importance-weighted bound with k = {IWAE_K}",
    build=build, train=trainer(100, k=IWAE_K), sample=sample, evaluate=evaluate,
    evaluate_full=evaluate_full, train_minutes=40.0, add_sample_options=add_sample_options,
    samples="decoder means",
))

register(ModelSpec(
    name="vae-2d", chapter=21, summary="VAE with a 2-D latent space, for the latent-manifold figures",
    build=build, train=trainer(50, latent_dim=2), sample=sample, evaluate=evaluate,
    train_minutes=6.0, add_sample_options=add_sample_options,
    samples="decoder means",
))
