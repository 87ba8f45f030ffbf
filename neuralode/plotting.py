"""Matplotlib helpers the chapters share: vector fields, trajectories, decision regions, animations.

Each drawing helper draws on an Axes it is given, sets a title and axis labels (which the caller
may override), and returns the Axes. None of them calls ``plt.show``: the notebook decides.
:func:`animation_html` turns an animation into a player that works in the offline book.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence

import matplotlib.pyplot as plt
import numpy as np
import torch
from matplotlib.axes import Axes

__all__ = ["vector_field", "trajectories", "decision_regions", "animation_html", "CLASS_COLORS"]

#: Colours of classes 0, 1, 2, ... (colour-blind friendly: blue, orange, green, ...).
CLASS_COLORS: tuple[str, ...] = ("#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd")


def _as_numpy(x: torch.Tensor | np.ndarray) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        return x.detach().cpu().numpy()
    return np.asarray(x)


def _dtype_device(module: object, dtype: torch.dtype | None, device: torch.device | str | None):
    """The dtype and device of a module's first parameter, unless given explicitly."""
    if isinstance(module, torch.nn.Module):
        p = next(module.parameters(), None)
        if p is not None:
            return dtype or p.dtype, device or p.device
    return dtype or torch.get_default_dtype(), device or "cpu"


def _grid(xlim: Sequence[float], ylim: Sequence[float], n: int, dtype, device):
    if n < 2:
        raise ValueError(f"n (points per axis) must be at least 2, got {n}")
    xs = torch.linspace(float(xlim[0]), float(xlim[1]), n, dtype=dtype, device=device)
    ys = torch.linspace(float(ylim[0]), float(ylim[1]), n, dtype=dtype, device=device)
    gx, gy = torch.meshgrid(xs, ys, indexing="xy")
    return gx, gy, torch.stack([gx.reshape(-1), gy.reshape(-1)], dim=1)


def _finish(ax: Axes, title: str, xlabel: str, ylabel: str, xlim=None, ylim=None) -> Axes:
    ax.set_title(title)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    if xlim is not None:
        ax.set_xlim(*xlim)
    if ylim is not None:
        ax.set_ylim(*ylim)
    return ax


def vector_field(
    ax: Axes,
    func: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    *,
    t: float = 0.0,
    xlim: Sequence[float] = (-2.0, 2.0),
    ylim: Sequence[float] = (-2.0, 2.0),
    n: int = 20,
    dtype: torch.dtype | None = None,
    device: torch.device | str | None = None,
    cmap: str = "viridis",
    colorbar: bool = True,
    title: str | None = None,
    xlabel: str = "$z_1$",
    ylabel: str = "$z_2$",
) -> Axes:
    """Draw the 2-D vector field ``func(t, z)`` at one time ``t`` on an ``n x n`` grid.

    Arrows show the direction of ``dz/dt`` (all drawn the same length so that slow regions
    stay readable); their colour shows its magnitude ``|dz/dt|``.

    Args:
        ax: the Axes to draw on.
        func: dynamics ``func(t, z) -> dz/dt`` with ``t`` a 0-d tensor and ``z`` of shape
            ``(B, 2)``, returning ``(B, 2)`` (an ``nn.Module`` such as ``MLPDynamics(2)`` works).
        t: the time at which to evaluate the field.
        xlim, ylim: the extent of the grid, ``(low, high)``.
        n: number of arrows along each axis.
        dtype, device: of the grid; by default those of ``func``'s parameters (CPU float32
            for a plain function).
        cmap: colour map of the magnitude.
        colorbar: whether to add a colour bar for the magnitude.
        title, xlabel, ylabel: labels (default title: ``"Vector field at t = ..."``).

    Returns:
        ``ax``.
    """
    dtype, device = _dtype_device(func, dtype, device)
    gx, gy, z = _grid(xlim, ylim, n, dtype, device)
    with torch.no_grad():
        dz = func(torch.tensor(float(t), dtype=dtype, device=device), z)
    if dz.shape != z.shape:
        raise ValueError(f"func must map a (B, 2) batch to (B, 2), got output of shape {tuple(dz.shape)}")
    u, v = _as_numpy(dz[:, 0]).reshape(n, n), _as_numpy(dz[:, 1]).reshape(n, n)
    speed = np.hypot(u, v)
    scale = np.where(speed > 0, speed, 1.0)
    q = ax.quiver(_as_numpy(gx), _as_numpy(gy), u / scale, v / scale, speed, cmap=cmap,
                  pivot="mid", angles="xy")
    if colorbar:
        ax.figure.colorbar(q, ax=ax, label=r"speed $\|dz/dt\|$")
    ax.set_aspect("equal")
    return _finish(ax, title if title is not None else f"Vector field at t = {float(t):g}",
                   xlabel, ylabel, xlim, ylim)


def trajectories(
    ax: Axes,
    traj: torch.Tensor | np.ndarray,
    labels: torch.Tensor | np.ndarray | None = None,
    *,
    max_points: int | None = 200,
    colors: Sequence[str] = CLASS_COLORS,
    alpha: float = 0.35,
    linewidth: float = 0.8,
    title: str = "Trajectories",
    xlabel: str = "$z_1$",
    ylabel: str = "$z_2$",
) -> Axes:
    """Draw the paths of points under a flow, coloured by class, with their start and end.

    Args:
        ax: the Axes to draw on.
        traj: states along the flow, shape ``(T, B, 2)`` (time first, as returned by
            ``odeint`` or ``ODEBlock.trajectory``); only the first two coordinates of a wider
            state are drawn.
        labels: class of each point, shape ``(B,)`` of integers; ``None`` draws all alike.
        max_points: draw at most this many paths (the first ones), to keep the figure legible.
        colors: colour of class 0, 1, ...
        alpha, linewidth: of the paths.
        title, xlabel, ylabel: labels.

    Returns:
        ``ax``. Start points are small dots, end points are larger circles with a dark edge.
    """
    z = _as_numpy(traj)
    if z.ndim != 3 or z.shape[2] < 2:
        raise ValueError(f"traj must have shape (T, B, 2), got {tuple(z.shape)}")
    lab = np.zeros(z.shape[1], dtype=int) if labels is None else _as_numpy(labels).astype(int)
    if lab.shape != (z.shape[1],):
        raise ValueError(f"labels must have shape (B,) = ({z.shape[1]},), got {tuple(lab.shape)}")
    if max_points is not None:
        z, lab = z[:, :max_points], lab[:max_points]
    for k in np.unique(lab):
        sel = lab == k
        color = colors[int(k) % len(colors)]
        ax.plot(z[:, sel, 0], z[:, sel, 1], color=color, alpha=alpha, linewidth=linewidth)
        ax.scatter(z[0, sel, 0], z[0, sel, 1], s=6, color=color, zorder=3)
        ax.scatter(z[-1, sel, 0], z[-1, sel, 1], s=22, color=color, edgecolors="black",
                   linewidths=0.5, zorder=4, label=f"class {int(k)}" if labels is not None else None)
    if labels is not None:
        ax.legend(loc="best", fontsize="small")
    ax.set_aspect("equal", adjustable="datalim")
    return _finish(ax, title, xlabel, ylabel)


def decision_regions(
    ax: Axes,
    predict_fn: Callable[[torch.Tensor], torch.Tensor],
    xlim: Sequence[float],
    ylim: Sequence[float],
    *,
    X: torch.Tensor | np.ndarray | None = None,
    y: torch.Tensor | np.ndarray | None = None,
    n: int = 150,
    dtype: torch.dtype | None = None,
    device: torch.device | str | None = None,
    colors: Sequence[str] = CLASS_COLORS,
    title: str = "Decision regions",
    xlabel: str = "$x_1$",
    ylabel: str = "$x_2$",
) -> Axes:
    """Shade the plane by the class a classifier predicts, optionally with the data on top.

    Args:
        ax: the Axes to draw on.
        predict_fn: maps a batch of points ``(M, 2)`` to logits ``(M, C)`` or to class labels
            ``(M,)``; called under ``torch.no_grad()``.
        xlim, ylim: the extent of the grid, ``(low, high)``.
        X, y: data points ``(N, 2)`` and their classes ``(N,)`` to scatter on top.
        n: grid points along each axis.
        dtype, device: of the grid; by default those of ``predict_fn``'s parameters.
        colors: colour of class 0, 1, ...
        title, xlabel, ylabel: labels.

    Returns:
        ``ax``.
    """
    dtype, device = _dtype_device(predict_fn, dtype, device)
    gx, gy, grid = _grid(xlim, ylim, n, dtype, device)
    with torch.no_grad():
        out = predict_fn(grid)
    pred = out.argmax(dim=1) if out.ndim == 2 else out
    pred = _as_numpy(pred).astype(int).reshape(n, n)
    n_classes = max(int(pred.max()) + 1, 2 if y is None else int(_as_numpy(y).max()) + 1)
    from matplotlib.colors import ListedColormap

    cmap = ListedColormap([colors[k % len(colors)] for k in range(n_classes)])
    ax.contourf(_as_numpy(gx), _as_numpy(gy), pred, levels=np.arange(n_classes + 1) - 0.5,
                cmap=cmap, alpha=0.25)
    if X is not None:
        Xn = _as_numpy(X)
        yn = np.zeros(len(Xn), dtype=int) if y is None else _as_numpy(y).astype(int)
        for k in np.unique(yn):
            sel = yn == k
            ax.scatter(Xn[sel, 0], Xn[sel, 1], s=8, color=colors[int(k) % len(colors)],
                       edgecolors="none", label=f"class {int(k)}")
        if y is not None:
            ax.legend(loc="upper right", fontsize="small")
    ax.set_aspect("equal")
    return _finish(ax, title, xlabel, ylabel, xlim, ylim)



# matplotlib's JavaScript player is self-contained except for its button icons, which it loads as a
# Font Awesome stylesheet from a CDN. The book loads nothing from other hosts: the buttons get text.
_PLAYER_ICONS = {
    "fa fa-minus": "&minus;", "fa fa-plus": "+", "fa fa-fast-backward": "|&#9664;&#9664;",
    "fa fa-step-backward": "|&#9664;", "fa fa-play fa-flip-horizontal": "&#9664;",
    "fa fa-pause": "&#10074;&#10074;", "fa fa-play": "&#9654;", "fa fa-step-forward": "&#9654;|",
    "fa fa-fast-forward": "&#9654;&#9654;|",
}
_EXTERNAL = re.compile(r"""(?:src|href)\s*=\s*["']?(?:https?:)?//[^"' >]+""")


def animation_html(anim, default_mode: str = "once") -> str:
    """HTML for a ``matplotlib.animation.Animation`` that plays offline: ``anim.to_jshtml()``
    without its external icon stylesheet, the icons replaced by text.

    Display it with ``IPython.display.HTML(animation_html(anim))``.

    Raises:
        RuntimeError: if the player still refers to another host (a matplotlib change the
            replacement does not know about), rather than let the book load it.
    """
    html = re.sub(r"<link[^>]*font-awesome[^>]*>", "", anim.to_jshtml(default_mode=default_mode))
    for icon, text in _PLAYER_ICONS.items():
        html = html.replace(f'<i class="{icon}"></i>', text)
    external = _EXTERNAL.findall(html)
    if external or "<i class=" in html:
        raise RuntimeError(f"animation_html: the player still loads {external or 'icon fonts'}; "
                           "update neuralode.plotting._PLAYER_ICONS for this matplotlib version.")
    return html
