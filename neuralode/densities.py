r"""Fitting flows to densities: reverse KL to an energy, maximum likelihood on samples (chapters 5, 6).

Two ways to fit a flow's density :math:`q_\theta`:

* to an unnormalized target :math:`p(x) = e^{-U(x)}/Z` by the *reverse* Kullback-Leibler divergence
  (Chen et al. 2018, section 4.1; Rezende & Mohamed 2015),

  .. math:: \mathrm{KL}(q\,\|\,p) = \mathbb{E}_{z_0 \sim \mathcal N(0, I)}\big[\log q(x) + U(x)\big]_{x = T(z_0)} + \log Z,

  which needs the flow's samples with their log-densities (:func:`fit_reverse_kl`,
  :func:`reverse_kl`), and, to report the divergence itself, :math:`\log Z`
  (:func:`log_normalizer`, by quadrature in two dimensions);
* to samples :math:`x_1, \dots, x_N` by maximum likelihood, :math:`\max_\theta \frac1N \sum_i \log q_\theta(x_i)`,
  which needs the log-density of data points (:func:`fit_max_likelihood`).

Rezende & Mohamed's energies ``u2`` and ``u3`` have infinite mass on the plane (``u2`` is periodic in
:math:`z_1`, ``u3`` periodic apart from a bump near :math:`z_1 = 1`); :func:`confined_energy` adds a
broad Gaussian factor so that every target is a proper density with a finite :math:`\log Z`.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Callable, Iterable, List, Optional

import torch
from torch import Tensor, nn

from .data import target_energy

__all__ = ["confined_energy", "log_normalizer", "fit_reverse_kl", "reverse_kl", "fit_max_likelihood", "DensityFit",
           "SCHEDULES", "CONFINEMENT"]

#: Learning-rate schedules of the fitting loops.
SCHEDULES = ("cosine", "constant")
#: ``confined_energy`` adds ``z1**2 / CONFINEMENT``: a Gaussian factor of standard deviation 2 in ``z1``.
CONFINEMENT = 8.0


def confined_energy(name: str, z: Tensor) -> Tensor:
    r"""Rezende & Mohamed's energy ``name`` made normalizable: :math:`U(z) + z_1^2/8` for ``u2``, ``u3``, ``u4``.

    ``u1`` (a ring split in two) is a proper density as it is and is returned unchanged. The others
    do not decay in :math:`z_1` (``u2`` is periodic in :math:`z_1`; ``u3`` and ``u4`` are periodic
    up to a bump or a step near :math:`z_1 = 1`), so :math:`\int e^{-U} = \infty`; the factor
    :math:`e^{-z_1^2/8}` makes the mass finite and leaves the picture on :math:`[-4, 4]^2`
    recognizable.

    Args:
        name: ``"u1"``, ``"u2"``, ``"u3"`` or ``"u4"``.
        z: ``(B, 2)``, any floating dtype and device.

    Returns:
        ``(B,)``, the energy, with ``z``'s dtype and device.
    """
    U = target_energy(name, z)
    return U if name == "u1" else U + z[:, 0] ** 2 / CONFINEMENT


def log_normalizer(energy: Callable[[Tensor], Tensor], *, lim: float = 10.0, n: int = 1001,
                   dtype: torch.dtype = torch.float64, device=None) -> float:
    r""":math:`\log Z = \log \int_{\mathbb R^2} e^{-U(x)}\, dx`, by a Riemann sum on the square :math:`[-\mathrm{lim}, \mathrm{lim}]^2`.

    Computed as ``logsumexp(-U) + 2 log h`` on an ``n x n`` grid of spacing ``h = 2 lim / (n - 1)``,
    stable however large :math:`U` is. The error is that of the grid (second order for a smooth
    :math:`e^{-U}` that is negligible at the border) plus the mass outside the square.

    Args:
        energy: ``U``, mapping ``(B, 2)`` to ``(B,)``.
        lim: half-width of the square.
        n: grid points per axis.
        dtype, device: of the grid.

    Returns:
        ``log Z`` as a Python float.
    """
    if n < 2 or lim <= 0:
        raise ValueError(f"log_normalizer: need n >= 2 and lim > 0, got n={n}, lim={lim}.")
    ax = torch.linspace(-lim, lim, n, dtype=dtype, device=device)
    xy = torch.cartesian_prod(ax, ax)
    return (torch.logsumexp(-energy(xy), 0) + 2 * math.log(2 * lim / (n - 1))).item()


def _check_schedule(schedule: str) -> None:
    if schedule not in SCHEDULES:
        raise ValueError(f"unknown schedule {schedule!r}; choose one of {', '.join(SCHEDULES)}.")


def _set_lr(opt, lr: float, schedule: str, step: int, iters: int) -> None:
    r"""The learning rate of step ``step`` (0-based): constant, or cosine from ``lr`` down to 0 at ``iters``.

    The cosine is :math:`\eta_k = \tfrac{\eta}{2}(1 + \cos(\pi k / K))`, the closed form of PyTorch's
    ``CosineAnnealingLR`` with ``T_max = K`` and ``eta_min = 0``.
    """
    rate = lr if schedule == "constant" else 0.5 * lr * (1 + math.cos(math.pi * step / iters))
    for group in opt.param_groups:
        group["lr"] = rate


def _check_counts(iters: int, batch: int) -> None:
    for label, v in (("iters", iters), ("batch", batch)):
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise ValueError(f"{label} must be a positive int, got {v!r}.")


def _base_noise(gen: torch.Generator, n: int, dim: int, dtype, device) -> Tensor:
    # Drawn on the CPU generator, then moved: the same stream on every device.
    return torch.randn(n, dim, generator=gen, dtype=dtype).to(device)


def fit_reverse_kl(sample: Callable[[Tensor], tuple], params: Iterable[Tensor], energy: Callable[[Tensor], Tensor],
                   *, dim: int, iters: int, batch: int, lr: float = 1e-2, schedule: str = "cosine",
                   seed: int = 0) -> List[float]:
    r"""Adam on the reverse-KL loss :math:`\mathbb{E}_{z_0}[\log q(x) + U(x)]`, a fresh batch of base samples per step.

    The loss is :math:`\mathrm{KL}(q\,\|\,p) - \log Z`: it needs no normalizer, and its gradient flows
    through the samples (the reparametrization trick). Base samples come from a CPU generator seeded
    with ``seed``, in the parameters' dtype and on their device, so two models fitted with the same
    ``seed`` see the same stream of :math:`z_0` (a paired comparison).

    Args:
        sample: the flow's forward pass, ``z0: (B, D) -> (x: (B, D), log q(x): (B,))``
            (``PlanarFlow`` itself, ``CNF.transform``).
        params: the parameters to fit.
        energy: ``U``, ``(B, D) -> (B,)``.
        dim: ``D``.
        iters, batch: optimizer steps and base samples per step.
        lr, schedule: Adam's learning rate, ``"cosine"`` (decays to 0) or ``"constant"``.
        seed: seed of the base samples.

    Returns:
        The loss of every step (``iters`` floats); add :math:`\log Z` for KL estimates.
    """
    _check_counts(iters, batch)
    params = list(params)
    if not params:
        raise ValueError("fit_reverse_kl: params is empty; pass the flow's parameters().")
    _check_schedule(schedule)
    opt = torch.optim.Adam(params, lr=lr, foreach=True)  # one kernel per step for many small tensors
    gen = torch.Generator().manual_seed(seed)
    losses = []
    for step in range(iters):
        _set_lr(opt, lr, schedule, step, iters)
        x, log_q = sample(_base_noise(gen, batch, dim, params[0].dtype, params[0].device))
        loss = (log_q + energy(x)).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses


@torch.no_grad()
def reverse_kl(sample: Callable[[Tensor], tuple], energy: Callable[[Tensor], Tensor], *, dim: int, n: int,
               log_z: float = 0.0, seed: int = 1, dtype: torch.dtype = torch.float32, device=None) -> tuple:
    r"""Monte Carlo :math:`\mathrm{KL}(q\,\|\,p) = \mathbb{E}_{x\sim q}[\log q(x) + U(x)] + \log Z` on ``n`` fresh samples.

    Args:
        sample: ``z0: (n, D) -> (x, log q(x))`` as for :func:`fit_reverse_kl`.
        energy: ``U``, ``(n, D) -> (n,)``.
        dim, n: ``D`` and the number of samples.
        log_z: :math:`\log Z` (:func:`log_normalizer`); 0 gives the loss, KL up to that constant.
        seed, dtype, device: of the base samples (a CPU generator, then moved to ``device``).

    Returns:
        ``(kl, x, stderr)``: the estimate (float), the samples ``(n, D)``, and the Monte Carlo
        standard error of the estimate (float).
    """
    z0 = _base_noise(torch.Generator().manual_seed(seed), n, dim, dtype, device)
    x, log_q = sample(z0)
    terms = (log_q + energy(x)).double()
    return terms.mean().item() + log_z, x, (terms.std() / math.sqrt(n)).item()


@dataclass
class DensityFit:
    """What :func:`fit_max_likelihood` measured, step by step.

    Attributes:
        losses: the minibatch negative log-likelihood of every step.
        nfe: the model's ``nfe`` after every step's forward pass (0 when it has none).
        seconds: wall time of the whole fit (CUDA synchronized at both ends).
    """

    losses: List[float] = field(default_factory=list)
    nfe: List[int] = field(default_factory=list)
    seconds: float = 0.0


def _sync(device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def fit_max_likelihood(model: nn.Module, data: Tensor, *, iters: int, batch: int, lr: float = 1e-2,
                       schedule: str = "cosine", seed: int = 0,
                       callback: Optional[Callable[[int, float], None]] = None) -> DensityFit:
    r"""Adam on the negative log-likelihood :math:`-\frac1B\sum_i \log q(x_i)` of random minibatches of ``data``.

    Minibatch indices come from a CPU generator seeded with ``seed`` (then moved to ``data``'s
    device), so models fitted with the same ``seed`` see the same minibatches.

    Args:
        model: anything with ``log_prob(x: (B, D)) -> (B,)`` and parameters (``CNF``, ``PlanarFlow``).
        data: ``(N, D)``, on the model's device; or a data set drawn afresh on every access, any
            object with ``len(data)``, ``data[idx] -> (len(idx), D)`` for a tensor of indices
            ``idx`` and a ``device`` attribute (e.g. images dequantized with new noise each time).
        iters, batch: optimizer steps and minibatch size.
        lr, schedule: Adam's learning rate, ``"cosine"`` (decays to 0) or ``"constant"``.
        seed: seed of the minibatch indices.
        callback: called as ``callback(step, loss)`` after every step (a progress bar, a log).

    Returns:
        A :class:`DensityFit` with the loss and NFE of every step and the wall time.
    """
    _check_counts(iters, batch)
    if torch.is_tensor(data):
        if data.dim() != 2:
            raise ValueError(f"fit_max_likelihood: data must have shape (N, dim), got {tuple(data.shape)}.")
    elif not all(hasattr(data, name) for name in ("__len__", "__getitem__", "device")):
        raise TypeError(f"fit_max_likelihood: data must be an (N, dim) tensor or a data set with __len__, "
                        f"__getitem__ and device, got {type(data).__name__}.")
    _check_schedule(schedule)
    opt = torch.optim.Adam(model.parameters(), lr=lr, foreach=True)
    gen = torch.Generator().manual_seed(seed)
    fit = DensityFit()
    _sync(data.device)
    start = time.perf_counter()
    for step in range(iters):
        _set_lr(opt, lr, schedule, step, iters)
        idx = torch.randint(0, len(data), (batch,), generator=gen).to(data.device)
        loss = -model.log_prob(data[idx]).mean()
        fit.nfe.append(int(getattr(model, "nfe", 0)))
        opt.zero_grad()
        loss.backward()
        opt.step()
        fit.losses.append(loss.item())
        if callback is not None:
            callback(step, fit.losses[-1])
    _sync(data.device)
    fit.seconds = time.perf_counter() - start
    return fit
