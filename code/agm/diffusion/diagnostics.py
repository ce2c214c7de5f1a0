"""Measurements of a trained noise-prediction network: where its output looks and what it costs (Chapter 30),
how many calls a sampler makes of it (Chapters 33 and 38), how far DPM-Solver++'s last extrapolation misses
(Chapter 38), and its errors per timestep in each parameterization (Chapter 39)."""

from __future__ import annotations

import math
import time

import torch
from torch import nn

from agm.diffusion.samplers import dpm_solver_sample, sigma_ve
from agm.diffusion.schedule import NoiseSchedule
from agm.nn.attention import SelfAttention


class StopGradientBranch(nn.Module):
    """The same output as a residual module f(x) = x + g(x); gradients pass only through the identity x.

    Replacing the U-Net's attention layer by this wrapper keeps the forward pass and blocks the
    route that attention gives a gradient: x + sg[f(x) - x].
    """

    def __init__(self, module: nn.Module):
        super().__init__()
        self.module = module

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + (self.module(x) - x).detach()


def output_sensitivity(model: nn.Module, x0: torch.Tensor, t: int, pixel: tuple[int, int],
                       generator: torch.Generator | None = None) -> torch.Tensor:
    """Mean over images of |∂ ε_θ(x_t, t)[pixel] / ∂ x_t|, a map of x_t's shape (C, H, W).

    ``x0`` (B, C, H, W) in [-1, 1] is noised to x_t ~ q(x_t | x_0) with draws from ``generator``.
    """
    row, col = pixel
    tt = torch.full((len(x0),), t, dtype=torch.long)
    # $x_t = \sqrt{\bar\alpha_t}\,x_0 + \sqrt{1-\bar\alpha_t}\,\epsilon$
    xt = model.schedule.q_sample(x0, tt, torch.randn(x0.shape, generator=generator)).requires_grad_(True)
    model(xt, tt)[:, 0, row, col].sum().backward()
    return xt.grad.abs().mean(0)


@torch.no_grad()
def cost_per_resolution(model: nn.Module, x: torch.Tensor, t: torch.Tensor, repeats: int = 5) -> dict[int, dict]:
    """Multiply-adds and wall time of the convolutions and linear maps, grouped by the resolution they run at.

    Forward hooks on every ``Conv2d``, ``ConvTranspose2d`` and attention layer record the output's
    spatial size, the layer's multiply-adds per image (a convolution: kernel size x input channels x
    output elements; a transposed one: kernel size x output channels x input elements; attention: its
    projections and the H*W x H*W score and value products) and the time
    between its pre-hook and hook, the fastest of ``repeats`` passes.
    """
    rows: dict[int, dict] = {}
    starts: dict[nn.Module, float] = {}
    times: dict[nn.Module, float] = {}

    def before(module, inputs):
        starts[module] = time.perf_counter()

    def after(module, inputs, output):
        elapsed = time.perf_counter() - starts[module]
        times[module] = min(times.get(module, float("inf")), elapsed)
        if module in macs:
            return
        if isinstance(module, SelfAttention):
            b, n, c = inputs[0].shape
            res = int(round(n ** 0.5))
            macs[module] = (res, 4 * n * c * c + 2 * n * n * c)  # q, k, v, out projections; QK^T and AV
        elif isinstance(module, nn.ConvTranspose2d):  # each input element is spread over k x k x c_out outputs
            k = module.kernel_size[0] * module.kernel_size[1]
            macs[module] = (output.shape[-1], k * (module.out_channels // module.groups) * inputs[0][0].numel())
        else:  # each output element gathers k x k x c_in inputs
            k = module.kernel_size[0] * module.kernel_size[1]
            c_in = module.in_channels // module.groups
            macs[module] = (output.shape[-1], k * c_in * output[0].numel())

    macs: dict[nn.Module, tuple[int, int]] = {}
    layers = [m for m in model.modules() if isinstance(m, (nn.Conv2d, nn.ConvTranspose2d, SelfAttention))]
    handles = [h for m in layers for h in (m.register_forward_pre_hook(before), m.register_forward_hook(after))]
    try:
        for _ in range(repeats):
            model(x, t)
    finally:
        for h in handles:
            h.remove()
    for m in layers:
        res, count = macs[m]
        row = rows.setdefault(res, {"multiply_adds": 0, "seconds": 0.0, "layers": 0})
        row["multiply_adds"] += count
        row["seconds"] += times[m]
        row["layers"] += 1
    return dict(sorted(rows.items(), reverse=True))


class CallCounter(nn.Module):
    """The same network, counting in ``calls`` how often it is evaluated: a sampler's cost in network calls."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model, self.calls = model, 0

    def forward(self, x: torch.Tensor, t: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        self.calls += 1
        return self.model(x, t) if labels is None else self.model(x, t, labels)


@torch.no_grad()
def multistep_line_miss(model: nn.Module, schedule: NoiseSchedule, x_T: torch.Tensor, steps: int) -> float:
    r"""How far DPM-Solver++(2M)'s line through its last two data predictions misses at the end of the step into 0.

    The solver runs ``steps`` steps from ``x_T``; $r < t$ are its last two timesteps above 0. The line through
    $(\lambda_r, D_r)$ and $(\lambda_t, D_t)$, taken to $\lambda_0$, is set against $D_0$, the data prediction at the
    state the step reaches: the root-mean-square difference relative to that of $D_0$ (Chapter 38).
    """
    if steps < 3:
        raise ValueError(f"need steps >= 3 for two timesteps above 0, got {steps}")
    seen: dict[int, torch.Tensor] = {}  # the state at each timestep (the callback's index is the timestep + 1)
    dpm_solver_sample(model, schedule, x_T, steps, callback=lambda i, x: seen.update({i - 1: x}))
    r, t = schedule.timesteps(steps).flip(0).tolist()[-3:-1]

    def lam(k: int) -> float:
        # $\lambda_k = \log(\alpha_k / \sigma_k) = -\log\bar\sigma_k$
        return -math.log(sigma_ve(schedule, k).item())

    def data_prediction(x: torch.Tensor, k: int) -> torch.Tensor:
        a = schedule.alpha_bar(k)
        # $D_\theta(x_k, k) = (x_k - \sqrt{1-\bar\alpha_k}\,\epsilon_\theta(x_k, k)) / \sqrt{\bar\alpha_k}$
        return (x - (1 - a).sqrt() * model(x, torch.full((len(x),), k, device=x.device))) / a.sqrt()

    d_r, d_t, d_0 = data_prediction(seen[r], r), data_prediction(seen[t], t), data_prediction(seen[0], 0)
    # the line at $\lambda_0$: $D_t + (D_t - D_r)\,(\lambda_0 - \lambda_t) / (\lambda_t - \lambda_r)$
    line = d_t + (d_t - d_r) * (lam(0) - lam(t)) / (lam(t) - lam(r))
    # $\mathrm{RMS}(\text{line} - D_0) \,/\, \mathrm{RMS}(D_0)$
    return ((line - d_0) ** 2).mean().sqrt().item() / (d_0**2).mean().sqrt().item()


@torch.no_grad()
def errors_by_timestep(model: nn.Module, x0: torch.Tensor, timesteps: list[int],
                       generator: torch.Generator | None = None) -> dict[str, list[float]]:
    """Mean squared error per pixel of the ε, x_0 and v that ``model`` implies, at each of ``timesteps``.

    ``model(x_t, t)`` returns ε whatever its network outputs (:class:`agm.diffusion.ddpm.DDPM`); ``x0``
    (B, C, H, W) in [-1, 1] is noised once per timestep with draws from ``generator``, the same draws
    for every model given the same generator.
    """
    from agm.diffusion import parameterization as P

    out: dict[str, list[float]] = {"epsilon": [], "sample": [], "v_prediction": []}
    for t in timesteps:
        tt = torch.full((len(x0),), t, dtype=torch.long)
        eps = torch.randn(x0.shape, generator=generator)
        xt = model.schedule.q_sample(x0, tt, eps)
        abar = model.schedule.alphas_cumprod[t].float()
        eps_hat = model(xt, tt)
        out["epsilon"].append((eps_hat - eps).pow(2).mean().item())
        out["sample"].append((P.to_sample("epsilon", eps_hat, xt, abar) - x0).pow(2).mean().item())
        out["v_prediction"].append((P.velocity(P.to_sample("epsilon", eps_hat, xt, abar), eps_hat, abar)
                                    - P.velocity(x0, eps, abar)).pow(2).mean().item())
    return out
