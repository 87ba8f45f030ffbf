"""Tests of neuralode.data: shapes, dtypes, devices, seeding, class balance, geometry."""

import math

import pytest
import torch

from neuralode.data import nested_rings, two_moons

GENERATORS = [nested_rings, two_moons]


@pytest.mark.parametrize("make", GENERATORS)
@pytest.mark.parametrize("n", [2, 7, 100])
def test_shapes_dtypes_and_labels(make, n):
    X, y = make(n)
    assert X.shape == (n, 2)
    assert y.shape == (n,)
    assert X.dtype == torch.float32
    assert y.dtype == torch.long
    assert set(y.tolist()) == {0, 1}
    assert torch.isfinite(X).all()


@pytest.mark.parametrize("make", GENERATORS)
@pytest.mark.parametrize("n", [10, 11, 501])
def test_classes_are_balanced(make, n):
    _, y = make(n)
    counts = torch.bincount(y, minlength=2)
    assert counts.tolist() == [n // 2, n - n // 2]


@pytest.mark.parametrize("make", GENERATORS)
def test_same_seed_same_data_other_seed_other_data(make):
    X1, y1 = make(200, seed=3)
    X2, y2 = make(200, seed=3)
    X3, _ = make(200, seed=4)
    assert torch.equal(X1, X2) and torch.equal(y1, y2)
    assert not torch.allclose(X1, X3)


@pytest.mark.parametrize("make", GENERATORS)
def test_private_generator_leaves_global_rng_alone(make):
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    make(50, seed=0)
    assert torch.equal(torch.rand(3), expected)


@pytest.mark.parametrize("make", GENERATORS)
def test_rows_are_shuffled(make):
    _, y = make(400)
    # Not all of one class first: the first half must contain both classes.
    assert set(y[:200].tolist()) == {0, 1}


@pytest.mark.parametrize("make", GENERATORS)
def test_dtype_is_a_cast_of_the_same_sample(make):
    X64, y64 = make(100, seed=5, dtype=torch.float64)
    X32, y32 = make(100, seed=5, dtype=torch.float32)
    assert X64.dtype == torch.float64
    assert torch.equal(X64.float(), X32)
    assert torch.equal(y64, y32)


@pytest.mark.parametrize("make", GENERATORS)
def test_device_argument(make):
    X, y = make(10, device="cpu")
    assert X.device.type == "cpu" and y.device.type == "cpu"
    if torch.cuda.is_available():
        Xc, yc = make(10, device="cuda")
        assert Xc.is_cuda and yc.is_cuda
        assert torch.equal(Xc.cpu(), X)


def test_nested_rings_geometry():
    X, y = nested_rings(4000, seed=1, dtype=torch.float64)
    r = X.norm(dim=1)
    assert r[y == 0].max() <= 0.5 + 1e-12
    assert r[y == 1].min() >= 1.0 - 1e-12
    assert r[y == 1].max() <= 1.5 + 1e-12
    # Uniform per unit area: half the disc's points lie within radius 0.5 / sqrt(2).
    inner = (r[y == 0] <= 0.5 / math.sqrt(2)).double().mean().item()
    assert abs(inner - 0.5) < 0.05
    # Angles cover the circle: the mean direction is close to zero.
    assert X[y == 1].mean(dim=0).norm() < 0.1


def test_nested_rings_custom_radii():
    X, y = nested_rings(1000, radii=(1.0, 2.0, 3.0))
    r = X.norm(dim=1)
    assert r[y == 0].max() <= 1.0 + 1e-6
    assert 2.0 - 1e-6 <= r[y == 1].min() and r[y == 1].max() <= 3.0 + 1e-6


def test_two_moons_geometry_without_noise():
    X, y = two_moons(2000, noise=0.0, seed=0, dtype=torch.float64)
    upper, lower = X[y == 0], X[y == 1]
    assert torch.allclose(upper.norm(dim=1), torch.ones(len(upper), dtype=torch.float64))
    assert (upper[:, 1] >= -1e-12).all()
    centre = torch.tensor([1.0, 0.5], dtype=torch.float64)
    assert torch.allclose((lower - centre).norm(dim=1), torch.ones(len(lower), dtype=torch.float64))
    assert (lower[:, 1] <= 0.5 + 1e-12).all()


def test_two_moons_noise_has_the_requested_scale():
    clean, _ = two_moons(5000, noise=0.0, seed=2, dtype=torch.float64)
    noisy, _ = two_moons(5000, noise=0.2, seed=2, dtype=torch.float64)
    spread = (noisy - clean).std().item()
    assert 0.18 < spread < 0.22


@pytest.mark.parametrize("make", GENERATORS)
@pytest.mark.parametrize(
    "kwargs, error",
    [
        (dict(n=1), ValueError),
        (dict(n=0), ValueError),
        (dict(n=2.5), TypeError),
        (dict(n=10, dtype=torch.int64), TypeError),
        (dict(n=10, seed="zero"), TypeError),
    ],
)
def test_bad_arguments_raise_clear_errors(make, kwargs, error):
    with pytest.raises(error):
        make(**kwargs)


def test_bad_radii_and_noise():
    with pytest.raises(ValueError, match="radii"):
        nested_rings(10, radii=(1.0, 0.5, 2.0))
    with pytest.raises(ValueError, match="noise"):
        two_moons(10, noise=-0.1)
    with pytest.raises(ValueError, match="noise"):
        two_moons(10, noise=float("nan"))
