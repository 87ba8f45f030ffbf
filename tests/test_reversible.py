"""odeint_reversible: the gradient of the discrete reversible Heun computation, in O(1) memory."""

import math

import pytest
import torch

import neuralode as node
from problems import DEVICES, DTYPES

T = [0.0, 0.3, 0.7, 1.0]


def _model(dtype=torch.float64, device="cpu", seed=0):
    torch.manual_seed(seed)
    return node.MLPDynamics(3, hidden=16, time_dependent=True).to(dtype=dtype, device=device)


def reversible_heun_plain(func, y0, t, step_size):
    """The same discrete computation written out plainly, for autograd to backpropagate through:
    z_{n+1} = 2 y_n - z_n + h f_n, f_{n+1} = f(t_{n+1}, z_{n+1}), y_{n+1} = y_n + h/2 (f_n + f_{n+1}),
    each output interval split into ceil(|dt| / step_size) equal steps."""
    y, z = y0, y0
    f = func(torch.tensor(t[0], dtype=y0.dtype, device=y0.device), z)
    ys = [y]
    for a, b in zip(t[:-1], t[1:]):
        n = max(1, math.ceil(abs(b - a) / step_size - 1e-9))
        h = (b - a) / n
        for k in range(1, n + 1):
            s = b if k == n else a + k * h
            z = 2 * y - z + h * f
            f_next = func(torch.tensor(s, dtype=y0.dtype, device=y0.device), z)
            y = y + h / 2 * (f + f_next)
            f = f_next
        ys.append(y)
    return torch.stack(ys)


def _gradients(solver, func, y0, t, **kwargs):
    y0 = y0.detach().clone().requires_grad_(True)
    func.zero_grad()
    ys = solver(func, y0, t, **kwargs)
    ((ys[1:] ** 2).sum() + ys[-1].sum() + ys[0].sum()).backward()  # every output time, the first included
    return [y0.grad] + [p.grad.clone() for p in func.parameters()]


def _max_relative(gs, refs):
    return max(((g - r).abs().max() / r.abs().max()).item() for g, r in zip(gs, refs))


@pytest.mark.parametrize("step_size", [0.1, 0.07])  # 0.07: intervals that are no whole number of steps
def test_gradient_is_backprop_through_the_same_discrete_computation(step_size):
    # Catches a wrong cotangent in the backward recursion (a missing h/2, the factor 2 on y, the sign
    # of a_z), a wrong inverse step, a time grid that differs between the passes, a lost jump at an
    # output time: each changes the gradient far beyond 1e-10.
    func, y0 = _model(), torch.randn(4, 3, dtype=torch.float64)
    ref = _gradients(lambda f, y, t: reversible_heun_plain(f, y, t, step_size), func, y0, T)
    got = _gradients(node.odeint_reversible, func, y0, T, step_size=step_size)
    assert _max_relative(got, ref) < 1e-10


def test_forward_equals_the_plain_computation_and_the_stats_count():
    func, y0 = _model(), torch.randn(4, 3, dtype=torch.float64)
    with torch.no_grad():
        ys, stats = node.odeint_reversible(func, y0, T, step_size=0.1, return_stats=True)
        ref = reversible_heun_plain(func, y0, T, 0.1)
    assert torch.allclose(ys, ref, rtol=0, atol=1e-13)
    assert stats.n_accepted == 3 + 4 + 3 and stats.nfe == stats.n_accepted + 1  # one evaluation per step
    assert stats.step_times[-1] == 1.0 and math.isnan(stats.reconstruction_error)


def test_backward_reconstructs_the_forward_states_to_rounding():
    # A backward step that is not the exact inverse (e.g. z_n = 2 y_{n+1} - z_{n+1} + h f_{n+1})
    # misses the stored states by O(h) or more, not by rounding.
    func, y0 = _model(), torch.randn(4, 3, dtype=torch.float64)
    y0.requires_grad_(True)
    ys, stats = node.odeint_reversible(func, y0, [0.0, 1.0], step_size=0.01, return_stats=True)
    ys[-1].sum().backward()
    assert stats.reconstruction_error < 1e-12
    assert stats.backward_nfe == 100 + 2  # one per step, and one per output time


def test_second_order_convergence_against_a_closed_form():
    # y' = A y, A a rotation plus slow decay: y(t) = exp(A t) y0. Halving h divides the error by 4.
    A = torch.tensor([[-0.1, 1.0], [-1.0, -0.1]], dtype=torch.float64)
    y0 = torch.tensor([1.0, 0.5], dtype=torch.float64)
    exact = torch.linalg.matrix_exp(A * 2.0) @ y0
    errors = []
    for h in (0.02, 0.01):
        with torch.no_grad():
            ys = node.odeint_reversible(lambda t, y: A @ y, y0, [0.0, 2.0], step_size=h, adjoint_params=())
        errors.append((ys[-1] - exact).norm().item())
    order = math.log2(errors[0] / errors[1])
    assert 1.8 < order < 2.2, f"observed order {order:.2f}"


@pytest.mark.parametrize("device", DEVICES, ids=str)
@pytest.mark.parametrize("dtype", DTYPES)
def test_dtype_and_device_follow_y0(dtype, device):
    func, y0 = _model(dtype, device), torch.randn(4, 3, dtype=dtype, device=device)
    got = _gradients(node.odeint_reversible, func, y0, T, step_size=0.1)
    ref = _gradients(lambda f, y, t: reversible_heun_plain(f, y, t, 0.1), func, y0, T)
    assert all(g.dtype == dtype and g.device.type == device.type for g in got)
    assert _max_relative(got, ref) < (1e-4 if dtype == torch.float32 else 1e-10)


def test_tuple_state():
    # Two parts of different shapes, coupled through the dynamics, with the parameter w:
    # x' = -w mean_rows(y) (shape (2,)), y' = w x broadcast over the rows (shape (3, 2)).
    w = torch.tensor(1.3, dtype=torch.float64, requires_grad=True)

    def func(t, state):
        x, y = state
        return -w * y.mean(0), (w * x).expand(3, 2)

    x0, y0 = torch.randn(2, dtype=torch.float64), torch.randn(3, 2, dtype=torch.float64)
    grads = []
    for solver in ("library", "plain"):
        x, y = x0.clone().requires_grad_(True), y0.clone().requires_grad_(True)
        if solver == "library":
            xs, ys = node.odeint_reversible(func, (x, y), T, step_size=0.05, adjoint_params=(w,))
        else:
            flat = lambda t, s: torch.cat([p.reshape(-1) for p in func(t, (s[:2], s[2:].view(3, 2)))])
            out = reversible_heun_plain(flat, torch.cat([x, y.reshape(-1)]), T, 0.05)
            xs, ys = out[:, :2], out[:, 2:].reshape(len(T), 3, 2)
        assert xs.shape == (4, 2) and ys.shape == (4, 3, 2)
        ((xs ** 2).sum() + ys[-1].sum()).backward()
        grads.append([x.grad, y.grad, w.grad.clone()])
        w.grad = None
    assert _max_relative(grads[0], grads[1]) < 1e-10


def test_module_parameters_are_the_default_and_frozen_ones_are_skipped():
    func, y0 = _model(), torch.randn(4, 3, dtype=torch.float64)
    frozen = next(func.parameters())
    frozen.requires_grad_(False)
    got = node.odeint_reversible(func, y0, T, step_size=0.1)
    got[-1].sum().backward()
    assert frozen.grad is None
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in func.parameters() if p.requires_grad)


def test_double_backward_is_refused():
    func, y0 = _model(), torch.randn(4, 3, dtype=torch.float64, requires_grad=True)
    ys = node.odeint_reversible(func, y0, T, step_size=0.1)
    (g,) = torch.autograd.grad(ys[-1].sum(), y0, create_graph=True)
    with pytest.raises(RuntimeError, match="odeint_reversible: its gradients cannot be differentiated twice"):
        g.sum().backward()


@pytest.mark.parametrize("kwargs, error, match", [
    (dict(step_size=0.0), ValueError, "step_size must be a finite number > 0"),
    (dict(step_size=float("nan")), ValueError, "step_size must be a finite number > 0"),
    (dict(step_size="0.1"), TypeError, "step_size must be a real number"),
    (dict(step_size=1e-7), ValueError, "more than max_num_steps"),
])
def test_bad_arguments_are_refused(kwargs, error, match):
    with pytest.raises(error, match=match):
        node.odeint_reversible(_model(), torch.zeros(3, dtype=torch.float64), T, **kwargs)


def test_plain_function_must_name_its_parameters_and_t_must_not_require_grad():
    with pytest.raises(ValueError, match="adjoint_params"):
        node.odeint_reversible(lambda t, y: -y, torch.ones(2), [0.0, 1.0], step_size=0.1)
    with pytest.raises(ValueError, match="t requires grad"):
        node.odeint_reversible(_model(), torch.ones(3, dtype=torch.float64),
                               torch.tensor(T, dtype=torch.float64, requires_grad=True), step_size=0.1)


def test_the_parasitic_mode_on_dissipative_dynamics_fails_loudly():
    # y' = -lambda y: the parasitic mode grows like exp(lambda t) whatever h, so over lambda t = 800
    # it overflows float64 at this step size; the solver must raise, not return garbage.
    with pytest.raises(FloatingPointError, match="not A-stable"):
        node.odeint_reversible(lambda t, y: -40.0 * y, torch.ones(2, dtype=torch.float64), [0.0, 20.0],
                               step_size=0.01, adjoint_params=())


def test_a_finite_solution_lost_to_the_parasitic_mode_is_refused():
    # Over lambda t = 40 the parasitic mode (about h^2 e^(lambda t)) dwarfs the solution (e^(-lambda t))
    # while everything stays finite: returning it would be a silent wrong answer.
    with pytest.raises(FloatingPointError, match="lost to the parasitic mode"):
        node.odeint_reversible(lambda t, y: -40.0 * y, torch.ones(2, dtype=torch.float64), [0.0, 1.0],
                               step_size=0.01, adjoint_params=())
    with torch.no_grad():  # the same dynamics over a short span are fine: the gap is still small
        ys, stats = node.odeint_reversible(lambda t, y: -40.0 * y, torch.ones(2, dtype=torch.float64), [0.0, 0.025],
                                           step_size=0.001, adjoint_params=(), return_stats=True)
    assert 0 < stats.yz_gap < 1e-2 and abs(ys[-1, 0].item() - math.exp(-1.0)) < 1e-3
