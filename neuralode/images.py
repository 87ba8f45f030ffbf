r"""Densities of images: dequantization, the logit transform, bits per dimension, convolutional CNF dynamics.

Pixels are integers :math:`n \in \{0, \dots, K-1\}^D`. A continuous density :math:`p_v` is fitted
to the *dequantized* images :math:`v = (n + u)/K \in [0, 1)^D`, :math:`u \sim U[0, 1)^D`, which
gives a discrete model whose log-probability it bounds from below (Theis et al. 2016; chapter 6,
equation ch6-dequant):

.. math::

    \log P(n) \ge \mathbb{E}_u\big[\log p_v\big((n + u)/K\big)\big] - D \log K .

Flows model :math:`y = \operatorname{logit}(s)`, :math:`s = \alpha + (1 - 2\alpha) v` (RealNVP's
and FFJORD's preprocessing, Dinh et al. 2017), an invertible map of each pixel with (ch6-logit)

.. math::

    \log p_v(v) = \log p_Y(y) + \sum_{i=1}^{D} \log \frac{1 - 2\alpha}{s_i (1 - s_i)} ,

and the result is reported in bits per dimension (ch6-bpd),

.. math::

    \text{bits/dim} = -\frac{\log p_Y(y) + \sum_i \log \frac{1 - 2\alpha}{s_i(1 - s_i)} - D \log K}{D \log 2} .

A density that is uniform on the unit cube scores exactly :math:`\log_2 K` bits/dim.
"""

from __future__ import annotations

import math
from typing import Callable, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ._random import randn
from .cnf import CNF
from .nets import ConcatConv2d

__all__ = ["dequantize_logit", "logit_inverse", "bits_per_dim", "Dequantized", "ConvCNFDynamics", "GaussianCNF",
           "pool_levels", "DEFAULT_ALPHA"]

#: The default margin :math:`\alpha` of the logit transform. Chapter 6 passes FFJORD's MNIST value,
#: 1e-6, explicitly; this larger default keeps the logit away from its infinite ends.
DEFAULT_ALPHA = 0.05


def _check_alpha(alpha: float) -> None:
    if not 0.0 <= alpha < 0.5:
        raise ValueError(f"alpha must be in [0, 0.5) (the logit's margin), got {alpha!r}.")


def _check_levels(levels: int) -> None:
    if isinstance(levels, bool) or not isinstance(levels, int) or levels < 2:
        raise ValueError(f"levels (K, the number of grey levels) must be an int >= 2, got {levels!r}.")


def dequantize_logit(n: Tensor, u: Tensor, levels: int, alpha: float = DEFAULT_ALPHA) -> tuple:
    r"""Integer pixels and uniform noise to logit space, with the log-determinant (ch6-dequant, ch6-logit).

    :math:`v = (n + u)/K`, :math:`s = \alpha + (1 - 2\alpha) v`, :math:`y = \log s - \log(1 - s)`, and
    :math:`\log|\det \partial y/\partial v| = \sum_i \log\frac{1 - 2\alpha}{s_i (1 - s_i)}`.

    Args:
        n: ``(B, D)`` grey levels in ``0..K-1`` (any floating dtype; integer tensors are converted
            to ``u``'s dtype).
        u: ``(B, D)`` dequantization noise in ``[0, 1)`` (``torch.rand_like``), same device as ``n``.
        levels: ``K``, the number of grey levels (256 for 8-bit images).
        alpha: the margin :math:`\alpha` in ``[0, 0.5)``.

    Returns:
        ``(y, log_det)``: ``y`` ``(B, D)`` and ``log_det`` ``(B,)``, :math:`\log|\det \partial y/\partial v|`,
        in ``u``'s dtype and on its device.
    """
    _check_levels(levels)
    _check_alpha(alpha)
    if n.shape != u.shape:
        raise ValueError(f"dequantize_logit: n and u must have the same shape, got {tuple(n.shape)} and "
                         f"{tuple(u.shape)}.")
    v = (n.to(u.dtype) + u) / levels
    s = alpha + (1 - 2 * alpha) * v
    log_s, log_1ms = torch.log(s), torch.log1p(-s)
    y = log_s - log_1ms
    log_det = (math.log(1 - 2 * alpha) - log_s - log_1ms).flatten(1).sum(dim=1)
    return y, log_det


def logit_inverse(y: Tensor, alpha: float = DEFAULT_ALPHA) -> Tensor:
    r"""The inverse of the logit transform: :math:`v = (\operatorname{sigmoid}(y) - \alpha)/(1 - 2\alpha)`.

    Args:
        y: ``(B, D)`` points in logit space (a model's samples, or :func:`dequantize_logit`'s ``y``).
        alpha: the margin used by :func:`dequantize_logit`.

    Returns:
        ``v`` ``(B, D)``, same dtype and device. Not clamped: all of :math:`\mathbb R` maps onto
        :math:`(-\alpha/(1-2\alpha), 1 + \alpha/(1-2\alpha))`, slightly wider than ``[0, 1)``;
        ``floor(K * v)`` (clamped to ``0..K-1``) gives grey levels.
    """
    _check_alpha(alpha)
    return (torch.sigmoid(y) - alpha) / (1 - 2 * alpha)


def bits_per_dim(log_p_y: Tensor, log_det: Tensor, dim: int, levels: int) -> Tensor:
    r"""Bits per dimension of dequantized images from their logit-space log-density (ch6-bpd).

    .. math::

        \text{bits/dim} = -\frac{\log p_Y(y) + \log|\det \partial y/\partial v| - D \log K}{D \log 2} .

    Args:
        log_p_y: ``(B,)`` log-density of the model at ``y`` (nats).
        log_det: ``(B,)`` the logit's log-determinant from :func:`dequantize_logit`.
        dim: ``D``, the number of pixels.
        levels: ``K``, the number of grey levels.

    Returns:
        ``(B,)`` bits per dimension of each image (an upper bound on the discrete model's
        :math:`-\log_2 P(n)/D`, in expectation over the noise), in ``log_p_y``'s dtype.
    """
    _check_levels(levels)
    if isinstance(dim, bool) or not isinstance(dim, int) or dim < 1:
        raise ValueError(f"dim (D, the number of pixels) must be a positive int, got {dim!r}.")
    return -(log_p_y + log_det - dim * math.log(levels)) / (dim * math.log(2))


def pool_levels(n: Tensor, factor: int = 2, levels: int = 256) -> Tensor:
    """Downsample grey-level images by averaging ``factor x factor`` blocks, rounded back to levels.

    Args:
        n: ``(B, H, W)`` or ``(B, C, H, W)`` grey levels in ``0..levels-1`` (any dtype; ``H`` and ``W``
            divisible by ``factor``).
        factor: the block size (2 turns 28x28 MNIST into 14x14).
        levels: ``K``; the result stays in ``0..K-1``.

    Returns:
        The same layout with ``H/factor x W/factor`` pixels: the rounded block means (halves round
        to even, as ``torch.round`` does), in ``n``'s dtype when it is floating, else ``torch.uint8``
        for ``levels <= 256`` and ``torch.long`` above.
    """
    _check_levels(levels)
    if n.dim() not in (3, 4) or n.shape[-1] % factor or n.shape[-2] % factor:
        raise ValueError(f"pool_levels: n must be (B, H, W) or (B, C, H, W) with H and W divisible by {factor}, "
                         f"got {tuple(n.shape)}.")
    x = n if n.is_floating_point() else n.to(torch.float64)
    pooled = F.avg_pool2d(x.unsqueeze(1) if x.dim() == 3 else x, factor)
    pooled = pooled.squeeze(1) if n.dim() == 3 else pooled
    pooled = pooled.round().clamp(0, levels - 1)
    if n.is_floating_point():
        return pooled
    return pooled.to(torch.uint8 if levels <= 256 else torch.long)


class Dequantized:
    """Images dequantized afresh on every access, in logit space: a data set for ``fit_max_likelihood``.

    ``data[idx]`` draws new noise ``u`` for the selected images and returns
    ``transform(y)`` with ``y`` from :func:`dequantize_logit`, so every minibatch sees new noise.

    Args:
        n: ``(N, D)`` grey levels (floating point; the result has its dtype and device).
        levels: ``K``.
        alpha: the logit's margin.
        transform: optional map applied to ``y`` ``(B, D) -> (B, D)`` (e.g. a fixed whitening).
        generator: optional generator for the noise (on ``n``'s device); else the global one.
    """

    def __init__(self, n: Tensor, levels: int, alpha: float = DEFAULT_ALPHA,
                 transform: Optional[Callable[[Tensor], Tensor]] = None,
                 generator: Optional[torch.Generator] = None):
        _check_levels(levels)
        _check_alpha(alpha)
        if not (torch.is_tensor(n) and n.is_floating_point() and n.dim() == 2):
            raise ValueError("Dequantized: n must be a floating (N, D) tensor of grey levels, got "
                             f"{type(n).__name__} {tuple(getattr(n, 'shape', ()))}.")
        self.n, self.levels, self.alpha, self.transform, self.generator = n, levels, alpha, transform, generator

    @property
    def device(self) -> torch.device:
        """The device of the images, where the noise is drawn."""
        return self.n.device

    def __len__(self) -> int:
        return len(self.n)

    def __getitem__(self, idx) -> Tensor:
        n = self.n[idx]
        u = torch.rand(n.shape, dtype=n.dtype, device=n.device, generator=self.generator)
        y = dequantize_logit(n, u, self.levels, self.alpha)[0]
        return y if self.transform is None else self.transform(y)


class ConvCNFDynamics(nn.Module):
    r"""Convolutional CNF dynamics :math:`f(t, z)` for flat images (FFJORD's image models, in small).

    ``(B, C*S*S) -> (B, C, S, S)`` -> ``ConcatConv2d`` layers (3x3, the time as an extra channel) with
    softplus between them (smooth, so the Jacobian's trace is too) -> ``(B, C*S*S)``. The last layer
    starts at zero, so an untrained flow is the identity and its log-density is the base density's.

    Args:
        image_size: ``S`` (square images).
        channels: hidden channels of every layer.
        layers: number of convolutions (at least 2).
        in_channels: ``C`` (1 for grey levels).

    Shapes: ``forward(t, z)``: ``t`` a scalar tensor, ``z`` ``(B, C*S*S)``, returns ``(B, C*S*S)``.
    """

    def __init__(self, image_size: int, channels: int, layers: int = 3, in_channels: int = 1):
        super().__init__()
        if layers < 2:
            raise ValueError(f"ConvCNFDynamics: layers must be at least 2, got {layers!r}.")
        self.image_size, self.in_channels = image_size, in_channels
        self.dim = in_channels * image_size**2
        widths = [in_channels] + [channels] * (layers - 1) + [in_channels]
        self.convs = nn.ModuleList([ConcatConv2d(a, b) for a, b in zip(widths[:-1], widths[1:])])
        nn.init.zeros_(self.convs[-1].conv.weight)
        nn.init.zeros_(self.convs[-1].conv.bias)

    def forward(self, t: Tensor, z: Tensor) -> Tensor:
        h = z.reshape(-1, self.in_channels, self.image_size, self.image_size)
        t = torch.as_tensor(t, dtype=z.dtype, device=z.device)
        for i, conv in enumerate(self.convs):
            h = conv(t, h)
            if i < len(self.convs) - 1:
                h = F.softplus(h)
        return h.flatten(1)


class GaussianCNF(nn.Module):
    r"""A CNF composed with a fitted full-covariance Gaussian: it starts at the Gaussian's score.

    With the Gaussian's mean :math:`\mu`, per-pixel scales :math:`\sigma_i = \sqrt{\Sigma_{ii}}` and
    correlation matrix :math:`R = \operatorname{diag}(\sigma)^{-1} \Sigma \operatorname{diag}(\sigma)^{-1}`,
    the flow standardises each pixel, :math:`x = (y - \mu)/\sigma` (a diagonal affine map), solves the
    CNF from :math:`x` at ``t1`` back to :math:`z_0` at ``t0``, and scores :math:`z_0` under
    :math:`\mathcal N(0, R)` (the Gaussian's decorrelation, a linear flow with an exact
    log-determinant):

    .. math::

        \log p_Y(y) = \log \mathcal N(z_0; 0, R) - \int_{t_0}^{t_1} \operatorname{tr}\frac{\partial f}{\partial z}\,dt
        - \sum_i \log \sigma_i .

    When the CNF is the identity (``f = 0``, e.g. an untrained :class:`ConvCNFDynamics`) this is
    exactly :math:`\log \mathcal N(y; \mu, \Sigma)`. The convolutions see standardised pixels at
    their places in the image, not whitened mixtures of them.

    Args:
        cnf: a :class:`neuralode.cnf.CNF` on ``D``-dimensional states (its own base normal is not used).
        mean: ``(D,)`` the Gaussian's mean.
        cov: ``(D, D)`` its covariance (symmetric positive definite).

    Shapes: :meth:`log_prob` ``(B, D) -> (B,)``; :meth:`sample` returns ``(n, D)``. Buffers follow
    ``.to()``; the CNF's settings (``trace``, ``rtol``...) are changed on ``self.cnf``.
    """

    def __init__(self, cnf: CNF, mean: Tensor, cov: Tensor):
        super().__init__()
        if mean.dim() != 1 or cov.shape != (mean.shape[0], mean.shape[0]):
            raise ValueError(f"GaussianCNF: mean must be (D,) and cov (D, D), got {tuple(mean.shape)} and "
                             f"{tuple(cov.shape)}.")
        self.cnf = cnf
        scale = cov.diagonal().sqrt()
        corr = cov / scale[:, None] / scale[None, :]
        self.register_buffer("mean", mean.clone())
        self.register_buffer("scale", scale)
        self.register_buffer("corr_cholesky", torch.linalg.cholesky(corr))

    @property
    def nfe(self) -> int:
        """Function evaluations of the CNF's last solve."""
        return self.cnf.nfe

    def _correlated_log_prob(self, z: Tensor) -> Tensor:
        L = self.corr_cholesky
        white = torch.linalg.solve_triangular(L, z.T, upper=False).T
        return -0.5 * (white**2).sum(1) - L.diagonal().log().sum() - 0.5 * z.shape[1] * math.log(2 * math.pi)

    def log_prob(self, y: Tensor) -> Tensor:
        r""":math:`\log p_Y(y)`: ``(B, D)`` to ``(B,)``."""
        x = (y - self.mean) / self.scale
        z0, s0 = self.cnf.inverse_transform(x)
        return self._correlated_log_prob(z0) + s0 - self.scale.log().sum()

    def sample(self, n: int, generator: Optional[torch.Generator] = None) -> Tensor:
        r"""``n`` samples ``(n, D)``: :math:`z_0 \sim \mathcal N(0, R)`, the CNF forward, standardisation undone."""
        z0 = randn((n, self.mean.shape[0]), self.mean, generator) @ self.corr_cholesky.T
        x, _ = self.cnf.transform(z0)
        return self.mean + self.scale * x
