"""The vector quantizer of a VQ-VAE (van den Oord et al., 2017), Chapter 23: nearest codes, the
straight-through estimator, the codebook and commitment terms, the codebook's exponential moving
averages (online k-means) and the restart of codes left unused.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

CODEBOOK_UPDATES = ("ema", "loss")  # moving averages of the encoder outputs, or Adam on the codebook term


def quantize(z_e: torch.Tensor, codebook: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Nearest code of every vector: z_e (..., D), codebook (K, D) -> z_q (..., D), indices (...)."""
    if codebook.ndim != 2 or z_e.shape[-1] != codebook.shape[1]:
        raise ValueError(f"z_e (..., D) and codebook (K, D) must share D, got {list(z_e.shape)} and "
                         f"{list(codebook.shape)}")
    flat = z_e.reshape(-1, codebook.shape[1])  # (N, D)
    # $\|z - e_k\|^2 = \|z\|^2 - 2 z^\top e_k + \|e_k\|^2$
    distances = flat.pow(2).sum(1, keepdim=True) - 2 * flat @ codebook.T + codebook.pow(2).sum(1)  # (N, K)
    # $k(z) = \arg\min_k \|z - e_k\|^2$
    indices = distances.argmin(1)  # (N,)
    return codebook[indices].view(z_e.shape), indices.view(z_e.shape[:-1])


def straight_through(z_e: torch.Tensor, z_q: torch.Tensor) -> torch.Tensor:
    """The value of z_q with the gradient of z_e: the decoder's gradient is copied to the encoder."""
    # $z_e + \mathrm{sg}[z_q - z_e]$
    return z_e + (z_q - z_e).detach()


def vq_losses(z_e: torch.Tensor, z_q: torch.Tensor, beta: float) -> dict[str, torch.Tensor]:
    """The codebook and commitment terms of van den Oord et al. (eq. 3), summed over each image's grid: (B,)."""
    # $\|\mathrm{sg}[z_e] - z_q\|^2$ moves the codes toward the encoder outputs
    codebook = (z_e.detach() - z_q).pow(2).flatten(1).sum(1)
    # $\beta\,\|z_e - \mathrm{sg}[z_q]\|^2$ keeps the encoder outputs near their codes
    commitment = beta * (z_e - z_q.detach()).pow(2).flatten(1).sum(1)
    return {"codebook": codebook, "commitment": commitment}


@torch.no_grad()
def ema_codebook_update(cluster_size: torch.Tensor, embed_sum: torch.Tensor, z_e: torch.Tensor,
                        indices: torch.Tensor, decay: float,
                        epsilon: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One EMA step (the paper's appendix): running counts N (K,), sums m (K, D) -> new (N, m, codebook).

    z_e (N, D) are the batch's encoder outputs, ``indices`` (N,) their nearest codes.
    """
    K = len(cluster_size)
    one_hot = F.one_hot(indices, K).type_as(z_e)  # (N, K)
    # $N_i \leftarrow \gamma N_i + (1 - \gamma)\, n_i$
    cluster_size = decay * cluster_size + (1 - decay) * one_hot.sum(0)
    # $m_i \leftarrow \gamma m_i + (1 - \gamma) \sum_{j: k_j = i} z_{e,j}$
    embed_sum = decay * embed_sum + (1 - decay) * one_hot.T @ z_e
    # Laplace smoothing $\tilde N_i = (N_i + \epsilon)\, n / (n + K\epsilon)$, $n = \sum_i N_i$
    n = cluster_size.sum()
    smoothed = (cluster_size + epsilon) * n / (n + K * epsilon)
    # $e_i = m_i / \tilde N_i$
    return cluster_size, embed_sum, embed_sum / smoothed.unsqueeze(1)


def code_histogram(indices: torch.Tensor, K: int) -> torch.Tensor:
    """How often each of the K codes occurs in ``indices`` (any shape): (K,)."""
    return torch.bincount(indices.flatten().cpu(), minlength=K)


def perplexity(counts: torch.Tensor) -> float:
    """exp(H(p)) of the histogram p = counts / sum: K for uniform use of K codes, 1 for a single code."""
    if counts.ndim != 1 or counts.sum() <= 0 or (counts < 0).any():
        raise ValueError("counts must be a 1-D histogram with a positive total")
    p = counts.double() / counts.sum()
    # $\exp\big(-\sum_k p_k \log p_k\big)$
    return float(torch.exp(-torch.xlogy(p, p).sum()))


class VectorQuantizer(nn.Module):
    """The codebook (K, D); the EMA's running counts and sums; how long each code has gone unused."""

    def __init__(self, codebook_size: int, code_dim: int, update: str = "ema", decay: float = 0.99,
                 epsilon: float = 1e-5, dead_after: int = 100):
        super().__init__()
        K, D = codebook_size, code_dim
        if update not in CODEBOOK_UPDATES:
            raise ValueError(f"codebook update must be one of {CODEBOOK_UPDATES}, got {update!r}")
        if K < 2 or D < 1 or not 0 <= decay < 1 or dead_after < 0:
            raise ValueError(f"need K >= 2, D >= 1, 0 <= decay < 1 and dead_after >= 0; got {K}, {D}, {decay}, "
                             f"{dead_after}")
        self.update_rule, self.decay, self.epsilon, self.dead_after = update, decay, epsilon, dead_after
        self.restarts = 0  # codes restarted since construction (a count for the training log)
        # small uniform codes, as in the paper's reference code; a gradient only with the codebook loss
        self.codebook = nn.Parameter(torch.empty(K, D).uniform_(-1 / K, 1 / K), requires_grad=update == "loss")
        self.register_buffer("cluster_size", torch.ones(K))  # N_i, as if each code had held one vector
        self.register_buffer("embed_sum", self.codebook.detach().clone())  # m_i
        self.register_buffer("unused_steps", torch.zeros(K, dtype=torch.long))

    @torch.no_grad()
    def update(self, z_e: torch.Tensor, indices: torch.Tensor, generator: torch.Generator | None = None) -> int:
        """After an optimizer step: the EMA step (if configured), then dead-code restarts; returns #restarts."""
        if self.update_rule == "ema":
            N, m, e = ema_codebook_update(self.cluster_size, self.embed_sum, z_e, indices, self.decay, self.epsilon)
            self.cluster_size.copy_(N)
            self.embed_sum.copy_(m)
            self.codebook.copy_(e)
        moved = restart_dead_codes(self, z_e, indices, self.dead_after, generator)
        self.restarts += moved
        return moved


@torch.no_grad()
def restart_dead_codes(vq: VectorQuantizer, z_e: torch.Tensor, indices: torch.Tensor, dead_after: int,
                       generator: torch.Generator | None = None) -> int:
    """Count the steps each code has gone unused; move every code unused for ``dead_after`` steps onto
    a different random encoder output of the batch, z_e (N, D). Returns how many codes moved."""
    used = torch.bincount(indices, minlength=len(vq.codebook)) > 0  # (K,)
    vq.unused_steps.add_(1).masked_fill_(used, 0)
    dead = (vq.unused_steps >= dead_after).nonzero().squeeze(1) if dead_after > 0 else indices[:0]
    if len(dead) == 0:
        return 0
    pick = torch.randperm(len(z_e), generator=generator)[torch.arange(len(dead)) % len(z_e)].to(z_e.device)
    vq.codebook[dead] = z_e[pick]
    vq.embed_sum[dead] = z_e[pick]  # the EMA restarts as if the code had held this one vector
    vq.cluster_size[dead] = 1.0
    vq.unused_steps[dead] = 0
    return len(dead)
