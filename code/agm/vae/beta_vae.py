"""The β-VAE (Higgins et al., 2017) and its rate–distortion view (Alemi et al., 2018), Chapter 22.

The model is the VAE of :mod:`agm.vae.vae` with ``VAEConfig(beta=...)``: its loss is D + βR, the
distortion plus β times the rate. This module measures R and D, sweeps β, traverses latent
coordinates, and solves a linear Gaussian β-VAE in closed form. The checkpoint ``beta-vae`` is the
sweep's β = 4 model; its manifest carries the whole sweep.
"""

from __future__ import annotations

import base64
import math
from collections.abc import Sequence

import numpy as np
import torch

from agm.config import to_dict
from agm.data import check_images
from agm.distributions import gaussian_kl_to_standard
from agm.registry import ModelSpec, TrainResult, register
from agm.train import gradient_step, run_steps
from agm.vae import vae
from agm.vae.vae import VAE, VAEConfig, elbo_terms, fit, vae_training

BETAS = (0.25, 0.5, 1.0, 2.0, 4.0, 8.0)  # factors of two on both sides of the ELBO's beta = 1
CHOSEN_BETA = 4.0  # the sweep's model kept as the checkpoint, for samples and traversals
SWEEP_EPOCHS = 15  # per beta; 6 x 15 epochs of the default VAE take about 10 minutes on 2 CPU cores
SMOKE_HIDDEN = (64,)  # smoke mode trains six narrow VAEs for one epoch each
ACTIVE_THRESHOLD = 1e-2  # unit u is active if Var_x E_q[z_u] exceeds this (Burda et al., 2016)
GALLERY = 8  # test digits reconstructed and prior draws decoded for every beta, kept in the manifest


def check_betas(betas: Sequence[float]) -> tuple[float, ...]:
    """Each beta must be a finite number >= 0, without repeats; return them as floats."""
    betas = tuple(float(b) for b in betas)
    if not betas:
        raise ValueError("need at least one beta")
    for b in betas:
        if not (math.isfinite(b) and b >= 0):
            raise ValueError(f"beta must be a finite number >= 0 (the weight of the KL term; a negative weight "
                             f"rewards rate without bound), got {b}")
    if len(set(betas)) != len(betas):
        raise ValueError(f"betas must not repeat, got {betas}")
    return betas


@torch.no_grad()
def rate_distortion(model: VAE, x: torch.Tensor, generator: torch.Generator | None = None,
                    batch_size: int = 1000) -> dict[str, float]:
    """Rate R = E_x KL(q(z|x) || p(z)) and distortion D = -E_x E_q log p(x|z), in nats per image.

    ``x`` holds binarized images; D uses one draw z ~ q(z|x) per image, R the closed-form KL.
    """
    check_images(x)
    rates, distortions = [], []
    for i in range(0, len(x), batch_size):
        terms = elbo_terms(model, x[i : i + batch_size], generator)
        rates.append(terms["kl"])  # (B,)
        distortions.append(-terms["reconstruction"])  # (B,)
    rate, distortion = torch.cat(rates), torch.cat(distortions)  # (N,), (N,)
    # $-\mathcal{L} = D + R$
    return {"rate": rate.mean().item(), "distortion": distortion.mean().item(),
            "elbo": -(distortion + rate).mean().item(), "n": len(x)}


@torch.no_grad()
def latent_usage(model: VAE, x: torch.Tensor) -> dict[str, torch.Tensor]:
    """Per latent dimension u: activity Var_x(E_q[z_u]) and the mean KL term (its share of the rate), each (L,)."""
    mu, logvar = model.encode(x)  # (N, L), (N, L)
    # $R_u = \E_x \mathrm{KL}\big(\mathcal N(\mu_u, \sigma_u^2) \,\|\, \mathcal N(0, 1)\big)$, one unit at a time
    kl = gaussian_kl_to_standard(mu.unsqueeze(-1), logvar.unsqueeze(-1)).mean(0)  # (L,)
    return {"activity": mu.var(0), "kl": kl}


@torch.no_grad()
def traverse(model: VAE, x: torch.Tensor, dims: Sequence[int], values: torch.Tensor) -> torch.Tensor:
    """Decode the posterior mean of one image with coordinate d set to each value in turn.

    Returns the decoder's pixel probabilities, (len(dims), len(values), 1, 28, 28).
    """
    check_images(x)
    if len(x) != 1:
        raise ValueError(f"traverse takes one image [1, 1, 28, 28], got {len(x)}")
    latent_dim = model.config.latent_dim
    if not all(0 <= d < latent_dim for d in dims):
        raise ValueError(f"dims must lie in 0..{latent_dim - 1}, got {list(dims)}")
    mu, _ = model.encode(x)  # (1, L)
    z = mu.repeat(len(dims), len(values), 1)  # (D, V, L)
    for i, d in enumerate(dims):
        z[i, :, d] = values
    return torch.sigmoid(model.decode(z))


def sweep(betas: Sequence[float] = BETAS, epochs: int = SWEEP_EPOCHS, x_test: torch.Tensor | None = None,
          log=print, training: dict | None = None, **fields) -> tuple[dict[float, VAE], list[dict]]:
    """Train one VAE per beta (same seed, same data order) and measure each on the binarized test set.

    ``fields`` are the VAEConfig's architecture fields; ``training`` changes to :func:`vae_training`.

    Returns the models by beta and one row per beta: rate, distortion, ELBO, active units, KL per unit.
    """
    from agm.data import binarized_test_set
    from agm.runtime import budget

    betas = check_betas(betas)
    x_test = binarized_test_set()[0][: budget(10_000, 500)] if x_test is None else x_test
    models, table = {}, []
    for beta in betas:
        model, history = fit(VAEConfig(beta=beta, train=vae_training(epochs, **(training or {})), **fields), log=log)
        usage = latent_usage(model, x_test)
        row = {"beta": beta, "steps": history[-1]["step"], "final_loss": history[-1]["loss"]}
        row |= rate_distortion(model, x_test, torch.Generator().manual_seed(0))
        row["active_units"] = int((usage["activity"] > ACTIVE_THRESHOLD).sum())
        row["kl_per_unit"] = usage["kl"].tolist()
        models[beta] = model
        table.append(row)
    return models, table


# -- a β-VAE solved in closed form ---------------------------------------------------------------------

def linear_gaussian_terms(a: torch.Tensor, logvar: torch.Tensor, b: torch.Tensor,
                          data_var: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Rate and distortion per coordinate, (d,), of a linear Gaussian VAE on x ~ N(0, diag s^2).

    Encoder q(z|x) = N(a x, sigma^2) and decoder p(x|z) = N(b z, 1), coordinate by coordinate, prior N(0, 1).
    """
    # $R = \tfrac12\big(a^2 s^2 + \sigma^2 - \log\sigma^2 - 1\big)$
    rate = 0.5 * (a**2 * data_var + logvar.exp() - logvar - 1)
    # $D = \tfrac12\log 2\pi + \tfrac12\big(s^2(1 - ab)^2 + b^2\sigma^2\big)$
    distortion = 0.5 * math.log(2 * math.pi) + 0.5 * (data_var * (1 - a * b) ** 2 + b**2 * logvar.exp())
    return rate, distortion


def linear_gaussian_optimum(beta: float, data_var: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The minimizer of D + beta R in closed form: rate and distortion per coordinate, (d,)."""
    check_betas([beta])
    # $R_\beta = \max\big(0, \tfrac12\log(s^2/\beta)\big)$ — reverse water-filling at level beta
    rate = (0.5 * torch.log(data_var / beta)).clamp(min=0)
    # $D^*(R) = \tfrac12\log 2\pi + \tfrac12 s^2 e^{-2R}$
    distortion = 0.5 * math.log(2 * math.pi) + 0.5 * data_var * torch.exp(-2 * rate)
    return rate, distortion


def fit_linear_gaussian(betas: Sequence[float], data_var: torch.Tensor, steps: int = 4000,
                        lr: float = 0.05) -> tuple[torch.Tensor, torch.Tensor]:
    """Minimize D + beta R of the linear Gaussian VAE by Adam, from a = b = 1 and sigma = 1, for each beta.

    Returns the rate and distortion reached, (len(betas), d): one independent problem per beta and coordinate.
    """
    beta = torch.tensor(check_betas(betas), dtype=data_var.dtype)[:, None]  # (m, 1)
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    shape = (len(beta), len(data_var))
    a, b = torch.ones(shape, dtype=data_var.dtype), torch.ones(shape, dtype=data_var.dtype)
    logvar = torch.zeros(shape, dtype=data_var.dtype)
    for p in (a, b, logvar):
        p.requires_grad_(True)
    optimizer = torch.optim.Adam([a, b, logvar], lr=lr)

    def step(i: int) -> dict[str, float]:
        rate, distortion = linear_gaussian_terms(a, logvar, b, data_var)  # (m, d) each
        return {"loss": gradient_step((distortion + beta * rate).sum(), optimizer, desc="linear Gaussian", step=i)}

    run_steps(step, steps, log_every=steps, desc="linear Gaussian beta-VAE")
    rate, distortion = linear_gaussian_terms(a, logvar, b, data_var)
    return rate.detach(), distortion.detach()


# -- the registered model --------------------------------------------------------------------------------

def pack_images(images: torch.Tensor) -> str:
    """``[N, 1, 28, 28]`` in [0, 1] -> base64 text of 8-bit gray levels, compact enough for a manifest."""
    check_images(images)
    return base64.b64encode((images * 255).round().to(torch.uint8).numpy().tobytes()).decode("ascii")


def unpack_images(text: str) -> torch.Tensor:
    """The inverse of :func:`pack_images`, up to the 8-bit rounding: ``[N, 1, 28, 28]``."""
    data = np.frombuffer(base64.b64decode(text), dtype=np.uint8)
    if data.size == 0 or data.size % 784:
        raise ValueError(f"packed images must hold a multiple of 784 bytes, got {data.size}")
    return torch.from_numpy(data.copy()).float().div(255).view(-1, 1, 28, 28)


@torch.no_grad()
def gallery(models: dict[float, VAE], x: torch.Tensor, seed: int = 0) -> list[dict]:
    """For every beta: reconstructions of ``x`` at the posterior mean and decodings of the same prior draws."""
    latent_dim = next(iter(models.values())).config.latent_dim
    z = torch.randn(len(x), latent_dim, generator=torch.Generator().manual_seed(seed))  # (N, L), shared by all betas
    rows = []
    for beta, model in models.items():
        reconstructions = torch.sigmoid(model.decode(model.encode(x)[0]))
        rows.append({"beta": beta, "reconstructions": pack_images(reconstructions),
                     "samples": pack_images(torch.sigmoid(model.decode(z)))})
    return rows


def train(seed: int = 0, parents: dict | None = None) -> TrainResult:
    """``train beta-vae``: the sweep over BETAS; the checkpoint is the CHOSEN_BETA model."""
    from agm.data import binarized_test_set
    from agm.runtime import budget

    models, table = sweep(BETAS, budget(SWEEP_EPOCHS, 1), hidden=budget(VAEConfig.hidden, SMOKE_HIDDEN),
                          training={"batch_size": budget(100, 2000), "seed": seed})
    model = models[CHOSEN_BETA]
    extra = {"sweep": table, "chosen_beta": CHOSEN_BETA, "sweep_steps": sum(row["steps"] for row in table),
             "gallery": gallery(models, binarized_test_set()[0][:GALLERY], seed)}
    return TrainResult(model, to_dict(model.config), steps=table[BETAS.index(CHOSEN_BETA)]["steps"], extra=extra)


def evaluate(model: VAE) -> dict[str, float]:
    """The VAE's quick test NLL, plus the rate and distortion on the binarized test set."""
    from agm.data import binarized_test_set
    from agm.runtime import budget

    rd = rate_distortion(model, binarized_test_set()[0][: budget(10_000, 500)], torch.Generator().manual_seed(0))
    return vae.evaluate(model) | {"rate_nats": rd["rate"], "distortion_nats": rd["distortion"],
                                  "test_elbo_nats": rd["elbo"]}


register(ModelSpec(
    name="beta-vae", chapter=22,
    summary=f"beta-VAE: a sweep over beta = {', '.join(f'{b:g}' for b in BETAS)}; the checkpoint is beta = "
            f"{CHOSEN_BETA:g}",
    build=vae.build, train=train, sample=vae.sample, evaluate=evaluate, evaluate_full=vae.evaluate_full,
    train_minutes=12.0, add_sample_options=vae.add_sample_options,
    samples="decoder means",
))
