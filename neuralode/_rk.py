"""The one explicit Runge-Kutta engine behind :func:`neuralode.odeint`.

Every method is a :class:`~neuralode._tableaus.ButcherTableau`; this module turns a tableau into
steps. It works on a single tensor state ``y`` (the front door flattens tuple states) and on a
time kept as a Python float (float64), whatever the state's dtype: step-size control happens on
the host, and the only host-device synchronisation per step is reading the scalar error ratio
that decides accept or reject (together with a flag saying whether the new state is finite).

References: Hairer, Norsett & Wanner, *Solving Ordinary Differential Equations I* (2nd ed.,
1993), section II.4 (error norm, automatic first step, step-size controller) and II.6 (dense
output).
"""

from __future__ import annotations

import functools
import math
import sys
from dataclasses import dataclass, field
from typing import Callable, List, Optional, Sequence

import torch
from torch import Tensor

from ._tableaus import ButcherTableau

__all__ = ["SolverStats", "solve", "rms_norm", "once_differentiable", "refuse_double_backward", "FIXED_OPTIONS",
           "ADAPTIVE_OPTIONS", "CONTROLLERS"]

# ``f(t, y)`` with ``t`` a Python float and ``y`` the flat state; the front door builds it.
Dynamics = Callable[[float, Tensor], Tensor]
Norm = Callable[[Tensor], Tensor]

#: Options accepted by the fixed-step methods, with their defaults.
FIXED_OPTIONS = {"step_size": None}
#: Options accepted by the adaptive methods, with their defaults.
ADAPTIVE_OPTIONS = {
    "first_step": None,  # None: Hairer's automatic choice
    "max_step": math.inf,
    "min_step": 0.0,
    "max_num_steps": 10_000,  # accepted + rejected; a solve that cannot finish fails fast
    "safety": 0.9,
    "ifactor": 10.0,  # largest growth of h in one step
    "dfactor": 0.2,  # largest shrink of h in one step
    "controller": "i",  # "i": h *= safety err^(-1/k); "pi": also remembers the last error
}
CONTROLLERS = ("i", "pi")

_EPS = sys.float_info.epsilon
# Every trial step since the last accepted one was NaN or inf and h has shrunk this much: give up.
_NONFINITE_SHRINK = 1e-30


@dataclass
class SolverStats:
    """What a solve cost, counted by the engine (the user's function is not wrapped).

    Attributes:
        nfe: number of evaluations of the dynamics ``func``.
        n_accepted: accepted steps.
        n_rejected: rejected steps (adaptive methods only).
        step_times: the end time of every accepted step, in order.
        n_jac: Jacobian evaluations ``df/dy`` (implicit methods only; 0 for explicit ones). Each
            is one evaluation of ``func`` (counted in ``nfe``) plus its vectorised backward pass.
        n_lu: LU factorisations of ``W = I - h gamma J`` (implicit methods; one per attempted
            step, so ``n_lu >= n_accepted + n_rejected``; a batched factorisation counts once).
        n_solves: linear solves with a factorised ``W`` (implicit methods; one per stage).
    """

    nfe: int = 0
    n_accepted: int = 0
    n_rejected: int = 0
    step_times: List[float] = field(default_factory=list)
    n_jac: int = 0
    n_lu: int = 0
    n_solves: int = 0


def rms_norm(x: Tensor) -> Tensor:
    """Root-mean-square of all entries: ``sqrt(mean(x**2))`` (HNW II.4, eq. 4.11)."""
    return torch.linalg.vector_norm(x) / math.sqrt(max(x.numel(), 1))


class _Refuse(torch.autograd.Function):
    """Identity on gradients that are constants to autograd; differentiating them raises."""

    @staticmethod
    def forward(ctx, message: str, *grads):
        ctx.message = message
        return tuple(g.view_as(g) for g in grads)

    @staticmethod
    def backward(ctx, *_):
        raise RuntimeError(ctx.message)


def refuse_double_backward(message: str, *grads: Tensor) -> tuple:
    """``grads`` (computed without a graph), marked so that differentiating them raises
    ``RuntimeError(message)``; unchanged outside ``create_graph=True``."""
    if not torch.is_grad_enabled() or not grads:
        return grads
    return _Refuse.apply(message, *(g.detach().requires_grad_(True) for g in grads))


def once_differentiable(message: str):
    """Decorate a custom Function's ``backward`` that builds no graph (it runs under ``no_grad``).

    Under ``create_graph=True`` (gradient penalties, Hessian-vector products, gradgradcheck) its
    gradients would be constants, and a second derivative through them silently wrong. Every
    gradient it returns is then routed through a node whose backward raises ``RuntimeError(message)``.
    Unlike ``torch.autograd.function.once_differentiable``, which does so only when an incoming
    gradient requires grad, this refuses whenever the graph is being built: ``d(sum ys)/d theta``
    comes in as a constant yet depends on ``theta``.
    """

    def decorate(backward):
        @functools.wraps(backward)
        def wrapper(ctx, *grads):
            with torch.no_grad():
                out = backward(ctx, *grads)
            where = [i for i, g in enumerate(out) if isinstance(g, Tensor)]
            marked = refuse_double_backward(message, *(out[i] for i in where))
            out = list(out)
            for i, g in zip(where, marked):
                out[i] = g
            return tuple(out)

        return wrapper

    return decorate


def _combine(y: Optional[Tensor], h: float, weights: Sequence[float], ks: Sequence[Tensor]) -> Tensor:
    """``y + h * sum_j weights[j] * ks[j]`` (``y`` may be None), skipping zero weights."""
    out = y
    fresh = False  # may we update ``out`` in place? Only once it is a tensor we created.
    for w, k in zip(weights, ks):
        if w == 0.0:
            continue
        if out is None:
            out = k * (h * w)
            fresh = True
        elif fresh:
            out.add_(k, alpha=h * w)
        else:
            out = torch.add(out, k, alpha=h * w)
            fresh = True
    if out is None:
        out = torch.zeros_like(ks[0])
    return out


class _Method:
    """A tableau with its coefficients as Python floats, ready for stepping (read-only once built)."""

    def __init__(self, tableau: ButcherTableau):
        self.tableau = tableau
        self.c = [float(x) for x in tableau.c]
        self.a = [[float(x) for x in row] for row in tableau.a]
        self.b = [float(x) for x in tableau.b]
        self.b_error = None if tableau.b_error is None else [float(x) for x in tableau.b_error]
        self.dense = None if tableau.dense is None else [[float(x) for x in row] for row in tableau.dense]
        self.fsal = tableau.fsal

    def step(self, func: Dynamics, t: float, y: Tensor, f0: Tensor, h: float):
        """One step of size ``h`` (signed). Returns ``(y1, ks)``; with FSAL ``ks[-1] = f(t+h, y1)``."""
        ks = [f0]
        yi = y
        for ci, row in zip(self.c[1:], self.a):
            yi = _combine(y, h, row, ks)
            ks.append(func(t + ci * h, yi))
        y1 = yi if self.fsal else _combine(y, h, self.b, ks)
        return y1, ks

    def interpolate(self, y0: Tensor, y1: Tensor, f0: Tensor, f1: Tensor, h: float, ks, theta: float) -> Tensor:
        """``y(t0 + theta h)`` inside a step of size ``h`` (HNW II.6, continuous extensions).

        With the tableau's dense-output weights it is ``y0 + h sum_i b_i(theta) k_i`` (fourth order
        for dopri5 and tsit5); otherwise the cubic Hermite interpolant through the end values and
        slopes (third order).
        """
        if self.dense is not None:
            weights = [sum(d * theta ** (m + 1) for m, d in enumerate(row)) for row in self.dense]
            return _combine(y0, h, weights, ks)
        return _hermite(y0, y1, f0, f1, h, theta)


def _hermite(y0: Tensor, y1: Tensor, f0: Tensor, f1: Tensor, h: float, theta: float) -> Tensor:
    """The cubic Hermite interpolant through ``(y0, f0)`` and ``(y1, f1)`` at ``t0 + theta h``."""
    # Hermite basis: y0 (1 - 3 th^2 + 2 th^3) + y1 (3 th^2 - 2 th^3) + h f0 th (1 - th)^2 + h f1 th^2 (th - 1)
    th2, th3 = theta * theta, theta**3
    out = torch.add(y0 * (1 - 3 * th2 + 2 * th3), y1, alpha=3 * th2 - 2 * th3)
    out.add_(f0, alpha=h * (theta - 2 * th2 + th3))
    out.add_(f1, alpha=h * (th3 - th2))
    return out


@functools.lru_cache(maxsize=None)
def _method(tableau: ButcherTableau) -> _Method:
    """One :class:`_Method` per tableau: converting the fractions on every solve sat on the hot path."""
    return _Method(tableau)


def _check_finite(y: Tensor, what: str, t: float) -> None:
    if not bool(torch.isfinite(y).all()):
        raise FloatingPointError(
            f"odeint: the {what} became non-finite (NaN or inf) at t={t:.6g}. Check the dynamics "
            "for overflow or division by zero, or use a smaller step size / tighter tolerance."
        )


def _fixed_grid(t0: float, t1: float, step_size: Optional[float], t_out: Sequence[float]) -> List[float]:
    if step_size is None:
        return list(t_out)
    span = abs(t1 - t0)
    direction = 1.0 if t1 >= t0 else -1.0
    n = max(1, math.ceil(span / step_size - 1e-9))
    return [t0 + direction * i * step_size for i in range(n)] + [t1]


def _solve_fixed(func, y0, t_out, method: _Method, options, stats: SolverStats) -> List[Tensor]:
    grid = _fixed_grid(t_out[0], t_out[-1], options["step_size"], t_out)
    direction = 1.0 if t_out[-1] >= t_out[0] else -1.0
    outputs = [y0]
    j = 1
    t, y, f = grid[0], y0, None
    # One flag per step, kept on the device: the host looks only when an output is not finite,
    # so a fixed-step solve synchronises once per output time, not once per step.
    finite = []
    for t1 in grid[1:]:
        h = t1 - t
        if f is None:
            f = func(t, y)
        y1, ks = method.step(func, t, y, f, h)
        f1 = ks[-1] if method.fsal else None
        with torch.no_grad():
            finite.append(torch.isfinite(y1).all())
        while j < len(t_out) and (t_out[j] - t1) * direction <= 0:
            if t_out[j] == t1:
                out = y1
            else:  # an output inside the step: Hermite interpolation needs the end slope
                if f1 is None and method.dense is None:
                    f1 = func(t1, y1)
                out = method.interpolate(y, y1, f, f1, h, ks, (t_out[j] - t) / h)
            if not bool(torch.isfinite(out).all()):
                bad = torch.stack(finite).logical_not().nonzero().flatten().tolist()
                _check_finite(out, "solution", grid[bad[0] + 1] if bad else t_out[j])
            outputs.append(out)
            j += 1
        stats.n_accepted += 1
        stats.step_times.append(t1)
        t, y, f = t1, y1, f1
    return outputs


def _initial_step(func, t0, y0, f0, direction, order, rtol, atol, norm) -> float:
    """Hairer's starting step size (HNW II.4, "Automatic step size control", steps a-f)."""
    scale = atol + rtol * y0.abs()
    d0, d1 = torch.stack([norm(y0 / scale), norm(f0 / scale)]).tolist()
    h0 = 1e-6 if d0 < 1e-5 or d1 < 1e-5 else 0.01 * d0 / d1
    f1 = func(t0 + direction * h0, y0 + (direction * h0) * f0)
    d2 = float(norm((f1 - f0) / scale)) / h0
    if max(d1, d2) <= 1e-15:
        h1 = max(1e-6, h0 * 1e-3)
    else:
        h1 = (0.01 / max(d1, d2)) ** (1.0 / (order + 1))
    return min(100 * h0, h1)


class _StepControl:
    """Step-size control shared by every adaptive method: the guards before a step and the
    controller after it (HNW I, section II.4; PI control: HNW II, section IV.2).

    ``k`` is one more than the lower order of the pair. I control: ``h_new = h * safety *
    err^(-1/k)``. PI control (Gustafsson 1991): ``h_new = h * safety * err^(-0.7/k) *
    err_prev^(0.4/k)``, which damps the oscillation of ``h`` between accepted and rejected steps.
    It also counts the steps in ``stats``.
    """

    def __init__(self, options: dict, k: int, t_out: Sequence[float], stats: SolverStats):
        if options["controller"] == "pi":
            self.beta1, self.beta2 = 0.7 / k, 0.4 / k
        else:
            self.beta1, self.beta2 = 1.0 / k, 0.0
        self.exponent = 1.0 / k
        self.prev_ratio = 1.0
        self.safety, self.ifactor, self.dfactor = options["safety"], options["ifactor"], options["dfactor"]
        self.max_step, self.min_step = options["max_step"], options["min_step"]
        self.max_num_steps = options["max_num_steps"]
        self.first = options["first_step"]
        self.t_end, self.stats = t_out[-1], stats
        self.direction = 1.0 if t_out[-1] >= t_out[0] else -1.0
        self.last_rejected = self.nonfinite = False
        # The product of the shrink factors over the current run of non-finite trial steps, and
        # the number of non-finite trial steps in the solve.
        self.nonfinite_shrink, self.n_nonfinite = 1.0, 0

    def first_step(self, func, t0: float, y0: Tensor, f0: Tensor, order: int, rtol, atol, norm: Norm) -> float:
        """Check that the start is finite; the first step size: ``options["first_step"]`` or
        Hairer's estimate (:func:`_initial_step`)."""
        _check_finite(torch.cat([y0.reshape(-1), f0.reshape(-1)]), "initial state or its derivative", t0)
        if self.first is not None:
            return float(self.first)
        with torch.no_grad():
            return _initial_step(func, t0, y0.detach(), f0.detach(), self.direction, order, rtol, atol, norm)

    def next_step(self, t: float, h: float):
        """The step to attempt from ``t``: ``(h, t1)`` after the step budget, ``max_step``, the end
        of the interval and the underflow checks (each failure raises, naming ``t`` and ``h``)."""
        stats, t_end = self.stats, self.t_end
        if stats.n_accepted + stats.n_rejected >= self.max_num_steps:
            # Creeping up to an overflow (the step shrinks each time it overshoots into inf) also
            # ends here; say so rather than suggest stiffness.
            cause = (f"{self.n_nonfinite} trial steps produced NaN or inf: the solution may blow up, or "
                     "overflow the state's dtype, near this time. Otherwise the" if self.n_nonfinite else "The")
            raise RuntimeError(
                f"odeint: max_num_steps={self.max_num_steps} reached at t={t:.6g} (integrating to "
                f"{t_end:.6g}; {stats.n_accepted} accepted, {stats.n_rejected} rejected steps, last "
                f"h={h:.3g}). {cause} problem may be stiff or the tolerances too tight: loosen rtol/atol, "
                "or raise the limit with options={'max_num_steps': ...}."
            )
        h = min(h, self.max_step, abs(t_end - t))
        # Do not leave a sliver of the interval for a last, needlessly tiny step.
        if abs(t_end - t) - h < 1e-3 * h:
            h = abs(t_end - t)
        t1 = t_end if h == abs(t_end - t) else t + self.direction * h
        # The last test catches the run of non-finite trials the relative test misses at t = 0
        # (there h <= 4 eps max(|t|, |t1|) = 4 eps h never holds, and h would shrink to 0).
        if (h < self.min_step or h <= 4 * _EPS * max(abs(t), abs(t1))
                or self.nonfinite_shrink < _NONFINITE_SHRINK):
            if self.nonfinite:
                raise FloatingPointError(
                    f"odeint: step size underflow at t={t:.6g} (h={h:.3g}): every trial step produced "
                    "NaN or inf. The solution blows up or overflows the state's dtype there, or the dynamics "
                    "return non-finite values there."
                )
            raise RuntimeError(
                f"odeint: step size underflow at t={t:.6g} (h={h:.3g}, min_step={self.min_step:.3g}). "
                "The solution may blow up or be discontinuous there, or the problem may be stiff: "
                "check the dynamics near this time."
            )
        return h, t1

    def accept(self, ratio: float, t1: float) -> float:
        """Count the step ending at ``t1``; the factor for ``h`` after it (error ratio ``ratio <= 1``)."""
        self.stats.n_accepted += 1
        self.stats.step_times.append(t1)
        if ratio == 0.0:
            factor = self.ifactor
        else:
            proposal = self.safety * ratio**-self.beta1 * self.prev_ratio**self.beta2
            factor = min(self.ifactor, max(self.dfactor, proposal))
        self.prev_ratio = max(ratio, 1e-4)
        if self.last_rejected:
            factor = min(factor, 1.0)
        self.last_rejected = self.nonfinite = False
        self.nonfinite_shrink = 1.0
        return factor

    def reject(self, ratio: float) -> float:
        """Count a rejected step (``ratio > 1`` or NaN); the factor for ``h`` after it."""
        self.stats.n_rejected += 1
        self.nonfinite = not math.isfinite(ratio)
        self.last_rejected = True
        if self.nonfinite:  # the trial step overflowed: shrink hard and try again
            self.nonfinite_shrink *= self.dfactor
            self.n_nonfinite += 1
            return self.dfactor
        self.nonfinite_shrink = 1.0
        return min(1.0, max(self.dfactor, self.safety * ratio**-self.exponent))


def _error_ratio(err: Tensor, y: Tensor, y1: Tensor, rtol: float, atol: float, norm: Norm) -> float:
    """``norm(err / (atol + rtol * max(|y|, |y1|)))``: a step is accepted when it is at most 1; NaN
    (a rejection) when ``y1`` is not finite.

    The finiteness test is needed because an overflowed ``y1`` can come with a finite ``err`` (a
    constant field has ``err = 0``): its scale is inf, the ratio 0, and the step would be accepted.
    Adding ``0 * y1`` changes nothing where ``y1`` is finite and puts NaN (``0 * inf``) into the norm
    where it is not: two elementwise operations, and still the one host-device synchronisation per
    step.
    """
    with torch.no_grad():  # step-size control needs no gradients
        y1 = y1.detach()
        scale = atol + rtol * torch.maximum(y.detach().abs(), y1.abs())
        return float(norm(err.detach() / scale + 0 * y1))


def _check_outputs(outputs: Sequence[Tensor], t_out: Sequence[float]) -> None:
    """Raise if an output is not finite (accepted steps are, but dense output may overflow); one
    synchronisation per solve."""
    with torch.no_grad():
        finite = torch.stack([torch.isfinite(o).all() for o in outputs])
        if not bool(finite.all()):
            bad = int((~finite).nonzero()[0])
            _check_finite(outputs[bad], "solution", t_out[bad])


def _solve_adaptive(func, y0, t_out, method: _Method, rtol, atol, norm: Norm, options, stats) -> List[Tensor]:
    tab = method.tableau
    control = _StepControl(options, min(tab.order, tab.error_order) + 1, t_out, stats)
    direction = control.direction
    t0 = t_out[0]
    f0 = func(t0, y0)
    h = control.first_step(func, t0, y0, f0, tab.order, rtol, atol, norm)

    outputs = [y0]
    j = 1
    t, y = t0, y0
    while j < len(t_out):
        h, t1 = control.next_step(t, h)
        hs = t1 - t
        y1, ks = method.step(func, t, y, f0, hs)
        with torch.no_grad():
            err = _combine(None, hs, method.b_error, [k.detach() for k in ks])
        ratio = _error_ratio(err, y, y1, rtol, atol, norm)

        if ratio <= 1.0:  # accept (False for NaN)
            f1 = ks[-1] if method.fsal else func(t1, y1)
            while j < len(t_out) and (t_out[j] - t1) * direction <= 0:
                if t_out[j] == t1:
                    out = y1
                else:  # dense output: the steps never depend on the output grid
                    out = method.interpolate(y, y1, f0, f1, hs, ks, (t_out[j] - t) / hs)
                outputs.append(out)
                j += 1
            t, y, f0 = t1, y1, f1
            factor = control.accept(ratio, t1)
        else:
            factor = control.reject(ratio)
        h = h * factor
    _check_outputs(outputs, t_out)
    return outputs


def solve(
    func: Dynamics,
    y0: Tensor,
    t_out: Sequence[float],
    tableau: ButcherTableau,
    *,
    rtol: float,
    atol: float,
    norm: Norm,
    options: dict,
    stats: SolverStats,
    shape: Optional[torch.Size] = None,
) -> List[Tensor]:
    """Integrate ``y' = func(t, y)`` from ``t_out[0]`` and return ``y`` at every time in ``t_out``.

    Args:
        func: the dynamics on the flat state, ``func(t: float, y) -> Tensor`` like ``y``. For a
            Rosenbrock method ``t`` may also be a 0-d tensor (the Jacobian evaluation
            differentiates with respect to it).
        y0: initial state, any shape.
        t_out: strictly monotonic output times (floats), ``t_out[0]`` the initial time.
        tableau: the method: a :class:`~neuralode._tableaus.ButcherTableau` (explicit) or a
            :class:`~neuralode._rosenbrock.RosenbrockTableau` (linearly implicit, for stiff problems).
        rtol, atol: relative and absolute tolerances (adaptive methods only).
        norm: the error norm, e.g. :func:`rms_norm`.
        options: every key of :data:`FIXED_OPTIONS`, :data:`ADAPTIVE_OPTIONS` or (Rosenbrock)
            ``ROSENBROCK_OPTIONS``, filled in.
        stats: counters, updated in place.
        shape: the user's state shape when ``y0`` is its flattened copy (Rosenbrock methods with
            ``options["jacobian"] == "batched"``); default ``y0.shape``.

    Returns:
        A list of ``len(t_out)`` tensors shaped like ``y0``.
    """
    if len(t_out) == 1:
        return [y0]
    if not isinstance(tableau, ButcherTableau):
        from . import _rosenbrock  # imports this module: resolved at call time

        return _rosenbrock.solve(func, y0, t_out, tableau, rtol=rtol, atol=atol, norm=norm, options=options,
                                 stats=stats, shape=shape)
    method = _method(tableau)
    if tableau.adaptive:
        return _solve_adaptive(func, y0, t_out, method, rtol, atol, norm, options, stats)
    return _solve_fixed(func, y0, t_out, method, options, stats)
