r"""Latent ODEs for irregularly sampled time series (Chen et al. 2018, section 5) and an RNN baseline.

The generative model: :math:`z_0 \sim \mathcal N(0, I)`, :math:`z(t_i) = \mathrm{ODESolve}(z_0, f, t_0, t_i)`,
:math:`x_i \sim \mathcal N(\mathrm{dec}(z(t_i)), \sigma^2 I)`. An RNN reads the observations backwards
in time and gives :math:`q(z_0 \mid x) = \mathcal N(\mu, \operatorname{diag} e^{\log v})`; training
maximises the evidence lower bound

.. math::

    \mathrm{ELBO} = \mathbb E_{q(z_0|x)}\Big[\sum_i \log p(x_i \mid z(t_i))\Big] - \mathrm{KL}\big(q(z_0|x) \,\|\, p(z_0)\big).

Batches share one time grid ``t`` of shape ``(T,)``; each series says which grid points it
observed with a boolean ``mask`` of shape ``(B, T)``, so every series can have its own irregular
times.
"""

from __future__ import annotations

import math
from typing import Optional

import torch
from torch import Tensor, nn

from ._odeint import odeint
from ._random import randn
from .adjoint import odeint_adjoint
from .nets import MLPDynamics

__all__ = ["RecognitionRNN", "LatentODE", "PoissonLatentODE", "RNNBaseline", "gaussian_kl", "masked_gaussian_log_likelihood"]


def _check_series(x: Tensor, t: Tensor, mask: Optional[Tensor]) -> Tensor:
    if x.dim() != 3:
        raise ValueError(f"x must have shape (batch, time, features), got {tuple(x.shape)}.")
    if t.dim() != 1 or len(t) != x.shape[1]:
        raise ValueError(f"t must have shape ({x.shape[1]},) to match x, got {tuple(t.shape)}.")
    if mask is None:
        return torch.ones(x.shape[:2], dtype=torch.bool, device=x.device)
    if mask.shape != x.shape[:2]:
        raise ValueError(f"mask must have shape {tuple(x.shape[:2])}, got {tuple(mask.shape)}.")
    return mask.bool()


def gaussian_kl(mean: Tensor, logvar: Tensor) -> Tensor:
    """KL(N(mean, diag exp(logvar)) || N(0, I)), summed over the last dimension: ``(B, L)`` to ``(B,)``."""
    return 0.5 * (mean**2 + logvar.exp() - 1 - logvar).sum(dim=-1)


def masked_gaussian_log_likelihood(x: Tensor, mean: Tensor, std: float, mask: Tensor) -> Tensor:
    """Sum of ``log N(x; mean, std^2)`` over observed entries: ``x, mean: (B, T, D)``, ``mask: (B, T)`` to ``(B,)``."""
    per_point = -0.5 * (((x - mean) / std) ** 2 + math.log(2 * math.pi * std**2)).sum(dim=-1)
    return (per_point * mask).sum(dim=1)


class RecognitionRNN(nn.Module):
    """A GRU that reads a series backwards in time and returns ``q(z0 | x)``.

    At each observed point it receives the observation and the time gap to the observation it
    read before (the next one in time), so it knows how far apart irregular samples are.

    Shapes: ``forward(x, t, mask)`` maps ``x: (B, T, D)``, ``t: (T,)``, ``mask: (B, T)`` to
    ``(mean, logvar)``, each ``(B, latent_dim)``.
    """

    def __init__(self, obs_dim: int, latent_dim: int = 4, hidden: int = 25):
        super().__init__()
        self.hidden = hidden
        self.cell = nn.GRUCell(obs_dim + 1, hidden)
        self.out = nn.Linear(hidden, 2 * latent_dim)

    def forward(self, x: Tensor, t: Tensor, mask: Optional[Tensor] = None):
        mask = _check_series(x, t, mask)
        batch, steps, dim = x.shape
        # Gather each series' observed points, latest first: the GRU then takes as many steps as
        # the longest series has observations, not one per grid point (3x fewer at 30 of 100).
        counts = mask.sum(dim=1)
        longest = int(counts.max()) if batch else 0
        latest_first = (mask * torch.arange(1, steps + 1, device=x.device)).argsort(dim=1, descending=True)
        order = latest_first[:, :longest]  # (B, K): observed indices by decreasing time, then padding
        xs = x.gather(1, order.unsqueeze(-1).expand(-1, -1, dim))
        ts = t[order]
        h = x.new_zeros(batch, self.hidden)
        next_time = t[-1].expand(batch)
        for k in range(longest):
            gap = (next_time - ts[:, k]).unsqueeze(1)
            updated = self.cell(torch.cat([xs[:, k], gap], dim=1), h)
            seen = k < counts  # series with fewer observations are done: keep their state
            h = torch.where(seen.unsqueeze(1), updated, h)
            next_time = torch.where(seen, ts[:, k], next_time)
        mean, logvar = self.out(h).chunk(2, dim=-1)
        return mean, logvar


class LatentODE(nn.Module):
    """A variational autoencoder whose decoder is an ODE in a latent space.

    Args:
        obs_dim: observation size ``D`` (2 for the spirals).
        latent_dim: latent size ``L`` (4 in the paper's spiral experiment).
        rnn_hidden, dynamics_hidden, decoder_hidden: layer widths. ``decoder_hidden=0`` makes the
            decoder linear, ``x = W z + b``: it extrapolates, where a ReLU decoder maps latent states
            beyond those seen in training to whatever its last linear pieces give (chapter 7 measures
            the difference on the spirals).
        obs_std: the observation noise of the Gaussian likelihood.
        method, rtol, atol, options, adjoint: the latent solve (see :func:`neuralode.odeint`).
        dynamics_layers: hidden layers of the dynamics ``f`` (ELU, autonomous). The paper's spiral
            experiment uses one hidden layer of 20 units; the default 2 is torchdiffeq's example
            (``LatentODEfunc``).

    The latent state lives at ``t[0]`` of the series it encodes.
    """

    def __init__(self, obs_dim: int = 2, latent_dim: int = 4, rnn_hidden: int = 25, dynamics_hidden: int = 20,
                 decoder_hidden: int = 20, obs_std: float = 0.3, method: str = "dopri5", rtol: float = 1e-3,
                 atol: float = 1e-4, adjoint: bool = False, options: Optional[dict] = None,
                 dynamics_layers: int = 2):
        super().__init__()
        self.latent_dim, self.obs_std = latent_dim, obs_std
        self.encoder = RecognitionRNN(obs_dim, latent_dim, rnn_hidden)
        self.dynamics = MLPDynamics(latent_dim, hidden=dynamics_hidden, num_layers=dynamics_layers, activation="elu",
                                    time_dependent=False)
        if isinstance(decoder_hidden, bool) or not isinstance(decoder_hidden, int) or decoder_hidden < 0:
            raise ValueError(f"LatentODE: decoder_hidden must be an int >= 0 (0 for a linear decoder), got "
                             f"{decoder_hidden!r}.")
        self.decoder = (nn.Linear(latent_dim, obs_dim) if decoder_hidden == 0 else
                        nn.Sequential(nn.Linear(latent_dim, decoder_hidden), nn.ReLU(), nn.Linear(decoder_hidden, obs_dim)))
        self.method, self.rtol, self.atol, self.adjoint, self.options = method, rtol, atol, adjoint, options
        self.nfe = 0

    def latent_trajectory(self, z0: Tensor, t0: Tensor, times: Tensor) -> Tensor:
        """``z`` at ``times`` (any order relative to ``t0``, sorted ascending) from ``z0`` at ``t0``:
        ``(B, L)`` to ``(B, T, L)``. Times before ``t0`` are solved backwards from ``t0``."""
        solve = odeint_adjoint if self.adjoint else odeint
        kwargs = dict(method=self.method, rtol=self.rtol, atol=self.atol, options=self.options, return_stats=True)
        t0 = t0.reshape(())
        before, after = times[times < t0], times[times >= t0]
        parts, self.nfe = [], 0
        if len(before):
            zs, stats = solve(self.dynamics, z0, torch.cat([t0[None], before.flip(0)]), **kwargs)
            parts.append(zs[1:].flip(0))
            self.nfe += stats.nfe
        if len(after):
            include_start = bool(after[0] == t0)
            grid = after if include_start else torch.cat([t0[None], after])
            zs, stats = solve(self.dynamics, z0, grid, **kwargs)
            parts.append(zs if include_start else zs[1:])
            self.nfe += stats.nfe
        return torch.cat(parts).transpose(0, 1)

    def decode(self, z0: Tensor, t0: Tensor, times: Tensor) -> Tensor:
        """Mean observations at ``times``: ``(B, L)`` to ``(B, T, D)``."""
        return self.decoder(self.latent_trajectory(z0, t0, times))

    def elbo(self, x: Tensor, t: Tensor, mask: Optional[Tensor] = None,
             generator: Optional[torch.Generator] = None) -> tuple:
        """One-sample ELBO per series, averaged over the batch; also its two parts.

        Shapes: ``x: (B, T, D)``, ``t: (T,)``, ``mask: (B, T)``. Returns ``(elbo, log_likelihood,
        kl)``, each a 0-d tensor (batch means).
        """
        mask = _check_series(x, t, mask)
        mean, logvar = self.encoder(x, t, mask)
        eps = randn(mean.shape, mean, generator)
        z0 = mean + eps * (0.5 * logvar).exp()
        x_mean = self.decode(z0, t[0], t)
        log_likelihood = masked_gaussian_log_likelihood(x, x_mean, self.obs_std, mask)
        kl = gaussian_kl(mean, logvar)
        return (log_likelihood - kl).mean(), log_likelihood.mean(), kl.mean()

    @torch.no_grad()
    def predict(self, x: Tensor, t: Tensor, mask: Optional[Tensor], times: Tensor,
                generator: Optional[torch.Generator] = None) -> Tensor:
        r"""Encode the observed part and decode at ``times``: ``(B, len(times), D)``.

        Without ``generator`` it decodes the posterior mean :math:`\mu`; with one it decodes one
        posterior sample :math:`z_0 = \mu + \sigma_q \odot \varepsilon` per series (as the paper's
        Figure 8 does), with :math:`\varepsilon` drawn from ``generator``.
        """
        mask = _check_series(x, t, mask)
        mean, logvar = self.encoder(x, t, mask)
        if generator is not None:
            mean = mean + randn(mean.shape, mean, generator) * (0.5 * logvar).exp()
        return self.decode(mean, t[0], times)

    @torch.no_grad()
    def sample(self, n: int, t0: Tensor, times: Tensor, generator: Optional[torch.Generator] = None) -> Tensor:
        """Trajectories from the prior: ``(n, len(times), D)``."""
        z0 = randn((n, self.latent_dim), next(self.parameters()), generator)
        return self.decode(z0, t0, times)


class RNNBaseline(nn.Module):
    """An RNN baseline for irregular series: a GRU on the time grid that is told the time gaps.

    At grid point ``j`` it receives the previous point's observation (zeros where unobserved), a
    flag saying whether it was observed, and the gap ``t_j - t_{j-1}``, and predicts ``x_j``. Past
    the observations it runs on with no data, which is how it extrapolates.

    It is in the spirit of the paper's baseline, not the same model: the paper's RNN (25 hidden
    units, Gaussian negative log-likelihood) reads the observations only, in a second version with
    the time difference to the next observation appended; this one runs on every grid point with
    zero-imputed inputs and an observed flag, and is trained on squared error (``loss``).

    Shapes: ``forward(x, t, mask)`` maps ``x: (B, T, D)``, ``t: (T,)``, ``mask: (B, T)`` to
    predictions ``(B, T, D)``.
    """

    def __init__(self, obs_dim: int = 2, hidden: int = 25):
        super().__init__()
        self.hidden = hidden
        self.cell = nn.GRUCell(obs_dim + 2, hidden)
        self.out = nn.Linear(hidden, obs_dim)

    def forward(self, x: Tensor, t: Tensor, mask: Optional[Tensor] = None) -> Tensor:
        mask = _check_series(x, t, mask)
        batch, steps, dim = x.shape
        h = x.new_zeros(batch, self.hidden)
        previous = x.new_zeros(batch, dim + 1)
        predictions = []
        for j in range(steps):
            gap = (t[j] - t[j - 1] if j else torch.zeros((), dtype=x.dtype, device=x.device)).expand(batch, 1)
            h = self.cell(torch.cat([previous, gap], dim=1), h)
            predictions.append(self.out(h))
            seen = mask[:, j].unsqueeze(1).to(x.dtype)
            previous = torch.cat([x[:, j] * seen, seen], dim=1)
        return torch.stack(predictions, dim=1)

    def loss(self, x: Tensor, t: Tensor, mask: Optional[Tensor] = None) -> Tensor:
        """Mean squared error of the one-step-ahead predictions at observed points."""
        mask = _check_series(x, t, mask)
        errors = ((self(x, t, mask) - x) ** 2).sum(dim=-1)
        return (errors * mask).sum() / mask.sum().clamp_min(1) / x.shape[-1]


class _LatentWithCompensator(nn.Module):
    r"""The augmented dynamics :math:`\frac{d}{dt}(z, \Lambda) = (f(z), \lambda(z))` of one solve."""

    def __init__(self, model: "PoissonLatentODE"):
        super().__init__()
        self.dynamics, self.intensity_net = model.dynamics, model.intensity_net

    def forward(self, t: Tensor, state: tuple) -> tuple:
        z, _ = state
        return self.dynamics(t, z), nn.functional.softplus(self.intensity_net(z)).squeeze(-1)


class PoissonLatentODE(LatentODE):
    r"""A latent ODE whose latent state also drives a Poisson process of events (section 5.1).

    Besides (optional) observations ``x_i ~ N(dec(z(t_i)), sigma^2 I)``, events arrive with intensity
    :math:`\lambda(z(t)) = \mathrm{softplus}(g(z(t)))`. The compensator
    :math:`\Lambda(t) = \int_{t_0}^{t} \lambda(z(s))\,ds` is a fifth state component,
    :math:`\dot\Lambda = \lambda(z)`, so one solve gives the trajectory and the integral together,
    and the event term of the ELBO is

    .. math::

        \log p(\tau_1, \dots, \tau_N \mid z_0) = \sum_j \log \lambda(z(\tau_j)) - \Lambda(t_{T-1}).

    The encoder reads, at every grid point that holds an observation or an event, the observation
    (zeros where there is none), an "observed" flag and an "event" flag, backwards in time with the
    gaps.

    Events are grid points: ``events`` is a ``(B, T)`` tensor on the shared grid ``t`` holding the
    number of events at each grid point (a boolean mask when there is at most one), so the grid
    should contain every event time of the batch, or bin them finely: binned counts lose only the
    events' positions inside a cell, never an event. The observation window is
    ``[t[0], t[-1]]``. The arguments not listed below are those of :class:`LatentODE`.

    Args:
        obs_dim: observation size ``D``; 0 for a model of event times alone.
        intensity_hidden: width of the intensity network ``g``.
    """

    def __init__(self, obs_dim: int = 0, latent_dim: int = 4, rnn_hidden: int = 25, dynamics_hidden: int = 20,
                 decoder_hidden: int = 20, intensity_hidden: int = 20, obs_std: float = 0.3,
                 method: str = "dopri5", rtol: float = 1e-3, atol: float = 1e-4, adjoint: bool = False,
                 options: Optional[dict] = None):
        super().__init__(max(obs_dim, 1), latent_dim, rnn_hidden, dynamics_hidden, decoder_hidden, obs_std, method,
                         rtol, atol, adjoint, options)
        self.obs_dim = obs_dim
        if obs_dim == 0:
            self.decoder = None  # events only: nothing to decode
        self.encoder = RecognitionRNN(obs_dim + 2, latent_dim, rnn_hidden)
        self.intensity_net = nn.Sequential(nn.Linear(latent_dim, intensity_hidden), nn.ELU(),
                                           nn.Linear(intensity_hidden, 1))

    def intensity(self, z: Tensor) -> Tensor:
        r""":math:`\lambda(z) = \mathrm{softplus}(g(z)) > 0`: ``(..., L)`` to ``(...)``."""
        return nn.functional.softplus(self.intensity_net(z)).squeeze(-1)

    def _check(self, x: Optional[Tensor], t: Tensor, mask: Optional[Tensor], events: Tensor):
        expected = (x.shape[0] if x is not None else events.shape[0], len(t))
        if events.shape != expected:
            raise ValueError(f"events must be a (B, T) tensor of event counts (or a boolean mask) of shape "
                             f"{expected} on the grid t, got {tuple(events.shape)}.")
        if events.is_floating_point() or events.is_complex() or bool((events < 0).any()):
            raise ValueError("events must hold non-negative integer counts or booleans, "
                             f"got dtype {events.dtype}; convert with events.round().long().")
        if x is None:
            if self.obs_dim:
                raise ValueError(f"x is required: this model observes {self.obs_dim} features (obs_dim).")
            x = t.new_zeros(events.shape[0], len(t), 0)
            mask = torch.zeros(events.shape, dtype=torch.bool, device=t.device)
        if x.shape[-1] != self.obs_dim:
            raise ValueError(f"x must have {self.obs_dim} features (obs_dim), got shape {tuple(x.shape)}.")
        mask = _check_series(x, t, mask)
        if len(t) > 1 and not bool((t[1:] > t[:-1]).all()):
            raise ValueError("t must be strictly increasing: it is the grid of observation and event times.")
        return x, mask, events.to(x.dtype)

    def encode(self, x: Optional[Tensor], t: Tensor, mask: Optional[Tensor], events: Tensor):
        """``q(z0 | observations, events)``: ``(mean, logvar)``, each ``(B, L)``. The encoder reads the
        event count at each grid point that holds an observation or an event."""
        x, mask, counts = self._check(x, t, mask, events)
        features = torch.cat([x * mask.unsqueeze(-1), mask.unsqueeze(-1).to(x.dtype), counts.unsqueeze(-1)], dim=-1)
        return self.encoder(features, t, mask | (counts > 0))

    def trajectory_and_compensator(self, z0: Tensor, t: Tensor) -> tuple:
        r"""``z(t)`` of shape ``(B, T, L)`` and :math:`\Lambda(t)` of shape ``(B, T)`` (zero at ``t[0]``),
        from ``z0`` at ``t[0]``, in one solve of the augmented state."""
        solve = odeint_adjoint if self.adjoint else odeint
        start = (z0, z0.new_zeros(z0.shape[0]))
        augmented = _LatentWithCompensator(self)  # built per call: its parameters are the model's own
        (zs, big_lambda), stats = solve(augmented, start, t, method=self.method, rtol=self.rtol,
                                        atol=self.atol, options=self.options, return_stats=True)
        self.nfe = stats.nfe
        return zs.transpose(0, 1), big_lambda.transpose(0, 1)

    def elbo(self, x: Optional[Tensor], t: Tensor, mask: Optional[Tensor] = None, events: Optional[Tensor] = None,
             generator: Optional[torch.Generator] = None) -> tuple:
        r"""One-sample ELBO with the Poisson term, averaged over the batch, and its parts.

        Shapes: ``x: (B, T, D)`` or None when ``obs_dim = 0``, ``t: (T,)``, ``mask, events: (B, T)``.
        The event term is :math:`\sum_{j} n_j \log\lambda(z(t_j)) - \Lambda(t_{T-1})` for counts
        :math:`n_j`.
        Returns ``(elbo, observation_log_likelihood, event_log_likelihood, kl)``, each 0-d.
        """
        if events is None:
            raise ValueError("events is required: a (B, T) tensor of event counts on the grid t (or a boolean mask).")
        mean, logvar = self.encode(x, t, mask, events)
        x, mask, events = self._check(x, t, mask, events)
        eps = randn(mean.shape, mean, generator)
        z0 = mean + eps * (0.5 * logvar).exp()
        zs, big_lambda = self.trajectory_and_compensator(z0, t)
        observed = (masked_gaussian_log_likelihood(x, self.decoder(zs), self.obs_std, mask) if self.obs_dim
                    else zs.new_zeros(zs.shape[0]))
        event_ll = (self.intensity(zs).log() * events).sum(dim=1) - big_lambda[:, -1]
        kl = gaussian_kl(mean, logvar)
        return (observed + event_ll - kl).mean(), observed.mean(), event_ll.mean(), kl.mean()

    def decode(self, z0: Tensor, t0: Tensor, times: Tensor) -> Tensor:
        if self.decoder is None:
            raise ValueError("this PoissonLatentODE has obs_dim=0 and decodes no observations; "
                             "use predict_intensity or intensity(latent_trajectory(...)).")
        return super().decode(z0, t0, times)

    @torch.no_grad()
    def predict(self, x: Optional[Tensor], t: Tensor, mask: Optional[Tensor], events: Tensor,  # type: ignore[override]
                times: Tensor) -> Tensor:
        """Encode observations and events on ``t``, decode the posterior-mean observations at ``times``:
        ``(B, len(times), D)``."""
        mean, _ = self.encode(x, t, mask, events)
        return self.decode(mean, t[0], times)

    @torch.no_grad()
    def predict_intensity(self, x: Optional[Tensor], t: Tensor, mask: Optional[Tensor], events: Tensor,
                          times: Tensor) -> Tensor:
        """Encode the data on ``t``, decode the posterior-mean intensity at ``times`` (after ``t[0]``,
        increasing): ``(B, len(times))``."""
        mean, _ = self.encode(x, t, mask, events)
        return self.intensity(self.latent_trajectory(mean, t[0], times))
