r"""Terminal events: integrate until :math:`g(t, y(t))` crosses zero, with a differentiable event time.

The event time :math:`t^*` solves :math:`g(t^*, y(t^*)) = 0`. The solver finds it on the accepted
steps: after each step it evaluates :math:`g` at the step's end, and once the sign has changed it
locates the root inside the step on the step's dense output (Illinois' regula falsi, to a few
units in the last place of :math:`t`). The search itself needs no gradients.

Gradients come from the implicit function theorem. Perturb the parameters :math:`\theta` of the
dynamics (or :math:`y_0`) and :math:`\phi` of :math:`g`: the event moves to :math:`t^* + \delta t`
with :math:`g(t^* + \delta t, y(t^* + \delta t)) = 0`, so to first order

.. math::

    \delta t = -\frac{\partial_y g \cdot \delta y(t^*) + \partial_\phi g \cdot \delta\phi}
                     {\partial_t g + \partial_y g \cdot f(t^*, y^*)}, \qquad
    \delta y_{\text{event}} = \delta y(t^*) + f(t^*, y^*)\, \delta t ,

where :math:`\delta y(t^*)` is the change of the solution at the fixed time :math:`t^*` (which
backpropagation through the solver, or the adjoint, provides). The denominator is :math:`dg/dt`
along the solution: the event must cross, not touch, :math:`g = 0`.
"""

from __future__ import annotations

import contextlib
import math
import sys
from typing import Callable, Optional, Tuple, Union

import torch
from torch import Tensor

from ._autograd import once_differentiable
from ._loop import SolverStats
from ._methods import solve
from ._odeint import _EVENT_SEARCH, State, _Setup, _TimeShift, odeint
from .adjoint import odeint_adjoint

__all__ = ["odeint_event"]

#: The steps a fixed-step event search may take unless ``options["max_num_steps"]`` says otherwise.
EVENT_MAX_STEPS = 10_000

_EPS = sys.float_info.epsilon
_SEARCH_KEYS = ("method", "rtol", "atol", "options")


class _Found(Exception):
    """Raised by the event hook to stop the integration at the event."""

    def __init__(self, theta: float, step, interpolate, index: int):
        super().__init__("event found")
        self.theta, self.step, self.interpolate, self.index = theta, step, interpolate, index


def odeint_event(
    func: Callable[[Tensor, State], State],
    y0: State,
    t0: Union[Tensor, float],
    *,
    event_fn: Callable[[Tensor, State], Tensor],
    reverse_time: bool = False,
    odeint_interface: Callable = odeint,
    **kwargs,
) -> Tuple[Tensor, State]:
    r"""Solve :math:`\dot y = f(t, y)` from ``(t0, y0)`` until ``event_fn(t, y)`` changes sign.

    The call mirrors torchdiffeq's ``odeint_event``. The event is the first time after ``t0``
    (before it, with ``reverse_time=True``) at which some entry of ``event_fn(t, y(t))`` has a sign
    other than the one it had at ``t0``: with a vector of event functions, the first to cross
    decides. The returned time is the last one before the crossing, within a few units in the last
    place of ``t``, so ``event_fn`` at the returned state still has its initial sign (to the
    interpolant's rounding), and a new search can start from there.

    Gradients: the event time and the state there are differentiable with respect to ``y0``,
    ``t0``, the parameters ``func`` uses, and those ``event_fn`` uses, by the implicit function
    theorem (module docstring). With ``odeint_interface=odeint`` they flow through the solver's
    operations up to the event's step, as for :func:`neuralode.odeint`; with
    :func:`~neuralode.odeint_adjoint`, the search runs without a graph and a second solve from
    ``t0`` to the event time provides the adjoint gradients (its state at the event agrees with the
    search's to the solve's tolerance). Second derivatives raise.

    Args:
        func: the dynamics ``func(t, y)``, as for :func:`neuralode.odeint`.
        y0: the initial state: a tensor of any shape ``(*S)`` or a tuple of such tensors.
        t0: the initial time: a number or a 0-d (or one-element) tensor.
        event_fn: ``event_fn(t, y)`` returns a tensor (any shape; each entry an event function),
            nonzero at ``(t0, y0)``; ``t`` is a 0-d tensor, ``y`` has ``y0``'s structure.
        reverse_time: integrate towards decreasing ``t``.
        odeint_interface: :func:`neuralode.odeint` (default) or :func:`neuralode.odeint_adjoint`.
        **kwargs: ``method``, ``rtol``, ``atol``, ``options`` (as for :func:`neuralode.odeint`;
            a fixed-step method needs ``options["step_size"]``, and the search gives up after
            ``options["max_num_steps"]`` steps, 10 000 by default for a fixed-step method);
            with ``odeint_adjoint`` also its own keywords (``adjoint_params``, ...).

    Returns:
        ``(event_t, ys)``: ``event_t`` a 0-d tensor (``t0``'s dtype when ``t0`` is a floating
        tensor, else ``y0``'s), ``ys`` the states at ``[t0, event_t]``, shape ``(2, *S)`` (a tuple
        of such for a tuple ``y0``), ``ys[0]`` being ``y0``.

    Raises:
        TypeError, ValueError: for bad arguments (``event_fn`` zero or not finite at ``t0``, an
            unknown keyword), naming the argument and the fix.
        RuntimeError: when no event occurs within the step budget (naming how far the search got), or
            when a gradient is requested at an event where :math:`dg/dt` along the solution is 0.
    """
    if odeint_interface is not odeint and odeint_interface is not odeint_adjoint:
        raise TypeError("odeint_event: odeint_interface must be neuralode.odeint or neuralode.odeint_adjoint, got "
                        f"{getattr(odeint_interface, '__name__', odeint_interface)!r}.")
    adjoint = odeint_interface is odeint_adjoint
    if not callable(event_fn):
        raise TypeError(f"odeint_event: event_fn must be callable as event_fn(t, y), got {type(event_fn).__name__}.")
    if not isinstance(reverse_time, bool):
        raise TypeError(f"odeint_event: reverse_time must be True or False, got {reverse_time!r}.")
    unknown = sorted(set(kwargs) - set(_SEARCH_KEYS)) if not adjoint else []
    if unknown:
        raise TypeError(f"odeint_event: unexpected keyword(s) {unknown} with odeint_interface=odeint; it takes "
                        f"{list(_SEARCH_KEYS)}.")
    t0_value = _check_t0(t0)
    direction = -1.0 if reverse_time else 1.0
    search = {key: kwargs[key] for key in _SEARCH_KEYS if key in kwargs}
    search.setdefault("method", "dopri5")
    setup = _Setup(func, y0, [t0_value, t0_value + direction], search["method"], search.get("rtol", 1e-7),
                   search.get("atol", 1e-9), search.get("options"))
    options = dict(setup.options)
    if not setup.method.adaptive:
        if options.get("step_size") is None:
            raise ValueError("odeint_event: a fixed-step method needs options['step_size'] for an event search "
                             "(the grid cannot come from output times); give one, or use an adaptive method.")
        if options.get("max_num_steps") is None:
            options["max_num_steps"] = EVENT_MAX_STEPS
    t_dtype = t0.dtype if isinstance(t0, Tensor) and t0.is_floating_point() else setup.dtype
    t_device = t0.device if isinstance(t0, Tensor) else setup.device

    def g(s, y: Tensor) -> Tensor:
        """event_fn on the engine's state, flattened to a 1-D tensor."""
        out = event_fn(setup.time(s), setup.structure(y))
        if not isinstance(out, Tensor) or not out.is_floating_point() or out.numel() == 0:
            raise TypeError("odeint_event: event_fn(t, y) must return a non-empty floating-point tensor, got "
                            f"{type(out).__name__ if not isinstance(out, Tensor) else f'dtype {out.dtype}, shape {tuple(out.shape)}'}.")
        return out.reshape(-1)

    stats = SolverStats()
    dynamics = setup.dynamics(stats)
    y_start = setup.y_start
    time_grad = (not adjoint and isinstance(t0, Tensor) and t0.requires_grad and torch.is_grad_enabled())
    if time_grad:  # as odeint: dy/dt0 = -dy/dy0 f(t0, y0)
        with torch.no_grad():
            f0 = dynamics(t0_value, y_start)
        y_start = _TimeShift.apply(y_start, t0.reshape(()), -f0)
    with torch.no_grad():
        values = g(t0_value, y_start)
        if not bool(torch.isfinite(values).all()):
            raise ValueError(f"odeint_event: event_fn(t0, y0) is not finite: {values.tolist()[:6]}.")
        if bool((values == 0).any()):
            raise ValueError(f"odeint_event: event_fn(t0, y0) has an entry equal to 0 ({values.tolist()[:6]}): the "
                             "event holds at t0 already. Start off the event surface (e.g. just past it).")
        values = values.detach()
        signs = torch.sign(values)

    def crossing(s, y) -> Tuple[float, int]:
        """min over the entries of sign0 * g: positive until the first entry crosses; and its index."""
        with torch.no_grad():
            c = g(s, y) * signs
            i = int(torch.argmin(c))
            return float(c[i]), i

    previous = [float((values * signs).min())]

    def hook(step, interpolate) -> None:
        c1, index = crossing(step.t1, step.y1)
        if c1 > 0:
            previous[0] = c1
            return
        theta, index = _root(lambda th: crossing(step.t + th * step.h, interpolate([th])[0]), previous[0], c1,
                             index, 4 * _EPS * max(abs(step.t), abs(step.t1), abs(step.h)) / abs(step.h))
        raise _Found(theta, step, interpolate, index)

    callbacks = setup.callbacks()
    callbacks["on_accept"] = callbacks.get("on_accept", ()) + (hook,)
    try:
        with torch.no_grad() if adjoint else contextlib.nullcontext():
            solve(setup.method, dynamics, y_start, [t0_value, direction * math.inf], rtol=setup.rtol,
                  atol=setup.atol, norm=setup.norm, options=options, stats=stats, shape=setup.shape, **callbacks)
    except _Found as found:
        event = found
    except RuntimeError as exc:
        raise RuntimeError(f"odeint_event: no event found: event_fn(t, y) kept the signs it had at t0={t0_value:.6g}. "
                           f"{exc}") from exc
    else:  # pragma: no cover - the loop only ends at an infinite time by raising
        raise AssertionError("the event search ended without an event")

    step, theta = event.step, event.theta
    t_star = step.t + theta * step.h
    t_value = torch.tensor(t_star, dtype=t_dtype, device=t_device)
    if adjoint:
        t_pair = torch.stack([t0.reshape(()).to(t_dtype), t_value]) if isinstance(t0, Tensor) else \
            torch.tensor([t0_value, t_star], dtype=torch.float64)
        ys = odeint_adjoint(func, y0, t_pair, **kwargs)
        y_star = setup.flatten([y[-1] for y in ys]) if setup.is_tuple else ys[-1]
    else:
        y_star = step.y1 if theta == 1.0 else event.interpolate([theta])[0]
    if torch.is_grad_enabled():
        t_value, y_star = _implicit(setup, g, dynamics, event.index, t_star, t_value, y_star)
    return t_value, setup.stack(torch.stack([setup.y_start, y_star]))


# odeint(..., event_fn=...) and odeint_adjoint(..., event_fn=...), torchdiffeq's form, search with odeint_event.
_EVENT_SEARCH[:] = [odeint_event]


def _check_t0(t0) -> float:
    if isinstance(t0, Tensor):
        if t0.numel() != 1 or t0.is_complex() or t0.dtype == torch.bool:
            raise ValueError(f"odeint_event: t0 must be a number or a one-element real tensor, got shape "
                             f"{tuple(t0.shape)} and dtype {t0.dtype}.")
        value = float(t0.detach().reshape(()))
    elif isinstance(t0, (int, float)) and not isinstance(t0, bool):
        value = float(t0)
    else:
        raise TypeError(f"odeint_event: t0 must be a number or a one-element tensor, got {type(t0).__name__}.")
    if not math.isfinite(value):
        raise ValueError(f"odeint_event: t0 must be finite, got {value}.")
    return value


def _root(c: Callable[[float], Tuple[float, int]], ca: float, cb: float, index: int, tol: float) -> Tuple[float, int]:
    """The crossing of ``c`` on ``[0, 1]`` (``c(0) = ca > 0 >= c(1) = cb``): Illinois' regula falsi,
    with a bisection whenever two steps did not halve the bracket. Returns the bracket's left end
    ``a`` (``c(a) > 0``) once the bracket is narrower than ``tol``, and the index of the entry that
    crossed at its right end."""
    a, b, side, widths = 0.0, 1.0, 0, []
    for _ in range(200):
        width = b - a
        if width <= tol:
            break
        stalled = len(widths) >= 2 and width > 0.5 * widths[-2]
        m = 0.5 * (a + b) if stalled else a + width * ca / (ca - cb)
        if not a < m < b:
            m = 0.5 * (a + b)
        widths.append(width)
        cm, i = c(m)
        if cm > 0:
            a, ca = m, cm
            if side == 1:
                cb *= 0.5  # Illinois: the right end stayed twice; pull the secant towards it
            side = 1
        else:
            b, cb, index = m, cm, i
            if side == -1:
                ca *= 0.5
            side = -1
    return a, index


def _implicit(setup, g, dynamics, index: int, t_star: float, t_value: Tensor, y_star: Tensor):
    r"""``(t*, y*)`` with the implicit function theorem's gradients (module docstring), when
    anything upstream requires grad; unchanged otherwise."""
    g_graph = g(t_value.detach().to(setup.dtype), y_star)[index]
    if not g_graph.requires_grad and not y_star.requires_grad:
        return t_value, y_star  # nothing upstream to differentiate: skip the partial derivatives
    t_leaf = torch.tensor(t_star, dtype=setup.dtype, device=setup.device, requires_grad=True)
    y_leaf = y_star.detach().requires_grad_(True)
    with torch.enable_grad():
        value = g(t_leaf, y_leaf)[index]
        dg_dt, dg_dy = torch.autograd.grad(value, (t_leaf, y_leaf), allow_unused=True)
    with torch.no_grad():
        f_star = dynamics(t_star, y_star.detach())
        rate = (torch.zeros((), dtype=setup.dtype, device=setup.device) if dg_dt is None else dg_dt)
        if dg_dy is not None:
            rate = rate + (dg_dy * f_star).sum()
    if not bool(torch.isfinite(rate)) or float(rate) == 0.0:
        raise RuntimeError(f"odeint_event: d/dt event_fn(t, y(t)) = {float(rate):.3g} at the event t={t_star:.6g} "
                           "(a tangential touch, or an event function with zero slope there), so the event time is "
                           "not differentiable. Use an event function that crosses zero with a nonzero slope, or "
                           "detach what you differentiate.")
    return _Reroute.apply(t_value, y_star, g_graph, rate, f_star)


class _Reroute(torch.autograd.Function):
    r"""Identity on ``(t*, y*)``; backward: with :math:`c = \bar t + \bar y \cdot f`, the gradient
    :math:`-c / (dg/dt)` goes to ``g(t*, y*)`` (and so to ``y*`` and ``event_fn``'s parameters),
    and :math:`\bar y` to ``y*`` itself."""

    @staticmethod
    def forward(ctx, t_value, y_star, g_graph, rate, f_star):
        ctx.save_for_backward(rate, f_star)
        ctx.t_dtype = t_value.dtype
        return t_value.clone(), y_star.clone()

    @staticmethod
    @once_differentiable(
        "odeint_event: the event time's gradient cannot be differentiated twice (create_graph=True): it comes "
        "from the implicit function theorem with dg/dt and f taken as constants.")
    def backward(ctx, grad_t, grad_y):
        rate, f_star = ctx.saved_tensors
        c = grad_t.to(rate.dtype) + (grad_y * f_star).sum()
        return None, grad_y, -c / rate, None, None
