r"""Gradients of an ODE solve by the adjoint method (Chen et al. 2018, section 2 and Algorithm 1).

For :math:`\dot z = f(z, t, \theta)` and a loss :math:`L` of the states at output times
:math:`t_0 < \dots < t_N`, the adjoint :math:`a(t) = \partial L / \partial z(t)` obeys

.. math::

    \dot a = -a^\top \frac{\partial f}{\partial z}, \qquad
    \frac{dL}{d\theta} = \int_{t_0}^{t_N} a^\top \frac{\partial f}{\partial \theta}\, dt ,

solved backwards from :math:`a(t_N) = \partial L/\partial z(t_N)`, with
:math:`\partial L/\partial z(t_i)` added as the sweep passes each :math:`t_i`. The backward pass
integrates the augmented state :math:`[z, a, a_\theta]` in one solve, reconstructing :math:`z`
backwards in time, so memory does not grow with the number of steps. Every product with a
Jacobian is a vector-Jacobian product from autograd; no Jacobian is ever formed.

Two caveats shape the options. Reconstructing :math:`z` backwards is unstable where the forward
flow contracts (dissipative or chaotic dynamics), so the gradient can drift: ``checkpoints=K``
instead stores :math:`K+1` states on the forward pass and, going backwards, re-solves each
segment forward from its stored state and backpropagates through it. And the parameter adjoint
:math:`a_\theta` need not control the backward step size: ``seminorm=True`` leaves it out of the
error norm (Kidger, Chen & Lyons 2021), which saves backward steps.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional, Sequence, Union

import torch
from torch import Tensor, nn

from ._autograd import once_differentiable
from ._loop import SolverStats, rms_norm
from ._methods import solve
from ._odeint import State, _check_solver, _search_event, _Setup

__all__ = ["odeint_adjoint", "AdjointStats"]


@dataclass
class AdjointStats(SolverStats):
    """Forward statistics (as :class:`SolverStats`) and, once ``backward`` has run, the backward ones.

    Attributes:
        backward_nfe: evaluations of the dynamics during the backward pass (each is one
            evaluation of ``func`` plus one vector-Jacobian product).
        backward_n_accepted: accepted steps of the backward solve(s).
        backward_n_rejected: rejected steps of the backward solve(s).
    """

    backward_nfe: int = 0
    backward_n_accepted: int = 0
    backward_n_rejected: int = 0


def odeint_adjoint(
    func: Callable[[Tensor, State], State],
    y0: State,
    t: Union[Tensor, Sequence[float]],
    *,
    method: Optional[str] = "dopri5",
    rtol: float = 1e-7,
    atol: float = 1e-9,
    options: Optional[dict] = None,
    adjoint_params: Optional[Sequence[Tensor]] = None,
    adjoint_method: Optional[str] = None,
    adjoint_rtol: Optional[Union[float, Tensor, tuple]] = None,
    adjoint_atol: Optional[Union[float, Tensor, tuple]] = None,
    adjoint_options: Optional[dict] = None,
    seminorm: bool = False,
    checkpoints: Optional[int] = None,
    event_fn: Optional[Callable[[Tensor, State], Tensor]] = None,
    return_stats: bool = False,
):
    r"""Like :func:`neuralode.odeint`, with gradients from the adjoint ODE instead of backprop.

    The forward pass runs without recording a graph; the backward pass solves the adjoint system
    :math:`\dot a = -a^\top \partial f/\partial z`, :math:`\dot a_\theta = -a^\top \partial f/\partial
    \theta` from :math:`t_N` back to :math:`t_0` (the paper's Algorithm 1), adding
    :math:`\partial L/\partial z(t_i)` at every output time and resetting :math:`z(t_i)` to the
    value the forward pass returned there.

    Args:
        func, y0, t, method, rtol, atol, options: as for :func:`neuralode.odeint`.
        adjoint_params: the tensors to differentiate with respect to, besides ``y0`` (and
            ``t``). Defaults to ``func.parameters()`` when ``func`` is an ``nn.Module``; a plain
            function must name them (``()`` when only ``y0`` matters).
        adjoint_method, adjoint_rtol, adjoint_atol, adjoint_options: the backward solve's
            settings; each defaults to its forward counterpart. A per-component tolerance (a tensor,
            or one per part of a tuple state) applies to the state and to its adjoint alike, and its
            smallest entry to the parameters' adjoint. With ``"rodas4"`` the backward
            solve of the augmented state is implicit too (with the full Jacobian of the augmented
            system, even when the forward pass uses ``jacobian="batched"``); but reconstructing
            ``z`` backwards grows like ``exp(|lambda| t)`` in stiff directions whatever the
            method, so on stiff problems use ``checkpoints``.
        seminorm: leave the parameter adjoint out of the backward error norm (fewer backward
            steps; the parameter gradient is then integrated at the accuracy the state and its
            adjoint need). torchdiffeq's ``adjoint_options={"norm": "seminorm"}`` does the same.
        checkpoints: ``None`` (default) for the backsolve adjoint: memory independent of the
            number of steps. An integer ``K >= 1`` splits ``[t_0, t_N]`` into ``K`` segments of equal
            length: the forward pass solves them one after another and keeps the ``K + 1``
            boundary states and each segment's accepted step times; the backward pass re-solves
            each segment forward from its stored state, taking exactly those steps (so rounding
            differences, e.g. nondeterministic GPU kernels, cannot change an accept/reject decision),
            and backpropagates through it. The gradient is then exact for the computation
            performed (no backward reconstruction, no drift), at the cost of memory for ``K``
            states plus one segment's graph, O(K + N/K) for N steps.
        event_fn: solve until ``event_fn(t, y)`` changes sign and return ``(event_t, ys)``, as for
            :func:`neuralode.odeint`: :func:`neuralode.odeint_event` with ``odeint_interface=odeint_adjoint``.
        return_stats: also return an :class:`AdjointStats`; its backward fields fill in when
            ``backward()`` runs. Not with ``event_fn``.

    ``func``'s step callbacks (``callback_step``, ``callback_accept_step``,
    ``callback_reject_step``) see the forward solve's steps, as in :func:`neuralode.odeint`;
    ``callback_step_adjoint``, ``callback_accept_step_adjoint`` and ``callback_reject_step_adjoint``
    (same arguments) see the backward solve's, with ``y0`` the pair ``(z, a)`` of the state and its
    adjoint, each in ``y0``'s structure (torchdiffeq passes its whole augmented state). With
    ``checkpoints`` there is no backward ODE solve (the segments are re-solved forward), and the
    adjoint callbacks are not called.

    Returns:
        As :func:`neuralode.odeint`.

    Raises:
        TypeError, ValueError: for bad arguments, naming the argument and the fix.
        RuntimeError: also when the gradients are differentiated again (``create_graph=True``):
            the backward pass builds no graph, so higher-order gradients need :func:`neuralode.odeint`.
    """
    if event_fn is not None:
        return _search_event("odeint_adjoint", func, y0, t, event_fn, return_stats, odeint_interface=odeint_adjoint,
                             method=method, rtol=rtol, atol=atol, options=options, adjoint_params=adjoint_params,
                             adjoint_method=adjoint_method, adjoint_rtol=adjoint_rtol, adjoint_atol=adjoint_atol,
                             adjoint_options=adjoint_options, seminorm=seminorm, checkpoints=checkpoints)
    setup = _Setup(func, y0, t, method, rtol, atol, options, flat=True)
    params = _adjoint_params(func, adjoint_params)
    if isinstance(adjoint_options, dict) and "norm" in adjoint_options:
        # torchdiffeq's spelling of seminorm=True: adjoint_options={"norm": "seminorm"}.
        adjoint_options = dict(adjoint_options)
        choice = adjoint_options.pop("norm")
        if choice == "seminorm":
            seminorm = True
        elif choice is not None:
            raise ValueError(f"odeint_adjoint: adjoint_options['norm'] must be 'seminorm' (leave the parameters' "
                             f"adjoint out of the backward error norm, as seminorm=True) or None, got {choice!r}; "
                             "the backward solve's norm is otherwise the RMS of each of [z, a, a_theta], the worst "
                             "deciding.")
    back_method = method if adjoint_method is None else adjoint_method
    back = _check_solver(back_method,
                         rtol if adjoint_rtol is None else adjoint_rtol,
                         atol if adjoint_atol is None else adjoint_atol,
                         options if adjoint_options is None and back_method == method else adjoint_options,
                         prefix="adjoint_")
    back = back._replace(options=setup.with_grid(back.options, "adjoint_options"))
    if checkpoints is not None and (isinstance(checkpoints, bool) or not isinstance(checkpoints, int)
                                    or checkpoints < 1):
        raise ValueError(f"odeint_adjoint: checkpoints must be None or an integer >= 1, got {checkpoints!r}.")
    t_tensor = t if isinstance(t, Tensor) else torch.tensor(setup.times, dtype=torch.float64)
    stats = AdjointStats()
    ys = _Adjoint.apply(setup, back, bool(seminorm), checkpoints, stats, setup.y_start, t_tensor, *params)
    result = setup.stack(ys)
    return (result, stats) if return_stats else result


def _adjoint_params(func, adjoint_params, caller: str = "odeint_adjoint", inputs: str = "y0 (and t)") -> tuple:
    """The tensors to differentiate besides the inputs: ``adjoint_params``, or ``func.parameters()``
    for an ``nn.Module``; those that require grad. ``caller`` and ``inputs`` word the errors."""
    if adjoint_params is None:
        if not isinstance(func, nn.Module):
            raise ValueError(
                f"{caller}: func is a plain function, so its parameters cannot be found: pass "
                "adjoint_params=(tensor, ...) with the tensors to differentiate, or adjoint_params=() "
                f"when only {inputs} need{'s' if inputs == 'y0' else ''} gradients.")
        adjoint_params = tuple(func.parameters())
    params = tuple(adjoint_params)
    for i, p in enumerate(params):
        if not isinstance(p, Tensor):
            raise TypeError(f"{caller}: adjoint_params[{i}] must be a tensor, got {type(p).__name__}.")
    return tuple(p for p in params if p.requires_grad)


def _segments(times: list, k: int) -> list:
    """``k`` equal segments of ``[times[0], times[-1]]``, each with the grid the engine solves on.

    Returns ``[(grid, interior, last), ...]``: ``grid`` runs from the segment's start through the
    output times strictly inside it to its end; ``interior`` are those outputs' indices; ``last`` is
    the index of the output time the segment ends on, or None. A boundary within rounding of an
    output time snaps to it, so no segment ends a hair's breadth from an output.
    """
    t0, t1 = times[0], times[-1]
    direction = 1.0 if t1 >= t0 else -1.0
    bounds = [t0 + (t1 - t0) * i / k for i in range(k)] + [t1]
    snap = 1e-9 * abs(t1 - t0)
    bounds = [min(times, key=lambda s: abs(s - b)) if min(abs(s - b) for s in times) <= snap else b
              for b in bounds]
    segments, j = [], 1
    for start, end in zip(bounds[:-1], bounds[1:]):
        interior = []
        while j < len(times) and (end - times[j]) * direction > 0:
            interior.append(j)
            j += 1
        last = None
        if j < len(times) and times[j] == end:
            last, j = j, j + 1
        segments.append(([start] + [times[i] for i in interior] + [end], interior, last))
    return segments


class _Adjoint(torch.autograd.Function):
    @staticmethod
    def forward(ctx, setup, back, seminorm, checkpoints, stats, y0, t, *params):
        dynamics = setup.dynamics(stats)
        settings = dict(rtol=setup.rtol, atol=setup.atol, norm=setup.norm, options=setup.options, stats=stats,
                        shape=setup.shape)
        with torch.no_grad():
            if checkpoints is None:
                ys = solve(setup.method, dynamics, y0, setup.times, **settings, **setup.callbacks())
                saved = ()
            else:
                ys, states, ctx.step_ends = [y0.unsqueeze(0)], [y0], []
                for grid, interior, last in _segments(setup.times, checkpoints):
                    first = len(stats.step_times)
                    seg = solve(setup.method, dynamics, states[-1], grid, **settings, **setup.callbacks())
                    ctx.step_ends.append(stats.step_times[first:])  # the segment's steps, replayed in backward
                    ys.append(seg[1:-1] if last is None else seg[1:])
                    states.append(seg[-1])
                ys = torch.cat(ys)
                saved = tuple(states)
        ctx.setup, ctx.back, ctx.seminorm, ctx.checkpoints, ctx.stats = setup, back, seminorm, checkpoints, stats
        ctx.t_requires_grad, ctx.t_dtype, ctx.t_device = t.requires_grad, t.dtype, t.device
        ctx.save_for_backward(ys, *params, *saved)
        ctx.n_params = len(params)
        return ys

    @staticmethod
    @once_differentiable(
        "odeint_adjoint: its gradients cannot be differentiated twice (create_graph=True: gradient "
        "penalties, Hessian-vector products, gradgradcheck): the backward pass solves the adjoint ODE "
        "without recording a graph. Use odeint (backpropagation through the solver) with an explicit "
        "method for higher-order gradients.")
    def backward(ctx, grad_ys):
        setup, back, stats = ctx.setup, ctx.back, ctx.stats
        ys, *rest = ctx.saved_tensors
        params, states = tuple(rest[:ctx.n_params]), rest[ctx.n_params:]
        times = setup.times
        if ctx.checkpoints is None:
            grad_y0, grad_params = _backsolve(setup, back, ctx.seminorm, stats, ys, grad_ys, params)
        else:
            grad_y0, grad_params = _resolve_segments(setup, ctx.checkpoints, stats, states, grad_ys, params,
                                                     ctx.step_ends)
        grad_t = None
        if ctx.t_requires_grad:
            # z(t_i) moves with t_i along the trajectory: dL/dt_i = g_i . f(t_i, z_i) for i >= 1.
            # Moving t_0 shifts the whole solution: dL/dt_0 = -a(t_0) . f(t_0, z_0), where a(t_0)
            # counts only the later outputs (the output at t_0 is y0 itself, whatever t_0 is).
            with torch.no_grad():
                slopes = torch.stack([setup.call(setup.time(s), y) for s, y in zip(times, ys)])
                grad_t = (grad_ys * slopes).sum(dim=1)
                grad_t[0] = -((grad_y0 - grad_ys[0]) * slopes[0]).sum()
                grad_t = grad_t.to(dtype=ctx.t_dtype, device=ctx.t_device)
        return (None, None, None, None, None, grad_y0, grad_t, *grad_params)


def _vjp(outputs, inputs, cotangents, create_graph: bool = False):
    """``sum_k cotangent_k . d output_k / d input`` for every input, zeros where unconnected."""
    connected = [(o, c) for o, c in zip(outputs, cotangents) if o.requires_grad]
    if not connected:
        return [torch.zeros_like(x) for x in inputs]
    outs, cots = zip(*connected)
    grads = torch.autograd.grad(outs, inputs, grad_outputs=cots, allow_unused=True, create_graph=create_graph)
    return [torch.zeros_like(x) if g is None else g for g, x in zip(grads, inputs)]


# Three-point Gauss-Legendre rule on [0, 1] (exact for polynomials of degree 5).
_GAUSS_NODES = (0.5 - 15**0.5 / 10, 0.5, 0.5 + 15**0.5 / 10)
_GAUSS_WEIGHTS = (5 / 18, 8 / 18, 5 / 18)


def _backsolve(setup, back, seminorm, stats, ys, grad_ys, params):
    r"""Integrate [z, a, a_theta] backwards over each output interval (Algorithm 1).

    With an implicit backward method (``"rodas4"``) only ``[z, a]`` is solved for, and the
    parameter adjoint :math:`a_\theta(t_{i-1}) = a_\theta(t_i) - \int_{t_i}^{t_{i-1}} a^\top
    \partial f/\partial\theta \, dt` is a quadrature along the accepted steps: three-point
    Gauss-Legendre on each step, at states from the step's dense output. Nothing feeds back from
    :math:`a_\theta` into ``[z, a]``, so the Jacobian the method factorises is ``2D x 2D`` instead
    of ``(2D + P) x (2D + P)`` (cubic in the parameter count ``P``). The quadrature is of order 6
    on the dense output's states (order 3-4), and, as with ``seminorm``, its error does not steer
    the step size.
    """
    n, dim = len(setup.times), ys.shape[1]
    quadrature = back.method.implicit
    sizes = [dim, dim] + [p.numel() for p in params]
    targets = () if quadrature else params  # the parameters whose adjoint is part of the solved state

    def augmented(s, x: Tensor) -> Tensor:
        stats.backward_nfe += 1
        # An implicit backward method differentiates this function (its Jacobian, and df/dt for a
        # tensor s): then x requires grad and the result must stay a differentiable function of x.
        differentiable = torch.is_grad_enabled() and x.requires_grad
        z, a = x[:dim], x[dim:2 * dim]
        with torch.enable_grad():
            if not differentiable:
                z = z.detach().requires_grad_(True)
            f = setup.call(setup.time(s), z)
            vjps = _vjp([f], (z,) + targets, [a], create_graph=differentiable)
        if not differentiable:
            f = f.detach()
        # d/dt [z, a, a_theta] = [f, -a df/dz, -a df/dtheta]
        return torch.cat([f, -vjps[0]] + [-v.reshape(-1).to(x.dtype) for v in vjps[1:]])

    def parameter_adjoint(step, interpolate) -> None:
        """Add this step's share of -int a df/dtheta dt to a_params (Gauss-Legendre)."""
        states = interpolate(_GAUSS_NODES)
        for theta, weight, x in zip(_GAUSS_NODES, _GAUSS_WEIGHTS, states):
            stats.backward_nfe += 1
            with torch.enable_grad():
                z = x[:dim].detach().requires_grad_(True)
                f = setup.call(setup.time(step.t + theta * step.h), z)
                vjps = _vjp([f], params, [x[dim:2 * dim]])
            a_params.add_(torch.cat([v.reshape(-1).to(x.dtype) for v in vjps]), alpha=-weight * step.h)

    def norm(x: Tensor) -> Tensor:
        chunks = torch.split(x, sizes[:2] if quadrature else sizes)
        if seminorm:
            chunks = chunks[:2]
        return torch.stack([rms_norm(c) for c in chunks if c.numel()]).max()

    back_stats = SolverStats()
    # A per-component tolerance of the state applies to z and to a (the same components), and its
    # smallest entry to a_theta.
    rtol, atol = (_augmented_tolerance(tol, 0 if quadrature else sum(sizes[2:]))
                  for tol in (setup.tolerance("adjoint_rtol", back.rtol), setup.tolerance("adjoint_atol", back.atol)))
    options = back.options
    if options.get("jacobian") == "batched":
        # The augmented state [z, a, a_theta] is flat and its rows are coupled through a_theta.
        options = {**options, "jacobian": "full"}
    a = grad_ys[-1]
    a_params = torch.zeros(sum(sizes[2:]), dtype=ys.dtype, device=ys.device)
    hooks = (parameter_adjoint,) if quadrature and params else ()
    # func's callback_step_adjoint and the like see each backward step's (z, a), in y0's structure.
    callbacks = setup.callbacks("_adjoint", lambda x: (setup.structure(x[:dim]), setup.structure(x[dim:2 * dim])))
    hooks = {"on_accept": hooks + callbacks.get("on_accept", ()), "on_attempt": callbacks.get("on_attempt", ()),
             "on_reject": callbacks.get("on_reject", ())}
    with torch.no_grad():
        for i in range(n - 1, 0, -1):
            x = torch.cat([ys[i], a] if quadrature else [ys[i], a, a_params])
            x = solve(back.method, augmented, x, [setup.times[i], setup.times[i - 1]], rtol=rtol,
                      atol=atol, norm=norm, options=options, stats=back_stats, **hooks)[-1]
            # Keep the forward pass's z(t_{i-1}); add the loss's direct dependence on it.
            a = x[dim:2 * dim] + grad_ys[i - 1]
            if not quadrature:
                a_params = x[2 * dim:]
    stats.backward_n_accepted += back_stats.n_accepted
    stats.backward_n_rejected += back_stats.n_rejected
    grads = torch.split(a_params, sizes[2:])
    return a, [g.view_as(p).to(p.dtype) for g, p in zip(grads, params)]


def _augmented_tolerance(tol, n_params: int):
    """The tolerance of the backward state ``[z, a, a_theta]`` (``n_params`` entries of ``a_theta``;
    0 when it is a quadrature) from the state's: a number stays one; a flat per-component tensor
    ``(D,)`` serves ``z`` and ``a``, and its smallest entry every entry of ``a_theta``."""
    if not isinstance(tol, Tensor):
        return tol
    return torch.cat([tol, tol, tol.min().expand(n_params)])


def _resolve_segments(setup, k, stats, states, grad_ys, params, step_ends):
    """Checkpointed gradients: re-solve each segment forward from its stored state, taking the
    forward's steps (``step_ends``, replayed), and backprop through it."""
    times = setup.times
    seg_stats = SolverStats()
    dynamics = setup.dynamics(seg_stats)
    a = torch.zeros_like(states[-1])
    grad_params = [torch.zeros_like(p) for p in params]
    segments = _segments(times, k)
    for idx in range(len(segments) - 1, -1, -1):
        grid, interior, last = segments[idx]
        with torch.enable_grad():
            z = states[idx].detach().requires_grad_(True)
            # The forward's steps, replayed (not chosen again): a re-solve whose arithmetic differs by
            # rounding (nondeterministic GPU kernels) still differentiates the forward's discretisation.
            outs = solve(setup.method, dynamics, z, grid, rtol=setup.rtol, atol=setup.atol,
                         norm=setup.norm, options=setup.options, stats=seg_stats, shape=setup.shape,
                         replay=step_ends[idx])
            end_grad = a if last is None else a + grad_ys[last]
            grads = _vjp([outs[1:]], (z,) + params, [torch.stack([grad_ys[j] for j in interior] + [end_grad])])
        a = grads[0]
        for g, acc in zip(grads[1:], grad_params):
            acc.add_(g)
    stats.backward_nfe += seg_stats.nfe
    stats.backward_n_accepted += seg_stats.n_accepted
    stats.backward_n_rejected += seg_stats.n_rejected
    return a + grad_ys[0], grad_params
