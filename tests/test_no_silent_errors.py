"""No silent wrong answer: a gradient is right or refused with a clear error, a solve that cannot
finish fails fast naming ``t``, and nonsense settings are refused at the call."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import neuralode as node

F64 = torch.float64
A = torch.tensor([[-0.1, 1.0], [-1.0, -0.3]], dtype=F64)
FORCE = torch.tensor([0.5, -0.2], dtype=F64)
Y0 = torch.tensor([1.0, 0.3], dtype=F64)
WEIGHTS = torch.tensor([[0.3, -1.2], [0.7, 0.4], [-0.5, 0.9]], dtype=F64)


def forced(t, y):
    """A non-autonomous linear field, so f_t != 0 and the t_0 term is not trivial."""
    return y @ A.T + torch.sin(t) * FORCE


def forced_tuple(t, state):
    y, w = state
    return forced(t, y), -0.5 * w + y.sum()


def loss_of(ys):
    if isinstance(ys, tuple):
        return (WEIGHTS * ys[0]).sum() + (ys[1] ** 2).sum()
    return (WEIGHTS * ys).sum() + (ys**2).sum()


def time_grad(times, method="dopri5", state=Y0, func=forced, **kw):
    t = torch.tensor(times, dtype=F64, requires_grad=True)
    loss_of(node.odeint(func, state, t, method=method, **kw)).backward()
    return t.grad


def central_differences(times, eps, method="dopri5", state=Y0, func=forced, **kw):
    grads = []
    for i in range(len(times)):
        def loss(shift):
            moved = list(times)
            moved[i] += shift
            with torch.no_grad():
                return loss_of(node.odeint(func, state, moved, method=method, **kw)).item()
        grads.append((loss(eps) - loss(-eps)) / (2 * eps))
    return torch.tensor(grads, dtype=F64)


# ------------------------------------------------------------------------ 1. gradients w.r.t. t
@pytest.mark.parametrize("times", [[0.2, 0.7, 1.1], [1.1, 0.6, 0.2]], ids=["forwards", "backwards"])
@pytest.mark.parametrize("method, tol, eps, close", [
    ("dopri5", 1e-12, 1e-5, 1e-6),  # central differences: O(eps^2) ~ 1e-7 plus solver noise tol/eps
    ("tsit5", 1e-12, 1e-5, 1e-6),
    ("rodas4", 1e-9, 1e-4, 1e-5),  # a 4th-order method at tol 1e-9: a coarser eps keeps tol/eps small
])
def test_odeint_time_gradient_matches_finite_differences(times, method, tol, eps, close):
    got = time_grad(times, method, rtol=tol, atol=tol)
    assert got is not None, "odeint dropped the gradient with respect to t"
    expected = central_differences(times, eps, method, rtol=tol, atol=tol)
    torch.testing.assert_close(got, expected, rtol=close, atol=1e-7)


@pytest.mark.parametrize("times", [[0.2, 0.7, 1.1], [1.1, 0.6, 0.2]], ids=["forwards", "backwards"])
def test_odeint_time_gradient_of_a_tuple_state(times):
    state = (Y0, torch.tensor([0.5], dtype=F64))
    got = time_grad(times, state=state, func=forced_tuple, rtol=1e-12, atol=1e-12)
    expected = central_differences(times, 1e-5, state=state, func=forced_tuple, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(got, expected, rtol=1e-6, atol=1e-7)


def test_odeint_time_gradient_matches_torchdiffeq():
    torchdiffeq = pytest.importorskip("torchdiffeq")
    times = [0.2, 0.5, 0.9, 1.4]
    t = torch.tensor(times, dtype=F64, requires_grad=True)
    loss_of_4 = lambda ys: (ys.sum(-1) * torch.tensor([0.1, -0.3, 0.8, 0.5], dtype=F64)).sum() + (ys**2).sum()
    loss_of_4(torchdiffeq.odeint(forced, Y0, t, rtol=1e-10, atol=1e-12)).backward()
    t_ours = torch.tensor(times, dtype=F64, requires_grad=True)
    loss_of_4(node.odeint(forced, Y0, t_ours, rtol=1e-10, atol=1e-12)).backward()
    torch.testing.assert_close(t_ours.grad, t.grad, rtol=1e-6, atol=1e-8)


@pytest.mark.parametrize("times", [[0.2, 0.7, 1.1], [1.1, 0.6, 0.2]], ids=["forwards", "backwards"])
def test_fixed_grid_time_gradient_is_that_of_the_exact_solution(times):
    # A fixed-step solve returns the continuous-time formula, evaluated on its own solution; with
    # rk4 at h = 0.01 that is within O(h^4) of the exact solution's gradient (odeint_adjoint, tight).
    got = time_grad(times, "rk4", options={"step_size": 0.01})
    t = torch.tensor(times, dtype=F64, requires_grad=True)
    loss_of(node.odeint_adjoint(forced, Y0, t, rtol=1e-12, atol=1e-12, adjoint_params=())).backward()
    torch.testing.assert_close(got, t.grad, rtol=1e-7, atol=1e-8)


def test_time_gradient_with_parameters_and_y0_unchanged():
    # Turning on t's gradient changes neither the values nor the other gradients.
    lin = nn.Linear(2, 2).double()
    y0 = Y0.clone().requires_grad_(True)
    ys = node.odeint(lambda t, y: torch.tanh(lin(y)), y0, [0.0, 0.5, 1.0], rtol=1e-9, atol=1e-9)
    grads = torch.autograd.grad(loss_of(ys), (y0, lin.weight))
    t = torch.tensor([0.0, 0.5, 1.0], dtype=F64, requires_grad=True)
    ys_t = node.odeint(lambda t, y: torch.tanh(lin(y)), y0, t, rtol=1e-9, atol=1e-9)
    assert torch.equal(ys_t, ys)
    grads_t = torch.autograd.grad(loss_of(ys_t), (y0, lin.weight, t))
    for a, b in zip(grads, grads_t):
        torch.testing.assert_close(a, b, rtol=1e-14, atol=1e-15)


# --------------------------------------------------------------------------- 2. double backward
def _penalised(loss, wrt):
    (g,) = torch.autograd.grad(loss, wrt, create_graph=True)
    return loss + (g**2).sum()  # a gradient penalty: its backward is a double backward


def test_double_backward_through_odeint_adjoint_is_refused():
    lin = nn.Linear(2, 2).double()
    ys = node.odeint_adjoint(lambda t, y: torch.tanh(lin(y)), Y0, [0.0, 0.5, 1.0], rtol=1e-6, atol=1e-6,
                             adjoint_params=tuple(lin.parameters()))
    total = _penalised(loss_of(ys), lin.weight)
    with pytest.raises(RuntimeError, match="odeint_adjoint.*differentiated twice.*odeint"):
        total.backward()


def test_double_backward_through_rodas4_is_refused():
    lin = nn.Linear(2, 2).double()
    y0 = Y0.clone().requires_grad_(True)
    ys = node.odeint(lambda t, y: torch.tanh(lin(y)), y0, [0.0, 0.5, 1.0], method="rodas4", rtol=1e-6, atol=1e-6)
    total = _penalised(loss_of(ys), y0)
    with pytest.raises(RuntimeError, match="rodas4.*differentiated twice"):
        total.backward()


def test_double_backward_through_the_time_gradient_is_refused():
    t = torch.tensor([0.0, 0.5, 1.0], dtype=F64, requires_grad=True)
    total = _penalised(loss_of(node.odeint(forced, Y0, t)), t)
    with pytest.raises(RuntimeError, match="time gradient.*differentiated twice"):
        total.backward()


def test_with_t_requiring_grad_second_derivatives_reach_parameters_but_not_t():
    # The solve's backward takes the times as constants, so d(penalty)/dt would miss terms: refused.
    # d(penalty)/dw is exact, and allowed.
    w = torch.tensor([[0.3, -0.8], [0.5, 0.1]], dtype=F64, requires_grad=True)

    def penalised(t):
        ys = node.odeint(lambda s, y: torch.tanh(y @ w.T) + torch.sin(s) * FORCE, Y0, t, rtol=1e-9, atol=1e-9)
        return _penalised(loss_of(ys), w)

    expected = torch.autograd.grad(penalised([0.0, 0.5, 1.0]), w)[0]
    t = torch.tensor([0.0, 0.5, 1.0], dtype=F64, requires_grad=True)
    got = torch.autograd.grad(penalised(t), w)[0]
    torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-14)
    with pytest.raises(RuntimeError, match="time gradient.*differentiated twice"):
        torch.autograd.grad(penalised(t), t)
    with pytest.raises(RuntimeError, match="time gradient.*differentiated twice"):
        penalised(t).backward()


@pytest.mark.parametrize("method, options", [
    ("dopri5", {"first_step": 0.25, "max_step": 0.25}),  # adaptive engine, steps pinned
    ("rk4", {"step_size": 0.2}),
])
def test_double_backward_through_explicit_rk_is_correct(method, options):
    w0 = torch.tensor([[0.3, -0.8], [0.5, 0.1]], dtype=F64, requires_grad=True)
    y0 = Y0.clone().requires_grad_(True)

    def solve(y0, w):
        return node.odeint(lambda t, y: torch.tanh(y @ w.T), y0, [0.0, 0.3, 1.0], method=method,
                           rtol=1e3, atol=1e3, options=options)

    assert torch.autograd.gradcheck(solve, (y0, w0))
    assert torch.autograd.gradgradcheck(solve, (y0, w0))


# ------------------------------------------------------------------ 3. non-finite steps and outputs
@pytest.mark.parametrize("method", ["adaptive_heun", "bosh3", "dopri5", "tsit5", "rodas4"])
def test_a_step_that_overflows_is_never_accepted(method):
    # y' = 1e38 from 3e38 in float32: y overflows at t = 0.4028, but the error estimate of a constant
    # field is exactly 0, so an overflowed y1 had a finite error, an infinite scale, ratio 0, and
    # was accepted: the solve returned inf. Now it is rejected; the steps creep up to the overflow
    # (float32 cannot resolve them past it) and the solve fails there, naming t and the overflow.
    # rodas4's stages carry multiples of f of about 8 (c_ij u_j / h), which overflow at once: it
    # fails at t = 0, loudly.
    y0 = torch.tensor([3e38], dtype=torch.float32)
    with pytest.raises((FloatingPointError, RuntimeError), match=r"t=(0|0\.40\d*)\b.*NaN or inf"):
        node.odeint(lambda t, y: torch.full_like(y, 1e38), y0, [0.0, 1.0], method=method, rtol=1e-3, atol=1e-6,
                    options={"max_num_steps": 500})


def test_an_overflowing_last_step_is_not_returned():
    # The one step h = 0.4 to the last output overflows in dopri5's stages (y1 = inf) while its
    # error estimate stays finite: it used to be accepted and inf returned. Now it is retried with
    # smaller steps, and y(0.4) = 3.4e38 comes back finite.
    y0 = torch.tensor([3e38], dtype=torch.float32)
    ys = node.odeint(lambda t, y: torch.full_like(y, 1e38), y0, [0.0, 0.4], rtol=1e-3, atol=1e-6,
                     options={"first_step": 0.4, "max_step": 0.4, "ifactor": 1.0})
    assert torch.isfinite(ys).all()


@pytest.mark.parametrize("method", ["bosh3", "dopri5"])
def test_float16_blow_up_names_t_and_the_overflow(method):
    # y' = y^2, y(0) = 1 blows up at t = 1; in float16 f = y^2 overflows once y > 256.
    with pytest.raises((FloatingPointError, RuntimeError), match=r"t=(0\.99\d*|1\.0\d*|1)\b.*NaN or inf"):
        node.odeint(lambda t, y: y**2, torch.ones(1, dtype=torch.float16), [0.0, 2.0], method=method,
                    rtol=1e-2, atol=1e-2, options={"max_num_steps": 400})


@pytest.mark.parametrize("method", ["dopri5", "rodas4"])
def test_blow_up_never_returns_inf(method):
    with pytest.raises((FloatingPointError, RuntimeError), match=r"t=(0\.99\d*|1)\b"):
        node.odeint(lambda t, y: y**2, torch.ones(1, dtype=F64), [0.0, 2.0], method=method)


# -------------------------------------------------------------- 4. rodas4 under no_grad/inference
STIFF = torch.tensor([[-1000.0, 1.0], [0.0, -0.5]], dtype=F64)


def _stiff_solve():
    return node.odeint(lambda t, y: y @ STIFF.T, torch.ones(2, dtype=F64), [0.0, 0.5, 1.0], method="rodas4",
                       rtol=1e-6, atol=1e-8, return_stats=True)


@pytest.mark.parametrize("mode", [torch.no_grad, torch.inference_mode])
def test_rodas4_uses_the_true_jacobian_without_autograd(mode):
    ys, stats = _stiff_solve()
    with mode():
        ys_off, stats_off = _stiff_solve()
    assert stats_off.n_accepted == stats.n_accepted  # with J = 0 it would take ~60x the steps
    torch.testing.assert_close(ys_off, ys, rtol=0, atol=0)


def test_rodas4_under_inference_mode_with_inference_tensors_says_use_no_grad():
    with torch.inference_mode():
        stiff = STIFF * 1.0  # an inference tensor: autograd cannot differentiate through it
        with pytest.raises(RuntimeError, match=r"rodas4.*inference_mode.*torch\.no_grad\(\)"):
            node.odeint(lambda t, y: y @ stiff.T, torch.ones(2, dtype=F64), [0.0, 1.0], method="rodas4")


# --------------------------------------------------------------------------- 5. nonsense settings
def _never_called(t, y):
    raise AssertionError("func was called: the settings should have been refused first")


@pytest.mark.parametrize("kwargs, message", [
    (dict(atol=0.0), r"atol must be > 0 .*adaptive.*e\.g\. atol=1e-9"),
    (dict(method="rodas4", atol=0.0), r"atol must be > 0"),
    (dict(options={"ifactor": 0.5}), r"options\['ifactor'\] must be >= 1"),
    (dict(options={"safety": 1.5}), r"options\['safety'\] must lie in \(0, 1\]"),
    (dict(options={"safety": 0.0}), r"options\['safety'\]"),
    (dict(options={"dfactor": 1.0}), r"options\['dfactor'\] must lie in \(0, 1\)"),
    (dict(options={"dfactor": 0.0}), r"options\['dfactor'\] must lie in \(0, 1\)"),
    (dict(options={"max_step": 0.1, "min_step": 0.2}), r"max_step.*must be >= .*min_step"),
    (dict(options={"first_step": 0.01, "min_step": 0.1}), r"first_step.*must be >= .*min_step"),
    (dict(options={"min_step": float("inf")}), r"options\['min_step'\] must be finite"),
])
def test_nonsense_settings_are_refused_at_the_call(kwargs, message):
    with pytest.raises(ValueError, match=message):
        node.odeint(_never_called, torch.tensor([0.0, 1.0], dtype=F64), [0.0, 1.0], **kwargs)


def test_nonsense_adjoint_settings_are_refused_at_the_call():
    with pytest.raises(ValueError, match=r"adjoint_atol must be > 0"):
        node.odeint_adjoint(_never_called, Y0, [0.0, 1.0], adjoint_params=(), adjoint_atol=0.0)
    with pytest.raises(ValueError, match=r"adjoint_options\['ifactor'\]"):
        node.odeint_adjoint(_never_called, Y0, [0.0, 1.0], adjoint_params=(), adjoint_options={"ifactor": 0.9})


def test_zero_atol_is_fine_for_fixed_step_methods():
    ys = node.odeint(lambda t, y: -y, torch.tensor([0.0, 1.0], dtype=F64), [0.0, 1.0], method="rk4", atol=0.0,
                     options={"step_size": 0.1})
    assert torch.isfinite(ys).all()
