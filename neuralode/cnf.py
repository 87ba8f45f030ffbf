r"""Continuous normalizing flows: the instantaneous change of variables and FFJORD's trace estimator.

If :math:`\dot z = f(z, t)`, the log-density of :math:`z(t)` obeys (Chen et al. 2018, Theorem 1)

.. math::

    \frac{\partial \log p(z(t))}{\partial t} = -\operatorname{tr}\Big(\frac{\partial f}{\partial z(t)}\Big),

so :math:`\log p(z(t_1)) = \log p(z(t_0)) - \int_{t_0}^{t_1} \operatorname{tr}(\partial f/\partial z)\,dt`.
The trace costs :math:`D` vector-Jacobian products exactly, or one with Hutchinson's estimator
:math:`\operatorname{tr}(J) = \mathbb{E}[\epsilon^\top J \epsilon]` for noise with
:math:`\mathbb{E}[\epsilon\epsilon^\top] = I` (Grathwohl et al. 2019, FFJORD), or none at all when
the dynamics know their own divergence in closed form (``trace="analytic"``, e.g.
:class:`GatedPlanarDynamics`: :math:`O(MD)` per evaluation for :math:`M` hidden units).

RNODE (Finlay et al. 2020) regularizes the dynamics with two more integrals carried in the same
augmented state, the kinetic energy and the Jacobian's squared Frobenius norm
(:meth:`neuralode.CNF.log_prob_and_penalties`, :class:`neuralode.RNODETerms`).
"""

from __future__ import annotations

import math
import numbers
from typing import NamedTuple, Optional

import torch
from torch import Tensor, nn

from ._odeint import odeint
from ._random import randn
from .adjoint import odeint_adjoint

__all__ = ["divergence_exact", "divergence_hutchinson", "hutchinson_variance", "sample_noise", "CNF", "ConcatSquashLinear",
           "CNFDynamics", "GatedPlanarDynamics", "RNODETerms", "standard_normal_log_prob"]

TRACES = ("exact", "hutchinson", "analytic")
NOISES = ("rademacher", "gaussian")


def divergence_exact(f_out: Tensor, z: Tensor) -> Tensor:
    """:math:`\\operatorname{tr}(\\partial f/\\partial z)` per example, one VJP per dimension.

    Args:
        f_out: ``(B, D)``, computed from ``z`` with autograd recording.
        z: ``(B, D)``, requiring grad.

    Returns:
        ``(B,)``; differentiable (built with ``create_graph=True``).
    """
    columns = []
    for i in range(z.shape[1]):
        row = torch.autograd.grad(f_out[:, i].sum(), z, create_graph=True, retain_graph=True)[0]
        columns.append(row[:, i])
    return torch.stack(columns, dim=1).sum(dim=1)


def divergence_hutchinson(f_out: Tensor, z: Tensor, noise: Tensor) -> Tensor:
    """Hutchinson's estimate :math:`\\epsilon^\\top (\\partial f/\\partial z) \\epsilon` with one VJP.

    Args:
        f_out: ``(B, D)``, computed from ``z`` with autograd recording.
        z: ``(B, D)``, requiring grad.
        noise: ``(B, D)`` with zero mean and identity covariance (Rademacher or Gaussian).

    Returns:
        ``(B,)``, an unbiased estimate of the trace; differentiable.
    """
    vjp = torch.autograd.grad(f_out, z, grad_outputs=noise, create_graph=True)[0]
    return (vjp * noise).sum(dim=1)


def _divergence_and_frobenius_exact(f_out: Tensor, z: Tensor) -> tuple:
    """``(tr J, ||J||_F^2)`` per example, ``(B,)`` each, from the ``D`` rows of :math:`J = \\partial f/\\partial z`
    that :func:`divergence_exact` computes (one VJP per row); differentiable."""
    trace, frobenius = 0, 0
    for i in range(z.shape[1]):
        row = torch.autograd.grad(f_out[:, i].sum(), z, create_graph=True, retain_graph=True)[0]
        trace, frobenius = trace + row[:, i], frobenius + (row**2).sum(dim=1)
    return trace, frobenius


def hutchinson_variance(A: Tensor, kind: str = "rademacher") -> Tensor:
    r"""The variance of one Hutchinson estimate :math:`\epsilon^\top A \epsilon` of :math:`\operatorname{tr} A`.

    With :math:`S = (A + A^\top)/2` (the estimator only sees the symmetric part),

    .. math::

        \operatorname{Var}_{\text{Rademacher}} = 2 \sum_{i \ne j} S_{ij}^2,
        \qquad
        \operatorname{Var}_{\text{Gaussian}} = 2 \|S\|_F^2 .

    Args:
        A: ``(..., D, D)``, any batch of square matrices (e.g. Jacobians).
        kind: ``"rademacher"`` or ``"gaussian"``, as for :func:`sample_noise`.

    Returns:
        ``(...)``, in ``A``'s dtype and device.
    """
    if kind not in NOISES:
        raise ValueError(f"hutchinson_variance: unknown noise {kind!r}; choose one of {', '.join(NOISES)}.")
    if A.dim() < 2 or A.shape[-1] != A.shape[-2]:
        raise ValueError(f"hutchinson_variance: A must have shape (..., D, D), got {tuple(A.shape)}.")
    S = (A + A.transpose(-1, -2)) / 2
    total = 2 * (S**2).sum(dim=(-2, -1))
    if kind == "gaussian":
        return total
    return total - 2 * (torch.diagonal(S, dim1=-2, dim2=-1)**2).sum(dim=-1)


def sample_noise(like: Tensor, kind: str = "rademacher", generator: Optional[torch.Generator] = None) -> Tensor:
    """Noise for Hutchinson's estimator, shaped like ``like``: Rademacher (+-1) or standard Gaussian.

    With a ``generator`` the noise is drawn on the generator's device and then moved to ``like``'s,
    so a CPU generator (what :func:`neuralode.seed_everything` returns) serves a CUDA model too
    and gives the same numbers on every device.
    """
    device = generator.device if generator is not None else like.device
    if kind == "rademacher":
        bits = torch.randint(0, 2, like.shape, generator=generator, device=device)
        return (2 * bits - 1).to(like.dtype).to(like.device)
    if kind == "gaussian":
        return randn(like.shape, like, generator)
    raise ValueError(f"sample_noise: unknown noise {kind!r}; choose one of {', '.join(NOISES)}.")


def standard_normal_log_prob(z: Tensor) -> Tensor:
    """:math:`\\log \\mathcal N(z; 0, I)` summed over the last dimension: ``(B, D)`` to ``(B,)``."""
    return -0.5 * (z**2).sum(dim=-1) - 0.5 * z.shape[-1] * math.log(2 * math.pi)


class _Augmented(nn.Module):
    """``(z, s) -> (f(t, z), tr df/dz)``: the CNF's state with its accumulated trace; with
    ``penalties``, ``(z, s, e, j) -> (f, tr df/dz, ||f||^2, ||df/dz||_F^2)``, RNODE's integrands
    (the last one exact for ``trace="exact"``, else Hutchinson's :math:`\\|\\epsilon^\\top J\\|^2`).

    ``noise`` (``(B, D)``, Hutchinson's trace, or the Jacobian penalty with the analytic trace)
    belongs to one solve: :meth:`CNF._solve` builds a fresh ``_Augmented`` around the shared
    ``dynamics`` for every solve, and the adjoint keeps that object for its backward pass.
    """

    def __init__(self, dynamics: nn.Module, trace: str, noise: Optional[Tensor] = None, penalties: bool = False):
        super().__init__()
        self.dynamics, self.trace, self.noise, self.penalties = dynamics, trace, noise, penalties

    def forward(self, t: Tensor, state):
        z = state[0]
        if self.penalties:
            return self._with_penalties(t, z)
        if self.trace == "analytic":
            # The dynamics' own closed form: no autograd call, so no graph unless training needs one.
            both = getattr(self.dynamics, "forward_with_divergence", None)
            if both is not None:
                return both(t, z)
            return self.dynamics(t, z), self.dynamics.divergence(t, z)
        with torch.enable_grad():
            z = z if z.requires_grad else z.detach().requires_grad_(True)
            dz = self.dynamics(t, z)
            if self.trace == "exact":
                div = divergence_exact(dz, z)
            else:
                div = divergence_hutchinson(dz, z, self.noise)
        return dz, div

    def _with_penalties(self, t: Tensor, z: Tensor) -> tuple:
        with torch.enable_grad():
            z = z if z.requires_grad else z.detach().requires_grad_(True)
            if self.trace == "exact":
                dz = self.dynamics(t, z)
                div, frobenius = _divergence_and_frobenius_exact(dz, z)
            else:
                if self.trace == "analytic":
                    both = getattr(self.dynamics, "forward_with_divergence", None)
                    dz, div = both(t, z) if both is not None else (self.dynamics(t, z), self.dynamics.divergence(t, z))
                else:
                    dz = self.dynamics(t, z)
                # eps^T J: Hutchinson's trace is (eps^T J) eps, and E||eps^T J||^2 = ||J||_F^2 (E[eps eps^T] = I).
                vjp = torch.autograd.grad(dz, z, grad_outputs=self.noise, create_graph=True)[0]
                if self.trace == "hutchinson":
                    div = (vjp * self.noise).sum(dim=1)
                frobenius = (vjp**2).sum(dim=1)
        return dz, div, (dz**2).sum(dim=1), frobenius


class RNODETerms(NamedTuple):
    r"""What :meth:`neuralode.CNF.log_prob_and_penalties` returns, each ``(B,)``: :math:`\log p(x)` and RNODE's

    .. math::

        E(x) = \int_{t_0}^{t_1} \|f(z(t), t)\|^2\,dt, \qquad
        J(x) = \int_{t_0}^{t_1} \Big\|\frac{\partial f}{\partial z}(z(t), t)\Big\|_F^2\,dt

    along the path :math:`z(t)` through :math:`z(t_1) = x` (Finlay et al. 2020, whose :math:`[0, T]`
    is our :math:`[t_0, t_1]`): both are integrals over the interval, positive whichever way it is
    solved. :math:`J` is exact with ``trace="exact"`` (from the :math:`D` rows the trace
    already needs) and otherwise Hutchinson's unbiased :math:`\int \|\epsilon^\top \partial f/\partial z\|^2 dt`
    with the solve's noise (the trace's own with ``trace="hutchinson"``: one VJP serves both).
    Unbiased up to the solver's error: the adaptive steps, and so the quadrature nodes of both
    integrals, are chosen by an error control that sees the (noisy) trace accumulator, so they depend
    weakly on the noise; test unbiasedness at a tight tolerance or with fixed steps.
    """

    log_prob: Tensor
    kinetic: Tensor
    jacobian: Tensor

    def loss(self, kinetic_weight: float, jacobian_weight: float) -> Tensor:
        r"""RNODE's objective, per-example means: :math:`-\overline{\log p} + \lambda_K \bar E + \lambda_J \bar J`.

        The weights multiply the integrals as defined above, against a log-likelihood in nats summed
        over the :math:`D` dimensions. RNODE's code (ffjord-rnode's ``train.py``) integrates
        :math:`\tfrac12\|f\|^2/D` and :math:`\|\epsilon^\top J\|^2/D` instead and adds them to
        bits per dimension, :math:`-\log p / (D \ln 2)`; multiplying its objective by :math:`D \ln 2`
        gives this one, so its ``--kinetic-energy l`` is ``kinetic_weight = l ln(2) / 2`` here and its
        ``--jacobian-norm2 l`` is ``jacobian_weight = l ln(2)``.
        """
        for name, value in (("kinetic_weight", kinetic_weight), ("jacobian_weight", jacobian_weight)):
            if isinstance(value, bool) or not isinstance(value, numbers.Real) or not (0 <= value < math.inf):
                raise ValueError(f"RNODETerms.loss: {name} must be a finite number >= 0 (0 switches that "
                                 f"penalty off), got {value!r}.")
        return -self.log_prob.mean() + kinetic_weight * self.kinetic.mean() + jacobian_weight * self.jacobian.mean()


#: The error scale of RNODE's accumulators: so large that they never decide a step (see CNF._solve).
_UNCONTROLLED = 1e20

#: The settings of a :class:`CNF` besides its dynamics, as :meth:`CNF.with_` accepts them.
_SETTINGS = ("t0", "t1", "trace", "noise", "method", "rtol", "atol", "options", "adjoint")


class CNF(nn.Module):
    r"""A continuous normalizing flow: a standard normal at ``t0`` carried to the data at ``t1``.

    Args:
        dynamics: ``dynamics(t, z)`` with ``z: (B, D)``, an ``nn.Module`` (e.g. :class:`CNFDynamics`).
        t0, t1: the base distribution lives at ``t0``, the data at ``t1``.
        trace: ``"exact"`` (D VJPs per evaluation), ``"hutchinson"`` (one VJP, stochastic) or
            ``"analytic"``: the dynamics' own ``divergence(t, z) -> (B,)`` (no VJP; the dynamics
            must define it, and may define ``forward_with_divergence(t, z)`` returning both at once).
        noise: Hutchinson noise, ``"rademacher"`` or ``"gaussian"``, drawn once per solve.
        method, rtol, atol, options: the solver, passed to :func:`neuralode.odeint` (and, with the
            adjoint, used for the backward solve too).
        adjoint: gradients by :func:`neuralode.odeint_adjoint` (O(1) memory) or backprop.

    :meth:`log_prob_and_penalties` adds RNODE's kinetic and Jacobian penalties to the same solve.

    Attributes:
        nfe: function evaluations of the last solve.
        backward_nfe: evaluations of the last solve's adjoint backward pass (0 without the adjoint,
            or before ``backward()``).
        stats: the solver statistics of the last solve.
    """

    def __init__(self, dynamics: nn.Module, *, t0: float = 0.0, t1: float = 1.0, trace: str = "exact",
                 noise: str = "rademacher", method: str = "dopri5", rtol: float = 1e-5, atol: float = 1e-5,
                 options: Optional[dict] = None, adjoint: bool = True):
        super().__init__()
        if trace not in TRACES:
            raise ValueError(f"CNF: unknown trace {trace!r}; choose one of {', '.join(TRACES)}.")
        if noise not in NOISES:
            raise ValueError(f"CNF: unknown noise {noise!r}; choose one of {', '.join(NOISES)}.")
        if trace == "analytic" and not callable(getattr(dynamics, "divergence", None)):
            raise ValueError(f"CNF: trace='analytic' needs dynamics with a divergence(t, z) method; "
                             f"{type(dynamics).__name__} has none. Use trace='exact' or 'hutchinson'.")
        self.augmented = _Augmented(dynamics, trace)  # owns the dynamics (state_dict keys "augmented.*")
        self.t0, self.t1 = float(t0), float(t1)
        self.noise, self.method, self.rtol, self.atol, self.adjoint = noise, method, rtol, atol, adjoint
        self.options = options
        self.nfe, self.stats = 0, None

    @property
    def dynamics(self) -> nn.Module:
        return self.augmented.dynamics

    @property
    def trace(self) -> str:
        """The way the divergence is computed, ``"exact"``, ``"hutchinson"`` or ``"analytic"``."""
        return self.augmented.trace

    def with_(self, **changes) -> "CNF":
        """A new ``CNF`` on the *same* dynamics (shared parameters, nothing copied) with some settings changed.

        ``changes`` are any of ``t0, t1, trace, noise, method, rtol, atol, options, adjoint``; the
        rest are kept. A model trained with ``trace="hutchinson"`` at a loose tolerance is scored
        with ``cnf.with_(trace="exact", rtol=1e-5, atol=1e-5)``; training ``cnf`` further also
        changes the new one, since the two share their dynamics.
        """
        unknown = sorted(set(changes) - set(_SETTINGS))
        if unknown:
            raise TypeError(f"CNF.with_: unknown setting(s) {', '.join(map(repr, unknown))}; "
                            f"choose from {', '.join(_SETTINGS)}.")
        return CNF(self.dynamics, **{**{name: getattr(self, name) for name in _SETTINGS}, **changes})

    @property
    def backward_nfe(self) -> int:
        return getattr(self.stats, "backward_nfe", 0)

    def _solve(self, z: Tensor, times: list, penalties: bool = False):
        """Solve the augmented state ``(z, s)``, ``z: (B, D)``, ``s(times[0]) = 0``, over ``times``;
        with ``penalties``, also RNODE's two integrals over the interval (positive in either direction)."""
        trace = self.trace
        noisy = trace == "hutchinson" or (penalties and trace == "analytic")
        noise = sample_noise(z, self.noise) if noisy else None
        # The noise travels with this solve's own function object, not the module: the adjoint's
        # backward evaluates that object again, so a log_prob/transform/sample called before
        # backward() (a validation batch, a sample) must not swap the noise under this gradient.
        func = _Augmented(self.dynamics, trace, noise, penalties)
        s = torch.zeros(z.shape[0], dtype=z.dtype, device=z.device)
        solver = odeint_adjoint if self.adjoint else odeint
        state, atol = (z, s), self.atol
        if penalties:
            # As RNODE's code: the accumulators never decide a step (the error norm is the worst
            # part's), so a solve takes the same steps, and gives the same (z, s), with or without them.
            state = (z, s, torch.zeros_like(s), torch.zeros_like(s))
            atol = (*(self.atol if isinstance(self.atol, tuple) else (self.atol, self.atol)),
                    _UNCONTROLLED, _UNCONTROLLED)
        out, self.stats = solver(func, state, times, method=self.method, rtol=self.rtol, atol=atol,
                                 options=self.options, return_stats=True)
        self.nfe = self.stats.nfe
        if not penalties:
            return out[0][-1], out[1][-1]
        direction = 1.0 if times[-1] >= times[0] else -1.0  # int over [t1 -> t0] is minus the integral
        return out[0][-1], out[1][-1], direction * out[2][-1], direction * out[3][-1]

    def inverse_transform(self, x: Tensor) -> tuple:
        """Carry data ``(B, D)`` from ``t1`` back to ``t0``: returns ``(z0, s0)``, ``(B, D)`` and ``(B,)``,
        with :math:`s_0 = -\\int_{t_0}^{t_1} \\operatorname{tr}(\\partial f / \\partial z)\\,dt`, so that
        :math:`\\log p(x) = \\log p_0(z_0) + s_0` for any base density :math:`p_0` (:meth:`log_prob` uses
        the standard normal; a model with another base, such as :class:`neuralode.images.GaussianCNF`,
        adds its own)."""
        if x.dim() != 2:
            raise ValueError(f"CNF: x must have shape (batch, dim), got {tuple(x.shape)}.")
        return self._solve(x, [self.t1, self.t0])

    def log_prob(self, x: Tensor) -> Tensor:
        """:math:`\\log p(x)`: ``(B, D)`` to ``(B,)``, solving from the data at ``t1`` back to ``t0``."""
        z0, s0 = self.inverse_transform(x)
        return standard_normal_log_prob(z0) + s0

    def log_prob_and_penalties(self, x: Tensor) -> RNODETerms:
        r""":math:`\log p(x)` with RNODE's penalties (Finlay et al. 2020) along the same solve, each ``(B,)``.

        The kinetic energy :math:`E = \int_{t_0}^{t_1} \|f\|^2 dt` and the Jacobian norm
        :math:`J = \int_{t_0}^{t_1} \|\partial f/\partial z\|_F^2 dt` join the augmented state (see
        :class:`neuralode.RNODETerms`); train on ``terms.loss(kinetic_weight, jacobian_weight)``. The extra
        cost is small: no evaluation of ``f`` and no VJP is added with ``trace="hutchinson"``
        (``J`` reuses the trace's VJP) or ``"exact"`` (``J`` from the same ``D`` rows); with
        ``"analytic"`` one VJP per evaluation, with Hutchinson noise drawn for the solve.
        The accumulators are left out of the step-size control, as in RNODE's code, so the solve
        takes the same steps, and ``log_prob`` equals :meth:`log_prob`'s for the same noise.
        Time is not rescaled: :math:`E` and :math:`J` are integrals over :math:`[t_0, t_1]` as
        given (RNODE fixes its end time; solving over :math:`[0, cT]` with ``f/c`` divides both by ``c``).
        """
        if x.dim() != 2:
            raise ValueError(f"CNF: x must have shape (batch, dim), got {tuple(x.shape)}.")
        z0, s0, kinetic, jacobian = self._solve(x, [self.t1, self.t0], penalties=True)
        return RNODETerms(standard_normal_log_prob(z0) + s0, kinetic, jacobian)

    def transform(self, z0: Tensor) -> tuple:
        """Carry base samples ``(B, D)`` from ``t0`` to ``t1``: returns ``(x, log p(x))``."""
        x, s1 = self._solve(z0, [self.t0, self.t1])
        # Forward: s(t1) = +int tr dt, and log p(x) = log N(z0) - int tr dt.
        return x, standard_normal_log_prob(z0) - s1

    def sample(self, n: int, dim: Optional[int] = None, generator: Optional[torch.Generator] = None) -> Tensor:
        """``n`` samples of shape ``(n, D)``; ``D`` is read from the dynamics when it has ``dim``."""
        dim = dim if dim is not None else getattr(self.dynamics, "dim", None)
        if dim is None:
            raise ValueError("CNF.sample: pass dim=..., the dynamics do not say their dimension.")
        return self.transform(randn((n, dim), next(self.parameters()), generator))[0]


class ConcatSquashLinear(nn.Module):
    """FFJORD's time-conditioned layer: ``(W z + b) * sigmoid(W_g t + b_g) + W_t t``.

    Shapes: ``forward(t, z)`` maps ``t: ()`` and ``z: (B, D_in)`` to ``(B, D_out)``.
    """

    def __init__(self, in_features: int, out_features: int):
        super().__init__()
        self.linear = nn.Linear(in_features, out_features)
        self.gate = nn.Linear(1, out_features)
        self.bias = nn.Linear(1, out_features, bias=False)

    def forward(self, t: Tensor, z: Tensor) -> Tensor:
        tt = t.reshape(1, 1).to(z.dtype)
        return self.linear(z) * torch.sigmoid(self.gate(tt)) + self.bias(tt)


class CNFDynamics(nn.Module):
    """FFJORD's MLP dynamics from :class:`ConcatSquashLinear` layers with a smooth activation.

    Args:
        dim: data dimension ``D``.
        hidden: widths of the hidden layers.
        activation: ``"softplus"`` or ``"tanh"`` (smooth, so that the trace is well behaved).

    Shapes: ``forward(t, z)``: ``(B, D)`` to ``(B, D)``.
    """

    def __init__(self, dim: int, hidden=(64, 64, 64), activation: str = "softplus"):
        super().__init__()
        acts = {"softplus": nn.Softplus, "tanh": nn.Tanh}
        if activation not in acts:
            raise ValueError(f"CNFDynamics: unknown activation {activation!r}; choose softplus or tanh.")
        self.dim = dim
        sizes = [dim, *hidden, dim]
        self.layers = nn.ModuleList(ConcatSquashLinear(a, b) for a, b in zip(sizes[:-1], sizes[1:]))
        self.activation = acts[activation]()

    def forward(self, t: Tensor, z: Tensor) -> Tensor:
        for i, layer in enumerate(self.layers):
            z = layer(t, z)
            if i < len(self.layers) - 1:
                z = self.activation(z)
        return z


class GatedPlanarDynamics(nn.Module):
    r"""The paper's planar CNF with ``M`` hidden units (Chen et al. 2018, section 4.1):

    .. math:: \dot z = \sum_{m=1}^{M} \sigma(g_m(t))\, u_m(t) \tanh(w_m(t)^\top z + b_m(t)),

    whose parameters come from a hypernetwork of ``t``. Its exact trace is cheap:
    :math:`\sum_m \sigma(g_m) (1 - \tanh^2(w_m^\top z + b_m)) u_m^\top w_m`.

    Shapes: ``forward(t, z)``: ``(B, D)`` to ``(B, D)``.
    """

    def __init__(self, dim: int, width: int, hyper_hidden: int = 32):
        super().__init__()
        self.dim, self.width = dim, width
        self.hyper = nn.Sequential(nn.Linear(1, hyper_hidden), nn.Tanh(), nn.Linear(hyper_hidden, hyper_hidden),
                                   nn.Tanh(), nn.Linear(hyper_hidden, width * (2 * dim + 2)))

    def _parameters_at(self, t: Tensor, dtype):
        params = self.hyper(t.reshape(1, 1).to(dtype)).reshape(-1)
        m, d = self.width, self.dim
        w = params[: m * d].reshape(m, d)
        u = params[m * d: 2 * m * d].reshape(m, d)
        b = params[2 * m * d: 2 * m * d + m]
        gate = torch.sigmoid(params[2 * m * d + m:])
        return w, u, b, gate

    def forward(self, t: Tensor, z: Tensor) -> Tensor:
        w, u, b, gate = self._parameters_at(t, z.dtype)
        h = torch.tanh(z @ w.T + b)  # (B, M)
        return (h * gate) @ u

    def divergence(self, t: Tensor, z: Tensor) -> Tensor:
        """The closed-form trace of the Jacobian, ``(B, D)`` to ``(B,)``: O(MD), no autograd."""
        return self.forward_with_divergence(t, z)[1]

    def forward_with_divergence(self, t: Tensor, z: Tensor) -> tuple:
        """``(f(t, z), tr df/dz)``, shapes ``(B, D)`` and ``(B,)``, from one hypernetwork evaluation."""
        w, u, b, gate = self._parameters_at(t, z.dtype)
        h = torch.tanh(z @ w.T + b)  # (B, M)
        return (h * gate) @ u, ((1 - h**2) * (gate * (u * w).sum(dim=1))).sum(dim=1)
