"""odeint_event: terminal events with a differentiable event time (issue 17).

The checks: the event time and state against closed forms and torchdiffeq; the implicit-function
gradients against closed forms and central finite differences (for y0, t0, the dynamics'
parameters and the event function's), under odeint and odeint_adjoint; tuple states, reverse time,
several event functions, fixed-step methods, float32; and the errors.
"""

from __future__ import annotations

import math

import pytest
import torch
import torchdiffeq

import neuralode as node

F64 = torch.float64
INTERFACES = {"odeint": node.odeint, "adjoint": node.odeint_adjoint}


def _ball(gravity):
    """A ball thrown up at height h with speed v: y = (height, velocity); the event is height 0."""

    def f(t, y):
        return torch.stack([y[1], -gravity.expand(())])

    return f


def _landing(h, v, gravity):
    """The closed form: t* = (v + s) / g with s = sqrt(v^2 + 2 g h), and its derivatives."""
    s = math.sqrt(v * v + 2 * gravity * h)
    t = (v + s) / gravity
    return t, {"h": 1 / s, "v": (1 + v / s) / gravity, "g": h / (s * gravity) - t / gravity}


@pytest.mark.parametrize("interface", list(INTERFACES))
def test_ball_landing_time_and_its_gradients_match_the_closed_form(interface):
    # The flight is a quadratic in t, which dopri5 integrates exactly: the event time and its
    # implicit-function gradients must match the closed form to rounding. A missing f * dt term in
    # the state's gradient, a sign error in the rerouting, or a root left at the bracket's far end
    # (1e-8 off with a loose search) would all show.
    h, v, gravity = (torch.tensor(x, dtype=F64, requires_grad=True) for x in (2.0, 0.5, 9.81))
    extra = {"adjoint_params": (gravity,)} if interface == "adjoint" else {}
    t_event, ys = node.odeint_event(_ball(gravity), torch.stack([h, v]), torch.tensor(0.0, dtype=F64),
                                    event_fn=lambda t, y: y[0], odeint_interface=INTERFACES[interface],
                                    rtol=1e-10, atol=1e-10, **extra)
    exact, grads = _landing(2.0, 0.5, 9.81)
    assert t_event.dtype == F64 and t_event.shape == ()
    assert abs(t_event.item() - exact) < 1e-13
    assert ys.shape == (2, 2) and torch.equal(ys[0], torch.stack([h, v]).detach())
    assert 0 <= ys[-1, 0].item() < 1e-12  # the pre-crossing side: the height is still >= 0
    got = torch.autograd.grad(t_event, (h, v, gravity), retain_graph=True)
    for value, name in zip(got, ("h", "v", "g")):
        assert abs(value.item() - grads[name]) < 1e-12, (name, value.item(), grads[name])
    # The state at the event moves with the event: d(velocity at landing)/dh = -g / s.
    (dvel_dh,) = torch.autograd.grad(ys[-1, 1], h)
    assert abs(dvel_dh.item() + 9.81 / math.sqrt(0.25 + 2 * 9.81 * 2.0)) < 1e-12


def test_a_bouncing_ball_restarts_from_the_event_state():
    # The event state sits on the pre-crossing side, so a search restarted there (velocity reversed
    # and damped) finds the next bounce, not a spurious one at the restart: three bounces of a ball
    # dropped from h = 1 land at t_1 = sqrt(2h/g), then every 2 e v_k / g with v_{k+1} = e v_k.
    gravity, e = torch.tensor(9.81, dtype=F64), 0.8
    state, t = torch.tensor([1.0, 0.0], dtype=F64), torch.tensor(0.0, dtype=F64)
    speed = math.sqrt(2 * 9.81)
    expected = [math.sqrt(2 / 9.81)]
    for _ in range(2):
        speed *= e
        expected.append(expected[-1] + 2 * speed / 9.81)
    for landing in expected:
        t, ys = node.odeint_event(_ball(gravity), state, t, event_fn=lambda s, y: y[0], rtol=1e-10, atol=1e-10)
        assert abs(t.item() - landing) < 1e-9, (t.item(), landing)
        state = torch.stack([ys[-1, 0], -e * ys[-1, 1]])


def test_event_time_and_gradients_agree_with_torchdiffeqs_on_the_same_call():
    # The same call through both libraries: both find the landing, ours to rounding, theirs to its
    # bisection tolerance (atol); the gradients with respect to the initial state agree (torchdiffeq
    # reroutes them by the same implicit function theorem).
    gravity = torch.tensor(9.81, dtype=F64)
    kwargs = dict(event_fn=lambda t, y: y[0], rtol=1e-8, atol=1e-8)
    exact, grads = _landing(2.0, 0.5, 9.81)
    results = {}
    for lib in (node, torchdiffeq):
        y0 = torch.tensor([2.0, 0.5], dtype=F64, requires_grad=True)
        t_event, _ = lib.odeint_event(_ball(gravity), y0, torch.tensor(0.0, dtype=F64), **kwargs)
        results[lib.__name__] = (t_event.item(), torch.autograd.grad(t_event, y0)[0])
    ours, theirs = results["neuralode"], results["torchdiffeq"]
    assert abs(ours[0] - exact) < 1e-13
    assert abs(theirs[0] - exact) < 1e-7
    assert abs(ours[1][0].item() - grads["h"]) < 1e-12 and abs(ours[1][1].item() - grads["v"]) < 1e-12
    torch.testing.assert_close(ours[1], theirs[1], rtol=1e-6, atol=1e-8)


class _Decay(torch.nn.Module):
    """y' = -a y + sin(t), a nonlinear-in-parameters test field, with its step callbacks logged."""

    def __init__(self, a: float):
        super().__init__()
        self.a = torch.nn.Parameter(torch.tensor(a, dtype=F64))
        self.accepted = []

    def forward(self, t, y):
        return -self.a * y + torch.sin(t) * torch.tensor([1.0, 0.5], dtype=F64)

    def callback_accept_step(self, t, y, dt):
        self.accepted.append((t.item(), dt.item()))


def _crossing_time(a: float, y0: list, t0: float, level: float, interface: str, reverse=False) -> float:
    field = _Decay(a)
    with torch.no_grad():
        t, _ = node.odeint_event(field, torch.tensor(y0, dtype=F64), torch.tensor(t0, dtype=F64),
                                 event_fn=lambda s, y: y[0] - level, reverse_time=reverse,
                                 rtol=1e-12, atol=1e-12)
    return t.item()


@pytest.mark.parametrize("interface", list(INTERFACES))
@pytest.mark.parametrize("reverse", [False, True], ids=["forward", "reverse"])
def test_gradients_match_central_differences(interface, reverse):
    # d t*/d(a, y0, t0, level) for y' = -a y + sin(t), event y[0] = level: every input the event
    # depends on, through the dynamics (a), the start (y0, t0) and the event function (level).
    a, y0, t0, level = 1.3, [2.0, 1.0], 0.2, 0.7 if not reverse else 3.0
    field = _Decay(a)
    y0_t = torch.tensor(y0, dtype=F64, requires_grad=True)
    t0_t = torch.tensor(t0, dtype=F64, requires_grad=True)
    level_t = torch.tensor(level, dtype=F64, requires_grad=True)
    t_event, ys = node.odeint_event(field, y0_t, t0_t, event_fn=lambda s, y: y[0] - level_t, reverse_time=reverse,
                                    odeint_interface=INTERFACES[interface], rtol=1e-12, atol=1e-12)
    assert (t_event.item() - t0) * (-1 if reverse else 1) > 0.1
    assert field.accepted and all((dt > 0) != reverse for _, dt in field.accepted)
    grads = torch.autograd.grad(t_event, (field.a, y0_t, t0_t, level_t))
    eps = 1e-5
    fd = {
        "a": (_crossing_time(a + eps, y0, t0, level, interface, reverse)
              - _crossing_time(a - eps, y0, t0, level, interface, reverse)) / (2 * eps),
        "y0": (_crossing_time(a, [y0[0] + eps, y0[1]], t0, level, interface, reverse)
               - _crossing_time(a, [y0[0] - eps, y0[1]], t0, level, interface, reverse)) / (2 * eps),
        "t0": (_crossing_time(a, y0, t0 + eps, level, interface, reverse)
               - _crossing_time(a, y0, t0 - eps, level, interface, reverse)) / (2 * eps),
        "level": (_crossing_time(a, y0, t0, level + eps, interface, reverse)
                  - _crossing_time(a, y0, t0, level - eps, interface, reverse)) / (2 * eps),
    }
    got = {"a": grads[0].item(), "y0": grads[1][0].item(), "t0": grads[2].item(), "level": grads[3].item()}
    assert grads[1][1].abs().item() < 1e-10  # y0[1] does not affect y[0]
    for name in fd:
        assert abs(got[name] - fd[name]) < 1e-6 * max(1.0, abs(fd[name])), (name, got[name], fd[name])


def test_tuple_state_several_event_functions_and_the_first_crossing_decides():
    # Two event functions on a tuple state: position hits 1 at t = 1 (x' = 1), the second,
    # 2 - t, would cross at t = 2. The first decides; ys keeps the tuple structure.
    def f(t, state):
        x, w = state
        return torch.ones_like(x), torch.zeros_like(w)

    def events(t, state):
        x, w = state
        return torch.stack([x[0] - 1.0, 2.0 - t + 0 * w.sum()])

    y0 = (torch.zeros(1, dtype=F64), torch.ones(2, 3, dtype=F64))
    t_event, (xs, ws) = node.odeint_event(f, y0, 0.0, event_fn=events)
    assert abs(t_event.item() - 1.0) < 1e-14
    assert xs.shape == (2, 1) and ws.shape == (2, 2, 3) and torch.equal(ws[-1], y0[1])
    t_later, _ = node.odeint_event(f, y0, 0.0, event_fn=lambda t, s: torch.stack([s[0][0] - 5.0, 2.0 - t]))
    assert abs(t_later.item() - 2.0) < 1e-14


@pytest.mark.parametrize("dtype", [torch.float32, F64])
def test_fixed_step_search_and_dtypes(dtype):
    # rk4 with a step size: the crossing of y = exp(-t) with 0.5 is at ln 2, found on the step's
    # Hermite interpolant (third order), in the state's dtype.
    y0 = torch.ones(1, dtype=dtype)
    t_event, ys = node.odeint_event(lambda t, y: -y, y0, 0.0, event_fn=lambda t, y: y[0] - 0.5, method="rk4",
                                    options={"step_size": 0.01})
    assert t_event.dtype == dtype and ys.dtype == dtype
    assert abs(t_event.item() - math.log(2)) < (1e-6 if dtype == torch.float32 else 1e-9)
    with pytest.raises(ValueError, match="step_size"):
        node.odeint_event(lambda t, y: -y, y0, 0.0, event_fn=lambda t, y: y[0] - 0.5, method="rk4")


def test_errors_name_the_problem():
    y0 = torch.ones(1, dtype=F64)
    decay = lambda t, y: -y  # noqa: E731
    with pytest.raises(ValueError, match="equal to 0.*t0"):
        node.odeint_event(decay, y0, 0.0, event_fn=lambda t, y: y[0] - 1.0)
    with pytest.raises(RuntimeError, match="no event found.*max_num_steps=50"):
        node.odeint_event(decay, y0, 0.0, event_fn=lambda t, y: y[0] + 1.0, options={"max_num_steps": 50})
    with pytest.raises(TypeError, match="odeint_interface"):
        node.odeint_event(decay, y0, 0.0, event_fn=lambda t, y: y[0] - 0.5, odeint_interface=torchdiffeq.odeint)
    with pytest.raises(TypeError, match="unexpected keyword.*adjoint_params"):
        node.odeint_event(decay, y0, 0.0, event_fn=lambda t, y: y[0] - 0.5, adjoint_params=())
    # An event function whose slope along the solution is 0 at the crossing (here a step in t; a
    # tangential touch is the smooth case) has no implicit-function derivative: refuse, don't divide by 0.
    y0_grad = torch.ones(1, dtype=F64, requires_grad=True)
    with pytest.raises(RuntimeError, match="not differentiable"):
        node.odeint_event(decay, y0_grad, 0.0, event_fn=lambda t, y: torch.where(t < 1, 1.0, -1.0) + 0 * y[0])
    # Without a gradient to take, the same event is found (t = 1 to rounding).
    t_event, _ = node.odeint_event(decay, y0, 0.0, event_fn=lambda t, y: torch.where(t < 1, 1.0, -1.0) + 0 * y[0])
    assert abs(t_event.item() - 1.0) < 1e-14


def test_second_derivatives_refuse():
    gravity = torch.tensor(9.81, dtype=F64, requires_grad=True)
    t_event, _ = node.odeint_event(_ball(gravity), torch.tensor([2.0, 0.5], dtype=F64), 0.0,
                                   event_fn=lambda t, y: y[0])
    (first,) = torch.autograd.grad(t_event, gravity, create_graph=True)
    with pytest.raises(RuntimeError, match="odeint_event.*differentiated twice"):
        (t_event + first**2).backward()  # a gradient penalty: its backward is a double backward


@pytest.mark.parametrize("interface", list(INTERFACES))
def test_odeint_with_event_fn_is_torchdiffeqs_event_call(interface):
    # torchdiffeq's odeint(func, y0, t, event_fn=...) returns (event_t, ys at [t0, event_t]) and reads
    # only t[0] (and t[1]'s side for the direction). Ours is odeint_event, so the landing and its
    # implicit-function gradient match the closed form; torchdiffeq's own call agrees on the time.
    gravity = torch.tensor(9.81, dtype=F64)
    extra = {"adjoint_params": ()} if interface == "adjoint" else {}
    y0 = torch.tensor([2.0, 0.5], dtype=F64, requires_grad=True)
    t_event, ys = INTERFACES[interface](_ball(gravity), y0, torch.tensor([0.0, 5.0], dtype=F64),
                                        event_fn=lambda t, y: y[0], rtol=1e-10, atol=1e-10, **extra)
    exact, grads = _landing(2.0, 0.5, 9.81)
    assert abs(t_event.item() - exact) < 1e-13 and ys.shape == (2, 2)
    assert abs(torch.autograd.grad(t_event, y0)[0][0].item() - grads["h"]) < 1e-12
    theirs, _ = torchdiffeq.odeint(_ball(gravity), y0.detach(), torch.tensor([0.0, 5.0], dtype=F64),
                                   event_fn=lambda t, y: y[0], rtol=1e-10, atol=1e-10)
    assert abs(theirs.item() - exact) < 1e-8
    # Backwards: t[1] < t[0] searches towards decreasing t. The height 2 + 0.5 t - g t^2 / 2 has its other
    # root at (v - s) / g < 0: starting just above the ground at the landing, the search must find it.
    landing = ys[-1].detach()
    t_back, _ = INTERFACES[interface](_ball(gravity), landing + torch.tensor([1e-9, 0.0], dtype=F64),
                                      [exact, exact - 1.0], event_fn=lambda t, y: y[0], rtol=1e-10, atol=1e-10,
                                      **extra)
    s = math.sqrt(0.25 + 2 * 9.81 * 2.0)
    assert abs(t_back.item() - (0.5 - s) / 9.81) < 1e-8
    with pytest.raises(ValueError, match="return_stats"):
        INTERFACES[interface](_ball(gravity), y0, [0.0, 1.0], event_fn=lambda t, y: y[0], return_stats=True, **extra)
    with pytest.raises(ValueError, match=r"shape \(T,\)"):
        INTERFACES[interface](_ball(gravity), y0, torch.zeros(()), event_fn=lambda t, y: y[0], **extra)
