"""The explicit Runge-Kutta stepper: one step of any :class:`~neuralode.ButcherTableau`.

For :math:`y' = f(t, y)` a step of size ``h`` computes the stages and the new state

.. math::

    k_i = f\\Big(t + c_i h,\\; y + h \\sum_{j<i} a_{ij} k_j\\Big), \\qquad
    y_{n+1} = y_n + h \\sum_i b_i k_i ,

and, for an embedded pair, the local error estimate :math:`h \\sum_i (b_i - \\hat b_i) k_i`
(HNW I, section II.4). With FSAL ("first same as last") the last stage is
:math:`f(t_{n+1}, y_{n+1})` and becomes the next step's first. Outputs inside a step come from the
tableau's continuous extension (HNW I, section II.6), or else from the cubic Hermite interpolant
through the step's end values and slopes; all the outputs inside one step are evaluated together,
as one matrix product. The loop that drives the steps is :func:`neuralode._loop.integrate`.
"""

from __future__ import annotations

import functools
import math
from typing import List, Optional, Sequence, Tuple

import torch
from torch import Tensor

from ._loop import Dynamics, SolverStats, Step
from ._tableaus import ButcherTableau

__all__ = ["ExplicitRK"]


class _Coefficients:
    """A tableau's coefficients as Python floats (read-only once built; one per tableau)."""

    def __init__(self, tableau: ButcherTableau):
        self.c = [float(x) for x in tableau.c]
        # Each stage's argument and the new state as (stage index, weight) pairs, zeros dropped.
        self.rows = [_nonzero(row) for row in tableau.a]
        self.stages = list(zip(self.c[1:], self.rows))  # (c_i, row i of a) for the stages after the first
        self.b = _nonzero(tableau.b)
        self.b_error_pairs = None if tableau.b_error is None else _nonzero(tableau.b_error)
        # dense[m][i]: the coefficient of theta^(m+1) in b_i(theta).
        self.dense = None if tableau.dense is None else [[float(x) for x in col] for col in zip(*tableau.dense)]
        self._dense_tensors = {}

    def dense_matrix(self, dtype: torch.dtype, device: torch.device) -> Tensor:
        """:attr:`dense` as an ``(M, s)`` tensor, made once per dtype and device."""
        key = (dtype, device)
        if key not in self._dense_tensors:
            self._dense_tensors[key] = torch.tensor(self.dense, dtype=dtype, device=device)
        return self._dense_tensors[key]


def _nonzero(weights) -> List[Tuple[int, float]]:
    return [(j, float(w)) for j, w in enumerate(weights) if w != 0]


def _weighted(h: float, pairs: List[Tuple[int, float]], ks: Sequence[Tensor]) -> Tensor:
    """``h * sum_j w_j ks[j]`` over the nonzero ``(j, w_j)``."""
    (j, w), *rest = pairs
    out = ks[j] * (h * w)
    for j, w in rest:
        out.add_(ks[j], alpha=h * w)
    return out


def _advance(y: Tensor, h: float, pairs: List[Tuple[int, float]], ks: Sequence[Tensor]) -> Tensor:
    """``y + h * sum_j w_j ks[j]`` over the nonzero ``(j, w_j)``: one new tensor, updated in place."""
    (j, w), *rest = pairs
    out = torch.add(y, ks[j], alpha=h * w)
    for j, w in rest:
        out.add_(ks[j], alpha=h * w)
    return out


@functools.lru_cache(maxsize=None)
def _coefficients(tableau: ButcherTableau) -> _Coefficients:
    """Converting the fractions on every solve sat on the hot path: once per tableau."""
    return _Coefficients(tableau)


class _RKStep(Step):
    __slots__ = ("ks",)

    def __init__(self, t: float, t1: float, y: Tensor, y1: Tensor, err: Optional[Tensor], ks: List[Tensor]):
        super().__init__(t, t1, y, y1, err)
        self.ks = ks  # the stages k_1, ..., k_s


class ExplicitRK:
    """Steps of an explicit Runge-Kutta method, for :func:`neuralode._loop.integrate`.

    Args:
        tableau: the method.
        options: the solve's options (unused: an explicit step needs none).
        stats: the solve's counters (the loop and the dynamics' wrapper count; nothing here).
        shape: the user's state shape (unused).
    """

    def __init__(self, tableau: ButcherTableau, options: dict, stats: SolverStats, shape: torch.Size):
        self.co = _coefficients(tableau)
        self.fsal = tableau.fsal
        self.order, self.error_order = tableau.order, tableau.error_order
        self.f0: Optional[Tensor] = None  # f at the start of the next step, once known
        # Fixed-step methods may ask for linear interpolation between the step's ends (torchdiffeq's default).
        self.linear = options.get("interp") == "linear"

    def start(self, func: Dynamics, t0: float, y0: Tensor) -> Tensor:
        self.f0 = func(t0, y0)
        return self.f0

    def attempt(self, func: Dynamics, t: float, y: Tensor, t1: float) -> _RKStep:
        """One step from ``(t, y)`` to ``t1``; ``y1`` is the last stage's argument for an FSAL method."""
        co, h = self.co, t1 - t
        if self.f0 is None:
            self.f0 = func(t, y)
        ks = [self.f0]
        yi = y
        for ci, pairs in co.stages:
            yi = _advance(y, h, pairs, ks) if pairs else y
            ks.append(func(t + ci * h, yi))
        y1 = yi if self.fsal else _advance(y, h, co.b, ks)
        err = None
        if co.b_error_pairs is not None:
            # Step-size control needs no gradients: detached stages (cheaper than entering no_grad).
            err = _weighted(h, co.b_error_pairs, [k.detach() for k in ks])
        return _RKStep(t, t1, y, y1, err, ks)

    def accept(self, func: Dynamics, step: _RKStep, last: bool, start: Optional[float] = None) -> None:
        # With FSAL the next step's first stage is this one's last; otherwise it is evaluated when
        # needed (by the next step, or by the Hermite interpolant, which needs it at t1 too). Past a
        # jump of f it is evaluated afresh at ``start``, just after t1.
        if start is not None:
            self.f0 = func(start, step.y1)
        else:
            self.f0 = step.ks[-1] if self.fsal else None

    def dense(self, func: Dynamics, step: _RKStep, thetas: Sequence[float]) -> Tensor:
        """``y(t + theta h)`` for each ``theta``, stacked: ``(len(thetas), *y.shape)``.

        With the tableau's dense-output weights it is ``y + h sum_i b_i(theta) k_i`` (fourth order
        for dopri5 and tsit5); otherwise the cubic Hermite interpolant through ``(y, f(t, y))`` and
        ``(y1, f(t1, y1))`` (third order), or, with ``options["interp"] == "linear"`` (fixed-step
        methods), the chord from ``y`` to ``y1`` (second order). All the ``thetas`` at once: one weighted sum of the basis
        tensors, each weight a column over the thetas, so the operations per step do not grow with
        the number of outputs in it, nothing is copied for the backward pass, and each output is the
        same number whether or not autograd records (and however many outputs share the step).
        """
        y, h, co = step.y, step.h, self.co
        if co.dense is not None:
            basis, offset = step.ks, y
            # h b_i(theta) for every theta and stage: the powers h theta^(m+1) times the coefficients.
            powers = torch.tensor([[h * th ** (m + 1) for m in range(len(co.dense))] for th in thetas],
                                  dtype=y.dtype, device=y.device)
            columns = torch.mm(co.dense_matrix(y.dtype, y.device).T, powers.T)  # (s, m)
        elif self.linear:  # y0 (1 - th) + y1 th
            basis, offset = [y, step.y1], None
            columns = torch.tensor([[1 - th for th in thetas], list(thetas)], dtype=y.dtype, device=y.device)
        else:
            if self.fsal:  # the end slope is the last stage (the left limit, if f jumps at t1)
                f1 = step.ks[-1]
            elif step.jump:
                f1 = func(math.nextafter(step.t1, step.t), step.y1)
            else:
                if self.f0 is None:  # the end slope, also the next step's first stage
                    self.f0 = func(step.t1, step.y1)
                f1 = self.f0
            # Hermite basis: y0 (1 - 3 th^2 + 2 th^3) + y1 (3 th^2 - 2 th^3) + h f0 th (1 - th)^2
            # + h f1 th^2 (th - 1).
            basis, offset = [y, step.y1, step.ks[0], f1], None
            rows = [[1 - 3 * th * th + 2 * th**3, 3 * th * th - 2 * th**3,
                     h * (th - 2 * th * th + th**3), h * (th**3 - th * th)] for th in thetas]
            columns = torch.tensor(rows, dtype=y.dtype, device=y.device).T  # (4, m)
        # weights[i]: basis i's weights over the thetas, shaped (m, 1, ..., 1) to broadcast against it.
        weights = columns.reshape(len(basis), len(thetas), *[1] * y.dim()).unbind()
        if offset is None:
            out = basis[0] * weights[0]
        else:
            out = torch.addcmul(offset, weights[0], basis[0])
        for w, k in zip(weights[1:], basis[1:]):
            out.addcmul_(w, k)
        return out
