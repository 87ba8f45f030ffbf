"""Building blocks for ODE-Nets: time-dependent layers, MLP dynamics, the ODE block.

An ODE-Net replaces a stack of residual blocks :math:`h_{k+1} = h_k + f(h_k, \\theta_k)` by the
solution of :math:`\\dot z = f(z, t, \\theta)` over :math:`[t_0, t_1]` (Chen et al. 2018, section 2).
"""

from __future__ import annotations

from typing import Optional, Sequence, Union


import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ._odeint import odeint
from .adjoint import odeint_adjoint

__all__ = ["ConcatLinear", "MLPDynamics", "ODEBlock", "Augment", "ConcatConv2d", "ConvODEFunc", "ResBlock",
           "TiedResNet", "downsampling_stem", "classifier_head", "make_classifier", "count_parameters", "CLASSIFIERS"]

_ACTIVATIONS = {"tanh": nn.Tanh, "relu": nn.ReLU, "softplus": nn.Softplus, "elu": nn.ELU}


class ConcatLinear(nn.Module):
    """A linear layer that also sees time: ``W [z, t] + b``.

    Args:
        in_features: size ``D_in`` of ``z``'s last dimension.
        out_features: size ``D_out`` of the output's last dimension.

    Shapes: ``forward(t, z)`` maps ``t: ()`` and ``z: (..., D_in)`` to ``(..., D_out)``.
    """

    def __init__(self, in_features: int, out_features: int):
        super().__init__()
        self.linear = nn.Linear(in_features + 1, out_features)

    def forward(self, t: Tensor, z: Tensor) -> Tensor:
        # W [z, t] + b = W_z z + (b + t W_t): same result as concatenating t, without the copy.
        weight = self.linear.weight
        return F.linear(z, weight[:, :-1], self.linear.bias + t * weight[:, -1])


class MLPDynamics(nn.Module):
    """Dynamics ``f(t, z)`` given by a small multilayer perceptron.

    Args:
        dim: state size ``D``.
        hidden: width of each hidden layer.
        num_layers: number of hidden layers (at least 1).
        activation: ``"tanh"``, ``"relu"``, ``"softplus"`` or ``"elu"``. A smooth activation
            (tanh, softplus) keeps ``f`` smooth, which high-order solvers reward.
        time_dependent: when true every layer sees ``t`` (:class:`ConcatLinear`); otherwise the
            dynamics are autonomous, ``f(z)``.

    Shapes: ``forward(t, z)`` maps ``t: ()`` and ``z: (B, D)`` to ``(B, D)``.
    """

    def __init__(self, dim: int, hidden: int = 64, num_layers: int = 2, activation: str = "tanh",
                 time_dependent: bool = True):
        super().__init__()
        if num_layers < 1:
            raise ValueError(f"MLPDynamics: num_layers must be at least 1, got {num_layers}.")
        if activation not in _ACTIVATIONS:
            raise ValueError(f"MLPDynamics: unknown activation {activation!r}; choose one of "
                             f"{', '.join(_ACTIVATIONS)}.")
        self.time_dependent = time_dependent
        sizes = [dim] + [hidden] * num_layers + [dim]
        layer = ConcatLinear if time_dependent else nn.Linear
        self.layers = nn.ModuleList(layer(a, b) for a, b in zip(sizes[:-1], sizes[1:]))
        self.activation = _ACTIVATIONS[activation]()

    def forward(self, t: Tensor, z: Tensor) -> Tensor:
        for i, layer in enumerate(self.layers):
            z = layer(t, z) if self.time_dependent else layer(z)
            if i < len(self.layers) - 1:
                z = self.activation(z)
        return z


class ODEBlock(nn.Module):
    """The ODE-Net layer: ``z(t1)`` from ``z(t0) = z0`` under ``dz/dt = func(t, z)``.

    Args:
        func: the dynamics, an ``nn.Module`` called as ``func(t, z)``.
        t0, t1: integration interval (the block's "depth").
        method, rtol, atol, options: passed to :func:`neuralode.odeint`.
        adjoint: compute gradients with :func:`neuralode.odeint_adjoint` (memory independent of
            the number of steps) instead of backpropagating through the solver.
        adjoint_kwargs: further keyword arguments for :func:`neuralode.odeint_adjoint`, e.g.
            ``{"seminorm": True}`` or ``{"checkpoints": 4}``.

    Attributes:
        nfe: function evaluations of the last forward solve (its "depth" in layers of ``func``).
        backward_nfe: evaluations of the last backward adjoint solve (0 without the adjoint).
        stats: the :class:`~neuralode.SolverStats` of the last forward solve.

    Shapes: ``forward(z0)`` maps ``(B, *S)`` to ``(B, *S)``.
    """

    def __init__(self, func: nn.Module, t0: float = 0.0, t1: float = 1.0, method: str = "dopri5",
                 rtol: float = 1e-3, atol: float = 1e-3, options: Optional[dict] = None,
                 adjoint: bool = False, adjoint_kwargs: Optional[dict] = None):
        super().__init__()
        self.func = func
        self.t0, self.t1 = float(t0), float(t1)
        self.method, self.rtol, self.atol, self.options = method, rtol, atol, options
        self.adjoint, self.adjoint_kwargs = adjoint, dict(adjoint_kwargs or {})
        self.stats = None

    @property
    def nfe(self) -> int:
        return 0 if self.stats is None else self.stats.nfe

    @property
    def backward_nfe(self) -> int:
        return getattr(self.stats, "backward_nfe", 0)

    def trajectory(self, z0: Tensor, t: Union[Tensor, Sequence[float]]) -> Tensor:
        """The states at times ``t`` (shape ``(T,)``): returns ``(T, B, *S)``."""
        kwargs = dict(method=self.method, rtol=self.rtol, atol=self.atol, options=self.options,
                      return_stats=True)
        if self.adjoint:
            zs, self.stats = odeint_adjoint(self.func, z0, t, **kwargs, **self.adjoint_kwargs)
        else:
            zs, self.stats = odeint(self.func, z0, t, **kwargs)
        return zs

    def forward(self, z0: Tensor) -> Tensor:
        return self.trajectory(z0, [self.t0, self.t1])[-1]


class Augment(nn.Module):
    """Append ``extra_dims`` zero coordinates to the state (Dupont et al. 2019).

    A flow in :math:`\\mathbb{R}^d` is a homeomorphism and cannot untangle some data sets;
    in :math:`\\mathbb{R}^{d+p}` it has room to.

    Shapes: ``(B, d)`` to ``(B, d + extra_dims)``.
    """

    def __init__(self, extra_dims: int):
        super().__init__()
        if extra_dims < 0:
            raise ValueError(f"Augment: extra_dims must be >= 0, got {extra_dims}.")
        self.extra_dims = extra_dims

    def forward(self, x: Tensor) -> Tensor:
        return F.pad(x, (0, self.extra_dims))


# --- The paper's MNIST models (Chen et al. 2018, section 3; the reference implementation's sizes) ---


def _norm(channels: int) -> nn.GroupNorm:
    return nn.GroupNorm(min(32, channels), channels)


class ConcatConv2d(nn.Module):
    """A convolution that also sees time: ``conv([z, t])`` with ``t`` as one extra constant channel.

    Shapes: ``forward(t, z)`` maps ``t: ()`` and ``z: (B, C_in, H, W)`` to ``(B, C_out, H', W')``.
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int = 3, stride: int = 1,
                 padding: int = 1, bias: bool = True):
        super().__init__()
        self.conv = nn.Conv2d(in_channels + 1, out_channels, kernel_size, stride, padding, bias=bias)

    def forward(self, t: Tensor, z: Tensor) -> Tensor:
        tt = t.expand(z.shape[0], 1, *z.shape[2:])
        return self.conv(torch.cat([tt, z], dim=1))


class ConvODEFunc(nn.Module):
    """The reference MNIST ODE-Net dynamics: norm, ReLU, time-conv, norm, ReLU, time-conv, norm.

    Shapes: ``forward(t, z)`` maps ``z: (B, C, H, W)`` to ``(B, C, H, W)``.
    """

    def __init__(self, channels: int = 64):
        super().__init__()
        self.norm1, self.norm2, self.norm3 = _norm(channels), _norm(channels), _norm(channels)
        self.conv1 = ConcatConv2d(channels, channels)
        self.conv2 = ConcatConv2d(channels, channels)

    def forward(self, t: Tensor, z: Tensor) -> Tensor:
        out = self.conv1(t, torch.relu(self.norm1(z)))
        out = self.conv2(t, torch.relu(self.norm2(out)))
        return self.norm3(out)


class ResBlock(nn.Module):
    """A pre-activation residual block, ``h + f(h)`` (He et al. 2016), as in the paper's ResNet.

    Shapes: ``(B, C, H, W)`` to ``(B, C, H, W)``.
    """

    def __init__(self, channels: int = 64):
        super().__init__()
        self.norm1, self.norm2 = _norm(channels), _norm(channels)
        self.conv1 = nn.Conv2d(channels, channels, 3, 1, 1, bias=False)
        self.conv2 = nn.Conv2d(channels, channels, 3, 1, 1, bias=False)

    def forward(self, h: Tensor) -> Tensor:
        out = self.conv1(torch.relu(self.norm1(h)))
        return h + self.conv2(torch.relu(self.norm2(out)))


class TiedResNet(nn.Module):
    """A weight-tied ResNet: one :class:`ResBlock` applied ``depth`` times,
    :math:`h_{k+1} = h_k + f(h_k, \\theta)` for :math:`k = 0, \\dots, \\text{depth} - 1`.

    The control between a ResNet (a new :math:`\\theta_k` at every depth) and an ODE-Net (one
    :math:`\\theta`, continuous depth): it has the parameters of one block, like the ODE-Net, and
    the discrete, fixed depth of the ResNet. It is forward Euler with step 1 on
    :math:`\\dot h = f(h, \\theta)`, a dynamics that does not see the time.

    Args:
        channels: feature channels ``C``.
        depth: how many times the block is applied (6, like the paper's ResNet).

    Shapes: ``(B, C, H, W)`` to ``(B, C, H, W)``.
    """

    def __init__(self, channels: int = 64, depth: int = 6):
        super().__init__()
        if depth < 1:
            raise ValueError(f"TiedResNet: depth must be at least 1, got {depth}.")
        self.block = ResBlock(channels)
        self.depth = depth

    def forward(self, h: Tensor) -> Tensor:
        for _ in range(self.depth):
            h = self.block(h)
        return h


def downsampling_stem(in_channels: int = 1, channels: int = 64, image_size: int = 28) -> nn.Sequential:
    """Conv 3x3, then stride-2 convs: 28x28 MNIST becomes 6x6 feature maps (two halvings); images
    smaller than 16 pixels (the 8x8 digits) are halved once, to 3x3.

    Shapes: ``(B, in_channels, H, W)`` to ``(B, channels, H', W')``.
    """
    layers = [nn.Conv2d(in_channels, channels, 3, 1)]
    for _ in range(2 if image_size >= 16 else 1):
        layers += [_norm(channels), nn.ReLU(inplace=True), nn.Conv2d(channels, channels, 4, 2, 1)]
    return nn.Sequential(*layers)


def classifier_head(channels: int = 64, num_classes: int = 10) -> nn.Sequential:
    """Norm, ReLU, global average pooling, linear: ``(B, C, H, W)`` to logits ``(B, num_classes)``."""
    return nn.Sequential(_norm(channels), nn.ReLU(inplace=True), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                         nn.Linear(channels, num_classes))


#: The models of the paper's Table 1, by name (``make_classifier`` also builds the control
#: ``"tied-resnet"``, which is not in the paper).
CLASSIFIERS = ("mlp", "resnet", "rknet", "odenet")


def make_classifier(kind: str, *, in_channels: int = 1, image_size: int = 28, channels: int = 64,
                    num_classes: int = 10, rtol: float = 1e-3, atol: float = 1e-3, adjoint: bool = False,
                    rk_step: float = 0.25, resnet_blocks: int = 6, mlp_hidden: int = 300) -> nn.Module:
    """One of the paper's Table 1 models; all but the MLP share the same stem and head.

    Args:
        kind: ``"mlp"`` (one hidden layer), ``"resnet"`` (``resnet_blocks`` residual blocks),
            ``"tied-resnet"`` (one residual block applied ``resnet_blocks`` times,
            :class:`TiedResNet`: the parameters of the ODE-Net's order, the ResNet's depth),
            ``"rknet"`` (the ODE function backpropagated through fixed-step RK4 with step
            ``rk_step``) or ``"odenet"`` (dopri5 at ``rtol``/``atol``, adjoint if asked).
        in_channels, image_size, num_classes: the data's shape.
        channels: feature channels (64 in the paper).

    Returns:
        An ``nn.Module`` mapping images ``(B, in_channels, image_size, image_size)`` to logits.
    """
    if kind == "mlp":
        pixels = in_channels * image_size * image_size
        return nn.Sequential(nn.Flatten(), nn.Linear(pixels, mlp_hidden), nn.ReLU(inplace=True),
                             nn.Linear(mlp_hidden, num_classes))
    if kind == "resnet":
        feature = nn.Sequential(*[ResBlock(channels) for _ in range(resnet_blocks)])
    elif kind == "tied-resnet":
        feature = TiedResNet(channels, resnet_blocks)
    elif kind == "rknet":
        feature = ODEBlock(ConvODEFunc(channels), method="rk4", options={"step_size": rk_step})
    elif kind == "odenet":
        feature = ODEBlock(ConvODEFunc(channels), rtol=rtol, atol=atol, adjoint=adjoint)
    else:
        raise ValueError(f"make_classifier: unknown kind {kind!r}; choose one of "
                         f"{', '.join(CLASSIFIERS + ('tied-resnet',))}.")
    return nn.Sequential(downsampling_stem(in_channels, channels, image_size), feature,
                         classifier_head(channels, num_classes))


def count_parameters(model: nn.Module) -> int:
    """Number of trainable parameters."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)
