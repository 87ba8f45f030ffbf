import math

import pytest
import torch

import neuralode as node
from neuralode.cnf import (CNF, CNFDynamics, GatedPlanarDynamics, divergence_exact, divergence_hutchinson,
                           sample_noise, standard_normal_log_prob)
from neuralode.flows import PlanarFlow, PlanarLayer

from problems import LinearDynamics


@pytest.mark.parametrize("trace", ["exact", "hutchinson"])
def test_linear_flow_matches_the_closed_form(trace):
    # z(t1) = e^{A t1} z0, so log p(x) = log N(e^{-A t1} x) - t1 tr(A); Hutchinson is exact in
    # expectation and, for a linear f with Rademacher noise, exact whenever A is diagonal.
    torch.manual_seed(0)
    A = torch.randn(3, 3, dtype=torch.float64) * 0.5
    if trace == "hutchinson":
        A = torch.diag(torch.diag(A))
    cnf = CNF(LinearDynamics(A), t1=1.5, trace=trace, rtol=1e-10, atol=1e-10, adjoint=False)
    x = torch.randn(5, 3, dtype=torch.float64)
    expected = standard_normal_log_prob(x @ torch.linalg.matrix_exp(-1.5 * A).T) - 1.5 * torch.trace(A)
    assert torch.allclose(cnf.log_prob(x), expected, atol=1e-8)


def test_a_random_cnf_density_integrates_to_one():
    torch.manual_seed(0)
    cnf = CNF(CNFDynamics(2, hidden=(16, 16)).double(), rtol=1e-6, atol=1e-6, adjoint=False)
    n, lim = 120, 7.0
    axis = torch.linspace(-lim, lim, n, dtype=torch.float64)
    grid = torch.cartesian_prod(axis, axis)
    with torch.no_grad():
        density = cnf.log_prob(grid).exp()
    mass = density.sum().item() * (2 * lim / (n - 1)) ** 2
    assert mass == pytest.approx(1.0, abs=2e-3)


def test_sample_then_log_prob_round_trip():
    torch.manual_seed(0)
    cnf = CNF(CNFDynamics(2, hidden=(16, 16)).double(), rtol=1e-9, atol=1e-9, adjoint=False)
    z0 = torch.randn(6, 2, dtype=torch.float64)
    x, log_px = cnf.transform(z0)
    assert x.shape == (6, 2) and torch.isfinite(x).all()
    assert torch.allclose(cnf.log_prob(x), log_px, atol=1e-6)
    assert cnf.sample(4).shape == (4, 2)
    # inverse_transform undoes transform, and its s0 is minus the forward one's integral of the trace.
    z_back, s0 = cnf.inverse_transform(x)
    assert torch.allclose(z_back, z0, atol=1e-6)
    assert torch.allclose(s0, log_px - standard_normal_log_prob(z0), atol=1e-6)
    with pytest.raises(ValueError, match=r"shape \(batch, dim\)"):
        cnf.inverse_transform(x[0])


@pytest.mark.parametrize("noise", ["rademacher", "gaussian"])
def test_hutchinson_is_unbiased(noise):
    torch.manual_seed(0)
    f = CNFDynamics(5, hidden=(32,)).double()
    z = torch.randn(3, 5, dtype=torch.float64, requires_grad=True)
    exact = divergence_exact(f(torch.tensor(0.3), z), z)
    # 4000 independent draws at once: the same 3 points repeated, each row with its own noise.
    zs = z.detach().repeat(4000, 1).requires_grad_(True)
    draws = divergence_hutchinson(f(torch.tensor(0.3), zs), zs, sample_noise(zs, noise)).view(4000, 3)
    stderr = draws.std(dim=0) / math.sqrt(len(draws))
    assert ((draws.mean(dim=0) - exact).abs() < 4 * stderr).all()


def test_exact_divergence_is_the_jacobian_trace_and_the_gated_planar_closed_form():
    torch.manual_seed(0)
    f = GatedPlanarDynamics(3, width=4).double()
    z = torch.randn(5, 3, dtype=torch.float64, requires_grad=True)
    t = torch.tensor(0.7, dtype=torch.float64)
    div = divergence_exact(f(t, z), z)
    brute = torch.stack([torch.trace(torch.autograd.functional.jacobian(lambda v: f(t, v[None])[0], zi))
                         for zi in z.detach()])
    assert torch.allclose(div, brute, atol=1e-10)
    assert torch.allclose(f.divergence(t, z), brute, atol=1e-10)


def test_planar_layer_logdet_equals_the_brute_force_determinant():
    torch.manual_seed(0)
    layer = PlanarLayer(3, init_scale=1.0).double()
    z = torch.randn(4, 3, dtype=torch.float64)
    _, logdet = layer(z)
    for zi, ld in zip(z, logdet):
        jac = torch.autograd.functional.jacobian(lambda v: layer(v[None])[0][0], zi)
        assert ld.item() == pytest.approx(torch.linalg.slogdet(jac)[1].item(), abs=1e-10)


def test_planar_flow_is_invertible_and_its_log_density_is_normalised():
    torch.manual_seed(0)
    flow = PlanarFlow(2, layers=4).double()
    for layer in flow.layers:  # push u against the invertibility constraint w.u_hat >= -1
        layer.u.data = -3 * layer.w.data
        assert (layer.w @ layer.u_hat()).item() >= -1 - 1e-9
    # For any normalised p, E_{x~q}[p(x) / q(x)] = 1: a Monte Carlo check of log q itself. p is
    # narrower than q, so that the ratio stays bounded and the estimate has finite variance.
    x, log_q = flow.sample(200_000, generator=torch.Generator().manual_seed(1))
    narrow = torch.distributions.MultivariateNormal(torch.zeros(2, dtype=torch.float64),
                                                    0.5 * torch.eye(2, dtype=torch.float64))
    ratio = (narrow.log_prob(x) - log_q).exp()
    assert ratio.mean().item() == pytest.approx(1.0, abs=4 * ratio.std().item() / math.sqrt(len(ratio)))


def test_cnf_gradients_via_adjoint_equal_backprop():
    torch.manual_seed(0)
    dyn = CNFDynamics(2, hidden=(8, 8)).double()
    x = torch.randn(6, 2, dtype=torch.float64)
    grads = {}
    for adjoint in (False, True):
        cnf = CNF(dyn, rtol=1e-10, atol=1e-10, adjoint=adjoint)
        dyn.zero_grad()
        cnf.log_prob(x).mean().backward()
        grads[adjoint] = torch.cat([p.grad.reshape(-1) for p in dyn.parameters()])
    assert torch.allclose(grads[True], grads[False], rtol=1e-5, atol=1e-9)


def test_bad_arguments():
    with pytest.raises(ValueError, match="unknown trace 'approx'"):
        CNF(CNFDynamics(2), trace="approx")
    with pytest.raises(ValueError, match="unknown noise 'uniform'"):
        CNF(CNFDynamics(2), noise="uniform")
    with pytest.raises(ValueError, match="shape \\(batch, dim\\)"):
        CNF(CNFDynamics(2)).log_prob(torch.zeros(3))


@pytest.mark.parametrize("adjoint", [False, True])
def test_analytic_trace_equals_the_exact_one_with_its_gradients(adjoint):
    # trace="analytic" uses GatedPlanarDynamics' closed form instead of D autograd VJPs: the same
    # log-density and the same parameter gradients, in float64 to solver precision.
    torch.manual_seed(0)
    dyn = GatedPlanarDynamics(2, width=5).double()
    x = torch.randn(7, 2, dtype=torch.float64)
    out = {}
    for trace in ("exact", "analytic"):
        cnf = CNF(dyn, trace=trace, rtol=1e-10, atol=1e-10, adjoint=adjoint)
        dyn.zero_grad()
        logp = cnf.log_prob(x)
        logp.mean().backward()
        out[trace] = (logp.detach(), torch.cat([p.grad.reshape(-1) for p in dyn.parameters()]))
    assert torch.allclose(out["analytic"][0], out["exact"][0], atol=1e-9)
    assert torch.allclose(out["analytic"][1], out["exact"][1], rtol=1e-6, atol=1e-9)


def test_analytic_trace_in_float32_and_forward_with_divergence():
    torch.manual_seed(1)
    dyn = GatedPlanarDynamics(3, width=4)
    z = torch.randn(6, 3)
    t = torch.tensor(0.4)
    dz, div = dyn.forward_with_divergence(t, z)
    assert dz.dtype == div.dtype == torch.float32 and div.shape == (6,)
    assert torch.equal(dz, dyn(t, z)) and torch.equal(div, dyn.divergence(t, z))
    with torch.no_grad():
        a = CNF(dyn, trace="analytic", adjoint=False).log_prob(z)
        e = CNF(dyn, trace="exact", adjoint=False).log_prob(z)
    assert a.dtype == torch.float32 and torch.allclose(a, e, atol=1e-4)


def test_analytic_trace_needs_a_divergence_method():
    with pytest.raises(ValueError, match="trace='analytic' needs dynamics with a divergence"):
        CNF(CNFDynamics(2), trace="analytic")


def test_with_shares_the_dynamics_and_changes_only_what_it_names():
    torch.manual_seed(0)
    cnf = CNF(CNFDynamics(2, hidden=(8,)).double(), trace="hutchinson", noise="gaussian", rtol=1e-3, atol=1e-3,
              adjoint=False, t1=0.5)
    exact = cnf.with_(trace="exact", rtol=1e-9, atol=1e-9)
    assert exact.dynamics is cnf.dynamics and exact.augmented.trace == "exact" and cnf.augmented.trace == "hutchinson"
    assert (exact.rtol, exact.atol, exact.t1, exact.noise, exact.adjoint) == (1e-9, 1e-9, 0.5, "gaussian", False)
    x = torch.randn(5, 2, dtype=torch.float64)
    reference = CNF(cnf.dynamics, trace="exact", rtol=1e-9, atol=1e-9, t1=0.5, adjoint=False).log_prob(x)
    assert torch.allclose(exact.log_prob(x), reference, rtol=0, atol=1e-12)
    with torch.no_grad():  # shared, not copied: changing the trained model changes the evaluator
        next(cnf.parameters()).add_(0.1)
    assert not torch.allclose(exact.log_prob(x), reference, atol=1e-6)
    with pytest.raises(TypeError, match="'tol'"):
        cnf.with_(tol=1e-3)
    with pytest.raises(ValueError, match="unknown trace"):
        cnf.with_(trace="exactly")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_hutchinson_variance_is_the_variance_over_every_sign_vector_and_over_gaussian_draws(dtype):
    import itertools
    from neuralode.cnf import hutchinson_variance
    gen = torch.Generator().manual_seed(0)
    A = torch.randn(3, 4, 4, generator=gen, dtype=torch.float64)  # non-symmetric, with a diagonal
    # Rademacher: the exact variance over all 2^4 equally likely sign vectors.
    signs = torch.tensor(list(itertools.product([-1.0, 1.0], repeat=4)), dtype=torch.float64)  # (16, 4)
    values = torch.einsum("si,bij,sj->bs", signs, A, signs)
    assert torch.allclose(values.mean(1), torch.diagonal(A, dim1=1, dim2=2).sum(1))
    got = hutchinson_variance(A.to(dtype), "rademacher")
    assert got.dtype == dtype and got.shape == (3,)
    assert torch.allclose(got.double(), values.var(1, unbiased=False), rtol=1e-5)
    # Gaussian: 200 000 draws, within 2% (the sample variance's relative error is about 0.6% here).
    eps = torch.randn(200000, 4, generator=gen, dtype=torch.float64)
    draws = torch.einsum("si,bij,sj->bs", eps, A, eps)
    assert torch.allclose(hutchinson_variance(A.to(dtype), "gaussian").double(), draws.var(1), rtol=0.02)
    with pytest.raises(ValueError, match="unknown noise"):
        hutchinson_variance(A, "uniform")
    with pytest.raises(ValueError, match=r"\(\.\.\., D, D\)"):
        hutchinson_variance(A[:, :, :3])
