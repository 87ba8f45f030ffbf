"""Butcher tableaux of explicit Runge-Kutta methods, checked when they are built.

An explicit ``s``-stage Runge-Kutta method for :math:`y' = f(t, y)` takes a step of size ``h``:

.. math::

    k_i = f\\Big(t + c_i h,\\; y + h \\sum_{j<i} a_{ij} k_j\\Big), \\qquad
    y_{n+1} = y_n + h \\sum_i b_i k_i .

An embedded pair also carries a second weight vector :math:`\\hat b` of lower order; the
difference :math:`h \\sum_i (b_i - \\hat b_i) k_i` estimates the local error and drives the
step-size controller (Hairer, Norsett & Wanner, *Solving ODEs I*, section II.4).

Coefficients are written as exact fractions so that the consistency conditions are checked
exactly; the engine converts them to the state's dtype once per solve.
"""

from __future__ import annotations

from dataclasses import dataclass
from fractions import Fraction
from typing import Optional, Sequence, Tuple

__all__ = ["ButcherTableau", "TABLEAUS"]

Row = Tuple[Fraction, ...]


def _fractions(values: Sequence) -> Row:
    return tuple(Fraction(v) for v in values)


@dataclass(frozen=True)
class ButcherTableau:
    """An explicit Runge-Kutta method, optionally with an embedded error estimator.

    Args:
        name: the method's name as ``odeint`` accepts it.
        order: the order ``p`` of the solution the method propagates.
        c: nodes, length ``s``; ``c[0]`` must be 0 (explicit method).
        a: strictly lower-triangular coefficients; row ``i`` has ``i`` entries.
        b: weights of the propagated solution, length ``s``.
        b_error: ``b - b_hat`` for an embedded pair (length ``s``), else ``None``.
        error_order: order of the embedded lower-order solution ``b_hat``.
        fsal: "first same as last": the last stage is ``f(t + h, y_{n+1})``, so it can be
            reused as the first stage of the next step.
        c_mid: optional weights giving ``y(t + h/2) ~ y + h * sum(c_mid[i] * k[i])``, used with the
            end-point values and slopes to build a quartic continuous extension (dense output).

    Raises:
        ValueError: when the coefficients are inconsistent (row sums differ from ``c``,
            weights do not sum to 1, error weights do not sum to 0, wrong lengths).
    """

    name: str
    order: int
    c: Row
    a: Tuple[Row, ...]
    b: Row
    b_error: Optional[Row] = None
    error_order: Optional[int] = None
    fsal: bool = False
    c_mid: Optional[Row] = None

    def __post_init__(self) -> None:
        s = len(self.c)
        problems = []
        if s == 0 or self.c[0] != 0:
            problems.append("c[0] must be 0 for an explicit method")
        if len(self.a) != s - 1:
            problems.append(f"a needs {s - 1} rows (one per stage after the first), got {len(self.a)}")
        for i, row in enumerate(self.a, start=1):
            if len(row) != i:
                problems.append(f"row {i} of a needs {i} entries, got {len(row)}")
            elif sum(row) != self.c[i]:
                problems.append(f"row {i} of a sums to {sum(row)}, but c[{i}] = {self.c[i]}")
        if len(self.b) != s or sum(self.b) != 1:
            problems.append(f"b needs {s} weights summing to 1, got {len(self.b)} summing to {sum(self.b)}")
        if (self.b_error is None) != (self.error_order is None):
            problems.append("b_error and error_order go together")
        if self.b_error is not None and (len(self.b_error) != s or sum(self.b_error) != 0):
            problems.append(f"b_error needs {s} entries summing to 0")
        if self.fsal and (self.a[-1] != self.b[:-1] or self.b[-1] != 0 or self.c[-1] != 1):
            problems.append("an FSAL method's last row of a must equal b (whose last weight is 0), with c[-1] = 1")
        if self.c_mid is not None and (len(self.c_mid) != s or sum(self.c_mid) != Fraction(1, 2)):
            problems.append(f"c_mid needs {s} entries summing to 1/2")
        if problems:
            raise ValueError(f"invalid Butcher tableau {self.name!r}: " + "; ".join(problems))

    @property
    def stages(self) -> int:
        """Number of stages ``s`` (function evaluations per step, before FSAL reuse)."""
        return len(self.c)

    @property
    def adaptive(self) -> bool:
        """True for an embedded pair, which can estimate its own error."""
        return self.b_error is not None


def _tableau(name, order, c, a, b, b_hat=None, error_order=None, fsal=False, c_mid=None):
    b = _fractions(b)
    b_error = None if b_hat is None else tuple(bi - Fraction(bh) for bi, bh in zip(b, b_hat))
    return ButcherTableau(
        name=name,
        order=order,
        c=_fractions(c),
        a=tuple(_fractions(row) for row in a),
        b=b,
        b_error=b_error,
        error_order=error_order,
        fsal=fsal,
        c_mid=None if c_mid is None else _fractions(c_mid),
    )


F = Fraction

EULER = _tableau("euler", 1, c=[0], a=[], b=[1])

MIDPOINT = _tableau("midpoint", 2, c=[0, F(1, 2)], a=[[F(1, 2)]], b=[0, 1])

RK4 = _tableau(
    "rk4",
    4,
    c=[0, F(1, 2), F(1, 2), 1],
    a=[[F(1, 2)], [0, F(1, 2)], [0, 0, 1]],
    b=[F(1, 6), F(1, 3), F(1, 3), F(1, 6)],
)

# Dormand & Prince (1980), the 5(4) pair with FSAL. The dense-output midpoint weights are
# Shampine's (1986), as used by MATLAB's ode45 and torchdiffeq.
_DOPRI5_B = [F(35, 384), 0, F(500, 1113), F(125, 192), F(-2187, 6784), F(11, 84), 0]
DOPRI5 = _tableau(
    "dopri5",
    5,
    c=[0, F(1, 5), F(3, 10), F(4, 5), F(8, 9), 1, 1],
    a=[
        [F(1, 5)],
        [F(3, 40), F(9, 40)],
        [F(44, 45), F(-56, 15), F(32, 9)],
        [F(19372, 6561), F(-25360, 2187), F(64448, 6561), F(-212, 729)],
        [F(9017, 3168), F(-355, 33), F(46732, 5247), F(49, 176), F(-5103, 18656)],
        _DOPRI5_B[:6],
    ],
    b=_DOPRI5_B,
    b_hat=[F(5179, 57600), 0, F(7571, 16695), F(393, 640), F(-92097, 339200), F(187, 2100), F(1, 40)],
    error_order=4,
    fsal=True,
    c_mid=[
        F(6025192743, 30085553152) / 2,
        0,
        F(51252292925, 65400821598) / 2,
        F(-2691868925, 45128329728) / 2,
        F(187940372067, 1594534317056) / 2,
        F(-1776094331, 19743644256) / 2,
        F(11237099, 235043384) / 2,
    ],
)

#: Every method ``odeint`` knows, by name. Adding a Runge-Kutta method is one tableau here.
TABLEAUS = {tab.name: tab for tab in (EULER, MIDPOINT, RK4, DOPRI5)}
