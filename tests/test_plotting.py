import re
"""Tests of neuralode.plotting: each helper draws, labels its axes and returns them."""

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402
from torch import nn  # noqa: E402

from neuralode import plotting  # noqa: E402


@pytest.fixture
def ax():
    fig, ax = plt.subplots()
    yield ax
    plt.close(fig)


def _labelled(ax):
    return ax.get_title() != "" and ax.get_xlabel() != "" and ax.get_ylabel() != ""


def test_vector_field_plain_function(ax):
    seen = {}

    def rotation(t, z):
        seen["t"] = t
        return torch.stack([-z[:, 1], z[:, 0]], dim=1)

    out = plotting.vector_field(ax, rotation, t=0.5, xlim=(-1, 1), ylim=(-2, 2), n=7)
    assert out is ax and _labelled(ax)
    assert "0.5" in ax.get_title()
    assert isinstance(seen["t"], torch.Tensor) and seen["t"].dim() == 0
    quiver = ax.collections[0]
    assert quiver.N == 49
    # Arrows are normalized to unit length; colour carries the speed.
    uv = np.hypot(quiver.U, quiver.V)
    assert np.allclose(uv[uv > 0], 1.0)
    assert ax.get_xlim() == (-1.0, 1.0)


def test_vector_field_follows_module_dtype(ax):
    func = nn.Linear(2, 2).double()
    dtypes = []

    class Wrapped(nn.Module):
        def __init__(self):
            super().__init__()
            self.inner = func

        def forward(self, t, z):
            dtypes.append((t.dtype, z.dtype))
            return self.inner(z)

    plotting.vector_field(ax, Wrapped(), n=4, colorbar=False)
    assert dtypes == [(torch.float64, torch.float64)]


def test_vector_field_rejects_wrong_output(ax):
    with pytest.raises(ValueError, match=r"\(B, 2\)"):
        plotting.vector_field(ax, lambda t, z: z[:, :1], n=3)


def test_trajectories(ax):
    traj = torch.cumsum(torch.randn(10, 30, 2), dim=0)
    labels = torch.arange(30) % 2
    out = plotting.trajectories(ax, traj, labels, title="Flow")
    assert out is ax and ax.get_title() == "Flow" and _labelled(ax)
    assert len(ax.get_lines()) == 30
    assert ax.get_legend() is not None


def test_trajectories_max_points_and_no_labels(ax):
    traj = np.zeros((5, 40, 2))
    plotting.trajectories(ax, traj, max_points=10)
    assert len(ax.get_lines()) == 10


@pytest.mark.parametrize("shape", [(5, 2), (5, 3, 1)])
def test_trajectories_rejects_bad_shapes(ax, shape):
    with pytest.raises(ValueError, match=r"\(T, B, 2\)"):
        plotting.trajectories(ax, torch.zeros(shape))


def test_trajectories_rejects_mismatched_labels(ax):
    with pytest.raises(ValueError, match="labels"):
        plotting.trajectories(ax, torch.zeros(3, 4, 2), torch.zeros(5))


def test_decision_regions_from_logits_and_labels(ax):
    model = nn.Linear(2, 2)
    with torch.no_grad():
        model.weight.copy_(torch.tensor([[1.0, 0.0], [-1.0, 0.0]]))
        model.bias.zero_()
    X = torch.randn(20, 2)
    y = (X[:, 0] < 0).long()
    out = plotting.decision_regions(ax, model, (-1, 1), (-1, 1), X=X, y=y, n=20)
    assert out is ax and _labelled(ax)
    assert ax.get_xlim() == (-1.0, 1.0)
    fig, ax2 = plt.subplots()
    plotting.decision_regions(ax2, lambda x: (x[:, 0] > 0).long(), (-1, 1), (-1, 1), n=10)
    assert _labelled(ax2)
    plt.close(fig)


def test_animation_html_plays_offline():
    import matplotlib.pyplot as plt
    from matplotlib import animation

    import neuralode as node

    fig, ax = plt.subplots(figsize=(2, 2), dpi=40)
    (line,) = ax.plot([0, 1], [0, 1])
    anim = animation.FuncAnimation(fig, lambda k: line.set_ydata([0, k]), frames=3, interval=100)
    html = node.plotting.animation_html(anim)
    plt.close(fig)
    assert "anim-controls" in html and html.count("data:image/png;base64") == 3
    assert "//" not in "".join(re.findall(r"""(?:src|href)\s*=\s*["']?[^"' >]*""", html))
    assert "font-awesome" not in html and "<i class=" not in html
