"""The fixed-step fast path (issue 24): a plain fixed-step solve runs ``_loop._fixed_loop``, with no
per-step checks, and must compute what the general loop computes, count what it counts, and still
name the time at which a solution became non-finite."""

from __future__ import annotations

import math

import pytest
import torch

import neuralode as node
from neuralode import _loop

F64 = torch.float64
METHODS = ["euler", "midpoint", "heun3", "rk4", "rk4_38"]
# Output times on the grid, between grid points (dense output), and a single interval.
TIMES = [[0.0, 1.0], [0.0, 0.25, 0.5, 0.75, 1.0], [0.0, 0.33, 0.5, 0.9, 1.0], [1.0, 0.6, 0.0]]


class Field(torch.nn.Module):
    """A small nonlinear field with parameters, depending on t."""

    def __init__(self, dtype):
        super().__init__()
        torch.manual_seed(0)
        self.net = torch.nn.Sequential(torch.nn.Linear(3, 16), torch.nn.Tanh(), torch.nn.Linear(16, 2)).to(dtype)

    def forward(self, t, y):
        return self.net(torch.cat([y, t.expand(y.shape[0], 1)], dim=1))


@pytest.fixture
def general(monkeypatch):
    """Run every fixed-step solve through the general loop instead of the fast one."""
    def through_the_general_loop(stepper, control, func, y0, t_out):
        return _loop._loop(stepper, control, func, y0, t_out, (), (), ())

    monkeypatch.setattr(_loop, "_fixed_loop", through_the_general_loop)


@pytest.fixture
def fast_calls(monkeypatch):
    """Count the solves that take the fast path."""
    calls = []
    original = _loop._fixed_loop

    def spy(*args):
        calls.append(args)
        return original(*args)

    monkeypatch.setattr(_loop, "_fixed_loop", spy)
    return calls


def _solve(method, dtype, t, grad=False, **options):
    field = Field(dtype)
    y0 = torch.randn(5, 2, dtype=dtype, generator=torch.Generator().manual_seed(1)).requires_grad_(grad)
    ys, stats = node.odeint(field, y0, torch.tensor(t, dtype=dtype), method=method, options=options or None,
                            return_stats=True)
    if not grad:
        return ys, stats, ()
    loss = (ys * torch.linspace(-1, 1, ys.numel(), dtype=dtype).reshape(ys.shape)).sum()
    return ys, stats, torch.autograd.grad(loss, [y0, *field.parameters()])


@pytest.mark.parametrize("dtype", [torch.float32, F64])
@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("options", [{}, {"step_size": 0.1}, {"step_size": 0.3},
                                     {"step_size": 0.1, "interp": "linear"}])
def test_the_fast_path_is_taken_and_agrees_with_the_general_loop_bit_for_bit(dtype, method, options, fast_calls,
                                                                            monkeypatch):
    fast = [_solve(method, dtype, t, grad=True, **options) for t in TIMES]
    assert len(fast_calls) == len(TIMES)
    monkeypatch.setattr(_loop, "_fixed_loop", lambda s, c, f, y, t: _loop._loop(s, c, f, y, t, (), (), ()))
    slow = [_solve(method, dtype, t, grad=True, **options) for t in TIMES]
    for (ys, stats, grads), (ys_ref, stats_ref, grads_ref) in zip(fast, slow):
        assert ys.dtype == dtype and torch.equal(ys, ys_ref)
        assert stats == stats_ref  # nfe, accepted steps, step times
        for g, g_ref in zip(grads, grads_ref):
            assert torch.equal(g, g_ref)


@pytest.mark.parametrize("method, stages", [("euler", 1), ("midpoint", 2), ("rk4", 4), ("rk4_38", 4)])
@pytest.mark.parametrize("steps", [2, 5, 32])
def test_evaluations_are_the_stages_times_the_steps(method, stages, steps, fast_calls):
    _, stats, _ = _solve(method, torch.float32, [0.0, 1.0], step_size=1.0 / steps)
    assert fast_calls and stats.nfe == stages * steps and stats.n_accepted == steps
    assert stats.step_times == pytest.approx([(i + 1) / steps for i in range(steps)], abs=1e-12)


def test_tuple_states_agree_with_the_general_loop(monkeypatch):
    def f(t, state):
        x, v = state
        return v, -x * torch.cos(t) - 0.1 * v

    y0 = (torch.tensor([1.0, 0.5], dtype=F64, requires_grad=True),
          torch.tensor([0.2, -0.3], dtype=F64, requires_grad=True))
    t = [0.0, 0.4, 1.1, 2.0]

    def run():
        ys = node.odeint(f, y0, t, method="rk4", options={"step_size": 0.3})
        return ys, torch.autograd.grad(ys[0].sum() + 2 * ys[1].sum(), y0)

    (fast, fast_grads) = run()
    monkeypatch.setattr(_loop, "_fixed_loop", lambda s, c, g, y, tt: _loop._loop(s, c, g, y, tt, (), (), ()))
    (slow, slow_grads) = run()
    assert all(torch.equal(a, b) for a, b in zip(fast + fast_grads, slow + slow_grads))


def test_hooks_perturb_and_event_searches_keep_the_general_loop(fast_calls):
    field = Field(F64)
    seen = []
    field.callback_step = lambda t0, y0, dt: seen.append(float(t0))  # an instance attribute of a Module
    y0 = torch.randn(3, 2, dtype=F64)
    node.odeint(field, y0, [0.0, 1.0], method="euler", options={"step_size": 0.25})
    assert seen == [0.0, 0.25, 0.5, 0.75] and not fast_calls
    node.odeint(lambda t, y: -y, y0, [0.0, 1.0], method="euler", options={"step_size": 0.25, "perturb": True})
    assert not fast_calls
    node.odeint_event(lambda t, y: -y, y0, 0.0, event_fn=lambda t, y: y[0, 0] - 0.5 * y0[0, 0], method="rk4",
                      options={"step_size": 0.1})
    assert not fast_calls
    node.odeint(lambda t, y: -y, y0, [0.0, 1.0], method="euler", options={"step_size": 0.25})
    assert len(fast_calls) == 1


# ---------------------------------------------------------------- non-finite states are still named
def _inf_after(limit):
    def f(t, y):
        return torch.where(t > limit, torch.full_like(y, math.inf), -y)

    return f


@pytest.mark.parametrize("times", [[0.0, 1.0], [0.0, 0.25, 0.5, 0.75, 1.0], [0.0, 0.33, 1.0]])
@pytest.mark.parametrize("dtype, named", [(F64, "0.7"), (torch.float32, "0.8")])
def test_a_field_that_is_inf_after_t_06_is_named_at_the_step_that_used_it(times, dtype, named):
    # Euler, h = 0.1: the step from the grid point 6 * 0.1 = 0.6000000000000001 evaluates f there,
    # which is > 0.6 in float64, so the state at 0.7 is the first that is not finite. In float32 the
    # time func receives rounds to float32(0.6), which is not > 0.6 (as float32): 0.8. (What the
    # per-step flags of the earlier implementation reported, too.)
    with pytest.raises(FloatingPointError, match=rf"non-finite \(NaN or inf\) at t={named}\."):
        node.odeint(_inf_after(0.6), torch.ones(3, dtype=dtype), times, method="euler", options={"step_size": 0.1})


@pytest.mark.parametrize("method, named", [("midpoint", "0.7"), ("rk4", "0.6")])
def test_the_named_time_follows_the_stages(method, named):
    # midpoint's stage at 0.6 + h/2 and rk4's at 0.5 + h (both > 0.6 in float64 only just) decide.
    with pytest.raises(FloatingPointError, match=rf"at t={named}\."):
        node.odeint(_inf_after(0.6), torch.ones(3, dtype=F64), [0.0, 1.0], method=method, options={"step_size": 0.1})


def test_an_overflowing_dense_output_names_its_own_time():
    # The states are finite (Euler never evaluates f at t = 1); the Hermite output at 0.95 uses
    # f(1, y(1)) = inf: the re-run finds no non-finite state and names the output time.
    def f(t, y):
        return torch.full_like(y, math.inf) if float(t) == 1.0 else -y

    with pytest.raises(FloatingPointError, match=r"at t=0\.95\."):
        node.odeint(f, torch.ones(2, dtype=F64), [0.0, 0.95, 1.0], method="euler", options={"step_size": 0.1})


def test_a_failure_the_re_run_does_not_reproduce_names_the_interval():
    calls = [0]

    def once(t, y):  # inf after t = 0.5, in the first solve only (a non-deterministic field)
        calls[0] += 1
        return torch.full_like(y, math.inf) if calls[0] <= 10 and float(t) > 0.5 else -y

    with pytest.raises(FloatingPointError, match=r"between t=0\.5 and t=1; re-running"):
        node.odeint(once, torch.ones(2, dtype=F64), [0.0, 0.5, 1.0], method="euler", options={"step_size": 0.1})
    assert calls[0] == 20  # the solve and its re-run: 10 evaluations each


def test_a_finite_solve_is_checked_once_and_not_re_run():
    calls = [0]

    def f(t, y):
        calls[0] += 1
        return -y

    ys = node.odeint(f, torch.ones(2), [0.0, 1.0], method="rk4", options={"step_size": 0.25})
    assert calls[0] == 16 and torch.isfinite(ys).all()


def test_a_sum_that_overflows_from_finite_outputs_is_not_an_error():
    # float32: 3e38 + 3e38 overflows in the check's sum, though every entry is finite.
    y0 = torch.tensor([3e38, 3e38], dtype=torch.float32)
    ys = node.odeint(lambda t, y: torch.zeros_like(y), y0, [0.0, 1.0], method="euler")
    assert torch.equal(ys[-1], y0)


# ------------------------------------------------------------- cheaper validation, not weaker
@pytest.mark.parametrize("first, second, message", [
    ({"step_size": 1}, {"step_size": True}, "must be a real number"),
    ({"step_size": 0.5}, {"step_size": -0.5}, "must be positive"),
    ({"step_size": 0.5}, {"step_size": 0.5, "interp": "quadratic"}, "interp"),
])
def test_a_validated_call_does_not_let_a_bad_one_through(first, second, message):
    for _ in range(2):
        node.odeint(lambda t, y: -y, torch.ones(2), [0.0, 1.0], method="euler", options=first)
        with pytest.raises((TypeError, ValueError), match=message):
            node.odeint(lambda t, y: -y, torch.ones(2), [0.0, 1.0], method="euler", options=second)
    node.odeint(lambda t, y: -y, torch.ones(2), [0.0, 1.0], method="dopri5", rtol=1, atol=1e-6)
    with pytest.raises(TypeError, match="rtol must be a real number"):
        node.odeint(lambda t, y: -y, torch.ones(2), [0.0, 1.0], method="dopri5", rtol=True, atol=1e-6)


def test_a_replaced_registry_entry_is_validated_afresh(monkeypatch):
    from neuralode import _methods

    node.odeint(lambda t, y: -y, torch.ones(2), [0.0, 1.0], method="euler", options={"step_size": 0.5})
    entry = _methods.REGISTRY["euler"]
    monkeypatch.setitem(_methods.REGISTRY, "euler", entry._replace(defaults={"max_num_steps": None}))
    with pytest.raises(ValueError, match=r"unknown option\(s\) \['step_size'\]"):
        node.odeint(lambda t, y: -y, torch.ones(2), [0.0, 1.0], method="euler", options={"step_size": 0.5})


@pytest.mark.parametrize("t", [torch.tensor([0, 1, 3]), torch.tensor([0.0, 0.1, 0.3], dtype=torch.float16),
                               torch.tensor([0.0, 0.1, 0.3], dtype=torch.float32, requires_grad=True)])
def test_times_of_any_real_dtype_are_read_as_their_float64_values(t):
    from neuralode._odeint import _check_times

    assert _check_times(t) == t.detach().to(F64).tolist()
    assert all(isinstance(s, float) for s in _check_times(t))


def test_a_re_run_that_fails_elsewhere_is_not_believed():
    calls = [0]

    def drifting(t, y):  # inf after t = 0.5 in the first solve, after t = 0.05 in the re-run
        calls[0] += 1
        return torch.full_like(y, math.inf) if float(t) > (0.5 if calls[0] <= 10 else 0.05) else -y

    with pytest.raises(FloatingPointError, match=r"between t=0\.5 and t=1; re-running"):
        node.odeint(drifting, torch.ones(2, dtype=F64), [0.0, 0.5, 1.0], method="euler", options={"step_size": 0.1})


def test_a_non_finite_initial_state_names_the_first_step():
    with pytest.raises(FloatingPointError, match=r"at t=0\.25\."):
        node.odeint(lambda t, y: -y, torch.tensor([1.0, math.nan]), [0.0, 0.5, 1.0], method="rk4",
                    options={"step_size": 0.25})


def test_a_replay_runs_the_general_loop_and_its_recheck_checks_every_step(fast_calls):
    # ReplaySteps (the checkpointed adjoint's re-solve) decides its jumps step by step, so it is never
    # `plain`; its locating re-run is built checked, and stays off the fast loop too.
    from neuralode._methods import REGISTRY, solve

    def f(t, y):
        return -y

    y0 = torch.ones(3, dtype=F64)
    stats = node.SolverStats()
    kwargs = dict(rtol=1e-6, atol=1e-8, norm=_loop.rms_norm, options=dict(REGISTRY["dopri5"].defaults))
    ys = solve(REGISTRY["dopri5"], f, y0, [0.0, 1.0], stats=stats, **kwargs)
    replayed = solve(REGISTRY["dopri5"], f, y0, [0.0, 1.0], stats=node.SolverStats(), replay=stats.step_times, **kwargs)
    assert torch.equal(replayed, ys)
    assert fast_calls == []
    control = _loop.ReplaySteps({}, [0.0, 1.0], node.SolverStats(), stats.step_times)
    again = control.rechecked()
    assert not control.plain and not control.checked
    assert again.checked and not again.plain and again.ends == stats.step_times
