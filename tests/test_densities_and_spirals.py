import math

import pytest
import torch

from neuralode import data


@pytest.mark.parametrize("name", data.TOY_DENSITIES)
def test_toy_densities_are_seeded_finite_and_shaped(name):
    a = data.toy_density(name, 500, seed=1)
    assert a.shape == (500, 2) and a.dtype == torch.float32 and torch.isfinite(a).all()
    assert torch.equal(a, data.toy_density(name, 500, seed=1))
    assert not torch.equal(a, data.toy_density(name, 500, seed=2))
    assert 0.2 < a.std().item() < 5 and a.abs().max().item() < 10


def test_toy_density_geometry():
    x = data.toy_density("8gaussians", 4000).double()
    assert (x.norm(dim=1) / (4 / 1.414)).mean().item() == pytest.approx(1.0, abs=0.05)
    r = data.toy_density("circles", 4000).norm(dim=1)
    assert ((r - 3).abs() < 0.6).float().mean() == pytest.approx(0.5, abs=0.05)
    c = data.toy_density("checkerboard", 4000)
    cell = (torch.floor(c[:, 0] / 2) + torch.floor(c[:, 1] / 2)) % 2
    assert cell.eq(cell[0]).all()  # every point on squares of one colour


def test_target_energies():
    z = torch.tensor([[2.0, 0.0], [0.0, 0.0], [1.0, 3.0]])
    u1 = data.target_energy("u1", z)
    assert u1[0] < u1[1] and u1[0] < u1[2]  # the mode sits on the ring at (+-2, 0)
    on_wave = torch.stack([torch.linspace(-3, 3, 7), torch.sin(2 * math.pi * torch.linspace(-3, 3, 7) / 4)], 1)
    assert torch.allclose(data.target_energy("u2", on_wave), torch.zeros(7), atol=1e-6)
    for name in ("u3", "u4"):
        assert torch.isfinite(data.target_energy(name, torch.randn(10, 2) * 3)).all()
    with pytest.raises(ValueError, match="unknown target 'u5'"):
        data.target_energy("u5", z)


def test_spirals_shapes_split_and_masks():
    s = data.spirals(100, n_observed=30, seed=0)
    assert s.t.shape == (200,) and s.t[0] == 0 and (s.t.diff() > 0).all()
    assert s.train_x.shape == (80, 200, 2) and s.test_x.shape == (20, 200, 2)
    assert (s.train_mask.sum(dim=1) == 30).all() and (s.test_mask.sum(dim=1) == 30).all()
    assert not s.train_mask[:, 100:].any()  # nothing observed in the extrapolation window
    noise = (s.train_x - s.train_clean).double()
    assert noise.std().item() == pytest.approx(0.3, rel=0.05)
    assert 0.3 < s.clockwise.float().mean().item() < 0.7


def test_spirals_follow_the_two_generating_curves():
    s = data.spirals(40, noise_std=0.0, seed=3)
    clean = torch.cat([s.train_clean, s.test_clean]).double()
    centre = torch.where(s.clockwise[:, None], torch.tensor([-5.0, 0.0]), torch.tensor([5.0, 0.0])).double()
    radius = (clean - centre[:, None]).norm(dim=-1)
    ccw = ~s.clockwise
    assert (radius[ccw].diff(dim=1) > 0).all()  # r = b s grows along a counter-clockwise series
    assert (radius[s.clockwise].diff(dim=1) > 0).all()  # r = 50 b / (stop + 1 - s) grows too


def test_spirals_are_seeded_and_validate():
    assert torch.equal(data.spirals(20, seed=5).train_x, data.spirals(20, seed=5).train_x)
    with pytest.raises(ValueError, match="n_observed"):
        data.spirals(10, n_observed=0)
    with pytest.raises(ValueError, match="no room"):
        data.spirals(10, n_total=250)
