r"""The pieces of TRPO (Schulman et al., 2015), Chapter 53: Fisher-vector products, conjugate gradient, the
step to the edge of the trust region and the backtracking line search.

Parameters travel as one flat vector (``torch.nn.utils.parameters_to_vector``). The Fisher matrix F is never
formed: F v is the Hessian-vector product of the mean KL between the policy and a frozen copy of itself, at
the current parameters, by double backpropagation.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable

import torch


def flat_grad(y: torch.Tensor, params: Iterable[torch.Tensor], create_graph: bool = False) -> torch.Tensor:
    """The gradient of the scalar ``y`` with respect to ``params``, flattened into one vector (zeros where a
    parameter does not affect ``y``)."""
    params = list(params)
    grads = torch.autograd.grad(y, params, create_graph=create_graph, allow_unused=True)
    grads = [torch.zeros_like(p) if g is None else g for g, p in zip(grads, params, strict=True)]
    return torch.cat([g.reshape(-1) for g in grads])


def fisher_vector_product(kl_fn: Callable[[], torch.Tensor], params: Iterable[torch.Tensor], v: torch.Tensor,
                          damping: float = 0.0) -> torch.Tensor:
    """(F + damping I) v, with F the Hessian of ``kl_fn()`` — the mean KL between a frozen copy of the policy and
    the policy, both at the current parameters — with respect to ``params``; v is a flat vector."""
    params = list(params)
    # $g = \nabla_\theta \mathrm{KL}$, kept differentiable
    grad_kl = flat_grad(kl_fn(), params, create_graph=True)
    if v.shape != grad_kl.shape:
        raise ValueError(f"v must be a flat vector of shape {list(grad_kl.shape)}, got {list(v.shape)}")
    # $F v = \nabla_\theta (g^\top v)$
    fvp = flat_grad(grad_kl @ v.detach(), params)
    # $(F + \lambda I)\, v$
    return fvp + damping * v


def conjugate_gradient(Avp: Callable[[torch.Tensor], torch.Tensor], b: torch.Tensor, iters: int = 10,
                       tol: float = 1e-10) -> torch.Tensor:
    """An approximate solution of A x = b for a symmetric positive-definite A known only through products
    v -> A v (Hestenes and Stiefel, 1952), from x = 0: at most ``iters`` products, stopping once the squared
    residual ||b - A x||^2 is below ``tol``. Exact after n iterations in exact arithmetic, n = len(b)."""
    if b.ndim != 1:
        raise ValueError(f"b must be a flat vector (n,), got {list(b.shape)}")
    x = torch.zeros_like(b)
    r, p = b.clone(), b.clone()  # residual b - A x and search direction
    rdotr = r @ r
    for _ in range(iters):
        if rdotr < tol:
            break
        Ap = Avp(p)
        # $\alpha = r^\top r / p^\top A p$
        alpha = rdotr / (p @ Ap)
        # $x \leftarrow x + \alpha p$, $r \leftarrow r - \alpha A p$
        x, r = x + alpha * p, r - alpha * Ap
        new_rdotr = r @ r
        # $p \leftarrow r + \frac{r_{\mathrm{new}}^\top r_{\mathrm{new}}}{r^\top r}\, p$, A-conjugate to earlier p
        p = r + (new_rdotr / rdotr) * p
        rdotr = new_rdotr
    return x


def natural_gradient_step(loss_grad: torch.Tensor, Fvp: Callable[[torch.Tensor], torch.Tensor], max_kl: float,
                          cg_iters: int = 10) -> tuple[torch.Tensor, torch.Tensor]:
    """TRPO's full step and its expected improvement, from the gradient g of the loss to minimize (flat): the
    natural-gradient direction s = -F^{-1} g by conjugate gradient, scaled so that the quadratic model of the KL,
    s^T F s / 2, equals ``max_kl``; the expected improvement is the first-order decrease of the loss, -g^T step."""
    # $s \approx -F^{-1} g$
    step_dir = conjugate_gradient(Fvp, -loss_grad, cg_iters)
    # $\beta = \sqrt{2\delta / s^\top F s}$
    beta = torch.sqrt(2 * max_kl / (step_dir @ Fvp(step_dir)))
    full_step = beta * step_dir
    # $-g^\top \Delta\theta$
    return full_step, -(loss_grad @ full_step)


@torch.no_grad()
def backtracking_line_search(f: Callable[[torch.Tensor], torch.Tensor | float], x: torch.Tensor,
                             full_step: torch.Tensor, expected_improvement: torch.Tensor | float, max_kl: float,
                             kl_fn: Callable[[torch.Tensor], torch.Tensor | float], max_backtracks: int = 10,
                             shrink: float = 0.5, accept_ratio: float = 0.1) -> tuple[torch.Tensor, dict]:
    """TRPO's line search on the flat parameters ``x``, for a loss ``f(x)`` to minimize and ``kl_fn(x)``, the mean
    KL from the policy at the starting ``x``.

    Tries x + a * full_step for a = 1, shrink, shrink^2, ... (``max_backtracks`` tries) and accepts the first
    where (1) the KL is at most ``max_kl`` (the trust region, as in Spinning Up's TRPO), (2) the loss decreased,
    f(x) - f(x_new) > 0, and (3) that decrease is at least ``accept_ratio`` times the expected one,
    a * ``expected_improvement`` (Schulman's modular_rl). Non-finite values count as a failure. If no step is
    accepted, x comes back unchanged. Returns the new x and logs: ``accepted``, ``step_fraction``,
    ``backtracks``, ``kl`` and ``improvement`` of the accepted step (zeros if none)."""
    if not 0 < shrink < 1 or max_backtracks < 1:
        raise ValueError(f"need 0 < shrink < 1 and max_backtracks >= 1, got {shrink} and {max_backtracks}")
    f0 = float(f(x))
    for k in range(max_backtracks):
        fraction = shrink**k
        x_new = x + fraction * full_step
        # actual decrease $f(x) - f(x + a\,\Delta)$ and KL at the trial point
        improvement, kl = f0 - float(f(x_new)), float(kl_fn(x_new))
        # $\mathrm{KL} \le \delta$, $\Delta f > 0$, $\Delta f \ge \text{accept\_ratio} \cdot a \cdot \text{expected}$
        if (math.isfinite(improvement) and math.isfinite(kl) and kl <= max_kl and improvement > 0
                and improvement >= accept_ratio * fraction * float(expected_improvement)):
            return x_new, {"accepted": True, "step_fraction": fraction, "backtracks": k, "kl": kl,
                           "improvement": improvement}
    return x, {"accepted": False, "step_fraction": 0.0, "backtracks": max_backtracks, "kl": 0.0,
               "improvement": 0.0}


# -- small policies whose Fisher matrix can be written down (Chapter 53's checks) -------------------------------


def linear_softmax_log_probs(states: torch.Tensor, theta: torch.Tensor, actions: int) -> torch.Tensor:
    """log pi_theta(a | s) (S, K) of the linear softmax policy pi_theta(. | s) = softmax(s W) on states (S, d),
    with W = theta.view(d, K) (row-major) and K = ``actions``."""
    if states.ndim != 2 or theta.shape != (states.shape[1] * actions,):
        raise ValueError(f"need states (S, d) and theta of shape (d * K,) = ({states.shape[-1] * actions},), "
                         f"got {list(states.shape)} and {list(theta.shape)}")
    # $\log \pi_\theta(a \mid s) = (sW)_a - \log \sum_b e^{(sW)_b}$
    return (states @ theta.view(states.shape[1], actions)).log_softmax(-1)


def mean_kl(log_probs: Callable[[torch.Tensor], torch.Tensor], theta_old: torch.Tensor,
            theta: torch.Tensor) -> torch.Tensor:
    """The mean over states of KL(pi_old(. | s) || pi_theta(. | s)) for a policy given as ``log_probs(theta)``,
    the table log pi_theta(a | s) (S, K); differentiable in ``theta``."""
    log_old, log_new = log_probs(theta_old).detach(), log_probs(theta)  # (S, K) each
    # $\frac1S \sum_s \sum_a \pi_{\rm old}(a \mid s) \log \frac{\pi_{\rm old}(a \mid s)}{\pi_\theta(a \mid s)}$
    return (log_old.exp() * (log_old - log_new)).sum(-1).mean()


def kl_hessian(log_probs: Callable[[torch.Tensor], torch.Tensor], theta: torch.Tensor) -> torch.Tensor:
    """The Hessian (n, n) of theta' -> mean_kl(log_probs, theta, theta') at theta' = theta, by autograd."""
    # $\nabla^2_{\theta'} \overline{\mathrm{KL}}(\theta, \theta')\big|_{\theta' = \theta}$
    return torch.autograd.functional.hessian(lambda t: mean_kl(log_probs, theta, t), theta.detach())


def fisher_by_enumeration(log_probs: Callable[[torch.Tensor], torch.Tensor], theta: torch.Tensor) -> torch.Tensor:
    """The Fisher information matrix (n, n) of a policy given as ``log_probs(theta)`` (S, K), by listing every
    state and action: the mean over states of sum_a pi(a | s) grad log pi(a | s) grad log pi(a | s)^T."""
    theta = theta.detach()
    log_pi = log_probs(theta).detach()  # (S, K)
    scores = torch.autograd.functional.jacobian(log_probs, theta)  # (S, K, n): grad log pi(a | s)
    # $F = \frac1S \sum_s \sum_a \pi(a \mid s)\, \nabla \log \pi(a \mid s)\, \nabla \log \pi(a \mid s)^\top$
    return torch.einsum("sa,sai,saj->ij", log_pi.exp(), scores, scores) / log_pi.shape[0]


def conjugate_gradient_residual(Avp: Callable[[torch.Tensor], torch.Tensor], b: torch.Tensor,
                                iters: int) -> tuple[torch.Tensor, float]:
    """:func:`conjugate_gradient` with ``iters`` products (stopping early only if the squared residual reaches the
    smallest normal number of b's dtype), and the relative residual ||A x - b|| / ||b|| of its answer, measured
    with one more product (not taken from the recursion)."""
    x = conjugate_gradient(Avp, b, iters, tol=torch.finfo(b.dtype).tiny)
    # $\|A x - b\| / \|b\|$
    return x, float((Avp(x) - b).norm() / b.norm())
