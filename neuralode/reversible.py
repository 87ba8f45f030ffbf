r"""Exact gradients in O(1) memory: the reversible Heun method (Kidger, Foster, Li & Lyons 2021).

The method carries the solution :math:`y` and an auxiliary state :math:`z` (both start at
:math:`y_0`), and caches :math:`f_n = f(t_n, z_n)`, so that each step of size :math:`h` costs one
evaluation of the dynamics (the paper's Algorithm 1, ODE case):

.. math::

    z_{n+1} = 2 y_n - z_n + h f_n, \qquad f_{n+1} = f(t_{n+1}, z_{n+1}), \qquad
    y_{n+1} = y_n + \tfrac{h}{2} (f_n + f_{n+1}).

Each line can be undone from what the next step holds, in reverse order (their Algorithm 2):

.. math::

    z_n = 2 y_{n+1} - z_{n+1} - h f_{n+1}, \qquad f_n = f(t_n, z_n), \qquad
    y_n = y_{n+1} - \tfrac{h}{2} (f_n + f_{n+1}).

So the backward pass reconstructs every forward state from the last one, *algebraically*: up to
floating-point rounding, not up to a solver's tolerance as the backsolve adjoint does. Going back
one step, it backpropagates through that one step with autograd (one evaluation of ``func`` with
its graph, one vector-Jacobian product); the result is the gradient of the discrete computation
(as backpropagation through it would give), with memory independent of the number of steps.

The method is of order 2, and it is *not* A-stable: on :math:`\dot y = \lambda y` its step matrix
has determinant :math:`-1`, with eigenvalues :math:`\mu \pm \sqrt{1 + \mu^2}` for
:math:`\mu = h \lambda`. One approximates :math:`e^{\mu}`; the other, :math:`\approx -e^{-\mu}`, is a
parasitic mode that grows like :math:`e^{-\operatorname{Re}(\lambda) t}` where the dynamics
contract, whatever the step size (the region of stability is the segment :math:`[-i, i]` of the
imaginary axis; Kidger et al., section 3). A smaller step only lowers the level, :math:`O(h^2)`,
at which the mode starts. Use it where the dynamics contract slowly over the span; for stiff or
strongly dissipative dynamics prefer ``odeint_adjoint(..., checkpoints=K)``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, List, Optional, Sequence, Tuple, Union

import torch
from torch import Tensor

from ._autograd import once_differentiable
from ._loop import SolverStats
from ._odeint import State, _Setup
from .adjoint import _adjoint_params

__all__ = ["odeint_reversible", "ReversibleStats"]

_NAME = "odeint_reversible"
# y and z both approximate the solution; once they differ by this fraction of the state's size, the
# parasitic mode has taken over and the output means nothing.
_MAX_GAP = 0.1


@dataclass
class ReversibleStats(SolverStats):
    """Forward statistics (as :class:`SolverStats`) and, once ``backward`` has run, the backward ones.

    Attributes:
        yz_gap: the largest ``|y - z|`` over the output times and the components (forward pass). Both
            approximate the solution; their gap is ``O(h^2)`` while the parasitic mode sleeps, and grows
            with it (see the module's documentation).
        backward_nfe: evaluations of the dynamics during the backward pass, each with its graph
            for one vector-Jacobian product (one per step, plus one per output time, where the
            state is reset to the one the forward pass stored).
        reconstruction_error: the largest absolute difference, over the output times and the
            components of ``y`` and ``z``, between the states the backward pass reconstructed and
            those the forward pass computed there (``nan`` until ``backward`` has run). Rounding
            amplified by the backward dynamics; compare it with the state's size.
    """

    yz_gap: float = 0.0
    backward_nfe: int = 0
    reconstruction_error: float = math.nan


def odeint_reversible(
    func: Callable[[Tensor, State], State],
    y0: State,
    t: Union[Tensor, Sequence[float]],
    *,
    step_size: float,
    adjoint_params: Optional[Sequence[Tensor]] = None,
    max_num_steps: int = 100_000,
    return_stats: bool = False,
):
    r"""Solve :math:`\dot y = f(t, y)` with the reversible Heun method; gradients in O(1) memory.

    Fixed steps: each output interval :math:`[t_{i-1}, t_i]` is split into
    :math:`n_i = \lceil |t_i - t_{i-1}| / \text{step\_size} \rceil` equal steps of size
    :math:`(t_i - t_{i-1}) / n_i` (at most ``step_size``), so every output time lies on the grid
    and no interpolation is needed. The auxiliary state and the cached evaluation run on across
    output times.

    The backward pass steps back from the last state with the algebraic inverse (see the module's
    documentation) and backpropagates through one step at a time; at each output time it resets
    ``(y, z)`` to the values the forward pass stored there (two states per output time), so
    rounding amplified by the backward dynamics does not carry over from one output interval to
    the next.

    Args:
        func: the dynamics, ``func(t, y)`` with ``t`` a 0-d tensor, as for :func:`neuralode.odeint`.
        y0: initial state, a tensor of shape ``S`` or a tuple of tensors (shapes ``S_k``), floating
            point; every tensor created follows its device and dtype.
        t: output times, 1-D, strictly increasing or decreasing, ``t[0]`` the initial time. Must
            not require grad (gradients with respect to the times are not implemented).
        step_size: the largest step, a positive number.
        adjoint_params: the tensors to differentiate with respect to, besides ``y0``. Defaults to
            ``func.parameters()`` when ``func`` is an ``nn.Module``; a plain function must name
            them (``()`` when only ``y0`` matters).
        max_num_steps: the most steps the solve may take (all intervals together); a larger
            count raises a ``ValueError`` before any step is taken.
        return_stats: also return a :class:`ReversibleStats`; its backward fields fill in when
            ``backward()`` runs.

    Returns:
        ``y`` at every output time, shape ``(len(t), *S)`` (a tuple of such for a tuple state);
        with ``return_stats``, the pair ``(y, stats)``.

    Raises:
        TypeError, ValueError: for bad arguments, naming the argument and the fix.
        FloatingPointError: when, at an output time, the solution is non-finite or ``max|y - z|``
            exceeds a tenth of ``max|y|``: the parasitic mode has grown (dissipative dynamics) and the
            solution is no longer an approximation of anything.
        RuntimeError: when the gradients are differentiated again (``create_graph=True``).

    Reference: P. Kidger, J. Foster, X. Li and T. Lyons, "Efficient and Accurate Gradients for
    Neural SDEs", NeurIPS 2021, section 3 and Algorithms 1-2 (here with no diffusion term).
    """
    setup = _Setup(func, y0, t, "euler", 0.0, 0.0, None, flat=True)
    if isinstance(t, Tensor) and t.requires_grad:
        raise ValueError(f"{_NAME}: t requires grad, but gradients with respect to the times are not "
                         "implemented for the reversible solver; pass t.detach(), or use odeint_adjoint or "
                         "odeint for time gradients.")
    if isinstance(step_size, bool) or not isinstance(step_size, (int, float)):
        raise TypeError(f"{_NAME}: step_size must be a real number, got {type(step_size).__name__}.")
    if not (math.isfinite(step_size) and step_size > 0):
        raise ValueError(f"{_NAME}: step_size must be a finite number > 0, got {step_size!r}.")
    if isinstance(max_num_steps, bool) or not isinstance(max_num_steps, int) or max_num_steps < 1:
        raise ValueError(f"{_NAME}: max_num_steps must be an integer >= 1, got {max_num_steps!r}.")
    grid = _grid(setup.times, float(step_size))
    total = sum(n for _, _, n in grid)
    if total > max_num_steps:
        raise ValueError(f"{_NAME}: step_size={step_size!r} over t[0]={setup.times[0]:.6g} .. t[-1]="
                         f"{setup.times[-1]:.6g} needs {total:,} steps, more than max_num_steps={max_num_steps:,}; "
                         "take a larger step_size or raise max_num_steps.")
    params = _adjoint_params(func, adjoint_params, _NAME, "y0")
    stats = ReversibleStats()
    ys = _Reversible.apply(setup, grid, stats, setup.y_start, *params)
    result = setup.stack(ys)
    return (result, stats) if return_stats else result


def _grid(times: List[float], step_size: float) -> List[Tuple[float, float, int]]:
    """Per output interval ``(t_start, h, n)``: ``n`` equal steps of signed size ``h``."""
    grid = []
    for a, b in zip(times[:-1], times[1:]):
        n = max(1, math.ceil(abs(b - a) / step_size - 1e-9))  # 1e-9: a span of exactly k steps stays k
        grid.append((a, (b - a) / n, n))
    return grid


def _step_times(t_start: float, h: float, n: int, t_end: float) -> List[float]:
    """The grid ``t_start + k h``, ``k = 0..n``, with the end exactly ``t_end`` (the same list forward and
    backward, computed instead of stored)."""
    return [t_start + k * h for k in range(n)] + [t_end]


def _unstable_message(t: float, what: str) -> str:
    return (f"{_NAME}: at t={t:.6g} the solution {what}. Reversible Heun is not A-stable: where the "
            "dynamics contract at rate |lambda|, its parasitic mode (seen in y - z) grows like exp(|lambda| t) "
            "whatever the step size (a smaller step_size only starts it lower, O(h^2)). Check the dynamics for "
            "overflow; for stiff or strongly dissipative dynamics use odeint_adjoint(..., checkpoints=K) or odeint.")


class _Reversible(torch.autograd.Function):
    @staticmethod
    def forward(ctx, setup, grid, stats, y0, *params):
        times = setup.times
        with torch.no_grad():
            y, z = y0, y0
            f = setup.call(setup.time(times[0]), z)
            stats.nfe += 1
            ys, zs = [y], [z]
            for i, (t_start, h, n) in enumerate(grid):
                ts = _step_times(t_start, h, n, times[i + 1])
                for t1 in ts[1:]:
                    z = 2 * y - z + h * f
                    f_next = setup.call(setup.time(t1), z)
                    y = y + (0.5 * h) * (f + f_next)
                    f = f_next
                    stats.step_times.append(t1)
                stats.nfe += n
                stats.n_accepted += n
                # One host synchronisation per output time: refuse a solution the parasitic mode owns.
                gap, scale = (y - z).abs().max().item(), y.abs().max().item()
                if not (math.isfinite(gap) and math.isfinite(scale)):
                    raise FloatingPointError(_unstable_message(times[i + 1], "became non-finite (NaN or inf)"))
                if gap > _MAX_GAP * scale:
                    raise FloatingPointError(_unstable_message(
                        times[i + 1], f"is lost to the parasitic mode: max|y - z| = {gap:.3g} exceeds "
                                      f"{_MAX_GAP} max|y| = {_MAX_GAP * scale:.3g}"))
                stats.yz_gap = max(stats.yz_gap, gap)
                ys.append(y)
                zs.append(z)
            ys, zs = torch.stack(ys), torch.stack(zs)
        ctx.setup, ctx.grid, ctx.stats = setup, grid, stats
        ctx.save_for_backward(ys, zs, *params)
        return ys

    @staticmethod
    @once_differentiable(
        f"{_NAME}: its gradients cannot be differentiated twice (create_graph=True: gradient penalties, "
        "Hessian-vector products, gradgradcheck): the backward pass backpropagates one step at a time "
        "without recording a graph of its own. Use odeint (backpropagation through the solver) for "
        "higher-order gradients.")
    def backward(ctx, grad_ys):
        setup, grid, stats = ctx.setup, ctx.grid, ctx.stats
        ys, zs, *params = ctx.saved_tensors
        params = tuple(params)
        times = setup.times
        grad_params = [torch.zeros_like(p) for p in params]

        def evaluate(s: float, z: Tensor):
            """f(s, z) with its graph, for the vector-Jacobian product at z."""
            stats.backward_nfe += 1
            with torch.enable_grad():
                leaf = z.detach().requires_grad_(True)
                return leaf, setup.call(setup.time(s), leaf)

        def vjp(leaf: Tensor, out: Tensor, cotangent: Tensor) -> Tensor:
            """cotangent . df/dz, and cotangent . df/dtheta added to the parameters' gradients."""
            if not out.requires_grad:  # f does not depend on z nor on any parameter
                return torch.zeros_like(leaf)
            grads = torch.autograd.grad(out, (leaf,) + params, grad_outputs=cotangent, allow_unused=True,
                                        retain_graph=False)
            for acc, g in zip(grad_params, grads[1:]):
                if g is not None:
                    acc.add_(g)
            return torch.zeros_like(leaf) if grads[0] is None else grads[0]

        # Cotangents of the carried state (y, z, f) at the current step boundary.
        a_y = grad_ys[-1].clone()
        a_z = torch.zeros_like(a_y)
        a_f = torch.zeros_like(a_y)
        worst = 0.0
        y, z = ys[-1], zs[-1]
        leaf, f_graph = evaluate(times[-1], z)
        for i in range(len(grid) - 1, -1, -1):
            t_start, h, n = grid[i]
            ts = _step_times(t_start, h, n, times[i + 1])
            for k in range(n, 0, -1):
                f_next = f_graph.detach()
                # Backpropagate through y_k = y_{k-1} + h/2 (f_{k-1} + f_k), f_k = f(t_k, z_k) and
                # z_k = 2 y_{k-1} - z_{k-1} + h f_{k-1}, in that order; undo the step on the way.
                b_f = a_f + (0.5 * h) * a_y
                b_z = a_z + vjp(leaf, f_graph, b_f)
                z = 2 * y - z - h * f_next
                leaf, f_graph = evaluate(ts[k - 1], z)
                y = y - (0.5 * h) * (f_graph.detach() + f_next)
                a_y, a_z, a_f = a_y + 2 * b_z, -b_z, (0.5 * h) * a_y + h * b_z
            worst = max(worst, (y - ys[i]).abs().max().item(), (z - zs[i]).abs().max().item())
            y, z = ys[i], zs[i]
            leaf, f_graph = evaluate(times[i], z)
            a_y = a_y + grad_ys[i]
        # At t_0, z_0 = y_0 and f_0 = f(t_0, z_0): both carry y_0's gradient.
        grad_y0 = a_y + a_z + vjp(leaf, f_graph, a_f)
        stats.reconstruction_error = worst
        return (None, None, None, grad_y0, *grad_params)
