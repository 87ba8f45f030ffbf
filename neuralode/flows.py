r"""The discrete baseline: planar normalizing flows (Rezende & Mohamed 2015).

One planar layer maps :math:`z \mapsto z + \hat u\, h(w^\top z + b)` with :math:`h = \tanh`; its
Jacobian determinant is :math:`1 + \hat u^\top \psi(z)`, :math:`\psi(z) = h'(w^\top z + b)\, w`,
an O(D) computation. Invertibility needs :math:`w^\top \hat u \ge -1`, enforced by
:math:`\hat u = u + (m(w^\top u) - w^\top u)\, w / \lVert w\rVert^2` with
:math:`m(x) = -1 + \log(1 + e^x)` (the paper's appendix A.1).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .cnf import standard_normal_log_prob

__all__ = ["PlanarLayer", "PlanarFlow"]


class PlanarLayer(nn.Module):
    """One invertible planar transformation with its log-determinant.

    Shapes: ``forward(z)`` maps ``(B, D)`` to ``((B, D), (B,))``: the output and
    ``log |det df/dz|``.
    """

    def __init__(self, dim: int, init_scale: float = 0.1):
        super().__init__()
        self.w = nn.Parameter(init_scale * torch.randn(dim))
        self.u = nn.Parameter(init_scale * torch.randn(dim))
        self.b = nn.Parameter(torch.zeros(()))

    def u_hat(self) -> Tensor:
        wu = self.w @ self.u
        return self.u + (F.softplus(wu) - 1 - wu) * self.w / (self.w @ self.w).clamp_min(1e-12)

    def forward(self, z: Tensor):
        u = self.u_hat()
        pre = z @ self.w + self.b  # (B,)
        h = torch.tanh(pre)
        psi = (1 - h**2)[:, None] * self.w  # (B, D)
        logdet = torch.log((1 + psi @ u).abs().clamp_min(1e-12))
        return z + h[:, None] * u, logdet


class PlanarFlow(nn.Module):
    """``K`` planar layers applied to a standard normal: a density you can sample and evaluate.

    Shapes: ``forward(z0)`` maps ``(B, D)`` to ``((B, D), (B,))``: the samples and their
    ``log q`` under the flow, ``log N(z0) - sum_k log |det J_k|``.
    """

    def __init__(self, dim: int, layers: int):
        super().__init__()
        if layers < 1:
            raise ValueError(f"PlanarFlow: layers must be at least 1, got {layers}.")
        self.dim = dim
        self.layers = nn.ModuleList(PlanarLayer(dim) for _ in range(layers))

    def forward(self, z0: Tensor):
        z, log_q = z0, standard_normal_log_prob(z0)
        for layer in self.layers:
            z, logdet = layer(z)
            log_q = log_q - logdet
        return z, log_q

    def sample(self, n: int, generator=None):
        """``n`` samples ``(n, D)`` with their log-densities ``(n,)``."""
        p = self.layers[0].w
        return self(torch.randn(n, self.dim, generator=generator, dtype=p.dtype, device=p.device))
