r"""Score matching (Chapter 34): fitting $s_\theta(x) \approx \nabla_x \log p(x)$ without p's normalizer.

Implicit (Hyvärinen, 2005), sliced (Song et al., 2020) and denoising (Vincent, 2011) score matching. A
score maps (B, ...) to (B, ...); a denoising one also takes sigma (B,). Losses sum over an example's
dimensions, average over the batch and return ``(loss, logs)``. Also: a score MLP and its fit, the
unadjusted Langevin algorithm, and the score an ε-prediction network implies.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch
from torch import nn

from agm.diffusion.schedule import NoiseSchedule
from agm.train import train_loop

Score = Callable[[torch.Tensor], torch.Tensor]
NoisyScore = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
WEIGHTINGS = ("none", "sigma2")
PROBES = ("gaussian", "rademacher")


def _sum_dims(x: torch.Tensor) -> torch.Tensor:
    """Sum over every dimension but the first: (B, ...) -> (B,)."""
    return x.flatten(1).sum(1)


def _check_batch(x: torch.Tensor) -> None:
    if x.ndim < 2 or len(x) == 0:
        raise ValueError(f"x must be a non-empty batch of shape (B, ...), got {list(x.shape)}")


def _check_score(s: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    if s.shape != x.shape:
        raise ValueError(f"the score must have the shape of its input {list(x.shape)}, got {list(s.shape)}")
    return s


def _noise_levels(sigma: float | torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """σ as a (B,) tensor of positive levels: a number is one level for the whole batch."""
    sigma = torch.as_tensor(sigma, dtype=x.dtype, device=x.device)
    sigma = sigma.expand(len(x)) if sigma.ndim == 0 else sigma
    if sigma.shape != (len(x),):
        raise ValueError(f"sigma must be a number or have shape ({len(x)},), got {list(sigma.shape)}")
    if not (sigma > 0).all():
        raise ValueError("the noise levels sigma must be > 0")
    return sigma


def explicit_score_matching_loss(score_fn: Score, x: torch.Tensor,
                                 true_score_fn: Score) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    r"""The Fisher divergence $\tfrac12\,\mathbb E_p\|s_\theta(x) - \nabla_x\log p(x)\|^2$ (p's score known)."""
    _check_batch(x)
    s = _check_score(score_fn(x), x)
    # $\tfrac12 \|s_\theta(x) - \nabla_x \log p(x)\|^2$ per example
    per_example = 0.5 * _sum_dims((s - true_score_fn(x)) ** 2)
    return per_example.mean(), {"per_example": per_example.detach()}


def jacobian_trace(score_fn: Score, x: torch.Tensor, create_graph: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    r"""$s(x)$ and $\operatorname{tr}\nabla_x s(x)$ per example, exactly: one backward pass per dimension."""
    x = x.detach().requires_grad_(True)
    with torch.enable_grad():
        s = _check_score(score_fn(x), x)
        flat, trace = s.flatten(1), torch.zeros(len(x), dtype=s.dtype, device=s.device)
        for i in range(flat.shape[1]):
            # $\partial s_i / \partial x_i$, summed over i
            (grad,) = torch.autograd.grad(flat[:, i].sum(), x, create_graph=create_graph, retain_graph=True)
            trace = trace + grad.flatten(1)[:, i]
    return (s, trace) if create_graph else (s.detach(), trace.detach())


def implicit_score_matching_loss(score_fn: Score, x: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    r"""Hyvärinen's (2005) $\mathbb E_p\big[\operatorname{tr}\nabla_x s_\theta(x) + \tfrac12\|s_\theta(x)\|^2\big]$.

    Equal to the Fisher divergence minus $\tfrac12\mathbb E_p\|\nabla\log p\|^2$, a constant. The trace
    costs D backward passes, so this is for low-dimensional x.
    """
    _check_batch(x)
    s, trace = jacobian_trace(score_fn, x, create_graph=True)
    # $\tfrac12\|s_\theta(x)\|^2$
    norm_term = 0.5 * _sum_dims(s**2)
    per_example = trace + norm_term
    return per_example.mean(), {"trace_term": trace.detach(), "norm_term": norm_term.detach(),
                                "per_example": per_example.detach()}


def draw_probes(x: torch.Tensor, n_probes: int, kind: str = "gaussian",
                generator: torch.Generator | None = None) -> torch.Tensor:
    """n_probes projection vectors v per example with E[v v^T] = I: (M, B, ...)."""
    if n_probes < 1 or kind not in PROBES:
        raise ValueError(f"need n_probes >= 1 and kind in {PROBES}, got {n_probes} and {kind!r}")
    v = torch.randn((n_probes, *x.shape), generator=generator, dtype=x.dtype).to(x.device)
    return v if kind == "gaussian" else v.sign()


def sliced_score_matching_loss(score_fn: Score, x: torch.Tensor, probes: torch.Tensor | None = None,
                               generator: torch.Generator | None = None, n_probes: int = 1,
                               variance_reduction: bool = True,
                               kind: str = "gaussian") -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    r"""Sliced score matching (Song et al., 2020): $\mathbb E_{p_v}\mathbb E_p\big[v^\top\nabla_x(v^\top s_\theta(x))
    + \tfrac12 (v^\top s_\theta(x))^2\big]$.

    ``probes`` (M, B, ...) are the v; if None, ``n_probes`` of ``kind`` are drawn with ``generator``. With
    ``variance_reduction`` (SSM-VR, the paper's default for E[v v^T] = I) the second term is its
    expectation over v, $\tfrac12\|s_\theta(x)\|^2$. The Hessian-vector product is one backward pass.
    """
    _check_batch(x)
    v = draw_probes(x, n_probes, kind, generator) if probes is None else probes
    if v.ndim != x.ndim + 1 or v.shape[1:] != x.shape or len(v) == 0:
        raise ValueError(f"probes must have shape (M, {', '.join(map(str, x.shape))}), got {list(v.shape)}")
    M = len(v)
    # one copy of x per probe: (M B, ...)
    xm = x.detach().unsqueeze(0).expand(M, *x.shape).reshape(-1, *x.shape[1:]).requires_grad_(True)
    v = v.reshape(-1, *x.shape[1:]).to(x.dtype)
    s = _check_score(score_fn(xm), xm)
    # $v^\top s_\theta(x)$
    sv = _sum_dims(v * s)
    # $v^\top \nabla_x (v^\top s_\theta(x))$, by one backward pass through $\sum v^\top s$
    (grad_sv,) = torch.autograd.grad(sv.sum(), xm, create_graph=True)
    hessian_term = _sum_dims(v * grad_sv)
    # $\tfrac12\|s_\theta\|^2$ (variance reduction) or $\tfrac12 (v^\top s_\theta)^2$
    norm_term = 0.5 * _sum_dims(s**2) if variance_reduction else 0.5 * sv**2
    per_example = (hessian_term + norm_term).view(M, len(x)).mean(0)
    return per_example.mean(), {"hessian_term": hessian_term.detach().view(M, len(x)).mean(0),
                                "norm_term": norm_term.detach().view(M, len(x)).mean(0),
                                "per_example": per_example.detach()}


def denoising_score_matching_loss(score_fn: NoisyScore, x: torch.Tensor, sigma: float | torch.Tensor,
                                  generator: torch.Generator | None = None, noise: torch.Tensor | None = None,
                                  weighting: str = "none") -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    r"""Denoising score matching (Vincent, 2011):
    $\tfrac12\,\mathbb E\,\lambda(\sigma)\,\|s_\theta(x + \sigma z, \sigma) + z/\sigma\|^2$.

    $-z/\sigma = \nabla_{\tilde x}\log\mathcal N(\tilde x; x, \sigma^2 I)$ at $\tilde x = x + \sigma z$.
    ``sigma`` is a number or one level per example (B,); ``noise`` is z (drawn with ``generator`` if None).
    ``weighting`` "none" is Vincent's $\lambda = 1$; "sigma2" is Song & Ermon's (2019) $\lambda(\sigma) = \sigma^2$.
    """
    _check_batch(x)
    if weighting not in WEIGHTINGS:
        raise ValueError(f"weighting must be one of {WEIGHTINGS}, got {weighting!r}")
    sigma = _noise_levels(sigma, x)
    z = torch.randn(x.shape, generator=generator, dtype=x.dtype).to(x.device) if noise is None else noise
    if z.shape != x.shape:
        raise ValueError(f"noise must have the shape of x {list(x.shape)}, got {list(z.shape)}")
    sig = sigma.view(-1, *[1] * (x.ndim - 1))
    # $\tilde x = x + \sigma z$
    x_noisy = x + sig * z
    s = _check_score(score_fn(x_noisy, sigma), x_noisy)
    # $\tfrac12\|s_\theta(\tilde x, \sigma) + z / \sigma\|^2$, times $\lambda(\sigma)$
    per_example = 0.5 * _sum_dims((s + z / sig) ** 2)
    per_example = per_example * sigma**2 if weighting == "sigma2" else per_example
    return per_example.mean(), {"per_example": per_example.detach(), "sigma": sigma}


def eps_model_score(model: nn.Module, schedule: NoiseSchedule, t: torch.Tensor, space: str = "xbar") -> NoisyScore:
    r"""The score of the noised data that an ε-prediction network implies at timesteps t (B,).

    ``space`` "xbar": in $\bar x = x_t/\sqrt{\bar\alpha_t} = x_0 + \sigma_t\epsilon$ with
    $\sigma_t = \sqrt{(1-\bar\alpha_t)/\bar\alpha_t}$,
    $s(\bar x, \sigma_t) = -\epsilon_\theta(\sqrt{\bar\alpha_t}\,\bar x, t)/\sigma_t$ (the variables of the Langevin
    sampler). "xt": in $x_t = \sqrt{\bar\alpha_t}x_0 + \sqrt{1-\bar\alpha_t}\,\epsilon$,
    $s(x_t, \sqrt{1-\bar\alpha_t}) = -\epsilon_\theta(x_t, t)/\sqrt{1-\bar\alpha_t}$.
    The σ passed to the returned function must be that space's noise level at t.
    """
    if space not in ("xbar", "xt"):
        raise ValueError(f"space must be 'xbar' or 'xt', got {space!r}")
    abar = schedule.alphas_cumprod[t]  # (B,)
    # $\sigma_t = \sqrt{(1-\bar\alpha_t)/\bar\alpha_t}$ in $\bar x$; $\sqrt{1-\bar\alpha_t}$ in $x_t$
    level = ((1 - abar) / abar).sqrt() if space == "xbar" else (1 - abar).sqrt()
    scale = abar.sqrt() if space == "xbar" else torch.ones_like(abar)

    def score(y: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        if not torch.allclose(sigma.double().cpu(), level, rtol=1e-3):
            raise ValueError(f"sigma must be the noise level of the timesteps t in {space!r}")
        shape = (-1, *[1] * (y.ndim - 1))
        return -model(scale.to(y).view(shape) * y, t.to(y.device)) / level.to(y).view(shape)

    return score


def langevin_dynamics(score_fn: Score, x: torch.Tensor, step_size: float, n_steps: int,
                      generator: torch.Generator | None = None) -> torch.Tensor:
    r"""The unadjusted Langevin algorithm: ``n_steps`` of $x \leftarrow x + \frac{\alpha}{2}\,s(x) + \sqrt{\alpha}\,z$.

    Its fixed point approaches p as α -> 0 (Roberts & Tweedie, 1996); each level of
    :func:`agm.diffusion.samplers.langevin_sample` runs it with the score at that level.
    """
    if n_steps < 0 or not step_size > 0:
        raise ValueError(f"need n_steps >= 0 and step_size > 0, got {n_steps} and {step_size}")
    for _ in range(n_steps):
        s = _check_score(score_fn(x), x)
        z = torch.randn(x.shape, generator=generator, dtype=x.dtype).to(x.device)
        # $x_{k+1} = x_k + \frac{\alpha}{2}\nabla\log p(x_k) + \sqrt{\alpha}\,z_k$
        x = x + 0.5 * step_size * s + step_size**0.5 * z
    return x


# -- a score network and its fit ---------------------------------------------------------------------


@dataclass
class ScoreMLPConfig:
    dim: int = 2  # D: the data's dimension, in and out
    hidden: int = 128  # width of every hidden layer
    depth: int = 3  # hidden layers; SiLU between them, smooth so that the Jacobian's trace is too


class ScoreMLP(nn.Module):
    r"""$s_\theta: \mathbb R^D \to \mathbb R^D$, a plain MLP (no noise input: one level or none)."""

    def __init__(self, config: ScoreMLPConfig):
        super().__init__()
        if config.dim < 1 or config.hidden < 1 or config.depth < 1:
            raise ValueError(f"need dim, hidden, depth >= 1, got {config}")
        self.config = config
        sizes = [config.dim] + [config.hidden] * config.depth
        layers: list[nn.Module] = []
        for a, b in zip(sizes[:-1], sizes[1:], strict=True):
            layers += [nn.Linear(a, b), nn.SiLU()]
        self.net = nn.Sequential(*layers, nn.Linear(config.hidden, config.dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.ndim != 2 or x.shape[1] != self.config.dim:
            raise ValueError(f"x must have shape (B, {self.config.dim}), got {list(x.shape)}")
        return self.net(x)


@dataclass
class ScoreFitConfig:
    method: str = "ssm-vr"  # "ssm-vr", "ssm" (Song et al., 2020) or "dsm" (Vincent, 2011)
    steps: int = 2000  # Adam steps
    batch_size: int = 256  # examples per step, drawn with replacement
    lr: float = 1e-3
    sigma: float = 0.05  # dsm: the noise level, whose smoothed score the network learns
    n_probes: int = 1  # ssm: projections per example
    cosine: bool = True  # decay the learning rate to zero along a cosine, which quiets the last steps' noise


def minibatches(data: torch.Tensor, batch_size: int,
                generator: torch.Generator | None = None) -> Iterator[torch.Tensor]:
    """An endless stream of minibatches of the rows of ``data``, drawn with replacement."""
    while True:
        yield data[torch.randint(len(data), (batch_size,), generator=generator)]


def fit_score(net: nn.Module, data: torch.Tensor, config: ScoreFitConfig,
              generator: torch.Generator | None = None, log_every: int = 100) -> list[dict[str, float]]:
    """Fit ``net`` to the score of the distribution of ``data`` (N, D) by the chosen objective; the history."""
    if config.method not in ("ssm-vr", "ssm", "dsm"):
        raise ValueError(f"method must be 'ssm-vr', 'ssm' or 'dsm', got {config.method!r}")
    _check_batch(data)

    def loss_fn(m: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        if config.method == "dsm":
            return denoising_score_matching_loss(lambda y, _: m(y), x, config.sigma, generator)
        return sliced_score_matching_loss(m, x, generator=generator, n_probes=config.n_probes,
                                          variance_reduction=config.method == "ssm-vr")

    optimizer = torch.optim.Adam(net.parameters(), lr=config.lr)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, config.steps) if config.cosine else None
    return train_loop(net, loss_fn, minibatches(data, config.batch_size, generator), optimizer, config.steps,
                      log_every=log_every, desc=f"score ({config.method})", scheduler=scheduler)
