"""Custom autograd Functions whose backward builds no graph refuse to be differentiated twice.

A backward pass computed under ``torch.no_grad()`` (the adjoint's, the Rosenbrock Jacobian's
share of the state's gradient, the time gradient) returns constants to autograd. Under
``create_graph=True`` (gradient penalties, Hessian-vector products, gradgradcheck) a second
derivative through them would be silently wrong; these helpers make it raise instead.
"""

from __future__ import annotations

import functools

import torch
from torch import Tensor

__all__ = ["Refuse", "refuse_double_backward", "once_differentiable"]


class Refuse(torch.autograd.Function):
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
    return Refuse.apply(message, *(g.detach().requires_grad_(True) for g in grads))


def once_differentiable(message: str):
    """Decorate a custom Function's ``backward`` that builds no graph (it runs under ``no_grad``).

    Under ``create_graph=True`` its gradients would be constants, and a second derivative through
    them silently wrong. Every gradient it returns is then routed through a node whose backward
    raises ``RuntimeError(message)``. Unlike ``torch.autograd.function.once_differentiable``, which
    does so only when an incoming gradient requires grad, this refuses whenever the graph is being
    built: ``d(sum ys)/d theta`` comes in as a constant yet depends on ``theta``.
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
