r"""State-space sequence layers, Chapter 56: a diagonal SSM (S4D) and a selective scan (Mamba-style).

A linear state-space model maps an input sequence u_t to an output y_t through a hidden state h_t,

    h_t = Ā h_{t-1} + B̄ u_t,    y_t = Re(C h_t) + D u_t,

with Ā = exp(Δ A), B̄ = (exp(Δ A) - 1) A^{-1} B the zero-order-hold discretization of the continuous system
h' = A h + B u with step Δ (Gu et al., 2022, S4D). With A diagonal the same map is a causal convolution
y = K * u + D u with the kernel K_l = Re(C Ā^l B̄): a whole sequence in one FFT (training), one token at a
time through the state (generation).

The selective scan makes Δ, B and C functions of the input at each position (Gu & Dao, 2023): it is no longer
a convolution. Its recurrence h_t = Ā_t h_{t-1} + B̄_t x_t is a scan: one position after another, or in
log2 L rounds of an associative operator (the parallel scan); both are here, and they agree.
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

    def recurrent(self, u: torch.Tensor) -> torch.Tensor:
        """Recurrent mode over a whole sequence: u (B, L, H) -> y (B, L, H) by L calls of :meth:`step`, as generation
        runs it (the same numbers as :meth:`forward`)."""
        state, ys = None, []
        for u_t in u.unbind(1):
            y_t, state = self.step(u_t, state)
            ys.append(y_t)
        return torch.stack(ys, 1)

    def step(self, u: torch.Tensor, state: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        """Recurrent mode: one input u (B, H) and the state (B, H, N) -> (y (B, H), new state)."""
        dA, dB, C = self.discrete()
        h = dB * u[..., None] if state is None else dA * state + dB * u[..., None]  # (B, H, N)
        return 2 * torch.einsum("hn,bhn->bh", C, h).real + u * self.D, h


class SelectiveSSM(nn.Module):
    """Mamba-style selective scan over D channels with N real states each: Δ, B, C computed from the input."""

    def __init__(self, channels: int, state: int = 16, dt_rank: int | None = None, scan: str = "sequential",
                 dt_min: float = 1e-3, dt_max: float = 1e-1):
        super().__init__()
        if scan not in SCANS:
            raise ValueError(f"scan must be one of {sorted(SCANS)}, got {scan!r}")
        self.scan = scan
        D, N = channels, state
        R = dt_rank or max(1, math.ceil(D / 16))
        self.state_size = N
        # S4D-Real: $A_n = -(n + 1)$, kept negative through $A = -e^{\log(-A)}$
        self.A_log = nn.Parameter(torch.log(torch.arange(1, N + 1).float()).repeat(D, 1))  # (D, N)
        self.project = nn.Linear(D, R + 2 * N, bias=False)  # x -> (Δ low rank, B, C)
        self.dt = nn.Linear(R, D)
        # Mamba's initialization: Δ starts log-uniform on [dt_min, dt_max] (the bias is softplus^{-1} of it), so that
        # e^{Δ A} forgets slowly; nn.Linear's default bias would start Δ near softplus(0) = 0.69
        nn.init.uniform_(self.dt.weight, -R ** -0.5, R ** -0.5)
        dt = torch.exp(torch.rand(D) * (math.log(dt_max) - math.log(dt_min)) + math.log(dt_min))
        with torch.no_grad():
            self.dt.bias.copy_(dt + torch.log(-torch.expm1(-dt)))  # $\mathrm{softplus}^{-1}(\Delta)$
        self.D = nn.Parameter(torch.ones(D))
        self.rank = R

    def parameters_at(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Δ (..., D) > 0, B (..., N), C (..., N) at each position of x (..., D)."""
        dt, B, C = self.project(x).split([self.rank, self.state_size, self.state_size], dim=-1)
        return F.softplus(self.dt(dt)), B, C

    def step(self, x: torch.Tensor, state: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        """One position: x (B, D), state (B, D, N) -> (y (B, D), new state)."""
        decay, drive, C = self.recurrence(x)
        # $h_t = \bar A_t h_{t-1} + \bar B_t x_t$
        h = drive if state is None else decay * state + drive
        # $y_t = C_t h_t + D x_t$
        return torch.einsum("bdn,bn->bd", h, C) + self.D * x, h

    def recurrence(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Ā_t = exp(Δ_t A) and B̄_t x_t, each (..., D, N), and C_t (..., N) at every position of x (..., D)."""
        delta, B, C = self.parameters_at(x)
        A = -torch.exp(self.A_log)  # (D, N)
        # $\bar A_t = e^{\Delta_t A}$, $\bar B_t x_t = \Delta_t B_t x_t$ (the simplified discretization of Gu & Dao)
        return torch.exp(delta[..., None] * A), delta[..., None] * B[..., None, :] * x[..., None], C

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x (B, L, D) -> y (B, L, D): the whole sequence's Ā, B̄x and C at once, then the scan over positions."""
        decay, drive, C = self.recurrence(x)  # (B, L, D, N), (B, L, D, N), (B, L, N)
        h = SCANS[self.scan](decay, drive)  # (B, L, D, N)
        return torch.einsum("bldn,bln->bld", h, C) + self.D * x


def sequential_scan(decay: torch.Tensor, drive: torch.Tensor) -> torch.Tensor:
    """h_t = a_t h_{t-1} + b_t from h_0 = b_0, along dim 1, one position after another: L steps of O(1) depth."""
    a, b = decay.unbind(1), drive.unbind(1)
    h = [b[0]]
    for a_t, b_t in zip(a[1:], b[1:], strict=True):
        h.append(torch.addcmul(b_t, a_t, h[-1]))  # $h_t = a_t h_{t-1} + b_t$
    return torch.stack(h, 1)


def parallel_scan(decay: torch.Tensor, drive: torch.Tensor) -> torch.Tensor:
    """The same h_t in ceil(log2 L) rounds (Hillis & Steele, 1986) of the associative operator
    (a, b) • (a', b') = (a a', a' b + b'): after the round of offset k, position t holds the composition of
    the steps t-2k+1..t, so log2 L rounds of whole-tensor products replace L sequential steps."""
    a, b = decay, drive
    offset = 1
    while offset < b.shape[1]:
        # $(a_t, b_t) \leftarrow (a_t a_{t-k},\ a_t b_{t-k} + b_t)$ for $t \ge k$
        b = torch.cat([b[:, :offset], torch.addcmul(b[:, offset:], a[:, offset:], b[:, :-offset])], 1)
        a = torch.cat([a[:, :offset], a[:, offset:] * a[:, :-offset]], 1)
        offset *= 2
    return b


SCANS = {"sequential": sequential_scan, "parallel": parallel_scan}
