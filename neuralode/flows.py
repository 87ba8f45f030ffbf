r"""The discrete baseline: planar normalizing flows (Rezende & Mohamed 2015).

One planar layer maps :math:`z \mapsto z + \hat u\, h(w^\top z + b)` with :math:`h = \tanh`; its
Jacobian determinant is :math:`1 + \hat u^\top \psi(z)`, :math:`\psi(z) = h'(w^\top z + b)\, w`,
an O(D) computation (the matrix determinant lemma). Invertibility needs :math:`w^\top \hat u \ge -1`,
enforced by

.. math:: \hat u = u + \big(m(w^\top u) - w^\top u\big)\, \frac{w}{\lVert w\rVert^2},
   \qquad\text{so that}\qquad w^\top \hat u = m(w^\top u) > -1,

for any increasing :math:`m: \mathbb{R} \to (-1, \infty)`. The paper (appendix A.1) takes
:math:`m(x) = -1 + \log(1 + e^x)`, whose :math:`m(0) = \log 2 - 1 \approx -0.31`: with small random
:math:`w, u` (so :math:`w^\top u \approx 0`) the correction adds about :math:`-0.31\, w/\lVert w\rVert^2`,
a vector of length :math:`0.31/\lVert w\rVert`, and every fresh layer contracts volume by a factor
of about :math:`1 - 0.31`. The default here is the shifted
:math:`m(x) = -1 + \log(1 + e^{x + \log(e - 1)})`, with :math:`m(0) = 0` and the same range, so
the same set of layers, but a fresh layer is close to the identity
(:math:`\hat u \approx u`, :math:`\log|\det| \approx 0`).

The inverse has no closed form, but it is a one-dimensional problem: with :math:`a = w^\top z + b`
and :math:`c = w^\top \hat u > -1`, :math:`y = F(z)` gives :math:`a + c \tanh a = w^\top y + b`, an
increasing function of :math:`a`, so :meth:`PlanarLayer.inverse` finds :math:`a` by a safeguarded
Newton iteration and returns :math:`z = y - \hat u \tanh a`.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ._random import randn
from .cnf import standard_normal_log_prob

__all__ = ["PlanarLayer", "PlanarFlow", "PARAMETRIZATIONS"]

#: How a :class:`PlanarLayer` keeps ``w . u_hat >= -1``: ``"shifted"`` (a fresh layer is the identity) or
#: ``"paper"`` (Rezende & Mohamed's m, which makes fresh layers shrink volume).
PARAMETRIZATIONS = ("shifted", "paper")
_SHIFT = math.log(math.e - 1)  # softplus(_SHIFT) = 1, so the shifted m has m(0) = 0


class PlanarLayer(nn.Module):
    r"""One invertible planar transformation :math:`F(z) = z + \hat u \tanh(w^\top z + b)`.

    Args:
        dim: the dimension ``D``.
        init_scale: ``w`` and ``u`` start as ``init_scale * N(0, I)``, ``b`` at 0.
        parametrization: ``"shifted"`` (default), :math:`m(x) = \operatorname{softplus}(x + \log(e-1)) - 1`
            with :math:`m(0) = 0`, so that a fresh layer is close to the identity; or ``"paper"``,
            Rezende & Mohamed's :math:`m(x) = \operatorname{softplus}(x) - 1`, with which a fresh
            layer with small ``w`` contracts volume by about :math:`\log 2` (see the module's text).
            Both reach the same layers, :math:`w^\top \hat u \in (-1, \infty)`.

    Shapes: ``forward(z)`` maps ``(B, D)`` to ``((B, D), (B,))``: the output and
    :math:`\log |\det \partial F/\partial z|`. ``inverse(y)``: ``(B, D)`` to ``(B, D)``.
    """

    def __init__(self, dim: int, init_scale: float = 0.1, parametrization: str = "shifted"):
        super().__init__()
        if parametrization not in PARAMETRIZATIONS:
            raise ValueError(f"PlanarLayer: unknown parametrization {parametrization!r}; choose one of "
                             f"{', '.join(PARAMETRIZATIONS)}.")
        self.parametrization = parametrization
        self.w = nn.Parameter(init_scale * torch.randn(dim))
        self.u = nn.Parameter(init_scale * torch.randn(dim))
        self.b = nn.Parameter(torch.zeros(()))

    def m(self, x: Tensor) -> Tensor:
        """The map onto :math:`(-1, \\infty)` that sets :math:`w^\\top \\hat u = m(w^\\top u)`."""
        return F.softplus(x + _SHIFT) - 1 if self.parametrization == "shifted" else F.softplus(x) - 1

    def u_hat(self) -> Tensor:
        """The corrected :math:`\\hat u`, ``(D,)``, with :math:`w^\\top \\hat u = m(w^\\top u) > -1`."""
        wu = self.w @ self.u
        return self.u + (self.m(wu) - wu) * self.w / (self.w @ self.w).clamp_min(1e-12)

    def forward(self, z: Tensor):
        u = self.u_hat()
        h = torch.tanh(z @ self.w + self.b)  # (B,)
        # psi(z)^T u_hat = h'(w^T z + b) w^T u_hat: one scalar per point, and w^T u_hat > -1 keeps it above -1.
        logdet = torch.log((1 + (1 - h**2) * (self.w @ u)).abs().clamp_min(1e-12))
        return z + h[:, None] * u, logdet

    def inverse(self, y: Tensor, max_iter: int = 100) -> Tensor:
        r"""The ``z`` with :math:`F(z) = y`, ``(B, D)`` to ``(B, D)``; differentiable.

        Solves :math:`g(a) = a + c \tanh a - r = 0` for :math:`a = w^\top z + b`, with
        :math:`c = w^\top \hat u` and :math:`r = w^\top y + b`. The root lies in
        :math:`[r - |c|, r + |c|]`; a Newton step that leaves the current bracket, or does not
        halve the previous step, is replaced by bisection, so the iteration always converges. It runs without autograd; one last Newton
        step from the converged root, with autograd on, gives the implicit-function-theorem
        gradient :math:`\partial a/\partial\theta = -(\partial g/\partial\theta)/g'(a)`.
        """
        u = self.u_hat()
        c = self.w @ u
        r = y @ self.w + self.b  # (B,)
        eps = torch.finfo(y.dtype).eps
        with torch.no_grad():
            c0, r0 = c.detach(), r.detach()
            lo, hi = r0 - c0.abs(), r0 + c0.abs()
            a, last = r0.clone(), 2 * (hi - lo)
            for _ in range(max_iter):
                th = torch.tanh(a)
                g = a + c0 * th - r0
                lo = torch.where(g < 0, a, lo)
                hi = torch.where(g > 0, a, hi)
                slope = 1 + c0 * (1 - th**2)  # g'(a) >= min(1, 1 + c) > 0
                step = g / slope
                newton = a - step
                # Newton where it lands strictly inside the bracket and at least halves the last
                # step, else bisection (Numerical Recipes' rtsafe): steps shrink, no cycles.
                use = (newton > lo) & (newton < hi) & (2 * step.abs() <= last)
                a_new = torch.where(use, newton, 0.5 * (lo + hi))
                last = torch.where(use, step.abs(), 0.5 * (hi - lo))
                # Converged: a Newton step (or the bracket) at the level of g's rounding error over g'.
                noise = 16 * eps * (1 + a.abs() + c0.abs() + r0.abs()) / slope
                converged = (step.abs() <= noise) | (hi - lo <= noise)
                a = torch.where(converged, newton, a_new)
                if bool(converged.all()):
                    break
        th = torch.tanh(a)
        a = a - (a + c * th - r) / (1 + c * (1 - th**2))  # the IFT step: same value, exact gradient
        return y - torch.tanh(a)[:, None] * u


class PlanarFlow(nn.Module):
    """``K`` planar layers applied to a standard normal: a density you can sample and evaluate.

    Args:
        dim: the dimension ``D``.
        layers: the number of layers ``K`` (at least 1).
        init_scale, parametrization: passed to every :class:`~neuralode.flows.PlanarLayer`.

    Shapes: ``forward(z0)`` maps ``(B, D)`` to ``((B, D), (B,))``: the samples and their
    ``log q`` under the flow, ``log N(z0) - sum_k log |det J_k|``. ``log_prob(x)``: ``(B, D)`` to
    ``(B,)``, through ``inverse(x)`` (``K`` one-dimensional root finds).
    """

    def __init__(self, dim: int, layers: int, init_scale: float = 0.1, parametrization: str = "shifted"):
        super().__init__()
        if layers < 1:
            raise ValueError(f"PlanarFlow: layers must be at least 1, got {layers}.")
        self.dim = dim
        self.layers = nn.ModuleList(PlanarLayer(dim, init_scale, parametrization) for _ in range(layers))

    def forward(self, z0: Tensor):
        z, log_q = z0, standard_normal_log_prob(z0)
        for layer in self.layers:
            z, logdet = layer(z)
            log_q = log_q - logdet
        return z, log_q

    def inverse(self, x: Tensor) -> Tensor:
        """The base point ``z0`` that the flow carries to ``x``: ``(B, D)`` to ``(B, D)``."""
        for layer in reversed(self.layers):
            x = layer.inverse(x)
        return x

    def log_prob(self, x: Tensor) -> Tensor:
        """:math:`\\log q(x)`, ``(B, D)`` to ``(B,)``: invert, then run the flow forward for the log-determinants.

        Differentiable (the inverse is), so it can be trained by maximum likelihood; each call
        costs ``K`` root finds plus one forward pass.
        """
        if x.dim() != 2:
            raise ValueError(f"PlanarFlow.log_prob: x must have shape (batch, dim), got {tuple(x.shape)}.")
        return self(self.inverse(x))[1]

    def sample(self, n: int, generator=None):
        """``n`` samples ``(n, D)`` with their log-densities ``(n,)``."""
        return self(randn((n, self.dim), self.layers[0].w, generator))
