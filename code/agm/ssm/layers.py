r"""State-space sequence layers, Chapter 56: a diagonal SSM (S4D) and a selective scan (Mamba-style).

A linear state-space model maps an input sequence u_t to an output y_t through a hidden state h_t,

    h_t = Ā h_{t-1} + B̄ u_t,    y_t = Re(C h_t) + D u_t,

with Ā = exp(Δ A), B̄ = (exp(Δ A) - 1) A^{-1} B the zero-order-hold discretization of the continuous system
h' = A h + B u with step Δ (Gu et al., 2022, S4D). With A diagonal the same map is a causal convolution
y = K * u + D u with the kernel K_l = Re(C Ā^l B̄): a whole sequence in one FFT (training), one token at a
time through the state (generation).

The selective scan makes Δ, B and C functions of the input at each position (Gu & Dao, 2023): it is no longer
a convolution, and runs as a recurrence.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


def discretize_zoh(A: torch.Tensor, B: torch.Tensor, dt: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Zero-order hold of h' = A h + B u over a step dt, for diagonal A: (Ā, B̄) with the shapes of A and B."""
    # $\bar A = e^{\Delta A}$, $\bar B = (e^{\Delta A} - 1) A^{-1} B$
    dA = dt * A
    return torch.exp(dA), (torch.exp(dA) - 1) / A * B


class S4D(nn.Module):
    """H independent diagonal SSMs of N complex states each (conjugate pairs: N/2 stored), S4D-Lin initialized."""

    def __init__(self, channels: int, state: int = 32, dt_min: float = 1e-3, dt_max: float = 1e-1):
        super().__init__()
        if state % 2:
            raise ValueError(f"state must be even (conjugate pairs), got {state}")
        H, N = channels, state // 2
        # S4D-Lin: $A_n = -\tfrac12 + i \pi n$
        self.log_neg_real = nn.Parameter(torch.full((H, N), math.log(0.5)))
        self.imag = nn.Parameter(math.pi * torch.arange(N).float().repeat(H, 1))
        self.C = nn.Parameter(torch.randn(H, N, 2) * 0.5 ** 0.5)  # complex, as (real, imaginary)
        self.D = nn.Parameter(torch.randn(H))
        log_dt = torch.rand(H) * (math.log(dt_max) - math.log(dt_min)) + math.log(dt_min)
        self.log_dt = nn.Parameter(log_dt)

    def discrete(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Ā (H, N), B̄ (H, N) with B = 1, and C (H, N), all complex."""
        A = torch.complex(-torch.exp(self.log_neg_real), self.imag)
        dA, dB = discretize_zoh(A, torch.ones_like(A), torch.exp(self.log_dt)[:, None])
        return dA, dB, torch.view_as_complex(self.C)

    def kernel(self, length: int) -> torch.Tensor:
        """K_l = 2 Re(C Ā^l B̄) for l < length, (H, L): the conjugate pairs contribute twice the real part."""
        dA, dB, C = self.discrete()
        powers = torch.exp(torch.log(dA)[..., None] * torch.arange(length, device=dA.device))  # (H, N, L)
        return 2 * torch.einsum("hn,hnl->hl", C * dB, powers).real

    def forward(self, u: torch.Tensor) -> torch.Tensor:
        """Convolution mode: u (B, L, H) -> y (B, L, H), causal, by FFT of length 2L."""
        L = u.shape[1]
        k = self.kernel(L)  # (H, L)
        n = 2 * L
        y = torch.fft.irfft(torch.fft.rfft(u.transpose(1, 2), n) * torch.fft.rfft(k, n), n)[..., :L]  # (B, H, L)
        return y.transpose(1, 2) + u * self.D

    def step(self, u: torch.Tensor, state: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        """Recurrent mode: one input u (B, H) and the state (B, H, N) -> (y (B, H), new state)."""
        dA, dB, C = self.discrete()
        h = dB * u[..., None] if state is None else dA * state + dB * u[..., None]  # (B, H, N)
        return 2 * torch.einsum("hn,bhn->bh", C, h).real + u * self.D, h


class SelectiveSSM(nn.Module):
    """Mamba-style selective scan over D channels with N real states each: Δ, B, C computed from the input."""

    def __init__(self, channels: int, state: int = 16, dt_rank: int | None = None):
        super().__init__()
        D, N = channels, state
        R = dt_rank or max(1, math.ceil(D / 16))
        self.state_size = N
        # S4D-Real: $A_n = -(n + 1)$, kept negative through $A = -e^{\log(-A)}$
        self.A_log = nn.Parameter(torch.log(torch.arange(1, N + 1).float()).repeat(D, 1))  # (D, N)
        self.project = nn.Linear(D, R + 2 * N, bias=False)  # x -> (Δ low rank, B, C)
        self.dt = nn.Linear(R, D)
        self.D = nn.Parameter(torch.ones(D))
        self.rank = R

    def parameters_at(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Δ (..., D) > 0, B (..., N), C (..., N) at each position of x (..., D)."""
        dt, B, C = self.project(x).split([self.rank, self.state_size, self.state_size], dim=-1)
        return F.softplus(self.dt(dt)), B, C

    def step(self, x: torch.Tensor, state: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        """One position: x (B, D), state (B, D, N) -> (y (B, D), new state)."""
        delta, B, C = self.parameters_at(x)
        A = -torch.exp(self.A_log)  # (D, N)
        # $h_t = e^{\Delta_t A} h_{t-1} + \Delta_t B_t x_t$ (the simplified discretization of Gu & Dao)
        drive = delta[..., None] * B[:, None, :] * x[..., None]  # (B, D, N)
        h = drive if state is None else torch.exp(delta[..., None] * A) * state + drive
        # $y_t = C_t h_t + D x_t$
        return torch.einsum("bdn,bn->bd", h, C) + self.D * x, h

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x (B, L, D) -> y (B, L, D) by the recurrence, position after position."""
        state, ys = None, []
        for t in range(x.shape[1]):
            y, state = self.step(x[:, t], state)
            ys.append(y)
        return torch.stack(ys, 1)
