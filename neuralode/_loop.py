"""The one integration loop behind :func:`neuralode.odeint`, and the step-size control it drives.

A solve is a *stepper* (how to take one step of a method and interpolate inside it: the explicit
Runge-Kutta stepper of :mod:`neuralode._rk`, the Rosenbrock stepper of
:mod:`neuralode._rosenbrock`) driven by a *controller* (which step to try next and whether to keep
it: :class:`StepControl` for the adaptive methods, :class:`FixedSteps` for the fixed-step ones).
:func:`integrate` owns everything else once: time, the accept/reject decision, the outputs at the
requested times (exact hits and dense output, batched per step), the final finiteness check, and
the hooks that see every accepted step.

The state is a single tensor ``y`` (the front door flattens tuple states); time is a Python float
(float64) whatever the state's dtype, so step-size control happens on the host. An adaptive solve
synchronises host and device once per attempted step, to read the error ratio that decides
accept or reject; a fixed-step one once per solve (see :class:`FixedSteps`). Both add a few per
solve (the first step's estimate, the final finiteness check). The Rosenbrock stepper adds one per
accepted step with outputs inside it (its stiffness test for the dense output); a singular ``W``
shows up as a NaN error ratio, so it costs nothing on the steps that go well.
``tests/test_syncs.py`` counts them.

References: Hairer, Norsett & Wanner, *Solving Ordinary Differential Equations I* (2nd ed.,
1993), section II.4 (error norm, automatic first step, step-size control) and II.6 (dense output);
Hairer & Wanner, *Solving ODEs II* (2nd ed., 1996), section IV.2 (PI control).
"""

from __future__ import annotations

import math
import sys
from dataclasses import dataclass, field
from typing import Callable, List, Optional, Protocol, Sequence, Union

import torch
from torch import Tensor

__all__ = ["SolverStats", "rms_norm", "max_norm", "per_sample_norm", "combine", "Step", "Stepper", "StepControl",
           "FixedSteps", "integrate", "FIXED_OPTIONS", "ADAPTIVE_OPTIONS", "CONTROLLERS", "NORMS",
           "INTERPOLANTS"]

# ``f(t, y)`` with ``t`` a Python float and ``y`` the flat state; the front door builds it.
Dynamics = Callable[[float, Tensor], Tensor]
Norm = Callable[[Tensor], Tensor]
# A tolerance: a number, or a tensor that broadcasts to the (engine's) state.
Tolerance = Union[float, Tensor]

#: Options accepted by the fixed-step methods, with their defaults (torchdiffeq's four, and a step budget).
FIXED_OPTIONS = {
    "step_size": None,  # None: step exactly between the output times (or on grid_constructor's grid)
    "grid_constructor": None,  # grid_constructor(func, y0, t) -> the step grid, from t[0] to t[-1]
    "interp": "cubic",  # outputs inside a step: "cubic" (Hermite) or "linear" (torchdiffeq's default)
    "perturb": False,  # True: each step sees f just inside (t_n, t_n+1), as if f jumped at every grid point
    "max_num_steps": None,  # None: no limit (the grid is known); an event search stops at 10 000
}
INTERPOLANTS = ("cubic", "linear")
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
    "norm": None,  # the error norm: None (RMS; per part for a tuple), a name of NORMS, or a callable
    "step_t": None,  # times the steps must land on
    "jump_t": None,  # discontinuities of f in t: steps land on them and restart there (no FSAL across)
    "dtype": None,  # torchdiffeq's dtype of time: accepted, and time stays a float64 Python float whatever it is
}
CONTROLLERS = ("i", "pi")
#: Names of the built-in error norms (``options["norm"]``): RMS over every entry; the largest
#: entry; the largest RMS over the samples of a batch (leading dimension), so that one sample's
#: error cannot hide among the others.
NORMS = ("rms", "max", "per_sample")

_EPS = sys.float_info.epsilon
# Every trial step since the last accepted one was NaN or inf and h has shrunk this much: give up.
_NONFINITE_SHRINK = 1e-30


@dataclass
class SolverStats:
    """What a solve cost, counted by the loop and the steppers.

    Attributes:
        nfe: number of evaluations of the dynamics ``func`` (counted by the wrapper the front door
            puts around it, which also checks what ``func`` returns).
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


def max_norm(x: Tensor) -> Tensor:
    """The largest absolute entry (the infinity norm)."""
    return x.abs().max() if x.numel() else x.new_zeros(())


def per_sample_norm(x: Tensor) -> Tensor:
    """``max_b rms(x[b])`` over the leading (batch) dimension of ``x``, shape ``(B, ...)``: the
    worst sample decides. (The default RMS over all ``B x D`` entries lets one sample's error reach
    about ``sqrt(B)`` times the tolerance when the others are easy.) A 0-d or 1-d ``x`` counts as one
    sample per entry row: 1-d is treated as ``(B,)`` samples of one entry each."""
    if x.dim() == 0 or x.numel() == 0:
        return rms_norm(x)
    rows = x.reshape(x.shape[0], -1)
    return (torch.linalg.vector_norm(rows, dim=1) / math.sqrt(rows.shape[1])).max()


def combine(y: Optional[Tensor], h: float, weights: Sequence[float], ks: Sequence[Tensor]) -> Tensor:
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


def check_finite(y: Tensor, what: str, t: float) -> None:
    """Raise a ``FloatingPointError`` naming ``t`` (also its attribute ``t``) if ``y`` is not finite."""
    if not bool(torch.isfinite(y).all()):
        error = FloatingPointError(
            f"odeint: the {what} became non-finite (NaN or inf) at t={t:.6g}. Check the dynamics "
            "for overflow or division by zero, or use a smaller step size / tighter tolerance."
        )
        error.t = t
        raise error


class Step:
    """One attempted step from ``t`` to ``t1 = t + h`` (``h`` signed): ``y1`` the new state and
    ``err`` its local error estimate (``None`` for a fixed-step method). A stepper subclasses it to
    keep what its dense output needs."""

    __slots__ = ("t", "t1", "h", "y", "y1", "err", "jump")

    def __init__(self, t: float, t1: float, y: Tensor, y1: Tensor, err: Optional[Tensor]):
        self.t, self.t1, self.h, self.y, self.y1, self.err = t, t1, t1 - t, y, y1, err
        self.jump = False  # does f jump at t1? (set by the loop; f(t1) then means the left limit)


class Stepper(Protocol):
    """What :func:`integrate` needs of a method; one stepper object serves one solve.

    ``order`` (and, for an adaptive method, ``error_order``) set the controller's exponent and the
    automatic first step. ``start`` evaluates what the first step needs at ``(t0, y0)`` and returns
    ``f(t0, y0)``. ``attempt`` takes one step of size ``t1 - t`` from the last accepted state, or
    returns ``None`` when it cannot (a singular linear system: the controller retries smaller).
    ``accept`` makes ``step`` the new starting point (``last``: no step follows; ``start``: the time at
    which to evaluate the next step's first stage afresh, just past a jump of ``f``). ``dense`` returns
    the states at ``t + theta h`` for the ``thetas`` in ``(0, 1)``, stacked: shape ``(m, *y.shape)``.
    """

    order: int
    error_order: Optional[int]

    def start(self, func: Dynamics, t0: float, y0: Tensor) -> Tensor: ...

    def attempt(self, func: Dynamics, t: float, y: Tensor, t1: float) -> Optional[Step]: ...

    def accept(self, func: Dynamics, step: Step, last: bool, start: Optional[float] = None) -> None: ...

    def dense(self, func: Dynamics, step: Step, thetas: Sequence[float]) -> Tensor: ...


def _initial_step(func, t0, y0, f0, direction, order, rtol, atol, norm) -> float:
    """Hairer's starting step size (HNW II.4, "Automatic step size control", steps a-f)."""
    scale = atol + rtol * y0.abs()
    d0, d1 = float(norm(y0 / scale)), float(norm(f0 / scale))
    h0 = 1e-6 if d0 < 1e-5 or d1 < 1e-5 else 0.01 * d0 / d1
    f1 = func(t0 + direction * h0, y0 + (direction * h0) * f0)
    d2 = float(norm((f1 - f0) / scale)) / h0
    if max(d1, d2) <= 1e-15:
        h1 = max(1e-6, h0 * 1e-3)
    else:
        h1 = (0.01 / max(d1, d2)) ** (1.0 / (order + 1))
    return min(100 * h0, h1)


def error_ratio(err: Tensor, abs_y: Tensor, y1: Tensor, rtol: Tensor, atol: Tensor, norm: Norm) -> float:
    """``norm(err / (atol + rtol * max(|y|, |y1|)))`` (``abs_y`` is ``|y|``; ``rtol``, ``atol`` 0-d
    tensors in the state's dtype, or tensors that broadcast to it): a step is accepted
    when it is at most 1; NaN (a rejection) when ``y1`` is not finite.

    The finiteness test is needed because an overflowed ``y1`` can come with a finite ``err`` (a
    constant field has ``err = 0``): its scale is inf, the ratio 0, and the step would be accepted.
    Adding ``0 * y1`` changes nothing where ``y1`` is finite and puts NaN (``0 * inf``) into the norm
    where it is not: one elementwise operation, and still the one host-device synchronisation per
    step.
    """
    # Step-size control needs no gradients: every operand is detached, so no graph is recorded.
    # rtol and atol are 0-d tensors (a Python float would be copied into a tensor at every step).
    y1 = y1.detach()
    scale = torch.maximum(abs_y, y1.abs()).mul_(rtol).add_(atol)
    return float(norm(torch.div(err.detach(), scale).add_(y1, alpha=0.0)))


class StepControl:
    """Step-size control for the adaptive methods: the guards before a step, the accept/reject
    decision and the controller after it (HNW I, section II.4; PI control: HNW II, section IV.2).

    ``k`` is one more than the lower order of the pair. I control: ``h_new = h * safety *
    err^(-1/k)``. PI control (Gustafsson 1991): ``h_new = h * safety * err^(-0.7/k) *
    err_prev^(0.4/k)``, which damps the oscillation of ``h`` between accepted and rejected steps.
    It counts the steps in ``stats``.
    """

    adaptive = True
    perturb = False  # jumps of f are at options["jump_t"] only
    # A step the stepper cannot take (singular W): halve h, at most this many times in a row.
    max_retries = 5

    def __init__(self, options: dict, stepper: Stepper, t_out: Sequence[float], rtol: Tolerance, atol: Tolerance,
                 norm: Norm, stats: SolverStats):
        k = min(stepper.order, stepper.error_order) + 1
        if options["controller"] == "pi":
            self.beta1, self.beta2 = 0.7 / k, 0.4 / k
        else:
            self.beta1, self.beta2 = 1.0 / k, 0.0
        self.exponent = 1.0 / k
        self.order = stepper.order
        self.prev_ratio = 1.0
        self.safety, self.ifactor, self.dfactor = options["safety"], options["ifactor"], options["dfactor"]
        self.max_step, self.min_step = options["max_step"], options["min_step"]
        self.max_num_steps = options["max_num_steps"]
        self.first = options["first_step"]
        self.rtol, self.atol, self.norm = rtol, atol, norm
        self.t_end, self.stats = t_out[-1], stats
        self.direction = 1.0 if t_out[-1] >= t_out[0] else -1.0
        self.last_rejected = self.nonfinite = False
        # The product of the shrink factors over the current run of non-finite trial steps, and
        # the number of non-finite trial steps in the solve; the current run of retries.
        self.nonfinite_shrink, self.n_nonfinite, self.retries = 1.0, 0, 0
        # |y| of the step's start, kept from the previous judgement (|y1| of the accepted step).
        self._abs = (None, None)
        # Times the steps must land on, in the order they are reached (step_t and jump_t strictly
        # inside the interval), and which of them are jumps of f.
        t0, direction = t_out[0], self.direction

        def inside(times):
            return {float(s) for s in (times if times is not None else ()) if (s - t0) * direction > 0
                    and (self.t_end - s) * direction > 0}

        self.jumps = inside(options.get("jump_t"))
        self.stops = sorted(self.jumps | inside(options.get("step_t")), key=lambda s: s * direction)
        self.next_stop = 0

    def first_step(self, func, t0: float, y0: Tensor, f0: Tensor) -> float:
        """Check that the start is finite; the first step size: ``options["first_step"]`` or
        Hairer's estimate (:func:`_initial_step`)."""
        check_finite(torch.cat([y0.reshape(-1), f0.reshape(-1)]), "initial state or its derivative", t0)
        # 0-d tensors, or tensors that broadcast to the state (per-component tolerances).
        self.rtol_tensor = torch.as_tensor(self.rtol, dtype=y0.dtype, device=y0.device)
        self.atol_tensor = torch.as_tensor(self.atol, dtype=y0.dtype, device=y0.device)
        if self.first is not None:
            return float(self.first)
        with torch.no_grad():
            return _initial_step(func, t0, y0.detach(), f0.detach(), self.direction, self.order, self.rtol_tensor,
                                 self.atol_tensor, self.norm)

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
        target = self.stops[self.next_stop] if self.next_stop < len(self.stops) else t_end
        h = min(h, self.max_step, abs(target - t))
        # Do not leave a sliver before the end (or a stop) for a needlessly tiny step.
        if abs(target - t) - h < 1e-3 * h:
            h = abs(target - t)
        t1 = target if h == abs(target - t) else t + self.direction * h
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

    def judge(self, step: Step) -> float:
        """The error ratio of ``step``: accept when it is at most 1 (NaN: reject)."""
        start, abs_start = self._abs
        if start is not step.y:  # first step, or the previous step was accepted
            abs_start = step.y.detach().abs()
        self._abs = (step.y, abs_start)
        return error_ratio(step.err, abs_start, step.y1, self.rtol_tensor, self.atol_tensor, self.norm)

    def is_jump(self, t1: float) -> bool:
        """Does ``f`` jump at ``t1`` (one of ``options["jump_t"]``)?"""
        return t1 in self.jumps

    def accept(self, ratio: float, t1: float) -> float:
        """Count the step ending at ``t1``; the factor for ``h`` after it (error ratio ``ratio <= 1``)."""
        if self.next_stop < len(self.stops) and t1 == self.stops[self.next_stop]:
            self.next_stop += 1
        self.stats.n_accepted += 1
        self.stats.step_times.append(t1)
        self.retries = 0
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
        self.retries = 0
        if self.nonfinite:  # the trial step overflowed: shrink hard and try again
            self.nonfinite_shrink *= self.dfactor
            self.n_nonfinite += 1
            return self.dfactor
        self.nonfinite_shrink = 1.0
        return min(1.0, max(self.dfactor, self.safety * ratio**-self.exponent))

    def retry(self, t: float, t1: float) -> float:
        """Count a step the stepper could not take (a singular ``W``); the factor for ``h`` (1/2)."""
        self.stats.n_rejected += 1
        self.retries += 1
        if self.retries > self.max_retries:
            raise RuntimeError(
                f"odeint: the Rosenbrock matrix W = I - h*gamma*J is singular at t={t:.6g} (h={t1 - t:.3g}) "
                f"after halving the step {self.max_retries} times. The Jacobian df/dy is degenerate "
                "there: check the dynamics, or use an explicit method such as 'dopri5'.")
        self.last_rejected = True
        return 0.5

    def finish(self, outputs: Tensor, t_out: Sequence[float]) -> None:
        """Raise if an output is not finite (accepted steps are, but dense output may overflow);
        one synchronisation per solve."""
        _check_outputs(outputs, t_out)


class FixedSteps:
    """The fixed-step methods' controller: the steps are a grid, every step is accepted.

    The grid is ``t_out`` itself; or, with ``options["step_size"] = dt``, ``t_0, t_0 + dt, ...`` up
    to ``t_N`` (generated as it is used, so ``t_N`` may be infinite: an event search); or
    ``options["grid"](t_out)``, a list (the front door's wrapping of ``grid_constructor``). Outputs in between come
    from the stepper's dense output. With ``options["perturb"]`` every grid point is treated as a jump
    of ``f`` (see :func:`integrate`).

    Nothing is checked while stepping (no per-step host synchronisation, no per-step kernel): a state
    that is not finite stays so, entry by entry, in every later step (each step is ``y`` plus an
    increment, and ``inf`` or NaN plus anything is not finite), and the last output is the last step's
    state, so :meth:`finish` checking the outputs once (one synchronisation) sees every non-finite
    state. Only when that check fails is the time found: :func:`integrate` re-runs the solve with
    ``checked=True``, which checks each step's state as it is made and raises at the first that is not
    finite, naming its end time. The re-run repeats every evaluation of ``func`` (only on this failing
    path, and without the hooks): a random or stateful ``func`` sees them (it draws more random numbers,
    its counters count them), and if the re-run does not reproduce the non-finite state between the
    last finite output time and the first non-finite one, the error names that interval instead.
    """

    adaptive = False

    def __init__(self, options: dict, t_out: Sequence[float], stats: SolverStats, checked: bool = False):
        t0, t1 = t_out[0], t_out[-1]
        self.direction = 1.0 if t1 >= t0 else -1.0
        self.step_size = options["step_size"]
        self.grid = options["grid"](t_out) if options.get("grid") is not None else None
        if self.step_size is None and self.grid is None:
            self.grid = list(t_out)
        self.t0, self.t_end = t0, t1
        # The number of steps: the grid's, or enough steps of step_size to reach t_end.
        self.n_steps = (len(self.grid) - 1 if self.grid is not None else
                        math.inf if math.isinf(t1) else max(1, math.ceil(abs(t1 - t0) / self.step_size - 1e-9)))
        self.limit = options.get("max_num_steps")
        if self.limit is not None and self.n_steps > self.limit and not math.isinf(self.n_steps):
            raise RuntimeError(
                f"odeint: max_num_steps={self.limit} would be reached at t={self.point(self.limit):.6g}: the grid "
                f"from {t0:.6g} to {t1:.6g} has {self.n_steps} steps. Raise options['max_num_steps'] or the step size.")
        self.perturb = bool(options.get("perturb", False))
        self.index, self.stats = 0, stats
        self.options, self.t_out, self.checked = options, t_out, checked
        # Nothing to decide or check per step: integrate() may run its short loop.
        self.plain = not (self.perturb or checked or math.isinf(self.n_steps))

    def rechecked(self) -> "FixedSteps":
        """A fresh controller for the same solve that checks every step's state (the locating re-run)."""
        return FixedSteps(self.options, self.t_out, SolverStats(), checked=True)

    def point(self, i: int) -> float:
        """The ``i``-th grid point."""
        if self.grid is not None:
            return self.grid[i]
        return self.t_end if i >= self.n_steps else self.t0 + self.direction * i * self.step_size

    def first_step(self, func, t0: float, y0: Tensor, f0: Tensor) -> float:
        return 0.0

    def next_step(self, t: float, h: float):
        if self.limit is not None and self.index >= self.limit:
            raise RuntimeError(f"odeint: max_num_steps={self.limit} reached at t={t:.6g} (integrating to "
                               f"{self.t_end:.6g}); raise options['max_num_steps'].")
        t1 = self.point(self.index + 1)
        return abs(t1 - t), t1

    def is_jump(self, t1: float) -> bool:
        return self.perturb and t1 != self.t_end

    def judge(self, step: Step) -> float:
        if self.checked:  # the locating re-run (see the class docstring): one synchronisation per step
            check_finite(step.y1, "solution", step.t1)
        return 0.0

    def accept(self, ratio: float, t1: float) -> float:
        self.index += 1
        self.stats.n_accepted += 1
        self.stats.step_times.append(t1)
        return 1.0

    def reject(self, ratio: float) -> float:  # never called: judge accepts every step
        raise AssertionError("a fixed-step method does not reject steps")

    def retry(self, t: float, t1: float) -> float:
        raise AssertionError("a fixed-step method does not retry steps")

    def finish(self, outputs: Tensor, t_out: Sequence[float]) -> None:
        """Raise if an output is not finite: in the re-run (every step's state was finite, so an
        output inside a step overflowed), naming its time; else :class:`Unlocated`, naming the
        interval it became non-finite in, for :func:`integrate` to locate by re-running."""
        if self.checked:
            _check_outputs(outputs, t_out)
        elif not _all_finite(outputs):
            bad = max(_first_non_finite(outputs, len(t_out)), 1)  # y0 not finite: so is the first step
            # The step whose state went non-finite ends after t_out[bad - 1] and no later than the
            # step containing t_out[bad] (an output inside a step uses the step's end state and stages).
            end = next(p for p in map(self.point, range(1, self.n_steps + 1))
                       if (p - t_out[bad]) * self.direction >= 0)
            raise Unlocated(t_out[bad - 1], t_out[bad], end)


class ReplaySteps(FixedSteps):
    """Steps that end exactly at ``ends``, the accepted step ends of an earlier adaptive solve over the
    same interval, every one accepted.

    The checkpointed adjoint re-solves each segment to backpropagate through it. An adaptive re-solve
    takes the forward's steps only if its arithmetic is bit for bit the same; with nondeterministic
    GPU kernels (atomics, cuDNN autotuning, TF32) an accept/reject decision at the margin can flip,
    and the gradient would belong to another discretisation than the forward's. Replaying the
    recorded steps cannot flip. Jumps of ``f`` (``options["jump_t"]``) are taken as the adaptive
    solve took them (their stages see the left limit).
    """

    def __init__(self, options: dict, t_out: Sequence[float], stats: SolverStats, ends: Sequence[float],
                 checked: bool = False):
        super().__init__({"step_size": None, "grid": None, "max_num_steps": None, "perturb": False}, t_out, stats,
                         checked)
        self.ends, self.jump_options = ends, options
        self.plain = False  # a replay decides its jumps step by step (is_jump): integrate() runs the general loop
        if not ends or ends[-1] != t_out[-1]:
            raise ValueError(f"replay: the step ends must finish at t_out[-1] = {t_out[-1]!r}, got "
                             f"{list(ends)[-3:]!r}")
        self.grid, self.n_steps = [t_out[0], *ends], len(ends)
        t0, t1 = t_out[0], t_out[-1]
        self.jumps = {float(s) for s in (options.get("jump_t") or ())
                      if (s - t0) * self.direction > 0 and (t1 - s) * self.direction > 0}

    def is_jump(self, t1: float) -> bool:
        return t1 in self.jumps

    def rechecked(self) -> "ReplaySteps":
        return ReplaySteps(self.jump_options, self.t_out, SolverStats(), self.ends, checked=True)


class Unlocated(FloatingPointError):
    """A fixed-step solve's output is not finite, and the step where its state became non-finite is
    not known yet: the outputs did so after ``t_a`` (the last finite output time) and by ``t_b``, so
    the step ends after ``t_a`` and by ``end`` (the end of the step containing ``t_b``)."""

    def __init__(self, t_a: float, t_b: float, end: float):
        super().__init__(
            f"odeint: the solution became non-finite (NaN or inf) between t={t_a:.6g} and t={t_b:.6g}; re-running "
            "the solve with a check at every step did not reproduce it there (are the dynamics random or "
            "stateful?). Check the dynamics for overflow or division by zero, or use a smaller step size.")
        self.t_a, self.end = t_a, end

    def explains(self, error: FloatingPointError) -> bool:
        """Does ``error`` (from the re-run) name a time in ``(t_a, end]``?"""
        t = getattr(error, "t", None)
        return t is not None and min(self.t_a, self.end) <= t <= max(self.t_a, self.end) and t != self.t_a


def _all_finite(outputs: Tensor) -> bool:
    """Is every entry finite? One reduction and one synchronisation: a sum is NaN or inf when an entry
    is (it may also overflow from finite entries; then the entries are looked at one by one)."""
    total = outputs.detach().sum()
    return math.isfinite(float(total)) or bool(torch.isfinite(outputs.detach()).all())


def _first_non_finite(outputs: Tensor, n_out: int) -> int:
    """The index of the first output (row of ``outputs``) with an entry that is not finite."""
    finite = torch.isfinite(outputs.detach().reshape(n_out, -1)).all(dim=1)
    return int((~finite).nonzero()[0])


def _check_outputs(outputs: Tensor, t_out: Sequence[float]) -> None:
    """Raise naming the first output time whose state is not finite; one synchronisation when all are."""
    if not _all_finite(outputs):
        bad = _first_non_finite(outputs, len(t_out))
        check_finite(outputs[bad].detach(), "solution", t_out[bad])


# ``hook(step, interpolate)``: ``interpolate(thetas)`` is the step's dense output at ``t + theta h``.
AcceptHook = Callable[[Step, Callable[[Sequence[float]], Tensor]], None]


# ``hook(t, y, h)``: a step of size ``h`` (signed) from ``(t, y)``, about to be attempted or just rejected.
StepHook = Callable[[float, Tensor, float], None]


def integrate(stepper: Stepper, control, func: Dynamics, y0: Tensor, t_out: Sequence[float],
              on_accept: Sequence[AcceptHook] = (), on_attempt: Sequence[StepHook] = (),
              on_reject: Sequence[StepHook] = ()) -> Tensor:
    """Integrate ``y' = func(t, y)`` from ``t_out[0]`` and return ``y`` at every time in ``t_out``.

    The loop: propose a step (``control.next_step``), take it (``stepper.attempt``), judge it
    (``control.judge``: the error ratio, or 0 for a fixed step); if accepted, advance
    (``stepper.accept``), call each hook in ``on_accept``, and emit every output time
    in ``(t, t1]``: ``y1`` itself on an exact hit, else one batched ``stepper.dense`` call for all
    the times inside the step. The steps never depend on the output times. A :class:`FixedSteps`
    solve to a finite time with no hooks and no ``perturb`` has nothing to propose, judge or
    call: it runs a shorter loop (:func:`_fixed_loop`) that makes the same stepper calls in the same
    order, so it computes the same numbers. Last, ``control.finish`` checks the outputs.

    Args:
        stepper: the method (see :class:`Stepper`).
        control: a :class:`StepControl` or :class:`FixedSteps` built for this solve.
        func: the dynamics on the flat state, ``func(t: float, y) -> Tensor`` like ``y``.
        y0: the initial state, any shape ``(*S)``.
        t_out: strictly monotonic output times (floats), ``t_out[0]`` the initial time.
        on_accept: callables ``hook(step, interpolate)`` run after every accepted step (before its
            outputs); ``interpolate(thetas)`` gives the states at ``step.t + theta * step.h``,
            shape ``(len(thetas), *S)`` (what a quadrature along the solution or an event needs).
        on_attempt, on_reject: callables ``hook(t, y, h)`` run before every attempted step and after
            every rejected one (torchdiffeq's ``callback_step`` and ``callback_reject_step``).

    Returns:
        The states at ``t_out``, stacked: shape ``(len(t_out), *S)``, with ``[0]`` equal to ``y0``.
    """
    if len(t_out) == 1:
        return y0.unsqueeze(0)
    if isinstance(control, FixedSteps) and control.plain and not (on_accept or on_attempt or on_reject):
        blocks = _fixed_loop(stepper, control, func, y0, t_out)
    else:
        blocks = _loop(stepper, control, func, y0, t_out, on_accept, on_attempt, on_reject)
    # Each block is a state (an exact hit) or a dense output's (m, *S) stack of states.
    if all(b.dim() == y0.dim() for b in blocks):
        outputs = torch.stack(blocks)
    else:
        outputs = torch.cat([b if b.dim() > y0.dim() else b.unsqueeze(0) for b in blocks])
    try:
        control.finish(outputs, t_out)
    except Unlocated as unlocated:
        # A fixed-step solve went non-finite somewhere: re-run it with a check at every step, which
        # raises naming the step's end time (see FixedSteps). Drop this solve's outputs (and their
        # graph) first; if the re-run does not fail in the same interval, the error names the interval.
        blocks = outputs = None
        try:
            integrate(stepper, control.rechecked(), func, y0, t_out)
        except FloatingPointError as located:
            if unlocated.explains(located):
                raise located from None
        raise unlocated from None
    return outputs


def _emit(stepper: Stepper, func: Dynamics, step: Step, t_out: Sequence[float], j: int, direction: float,
          blocks: List[Tensor]) -> int:
    """Append the outputs at the times ``t_out[j:]`` in ``(step.t, step.t1]`` to ``blocks``: ``step.y1``
    on an exact hit, one batched dense output (shape ``(m, *S)``) for those inside; the index of the
    next output time."""
    t, t1, n_out = step.t, step.t1, len(t_out)
    k = j
    while k < n_out and (t_out[k] - t1) * direction <= 0:
        k += 1
    if k > j:  # outputs in (t, t1]
        hit = t_out[k - 1] == t1
        inside = k - 1 if hit else k
        if inside > j:
            blocks.append(stepper.dense(func, step, [(s - t) / step.h for s in t_out[j:inside]]))
        if hit:
            blocks.append(step.y1)
    return k


def _fixed_loop(stepper: Stepper, control: "FixedSteps", func: Dynamics, y0: Tensor,
                t_out: Sequence[float]) -> List[Tensor]:
    """:func:`_loop` for a :class:`FixedSteps` solve with ``control.plain`` and no hooks: every step
    is accepted and nothing is checked, so each step is ``attempt``, ``accept`` and the outputs in
    it. The output blocks (see :func:`_emit`), for :func:`integrate` to stack."""
    direction, t_end, n_out, stats = control.direction, t_out[-1], len(t_out), control.stats
    t, y = t_out[0], y0
    stepper.start(func, t, y)
    blocks = [y0]
    j = 1
    ends = [control.point(i) for i in range(1, control.n_steps + 1)]
    for t1 in ends:
        step = stepper.attempt(func, t, y, t1)
        stepper.accept(func, step, t1 == t_end, None)
        if j < n_out and (t_out[j] - t1) * direction <= 0:
            j = _emit(stepper, func, step, t_out, j, direction, blocks)
        t, y = t1, step.y1
    control.index = len(ends)
    stats.n_accepted += len(ends)
    stats.step_times.extend(ends)
    return blocks


def _loop(stepper: Stepper, control, func: Dynamics, y0: Tensor, t_out: Sequence[float],
          on_accept: Sequence[AcceptHook], on_attempt: Sequence[StepHook], on_reject: Sequence[StepHook]
          ) -> List[Tensor]:
    """:func:`integrate`'s loop: the output blocks (see :func:`_emit`), for it to stack."""
    n_out = len(t_out)
    direction = control.direction
    t_end = t_out[-1]
    t, y = t_out[0], y0
    # With perturb (fixed steps), even the first step sees f just after t_0.
    f0 = stepper.start(func, math.nextafter(t, t_end) if control.perturb else t, y)
    h = control.first_step(func, t, y, f0)
    blocks = [y0]
    j = 1
    while j < n_out:
        h, t1 = control.next_step(t, h)
        for hook in on_attempt:
            hook(t, y, t1 - t)
        jump = control.is_jump(t1)
        if jump:  # f jumps at t1: this step's stages see its left limit (torchdiffeq's perturb)
            left = math.nextafter(t1, t)
            step = stepper.attempt(lambda s, x: func(s if (t1 - s) * direction > 0 else left, x), t, y, t1)
        else:
            step = stepper.attempt(func, t, y, t1)
        if step is None:  # the stepper could not take this step: retry a smaller one (counts as rejected)
            for hook in on_reject:
                hook(t, y, t1 - t)
            h = h * control.retry(t, t1)
            continue
        ratio = control.judge(step)
        if ratio != ratio and bool(getattr(step, "singular", False)):
            # A Rosenbrock step whose W was singular (its error is NaN): retry a smaller one, as
            # above. The flag is read only here, on a NaN ratio, so it costs no synchronisation
            # on the steps that go well.
            for hook in on_reject:
                hook(t, y, t1 - t)
            h = h * control.retry(t, t1)
            continue
        if ratio <= 1.0:  # accept (False for NaN)
            step.jump = jump
            # After a jump the next step starts afresh from f's right limit (no FSAL across it).
            stepper.accept(func, step, t1 == t_end, math.nextafter(t1, t_end) if jump and t1 != t_end else None)
            for hook in on_accept:
                hook(step, lambda thetas, step=step: stepper.dense(func, step, thetas))
            j = _emit(stepper, func, step, t_out, j, direction, blocks)
            t, y = t1, step.y1
            h = h * control.accept(ratio, t1)
        else:
            for hook in on_reject:
                hook(t, y, t1 - t)
            h = h * control.reject(ratio)
    return blocks
