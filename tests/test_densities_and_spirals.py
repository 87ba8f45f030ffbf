import math

import pytest
import torch

from neuralode import data, densities


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


def test_eight_gaussians_is_the_mixture_its_constants_describe():
    # Chapter 10's exact density of 8gaussians is built from these constants: the sampler must draw from them.
    x = data.toy_density("8gaussians", 40000, seed=3, dtype=torch.float64)
    means, std = data.EIGHT_GAUSSIANS_MEANS, data.EIGHT_GAUSSIANS_STD
    assert means.shape == (8, 2) and means.dtype == torch.float64
    nearest = torch.cdist(x, means).argmin(dim=1)
    offset = x - means[nearest]  # neighbouring means are 2.2 apart (6 std): the nearest is almost always its own
    assert offset.mean(dim=0).abs().max().item() < 0.01
    assert offset.std(dim=0).sub(std).abs().max().item() < 0.01 * std * 3
    assert torch.bincount(nearest, minlength=8).double().div(len(x)).sub(1 / 8).abs().max().item() < 0.01


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


def test_log_normalizer_of_a_gaussian_and_of_the_confined_targets():
    # U = x^T S^-1 x / 2 has Z = 2 pi sqrt(det S): the quadrature must get it to the grid's precision.
    S = torch.tensor([[1.5, 0.4], [0.4, 0.7]], dtype=torch.float64)
    P = torch.linalg.inv(S)
    exact = math.log(2 * math.pi) + 0.5 * math.log(torch.det(S).item())
    assert densities.log_normalizer(lambda x: 0.5 * ((x @ P) * x).sum(1), n=401) == pytest.approx(exact, abs=1e-9)
    # u2 is periodic in z1: its "log Z" grows like log(2 lim) with the window; confined it does not.
    def grows(energy):
        # Both grids have spacing 0.1 and the smaller is part of the larger: the difference is the outer mass.
        return densities.log_normalizer(energy, lim=20.0, n=401) - densities.log_normalizer(energy, lim=10.0, n=201)
    assert grows(lambda x: data.target_energy("u2", x)) == pytest.approx(math.log(2), abs=0.05)
    for name in ("u1", "u2", "u3", "u4"):
        assert abs(grows(lambda x: densities.confined_energy(name, x))) < 1e-6
    z = torch.randn(5, 2, dtype=torch.float64)
    assert torch.equal(densities.confined_energy("u1", z), data.target_energy("u1", z))
    assert torch.allclose(densities.confined_energy("u3", z), data.target_energy("u3", z) + z[:, 0] ** 2 / 8)


def _scaled_gaussian(scale):
    """x = scale * z0 has log q(x) = log N(z0) - D log scale: a flow with a known KL to N(0, I)."""
    def sample(z0):
        return scale * z0, -0.5 * (z0**2).sum(1) - z0.shape[1] * (0.5 * math.log(2 * math.pi) + torch.log(scale))
    return sample


def test_reverse_kl_closed_forms():
    normal = lambda x: 0.5 * (x**2).sum(1)  # U of N(0, I), log Z = log(2 pi) in 2-D
    log_z = math.log(2 * math.pi)
    kl, x, stderr = densities.reverse_kl(_scaled_gaussian(torch.tensor(1.0)), normal, dim=2, n=100, log_z=log_z)
    assert abs(kl) < 1e-6 and stderr < 1e-6 and x.shape == (100, 2)  # q = p: every term is the same
    s = torch.tensor(1.7, dtype=torch.float64)
    kl, _, stderr = densities.reverse_kl(_scaled_gaussian(s), normal, dim=2, n=20000, log_z=log_z, dtype=torch.float64)
    exact = (s**2 - 1 - 2 * torch.log(s)).item()  # KL(N(0, s^2 I) || N(0, I)) in 2-D
    assert abs(kl - exact) < 4 * stderr and stderr < 0.05


def test_fit_reverse_kl_finds_the_target_and_pairs_the_samples():
    # q = N(mu, s^2 I) fitted to p = N(m, I): reverse KL is minimized at mu = m, s = 1.
    target = torch.tensor([1.0, -2.0])
    energy = lambda x: 0.5 * ((x - target) ** 2).sum(1)
    runs = []
    for iters in (20, 20, 150):
        mu, log_s = torch.zeros(2, requires_grad=True), torch.zeros((), requires_grad=True)

        def sample(z0):
            return mu + log_s.exp() * z0, -0.5 * (z0**2).sum(1) - math.log(2 * math.pi) - 2 * log_s

        losses = densities.fit_reverse_kl(sample, [mu, log_s], energy, dim=2, iters=iters, batch=64, lr=0.1, seed=3)
        runs.append(losses)
    assert runs[0] == runs[1]  # the same seed, the same base samples: identical runs
    assert torch.allclose(mu.detach(), target, atol=0.05) and abs(log_s.item()) < 0.05
    assert np_mean(losses[-20:]) == pytest.approx(-math.log(2 * math.pi), abs=0.05)  # loss -> -log Z
    with pytest.raises(ValueError, match="unknown schedule"):
        densities.fit_reverse_kl(sample, [mu], energy, dim=2, iters=1, batch=2, schedule="step")
    with pytest.raises(ValueError, match="iters must be a positive int"):
        densities.fit_reverse_kl(sample, [mu], energy, dim=2, iters=0, batch=2)


def np_mean(values):
    return sum(values) / len(values)


class _Gaussian(torch.nn.Module):
    """A learnable N(mu, diag(s^2)) with log_prob: maximum likelihood has the sample moments as answer."""

    def __init__(self, dim):
        super().__init__()
        self.mu, self.log_s = torch.nn.Parameter(torch.zeros(dim)), torch.nn.Parameter(torch.zeros(dim))

    def log_prob(self, x):
        return torch.distributions.Normal(self.mu, self.log_s.exp()).log_prob(x).sum(1)


@pytest.mark.parametrize("schedule", ["cosine", "constant"])
def test_fit_max_likelihood_reaches_the_sample_moments(schedule):
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(4000, 2, generator=gen, dtype=torch.float64) * torch.tensor([0.5, 2.0], dtype=torch.float64) + 3
    model = _Gaussian(2).double()
    fit = densities.fit_max_likelihood(model, x, iters=400, batch=256, lr=5e-2, schedule=schedule, seed=1)
    assert len(fit.losses) == len(fit.nfe) == 400 and fit.nfe[0] == 0 and fit.seconds > 0
    assert torch.allclose(model.mu.detach(), x.mean(0), atol=0.1)
    assert torch.allclose(model.log_s.exp().detach(), x.std(0), rtol=0.1)
    with pytest.raises(ValueError, match=r"shape \(N, dim\)"):
        densities.fit_max_likelihood(model, x[:, 0], iters=1, batch=2)


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


class _Redrawn:
    """A data set drawn afresh on every access: x_i + noise, with the noise from its own generator."""

    def __init__(self, x):
        self.x, self.device, self.gen = x, x.device, torch.Generator().manual_seed(3)

    def __len__(self):
        return len(self.x)

    def __getitem__(self, idx):
        return self.x[idx] + 0.5 * torch.randn(len(idx), self.x.shape[1], generator=self.gen, dtype=self.x.dtype)


def test_fit_max_likelihood_on_a_data_set_drawn_afresh():
    # x plus fresh N(0, 0.5^2) noise at every access: the fitted std is sqrt(s^2 + 0.25), which a loop
    # that read the data set once (or saw the same noise every step) would not reach in general.
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(4000, 2, generator=gen, dtype=torch.float64) * torch.tensor([0.5, 2.0], dtype=torch.float64)
    model = _Gaussian(2).double()
    densities.fit_max_likelihood(model, _Redrawn(x), iters=400, batch=256, lr=5e-2, seed=1)
    assert torch.allclose(model.log_s.exp().detach(), (x.var(0) + 0.25).sqrt(), rtol=0.1)
    with pytest.raises(TypeError, match="__getitem__"):
        densities.fit_max_likelihood(model, [1.0, 2.0], iters=1, batch=2)
