r"""Flow matching: regress a vector field onto a known conditional one, keep the ODE for sampling.

**Convention** (the :class:`~neuralode.CNF`'s): :math:`t = 0` is noise, :math:`x_0 \sim \mathcal N(0, I)`, the
CNF's base at ``t0 = 0``; :math:`t = 1` is data :math:`x_1`, the CNF's data at ``t1 = 1``. A field
``v(t, x)`` trained here is a CNF dynamics as it stands: ``CNF(v).transform`` carries noise to data, and
``CNF(v).log_prob`` gives its exact log-likelihood (the instantaneous change of variables, chapter 5).

**Affine conditional paths** (Lipman et al. 2023; Liu et al. 2023; Tong et al. 2024; the affine flows of
Lipman et al. 2024, "Flow Matching Guide and Code"). Given a pair :math:`(x_0, x_1)` and noise
:math:`\epsilon \sim \mathcal N(0, I)`,

.. math::

    x_t = a_t x_0 + b_t x_1 + c\,\epsilon, \qquad u_t = \frac{d x_t}{dt} = \dot a_t x_0 + \dot b_t x_1,

with a constant :math:`c`. The marginal field :math:`u_t(x) = \mathbb E[u_t \mid x_t = x]` carries the
marginal :math:`p_t` of :math:`x_t` (it solves the continuity equation
:math:`\partial_t p_t + \nabla\cdot(p_t u_t) = 0`), and the conditional loss
:math:`\mathbb E\,\|v_\theta(t, x_t) - u_t\|^2` differs from the marginal one
:math:`\mathbb E\,\|v_\theta(t, x_t) - u_t(x_t)\|^2` by a constant free of :math:`\theta`: both have
the same gradient (Lipman et al. 2023, Theorem 2), so :func:`flow_matching_loss` trains the marginal field.
"""

from __future__ import annotations

import math
import numbers
from typing import Callable, Optional, Union

import torch
from torch import Tensor

from ._methods import REGISTRY
from ._odeint import odeint
from ._random import randn

__all__ = ["AffinePath", "LinearPath", "GaussianPath", "CosinePath", "flow_matching_loss", "ot_coupling",
           "sample", "straightness", "gaussian_marginal_field"]


def _per_example(t: Tensor, x: Tensor) -> Tensor:
    """``t`` of shape ``()`` as it is, or ``(B,)`` reshaped to ``(B, 1, ..., 1)`` to broadcast against ``x``."""
    return t if t.dim() == 0 else t.reshape(-1, *[1] * (x.dim() - 1))


class AffinePath:
    r"""A conditional path :math:`x_t = a_t x_0 + b_t x_1 + c\,\epsilon`; subclasses give :meth:`AffinePath.coefficients`.

    Attributes:
        sigma: the constant noise scale :math:`c` (0 for a deterministic path).
    """

    sigma = 0.0

    def coefficients(self, t: Tensor) -> tuple:
        r""":math:`(a_t, b_t, \dot a_t, \dot b_t)`, each shaped like ``t``."""
        raise NotImplementedError

    def __call__(self, x0: Tensor, x1: Tensor, t: Tensor, eps: Optional[Tensor] = None) -> tuple:
        """The point and its conditional velocity: ``(x_t, u_t)``, both shaped like ``x0``.

        Args:
            x0: noise ``(B, *S)``; x1: data ``(B, *S)``, paired row by row.
            t: a number, or a tensor of shape ``()`` or ``(B,)``.
            eps: standard normal ``(B, *S)``; required when ``sigma > 0`` (draw it with your generator).
        """
        if self.sigma > 0 and eps is None:
            raise ValueError(f"{type(self).__name__}: sigma={self.sigma} > 0 needs eps=..., standard normal noise "
                             "shaped like x0 (e.g. torch.randn_like(x0)).")
        t = torch.as_tensor(t, dtype=x0.dtype, device=x0.device)
        a, b, da, db = (_per_example(c, x0) for c in self.coefficients(t))
        x_t = a * x0 + b * x1
        if self.sigma > 0:
            x_t = x_t + self.sigma * eps
        return x_t, da * x0 + db * x1


class LinearPath(AffinePath):
    r"""The optimal-transport path of Lipman et al. (2023): :math:`a_t = 1 - (1 - \sigma_{\min}) t`, :math:`b_t = t`,

    .. math:: x_t = (1 - (1 - \sigma_{\min}) t)\, x_0 + t x_1, \qquad u_t = x_1 - (1 - \sigma_{\min}) x_0 .

    :math:`x_1` is reached within :math:`\sigma_{\min} x_0`; ``sigma_min=0`` is rectified flow's straight
    line :math:`x_t = (1 - t) x_0 + t x_1` (Liu et al. 2023).
    """

    def __init__(self, sigma_min: float = 0.0):
        if not isinstance(sigma_min, numbers.Real) or not 0.0 <= sigma_min < 1.0:
            raise ValueError(f"LinearPath: sigma_min must be in [0, 1), got {sigma_min!r}.")
        self.sigma_min = float(sigma_min)

    def coefficients(self, t: Tensor) -> tuple:
        s = 1.0 - self.sigma_min
        return 1 - s * t, t, torch.full_like(t, -s), torch.ones_like(t)


class GaussianPath(AffinePath):
    r"""Conditional flow matching's path (Tong et al. 2024, I-CFM and OT-CFM): a Gaussian of constant width
    :math:`\sigma` around the straight line,

    .. math:: x_t = (1 - t)\, x_0 + t x_1 + \sigma \epsilon, \qquad u_t = x_1 - x_0 .
    """

    def __init__(self, sigma: float = 0.1):
        if not isinstance(sigma, numbers.Real) or not (sigma >= 0.0 and math.isfinite(sigma)):
            raise ValueError(f"GaussianPath: sigma must be finite and >= 0, got {sigma!r}.")
        self.sigma = float(sigma)

    def coefficients(self, t: Tensor) -> tuple:
        return 1 - t, t, -torch.ones_like(t), torch.ones_like(t)


class CosinePath(AffinePath):
    r"""The variance-preserving diffusion path with the cosine schedule, run from noise to data:

    .. math::

        x_t = \cos(\tfrac{\pi t}{2})\, x_0 + \sin(\tfrac{\pi t}{2})\, x_1, \qquad
        u_t = \tfrac{\pi}{2}\big(\cos(\tfrac{\pi t}{2})\, x_1 - \sin(\tfrac{\pi t}{2})\, x_0\big) .

    :math:`a_t^2 + b_t^2 = 1`: a standard normal :math:`x_0` and unit-variance data keep unit variance.
    Its marginal field is the probability-flow ODE of the variance-preserving diffusion (Song et al.
    2021) with these marginals, run from noise to data. With the score :math:`s = \nabla \log p_t(x)`,
    Tweedie's formula gives :math:`\mathbb E[x_0 \mid x_t = x] = -a_t s` and so
    :math:`\mathbb E[x_1 \mid x_t = x] = (x + a_t^2 s)/b_t`; with :math:`a_t \dot a_t = -b_t \dot b_t`,

    .. math::

        u_t(x) = \dot a_t\, \mathbb E[x_0 \mid x] + \dot b_t\, \mathbb E[x_1 \mid x]
               = \frac{\dot b_t}{b_t}\, x + \Big(\frac{\dot b_t a_t^2}{b_t} - \dot a_t a_t\Big) s
               = \frac{\dot b_t}{b_t}\,(x + s),

    the drift :math:`-\tfrac12 \beta(\tau)(x + s)` of the probability-flow ODE in diffusion time
    :math:`\tau = 1 - t`, where :math:`\tfrac12\beta = \dot b_t / b_t` is the schedule's rate.
    """

    def coefficients(self, t: Tensor) -> tuple:
        angle = 0.5 * math.pi * t
        return torch.cos(angle), torch.sin(angle), -0.5 * math.pi * torch.sin(angle), 0.5 * math.pi * torch.cos(angle)


def _rand(n: int, like: Tensor, generator: Optional[torch.Generator]) -> Tensor:
    """``U[0, 1)`` of shape ``(n,)`` in ``like``'s dtype and device, drawn on the generator's device."""
    device = generator.device if generator is not None else like.device
    return torch.rand(n, generator=generator, dtype=like.dtype, device=device).to(like.device)


def flow_matching_loss(field: Callable, x0: Tensor, x1: Tensor, path: AffinePath, t: Optional[Tensor] = None,
                       generator: Optional[torch.Generator] = None) -> Tensor:
    r"""The conditional flow-matching loss :math:`\frac1B \sum_i \|v(t_i, x_{t_i}) - u_{t_i}\|^2` (sum over dimensions).

    The field is evaluated at each example's own time through :func:`torch.vmap`, one example at a
    time as ``field(t_i, x[i:i+1])`` with ``t_i`` 0-d: any CNF dynamics (which takes a 0-d ``t``, as
    :func:`~neuralode.odeint` passes it) works unchanged, at the cost of one batched call. (The field
    must be vmappable: no ``.item()``, no in-place change of its input, no branch on tensor values.)

    Args:
        field: ``field(t, x)``, ``t`` 0-d and ``x`` ``(1, *S)``, returning ``(1, *S)``; e.g. a
            :class:`~neuralode.CNFDynamics`.
        x0: noise ``(B, *S)``; x1: data ``(B, *S)``, paired row by row (see :func:`ot_coupling`).
        path: an :class:`AffinePath`.
        t: ``(B,)`` times in [0, 1]; by default drawn from :math:`U[0, 1]`, one per example.
        generator: draws ``t`` and the path's noise (on its own device, then moved to ``x0``'s).

    Returns:
        A 0-d tensor, differentiable with respect to the field's parameters.
    """
    if not isinstance(path, AffinePath):
        raise TypeError(f"flow_matching_loss: path must be an AffinePath (LinearPath(), GaussianPath(sigma), "
                        f"CosinePath()), got {type(path).__name__}.")
    if x0.shape != x1.shape or x0.dim() < 2:
        raise ValueError(f"flow_matching_loss: x0 and x1 must share a shape (B, *S), got {tuple(x0.shape)} "
                         f"and {tuple(x1.shape)}.")
    batch = x0.shape[0]
    if t is None:
        t = _rand(batch, x0, generator)
    elif not isinstance(t, Tensor) or t.shape != (batch,):
        raise ValueError(f"flow_matching_loss: t must be a tensor of shape ({batch},), one time per example, "
                         f"got {getattr(t, 'shape', t)!r}.")
    elif bool(((t < 0) | (t > 1) | t.isnan()).any()):
        raise ValueError("flow_matching_loss: t must lie in [0, 1] (0 is the noise end, 1 the data end), got "
                         f"values from {t.min().item():.4g} to {t.max().item():.4g}.")
    t = t.to(dtype=x0.dtype, device=x0.device)
    eps = randn(x0.shape, x0, generator) if path.sigma > 0 else None
    x_t, u_t = path(x0, x1, t, eps)
    v = torch.vmap(lambda ti, xi: field(ti, xi.unsqueeze(0)).squeeze(0))(t, x_t)
    if v.shape != u_t.shape:
        # A (B, 1) output would broadcast against (B, D) and give a finite, meaningless loss.
        raise ValueError(f"flow_matching_loss: the field returned shape {tuple(v.shape[1:])} per example, expected "
                         f"{tuple(u_t.shape[1:])} (the state's shape): field(t, x) must return a tensor shaped like x.")
    return (v - u_t).pow(2).reshape(batch, -1).sum(dim=1).mean()


def ot_coupling(x0: Tensor, x1: Tensor) -> Tensor:
    r"""Minibatch optimal transport (Tong et al. 2024, OT-CFM): reorder ``x0`` to pair it with ``x1``.

    Solves :math:`\min_\pi \sum_i \|x_0^{(\pi(i))} - x_1^{(i)}\|^2` over permutations with
    ``scipy.optimize.linear_sum_assignment`` on the CPU in float64: with equal batches and uniform
    weights an optimal plan is a permutation.

    Args:
        x0, x1: ``(B, *S)`` floating point, same shape (trailing dimensions are flattened for the cost).

    Returns:
        ``x0[perm]`` on ``x0``'s device: its row ``i`` is paired with ``x1[i]``.
    """
    try:
        from scipy.optimize import linear_sum_assignment
    except ImportError:  # scipy is a chapters' dependency, not the library's
        raise ImportError("ot_coupling needs scipy: pip install scipy (or the library's [chapters] extra).") from None
    for name, x in (("x0", x0), ("x1", x1)):
        if not isinstance(x, Tensor) or not x.is_floating_point() or x.dim() < 2:
            raise ValueError(f"ot_coupling: {name} must be a floating-point tensor of shape (B, *S), got "
                             f"{getattr(x, 'dtype', type(x).__name__)} of shape {tuple(getattr(x, 'shape', ()))}.")
    if x0.shape != x1.shape:
        raise ValueError(f"ot_coupling: x0 and x1 must have the same shape (equal batches), got {tuple(x0.shape)} "
                         f"and {tuple(x1.shape)}; draw as much noise as data.")
    a = x0.detach().reshape(len(x0), -1).to("cpu", torch.float64)
    b = x1.detach().reshape(len(x1), -1).to("cpu", torch.float64)
    cost = (b**2).sum(1, keepdim=True) + (a**2).sum(1) - 2 * b @ a.T  # cost[i, j] = |x1_i - x0_j|^2
    if not bool(torch.isfinite(cost).all()):
        raise ValueError("ot_coupling: x0 or x1 holds NaN or inf (or values so large their squares overflow).")
    _, perm = linear_sum_assignment(cost.numpy())
    return x0[torch.as_tensor(perm, device=x0.device)]


def _solve(caller: str, func: Callable, y0, method: str, steps: Optional[int], t0: float, t1: float,
           odeint_kwargs: dict):
    """``odeint`` from ``t0`` to ``t1``; ``steps`` uniform steps for a fixed-step method."""
    if method not in REGISTRY:
        raise ValueError(f"{caller}: unknown method {method!r}; choose one of {', '.join(REGISTRY)}.")
    adaptive = REGISTRY[method].adaptive
    if adaptive and steps is not None:
        raise ValueError(f"{caller}: steps={steps} is for fixed-step methods; {method!r} chooses its own steps "
                         "(set rtol/atol), or pick method='euler', 'midpoint', 'heun3', 'rk4'.")
    if steps is not None:
        if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
            raise ValueError(f"{caller}: steps must be a positive int, got {steps!r}.")
        times = torch.linspace(t0, t1, steps + 1, dtype=torch.float64)  # odeint steps between output times
    elif not adaptive and not {"step_size", "grid_constructor"} & set(odeint_kwargs.get("options") or {}):
        raise ValueError(f"{caller}: the fixed-step method {method!r} needs steps=k (k uniform steps), or "
                         "options={'step_size': h}.")
    else:
        times = torch.tensor([t0, t1], dtype=torch.float64)
    return odeint(func, y0, times, method=method, **odeint_kwargs)


def sample(field: Callable, x0: Tensor, method: str = "dopri5", steps: Optional[int] = None, t0: float = 0.0,
           t1: float = 1.0, return_stats: bool = False, **odeint_kwargs) -> Union[Tensor, tuple]:
    """Carry noise ``x0`` along :math:`\\dot x = v(t, x)` from ``t0`` to ``t1`` with :func:`~neuralode.odeint`.

    Args:
        field: ``field(t, x)``, ``t`` 0-d, ``x`` shaped like ``x0``.
        x0: ``(B, *S)`` samples of the base distribution.
        method: any of :data:`~neuralode.METHODS`.
        steps: ``k`` uniform steps for a fixed-step method (required for those, unless ``options`` give a
            ``step_size``); not allowed for adaptive ones.
        return_stats: also return the solver's :class:`~neuralode.SolverStats` (its ``nfe``).
        odeint_kwargs: ``rtol``, ``atol``, ``options``, as for :func:`~neuralode.odeint`.

    Returns:
        ``x1`` shaped like ``x0``; ``(x1, stats)`` with ``return_stats``.
    """
    ys, stats = _solve("sample", field, x0, method, steps, t0, t1, {**odeint_kwargs, "return_stats": True})
    return (ys[-1], stats) if return_stats else ys[-1]


def straightness(field: Callable, x0: Tensor, method: str = "dopri5", steps: Optional[int] = None,
                 **odeint_kwargs) -> Tensor:
    r"""Liu et al.'s (2023) straightness of the paths from ``x0``, per sample, unnormalized:

    .. math:: S = \int_0^1 \|\dot x_t - (x_1 - x_0)\|^2 dt = \int_0^1 \|v(t, x_t)\|^2 dt - \|x_1 - x_0\|^2 ,

    zero exactly when the path is a straight line at constant speed (then one Euler step is exact).
    The kinetic energy :math:`\int \|v\|^2 dt` is integrated alongside the state, with :func:`sample`'s
    ``method``, ``steps`` and ``odeint_kwargs``.

    Returns:
        ``(B,)``, in ``x0``'s dtype.
    """
    def augmented(t, state):
        v = field(t, state[0])
        return v, v.pow(2).reshape(len(v), -1).sum(dim=1)

    energy0 = torch.zeros(len(x0), dtype=x0.dtype, device=x0.device)
    xs, energy = _solve("straightness", augmented, (x0, energy0), method, steps, 0.0, 1.0, odeint_kwargs)
    return energy[-1] - (xs[-1] - x0).pow(2).reshape(len(x0), -1).sum(dim=1)


def gaussian_marginal_field(path: AffinePath, mean0, std0, mean1, std1) -> Callable:
    r"""The exact marginal field of ``path`` between independent :math:`\mathcal N(m_0, s_0^2)` and
    :math:`\mathcal N(m_1, s_1^2)` (per dimension: numbers or ``(D,)`` tensors, a diagonal covariance).

    :math:`x_t` and :math:`u_t` are jointly Gaussian, so :math:`\mathbb E[u_t \mid x_t = x]` is linear in
    :math:`x`: with :math:`m_t = a_t m_0 + b_t m_1` and :math:`s_t^2 = a_t^2 s_0^2 + b_t^2 s_1^2 + c^2`,

    .. math::

        u_t(x) = \dot a_t m_0 + \dot b_t m_1 + \frac{a_t \dot a_t s_0^2 + b_t \dot b_t s_1^2}{s_t^2}(x - m_t)
               = \dot m_t + \frac{\dot s_t}{s_t}(x - m_t),

    since :math:`\operatorname{Cov}(u_t, x_t) = a_t \dot a_t s_0^2 + b_t \dot b_t s_1^2 = s_t \dot s_t`.
    Its flow is the affine map :math:`x \mapsto m_t + (s_t / s_{t=0})(x - m_{t=0})` from the marginal at
    :math:`t = 0`: for :class:`CosinePath` and ``LinearPath(0)`` (:math:`a_0 = b_1 = 1`, :math:`a_1 = b_0 = c = 0`)
    it carries :math:`\mathcal N(m_0, s_0^2)` exactly onto :math:`\mathcal N(m_1, s_1^2)`.

    Returns:
        ``field(t, x)``: ``t`` 0-d or ``(B,)``, ``x`` ``(B, D)`` in any dtype and device.
    """
    if any(bool((torch.as_tensor(s) <= 0).any()) for s in (std0, std1)):
        raise ValueError(f"gaussian_marginal_field: std0 and std1 must be positive, got {std0!r} and {std1!r}.")

    def field(t: Tensor, x: Tensor) -> Tensor:
        m0, s0, m1, s1 = (torch.as_tensor(v, dtype=x.dtype, device=x.device) for v in (mean0, std0, mean1, std1))
        t = torch.as_tensor(t, dtype=x.dtype, device=x.device)
        a, b, da, db = (_per_example(c, x) for c in path.coefficients(t))
        m_t = a * m0 + b * m1
        var_t = a**2 * s0**2 + b**2 * s1**2 + path.sigma**2
        return da * m0 + db * m1 + (a * da * s0**2 + b * db * s1**2) / var_t * (x - m_t)

    return field
