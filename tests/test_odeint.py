"""odeint against closed forms: orders, tolerances, dtypes, devices, tuples, time direction."""

import math

import numpy as np
import pytest
import torch

import neuralode as node
from problems import (ADAPTIVE_METHODS, DEVICES, DTYPES, FIXED_METHODS, PROBLEM_IDS, PROBLEMS,
                      affordable_tolerance)


def _times(problem, n=5, dtype=torch.float64):
    return torch.linspace(problem.t0, problem.t1, n, dtype=dtype)


def _max_error(problem, method, dtype=torch.float64, device="cpu", **kwargs):
    y0 = problem.initial(dtype, device)
    t = _times(problem)
    ys = node.odeint(problem.f, y0, t.to(device), method=method, **kwargs)
    exact = problem.exact(t.to(device=device, dtype=torch.float64), y0.double())
    return (ys.double() - exact).abs().max().item()


def _slope(hs, errors):
    return np.polyfit(np.log(hs), np.log(errors), 1)[0]


@pytest.mark.parametrize("problem", PROBLEMS, ids=PROBLEM_IDS)
@pytest.mark.parametrize("method, order", FIXED_METHODS.items())
def test_fixed_step_methods_converge_at_their_order(problem, method, order):
    span = problem.t1 - problem.t0
    hs = [span / n for n in (80, 160, 320, 640)]
    errors = [_max_error(problem, method, options={"step_size": h}) for h in hs]
    slope = _slope(hs, errors)
    assert abs(slope - order) < 0.25, f"{method}: observed order {slope:.2f}, declared {order}"


def _constant_steps(problem, method, n, offset):
    """Force an adaptive method onto ``n`` equal steps; outputs at ``offset`` into each step."""
    h = (problem.t1 - problem.t0) / n
    inner = [problem.t0 + (i + offset) * h for i in range(n)] if offset < 1 else []
    t = torch.tensor([problem.t0] + inner + [problem.t1], dtype=torch.float64)
    y0 = problem.initial()
    ys, stats = node.odeint(problem.f, y0, t, method=method, rtol=1e3, atol=1e3, return_stats=True,
                            options={"first_step": h, "max_step": h})
    assert stats.n_accepted == n and stats.n_rejected == 0
    return h, (ys - problem.exact(t, y0)).abs().max().item()


@pytest.mark.parametrize("problem", PROBLEMS, ids=PROBLEM_IDS)
@pytest.mark.parametrize("method", ADAPTIVE_METHODS)
def test_adaptive_methods_converge_at_their_declared_order(problem, method):
    order = node.TABLEAUS[method].order
    hs, errors = zip(*[_constant_steps(problem, method, n, offset=1) for n in (20, 40, 80)])
    assert _slope(hs, errors) > order - 0.35, f"{method}: observed order {_slope(hs, errors):.2f}"


@pytest.mark.parametrize("problem", PROBLEMS, ids=PROBLEM_IDS)
@pytest.mark.parametrize("method", ADAPTIVE_METHODS)
def test_dense_output_between_steps_has_the_interpolants_order(problem, method):
    # Local error of the continuous extension: O(h^5) for dopri5's and tsit5's quartic
    # interpolants, O(h^4) for cubic Hermite (which can be no better than the method itself).
    # Between steps the error is the interpolant's plus the solution's own global error O(h^p).
    tab = node.TABLEAUS[method]
    expected = 5 if isinstance(tab, node.ButcherTableau) and tab.dense is not None else min(4, tab.order)
    hs, errors = zip(*[_constant_steps(problem, method, n, offset=0.37) for n in (10, 20, 40)])
    assert _slope(hs, errors) > expected - 0.5, f"{method}: dense-output slope {_slope(hs, errors):.2f}"


@pytest.mark.parametrize("problem", PROBLEMS, ids=PROBLEM_IDS)
@pytest.mark.parametrize("method", ADAPTIVE_METHODS)
def test_adaptive_error_follows_the_tolerance(problem, method):
    tightest = affordable_tolerance(method) / 10
    tolerances = [tightest * 10**k for k in (6, 4, 2, 0)] if tightest < 1e-7 else [tightest * 10**k for k in (3, 2, 1, 0)]
    errors = [_max_error(problem, method, rtol=tol, atol=tol) for tol in tolerances]
    for tol, err in zip(tolerances, errors):
        assert err < 100 * tol, f"tol={tol:g}: error {err:.2e}"
    # Tighter tolerance, smaller error: the log-log slope against tolerance is clearly positive.
    assert _slope(tolerances, errors) > 0.6, errors


@pytest.mark.parametrize("device", DEVICES, ids=str)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("method", node.METHODS)
def test_output_follows_the_input_dtype_and_device(method, dtype, device):
    problem = PROBLEMS[1]
    seen = []

    def f(t, y):
        seen.append((t.dtype, t.device, t.shape))
        return problem.f(t, y)

    y0 = problem.initial(dtype, device)
    tol = affordable_tolerance(method, dtype)
    options = None if node.TABLEAUS[method].adaptive else {"step_size": 0.01}
    ys = node.odeint(f, y0, _times(problem), method=method, rtol=tol, atol=tol, options=options)
    assert ys.dtype == dtype and ys.device.type == device.type and ys.shape == (5, 2)
    assert set(seen) == {(dtype, y0.device, torch.Size([]))}
    exact = problem.exact(_times(problem), problem.initial())
    order = node.TABLEAUS[method].order
    bound = 0.2 if order == 1 else 2e-3 if order == 2 else (1e-3 if dtype == torch.float32 else 1e-5)
    assert (ys.double().cpu() - exact).abs().max() < bound


def test_first_output_is_the_initial_state_and_fixed_grid_is_t():
    y0 = torch.tensor([1.0, 2.0], dtype=torch.float64)
    t = torch.tensor([0.0, 0.1, 0.3, 0.35])
    ys, stats = node.odeint(lambda t, y: -y, y0, t, method="rk4", return_stats=True)
    assert torch.equal(ys[0], y0)
    assert stats.step_times == pytest.approx([0.1, 0.3, 0.35])
    assert stats.nfe == 3 * 4 and stats.n_accepted == 3 and stats.n_rejected == 0


def test_single_output_time_returns_the_initial_state():
    y0 = torch.randn(3, 2)
    ys = node.odeint(lambda t, y: y, y0, [0.5])
    assert ys.shape == (1, 3, 2) and torch.equal(ys[0], y0)


@pytest.mark.parametrize("method", node.METHODS)
def test_reversed_time_matches_the_exact_solution(method):
    problem = PROBLEMS[2]  # non-autonomous, so a sign slip in t shows
    y0 = problem.initial()
    t = torch.linspace(0.0, -3.0, 7, dtype=torch.float64)
    options = None if node.TABLEAUS[method].adaptive else {"step_size": 1e-3}
    ys = node.odeint(problem.f, y0, t, method=method, options=options)
    tol = 1e-2 if method == "euler" else 1e-5
    assert torch.allclose(ys, problem.exact(t, y0), atol=tol, rtol=0)


def test_forward_then_backward_returns_to_the_start():
    problem = PROBLEMS[3]
    y0 = problem.initial()
    forward = node.odeint(problem.f, y0, [0.0, 3.0], rtol=1e-10, atol=1e-12)[-1]
    back = node.odeint(problem.f, forward, [3.0, 0.0], rtol=1e-10, atol=1e-12)[-1]
    assert torch.allclose(back, y0, atol=1e-8)


@pytest.mark.parametrize("method", ["rk4", "dopri5"])
def test_tuple_states_match_the_stacked_state(method):
    # Oscillator written as (position of shape (3, 2), velocity of shape (3, 2)) and stacked.
    x0, v0 = torch.randn(3, 2, dtype=torch.float64), torch.randn(3, 2, dtype=torch.float64)
    t = torch.linspace(0, 2, 4, dtype=torch.float64)
    options = {"step_size": 0.01} if method == "rk4" else None
    xs, vs = node.odeint(lambda t, s: (s[1], -s[0]), (x0, v0), t, method=method, options=options)
    both = node.odeint(lambda t, s: torch.stack([s[1], -s[0]]), torch.stack([x0, v0]), t,
                       method=method, options=options)
    assert xs.shape == vs.shape == (4, 3, 2)
    assert torch.allclose(xs, both[:, 0], atol=1e-8) and torch.allclose(vs, both[:, 1], atol=1e-8)
    exact = x0 * torch.cos(t)[:, None, None] + v0 * torch.sin(t)[:, None, None]
    assert torch.allclose(xs, exact, atol=1e-6)


def test_tuple_state_with_parts_of_different_shapes():
    # (z, log p) as in a continuous normalizing flow: z' = -z, (log p)' = +D for D = 2.
    z0, logp0 = torch.randn(5, 2, dtype=torch.float64), torch.zeros(5, dtype=torch.float64)
    zs, logps = node.odeint(lambda t, s: (-s[0], torch.full_like(s[1], 2.0)), (z0, logp0), [0.0, 1.0])
    assert zs.shape == (2, 5, 2) and logps.shape == (2, 5)
    assert torch.allclose(zs[-1], z0 * math.exp(-1.0), atol=1e-7)
    assert torch.allclose(logps[-1], torch.full((5,), 2.0, dtype=torch.float64), atol=1e-7)


@pytest.mark.parametrize("method", node.METHODS)
def test_batch_elements_do_not_influence_each_other(method):
    torch.manual_seed(0)
    net = node.MLPDynamics(2, hidden=16).double()
    y0 = torch.randn(6, 2, dtype=torch.float64)
    t = torch.linspace(0, 1, 3, dtype=torch.float64)
    options = None if node.TABLEAUS[method].adaptive else {"step_size": 0.05}
    rtol = affordable_tolerance(method)
    batched = node.odeint(net, y0, t, method=method, rtol=rtol, atol=rtol, options=options)
    for i in range(6):
        alone = node.odeint(net, y0[i:i + 1], t, method=method, rtol=rtol, atol=rtol, options=options)
        # Fixed steps: identical arithmetic. Adaptive: the batch shares steps, so equal to tolerance.
        tol = 1e-12 if options else 100 * rtol
        assert torch.allclose(batched[:, i:i + 1], alone, atol=tol, rtol=0)


def test_output_grid_does_not_change_the_steps():
    problem = PROBLEMS[1]
    y0 = problem.initial()
    _, coarse = node.odeint(problem.f, y0, [problem.t0, problem.t1], return_stats=True)
    fine_t = torch.linspace(problem.t0, problem.t1, 200, dtype=torch.float64)
    ys, fine = node.odeint(problem.f, y0, fine_t, return_stats=True)
    assert coarse.step_times == fine.step_times and coarse.nfe == fine.nfe
    # The dense output between the steps is accurate too (dopri5's fourth-order interpolant).
    assert (ys - problem.exact(fine_t, y0)).abs().max() < 1e-6


def test_fixed_step_outputs_between_steps_are_interpolated_to_high_order():
    problem = PROBLEMS[1]
    y0 = problem.initial()
    t = torch.tensor([0.0, 0.123, 0.77, 1.0], dtype=torch.float64)  # not on the step grid
    errors = []
    for h in (0.1, 0.05):
        ys = node.odeint(problem.f, y0, t, method="rk4", options={"step_size": h})
        errors.append((ys - problem.exact(t, y0)).abs().max().item())
    assert errors[1] < errors[0] / 7  # cubic Hermite: error O(h^4), at least ~ 2^3 smaller


def test_stats_count_rejections_and_evaluations():
    calls = []

    def f(t, y):
        calls.append(1)
        return torch.cos(5 * t) * y

    ys, stats = node.odeint(f, torch.ones(1, dtype=torch.float64), [0.0, 10.0], return_stats=True,
                            options={"first_step": 5.0})
    assert stats.nfe == len(calls)
    assert stats.n_rejected >= 1  # a first step of 5 cannot pass
    # dopri5 with FSAL: 1 initial evaluation + 6 per attempted step.
    assert stats.nfe == 1 + 6 * (stats.n_accepted + stats.n_rejected)


def test_backprop_through_the_solver_gives_the_exact_gradient():
    A = torch.tensor([[-0.5, 1.0], [-1.0, -0.2]], dtype=torch.float64)
    y0 = torch.tensor([1.0, -1.0], dtype=torch.float64, requires_grad=True)
    yT = node.odeint(lambda t, y: A @ y, y0, [0.0, 2.0], rtol=1e-10, atol=1e-12)[-1]
    yT.sum().backward()
    expected = torch.linalg.matrix_exp(2.0 * A).T @ torch.ones(2, dtype=torch.float64)
    assert torch.allclose(y0.grad, expected, atol=1e-8)


@pytest.mark.parametrize("method", ["midpoint", "rk4", "dopri5"])
def test_gradcheck_in_float64(method):
    torch.manual_seed(0)
    net = node.MLPDynamics(2, hidden=8).double()
    options = None if method == "dopri5" else {"step_size": 0.25}

    def solve(y0, *params):
        return node.odeint(net, y0, [0.0, 0.5, 1.0], method=method, rtol=1e-10, atol=1e-10,
                           options=options)

    y0 = torch.randn(3, 2, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(solve, (y0,), eps=1e-6, atol=1e-5)
