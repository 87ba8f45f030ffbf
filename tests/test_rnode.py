"""RNODE's penalties in the CNF (Finlay et al. 2020): closed forms, the unchanged default, the adjoint."""

import math

import numpy as np
import pytest
import torch

from neuralode._odeint import odeint
from neuralode.cnf import (CNF, CNFDynamics, GatedPlanarDynamics, RNODETerms, divergence_hutchinson,
                           standard_normal_log_prob)

from problems import LinearDynamics


def kinetic_closed_form(A: torch.Tensor, x: torch.Tensor, t0: float, t1: float) -> torch.Tensor:
    """int over the interval between t0 and t1 of ||A e^{A (t - t1)} x||^2 dt, by 40-point Gauss-Legendre
    in float64 (the integrand is entire, so this is exact to rounding)."""
    nodes, weights = np.polynomial.legendre.leggauss(40)
    lo, hi = min(t0, t1), max(t0, t1)
    A = A.double()
    total = torch.zeros(x.shape[0], dtype=torch.float64)
    for node, weight in zip(nodes, weights):
        t = lo + (hi - lo) * (node + 1) / 2
        velocity = x.double() @ (A @ torch.linalg.matrix_exp(A * (t - t1))).T
        total += weight * (hi - lo) / 2 * (velocity**2).sum(dim=1)
    return total


# (t0, t1): a non-unit interval not starting at 0, and the same interval the other way round (the data at
# the lower end, so log_prob solves forward in time): the penalties are positive integrals either way.
INTERVALS = [(-0.5, 1.0), (1.0, -0.5)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("t0, t1", INTERVALS)
def test_linear_field_penalties_equal_the_closed_forms_with_the_exact_trace(dtype, t0, t1):
    # E = int ||A e^{A(t - t1)} x||^2 dt; J = ||A||_F^2 |t1 - t0| exactly (a constant integrand).
    # Bugs this catches: a missing square (||f|| or ||J||_F), the backward solve's sign (E < 0), a
    # missing interval length, J taken as the trace or divided by D (RNODE's code's scaling).
    gen = torch.Generator().manual_seed(0)
    A = (0.6 * torch.randn(3, 3, generator=gen, dtype=torch.float64)).to(dtype)
    x = torch.randn(5, 3, generator=gen, dtype=torch.float64).to(dtype)
    tol = 1e-10 if dtype == torch.float64 else 1e-6
    cnf = CNF(LinearDynamics(A), t0=t0, t1=t1, trace="exact", rtol=tol, atol=tol, adjoint=False)
    terms = cnf.log_prob_and_penalties(x)
    assert isinstance(terms, RNODETerms)
    assert all(v.shape == (5,) and v.dtype == dtype for v in terms)
    rel = 1e-8 if dtype == torch.float64 else 2e-5
    expected_e = kinetic_closed_form(A, x, t0, t1)
    assert (terms.kinetic > 0).all()
    assert torch.allclose(terms.kinetic.double(), expected_e, rtol=rel, atol=0)
    expected_j = (A.double()**2).sum() * abs(t1 - t0)
    assert torch.allclose(terms.jacobian.double(), expected_j.expand(5), rtol=rel, atol=0)
    # and log p(x) is the closed form of test_cnf's linear flow, unchanged by the penalties
    expected_logp = standard_normal_log_prob(x.double() @ torch.linalg.matrix_exp(-(t1 - t0) * A.double()).T) \
        - (t1 - t0) * torch.trace(A.double())
    assert torch.allclose(terms.log_prob.double(), expected_logp, rtol=rel, atol=rel)


@pytest.mark.parametrize("noise", ["rademacher", "gaussian"])
@pytest.mark.parametrize("t0, t1", INTERVALS)
def test_hutchinson_jacobian_penalty_is_unbiased_and_the_kinetic_energy_exact(noise, t0, t1):
    # For f = A z the Hutchinson integrand ||eps^T A||^2 is constant in time, so each example's J is
    # |t1 - t0| ||eps_b^T A||^2, one independent draw per row; its mean over 4000 rows must be
    # ||A||_F^2 |t1 - t0| within 4 standard errors (the trace instead, eps^T A eps, has mean tr A: 4 standard
    # errors away from it here by a wide margin). E does not depend on the noise: the closed form.
    torch.manual_seed(0)
    A = 0.6 * torch.randn(3, 3, dtype=torch.float64)
    x = torch.randn(4000, 3, dtype=torch.float64)
    cnf = CNF(LinearDynamics(A), t0=t0, t1=t1, trace="hutchinson", noise=noise, rtol=1e-9, atol=1e-9, adjoint=False)
    terms = cnf.log_prob_and_penalties(x)
    expected = (A**2).sum().item() * abs(t1 - t0)
    stderr = terms.jacobian.std().item() / math.sqrt(len(x))
    assert abs(terms.jacobian.mean().item() - expected) < 4 * stderr
    assert abs(torch.trace(A).item() * abs(t1 - t0) - expected) > 20 * stderr  # the check tells J from a trace
    assert torch.allclose(terms.kinetic, kinetic_closed_form(A, x, t0, t1), rtol=1e-7)


class ReferenceAugmented(torch.nn.Module):
    """The CNF's augmented dynamics as they were before the penalties: (z, s) -> (f, Hutchinson trace)."""

    def __init__(self, dynamics, noise):
        super().__init__()
        self.dynamics, self.noise = dynamics, noise

    def forward(self, t, state):
        with torch.enable_grad():
            z = state[0].detach().requires_grad_(True) if not state[0].requires_grad else state[0]
            dz = self.dynamics(t, z)
            return dz, divergence_hutchinson(dz, z, self.noise)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_without_penalties_log_prob_and_gradients_are_bitwise_as_before(dtype):
    # log_prob takes the old path: the same numbers and gradients, bit for bit, as a hand-built solve of
    # (z, s) with the same noise; the state_dict keys are the dynamics' under "augmented.dynamics.".
    torch.manual_seed(0)
    dyn = CNFDynamics(2, hidden=(16, 16)).to(dtype)
    x = torch.randn(8, 2, dtype=dtype)
    cnf = CNF(dyn, trace="hutchinson", rtol=1e-5, atol=1e-5, adjoint=False)
    torch.manual_seed(1)
    logp = cnf.log_prob(x)
    logp.mean().backward()
    grads = [p.grad.clone() for p in dyn.parameters()]
    torch.manual_seed(1)
    noise = 2 * torch.randint(0, 2, x.shape).to(dtype) - 1  # sample_noise's Rademacher draw, by hand
    dyn.zero_grad()
    (zs, ss) = odeint(ReferenceAugmented(dyn, noise), (x, torch.zeros(8, dtype=dtype)), [1.0, 0.0],
                      rtol=1e-5, atol=1e-5, method="dopri5")
    reference = standard_normal_log_prob(zs[-1]) + ss[-1]
    reference.mean().backward()
    assert torch.equal(logp, reference)
    assert all(torch.equal(g, p.grad) for g, p in zip(grads, dyn.parameters()))
    assert list(cnf.state_dict()) == ["augmented.dynamics." + k for k in dyn.state_dict()]


@pytest.mark.parametrize("trace", ["exact", "hutchinson"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_penalties_leave_the_steps_and_log_prob_unchanged(trace, dtype):
    # The accumulators are outside the error control (as RNODE's code): the same steps, the same NFE,
    # the same log p(x) for the same noise. Were E and J controlled, the steps would change.
    torch.manual_seed(0)
    dyn = CNFDynamics(2, hidden=(16, 16)).to(dtype)
    x = 2 * torch.randn(16, 2, dtype=dtype)
    cnf = CNF(dyn, trace=trace, rtol=1e-4, atol=1e-4, adjoint=False)
    torch.manual_seed(1)
    plain = cnf.log_prob(x)
    steps = list(cnf.stats.step_times)
    torch.manual_seed(1)
    terms = cnf.log_prob_and_penalties(x)
    assert cnf.stats.step_times == steps
    assert torch.allclose(terms.log_prob, plain, rtol=0, atol=1e-12 if dtype == torch.float64 else 1e-5)
    assert (terms.kinetic > 0).all() and (terms.jacobian > 0).all()


@pytest.mark.parametrize("trace", ["exact", "hutchinson"])
def test_penalized_loss_gradients_via_adjoint_equal_backprop(trace):
    torch.manual_seed(0)
    dyn = CNFDynamics(2, hidden=(8, 8)).double()
    x = torch.randn(6, 2, dtype=torch.float64)
    grads, losses = {}, {}
    for adjoint in (False, True):
        cnf = CNF(dyn, trace=trace, rtol=1e-10, atol=1e-10, adjoint=adjoint)
        dyn.zero_grad()
        torch.manual_seed(1)  # the same Hutchinson noise for both
        loss = cnf.log_prob_and_penalties(x).loss(kinetic_weight=0.3, jacobian_weight=0.2)
        loss.backward()
        losses[adjoint] = loss.item()
        grads[adjoint] = torch.cat([p.grad.reshape(-1) for p in dyn.parameters()])
    assert losses[True] == pytest.approx(losses[False], rel=1e-9)
    assert torch.allclose(grads[True], grads[False], rtol=1e-5, atol=1e-9)
    # the penalties' own gradients are in there: without them the gradient differs
    dyn.zero_grad()
    torch.manual_seed(1)
    CNF(dyn, trace=trace, rtol=1e-10, atol=1e-10, adjoint=False).log_prob_and_penalties(x).loss(0.0, 0.0).backward()
    assert not torch.allclose(torch.cat([p.grad.reshape(-1) for p in dyn.parameters()]), grads[False], rtol=1e-3)


def test_loss_is_rnodes_objective_and_refuses_bad_weights():
    terms = RNODETerms(torch.tensor([-1.0, -3.0]), torch.tensor([2.0, 4.0]), torch.tensor([10.0, 30.0]))
    assert terms.loss(0.5, 0.1).item() == pytest.approx(2.0 + 0.5 * 3.0 + 0.1 * 20.0)
    for bad in (-0.1, math.inf, math.nan, "0.1", True):
        with pytest.raises(ValueError, match="kinetic_weight must be a finite number >= 0"):
            terms.loss(bad, 0.1)
        with pytest.raises(ValueError, match="jacobian_weight must be a finite number >= 0"):
            terms.loss(0.1, bad)
    with pytest.raises(ValueError, match=r"shape \(batch, dim\)"):
        CNF(CNFDynamics(2)).log_prob_and_penalties(torch.zeros(3))


def test_analytic_trace_penalties_use_a_hutchinson_jacobian_and_match_the_other_traces():
    # With fixed rk4 steps the three traces take the same steps: E agrees across all, J (analytic) is
    # the Hutchinson estimate with the same noise, bit for bit up to rounding, and log p(x) is the exact one.
    torch.manual_seed(0)
    dyn = GatedPlanarDynamics(2, width=5).double()
    x = torch.randn(7, 2, dtype=torch.float64)
    out = {}
    for trace in ("exact", "hutchinson", "analytic"):
        torch.manual_seed(1)
        cnf = CNF(dyn, trace=trace, method="rk4", options={"step_size": 0.05}, adjoint=False)
        out[trace] = cnf.log_prob_and_penalties(x)
    assert torch.allclose(out["analytic"].kinetic, out["exact"].kinetic, rtol=1e-12)
    assert torch.allclose(out["analytic"].log_prob, out["exact"].log_prob, atol=1e-10)
    assert torch.allclose(out["analytic"].jacobian, out["hutchinson"].jacobian, rtol=1e-12)
    assert not torch.allclose(out["analytic"].jacobian, out["exact"].jacobian, rtol=1e-3)
