"""The registry of every method :func:`neuralode.odeint` knows, built here and nowhere else.

A method is a tableau, the stepper that turns it into steps, and the options it accepts. Adding an
explicit Runge-Kutta method is one :class:`~neuralode.ButcherTableau` in :mod:`neuralode._tableaus`
and one line below.
"""

from __future__ import annotations

from typing import Callable, Dict, NamedTuple, Optional, Sequence, Tuple, Union

import torch
from torch import Tensor

from ._loop import ADAPTIVE_OPTIONS, FIXED_OPTIONS, FixedSteps, ReplaySteps, SolverStats, StepControl, integrate
from ._rk import ExplicitRK
from ._rosenbrock import RODAS4, ROSENBROCK_OPTIONS, Rosenbrock, RosenbrockTableau
from ._tableaus import EXPLICIT_TABLEAUS as _EXPLICIT
from ._tableaus import ButcherTableau

__all__ = ["Method", "REGISTRY", "TABLEAUS", "METHODS", "solve"]


class Method(NamedTuple):
    """A method: its coefficients, the stepper class that takes its steps, its options' defaults, and
    whether it solves linear systems with the Jacobian (then its cost per step grows like the cube
    of the state's size, and the adjoint keeps the parameters out of the state it solves for)."""

    tableau: Union[ButcherTableau, RosenbrockTableau]
    stepper: Callable
    defaults: dict
    implicit: bool = False

    @property
    def adaptive(self) -> bool:
        return self.tableau.adaptive


def _explicit(name: str) -> Method:
    tableau = _EXPLICIT[name]
    return Method(tableau, ExplicitRK, ADAPTIVE_OPTIONS if tableau.adaptive else FIXED_OPTIONS)


#: Every method by name, in the order ``odeint``'s documentation lists them.
REGISTRY: Dict[str, Method] = {
    "euler": _explicit("euler"),
    "midpoint": _explicit("midpoint"),
    "heun2": _explicit("heun2"),
    "heun3": _explicit("heun3"),
    "rk4": _explicit("rk4"),
    "rk4_38": _explicit("rk4_38"),
    "adaptive_heun": _explicit("adaptive_heun"),
    "bosh3": _explicit("bosh3"),
    "dopri5": _explicit("dopri5"),
    "tsit5": _explicit("tsit5"),
    "rodas4": Method(RODAS4, Rosenbrock, ROSENBROCK_OPTIONS, implicit=True),
}

#: Each method's coefficients by name (``node.TABLEAUS["dopri5"]``).
TABLEAUS: Dict[str, Union[ButcherTableau, RosenbrockTableau]] = {name: m.tableau for name, m in REGISTRY.items()}
#: Names accepted by ``odeint(method=...)``.
METHODS: Tuple[str, ...] = tuple(REGISTRY)


def solve(method: Method, func: Callable[[float, Tensor], Tensor], y0: Tensor, t_out: Sequence[float], *,
          rtol: Union[float, Tensor], atol: Union[float, Tensor], norm: Callable[[Tensor], Tensor], options: dict, stats: SolverStats,
          shape: Optional[torch.Size] = None, on_accept: Sequence[Callable] = (),
          on_attempt: Sequence[Callable] = (), on_reject: Sequence[Callable] = (),
          replay: Optional[Sequence[float]] = None) -> Tensor:
    """Integrate ``y' = func(t, y)`` with ``method`` and return ``y`` at every time in ``t_out``.

    Args:
        method: a :class:`Method` from :data:`REGISTRY`.
        func: the dynamics on the flat state, ``func(t: float, y) -> Tensor`` like ``y``. For a
            Rosenbrock method ``t`` may also be a 0-d tensor (the Jacobian evaluation
            differentiates with respect to it).
        y0: initial state, any shape ``(*S)``.
        t_out: strictly monotonic output times (floats), ``t_out[0]`` the initial time.
        rtol, atol, norm: the error control of the adaptive methods (numbers, or tensors that broadcast
            to ``y0``; ``norm`` e.g.
            :func:`neuralode._loop.rms_norm`).
        options: every key of ``method.defaults``, filled in.
        stats: counters, updated in place.
        shape: the user's state shape when ``y0`` is its flattened copy (Rosenbrock methods with
            ``options["jacobian"] == "batched"``); default ``y0.shape``.
        on_accept, on_attempt, on_reject: hooks run after every accepted step, before every
            attempted one and after every rejected one (see :func:`neuralode._loop.integrate`).
        replay: for an adaptive method, the accepted step ends of an earlier solve over ``t_out``
            (``stats.step_times``): take exactly those steps, accepting each
            (:class:`neuralode._loop.ReplaySteps`), instead of choosing steps again.

    Returns:
        The states at ``t_out``: shape ``(len(t_out), *S)``.
    """
    if len(t_out) == 1:
        return y0.unsqueeze(0)
    stepper = method.stepper(method.tableau, options, stats, y0.shape if shape is None else shape)
    if method.adaptive and replay is not None:
        control = ReplaySteps(options, t_out, stats, replay)
    elif method.adaptive:
        control = StepControl(options, stepper, t_out, rtol, atol, norm, stats)
    else:
        control = FixedSteps(options, t_out, stats)
    return integrate(stepper, control, func, y0, t_out, on_accept, on_attempt, on_reject)
