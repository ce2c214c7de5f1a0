"""Chapter 53's small-policy Fisher matrices and the measured conjugate-gradient residual, against closed forms:
the Fisher matrix of one categorical is diag(p) - p p^T, that of a linear softmax policy is the mean over states
of (s s^T) ⊗ (diag(p_s) - p_s p_s^T)."""

import pytest
import torch

from agm.rl.trpo import (
    conjugate_gradient,
    conjugate_gradient_residual,
    fisher_by_enumeration,
    kl_hessian,
    linear_softmax_log_probs,
    mean_kl,
    natural_gradient_step,
)


def categorical(theta: torch.Tensor) -> torch.Tensor:
    """One state, logits theta (K,): log pi (1, K)."""
    return theta.log_softmax(-1)[None]


@pytest.fixture
def linear_policy():
    g = torch.Generator().manual_seed(0)
    d, K = 3, 4
    states = torch.randn(6, d, generator=g, dtype=torch.float64)
    theta = torch.randn(d * K, generator=g, dtype=torch.float64)
    return states, theta, K, (lambda t: linear_softmax_log_probs(states, t, K))


def kronecker_fisher(states: torch.Tensor, theta: torch.Tensor, K: int) -> torch.Tensor:
    """Closed form for softmax(s W): d logit_k / d W_ik' = s_i [k = k'], so F = mean_s (s s^T) ⊗ (diag p - p p^T)."""
    p = (states @ theta.view(states.shape[1], K)).softmax(-1)
    blocks = [torch.kron(s.outer(s), torch.diag(q) - q.outer(q)) for s, q in zip(states, p, strict=True)]
    return torch.stack(blocks).mean(0)


def test_linear_softmax_log_probs_are_the_log_softmax_of_s_w_and_refuse_a_wrong_shape(linear_policy):
    """Catches a transposed or column-major W, and a theta of the wrong length accepted silently."""
    states, theta, K, log_probs = linear_policy
    W = theta.view(3, K)
    assert torch.allclose(log_probs(theta), torch.log_softmax(states @ W, -1), atol=1e-14)
    assert torch.allclose(log_probs(theta)[0, 1].exp(), (states[0] @ W[:, 1]).exp() / (states[0] @ W).exp().sum())
    with pytest.raises(ValueError, match="theta of shape"):
        linear_softmax_log_probs(states, theta[:-1], K)


def test_mean_kl_is_the_forward_kl_averaged_over_states(linear_policy):
    """Catches the reverse direction KL(pi_theta || pi_old), a sum instead of a mean over states, and a KL that is
    not zero at theta_old."""
    states, theta, K, log_probs = linear_policy
    other = theta + 0.7 * torch.randn(theta.shape, generator=torch.Generator().manual_seed(1), dtype=theta.dtype)
    p, q = log_probs(theta).exp(), log_probs(other).exp()
    by_hand = sum(sum(p[s, a] * torch.log(p[s, a] / q[s, a]) for a in range(K)) for s in range(len(states))) / 6
    assert mean_kl(log_probs, theta, other).item() == pytest.approx(by_hand.item(), abs=1e-12)
    reverse = (q * (q / p).log()).sum(-1).mean()
    assert abs(by_hand - reverse) > 1e-3  # the two directions differ here, so the check above can tell them apart
    assert mean_kl(log_probs, theta, theta).item() == pytest.approx(0.0, abs=1e-14)


def test_fisher_and_kl_hessian_of_one_categorical_are_diag_p_minus_p_p_transpose():
    """Catches a Fisher matrix without the pi(a) weights, or a Hessian of the wrong KL."""
    theta = torch.tensor([0.3, -1.0, 2.0, 0.5], dtype=torch.float64)
    p = theta.softmax(-1)
    closed = torch.diag(p) - p.outer(p)
    assert torch.allclose(fisher_by_enumeration(categorical, theta), closed, atol=1e-14)
    assert torch.allclose(kl_hessian(categorical, theta), closed, atol=1e-12)


def test_fisher_and_kl_hessian_of_a_linear_softmax_policy_match_the_kronecker_closed_form(linear_policy):
    """Catches a score vector laid out in the wrong order, a missing mean over states, and a Hessian taken in the
    frozen argument of the KL (which would be zero)."""
    states, theta, K, log_probs = linear_policy
    closed = kronecker_fisher(states, theta, K)
    assert closed.abs().max() > 1e-2
    assert torch.allclose(fisher_by_enumeration(log_probs, theta), closed, atol=1e-12)
    assert torch.allclose(kl_hessian(log_probs, theta), closed, atol=1e-10)
    # the softmax is unchanged by adding c to every logit, W -> W + c 1^T: the Fisher matrix is singular
    assert torch.linalg.matrix_rank(closed).item() == 3 * (K - 1)


def test_the_natural_step_of_a_linear_softmax_policy_has_kl_near_delta_for_small_delta(linear_policy):
    """The quadratic model of the KL is exact to second order: catches a step scaled by delta instead of
    sqrt(2 delta / g^T F^-1 g)."""
    states, theta, K, log_probs = linear_policy
    rewards = torch.randn(6, K, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    t = theta.clone().requires_grad_()
    grad = torch.autograd.grad(-(log_probs(t).exp() * rewards).sum(-1).mean(), t)[0]
    F = fisher_by_enumeration(log_probs, theta)
    gaps = []
    for delta in (1e-2, 1e-4):
        step, _ = natural_gradient_step(grad, lambda v: F @ v, delta, cg_iters=len(theta))
        assert (0.5 * step @ F @ step).item() == pytest.approx(delta, rel=1e-8)
        gaps.append(abs(mean_kl(log_probs, theta, theta + step).item() / delta - 1))
    assert gaps[1] < 0.05 and gaps[1] < gaps[0] / 3  # the relative error shrinks like sqrt(delta)


def test_conjugate_gradient_residual_is_measured_with_a_fresh_product():
    """Catches a residual read off CG's recursion without a product (the counter shows one extra), and an
    iteration count that is not honoured."""
    g = torch.Generator().manual_seed(0)
    M = torch.randn(8, 8, generator=g, dtype=torch.float64)
    A, b = M @ M.T + 0.5 * torch.eye(8, dtype=torch.float64), torch.randn(8, generator=g, dtype=torch.float64)
    calls = []

    def Avp(v):
        calls.append(1)
        return A @ v

    x, residual = conjugate_gradient_residual(Avp, b, 3)
    assert len(calls) == 4
    assert torch.equal(x, conjugate_gradient(lambda v: A @ v, b, 3, tol=0.0))
    assert residual == pytest.approx(((A @ x - b).norm() / b.norm()).item(), rel=1e-12) and residual > 1e-3
    assert conjugate_gradient_residual(lambda v: A @ v, b, 8)[1] < 1e-8
    assert conjugate_gradient_residual(lambda v: A @ v, b, 0)[1] == pytest.approx(1.0)
