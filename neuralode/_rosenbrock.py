r"""An adaptive Rosenbrock (linearly implicit) method for stiff problems: ``method="rodas4"``.

**Why a Rosenbrock method.** An explicit method's step on a stiff problem is bounded by stability,
not accuracy: dopri5 on Robertson's kinetics needs ~1e5 steps where the solution is nearly
constant. A Rosenbrock method is implicit in the linear part only: each step factorises one
matrix :math:`W = I - h\gamma J` with :math:`J = \partial f / \partial y (t_n, y_n)` and gets
every stage from a linear solve; no Newton iteration, no convergence test. That suits autograd
well: the Jacobian, the LU factorisation and the triangular solves are ordinary differentiable
torch operations, so backpropagation through the solver works as for the explicit methods.

**Why RODAS.** Hairer & Wanner's RODAS (*Solving ODEs II*, 2nd ed. 1996; Rosenbrock-type methods
in section IV.7, RODAS constructed for index-1 problems in section VI.4; the ``METH = 1``
coefficients of their code ``rodas.f``, here in that code's transformed form)
has six stages, order 4 with an embedded order-3 solution, and is **L-stable and stiffly
accurate**: :math:`R(\infty) = 0`, and :math:`y_{n+1}` is the last stage's argument plus its
increment, so a very stiff component is put onto its slow manifold instead of being damped only
approximately (what a merely A-stable method such as ROS4's GRK4A does). Both the propagated and
the embedded solutions are stiffly accurate, so the error estimate stays meaningful on stiff
problems. It needs the **exact** Jacobian to keep order 4 (a Rosenbrock W-method such as
ROS34PW2 tolerates an approximate one); autograd gives the exact Jacobian cheaply, so the better
stability of RODAS wins. The Jacobian is recomputed once per accepted step and reused for the
retries of a rejected step (only :math:`W` is refactorised).

**A step** (HNW II, section IV.7: the transformed form, in the variables
:math:`u_i = \sum_{j \le i} \gamma_{ij} k_j`, that ``rodas.f`` implements). With
:math:`\gamma = 1/4`, :math:`W = I - h\gamma J` and :math:`f_t = \partial f/\partial t (t_n, y_n)`:

.. math::

    u_i = h\gamma\, W^{-1}\Big( f\big(t_n + \alpha_i h,\; y_n + \sum_{j<i} a_{ij} u_j\big)
          + \sum_{j<i} \frac{c_{ij}}{h} u_j + h\, d_i\, f_t \Big), \qquad i = 1, \dots, 6,

    \hat y_{n+1} = y_n + \sum_{j\le4} a_{5j} u_j + u_5 \quad\text{(order 3)}, \qquad
    y_{n+1} = \hat y_{n+1} + u_6 \quad\text{(order 4)},

and :math:`u_6 = y_{n+1} - \hat y_{n+1}` is the local error estimate, measured by the same norm
and fed to the same I/PI controller as the explicit pairs (:mod:`neuralode._loop`). Stages 5 and 6
are evaluated at :math:`t_n + h` (:math:`\alpha_5 = \alpha_6 = 1`, :math:`d_5 = d_6 = 0`).

**Time dependence.** :math:`f_t` comes from autograd, not from a finite difference: the time
handed to ``func`` for the Jacobian evaluation is a tensor that requires grad, so ``"full"``
gets :math:`[J \mid f_t]` from the same batch of vector-Jacobian products, and ``"batched"``
gets :math:`f_t` from one double-vjp (a Jacobian-vector product in the time direction). When
``func`` ignores ``t`` the term is skipped.

**Jacobians** (``options["jacobian"]``):

* ``"full"`` (default): the :math:`N \times N` Jacobian of the flattened state, by :math:`N`
  vector-Jacobian products batched in one vectorised backward pass
  (``torch.autograd.grad(..., is_grads_batched=True)``); one :math:`N \times N` LU per
  factorisation. Cost :math:`O(N^3)`: meant for small systems (tens to a few hundred states).
* ``"batched"``: for a state of shape ``(B, D)`` **whose rows evolve independently** (a batch of
  samples through one network, ``func`` treating rows separately). The full Jacobian is then
  block diagonal, and its ``B`` blocks come from only ``D`` vector-Jacobian products: the
  cotangent :math:`e_d` placed on *every* row gives, in row :math:`b`, the :math:`d`-th row of
  block :math:`b` (the other rows do not contribute, by independence). The LU and the solves
  are batched over the ``B`` blocks, :math:`O(B D^3)`. If the rows are coupled (batch norm,
  attention across the batch) the Jacobian is wrong and the method loses its order: use
  ``"full"``. (This uses ``func`` on the whole batch, not ``vmap`` over rows, so dynamics that
  only make sense on a batch still work.)

**Gradients.** When autograd records (a solve that is being differentiated), the Jacobian is
computed with ``create_graph=True``, so the gradient of the solution is the exact derivative of
the computation performed, including the Jacobian's dependence on the state and the parameters.
No detached-Jacobian (W-method) approximation is made. Outside grad mode everything is computed
without a graph; the Jacobian itself still comes from autograd, under ``torch.no_grad()`` and
under ``torch.inference_mode()`` alike (there, ``func`` must not use inference tensors: it raises,
pointing to ``no_grad``). First derivatives only: differentiating the gradients again
(``create_graph=True``) raises.

**Dense output** between steps depends on the regime of the step, judged by
:math:`h \lVert J \rVert_\infty`:

* stiff (:math:`h \lVert J \rVert_\infty > 5`): ``rodas.f``'s own continuous extension (order 3),
  :math:`y(t_n + \theta h) = (1-\theta) y_n + \theta\big(y_{n+1} + (1-\theta)(q_1 + \theta
  q_2)\big)` with :math:`q_1, q_2` fixed combinations of :math:`u_1, \dots, u_5`. It is built
  from the damped increments, so it stays accurate when :math:`|h\lambda|` is huge; any
  interpolant built from slopes :math:`f` multiplies the solution's small distance from the slow
  manifold by :math:`|h\lambda|` (``test_dense_output_on_a_stiff_problem_stays_accurate`` in
  ``tests/test_stiff.py`` checks the extension on a Prothero-Robinson problem).
* non-stiff: the quartic through :math:`y_n, y_{n+1}` with slopes :math:`f_n, f_{n+1}` and
  curvature :math:`y''_n = J f_n + f_t` (all known: :math:`f_{n+1}` comes with the next step's
  Jacobian evaluation; only an output inside the very last step costs one evaluation). Local
  error :math:`O(h^5)`, so outputs between steps converge at order 4, where the ``rodas.f``
  extension (order 3) is still pre-asymptotic at moderate step counts.

The threshold keeps the slope-based quartic where perturbations are amplified at most
:math:`(h \lVert J \rVert)^2/2 \le 12.5` times.

**Cost per step.** One evaluation with its Jacobian (at the start of the step, shared with the
previous step's end), five further evaluations of ``func``, one LU factorisation, six linear
solves. :class:`~neuralode.SolverStats` counts ``n_jac``, ``n_lu`` and ``n_solves``. In grad
mode one more evaluation per solve (on a detached state) tells whether ``func`` holds parameters
that require grad, so that a solve nobody differentiates builds no graph.

**Adjoint.** ``odeint_adjoint(..., method="rodas4")`` solves the augmented system
:math:`[z, a, a_\theta]` backwards with ``rodas4`` too (its Jacobian comes from differentiating
the vector-Jacobian products once more, so second derivatives of ``func``; always ``"full"``).
Reconstructing :math:`z` backwards is unstable in stiff directions whatever the method (a mode
:math:`e^{\lambda t}` with :math:`\lambda \ll 0` grows as :math:`e^{|\lambda| t}` backwards), so on
genuinely stiff problems use ``checkpoints=K``, which re-solves segments forward with ``rodas4``.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass, field
from fractions import Fraction
from typing import List, Optional, Sequence, Tuple

import torch
from torch import Tensor

from ._autograd import once_differentiable
from ._loop import ADAPTIVE_OPTIONS, Dynamics, SolverStats, Step, combine
from ._tableaus import _stability_function

__all__ = ["RosenbrockTableau", "RODAS4", "Rosenbrock", "ROSENBROCK_OPTIONS", "JACOBIANS"]

Row = Tuple[Fraction, ...]

#: Options accepted by the Rosenbrock methods: the adaptive options plus how to get the Jacobian.
ROSENBROCK_OPTIONS = {**ADAPTIVE_OPTIONS, "jacobian": "full"}
#: Values of ``options["jacobian"]``.
JACOBIANS = ("full", "batched")

def _lower(rows: Sequence[Sequence[float]], s: int) -> List[List[Fraction]]:
    """Square lower-triangular matrix of exact fractions (of the binary floats) from ragged rows."""
    return [[Fraction(rows[i][j]) if j < len(rows[i]) else Fraction(0) for j in range(s)] for i in range(s)]


@dataclass(frozen=True)
class RosenbrockTableau:
    r"""A Rosenbrock method: the published coefficients its step uses and, derived from them, its
    canonical form (HNW II, section IV.7, eq. (7.4)), in which the order conditions and the
    stability function are stated:

    .. math::

        (I - h\gamma J) k_i = h f\big(t_n + \alpha_i h, y_n + \sum_{j<i} \alpha_{ij} k_j\big)
        + h J \sum_{j<i} \gamma_{ij} k_j + \gamma_i h^2 f_t, \qquad y_{n+1} = y_n + \sum_i b_i k_i .

    The arguments are the coefficients of the transformed form (HNW II, section IV.7, in the
    variables :math:`u_i = \sum_{j \le i} \gamma_{ij} k_j`), as printed in ``rodas.f``. Chapter 9 of
    the book implements one step of the canonical form from ``a``, ``gammas``, ``alpha``, ``d``
    and ``b`` and checks it against the library's transformed-form step.

    Args:
        name: the method's name as ``odeint`` accepts it.
        order, error_order: orders of the propagated and the embedded solutions.
        gamma: the diagonal coefficient :math:`\gamma` (:math:`W = I - h \gamma J`).
        alpha: the time nodes :math:`\alpha_i`, length ``s``.
        a_t: rows of :math:`a_{ij}` (row ``i`` has ``i`` entries), stages 2..s.
        c_t: rows of :math:`c_{ij}` (row ``i`` has ``i`` entries), stages 2..s.
        d: :math:`d_i = \gamma_i = \sum_j \gamma_{ij}`, the coefficients of :math:`h f_t`.
        m, m_hat: weights of the propagated and the embedded solutions on the :math:`u_i`.
        dense_t: two rows of weights on :math:`u_1, \dots, u_{s-1}` for the continuous extension.

    Derived (exact fractions of the published floats): ``a`` (:math:`\alpha_{ij}`, strictly lower,
    rows 1..s-1), ``gammas`` (:math:`\gamma_{ij}`, lower with diagonal), ``c`` (row sums of
    ``a``), ``b`` and ``b_error = b - \hat b``. With :math:`\Gamma = (\gamma_{ij})`:
    :math:`\Gamma = (\gamma^{-1} I - C)^{-1}`, :math:`(\alpha_{ij}) = (a_{ij})\,\Gamma`,
    :math:`b = m\,\Gamma`, :math:`\hat b = \hat m\,\Gamma`. The order conditions are stated on
    these (HNW II, section IV.7, Table 7.1); ``tests/test_stiff.py`` checks them.
    """

    name: str
    order: int
    error_order: int
    gamma: float
    alpha: Tuple[float, ...]
    a_t: Tuple[Tuple[float, ...], ...]
    c_t: Tuple[Tuple[float, ...], ...]
    d: Tuple[float, ...]
    m: Tuple[float, ...]
    m_hat: Tuple[float, ...]
    dense_t: Tuple[Tuple[float, ...], ...]
    a: Tuple[Row, ...] = field(init=False)
    gammas: Tuple[Row, ...] = field(init=False)
    c: Row = field(init=False)
    b: Row = field(init=False)
    b_error: Row = field(init=False)

    def __post_init__(self) -> None:
        s = len(self.alpha)
        if len(self.a_t) != s - 1 or len(self.c_t) != s - 1 or len(self.m) != s or len(self.m_hat) != s:
            raise ValueError(f"invalid Rosenbrock tableau {self.name!r}: need {s - 1} rows of a_t and "
                             f"c_t and {s} weights m, m_hat")
        a = _lower(((),) + tuple(self.a_t), s)
        c = _lower(((),) + tuple(self.c_t), s)
        g = Fraction(self.gamma)
        inverse = [[(1 / g if i == j else Fraction(0)) - c[i][j] for j in range(s)] for i in range(s)]
        big_gamma = [[Fraction(0)] * s for _ in range(s)]
        for j in range(s):  # forward substitution, column by column: Gamma = inverse^{-1}
            for i in range(j, s):
                rhs = Fraction(int(i == j)) - sum(inverse[i][k] * big_gamma[k][j] for k in range(j, i))
                big_gamma[i][j] = rhs / inverse[i][i]
        alpha = [[sum(a[i][k] * big_gamma[k][j] for k in range(s)) for j in range(s)] for i in range(s)]
        b = [sum(Fraction(self.m[k]) * big_gamma[k][j] for k in range(s)) for j in range(s)]
        b_hat = [sum(Fraction(self.m_hat[k]) * big_gamma[k][j] for k in range(s)) for j in range(s)]
        object.__setattr__(self, "a", tuple(tuple(alpha[i][:i]) for i in range(1, s)))
        object.__setattr__(self, "gammas", tuple(tuple(big_gamma[i][:i + 1]) for i in range(s)))
        object.__setattr__(self, "c", (Fraction(0),) + tuple(sum(row) for row in self.a))
        object.__setattr__(self, "b", tuple(b))
        object.__setattr__(self, "b_error", tuple(x - y for x, y in zip(b, b_hat)))
        problems = []
        if abs(sum(self.b) - 1) > 1e-14:
            problems.append(f"b sums to {float(sum(self.b))!r}, not 1")
        if any(abs(float(ci) - ai) > 1e-14 for ci, ai in zip(self.c, self.alpha)):
            problems.append("the row sums of alpha_ij differ from the nodes alpha_i")
        if any(abs(float(sum(row)) - di) > 1e-14 for row, di in zip(self.gammas, self.d)):
            problems.append("the row sums of gamma_ij differ from d_i")
        if problems:
            raise ValueError(f"invalid Rosenbrock tableau {self.name!r}: " + "; ".join(problems))

    @property
    def stages(self) -> int:
        """Number of stages ``s`` (linear solves per step)."""
        return len(self.alpha)

    @property
    def adaptive(self) -> bool:
        """Always true for a Rosenbrock method, whose embedded solution estimates the error."""
        return True

    def stability_function(self, z, embedded: bool = False):
        r"""The stability function at ``z = h lambda`` (complex array or scalar): one step on
        :math:`y' = \lambda y` (where :math:`J = \lambda`) multiplies :math:`y` by

        .. math::

            R(z) = 1 + z\, b^\top (I - zB)^{-1} \mathbf 1, \qquad B = (\alpha_{ij} + \gamma_{ij}),

        a rational function (HNW II, section IV.7); ``embedded=True`` uses
        :math:`\hat b`. For RODAS, :math:`|R| \le 1` on the left half-plane and
        :math:`R(\infty) = 0` (L-stability).

        Returns:
            ``R(z)`` as a complex NumPy array shaped like ``z``.
        """
        alpha = ((),) + tuple(self.a)
        beta = [tuple(g + (alpha[i][j] if j < i else 0) for j, g in enumerate(self.gammas[i]))
                for i in range(self.stages)]
        weights = [x - e for x, e in zip(self.b, self.b_error)] if embedded else self.b
        return _stability_function(beta, weights, z)


# Hairer & Wanner, rodas.f, subroutine ROCOE, METH = 1 (RODAS, HNW II section VI.4; the transformed form of IV.7).
RODAS4 = RosenbrockTableau(
    name="rodas4", order=4, error_order=3, gamma=0.25,
    alpha=(0.0, 0.386, 0.21, 0.63, 1.0, 1.0),
    a_t=((1.544,),
         (0.9466785280815826, 0.2557011698983284),
         (3.314825187068521, 2.896124015972201, 0.9986419139977817),
         (1.221224509226641, 6.019134481288629, 12.53708332932087, -0.6878860361058950),
         (1.221224509226641, 6.019134481288629, 12.53708332932087, -0.6878860361058950, 1.0)),
    c_t=((-5.6688,),
         (-2.430093356833875, -0.2063599157091915),
         (-0.1073529058151375, -9.594562251023355, -20.47028614809616),
         (7.496443313967647, -10.24680431464352, -33.99990352819905, 11.70890893206160),
         (8.083246795921522, -7.981132988064893, -31.52159432874371, 16.31930543123136,
          -6.058818238834054)),
    d=(0.25, -0.1043, 0.1035, -0.3620000000000023e-01, 0.0, 0.0),
    m=(1.221224509226641, 6.019134481288629, 12.53708332932087, -0.6878860361058950, 1.0, 1.0),
    m_hat=(1.221224509226641, 6.019134481288629, 12.53708332932087, -0.6878860361058950, 1.0, 0.0),
    dense_t=((10.12623508344586, -7.487995877610167, -34.80091861555747, -7.992771707568823,
              1.025137723295662),
             (-0.6762803392801253, 6.087714651680015, 16.43084320892478, 24.76722511418386,
              -6.594389125716872)),
)

# Dense output: above this h * ||J||_inf a step counts as stiff (see the module docstring).
_STIFF_DENSE = 5.0



class _Jacobian:
    """Evaluates ``f``, ``J = df/dy`` and ``f_t = df/dt`` at one point, by autograd.

    ``mode`` is ``"full"`` (``J`` of shape ``(N, N)`` for the flattened state) or ``"batched"``
    (``J`` of shape ``(B, D, D)``, the diagonal blocks for a ``(B, D)`` state with independent rows).
    """

    def __init__(self, func, mode: str, shape: torch.Size, stats: SolverStats, outer: bool):
        self.func, self.mode, self.shape, self.stats = func, mode, shape, stats
        self.outer = outer  # does f depend on tensors outside the state that require grad?

    def __call__(self, t: float, y: Tensor) -> Tuple[Tensor, Tensor, Optional[Tensor]]:
        self.stats.n_jac += 1
        # Differentiate through J only when autograd records and something upstream needs it.
        create = torch.is_grad_enabled() and (self.outer or y.requires_grad)
        # Under inference_mode autograd records nothing, enable_grad or not: f would look constant
        # and J = 0, silently costing the method its stability. Leave inference mode for this
        # evaluation, on a normal copy of y (an inference tensor cannot enter a recorded graph).
        inference = torch.is_inference_mode_enabled()
        with torch.inference_mode(False) if inference else contextlib.nullcontext(), torch.enable_grad():
            # Always a fresh leaf: autograd.grad walks every node reachable from its outputs, so
            # differentiating at y itself would walk the whole solve's graph at every step
            # (quadratic cost). _Reattach connects the results to y's history afterwards.
            y_in = (y.clone() if inference else y.detach()).requires_grad_(True)
            t_in = torch.full((), t, dtype=y.dtype, device=y.device, requires_grad=True)
            try:
                f = self.func(t_in, y_in)
            except RuntimeError as exc:
                if inference and "Inference tensors" in str(exc):
                    raise RuntimeError(
                        "odeint: method 'rodas4' takes the Jacobian df/dy from autograd, but func uses tensors "
                        "created under torch.inference_mode(), which autograd cannot differentiate through. "
                        "Solve under torch.no_grad() instead, or create those tensors outside inference mode."
                    ) from exc
                raise
            if not f.requires_grad:  # f depends on neither y nor t
                return f, self._zeros(y), None
            if self.mode == "full":
                n = f.numel()
                eye = torch.eye(n, dtype=f.dtype, device=f.device).reshape(n, *f.shape)
                jac, f_t = torch.autograd.grad(f, (y_in, t_in), eye, is_grads_batched=True,
                                               create_graph=create, allow_unused=True)
                jac = self._zeros(y) if jac is None else jac.reshape(n, n)
                f_t = None if f_t is None else f_t.reshape(f.shape)
            else:
                b, d = self.shape
                # The cotangent e_k on every row: row b of the result is row k of block b.
                cot = torch.eye(d, dtype=f.dtype, device=f.device)[:, None, :].expand(d, b, d)
                (jac,) = torch.autograd.grad(f, y_in, cot.reshape(d, *f.shape), is_grads_batched=True,
                                             create_graph=True, allow_unused=True)
                jac = self._zeros(y) if jac is None else jac.reshape(d, b, d).transpose(0, 1)
                # df/dt by a double vjp: g(v) = v . df/dt is linear in v, and dg/dv = df/dt.
                v = torch.zeros_like(f, requires_grad=True)
                (g,) = torch.autograd.grad(f, t_in, v, create_graph=True, allow_unused=True)
                f_t = None if g is None else torch.autograd.grad(g, v, create_graph=create)[0]
                if not create:
                    jac = jac.detach()
        if not create:
            return f.detach(), jac.detach(), None if f_t is None else f_t.detach()
        if y.requires_grad:
            outs = (f, jac) if f_t is None else (f, jac, f_t)
            outs = _Reattach.apply(y_in, y, *outs)
            f, jac, f_t = outs if f_t is not None else (*outs, None)
        return f, jac, f_t

    def _zeros(self, y: Tensor) -> Tensor:
        if self.mode == "full":
            return torch.zeros(y.numel(), y.numel(), dtype=y.dtype, device=y.device)
        b, d = self.shape
        return torch.zeros(b, d, d, dtype=y.dtype, device=y.device)


class _Reattach(torch.autograd.Function):
    """Identity on ``outs`` (computed from the leaf ``y_leaf``), which also routes their gradient to
    ``y``, the same values with the solve's history: ``d outs / d y = d outs / d y_leaf``.

    Gradients to the parameters flow through ``outs``' own graph; ``y_leaf`` is a detached leaf,
    so nothing is counted twice. The inner ``autograd.grad`` walks only the local graph.
    """

    @staticmethod
    def forward(ctx, y_leaf, y, *outs):
        ctx.save_for_backward(y_leaf, *outs)   # inputs: their graphs stay attached, and in-place edits are caught
        return tuple(o.view_as(o) for o in outs)

    @staticmethod
    @once_differentiable(
        "odeint: gradients through method 'rodas4' cannot be differentiated twice (create_graph=True: "
        "gradient penalties, Hessian-vector products, gradgradcheck): the Jacobian's share of the state's "
        "gradient is computed without a graph, so a second derivative would miss terms. Use an explicit "
        "method such as 'dopri5' for higher-order gradients.")
    def backward(ctx, *grads):
        y_leaf, *saved = ctx.saved_tensors
        pairs = [(o, g) for o, g in zip(saved, grads) if g is not None and o.requires_grad]
        grad_y = None
        if pairs:
            outs, gs = zip(*pairs)
            (grad_y,) = torch.autograd.grad(outs, y_leaf, gs, retain_graph=True, allow_unused=True)
        return (None, grad_y, *grads)


class _Linear:
    """``W = I - h gamma J`` factorised once; ``solve(r)`` returns ``W^{-1} r`` shaped like ``r``."""

    def __init__(self, jac: Tensor, hg: float, mode: str, shape, stats: SolverStats):
        eye = torch.eye(jac.shape[-1], dtype=jac.dtype, device=jac.device)
        self.lu, self.pivots, info = torch.linalg.lu_factor_ex(eye - hg * jac)
        self.mode, self.shape, self.stats = mode, shape, stats
        stats.n_lu += 1
        # A 0-d bool tensor, not a Python bool: reading it would cost a host-device synchronisation
        # per step. The step folds it into its error (NaN), and the loop reads it only then.
        self.singular = (info != 0).any()

    def solve(self, r: Tensor) -> Tensor:
        self.stats.n_solves += 1
        rhs = r.reshape(-1, 1) if self.mode == "full" else r.reshape(*self.shape, 1)
        return torch.linalg.lu_solve(self.lu, self.pivots, rhs).reshape(r.shape)


def _step(func, tab: RosenbrockTableau, t: float, y: Tensor, f0: Tensor, f_t: Optional[Tensor],
          linear: _Linear, h: float) -> Tuple[Tensor, Tensor, List[Tensor]]:
    """One RODAS step of size ``h`` (signed). Returns ``(y1, error, us)`` (see the module docstring)."""
    hg = h * tab.gamma
    us: List[Tensor] = []
    for i in range(tab.stages):
        if i == 0:
            fi = f0
        else:
            yi = combine(y, 1.0, tab.a_t[i - 1], us)
            fi = func(t + tab.alpha[i] * h, yi)
        rhs = combine(fi, 1.0 / h, tab.c_t[i - 1], us) if i else fi
        if f_t is not None and tab.d[i] != 0.0:
            rhs = torch.add(rhs, f_t, alpha=h * tab.d[i])
        us.append(linear.solve(rhs) * hg)
    y_hat = combine(y, 1.0, tab.m_hat, us)
    return y_hat + us[-1], us[-1], us


def _rodas_dense(tab: RosenbrockTableau, y0: Tensor, y1: Tensor, us: Sequence[Tensor], theta: float) -> Tensor:
    """``(1 - th) y0 + th (y1 + (1 - th)(q1 + th q2))``, ``q_k = sum_j dense_t[k][j] u_j`` (rodas.f)."""
    q1 = combine(None, 1.0, tab.dense_t[0], us)
    q2 = combine(None, 1.0, tab.dense_t[1], us)
    inner = torch.add(q1, q2, alpha=theta)
    return torch.add(y0 * (1 - theta), torch.add(y1, inner, alpha=1 - theta), alpha=theta)


def _quartic(y0: Tensor, y1: Tensor, f0: Tensor, f1: Tensor, ypp0: Tensor, h: float, theta: float) -> Tensor:
    r"""``p(theta)`` with ``p(0) = y0, p'(0) = h f0, p''(0) = h^2 ypp0, p(1) = y1, p'(1) = h f1``:
    :math:`p = y_0 + h f_0 \theta + \tfrac12 h^2 y''_0 \theta^2 + a \theta^3 + b \theta^4` with
    :math:`R_1 = y_1 - y_0 - h f_0 - \tfrac12 h^2 y''_0`, :math:`R_2 = h (f_1 - f_0) - h^2 y''_0`,
    :math:`b = R_2 - 3 R_1`, :math:`a = 4 R_1 - R_2`."""
    half_curv = ypp0 * (0.5 * h * h)
    r1 = y1 - y0 - h * f0 - half_curv
    r2 = h * (f1 - f0) - 2 * half_curv
    b = r2 - 3 * r1
    a = r1 - b
    return y0 + (h * theta) * f0 + half_curv * theta**2 + a * theta**3 + b * theta**4


def _curvature(jac: Tensor, f0: Tensor, f_t: Optional[Tensor], mode: str, shape) -> Tensor:
    """``y'' = J f + f_t`` at the start of a step, shaped like ``f0``."""
    if mode == "full":
        out = (jac @ f0.reshape(-1, 1)).reshape(f0.shape)
    else:
        out = (jac @ f0.reshape(*shape, 1)).reshape(f0.shape)
    return out if f_t is None else out + f_t


class _RosenbrockStep(Step):
    __slots__ = ("us", "f0", "jac", "f_t", "singular")

    def __init__(self, t, t1, y, y1, err, us, f0, jac, f_t, singular):
        super().__init__(t, t1, y, y1, err)
        self.us, self.f0, self.jac, self.f_t = us, f0, jac, f_t
        self.singular = singular  # 0-d bool tensor: W was singular (the error is then NaN)


class Rosenbrock:
    """Steps of a Rosenbrock method, for :func:`neuralode._loop.integrate` (see the module docstring).

    Args:
        tableau: the method.
        options: the solve's options; ``options["jacobian"]`` is ``"full"`` or ``"batched"``.
        stats: the solve's counters (Jacobians, factorisations, linear solves are counted here).
        shape: the user's state shape when the state is its flattened copy (``"batched"`` needs
            ``(B, D)``).
    """

    def __init__(self, tableau: RosenbrockTableau, options: dict, stats: SolverStats, shape: torch.Size):
        self.tab, self.stats = tableau, stats
        self.mode, self.shape = options["jacobian"], torch.Size(shape)
        if self.mode == "batched" and len(self.shape) != 2:
            raise ValueError(
                f"odeint: options['jacobian']='batched' needs a state of shape (B, D) whose rows evolve "
                f"independently, but the state has shape {tuple(self.shape)} (a tuple state counts as one flat "
                "vector). Reshape the state to (B, D), or use options={'jacobian': 'full'}.")
        self.order, self.error_order = tableau.order, tableau.error_order
        self.jacobian: Optional[_Jacobian] = None
        self.f0 = self.jac = self.f_t = None

    def start(self, func: Dynamics, t0: float, y0: Tensor) -> Tensor:
        outer = False
        if torch.is_grad_enabled() and not y0.requires_grad:
            # Do the dynamics hold parameters that require grad? One evaluation on a detached state
            # tells (parameters do not change their requires_grad during a solve).
            outer = func(t0, y0.detach()).requires_grad
        self.jacobian = _Jacobian(func, self.mode, self.shape, self.stats, outer)
        self.f0, self.jac, self.f_t = self.jacobian(t0, y0)
        return self.f0

    def attempt(self, func: Dynamics, t: float, y: Tensor, t1: float) -> _RosenbrockStep:
        """One step to ``t1``. When ``W`` is singular the step's error is NaN, so the step is
        rejected, and ``step.singular`` tells the loop to retry with half the step: no
        synchronisation of its own (the error ratio's is the step's only one)."""
        h = t1 - t
        linear = _Linear(self.jac, h * self.tab.gamma, self.mode, self.shape, self.stats)
        y1, err, us = _step(func, self.tab, t, y, self.f0, self.f_t, linear, h)
        err = torch.where(linear.singular, torch.full_like(err, math.nan), err)
        return _RosenbrockStep(t, t1, y, y1, err, us, self.f0, self.jac, self.f_t, linear.singular)

    def accept(self, func: Dynamics, step: _RosenbrockStep, last: bool, start: Optional[float] = None) -> None:
        # The next step's f, J and f_t, at its start (not needed after the last step); past a jump
        # of f, at ``start``, just after t1.
        if last:
            self.f0 = self.jac = self.f_t = None
        else:
            self.f0, self.jac, self.f_t = self.jacobian(step.t1 if start is None else start, step.y1)

    def dense(self, func: Dynamics, step: _RosenbrockStep, thetas: Sequence[float]) -> Tensor:
        """The states at ``t + theta h``, stacked: rodas.f's extension on a stiff step, else the
        quartic (see the module docstring)."""
        with torch.no_grad():
            stiff = abs(step.h) * float(step.jac.detach().abs().sum(-1).max()) > _STIFF_DENSE
        if stiff:
            outs = [_rodas_dense(self.tab, step.y, step.y1, step.us, th) for th in thetas]
        else:
            f1 = self.f0
            if step.jump:  # the left limit of f at t1 (self.f0 is the right one)
                f1 = func(math.nextafter(step.t1, step.t), step.y1)
            elif f1 is None:  # an output inside the last step: f(t1, y1) is not known yet
                f1 = func(step.t1, step.y1)
            ypp0 = _curvature(step.jac, step.f0, step.f_t, self.mode, self.shape)
            outs = [_quartic(step.y, step.y1, step.f0, f1, ypp0, step.h, th) for th in thetas]
        return torch.stack(outs)
