r"""Inhomogeneous Poisson processes: the log-likelihood and exact simulation by thinning.

For events :math:`s_1 < \dots < s_N` in the window ``[t0, t1]`` (the arguments below; chapter 8
of the book writes it :math:`[t_{\mathrm{start}}, t_{\mathrm{end}}]`) of a process with intensity
:math:`\lambda(t)` (Chen et al. 2018, section 5),

.. math::

    \log p(s_1, \dots, s_N) = \sum_{i=1}^N \log \lambda(s_i) - \int_{t_0}^{t_1} \lambda(t)\, dt ,

where the integral (the compensator :math:`\Lambda`) is solved as the ODE
:math:`\dot\Lambda = \lambda(t)`, :math:`\Lambda(t_0) = 0`, with :func:`neuralode.odeint`.
"""

from __future__ import annotations

from typing import Callable, Optional

import torch
from torch import Tensor

from ._odeint import odeint

__all__ = ["poisson_log_likelihood", "compensator", "simulate_thinning"]

Intensity = Callable[[Tensor], Tensor]


def compensator(intensity: Intensity, t0: float, t1: float, *, like: Optional[Tensor] = None,
                method: str = "dopri5", rtol: float = 1e-7, atol: float = 1e-9,
                options: Optional[dict] = None) -> Tensor:
    r""":math:`\Lambda = \int_{t_0}^{t_1} \lambda(t)\,dt` as the solution of :math:`\dot\Lambda = \lambda(t)`.

    Args:
        intensity: ``intensity(t)`` with ``t`` a 0-d tensor; returns a tensor of any shape ``S``
            (several independent processes at once).
        t0, t1: the observation window.
        like: a tensor whose dtype and device the integral uses; by default those of
            ``intensity(t0)`` for a float64 CPU ``t0`` (float64 when that is not floating point).
        method, rtol, atol, options: the solver, as for :func:`neuralode.odeint`.

    Returns:
        The integral, of shape ``S``; differentiable with respect to the intensity's parameters.
    """
    probe = intensity(torch.tensor(float(t0), dtype=torch.float64 if like is None else like.dtype,
                                   device=None if like is None else like.device))
    if like is None:  # follow the intensity: a float32 or CUDA intensity gets a float32 or CUDA state
        like = probe if probe.is_floating_point() else probe.double()
    start = torch.zeros(probe.shape, dtype=like.dtype, device=like.device)
    return odeint(lambda t, _: intensity(t), start, [float(t0), float(t1)], method=method, rtol=rtol,
                  atol=atol, options=options)[-1]


def poisson_log_likelihood(intensity: Intensity, event_times, t0: float, t1: float, *, method: str = "dopri5",
                           rtol: float = 1e-7, atol: float = 1e-9, options: Optional[dict] = None) -> Tensor:
    r"""Log-likelihood of event times under an inhomogeneous Poisson process.

    Args:
        intensity: ``intensity(t) > 0``, elementwise in ``t``: called with a 0-d tensor inside the
            solver and once with the vector of event times.
        event_times: the events, shape ``(N,)``, all inside ``[t0, t1]`` (``N`` may be 0).
        t0, t1: the observation window, ``t0 < t1``.
        method, rtol, atol, options: the compensator's solver, as for :func:`neuralode.odeint`.

    Returns:
        A 0-d tensor: :math:`\sum_i \log\lambda(s_i) - \int_{t_0}^{t_1}\lambda(t)\,dt` for the events :math:`s_i`.

    Raises:
        ValueError: for events outside the window, a non-positive window, or a non-positive
            intensity at an event.
    """
    if not t1 > t0:
        raise ValueError(f"poisson_log_likelihood: need t0 < t1, got t0={t0}, t1={t1}.")
    events = torch.as_tensor(event_times, dtype=torch.float64)
    if events.dim() != 1:
        raise ValueError(f"poisson_log_likelihood: event_times must be 1-D, got shape {tuple(events.shape)}.")
    if len(events) and (events.min() < t0 or events.max() > t1):
        raise ValueError(f"poisson_log_likelihood: every event must lie in [t0, t1] = [{t0}, {t1}].")
    probe = intensity(torch.tensor(float(t0), dtype=torch.float64))
    like = probe if probe.is_floating_point() else probe.double()
    rates = intensity(events.to(dtype=like.dtype, device=like.device))
    if rates.shape != events.shape:
        raise ValueError(f"poisson_log_likelihood: intensity(t) for t of shape {tuple(events.shape)} returned "
                         f"shape {tuple(rates.shape)}; it must evaluate elementwise on a vector of times.")
    if bool((rates <= 0).any()):
        raise ValueError("poisson_log_likelihood: the intensity must be positive at every event "
                         "(use a softplus or exp output).")
    return rates.log().sum() - compensator(intensity, t0, t1, like=like, method=method, rtol=rtol, atol=atol,
                                           options=options)


def simulate_thinning(intensity: Callable[[Tensor], Tensor], t0: float, t1: float, rate_max: float, *,
                      generator: Optional[torch.Generator] = None) -> Tensor:
    r"""Exact samples of an inhomogeneous Poisson process by thinning (Lewis & Shedler 1979).

    Draw a homogeneous process of rate ``rate_max`` on ``[t0, t1]`` and keep each point ``s`` with
    probability :math:`\lambda(s)/\lambda_{max}`; the kept points are a Poisson process of
    intensity :math:`\lambda`, provided :math:`\lambda \le \lambda_{max}` on the window.

    Args:
        intensity: vectorised ``intensity(t)`` for ``t`` of shape ``(M,)``, returning ``(M,)``.
        t0, t1: the window.
        rate_max: an upper bound of the intensity on the window.
        generator: for reproducible draws.

    Returns:
        The sorted event times, shape ``(N,)``, float64.

    Raises:
        ValueError: for ``t1 <= t0`` or ``rate_max <= 0``; when the intensity is not elementwise,
            is negative, or exceeds ``rate_max`` at a proposed point (the bound is wrong, and the
            samples would be too).
    """
    if not t1 > t0:
        raise ValueError(f"simulate_thinning: need t0 < t1, got t0={t0}, t1={t1}.")
    if not rate_max > 0:
        raise ValueError(f"simulate_thinning: rate_max must be positive, got {rate_max}.")
    count = int(torch.poisson(torch.tensor(rate_max * (t1 - t0), dtype=torch.float64), generator=generator))
    proposals = torch.sort(t0 + (t1 - t0) * torch.rand(count, dtype=torch.float64, generator=generator)).values
    rates = intensity(proposals)
    if rates.shape != proposals.shape:  # a broadcast would keep or drop points against the wrong rate
        raise ValueError(f"simulate_thinning: intensity(t) for t of shape {tuple(proposals.shape)} returned "
                         f"shape {tuple(rates.shape)}; it must evaluate elementwise on a vector of times.")
    if bool((rates < 0).any()):  # thinning would read a negative rate as zero without a word
        raise ValueError(f"simulate_thinning: the intensity is negative ({rates.min().item():.4g}) at a proposed "
                         "point; an intensity must be >= 0 (use a softplus or exp output).")
    if bool((rates > rate_max).any()):
        raise ValueError(f"simulate_thinning: the intensity reaches {rates.max().item():.4g} > rate_max="
                         f"{rate_max}; pass a larger bound.")
    keep = torch.rand(count, dtype=torch.float64, generator=generator) * rate_max < rates
    return proposals[keep]
