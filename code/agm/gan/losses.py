"""The losses of the original GAN (Goodfellow et al., 2014), Chapter 6, written on the discriminator's logits.

The discriminator outputs a logit l(x) and D(x) = sigmoid(l(x)). Every loss uses
log D = -softplus(-l) and log(1 - D) = -softplus(l), which stay finite where D saturates at 0 or 1.
The analysis functions (:func:`optimal_discriminator`, :func:`minimax_value`) take probabilities
on a finite set or densities on a grid.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

GENERATOR_LOSSES = ("saturating", "non-saturating")


def check_generator_loss(kind: str) -> str:
    if kind not in GENERATOR_LOSSES:
        raise ValueError(f"unknown generator loss {kind!r}; choose one of {', '.join(GENERATOR_LOSSES)}")
    return kind


def discriminator_loss(real_logits: torch.Tensor, fake_logits: torch.Tensor) -> tuple[torch.Tensor, dict]:
    """Binary cross-entropy with real -> 1 and fake -> 0, i.e. minus the value V(D, G) of the game."""
    # $-\mathbb{E}_{x\sim p}[\log D(x)] = \mathbb{E}_{x\sim p}[\mathrm{softplus}(-l(x))]$
    loss_real = F.softplus(-real_logits).mean()
    # $-\mathbb{E}_{z}[\log(1 - D(G(z)))] = \mathbb{E}_{z}[\mathrm{softplus}(l(G(z)))]$
    loss_fake = F.softplus(fake_logits).mean()
    logs = {"d_real": torch.sigmoid(real_logits).mean().detach(),  # mean D(x)
            "d_fake": torch.sigmoid(fake_logits).mean().detach()}  # mean D(G(z))
    return loss_real + loss_fake, logs


def generator_loss(fake_logits: torch.Tensor, kind: str = "non-saturating") -> tuple[torch.Tensor, dict]:
    """The generator's loss on the logits of its samples, minimized: ``saturating`` or ``non-saturating``."""
    if check_generator_loss(kind) == "saturating":
        # $\mathbb{E}_z[\log(1 - D(G(z)))] = -\mathbb{E}_z[\mathrm{softplus}(l(G(z)))]$
        loss = -F.softplus(fake_logits).mean()
    else:
        # $-\mathbb{E}_z[\log D(G(z))] = \mathbb{E}_z[\mathrm{softplus}(-l(G(z)))]$
        loss = F.softplus(-fake_logits).mean()
    # the mean derivative that reaches the generator through each logit (near 0: saturated)
    logs = {"g_logit_grad": generator_logit_grad(fake_logits.detach(), kind).mean()}
    return loss, logs


def generator_logit_grad(logits: torch.Tensor, kind: str = "non-saturating") -> torch.Tensor:
    """The derivative of one sample's generator loss with respect to its logit l, in closed form.

    Both are negative: descending the loss raises l. As D = sigmoid(l) -> 0 (a confident discriminator),
    the saturating loss's derivative vanishes and the non-saturating one tends to -1.
    """
    if check_generator_loss(kind) == "saturating":
        # $\partial_l \log(1 - \sigma(l)) = -\sigma(l) \to 0$
        return -torch.sigmoid(logits)
    # $\partial_l[-\log \sigma(l)] = -(1 - \sigma(l)) \to -1$
    return -torch.sigmoid(-logits)


def _as_float(t) -> torch.Tensor:
    t = torch.as_tensor(t)
    return t if t.is_floating_point() else t.to(torch.float64)


def optimal_discriminator(p, q) -> torch.Tensor:
    """D*(x) = p(x) / (p(x) + q(x)) for the data's p and the generator's q (1/2 where both vanish)."""
    p, q = _as_float(p), _as_float(q)
    total = p + q
    # $D^*(x) = \frac{p(x)}{p(x) + q(x)}$
    return torch.where(total > 0, p / torch.where(total > 0, total, 1), torch.full_like(total, 0.5))


def minimax_value(p, q, d=None, dx: float = 1.0) -> torch.Tensor:
    """V(D, G) = E_p[log D] + E_q[log(1 - D)] as a 0-d tensor, for probabilities on a finite set (dx = 1)
    or densities on a grid of spacing dx (a Riemann sum). ``d`` defaults to D*, where V = 2 JS(p, q) - log 4."""
    p, q = _as_float(p), _as_float(q)
    if d is None:  # D* written out, so that log(1 - D*) stays finite where q << p
        m = p + q
        # $V(D^*, G) = \sum_x \big[p(x)\log\frac{p(x)}{p(x)+q(x)} + q(x)\log\frac{q(x)}{p(x)+q(x)}\big]\,\Delta x$
        return (torch.xlogy(p, p) - torch.xlogy(p, m) + torch.xlogy(q, q) - torch.xlogy(q, m)).sum() * dx
    d = _as_float(d)
    # $V(D, G) = \sum_x \big[p(x)\log D(x) + q(x)\log(1 - D(x))\big]\,\Delta x$, with $0 \log 0 = 0$
    return (torch.xlogy(p, d) + torch.xlogy(q, 1 - d)).sum() * dx
