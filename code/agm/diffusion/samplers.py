r"""Samplers over any noise-prediction model: pure functions of (model, schedule, x_T, options).

``model(x_t, t, labels)`` predicts ε at integer timesteps ``t`` (B,); ``labels`` is None for an
unconditional draw. Every sampler walks an evenly spaced subsequence $\tau_1 < \dots < \tau_S$ of the
schedule's timesteps (``schedule.timesteps(steps)``), calls ``callback(t, x)`` with the paper's time
index t (T for x_T, 0 for the output) after every step and once before the first, and returns x_0.
Departures from the reference implementations are named options with the reference's default.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from agm.diffusion.schedule import NoiseSchedule
from agm.distributions import slerp  # noqa: F401  (re-exported: the samplers interpolate noise)

VARIANCES = ("beta_tilde", "beta")
Callback = Callable[[int, torch.Tensor], None]


def chain_pairs(schedule: NoiseSchedule, steps: int | None) -> list[tuple[int, int]]:
    """The (t, s) pairs every sampler walks, from the last timestep down to s = -1 (the data)."""
    tau = schedule.timesteps(schedule.num_timesteps if steps is None else steps).tolist()
    return [(tau[i], tau[i - 1] if i > 0 else -1) for i in reversed(range(len(tau)))]


def _chain(schedule: NoiseSchedule, x_T: torch.Tensor, steps: int | None) -> list[tuple[int, int]]:
    if x_T.ndim != 4:
        raise ValueError(f"x_T must have shape [B, C, H, W], got {list(x_T.shape)}")
    return chain_pairs(schedule, steps)


def walk(schedule: NoiseSchedule, x_T: torch.Tensor, steps: int | None,
         update: Callable[[torch.Tensor, int, int], torch.Tensor], callback: Callback | None = None) -> torch.Tensor:
    """x_T -> x_0 by ``update(x, t, s)`` along the chain's (t, s) pairs, with the callback before and after each."""
    chain = _chain(schedule, x_T, steps)
    x = x_T
    if callback is not None:
        callback(chain[0][0] + 1, x)
    for t, s in chain:
        x = update(x, t, s)
        if callback is not None:
            callback(s + 1, x)
    return x


def predict_eps(model: nn.Module, x: torch.Tensor, t: int, labels: torch.Tensor | None) -> torch.Tensor:
    """ε_θ(x_t, t[, y]) with t broadcast over the batch."""
    tt = torch.full((len(x),), t, device=x.device, dtype=torch.long)
    return model(x, tt) if labels is None else model(x, tt, labels)


@torch.no_grad()
def ancestral_sample(model: nn.Module, schedule: NoiseSchedule, x_T: torch.Tensor, steps: int | None = None,
                     variance: str = "beta_tilde", clip_denoised: bool = True,
                     generator: torch.Generator | None = None, labels: torch.Tensor | None = None,
                     callback: Callback | None = None) -> torch.Tensor:
    """Ho et al.'s Algorithm 2: x_{τ_{i-1}} ~ p_θ(· | x_{τ_i}) from x_T down to x_0; no noise at the last step.

    ``steps`` < T walks the respaced chain (Nichol & Dhariwal, 2021) through ``schedule.timesteps(steps)``.
    """
    if variance not in VARIANCES:
        raise ValueError(f"variance must be one of {VARIANCES}, got {variance!r}")

    def update(x: torch.Tensor, t: int, s: int) -> torch.Tensor:
        return schedule.step(predict_eps(model, x, t, labels), t, x, generator, variance, prev_t=s,
                             clip_denoised=clip_denoised)[0]

    return walk(schedule, x_T, steps, update, callback)


def ddim_step(schedule: NoiseSchedule, eps: torch.Tensor, t: int, s: int, x: torch.Tensor, eta: float = 0.0,
              clip_denoised: bool = True, generator: torch.Generator | None = None,
              use_clipped_model_output: bool = False) -> torch.Tensor:
    """One step x_t -> x_s of Song et al.'s (2021) generalized process (their eq. 12), s < t; s = -1 is the data.

    As in diffusers' ``DDIMScheduler`` (default ``use_clipped_model_output=False``), a clipped x̂_0 enters
    the update but the direction term keeps the network's ε. With ``use_clipped_model_output`` the ε of
    the direction term is re-derived from the clipped x̂_0, so that x_t = √ᾱ_t x̂_0 + √(1−ᾱ_t) ε still holds.
    """
    if eta < 0:
        raise ValueError(f"eta must be >= 0, got {eta}")
    a_t, a_s = schedule.alpha_bar(t).to(x.dtype), schedule.alpha_bar(s).to(x.dtype)
    # 1. $\hat x_0 = (x_t - \sqrt{1-\bar\alpha_t}\,\epsilon_\theta) / \sqrt{\bar\alpha_t}$
    x0 = (x - (1 - a_t).sqrt() * eps) / a_t.sqrt()
    if clip_denoised:
        x0 = x0.clamp(-1, 1)
        if use_clipped_model_output:
            # $\epsilon = (x_t - \sqrt{\bar\alpha_t}\,\hat x_0) / \sqrt{1-\bar\alpha_t}$
            eps = (x - a_t.sqrt() * x0) / (1 - a_t).sqrt()
    # 2. $\sigma = \eta \sqrt{(1-\bar\alpha_s)/(1-\bar\alpha_t)}\sqrt{1-\bar\alpha_t/\bar\alpha_s}$
    sigma = eta * ((1 - a_s) / (1 - a_t)).sqrt() * (1 - a_t / a_s).sqrt()
    # 3. $x_s = \sqrt{\bar\alpha_s}\,\hat x_0 + \sqrt{1-\bar\alpha_s-\sigma^2}\,\epsilon_\theta + \sigma z$
    x = a_s.sqrt() * x0 + (1 - a_s - sigma**2).clamp(min=0).sqrt() * eps
    if eta > 0 and s >= 0:
        x = x + sigma * torch.randn(x.shape, generator=generator, dtype=x.dtype).to(x.device)
    return x


@torch.no_grad()
def ddim_sample(model: nn.Module, schedule: NoiseSchedule, x_T: torch.Tensor, steps: int | None = None,
                eta: float = 0.0, clip_denoised: bool = True, generator: torch.Generator | None = None,
                labels: torch.Tensor | None = None, callback: Callback | None = None,
                use_clipped_model_output: bool = False) -> torch.Tensor:
    """DDIM (Song et al., 2021): :func:`ddim_step` along the chain; η = 0 is deterministic."""
    if eta < 0:
        raise ValueError(f"eta must be >= 0, got {eta}")

    def update(x: torch.Tensor, t: int, s: int) -> torch.Tensor:
        return ddim_step(schedule, predict_eps(model, x, t, labels), t, s, x, eta, clip_denoised, generator,
                         use_clipped_model_output)

    return walk(schedule, x_T, steps, update, callback)


@torch.no_grad()
def dpm_solver_sample(model: nn.Module, schedule: NoiseSchedule, x_T: torch.Tensor, steps: int | None = None,
                      clip_denoised: bool = False, generator: torch.Generator | None = None,
                      labels: torch.Tensor | None = None,
                      callback: Callback | None = None) -> torch.Tensor:
    r"""DPM-Solver++(2M) (Lu et al., 2022): the second-order multistep solver of the probability-flow ODE
    in the data prediction $D_t = \hat x_0(x_t)$ and the log-SNR $\lambda_t = \log(\alpha_t/\sigma_t)$.

    The first step is first order (DDIM with η = 0: there is no earlier D yet), and so is the last, to
    σ = 0, where $\lambda = \infty$ and the step returns $D$ at the final timestep — as diffusers'
    ``DPMSolverMultistepScheduler`` (``final_sigmas_type="zero"``) does. ``clip_denoised`` is off by
    default, as there (``thresholding=False``). Deterministic: ``generator`` is accepted for a common
    signature and unused.
    """
    previous: dict[str, torch.Tensor] = {}  # D and lambda of the step before: the memory of a multistep method

    def update(x: torch.Tensor, t: int, s: int) -> torch.Tensor:
        a_t = schedule.alpha_bar(t).to(x.dtype)
        alpha_t, sigma_t = a_t.sqrt(), (1 - a_t).sqrt()
        # $D_t = (x_t - \sigma_t \epsilon_\theta) / \alpha_t$
        d = (x - sigma_t * predict_eps(model, x, t, labels)) / alpha_t
        if clip_denoised:
            d = d.clamp(-1, 1)
        if s < 0:
            return d  # sigma_s = 0: the first-order step lands on the data prediction
        a_s = schedule.alpha_bar(s).to(x.dtype)
        alpha_s, sigma_s = a_s.sqrt(), (1 - a_s).sqrt()
        lam_t, lam_s = (alpha_t / sigma_t).log(), (alpha_s / sigma_s).log()
        h = lam_s - lam_t
        # first order: $x_s = \frac{\sigma_s}{\sigma_t} x_t - \alpha_s (e^{-h} - 1) D_t$
        x_next = sigma_s / sigma_t * x - alpha_s * torch.expm1(-h) * d
        if previous:
            # second order: $- \tfrac12 \alpha_s (e^{-h} - 1) (D_t - D_r) / r$, $r = (\lambda_t - \lambda_r) / h$
            r = (lam_t - previous["lam"]) / h
            x_next = x_next - 0.5 * alpha_s * torch.expm1(-h) * (d - previous["d"]) / r
        previous.update(d=d, lam=lam_t)
        return x_next

    return walk(schedule, x_T, steps, update, callback)


@torch.no_grad()
def ddim_invert(model: nn.Module, schedule: NoiseSchedule, x_0: torch.Tensor, steps: int | None = None,
                labels: torch.Tensor | None = None, callback: Callback | None = None) -> torch.Tensor:
    r"""Deterministic DDIM encoding x_0 -> x_T (Song et al., 2021, Sec. 5.4): the η = 0 update run
    upward through $\tau_1 < \dots < \tau_S$,
    $x_t = \sqrt{\bar\alpha_t}\,\hat x_0 + \sqrt{1-\bar\alpha_t}\,\hat\epsilon$ with
    $\hat\epsilon = \epsilon_\theta(x_s, s)$ taken at the step's start (at $\tau_1$ for the first step,
    from the data). :func:`ddim_sample` with the same ``steps`` and η = 0, unclipped, decodes it back,
    exactly as the number of steps grows. ``callback(t, x)`` uses the paper's time index.
    """
    chain = list(reversed(_chain(schedule, x_0, steps)))  # (t, s) pairs, from the data upward
    x = x_0
    if callback is not None:
        callback(0, x)
    for t, s in chain:
        eps = predict_eps(model, x, max(s, chain[0][0]), labels)
        a_s, a_t = schedule.alpha_bar(s).to(x.dtype), schedule.alpha_bar(t).to(x.dtype)
        # $\hat x_0 = (x_s - \sqrt{1-\bar\alpha_s}\,\hat\epsilon) / \sqrt{\bar\alpha_s}$ ($\bar\alpha = 1$ at the data)
        x0 = (x - (1 - a_s).sqrt() * eps) / a_s.sqrt()
        # $x_t = \sqrt{\bar\alpha_t}\,\hat x_0 + \sqrt{1-\bar\alpha_t}\,\hat\epsilon$
        x = a_t.sqrt() * x0 + (1 - a_t).sqrt() * eps
        if callback is not None:
            callback(t + 1, x)
    return x


def sigma_ve(schedule: NoiseSchedule, t: int) -> torch.Tensor:
    r"""The noise level $\sigma_t = \sqrt{(1-\bar\alpha_t)/\bar\alpha_t}$ of $\bar x = x_t/\sqrt{\bar\alpha_t}$.

    In $\bar x$ the forward process only adds noise, $\bar x = x_0 + \sigma_t \epsilon$ (the
    variance-exploding form of the same model; Song et al., 2021b; Karras et al., 2022); 0 at t = -1.
    """
    a = schedule.alpha_bar(t)
    return ((1 - a) / a).sqrt()


@torch.no_grad()
def probability_flow_sample(model: nn.Module, schedule: NoiseSchedule, x_T: torch.Tensor, steps: int | None = None,
                            solver: str = "heun", generator: torch.Generator | None = None,
                            labels: torch.Tensor | None = None, callback: Callback | None = None) -> torch.Tensor:
    r"""The probability-flow ODE $d\bar x / d\sigma = \epsilon_\theta(\sqrt{\bar\alpha}\,\bar x, t)
    = -\sigma \nabla_{\bar x} \log p_\sigma(\bar x)$ solved from $\sigma_T$ down to 0 (Song et al., 2021b,
    in the form of Karras et al., 2022, eq. 4), evaluated at the chain's timesteps.

    ``solver`` "euler" is DDIM with η = 0, unclipped, step for step; "heun" corrects each step with
    the slope at its end (Karras et al., Algorithm 1; the last step, to σ = 0, stays Euler), 2S - 1
    network calls for S steps. Nothing is clipped: the ODE has no data range. Deterministic:
    ``generator`` is accepted for a common signature and unused.
    """
    if solver not in ("euler", "heun"):
        raise ValueError(f"solver must be 'euler' or 'heun', got {solver!r}")

    def update(x: torch.Tensor, t: int, s: int) -> torch.Tensor:
        a_t, a_s = schedule.alpha_bar(t).to(x.dtype), schedule.alpha_bar(s).to(x.dtype)
        sig_t, sig_s = sigma_ve(schedule, t).to(x.dtype), sigma_ve(schedule, s).to(x.dtype)
        xbar = x / a_t.sqrt()
        # Euler: $\bar x_s = \bar x_t + (\sigma_s - \sigma_t)\, \epsilon_\theta(x_t, t)$
        d = predict_eps(model, x, t, labels)
        xbar_s = xbar + (sig_s - sig_t) * d
        if solver == "heun" and s >= 0:
            # Heun: the mean slope of both ends, $\frac12(\epsilon_\theta(x_t, t) + \epsilon_\theta(\tilde x_s, s))$
            d_s = predict_eps(model, a_s.sqrt() * xbar_s, s, labels)
            xbar_s = xbar + (sig_s - sig_t) * 0.5 * (d + d_s)
        return a_s.sqrt() * xbar_s

    return walk(schedule, x_T, steps, update, callback)


@torch.no_grad()
def langevin_sample(model: nn.Module, schedule: NoiseSchedule, x_T: torch.Tensor, steps: int | None = 100,
                    langevin_steps: int = 5, step_size: float = 2e-5, denoise: bool = True,
                    generator: torch.Generator | None = None, labels: torch.Tensor | None = None,
                    callback: Callback | None = None) -> torch.Tensor:
    r"""Annealed Langevin dynamics (Song & Ermon, 2019, Algorithm 1) with the ε-model as the score.

    In $\bar x = x_t/\sqrt{\bar\alpha_t}$ the noise levels are $\sigma_t$ (:func:`sigma_ve`) and the score is
    $s(\bar x, \sigma_t) = -\epsilon_\theta(\sqrt{\bar\alpha_t}\,\bar x, t)/\sigma_t$. At each level of the chain,
    from the largest down, ``langevin_steps`` updates $\bar x \leftarrow \bar x + \frac{\alpha}{2} s + \sqrt{\alpha}\,z$
    with $\alpha = $ ``step_size`` $\cdot\, \sigma_t^2 / \sigma_{\min}^2$, $\sigma_{\min}$ the smallest level.
    ``callback(t + 1, x)`` follows each level t but the last, ``callback(0, x)`` the output.
    ``denoise`` ends with Tweedie's $\hat x_0 = \bar x - \sigma_{\min}\epsilon_\theta$ (Jolicoeur-Martineau et
    al., 2021), which removes the last level's noise. ``x_T`` ~ N(0, I) is read as $\sqrt{\bar\alpha_T}\,\bar x$.
    """
    if langevin_steps < 1 or not step_size > 0:
        raise ValueError(f"need langevin_steps >= 1 and step_size > 0, got {langevin_steps} and {step_size}")
    chain = _chain(schedule, x_T, steps)
    levels = [t for t, _ in chain]  # descending timesteps
    sigma_min = sigma_ve(schedule, levels[-1]).to(x_T.dtype)
    xbar = x_T / schedule.alpha_bar(levels[0]).to(x_T.dtype).sqrt()
    if callback is not None:
        callback(levels[0] + 1, x_T)
    for t in levels:
        a_t, sig_t = schedule.alpha_bar(t).to(x_T.dtype), sigma_ve(schedule, t).to(x_T.dtype)
        # $\alpha_i = \epsilon\,\sigma_i^2 / \sigma_L^2$
        alpha = step_size * sig_t**2 / sigma_min**2
        for _ in range(langevin_steps):
            # $s_\theta(\bar x, \sigma) = -\epsilon_\theta(\sqrt{\bar\alpha}\,\bar x, t) / \sigma$
            score = -predict_eps(model, a_t.sqrt() * xbar, t, labels) / sig_t
            z = torch.randn(xbar.shape, generator=generator, dtype=xbar.dtype).to(xbar.device)
            xbar = xbar + 0.5 * alpha * score + alpha.sqrt() * z
        if callback is not None and t != levels[-1]:
            callback(t + 1, a_t.sqrt() * xbar)  # a draw at level t: the paper's index t + 1
    if denoise:
        # Tweedie at the smallest level: $\hat x_0 = \bar x - \sigma_{\min}\,\epsilon_\theta$
        t = levels[-1]
        xbar = xbar - sigma_min * predict_eps(model, schedule.alpha_bar(t).to(xbar.dtype).sqrt() * xbar, t, labels)
    if callback is not None:
        callback(0, xbar)
    return xbar


SAMPLERS = {"ancestral": ancestral_sample, "ddim": ddim_sample, "dpmsolver++": dpm_solver_sample,
            "pf-ode": probability_flow_sample, "langevin": langevin_sample}
