r"""What the network predicts: ε, x_0 or v, and the exact conversions between them, Chapter 39.

With $x_t = \sqrt{\bar\alpha_t}\,x_0 + \sqrt{1-\bar\alpha_t}\,\epsilon$, any one of
ε, $x_0$, $v = \sqrt{\bar\alpha_t}\,\epsilon - \sqrt{1-\bar\alpha_t}\,x_0$ (Salimans & Ho, 2022) and the score
$\nabla\log q_t(x_t) = -\epsilon/\sqrt{1-\bar\alpha_t}$ determines the others given $x_t$. The names are
diffusers' ``prediction_type``: "epsilon", "sample", "v_prediction". ``abar`` broadcasts against x_t.
"""

from __future__ import annotations

import torch

PREDICTIONS = ("epsilon", "sample", "v_prediction")


def check_prediction(prediction: str) -> None:
    if prediction not in PREDICTIONS:
        raise ValueError(f"prediction must be one of {PREDICTIONS}, got {prediction!r}")


def velocity(x0: torch.Tensor, eps: torch.Tensor, abar: torch.Tensor) -> torch.Tensor:
    r"""$v = \sqrt{\bar\alpha_t}\,\epsilon - \sqrt{1-\bar\alpha_t}\,x_0$ (diffusers: ``get_velocity``)."""
    return abar.sqrt() * eps - (1 - abar).sqrt() * x0


def target(prediction: str, x0: torch.Tensor, eps: torch.Tensor, abar: torch.Tensor) -> torch.Tensor:
    """What a network of the given prediction type regresses at (x_0, ε)."""
    check_prediction(prediction)
    if prediction == "epsilon":
        return eps
    if prediction == "sample":
        return x0
    return velocity(x0, eps, abar)


def to_epsilon(prediction: str, out: torch.Tensor, xt: torch.Tensor, abar: torch.Tensor) -> torch.Tensor:
    """The ε implied by a network output of the given type at x_t."""
    check_prediction(prediction)
    if prediction == "epsilon":
        return out
    if prediction == "sample":
        # $\epsilon = (x_t - \sqrt{\bar\alpha_t}\,\hat x_0) / \sqrt{1-\bar\alpha_t}$
        return (xt - abar.sqrt() * out) / (1 - abar).sqrt()
    # $\epsilon = \sqrt{\bar\alpha_t}\,v + \sqrt{1-\bar\alpha_t}\,x_t$
    return abar.sqrt() * out + (1 - abar).sqrt() * xt


def to_sample(prediction: str, out: torch.Tensor, xt: torch.Tensor, abar: torch.Tensor) -> torch.Tensor:
    """The x_0 implied by a network output of the given type at x_t."""
    check_prediction(prediction)
    if prediction == "sample":
        return out
    if prediction == "v_prediction":
        # $x_0 = \sqrt{\bar\alpha_t}\,x_t - \sqrt{1-\bar\alpha_t}\,v$
        return abar.sqrt() * xt - (1 - abar).sqrt() * out
    # $x_0 = (x_t - \sqrt{1-\bar\alpha_t}\,\epsilon) / \sqrt{\bar\alpha_t}$
    return (xt - (1 - abar).sqrt() * out) / abar.sqrt()


def score(eps: torch.Tensor, abar: torch.Tensor) -> torch.Tensor:
    r"""$\nabla_{x_t}\log q_t(x_t) = -\epsilon / \sqrt{1-\bar\alpha_t}$ for the minimum-MSE ε (Tweedie)."""
    return -eps / (1 - abar).sqrt()


def epsilon_mse_weight(prediction: str, abar: torch.Tensor) -> torch.Tensor:
    r"""The factor $w_t$ with $\lVert \hat y - y\rVert^2 = w_t\,\lVert \hat\epsilon - \epsilon\rVert^2$ for target y.

    Errors convert linearly given $x_t$:
    $\hat x_0 - x_0 = -\sqrt{(1-\bar\alpha_t)/\bar\alpha_t}\,(\hat\epsilon - \epsilon)$ and
    $\hat v - v = (\hat\epsilon - \epsilon)/\sqrt{\bar\alpha_t}$, so regressing x_0 is the
    ε-loss weighted by $1/\mathrm{SNR}(t)$ and regressing v the ε-loss weighted by $1 + 1/\mathrm{SNR}(t)$.
    """
    check_prediction(prediction)
    if prediction == "epsilon":
        return torch.ones_like(abar)
    # $1/\mathrm{SNR}(t) = (1-\bar\alpha_t)/\bar\alpha_t$
    inverse_snr = (1 - abar) / abar
    return inverse_snr if prediction == "sample" else 1 + inverse_snr
