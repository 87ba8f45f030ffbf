"""Test problems with exact solutions, the solver lists and the devices to test on."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch

import neuralode as node

FIXED_METHODS = {m: node.TABLEAUS[m].order for m in node.METHODS if not node.TABLEAUS[m].adaptive}
ADAPTIVE_METHODS = [m for m in node.METHODS if node.TABLEAUS[m].adaptive]
DTYPES = [torch.float32, torch.float64]


def affordable_tolerance(method: str, dtype=torch.float64) -> float:
    """A tolerance the method reaches in a few hundred steps on the test problems.

    A second-order pair at 1e-9 would need ~1e5 steps: it is the wrong tool, not a bug.
    """
    order = node.TABLEAUS[method].order
    if dtype == torch.float32:
        return 1e-4 if order <= 2 else 1e-5
    return {1: 1e-5, 2: 1e-5, 3: 1e-7}.get(order, 1e-9)
DEVICES = [torch.device("cpu")] + ([torch.device("cuda")] if torch.cuda.is_available() else [])


@dataclass(frozen=True)
class Problem:
    """``y' = f(t, y)`` on ``[t0, t1]`` with the exact solution ``exact(t, y0)``."""

    name: str
    f: Callable
    exact: Callable
    y0: tuple
    t0: float = 0.0
    t1: float = 1.0

    def initial(self, dtype=torch.float64, device="cpu") -> torch.Tensor:
        return torch.tensor(self.y0, dtype=dtype, device=device)


def _rotation(t, y):
    return torch.stack([y[..., 1], -y[..., 0]], dim=-1)


def _rotation_exact(t, y0):
    c, s = torch.cos(t), torch.sin(t)
    return torch.stack([c * y0[0] + s * y0[1], -s * y0[0] + c * y0[1]], dim=-1)


PROBLEMS = [
    # Linear decay, several rates at once: y' = -lambda y.
    Problem("decay", lambda t, y: -torch.tensor([0.5, 1.0, 2.0], dtype=y.dtype, device=y.device) * y,
            lambda t, y0: y0 * torch.exp(-torch.tensor([0.5, 1.0, 2.0], dtype=y0.dtype, device=y0.device)
                                         * t[:, None]),
            (1.0, -2.0, 0.5), 0.0, 2.0),
    # Harmonic oscillator: a rotation of the plane.
    Problem("oscillator", _rotation, _rotation_exact, (1.0, 0.5), 0.0, 2 * math.pi),
    # Non-autonomous: y' = cos(t) y, y = y0 exp(sin t); exercises the nodes c_i.
    Problem("cosine", lambda t, y: torch.cos(t) * y,
            lambda t, y0: y0 * torch.exp(torch.sin(t))[:, None], (1.0, 2.0), 0.0, 4.0),
    # Logistic growth, nonlinear: y' = y (1 - y).
    Problem("logistic", lambda t, y: y * (1 - y),
            lambda t, y0: 1 / (1 + (1 / y0 - 1) * torch.exp(-t)[:, None]), (0.1, 0.5, 2.0), 0.0, 5.0),
]
PROBLEM_IDS = [p.name for p in PROBLEMS]


@dataclass(frozen=True)
class ReferenceProblem:
    """A non-stiff problem without a closed form; the reference is scipy's DOP853 at 1e-13."""

    name: str
    f: Callable  # torch: f(t, y) with y of shape (D,)
    y0: tuple
    t1: float

    def initial(self, dtype=torch.float64, device="cpu") -> torch.Tensor:
        return torch.tensor(self.y0, dtype=dtype, device=device)

    def reference(self, t) -> np.ndarray:
        """The solution at times ``t`` (shape ``(T,)``) as an array ``(T, D)``."""
        from scipy.integrate import solve_ivp

        def rhs(s, y):
            return self.f(torch.tensor(s), torch.from_numpy(y)).numpy()

        t = np.asarray(t, dtype=np.float64)
        sol = solve_ivp(rhs, (t[0], t[-1]), np.array(self.y0, dtype=np.float64), method="DOP853",
                        t_eval=t, rtol=1e-13, atol=1e-13)
        assert sol.success, sol.message
        return sol.y.T


def _van_der_pol(t, y, mu=1.0):
    return torch.stack([y[1], mu * (1 - y[0] ** 2) * y[1] - y[0]])


def _lotka_volterra(t, y, a=1.5, b=1.0, c=3.0, d=1.0):
    return torch.stack([a * y[0] - b * y[0] * y[1], -c * y[1] + d * y[0] * y[1]])


def _two_body(t, y):
    r3 = (y[0] ** 2 + y[1] ** 2) ** 1.5
    return torch.stack([y[2], y[3], -y[0] / r3, -y[1] / r3])


def _lorenz(t, y, sigma=10.0, rho=28.0, beta=8.0 / 3.0):
    return torch.stack([sigma * (y[1] - y[0]), y[0] * (rho - y[2]) - y[1], y[0] * y[1] - beta * y[2]])


_ECC = 0.5
REFERENCE_PROBLEMS = [
    ReferenceProblem("van_der_pol", _van_der_pol, (2.0, 0.0), 10.0),
    ReferenceProblem("lotka_volterra", _lotka_volterra, (1.0, 1.0), 10.0),
    # An orbit of eccentricity 0.5, started at perihelion: one period is 2 pi.
    ReferenceProblem("two_body", _two_body, (1 - _ECC, 0.0, 0.0, math.sqrt((1 + _ECC) / (1 - _ECC))),
                     2 * math.pi),
    # Lorenz on a short span: chaos amplifies every error, so only a short window is a fair test.
    ReferenceProblem("lorenz", _lorenz, (1.0, 1.0, 1.0), 2.0),
]


class LinearDynamics(torch.nn.Module):
    """f(t, z) = A z, ``z: (B, D)``: a CNF dynamics whose flow (z(t) = e^{A (t - t1)} x), density and RNODE
    integrals have closed forms."""

    def __init__(self, A: torch.Tensor):
        super().__init__()
        self.A = torch.nn.Parameter(A)
        self.dim = A.shape[0]

    def forward(self, t, z):
        return z @ self.A.T
