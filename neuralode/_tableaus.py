"""Butcher tableaux of explicit Runge-Kutta methods, checked when they are built.

An explicit ``s``-stage Runge-Kutta method for :math:`y' = f(t, y)` takes a step of size ``h``:

.. math::

    k_i = f\\Big(t + c_i h,\\; y + h \\sum_{j<i} a_{ij} k_j\\Big), \\qquad
    y_{n+1} = y_n + h \\sum_i b_i k_i .

An embedded pair also carries a second weight vector :math:`\\hat b` of lower order; the
difference :math:`h \\sum_i (b_i - \\hat b_i) k_i` estimates the local error and drives the
step-size controller (Hairer, Norsett & Wanner, *Solving ODEs I*, section II.4).

Coefficients are written as exact fractions so that the consistency conditions are checked
exactly; the stepper converts them to Python floats once per tableau.
"""

from __future__ import annotations

from dataclasses import dataclass
from fractions import Fraction
from typing import Optional, Sequence, Tuple

__all__ = ["ButcherTableau", "EXPLICIT_TABLEAUS"]

Row = Tuple[Fraction, ...]


def _fractions(values: Sequence) -> Row:
    return tuple(Fraction(v) for v in values)


def _close(x: Fraction, y: Fraction) -> bool:
    """Exact for tableaux given as fractions; allows rounding for ones published as decimals."""
    return abs(x - y) <= Fraction(1, 10**14)


def _quartic_through_midpoint(b: Row, c_mid: Row) -> Tuple[Row, ...]:
    """Per-stage weights of the quartic through ``y0, y_mid, y1`` with slopes ``f0, f1``.

    For an FSAL method ``f0 = k_1`` and ``f1 = k_s``; ``y1 - y0 = h sum b_i k_i`` and
    ``y_mid - y0 = h sum c_mid_i k_i``. Solving the five interpolation conditions for
    ``p(theta) = y0 + theta h f0 + C2 theta^2 + C3 theta^3 + C4 theta^4`` gives
    ``C2 = h(-4 f0 + f1) - 5 dy + 16 dm``, ``C3 = h(5 f0 - 3 f1) + 14 dy - 32 dm`` and
    ``C4 = h(-2 f0 + 2 f1) - 8 dy + 16 dm`` with ``dy = y1 - y0`` and ``dm = y_mid - y0``.
    """
    s = len(b)
    rows = []
    for i in range(s):
        first, last = int(i == 0), int(i == s - 1)
        rows.append((
            Fraction(first),
            -4 * first + last - 5 * b[i] + 16 * c_mid[i],
            5 * first - 3 * last + 14 * b[i] - 32 * c_mid[i],
            -2 * first + 2 * last - 8 * b[i] + 16 * c_mid[i],
        ))
    return tuple(rows)


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
        dense: optional continuous extension (dense output): for each stage ``i`` the
            coefficients ``(d_i1, ..., d_im)`` of ``b_i(theta) = sum_m d_im theta^m``, so that
            ``y(t + theta h) ~ y + h sum_i b_i(theta) k_i`` for ``theta`` in [0, 1]. Continuity
            requires ``b_i(1) = b_i``. Without it the stepper uses cubic Hermite interpolation.

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
    dense: Optional[Tuple[Row, ...]] = None

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
            elif not _close(sum(row), self.c[i]):
                problems.append(f"row {i} of a sums to {sum(row)}, but c[{i}] = {self.c[i]}")
        if len(self.b) != s or not _close(sum(self.b), 1):
            problems.append(f"b needs {s} weights summing to 1, got {len(self.b)} summing to {sum(self.b)}")
        if (self.b_error is None) != (self.error_order is None):
            problems.append("b_error and error_order go together")
        if self.b_error is not None and (len(self.b_error) != s or not _close(sum(self.b_error), 0)):
            problems.append(f"b_error needs {s} entries summing to 0")
        if self.fsal and (self.a[-1] != self.b[:-1] or self.b[-1] != 0 or self.c[-1] != 1):
            problems.append("an FSAL method's last row of a must equal b (whose last weight is 0), with c[-1] = 1")
        if self.dense is not None:
            if len(self.dense) != s:
                problems.append(f"dense needs {s} rows, one per stage")
            elif not all(_close(sum(d), bi) for d, bi in zip(self.dense, self.b)):
                problems.append("dense output must reach the step's end: each row of dense must sum to b_i")
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

    def stability_function(self, z):
        r"""The method's stability function at ``z = h lambda`` (complex array or scalar).

        One step on the test equation :math:`y' = \lambda y` multiplies :math:`y` by

        .. math::

            R(z) = 1 + z\, b^\top (I - zA)^{-1} \mathbf 1 = 1 + \sum_{k \ge 1} z^k\, b^\top A^{k-1} \mathbf 1,

        a polynomial of degree at most ``s`` for an explicit method (:math:`A` is nilpotent). The
        method is stable on the test equation where :math:`|R(z)| \le 1` (HNW II, section IV.2).

        Returns:
            ``R(z)`` as a complex NumPy array shaped like ``z``.
        """
        return _stability_function(((),) + tuple(self.a), self.b, z)


def _stability_function(rows: Sequence[Sequence], b: Sequence, z):
    r""":math:`R(z) = 1 + z\, b^\top (I - zM)^{-1} \mathbf 1` at a complex array ``z``, for the
    lower-triangular ``s x s`` matrix ``M`` whose row ``i`` starts with the entries ``rows[i]`` (the
    rest zero): a Runge-Kutta matrix ``A``, or a Rosenbrock method's ``(alpha_ij + gamma_ij)``.
    ``(I - zM) v = 1`` is solved by forward substitution, stage by stage as a step computes it.
    Returns a complex NumPy array shaped like ``z``."""
    import numpy as np

    z = np.asarray(z, dtype=complex)
    v = []
    for i, row in enumerate(rows):
        acc = np.ones_like(z)
        for j, m in enumerate(row[:i]):
            acc = acc + z * float(m) * v[j]
        diagonal = float(row[i]) if len(row) > i else 0.0
        v.append(acc / (1 - z * diagonal))
    return 1 + z * sum(float(w) * vi for w, vi in zip(b, v))


def _tableau(name, order, c, a, b, b_hat=None, error_order=None, fsal=False, c_mid=None, dense=None):
    b = _fractions(b)
    b_error = None if b_hat is None else tuple(bi - Fraction(bh) for bi, bh in zip(b, b_hat))
    if c_mid is not None:
        dense = _quartic_through_midpoint(b, _fractions(c_mid))
    return ButcherTableau(
        name=name,
        order=order,
        c=_fractions(c),
        a=tuple(_fractions(row) for row in a),
        b=b,
        b_error=b_error,
        error_order=error_order,
        fsal=fsal,
        dense=None if dense is None else tuple(_fractions(row) for row in dense),
    )


F = Fraction

EULER = _tableau("euler", 1, c=[0], a=[], b=[1])

MIDPOINT = _tableau("midpoint", 2, c=[0, F(1, 2)], a=[[F(1, 2)]], b=[0, 1])

HEUN2 = _tableau("heun2", 2, c=[0, 1], a=[[1]], b=[F(1, 2), F(1, 2)])

# Heun's third-order method (K. Heun, Z. Math. Phys. 45 (1900), 23-38; HNW I, section II.1;
# J. C. Butcher, *Numerical Methods for Ordinary Differential Equations*): torchdiffeq's "heun3".
HEUN3 = _tableau("heun3", 3, c=[0, F(1, 3), F(2, 3)], a=[[F(1, 3)], [0, F(2, 3)]], b=[F(1, 4), 0, F(3, 4)])

# Heun's method with Euler embedded: the cheapest adaptive pair, 2(1).
ADAPTIVE_HEUN = _tableau("adaptive_heun", 2, c=[0, 1], a=[[1]], b=[F(1, 2), F(1, 2)], b_hat=[1, 0],
                         error_order=1)

# Bogacki & Shampine (1989), 3(2) with FSAL: scipy's RK23, MATLAB's ode23.
BOSH3 = _tableau(
    "bosh3",
    3,
    c=[0, F(1, 2), F(3, 4), 1],
    a=[[F(1, 2)], [0, F(3, 4)], [F(2, 9), F(1, 3), F(4, 9)]],
    b=[F(2, 9), F(1, 3), F(4, 9), 0],
    b_hat=[F(7, 24), F(1, 4), F(1, 3), F(1, 8)],
    error_order=2,
    fsal=True,
)

RK4 = _tableau(
    "rk4",
    4,
    c=[0, F(1, 2), F(1, 2), 1],
    a=[[F(1, 2)], [0, F(1, 2)], [0, 0, 1]],
    b=[F(1, 6), F(1, 3), F(1, 3), F(1, 6)],
)

# Kutta's 3/8 rule (W. Kutta, Z. Math. Phys. 46 (1901), 435-453; HNW I, section II.1), the other
# fourth-order method of Kutta's paper. torchdiffeq calls it "rk4"; here "rk4" is the classical
# scheme above. Both have four stages and order 4, hence the same stability function.
RK4_38 = _tableau(
    "rk4_38",
    4,
    c=[0, F(1, 3), F(2, 3), 1],
    a=[[F(1, 3)], [F(-1, 3), 1], [1, -1, 1]],
    b=[F(1, 8), F(3, 8), F(3, 8), F(1, 8)],
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

# Tsitouras (2011), a 5(4) FSAL pair that drops the second simplifying assumption and so has a
# smaller error constant than dopri5. The coefficients are published as decimals (the paper's
# Table 1 and its fourth-order continuous extension), so the tableau checks hold to rounding.
_TSIT5_B = [0.09646076681806523, 0.01, 0.4798896504144996, 1.379008574103742, -3.290069515436081,
            2.324710524099774, 0]
_TSIT5_ERROR = [-0.00178001105222577714, -0.0008164344596567469, 0.007880878010261995,
                -0.1447110071732629, 0.5823571654525552, -0.45808210592918697, 0.015151515151515152]
TSIT5 = _tableau(
    "tsit5",
    5,
    c=[0, 0.161, 0.327, 0.9, 0.9800255409045097, 1, 1],
    a=[
        [0.161],
        [-0.008480655492356989, 0.335480655492357],
        [2.8971530571054935, -6.359448489975075, 4.3622954328695815],
        [5.325864828439257, -11.748883564062828, 7.4955393428898365, -0.09249506636175525],
        [5.86145544294642, -12.92096931784711, 8.159367898576159, -0.071584973281401,
         -0.028269050394068383],
        _TSIT5_B[:6],
    ],
    b=_TSIT5_B,
    b_hat=[Fraction(b) - Fraction(e) for b, e in zip(_TSIT5_B, _TSIT5_ERROR)],
    error_order=4,
    fsal=True,
    dense=[
        [1.0, -2.763706197274826, 2.9132554618219126, -1.0530884977290216],
        [0.0, 0.1317, -0.2234, 0.1017],
        [0.0, 3.9302962368947516, -5.941033872131505, 2.490627285651253],
        [0.0, -12.411077166933676, 30.33818863028232, -16.548102889244902],
        [0.0, 37.50931341651104, -88.1789048947664, 47.37952196281928],
        [0.0, -27.896526289197286, 65.09189467479366, -34.87065786149661],
        [0.0, 1.5, -4.0, 2.5],
    ],
)

#: Every method ``odeint`` knows, by name: the explicit tableaux below and, registered by
#: ``neuralode._odeint``, the Rosenbrock methods for stiff problems (:class:`RosenbrockTableau`).
#: Adding an explicit Runge-Kutta method is one tableau here.
#: The explicit methods, by name (the registry of every method is ``neuralode._methods``).
EXPLICIT_TABLEAUS = {tab.name: tab for tab in (EULER, MIDPOINT, HEUN2, HEUN3, RK4, RK4_38, ADAPTIVE_HEUN, BOSH3,
                                               DOPRI5, TSIT5)}
