"""Planar flows (neuralode.flows): the invertibility constraint, the initialisation, the inverse."""

import math

import pytest
import torch

from neuralode.cnf import standard_normal_log_prob
from neuralode.flows import PlanarFlow, PlanarLayer


def _base(n=4000, dtype=torch.float32):
    return torch.randn(n, 2, generator=torch.Generator().manual_seed(1), dtype=dtype)


def test_a_fresh_flow_is_close_to_the_identity_and_the_papers_m_is_not():
    # The shifted m has m(0) = 0: 32 fresh layers barely change volume. With the paper's
    # m(x) = softplus(x) - 1 the correction u_hat - u ~ -0.31 w / |w|^2 is large for small w and
    # every fresh layer contracts volume by about log 2 (the bug of issue 19).
    z0 = _base()
    change = {}
    for par in ("shifted", "paper"):
        torch.manual_seed(0)
        flow = PlanarFlow(2, 32, parametrization=par)
        with torch.no_grad():
            x, log_q = flow(z0)
        change[par] = (standard_normal_log_prob(z0) - log_q).mean().item()  # sum of log|det| over layers
        if par == "shifted":
            assert x.std(dim=0).min().item() > 0.8
    assert abs(change["shifted"]) < 0.5
    assert change["paper"] < -8
    assert PlanarLayer(2).parametrization == "shifted"


@pytest.mark.parametrize("par, m0", [("shifted", 0.0), ("paper", math.log(2) - 1)])
def test_the_constraint_holds_for_both_parametrizations(par, m0):
    layer = PlanarLayer(3, parametrization=par).double()
    assert layer.m(torch.zeros((), dtype=torch.float64)).item() == pytest.approx(m0, abs=1e-15)
    gen = torch.Generator().manual_seed(2)
    for _ in range(20):
        with torch.no_grad():
            layer.w.copy_(torch.randn(3, generator=gen, dtype=torch.float64))
            layer.u.copy_(-5 * layer.w + torch.randn(3, generator=gen, dtype=torch.float64))
        wu_hat = layer.w @ layer.u_hat()
        assert wu_hat.item() > -1
        assert wu_hat.item() == pytest.approx(layer.m(layer.w @ layer.u).item(), abs=1e-12)


@pytest.mark.parametrize("dtype, tol", [(torch.float64, 1e-12), (torch.float32, 1e-5)])
def test_inverse_round_trip_including_near_the_constraint(dtype, tol):
    torch.manual_seed(3)
    flow = PlanarFlow(2, 6, init_scale=1.5).to(dtype)
    layer = flow.layers[2]
    with torch.no_grad():  # w.u_hat = -0.999: g(a) = a + c tanh(a) - r is nearly flat near a = 0
        wu = math.log(math.expm1(1 - 0.999)) - math.log(math.e - 1)  # the shifted m's inverse at -0.999
        layer.u.copy_(wu / (layer.w @ layer.w) * layer.w)
    assert (layer.w @ layer.u_hat()).item() == pytest.approx(-0.999, abs=1e-4)
    z0 = 2 * _base(300, dtype)
    with torch.no_grad():
        x, log_q = flow(z0)
        assert (flow.inverse(x) - z0).abs().max().item() < tol * 100
        assert (flow.log_prob(x) - log_q).abs().max().item() < tol * 1000


def test_inverse_gradient_is_the_implicit_function_theorem_one():
    # gradcheck differentiates the whole inverse (root find included) by finite differences.
    torch.manual_seed(4)
    layer = PlanarLayer(2, init_scale=1.0).double()
    wrapper = _Inverse(layer)
    y = torch.randn(3, 2, dtype=torch.float64, requires_grad=True)

    def inverse(w, u, b, y):
        return torch.func.functional_call(wrapper, {"layer.w": w, "layer.u": u, "layer.b": b}, (y,))

    params = [getattr(layer, n).detach().clone().requires_grad_(True) for n in ("w", "u", "b")]
    assert torch.autograd.gradcheck(inverse, (*params, y), eps=1e-6, atol=1e-6, fast_mode=True)


class _Inverse(torch.nn.Module):
    def __init__(self, layer):
        super().__init__()
        self.layer = layer

    def forward(self, y):
        return self.layer.inverse(y)


def test_log_prob_trains_by_maximum_likelihood_and_integrates_to_one():
    torch.manual_seed(5)
    flow = PlanarFlow(2, 3, init_scale=1.0).double()
    axis = torch.linspace(-7, 7, 141, dtype=torch.float64)
    grid = torch.cartesian_prod(axis, axis)
    with torch.no_grad():
        mass = flow.log_prob(grid).exp().sum().item() * (axis[1] - axis[0]).item() ** 2
    assert mass == pytest.approx(1.0, abs=2e-3)
    # The gradient of log_prob is finite and nonzero for every parameter.
    flow.log_prob(grid[::97]).mean().backward()
    for p in flow.parameters():
        assert torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0


def test_bad_arguments():
    with pytest.raises(ValueError, match="unknown parametrization 'rezende'"):
        PlanarLayer(2, parametrization="rezende")
    with pytest.raises(ValueError, match="at least 1"):
        PlanarFlow(2, 0)
    with pytest.raises(ValueError, match=r"shape \(batch, dim\)"):
        PlanarFlow(2, 2).log_prob(torch.zeros(3))
