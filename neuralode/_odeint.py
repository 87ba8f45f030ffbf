"""The front door: :func:`odeint` validates its input, flattens tuple states and runs the engine."""

from __future__ import annotations

import math
import numbers
from typing import Callable, NamedTuple, Optional, Sequence, Tuple, Union

import torch
from torch import Tensor

from ._autograd import Refuse, refuse_double_backward
from ._loop import CONTROLLERS, INTERPOLANTS, NORMS, SolverStats, max_norm, per_sample_norm, rms_norm
from ._methods import METHODS, REGISTRY, Method, solve
from ._rosenbrock import JACOBIANS

__all__ = ["odeint", "METHODS", "SolverStats"]

#: The method ``odeint`` uses when ``method`` is not given, or is ``None`` (as torchdiffeq's).
DEFAULT_METHOD = "dopri5"

State = Union[Tensor, Tuple[Tensor, ...]]


def _check_state(y0) -> Tuple[Tensor, ...]:
    is_tuple = isinstance(y0, (tuple, list))
    parts = tuple(y0) if is_tuple else (y0,)
    if is_tuple and not parts:
        raise ValueError("odeint: y0 is an empty tuple; pass a tensor or a non-empty tuple of tensors.")
    for i, part in enumerate(parts):
        name = f"y0[{i}]" if is_tuple else "y0"
        if not isinstance(part, Tensor):
            raise TypeError(f"odeint: {name} must be a torch.Tensor, got {type(part).__name__}; "
                            "wrap numbers with torch.tensor(..., dtype=torch.float64).")
        if not part.is_floating_point():
            raise TypeError(f"odeint: {name} has dtype {part.dtype}, but the state must be floating point; "
                            f"convert it, e.g. {name}.to(torch.float32).")
    first = parts[0]
    for i, part in enumerate(parts[1:], start=1):
        if part.dtype != first.dtype or part.device != first.device:
            raise ValueError(f"odeint: every tensor of a tuple state must share y0[0]'s dtype and device "
                             f"({first.dtype}, {first.device}); y0[{i}] is {part.dtype} on {part.device}.")
    return parts


def _check_times(t) -> list:
    if isinstance(t, Tensor):
        if t.is_complex() or t.dtype == torch.bool:
            raise TypeError(f"odeint: t must hold real numbers, got dtype {t.dtype}.")
        times = t if t.is_floating_point() else t.to(torch.float64)  # a float's own value is exact in float64
    else:
        try:
            times = torch.as_tensor(t, dtype=torch.float64)
        except (TypeError, ValueError, RuntimeError) as exc:
            raise TypeError(f"odeint: t must be a 1-D tensor or sequence of numbers ({exc}).") from None
    if times.dim() != 1 or times.numel() == 0:
        raise ValueError(f"odeint: t must be 1-D with at least one time, got shape {tuple(times.shape)}.")
    times = times.tolist()  # Python floats (float64); the checks below run on the host, without kernels
    if not all(map(math.isfinite, times)):
        raise ValueError("odeint: t contains NaN or inf; give finite output times.")
    if len(times) > 1:
        steps = [b - a for a, b in zip(times[:-1], times[1:])]
        if not (all(s > 0 for s in steps) or all(s < 0 for s in steps)):
            bad = next(i for i, s in enumerate(steps) if (s > 0) != (steps[0] > 0) or s == 0)
            raise ValueError(
                "odeint: t must be strictly increasing or strictly decreasing; "
                f"t[{bad}]={times[bad]:.6g} and t[{bad + 1}]={times[bad + 1]:.6g} break the order. "
                "Sort the times (and drop duplicates)."
            )
    return times


def _check_options(method: str, options: Optional[dict], prefix: str = "") -> dict:
    defaults = REGISTRY[method].defaults
    name = prefix + "options"
    options = {} if options is None else options
    if not isinstance(options, dict):
        raise TypeError(f"odeint: {name} must be a dict, got {type(options).__name__}.")
    unknown = sorted(set(options) - set(defaults))
    if unknown:
        raise ValueError(f"odeint: unknown option(s) {unknown} in {name} for method {method!r}; "
                         f"valid options are {sorted(defaults)}.")
    merged = {**defaults, **options}
    if "controller" in merged and merged["controller"] not in CONTROLLERS:
        raise ValueError(f"odeint: {name}['controller'] must be one of {CONTROLLERS}, "
                         f"got {merged['controller']!r}.")
    if "jacobian" in merged and merged["jacobian"] not in JACOBIANS:
        raise ValueError(f"odeint: {name}['jacobian'] must be one of {JACOBIANS} (\"batched\" only for a "
                         f"(B, D) state whose rows evolve independently), got {merged['jacobian']!r}.")
    # Each bound keeps the step-size controller from spinning to max_num_steps: h must be able to
    # grow (ifactor >= 1) and shrink after a rejection (dfactor < 1), and some h must be allowed.
    bounds = {
        "step_size": (lambda v: v > 0, "must be positive"),
        "first_step": (lambda v: v > 0, "must be positive"),
        "max_step": (lambda v: v > 0, "must be positive"),
        "max_num_steps": (lambda v: v > 0 and v == int(v), "must be a positive integer"),
        "min_step": (lambda v: 0 <= v < math.inf, "must be finite and >= 0"),
        "safety": (lambda v: 0 < v <= 1, "must lie in (0, 1]: it scales every proposed step down (default 0.9)"),
        "ifactor": (lambda v: v >= 1, "must be >= 1: it is the largest growth of h in one step (default 10); "
                                      "below 1 the step could never grow"),
        "dfactor": (lambda v: 0 < v < 1, "must lie in (0, 1): it is the largest shrink of h in one step "
                                         "(default 0.2); at 1 a rejected step is retried with the same h forever"),
    }
    norm = merged.get("norm")
    if norm is not None and not callable(norm) and norm not in NORMS:
        raise ValueError(f"odeint: {name}['norm'] must be None (RMS; per part for a tuple state), one of {NORMS} "
                         f"or a callable norm(x) -> scalar taking the scaled error in y0's structure, got {norm!r}.")
    for key in ("step_t", "jump_t"):
        if merged.get(key) is not None:
            merged[key] = _check_stop_times(f"{name}[{key!r}]", merged[key])
    if "interp" in merged and merged["interp"] not in INTERPOLANTS:
        raise ValueError(f"odeint: {name}['interp'] must be one of {INTERPOLANTS} (how outputs between grid points "
                         f"are interpolated), got {merged['interp']!r}.")
    if merged.get("dtype") is not None and merged["dtype"] not in (torch.float32, torch.float64):
        raise ValueError(f"odeint: {name}['dtype'] (torchdiffeq's dtype of time) must be torch.float64 or "
                         f"torch.float32, got {merged['dtype']!r}; time is held in float64 either way.")
    if "perturb" in merged and not isinstance(merged["perturb"], bool):
        raise TypeError(f"odeint: {name}['perturb'] must be True or False, got {merged['perturb']!r}.")
    if merged.get("grid_constructor") is not None:
        if not callable(merged["grid_constructor"]):
            raise TypeError(f"odeint: {name}['grid_constructor'] must be callable as grid_constructor(func, y0, t), "
                            f"got {type(merged['grid_constructor']).__name__}.")
        if merged.get("step_size") is not None:
            raise ValueError(f"odeint: give {name}['step_size'] or {name}['grid_constructor'], not both: each "
                             "defines the step grid.")
    for key, value in merged.items():
        if value is None or key in ("controller", "jacobian", "norm", "step_t", "jump_t", "interp", "perturb",
                                    "grid_constructor", "dtype"):
            continue
        if not isinstance(value, numbers.Real) or isinstance(value, bool) or math.isnan(value):
            raise TypeError(f"odeint: {name}[{key!r}] must be a real number, got {value!r}.")
        check, rule = bounds[key]
        if not check(value):
            raise ValueError(f"odeint: {name}[{key!r}] {rule}, got {value!r}.")
    if merged.get("step_size") is not None and not math.isfinite(merged["step_size"]):
        raise ValueError(f"odeint: {name}['step_size'] must be finite.")
    for key in ("max_step", "first_step"):
        if merged.get(key) is not None and merged[key] < merged.get("min_step", 0.0):
            raise ValueError(f"odeint: {name}[{key!r}]={merged[key]!r} must be >= {name}['min_step']="
                             f"{merged['min_step']!r}; lower min_step or raise {key}.")
    return merged


def _check_stop_times(name: str, value) -> list:
    """``options["step_t"]`` or ``["jump_t"]``: finite times, as a list of floats (any order)."""
    try:
        times = torch.as_tensor(value.detach().cpu() if isinstance(value, Tensor) else value, dtype=torch.float64)
    except (TypeError, ValueError, RuntimeError) as exc:
        raise TypeError(f"odeint: {name} must be a 1-D tensor or sequence of times ({exc}).") from None
    if times.dim() > 1 or not bool(torch.isfinite(times).all()):
        raise ValueError(f"odeint: {name} must be a 1-D collection of finite times, got shape {tuple(times.shape)}.")
    return times.reshape(-1).tolist()


def _check_tolerance(name: str, value):
    """A tolerance: a real number, a tensor, or a tuple of those (one per part of a tuple state),
    every entry finite and >= 0. Returns a float, a detached tensor, or a
    tuple of those; :meth:`_Setup.tolerance` lays a tensor out like the state."""
    if isinstance(value, (tuple, list)):
        if not value:
            raise ValueError(f"odeint: {name} is an empty tuple; give a number, or one tolerance per part of y0.")
        return tuple(_check_tolerance(f"{name}[{i}]", v) for i, v in enumerate(value))
    if isinstance(value, Tensor):
        if not value.is_floating_point():
            raise TypeError(f"odeint: {name} must be a real number or a floating-point tensor, got dtype {value.dtype}.")
        value = value.detach()
        bad = ~torch.isfinite(value) | (value < 0)
        if bool(bad.any()):
            raise ValueError(f"odeint: every entry of {name} must be finite and >= 0, "
                             f"got {value.flatten()[bad.flatten()][:3].tolist()}.")
        return value
    if not isinstance(value, numbers.Real) or isinstance(value, bool):
        raise TypeError(f"odeint: {name} must be a real number, a tensor or a tuple of those (one per part of a "
                        f"tuple y0), got {type(value).__name__}.")
    if not value >= 0 or not math.isfinite(value):
        raise ValueError(f"odeint: {name} must be a finite number >= 0, got {value!r}.")
    return float(value)


def _zero_entries(tol) -> list:
    """Per tolerance entry (a float, or each element of a tensor, through nested tuples): is it zero?"""
    if isinstance(tol, tuple):
        return [z for t in tol for z in _zero_entries(t)]
    return (tol == 0).flatten().tolist() if isinstance(tol, Tensor) else [tol == 0]


def _all_zero(tol) -> bool:
    return all(_zero_entries(tol))


def _any_zero(tol) -> bool:
    return any(_zero_entries(tol))


class _Solver(NamedTuple):
    """A validated method with its tolerances and options (everything a solve needs but the state)."""

    method: Method
    rtol: Union[float, Tensor, tuple]
    atol: Union[float, Tensor, tuple]
    options: dict


# Validated solvers by their arguments, when those are plain values (see _plain_key): a sampling loop
# that calls odeint with the same arguments again and again validates them once.
_SOLVERS: dict = {}
_PLAIN = frozenset((str, float, int, bool, type(None)))


def _plain_key(method, rtol, atol, options, prefix: str):
    """A key that determines :func:`_check_solver`'s result, or ``None`` when an argument is not a
    plain number, string or ``None`` (a tensor tolerance can change in place; a callable option is
    not worth it). The key holds the numbers' types: ``True == 1 == 1.0``, but only some of them are
    valid. (An option name that is not a string is never valid, so it never finds a key.)"""
    if options is None:
        items, types = (), ()
    elif type(options) is dict:
        items, types = tuple(options.items()), tuple(map(type, options.values()))
    else:
        return None
    key = (prefix, method, type(rtol), rtol, type(atol), atol, items, types)
    plain = _PLAIN.issuperset(types) and type(method) in _PLAIN and type(rtol) in _PLAIN and type(atol) in _PLAIN
    return key if plain else None


def _check_solver(method, rtol, atol, options, prefix: str = "") -> _Solver:
    """Check a method name, its tolerances and options; ``prefix`` names the arguments
    (``"adjoint_"`` for the adjoint's backward solve). Arguments that passed before, with the same
    registry entry for the method, are not checked again (nothing that fails is remembered)."""
    key = _plain_key(method, rtol, atol, options, prefix)
    if key is not None:
        solver = _SOLVERS.get(key)
        if solver is not None and REGISTRY.get(DEFAULT_METHOD if method is None else method) is solver.method:
            return _Solver(solver.method, solver.rtol, solver.atol, dict(solver.options))  # the caller may add to it
    solver = _check_solver_uncached(method, rtol, atol, options, prefix)
    if key is not None:
        if len(_SOLVERS) >= 256:
            _SOLVERS.clear()
        _SOLVERS[key] = _Solver(solver.method, solver.rtol, solver.atol, dict(solver.options))
    return solver


def _check_solver_uncached(method, rtol, atol, options, prefix: str) -> _Solver:
    if method is None:  # torchdiffeq's spelling of the default method
        method = DEFAULT_METHOD
    if not isinstance(method, str) or method not in REGISTRY:
        raise ValueError(f"odeint: unknown {prefix}method {method!r}; choose one of {', '.join(METHODS)}.")
    tableau = REGISTRY[method].tableau
    rtol = _check_tolerance(prefix + "rtol", rtol)
    atol = _check_tolerance(prefix + "atol", atol)
    if tableau.adaptive and _all_zero(rtol) and _all_zero(atol):
        raise ValueError(f"odeint: {prefix}rtol and {prefix}atol cannot both be 0 for an adaptive method.")
    if tableau.adaptive and _any_zero(atol):
        # A component that is 0 (common: zero-initialised augmented states, the adjoint's a_theta)
        # has error scale atol + rtol*|y| = 0; the error ratio is NaN and every step is rejected.
        raise ValueError(f"odeint: {prefix}atol must be > 0 for an adaptive method: a state component that "
                         f"is 0 has error scale {prefix}atol + {prefix}rtol*|y| = 0, so no step could be accepted. "
                         f"Give a small absolute tolerance, e.g. {prefix}atol=1e-9 (1e-6 in float32).")
    return _Solver(REGISTRY[method], rtol, atol, _check_options(method, options, prefix))


# The event search behind ``odeint(..., event_fn=...)`` and ``odeint_adjoint(..., event_fn=...)``:
# neuralode.events registers its odeint_event here when it is imported (as the package does), since
# the search is built on odeint and odeint cannot import it.
_EVENT_SEARCH: list = []


def _search_event(caller: str, func, y0, t, event_fn, return_stats: bool, **kwargs):
    """torchdiffeq's ``odeint(..., event_fn=...)``: :func:`neuralode.odeint_event` from ``t[0]``."""
    if return_stats:
        raise ValueError(f"{caller}: return_stats=True is not available with event_fn; call it without, or "
                         "count evaluations in func.")
    if not _EVENT_SEARCH:
        raise RuntimeError(f"{caller}: event_fn needs neuralode.events; import neuralode (not only its submodules).")
    if isinstance(t, Tensor):
        if t.dim() != 1 or len(t) == 0:
            raise ValueError(f"{caller}: with event_fn, t must have shape (T,) with T >= 1 (t[0] is the start), "
                             f"got shape {tuple(t.shape)}.")
    elif not isinstance(t, Sequence) or len(t) == 0:
        raise ValueError(f"{caller}: with event_fn, t must be a sequence of times starting at t[0], got {t!r}.")
    reverse = len(t) > 1 and float(t[1]) < float(t[0])
    return _EVENT_SEARCH[0](func, y0, t[0], event_fn=event_fn, reverse_time=reverse, **kwargs)


def odeint(
    func: Callable[[Tensor, State], State],
    y0: State,
    t: Union[Tensor, Sequence[float]],
    *,
    method: Optional[str] = "dopri5",
    rtol: float = 1e-7,
    atol: float = 1e-9,
    options: Optional[dict] = None,
    event_fn: Optional[Callable[[Tensor, State], Tensor]] = None,
    return_stats: bool = False,
):
    r"""Solve the initial value problem :math:`\dot y = f(t, y)`, :math:`y(t_0) = y_0`.

    The solution is :math:`y(t_i) = y_0 + \int_{t_0}^{t_i} f(s, y(s))\, ds`, reported at every
    time in ``t``; the call mirrors torchdiffeq's ``odeint`` so code moves between the two.

    Gradients flow through the solver's operations (backpropagation through the solver) to ``y0``
    and the tensors ``func`` uses; second derivatives (``create_graph=True``) work through the
    explicit methods and raise a ``RuntimeError`` through ``"rodas4"``. When ``t`` requires grad,
    ``t.grad`` is the exact solution's time derivative, evaluated on the computed solution: with
    :math:`g_i = \partial L/\partial y(t_i)`,

    .. math::

        \frac{dL}{dt_i} = g_i \cdot f(t_i, y_i) \;(i \ge 1), \qquad
        \frac{dL}{dt_0} = -a(t_0) \cdot f(t_0, y_0),

    where :math:`a(t_0)` is the gradient reaching ``y0`` through the solve (not :math:`g_0`:
    ``ys[0]`` is ``y0`` whatever :math:`t_0`). It costs ``T`` more evaluations of ``func``, agrees
    with torchdiffeq and :func:`~neuralode.odeint_adjoint` for adaptive methods, and, for a
    fixed-step solve, differs from the derivative of the discrete map (whose grid moves with ``t``)
    by the method's error, like the solution itself. A second derivative that reaches ``t`` raises
    (the solve's backward takes the times as constants); those reaching only ``y0`` and the
    parameters still work.

    Args:
        func: the dynamics, ``func(t, y)``; ``t`` is a 0-d tensor with ``y``'s dtype and device,
            ``y`` has ``y0``'s structure and shapes, and the result must too.
        y0: the initial state at ``t[0]``: a floating-point tensor of any shape ``(*S)``, or a
            tuple of such tensors (same dtype and device).
        t: output times, shape ``(T,)``, strictly increasing or strictly decreasing (integrate
            backwards in time). ``t[0]`` is the initial time.
        method: one of :data:`METHODS` (``None`` means the default, ``"dopri5"``, as in
            torchdiffeq): fixed-step ``"euler"`` (order 1), ``"midpoint"`` (2), ``"heun2"`` (2),
            ``"heun3"`` (Heun's third-order method, 3), ``"rk4"`` (4, the classical scheme) and
            ``"rk4_38"`` (4, Kutta's 3/8 rule, which is what torchdiffeq calls ``"rk4"``: use it
            to reproduce torchdiffeq's ``"rk4"``); adaptive embedded pairs ``"adaptive_heun"``
            (2(1)), ``"bosh3"`` (Bogacki-Shampine 3(2)), ``"dopri5"`` (Dormand-Prince 5(4), the
            default) and ``"tsit5"`` (Tsitouras 5(4)); for stiff problems the linearly implicit
            ``"rodas4"`` (Hairer-Wanner's RODAS, a Rosenbrock method of order 4(3), L-stable and
            stiffly accurate: each step factorises ``W = I - h/4 J`` with the exact Jacobian
            ``J = df/dy`` from autograd, so its steps are not limited by stability).
        rtol, atol: relative and absolute tolerances of the adaptive methods: a step is accepted
            when ``y_{n+1}`` is finite and the norm (``options["norm"]``, by default the RMS) of
            ``err / (atol + rtol * max(|y_n|, |y_{n+1}|))`` is at most 1. Each is a number, a tensor
            that broadcasts to ``y0`` (one tolerance per component), or, for a tuple ``y0``, a tuple
            with one such tolerance per part (as torchdiffeq's). ``atol`` must be positive (a zero
            component would have scale 0). The default norm averages over every entry of the state,
            so for a batch of independent samples the tolerance bounds the batch's average error,
            not each sample's: see ``options["norm"]``.
        options: fixed-step methods: ``step_size`` (default: step exactly between the times in
            ``t``), or ``grid_constructor`` (``grid_constructor(func, y0, t)`` returns the step grid,
            from ``t[0]`` to ``t[-1]``; ``t`` a float64 tensor), ``interp`` (outputs inside a step:
            ``"cubic"``, the default, Hermite interpolation through the step's ends and slopes;
            ``"linear"``, torchdiffeq's default, the chord), ``perturb`` (``True``: every step
            evaluates ``f`` just after its start and just before its end, so a jump of ``f`` on a grid
            point is seen from the right side), ``max_num_steps`` (default: no limit). Adaptive
            methods: ``first_step`` (default: Hairer's automatic choice), ``max_step``,
            ``min_step`` (``min_step <= first_step, max_step``), ``max_num_steps`` (default
            10 000), ``safety`` (0.9, in (0, 1]), ``ifactor`` (10, at least 1), ``dfactor`` (0.2,
            in (0, 1)), ``controller`` (``"i"``, the classical controller, or
            ``"pi"``, proportional-integral control, which smooths the step sizes), ``norm``
            (the error norm: ``None``, the default, is the RMS over every entry of the state, each
            part of a tuple state separately with the worst deciding; for a batch of independent
            samples of shape ``(B, D)`` that averages over the batch, so one hard sample's error
            can reach about ``sqrt(B)`` times the tolerance; ``"per_sample"`` takes the largest
            RMS over the samples (the leading dimension) instead, ``"max"`` the largest entry, and
            a callable ``norm(x) -> scalar`` gets the scaled error in ``y0``'s structure, as
            torchdiffeq's ``options["norm"]``), ``step_t`` (times the steps land on) and
            ``jump_t`` (times where ``f`` jumps: steps land on them, the step ending there evaluates
            ``f`` just before, and the next starts afresh just after, with no FSAL reuse across),
            ``dtype`` (torchdiffeq's dtype of time, accepted so its code runs: time is held as a
            float64 number whatever it says).
            ``"rodas4"`` takes the adaptive options and ``jacobian``: ``"full"`` (default, the
            ``N x N`` Jacobian of the whole state) or ``"batched"`` (a state of shape ``(B, D)``
            whose rows evolve independently, e.g. a batch through one network: ``B`` blocks of
            ``D x D`` from ``D`` vector-Jacobian products, batched LU; coupled rows give a wrong
            Jacobian and lose the method's order).
        event_fn: torchdiffeq's form of an event search: solve from ``t[0]`` (towards ``t[1]``'s
            side when ``t`` has a second time; later times are ignored) until ``event_fn(t, y)``
            changes sign, and return ``(event_t, ys)`` with ``ys`` the states at ``[t[0], event_t]``.
            It is :func:`neuralode.odeint_event`, gradients included (torchdiffeq's ``odeint``
            leaves the event time's dependence out of them; use its ``odeint_event`` there).
        return_stats: also return a :class:`SolverStats` (function evaluations, accepted and
            rejected steps, step times; for ``"rodas4"`` also Jacobians, LU factorisations and
            linear solves). Not with ``event_fn``.

    Returns:
        ``ys`` of shape ``(T, *S)`` (a tuple of such for a tuple ``y0``), with ``ys[0] == y0``;
        ``(ys, stats)`` when ``return_stats`` is true; ``(event_t, ys)`` with ``event_fn``.

    Raises:
        TypeError, ValueError: for bad arguments, naming the argument and the fix.
        RuntimeError: when the step size underflows or ``max_num_steps`` is exhausted, or (for
            ``"rodas4"``) when ``W`` stays singular after halving the step five times, or under
            ``torch.inference_mode()`` when ``func`` uses inference tensors (``rodas4`` needs
            autograd for its Jacobian: use ``torch.no_grad()``); when a gradient that cannot be
            differentiated twice is (see above).
        FloatingPointError: when the solution becomes NaN or inf (a step whose new state is not
            finite is never accepted; the error names the time). A fixed-step solve checks its
            outputs once and, only when one is not finite, runs again with a check at every step to
            name the time: a random or stateful ``func`` sees those evaluations too, and when the
            second run does not go non-finite in the same place the error names the interval
            between two output times instead (see ``neuralode._loop.FixedSteps``).
    """
    if event_fn is not None:
        return _search_event("odeint", func, y0, t, event_fn, return_stats, method=method, rtol=rtol, atol=atol,
                             options=options)
    setup = _Setup(func, y0, t, method, rtol, atol, options)
    stats = SolverStats()
    dynamics = setup.dynamics(stats)
    y_start = setup.y_start
    time_grad = isinstance(t, Tensor) and t.requires_grad and torch.is_grad_enabled()
    if time_grad:
        # Moving t_0 slides the start along the trajectory: y(t_i; t_0, y0) = y(t_i; t_0 + e,
        # y0 + e f(t_0, y0)) to first order, so dy(t_i)/dt_0 = -dy(t_i)/dy0 f(t_0, y0). Starting the
        # engine from y0 with dy0/dt_0 = -f(t_0, y0) lets backprop form -a(t_0) . f(t_0, y0).
        with torch.no_grad():
            f0 = dynamics(setup.times[0], y_start)
        y_start = _TimeShift.apply(y_start, t[0], -f0)
    ys = solve(setup.method, dynamics, y_start, setup.times, rtol=setup.rtol, atol=setup.atol,
               norm=setup.norm if setup.method.adaptive else None, options=setup.options, stats=stats,
               shape=setup.shape, **setup.callbacks())
    if time_grad:
        # y(t_i) moves along f as t_i moves: dy(t_i)/dt_i = f(t_i, y_i) for i >= 1; ys[0] is y0
        # itself, whatever t_0 (its gradient must not reach t_0).
        with torch.no_grad():
            slopes = torch.stack([torch.zeros_like(f0)] + [dynamics(s, y) for s, y in zip(setup.times[1:], ys[1:])])
        ys = _TimeShift.apply(torch.cat([setup.y_start.unsqueeze(0), ys[1:]]), t, slopes)
    result = setup.stack(ys)
    return (result, stats) if return_stats else result


_TIME_TWICE = (
    "odeint: the time gradient (t.requires_grad) cannot be differentiated twice (create_graph=True: gradient "
    "penalties, Hessian-vector products, gradgradcheck): it is g . f(t, y) with f taken as a constant. For "
    "higher-order gradients with respect to y0 and the parameters, pass a t that does not require grad.")


class _TimeShift(torch.autograd.Function):
    r"""``y`` unchanged, with the derivative ``dy/dt = v`` (``v`` a fixed tensor): the gradient
    ``g`` of ``y`` reaches ``t`` as :math:`g \cdot v`. Shapes: ``t`` is ``()`` and ``y``, ``v`` any
    shape; or ``t`` is ``(T,)`` and ``y``, ``v`` are ``(T, ...)``, one dot product per row."""

    @staticmethod
    def forward(ctx, y, t, v):
        ctx.save_for_backward(v, t)
        return y.view_as(y)

    @staticmethod
    def backward(ctx, g):
        v, t = ctx.saved_tensors
        grad_t = None
        if ctx.needs_input_grad[1]:
            with torch.no_grad():
                rows = (g * v).reshape(t.numel(), -1).sum(1)
                grad_t = rows.reshape(t.shape).to(dtype=t.dtype, device=t.device)
            # v is a constant here, so d(grad_t)/d(y, theta, t) would miss terms: refuse it.
            (grad_t,) = refuse_double_backward(_TIME_TWICE, grad_t)
            if torch.is_grad_enabled():
                # create_graph=True. The solve's own backward took the times as constants, so a
                # second derivative reaching t would miss terms too. Tie g to t through a node
                # that raises: autograd runs it only when a second backward asks for t's gradient,
                # so second derivatives with respect to y0 and the parameters stay available.
                (tie,) = Refuse.apply(_TIME_TWICE, t)
                g = g + 0 * tie.sum()
        return g, grad_t, None


class _Setup:
    """A validated call: the state's structure, the times, the method and its options.

    A tuple state is carried as one flat tensor; ``flat=True`` flattens a single tensor too (the
    adjoint augments the state and needs it 1-D). ``dynamics(stats)`` gives the engine its
    ``f(t: float, y)``, which calls the user's ``func`` with a 0-d time tensor on the state's
    device, restores the structure, checks what comes back and counts the call.
    """

    def __init__(self, func, y0, t, method, rtol, atol, options, flat: bool = False):
        if not callable(func):
            raise TypeError(f"odeint: func must be callable as func(t, y), got {type(func).__name__}.")
        solver = _check_solver(method, rtol, atol, options)
        self.func = func
        self.is_tuple = isinstance(y0, (tuple, list))
        self.parts = _check_state(y0)
        self.times = _check_times(t)
        self.method = solver.method
        self.dtype, self.device = self.parts[0].dtype, self.parts[0].device
        self.shapes = [p.shape for p in self.parts]
        self.sizes = [p.numel() for p in self.parts]
        self.flat = flat or self.is_tuple
        self.y_start = self.flatten(self.parts) if self.flat else self.parts[0]
        self.rtol, self.atol = self.tolerance("rtol", solver.rtol), self.tolerance("atol", solver.atol)
        self.options = self.with_grid(solver.options)

    def with_grid(self, options: dict, name: str = "options") -> dict:
        """``options`` with the step grid of ``options["grid_constructor"]`` ready for the engine: under
        the key ``"grid"``, a function of the solve's output times that calls
        ``grid_constructor(func, y0, t)`` (``t`` a float64 tensor on the state's device, ``y0`` in the
        user's structure) and checks that the grid runs from ``t[0]`` to ``t[-1]`` in ``t``'s direction."""
        constructor = options.get("grid_constructor")
        if constructor is None:
            return options
        y0 = self.parts if self.is_tuple else self.parts[0]

        def grid(t_out: Sequence[float]) -> list:
            times = torch.tensor(t_out, dtype=torch.float64, device=self.device)
            where = f"odeint: {name}['grid_constructor'](func, y0, t)"
            try:
                points = _check_times(constructor(self.func, y0, times))
            except (TypeError, ValueError) as exc:
                raise type(exc)(f"{where} must return a valid step grid: {exc}") from None
            forward = t_out[-1] >= t_out[0]
            if points[0] != t_out[0] or points[-1] != t_out[-1] or len(points) < 2 or \
                    (points[-1] > points[0]) != forward:
                raise ValueError(f"{where} must return a grid from t[0]={t_out[0]:.6g} to t[-1]={t_out[-1]:.6g} "
                                 f"(exactly, in t's direction), got one from {points[0]:.6g} to {points[-1]:.6g} "
                                 f"with {len(points)} points.")
            return points

        return {**options, "grid": grid}

    def tolerance(self, name: str, value) -> Union[float, Tensor]:
        """A checked tolerance (see :func:`_check_tolerance`) in the engine's layout: a float stays one;
        a tensor must broadcast to ``y0``'s shape (it is kept as given, or flattened with the state);
        for a tuple state, a tuple (or 1-D tensor) of one tolerance per part, each broadcast to its
        part, becomes one flat tensor like the state."""
        if isinstance(value, float):
            return value
        if self.is_tuple:
            n = len(self.parts)
            if isinstance(value, Tensor) and value.dim() == 1 and value.numel() == n:
                value = tuple(value.unbind())  # torchdiffeq's spelling: one entry per part
            if not isinstance(value, tuple) or len(value) != n:
                raise ValueError(f"odeint: y0 is a tuple of {n} tensors, so {name} must be a number or a tuple of "
                                 f"{n} tolerances, one per part (each a number or a tensor broadcastable to the part), "
                                 f"got {_describe(value)}.")
            return torch.cat([self._broadcast(f"{name}[{i}]", v, shape).expand(shape).reshape(-1)
                              for i, (v, shape) in enumerate(zip(value, self.shapes))])
        if isinstance(value, tuple):
            raise ValueError(f"odeint: {name} is a tuple, but y0 is a single tensor: give a number, or a tensor "
                             f"broadcastable to y0's shape {tuple(self.shapes[0])}.")
        tol = self._broadcast(name, value, self.shapes[0])
        return tol.expand(self.shapes[0]).reshape(-1) if self.flat else tol

    def _broadcast(self, name: str, value, shape: torch.Size) -> Tensor:
        """``value`` as a tensor in the state's dtype and device that broadcasts to ``shape``."""
        tol = torch.as_tensor(value, dtype=self.dtype, device=self.device)
        try:
            ok = torch.broadcast_shapes(tol.shape, shape) == shape
        except RuntimeError:
            ok = False
        if not ok:
            raise ValueError(f"odeint: {name} has shape {tuple(tol.shape)}, which does not broadcast to the state's "
                             f"shape {tuple(shape)}; give one tolerance per entry, or a shape that broadcasts.")
        return tol

    def flatten(self, parts: Sequence[Tensor]) -> Tensor:
        return torch.cat([p.reshape(-1) for p in parts]) if len(parts) > 1 else parts[0].reshape(-1)

    def unflatten(self, y: Tensor) -> Tuple[Tensor, ...]:
        return tuple(chunk.view(shape) for chunk, shape in zip(torch.split(y, self.sizes), self.shapes))

    @property
    def norm(self) -> Callable[[Tensor], Tensor]:
        """The error norm on the engine's (flat) state, from ``options["norm"]``: by default RMS over
        the state and, for a tuple, each part on its own scale, the worst part deciding; a built-in
        name of ``NORMS`` (on a tuple, each part separately, the worst deciding); or the user's
        callable, which receives the scaled error in ``y0``'s structure (as torchdiffeq's)."""
        choice = self.options.get("norm")
        if callable(choice):
            return lambda x: choice(self.structure(x))
        part_norm = {None: rms_norm, "rms": rms_norm, "max": max_norm, "per_sample": per_sample_norm}[choice]
        if not self.flat:
            return part_norm
        if not self.is_tuple:
            return lambda x: part_norm(x.view(self.shapes[0]))
        return lambda x: torch.stack([part_norm(c) for c in self.unflatten(x)]).max()

    def call(self, t_tensor: Tensor, y: Tensor) -> Tensor:
        """``func`` on the engine's state ``y`` (flat or not), returned in the same layout."""
        if not self.flat:
            out = _from_autocast(self.func(t_tensor, y), self.dtype)
            _check_output(out, 0, self.shapes[0], self.dtype, False, self.device)
            return out
        state = self.unflatten(y)
        if not self.is_tuple:
            out = _from_autocast(self.func(t_tensor, state[0]), self.dtype)
            _check_output(out, 0, self.shapes[0], self.dtype, False, self.device)
            return out.reshape(-1)
        outs = self.func(t_tensor, state)
        if not isinstance(outs, (tuple, list)) or len(outs) != len(self.parts):
            raise ValueError(f"odeint: y0 is a tuple of {len(self.parts)} tensors, so func must return a "
                             f"tuple of {len(self.parts)} tensors, got {type(outs).__name__}.")
        outs = [_from_autocast(out, self.dtype) for out in outs]
        for i, (out, shape) in enumerate(zip(outs, self.shapes)):
            _check_output(out, i, shape, self.dtype, True, self.device)
        return self.flatten(outs)

    def time(self, s: Union[float, Tensor]) -> Tensor:
        """The 0-d time tensor ``func`` receives; a tensor time (the Rosenbrock methods
        differentiate with respect to it) is passed on, keeping its graph."""
        if isinstance(s, Tensor):
            return s.to(dtype=self.dtype, device=self.device)
        return torch.scalar_tensor(s, dtype=self.dtype, device=self.device)

    @property
    def shape(self) -> Optional[torch.Size]:
        """The state's shape as the user gave it, for ``options['jacobian'] == 'batched'``
        (``None`` for a tuple state)."""
        return None if self.is_tuple else self.shapes[0]

    def dynamics(self, stats: SolverStats) -> Callable[[float, Tensor], Tensor]:
        if self.flat:
            def f(s: float, y: Tensor) -> Tensor:
                stats.nfe += 1
                return self.call(self.time(s), y)

            return f
        # A single tensor state (the common case) in one closure: this runs six times per dopri5 step.
        func, dtype, device, shape = self.func, self.dtype, self.device, self.shapes[0]

        def f_tensor(s: float, y: Tensor) -> Tensor:
            stats.nfe += 1
            if isinstance(s, Tensor):
                s = s.to(dtype=dtype, device=device)
            else:
                s = torch.scalar_tensor(s, dtype=dtype, device=device)
            out = func(s, y)
            if not isinstance(out, Tensor) or out.shape != shape or out.dtype != dtype or out.device != device:
                out = _from_autocast(out, dtype)
                _check_output(out, 0, shape, dtype, False, device)  # raises, saying what is wrong
            return out

        return f_tensor

    def structure(self, y: Tensor):
        """The engine's state ``y`` in the user's structure (a tensor of ``y0``'s shape, or a tuple)."""
        if not self.flat:
            return y
        parts = self.unflatten(y)
        return parts if self.is_tuple else parts[0]

    def callbacks(self, suffix: str = "", state: Optional[Callable[[Tensor], object]] = None) -> dict:
        """torchdiffeq's step callbacks, when ``func`` has them, as hooks of the integration loop:
        ``func.callback_step(t0, y0, dt)`` before every attempted step, ``callback_accept_step`` and
        ``callback_reject_step`` (same arguments) after every accepted and rejected one; ``t0``
        and ``dt`` are 0-d tensors like the time ``func`` gets, ``y0`` has ``y0``'s structure.
        ``suffix="_adjoint"`` names the backward solve's callbacks, and ``state`` maps the solved
        state to what they receive (default: :meth:`structure`)."""
        state = self.structure if state is None else state
        hooks = {}
        for key, name in (("on_attempt", "callback_step"), ("on_accept", "callback_accept_step"),
                          ("on_reject", "callback_reject_step")):
            name += suffix
            callback = _attribute(self.func, name)
            if callback is None:
                continue
            if not callable(callback):
                raise TypeError(f"odeint: func.{name} must be callable as {name}(t0, y0, dt), got "
                                f"{type(callback).__name__}.")
            if key == "on_accept":
                def hook(step, interpolate, callback=callback):
                    callback(self.time(step.t), state(step.y), self.time(step.h))
            else:
                def hook(t, y, h, callback=callback):
                    callback(self.time(t), state(y), self.time(h))
            hooks[key] = (hook,)
        return hooks

    def stack(self, ys: Union[Tensor, Sequence[Tensor]]):
        """Engine outputs (a list, one per time, or already stacked) to the user's layout:
        ``(T, *S)`` or a tuple of such."""
        stacked = ys if isinstance(ys, Tensor) else torch.stack(list(ys))
        if not self.flat:
            return stacked
        parts = tuple(chunk.reshape(len(ys), *shape)
                      for chunk, shape in zip(torch.split(stacked, self.sizes, dim=1), self.shapes))
        return parts if self.is_tuple else parts[0]


_MODULE_GETATTR = torch.nn.Module.__getattr__


def _attribute(obj, name: str):
    """``getattr(obj, name, None)``. An ``nn.Module`` without the attribute answers through its
    ``__getattr__``, which builds and raises an error (microseconds, three times per solve); when
    the module's class keeps that ``__getattr__``, the places it and the normal lookup search are
    looked at first, and only a name found there is fetched."""
    if getattr(type(obj), "__getattr__", None) is _MODULE_GETATTR:
        found = vars(obj)
        if not (hasattr(type(obj), name) or name in found or name in found.get("_parameters", ())
                or name in found.get("_buffers", ()) or name in found.get("_modules", ())):
            return None
    return getattr(obj, name, None)


def _describe(value) -> str:
    if isinstance(value, Tensor):
        return f"a tensor of shape {tuple(value.shape)}"
    return f"a tuple of {len(value)}" if isinstance(value, tuple) else repr(value)


def _from_autocast(out, dtype: torch.dtype):
    """``out`` in the state's ``dtype`` when ``torch.autocast`` made it lower precision, else unchanged.

    Under autocast, layers such as ``nn.Linear`` return float16 or bfloat16 whatever their input; the
    solver keeps its state, stages and error estimate in the state's dtype (as torchdiffeq does), so
    only the evaluations of ``func`` run in low precision. Outside autocast a dtype mismatch is the
    user's bug and :func:`_check_output` reports it.
    """
    if (isinstance(out, Tensor) and out.dtype != dtype and out.is_floating_point() and dtype.is_floating_point
            and torch.is_autocast_enabled(out.device.type)):
        return out.to(dtype)
    return out


def _check_output(out, index: int, shape, dtype, is_tuple: bool, device=None) -> None:
    name = f"func(t, y)[{index}]" if is_tuple else "func(t, y)"
    if not isinstance(out, Tensor):
        raise TypeError(f"odeint: {name} must return a tensor, got {type(out).__name__}.")
    if out.shape != shape:
        raise ValueError(f"odeint: {name} returned shape {tuple(out.shape)}, but the state has shape "
                         f"{tuple(shape)}; the dynamics must return dy/dt with the state's shape.")
    if out.dtype != dtype:
        raise TypeError(f"odeint: {name} returned dtype {out.dtype}, but the state is {dtype}; "
                        "keep the dynamics in the state's dtype (e.g. call .to(y.dtype) on parameters).")
    if device is not None and out.device != device:
        raise RuntimeError(f"odeint: {name} returned a tensor on {out.device}, but the state is on {device}; "
                           "keep the dynamics on the state's device (e.g. model.to(y0.device)).")
