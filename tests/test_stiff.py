"""The Rosenbrock method ``rodas4``: order conditions, convergence, stiff problems against scipy's
Radau, step counts against dopri5, gradients (backprop and adjoint), Jacobian modes, errors."""

import math
from fractions import Fraction

import numpy as np
import pytest
import torch

import neuralode as node
from neuralode import _rosenbrock
from problems import DEVICES

F64 = torch.float64


# --------------------------------------------------------------------------- the coefficients


def _canonical(tab):
    """alpha (s x s strictly lower), beta = alpha + Gamma (lower), b, b_hat, gamma as Fractions."""
    s = tab.stages
    alpha = [[tab.a[i - 1][j] if 0 < i and j < i else Fraction(0) for j in range(s)] for i in range(s)]
    gam = [[tab.gammas[i][j] if j <= i else Fraction(0) for j in range(s)] for i in range(s)]
    beta = [[alpha[i][j] + gam[i][j] for j in range(s)] for i in range(s)]
    b = list(tab.b)
    b_hat = [x - e for x, e in zip(tab.b, tab.b_error)]
    return alpha, beta, b, b_hat, gam[0][0]


def _order_residuals(alpha, beta, b, g):
    """Residuals of the Rosenbrock order conditions up to order 4 (HNW II, section IV.7, Table 7.1), with
    alpha_i = sum_j alpha_ij and beta'_i = sum_{j<i} beta_ij (the diagonal excluded)."""
    s = len(b)
    a_i = [sum(row) for row in alpha]
    bp = [[beta[i][j] if j < i else Fraction(0) for j in range(s)] for i in range(s)]
    b_i = [sum(row) for row in bp]
    r = lambda: range(s)  # noqa: E731
    return [
        sum(b) - 1,
        sum(b[i] * b_i[i] for i in r()) - (Fraction(1, 2) - g),
        sum(b[i] * a_i[i] ** 2 for i in r()) - Fraction(1, 3),
        sum(b[i] * bp[i][j] * b_i[j] for i in r() for j in r()) - (Fraction(1, 6) - g + g * g),
        sum(b[i] * a_i[i] ** 3 for i in r()) - Fraction(1, 4),
        sum(b[i] * a_i[i] * alpha[i][j] * b_i[j] for i in r() for j in r()) - (Fraction(1, 8) - g / 3),
        sum(b[i] * bp[i][j] * a_i[j] ** 2 for i in r() for j in r()) - (Fraction(1, 12) - g / 3),
        sum(b[i] * bp[i][j] * bp[j][k] * b_i[k] for i in r() for j in r() for k in r())
        - (Fraction(1, 24) - g / 2 + Fraction(3, 2) * g * g - g**3),
    ]


def test_rodas4_satisfies_the_order_conditions_and_is_l_stable():
    tab = node.TABLEAUS["rodas4"]
    assert node.METHODS[-1] == "rodas4" and tab.adaptive and (tab.order, tab.error_order) == (4, 3)
    alpha, beta, b, b_hat, g = _canonical(tab)
    residuals = _order_residuals(alpha, beta, b, g)
    assert max(abs(float(x)) for x in residuals) < 1e-12, [float(x) for x in residuals]
    embedded = _order_residuals(alpha, beta, b_hat, g)[:4]  # order 3
    assert max(abs(float(x)) for x in embedded) < 1e-12
    assert abs(float(_order_residuals(alpha, beta, b_hat, g)[4])) > 1e-3  # and not order 4
    # R(z) = 1 + z b^T (I - z B)^{-1} 1 with B = (beta_ij): R(inf) = 1 - b^T B^{-1} 1 = 0 (L-stable),
    # for the embedded solution too (both stiffly accurate).
    B = np.array([[float(x) for x in row] for row in beta])
    for weights in (b, b_hat):
        w = np.array([float(x) for x in weights])
        assert abs(1 - w @ np.linalg.solve(B, np.ones(len(w)))) < 1e-12
    # A-stable along the imaginary axis and in the left half plane (sampled).
    for z in [1j * y for y in np.logspace(-2, 4, 50)] + [-x + 3j for x in np.logspace(-2, 4, 50)]:
        w = np.array([float(x) for x in b])
        R = 1 + z * w @ np.linalg.solve(np.eye(len(w)) - z * B, np.ones(len(w)))
        assert abs(R) <= 1 + 1e-12


# --------------------------------------------------------------------------- convergence


def _slope(hs, errors):
    return np.polyfit(np.log(hs), np.log(errors), 1)[0]


def _constant_steps(f, y0, t1, n, **kwargs):
    h = t1 / n
    with torch.no_grad():
        ys, stats = node.odeint(f, y0, [0.0, t1], method="rodas4", rtol=1e3, atol=1e3, return_stats=True,
                                options={"first_step": h, "max_step": h, **kwargs})
    assert stats.n_accepted == n and stats.n_rejected == 0
    return h, ys[-1]


def test_convergence_order_four_on_a_smooth_nonlinear_problem():
    # Logistic growth with a time-dependent rate, y' = (1 + sin t / 2) y (1 - y):
    # y = 1 / (1 + (1/y0 - 1) exp(-(t - cos t / 2 + 1/2))).
    def f(t, y):
        return (1 + torch.sin(t) / 2) * y * (1 - y)

    y0 = torch.tensor([0.1, 0.5, 2.0], dtype=F64)
    exact = 1 / (1 + (1 / y0 - 1) * math.exp(-(3.0 - math.cos(3.0) / 2 + 0.5)))
    hs, errors = zip(*[(h, (y - exact).abs().max().item())
                       for h, y in (_constant_steps(f, y0, 3.0, n) for n in (12, 24, 48, 96))])
    assert 3.7 < _slope(hs, errors) < 5.5, errors


def test_one_step_equals_the_canonical_form_of_the_derived_coefficients():
    # The library steps in the transformed form (u_i); the tableau derives the canonical alpha_ij,
    # gamma_ij, b (HNW II, IV.7, eq. (7.4)). One canonical step, written out here, must agree with
    # one library step on a coupled, nonlinear, time-dependent problem (every term of the step).
    tab = node.TABLEAUS["rodas4"]

    def f(t, y):
        return torch.stack([y[1], 5 * (1 - y[0] ** 2) * y[1] - y[0] + torch.sin(3 * t)])

    t0, y0, h = torch.tensor(0.3, dtype=F64), torch.tensor([2.0, 0.0], dtype=F64), 0.2
    jac = torch.func.jacrev(lambda x: f(t0, x))(y0)
    f_t = torch.func.jacrev(lambda s: f(s, y0))(t0)
    w = torch.eye(2, dtype=F64) - h * tab.gamma * jac
    ks = []
    for i in range(tab.stages):
        assert tab.gammas[i][i] == Fraction(tab.gamma)
        yi = y0 + sum(float(a) * k for a, k in zip(tab.a[i - 1], ks)) if i else y0
        coupling = sum((float(g) * k for g, k in zip(tab.gammas[i][:i], ks)), torch.zeros(2, dtype=F64))
        ks.append(torch.linalg.solve(w, h * f(t0 + tab.alpha[i] * h, yi) + h * jac @ coupling
                                     + tab.d[i] * h**2 * f_t))
    canonical = y0 + sum(float(b) * k for b, k in zip(tab.b, ks))
    with torch.no_grad():
        library = node.odeint(f, y0, [0.3, 0.3 + h], method="rodas4", rtol=1e3, atol=1e3,
                              options={"first_step": h, "max_step": h})[-1]
    assert (canonical - library).abs().max().item() < 1e-13
    assert (canonical - y0).abs().max().item() > 1e-2  # a step that moves


def test_order_reduction_on_prothero_robinson():
    # y' = lam (y - cos t) - sin t from y(0) = 1, constant steps (Prothero & Robinson 1974; HNW II,
    # IV.15): order 4 for h|lam| small; order 1 with an error C h / |lam| for h|lam| large (stage
    # order 1, L-stable and stiffly accurate); the largest error at intermediate stiffness.
    def max_error(rate, n):
        grid = torch.linspace(0, 1, n + 1, dtype=F64)
        with torch.no_grad():
            ys = node.odeint(lambda t, y: -rate * (y - torch.cos(t)) - torch.sin(t), torch.ones(1, dtype=F64),
                             grid, method="rodas4", rtol=1e3, atol=1e3, options={"first_step": 1 / n, "max_step": 1 / n})
        return (ys[:, 0] - torch.cos(grid)).abs().max().item()

    ns = (10, 20, 40)
    errors = {rate: [max_error(rate, n) for n in ns] for rate in (1.0, 1e2, 1e4, 1e6)}
    hs = [1 / n for n in ns]
    assert 3.7 < _slope(hs, errors[1.0]) < 4.5, errors[1.0]
    for rate in (1e4, 1e6):
        assert 0.8 < _slope(hs, errors[rate]) < 1.2, errors[rate]
    assert errors[1e6][-1] * 1e6 == pytest.approx(errors[1e4][-1] * 1e4, rel=0.1)  # C h / |lam|
    assert errors[1e2][0] > max(errors[1.0][0], errors[1e4][0], errors[1e6][0])  # the hump, at h = 0.1


def test_one_huge_step_on_a_very_stiff_decay_lands_on_the_slow_manifold():
    # y' = lambda (y - cos t) - sin t, y = cos t + (y0 - 1) e^{lambda t}; lambda h = -1e8.
    lam = -1e8

    def f(t, y):
        return lam * (y - torch.cos(t)) - torch.sin(t)

    _, y1 = _constant_steps(f, torch.tensor([3.0], dtype=F64), 1.0, 1)
    assert abs(y1.item() - math.cos(1.0)) < 1e-6  # an A-stable but not L-stable method keeps ~2e0


# --------------------------------------------------------------------------- stiff problems


def _robertson(t, y):
    return torch.stack([-0.04 * y[0] + 1e4 * y[1] * y[2],
                        0.04 * y[0] - 1e4 * y[1] * y[2] - 3e7 * y[1] ** 2,
                        3e7 * y[1] ** 2])


def _van_der_pol(t, y, mu=1000.0):
    return torch.stack([y[1], mu * (1 - y[0] ** 2) * y[1] - y[0]])


def _radau(f, t, y0, rtol, atol, jac=None):
    from scipy.integrate import solve_ivp

    sol = solve_ivp(lambda s, y: f(torch.tensor(s, dtype=F64), torch.from_numpy(y)).numpy(), (t[0], t[-1]),
                    y0, method="Radau", t_eval=t, rtol=rtol, atol=atol, jac=jac)
    assert sol.success, sol.message
    return sol.y.T


def test_robertson_agrees_with_scipy_radau():
    t = np.concatenate([[0.0], np.logspace(-5, np.log10(40.0), 12)])  # outputs between steps too
    rtol, atol = 1e-8, 1e-13  # atol below y2 ~ 3e-5 times rtol, so y2 is controlled relatively
    with torch.no_grad():
        ys, stats = node.odeint(_robertson, torch.tensor([1.0, 0.0, 0.0], dtype=F64), torch.from_numpy(t),
                                method="rodas4", rtol=rtol, atol=atol, return_stats=True)
    ref = _radau(_robertson, t, [1.0, 0.0, 0.0], 1e-10, [1e-12, 1e-16, 1e-12])
    # Global error follows the local tolerance up to a modest factor (here < 10 observed).
    bound = 100 * (atol + rtol * np.abs(ref))
    assert (np.abs(ys.numpy() - ref) <= bound).all(), (np.abs(ys.numpy() - ref) / bound).max()
    assert np.allclose(ys.numpy().sum(axis=1), 1.0, atol=1e-12)  # mass is conserved exactly by linear steps
    assert stats.n_accepted < 400


def test_van_der_pol_mu_1000_agrees_with_scipy_radau():
    # [0, 1000]: the slow stiff phase from y = 2 down to y = 1, the fast jump at t ~ 807, and the
    # start of the next slow phase.
    t = np.linspace(0.0, 1000.0, 9)
    rtol, atol = 1e-8, 1e-10
    with torch.no_grad():
        ys, stats = node.odeint(_van_der_pol, torch.tensor([2.0, 0.0], dtype=F64), torch.from_numpy(t),
                                method="rodas4", rtol=rtol, atol=atol, return_stats=True)

    def jac(s, y, mu=1000.0):
        return np.array([[0.0, 1.0], [-2 * mu * y[0] * y[1] - 1, mu * (1 - y[0] ** 2)]])

    ref = _radau(_van_der_pol, t, [2.0, 0.0], 1e-10, 1e-12, jac=jac)
    # The jump amplifies errors in its timing: allow 1000 x the local tolerance there.
    assert np.abs(ys.numpy() - ref).max(axis=0)[0] < 1000 * rtol * 2
    assert np.abs(ys.numpy() - ref).max(axis=0)[1] < 1000 * (atol + rtol * np.abs(ref[:, 1]).max())
    assert stats.n_accepted < 4000


def test_robertson_takes_over_100_times_fewer_steps_than_dopri5():
    # Equal tolerances, the same span [0, 40]. dopri5's steps are capped by stability
    # (|h lambda| <~ 3.3 with lambda ~ -1e4), so it needs tens of thousands of steps (about 10 s).
    y0 = torch.tensor([1.0, 0.0, 0.0], dtype=F64)
    tol = dict(rtol=1e-6, atol=1e-10)
    with torch.no_grad():
        _, stiff = node.odeint(_robertson, y0, [0.0, 40.0], method="rodas4", return_stats=True, **tol)
        _, explicit = node.odeint(_robertson, y0, [0.0, 40.0], method="dopri5", return_stats=True,
                                  options={"max_num_steps": 10**6}, **tol)
    stiff_steps = stiff.n_accepted + stiff.n_rejected
    explicit_steps = explicit.n_accepted + explicit.n_rejected
    assert explicit_steps > 100 * stiff_steps, (explicit_steps, stiff_steps)


def test_dense_output_on_a_stiff_problem_stays_accurate():
    lam = -1e6

    def f(t, y):
        return lam * (y - torch.cos(t)) - torch.sin(t)

    t = torch.linspace(0, 10, 101, dtype=F64)
    with torch.no_grad():
        ys = node.odeint(f, torch.tensor([2.0], dtype=F64), t, method="rodas4", rtol=1e-6, atol=1e-8,
                         options={"max_step": 0.5})
    exact = torch.cos(t) + torch.exp(lam * t)
    # Slope-based interpolants multiply the distance to the slow manifold by |h lambda| (cubic
    # Hermite: 0.16 here without max_step). rodas.f's extension is only order 3, so between steps
    # of 0.5 its interpolation error (~1.6e-3 measured) exceeds the tolerance: a documented limit.
    assert (ys[:, 0] - exact).abs().max() < 5e-3


# --------------------------------------------------------------------------- gradients


def _stiff_problem(k, c):
    """A stiff, non-autonomous problem with two parameters: y0' = -k (y0 - cos(c t)), y1' = y0 - y1^2."""

    def f(t, y):
        return torch.stack([-k * (y[0] - torch.cos(c * t)), y[0] - y[1] ** 2])

    return f


def _loss(ys):
    return (ys[1:] ** 2).sum() + ys[-1, 1]


def _central_difference(fn, x, eps):
    x = x.detach()
    out = torch.zeros_like(x)
    for i in range(x.numel()):
        e = torch.zeros_like(x).view(-1)
        e[i] = eps
        e = e.view_as(x)
        out.view(-1)[i] = (fn(x + e) - fn(x - e)) / (2 * eps)
    return out


def test_backprop_through_fixed_rodas_steps_is_exact():
    # With the step sequence fixed, the solve is a smooth function of (y0, k, c): backprop
    # (through J, f_t, the LU and the solves) must equal its finite differences to rounding.
    t = [0.0, 0.5, 1.0]
    opts = dict(method="rodas4", rtol=1e3, atol=1e3, options={"first_step": 0.05, "max_step": 0.05})
    theta = torch.tensor([2.0, 0.5, 300.0, 0.7], dtype=F64, requires_grad=True)  # y0, k, c

    def run(p):
        return _loss(node.odeint(_stiff_problem(p[2], p[3]), p[:2], t, **opts))

    (grad,) = torch.autograd.grad(run(theta), theta)
    with torch.no_grad():
        fd = _central_difference(run, theta, 1e-6)
    assert torch.allclose(grad, fd, rtol=1e-6, atol=1e-8), (grad, fd)


def test_adaptive_backprop_and_adjoint_gradients_match_finite_differences():
    t = [0.0, 0.3, 0.6]
    tol = dict(method="rodas4", rtol=1e-8, atol=1e-8)
    y0 = torch.tensor([2.0, 0.5], dtype=F64, requires_grad=True)
    k = torch.tensor(100.0, dtype=F64, requires_grad=True)
    c = torch.tensor(0.7, dtype=F64, requires_grad=True)

    def run(y, kk, cc):
        return _loss(node.odeint(_stiff_problem(kk, cc), y, t, **tol))

    backprop = torch.autograd.grad(run(y0, k, c), (y0, k, c))
    with torch.no_grad():
        fd = [_central_difference(lambda y: run(y, k, c), y0, 1e-5),
              _central_difference(lambda kk: run(y0, kk, c), k, 1e-2),
              _central_difference(lambda cc: run(y0, k, cc), c, 1e-5)]
    for g, r in zip(backprop, fd):
        assert torch.allclose(g, r, rtol=1e-5, atol=1e-7), (g, r)

    # The adjoint with checkpoints: rodas4 re-solves each segment and backpropagates through it.
    ys = node.odeint_adjoint(_stiff_problem(k, c), y0, t, adjoint_params=(k, c), checkpoints=2, **tol)
    checkpointed = torch.autograd.grad(_loss(ys), (y0, k, c))
    for g, r in zip(checkpointed, backprop):
        assert torch.allclose(g, r, rtol=1e-7, atol=1e-9), (g, r)


def test_backsolve_adjoint_uses_rodas4_for_the_backward_solve():
    # The backsolve adjoint reconstructs z backwards, which is unstable in stiff directions
    # (e^{k t} growth) whatever the method: keep k t_span moderate (here k = 20 over 0.5).
    t = [0.0, 0.25, 0.5]
    tol = dict(method="rodas4", rtol=1e-9, atol=1e-9)
    y0 = torch.tensor([2.0, 0.5], dtype=F64, requires_grad=True)
    k = torch.tensor(20.0, dtype=F64, requires_grad=True)
    c = torch.tensor(0.7, dtype=F64, requires_grad=True)
    reference = torch.autograd.grad(_loss(node.odeint(_stiff_problem(k, c), y0, t, **tol)), (y0, k, c))
    ys, stats = node.odeint_adjoint(_stiff_problem(k, c), y0, t, adjoint_params=(k, c), return_stats=True, **tol)
    got = torch.autograd.grad(_loss(ys), (y0, k, c))
    for g, r in zip(got, reference):
        assert torch.allclose(g, r, rtol=1e-6, atol=1e-9), (g, r)
    assert stats.backward_n_accepted > 0 and stats.n_jac > 0


# --------------------------------------------------------------------------- dtypes, devices, Jacobians


@pytest.mark.parametrize("device", DEVICES, ids=str)
@pytest.mark.parametrize("dtype", [torch.float32, F64], ids=str)
def test_float32_and_float64_on_every_device(dtype, device):
    def f(t, y):
        return -1e4 * (y - torch.cos(t)) - torch.sin(t)

    y0 = torch.full((3,), 2.0, dtype=dtype, device=device)
    t = torch.linspace(0, 2, 5)
    tol = 1e-4 if dtype == torch.float32 else 1e-6
    with torch.no_grad():
        ys, stats = node.odeint(f, y0, t, method="rodas4", rtol=tol, atol=tol, return_stats=True)
    assert ys.dtype == dtype and ys.device.type == device.type and ys.shape == (5, 3)
    exact = torch.cos(t)[:, None].expand(5, 3).double()
    assert (ys[-1].double().cpu() - exact[-1]).abs().max() < 10 * tol  # a step end
    # Between steps the order-3 stiff dense output is the weak part: steps here reach h ~ 1, and
    # its error (1.2e-2 measured in float32 at rtol 1e-4) exceeds the tolerance.
    assert (ys[1:].double().cpu() - exact[1:]).abs().max() < 0.05
    assert stats.n_accepted < 200


def _independent_rows():
    torch.manual_seed(0)
    net = node.MLPDynamics(3, hidden=8, time_dependent=True).double()
    rates = torch.tensor([1.0, 50.0, 2000.0], dtype=F64)

    def f(t, y):  # rows independent: a network applied row-wise plus a stiff linear part
        return net(t, y) - rates * y

    return f


def test_batched_jacobian_matches_the_full_one():
    f = _independent_rows()
    y = torch.randn(5, 3, dtype=F64)
    stats = node.SolverStats()
    full = _rosenbrock._Jacobian(f, "full", y.shape, stats, False)(0.3, y)
    batched = _rosenbrock._Jacobian(f, "batched", y.shape, stats, False)(0.3, y)
    blocks = torch.stack([full[1].view(5, 3, 5, 3)[b, :, b, :] for b in range(5)])
    assert torch.allclose(batched[1], blocks, atol=1e-12)
    assert torch.allclose(full[1].view(5, 3, 5, 3).abs().sum(), blocks.abs().sum())  # block diagonal
    assert torch.allclose(batched[2], full[2], atol=1e-12)  # df/dt (double vjp vs joint Jacobian)
    assert stats.n_jac == 2

    t = torch.linspace(0, 1, 4, dtype=F64)
    y0 = torch.randn(5, 3, dtype=F64)
    with torch.no_grad():
        a, sa = node.odeint(f, y0, t, method="rodas4", rtol=1e-7, atol=1e-7, return_stats=True)
        b, sb = node.odeint(f, y0, t, method="rodas4", rtol=1e-7, atol=1e-7, return_stats=True,
                            options={"jacobian": "batched"})
    assert torch.allclose(a, b, atol=1e-10) and sa.n_accepted == sb.n_accepted


def test_batched_jacobian_with_the_adjoint():
    f = _independent_rows()
    y0 = torch.randn(2, 3, dtype=F64, requires_grad=True)
    t = [0.0, 0.1]
    opts = dict(method="rodas4", rtol=1e-6, atol=1e-6, options={"jacobian": "batched"})
    ref = torch.autograd.grad(node.odeint(f, y0, t, **opts)[-1].square().sum(), y0)[0]
    got = torch.autograd.grad(node.odeint_adjoint(f, y0, t, adjoint_params=(), checkpoints=1, **opts)[-1]
                              .square().sum(), y0)[0]
    assert torch.allclose(got, ref, rtol=1e-7, atol=1e-9)


def test_stats_count_jacobians_factorisations_and_solves():
    calls = []

    def f(t, y):
        calls.append(1)
        return _robertson(t, y)

    with torch.no_grad():
        _, stats = node.odeint(f, torch.tensor([1.0, 0.0, 0.0], dtype=F64), [0.0, 1.0], method="rodas4",
                               rtol=1e-6, atol=1e-10, return_stats=True)
    attempts = stats.n_accepted + stats.n_rejected
    assert stats.nfe == len(calls)
    assert stats.n_lu == attempts >= stats.n_accepted  # one factorisation per attempted step
    assert stats.n_solves == 6 * stats.n_lu
    assert stats.n_jac == stats.n_accepted  # at t0 and after every accepted step but the last
    assert stats.nfe == stats.n_jac + 1 + 5 * attempts  # + 1: Hairer's initial-step probe
    _, explicit = node.odeint(lambda t, y: -y, torch.ones(2), [0.0, 1.0], return_stats=True)
    assert explicit.n_jac == explicit.n_lu == explicit.n_solves == 0


# --------------------------------------------------------------------------- failures


def test_bad_options_name_the_option():
    y0, t = torch.ones(2, 3), [0.0, 1.0]
    with pytest.raises(ValueError, match=r"unknown option.*'jacobain'.*valid options.*'jacobian'"):
        node.odeint(lambda t, y: -y, y0, t, method="rodas4", options={"jacobain": "full"})
    with pytest.raises(ValueError, match=r"options\['jacobian'\] must be one of \('full', 'batched'\)"):
        node.odeint(lambda t, y: -y, y0, t, method="rodas4", options={"jacobian": "diagonal"})
    with pytest.raises(ValueError, match=r"unknown option.*'jacobian'"):
        node.odeint(lambda t, y: -y, y0, t, method="dopri5", options={"jacobian": "full"})
    with pytest.raises(ValueError, match=r"'batched' needs a state of shape \(B, D\).*\(2, 3, 1\)"):
        node.odeint(lambda t, y: -y, torch.ones(2, 3, 1), t, method="rodas4", options={"jacobian": "batched"})
    with pytest.raises(ValueError, match=r"'batched' needs a state of shape \(B, D\).*\(4,\)"):
        node.odeint(lambda t, s: (-s[0], -s[1]), (torch.ones(2), torch.ones(2)), t, method="rodas4",
                    options={"jacobian": "batched"})
    with pytest.raises(ValueError, match=r"adjoint_options\b|unknown option.*'jacobian'"):
        node.odeint_adjoint(lambda t, y: -y, y0, t, method="dopri5", adjoint_params=(),
                            adjoint_method="dopri5", adjoint_options={"jacobian": "full"})


def test_singular_w_halves_the_step_then_fails_naming_t_and_h():
    # J = diag(4, 8, ..., 128) with h = 1, gamma = 1/4: W = I - h J / 4 is exactly singular for
    # h = 1, 1/2, ..., 1/32, so six tries in a row fail.
    rates = torch.tensor([4.0 * 2**i for i in range(6)], dtype=F64)
    with pytest.raises(RuntimeError, match=r"W = I - h\*gamma\*J is singular at t=0 \(h=0\.03"):
        node.odeint(lambda t, y: rates * y, torch.ones(6, dtype=F64), [0.0, 10.0], method="rodas4",
                    options={"first_step": 1.0})


def test_singular_w_once_is_survived():
    # y' = 4 y: W = 1 - h = 0 at h = 1; halving gives W = 1/2 and the solve continues.
    with torch.no_grad():
        ys, stats = node.odeint(lambda t, y: 4.0 * y, torch.ones(1, dtype=F64), [0.0, 1.0], method="rodas4",
                                rtol=1e-8, atol=1e-8, options={"first_step": 1.0}, return_stats=True)
    assert stats.n_rejected >= 1 and abs(ys[-1].item() - math.exp(4.0)) < 1e-5 * math.exp(4.0)


def test_too_many_steps_and_non_finite_values_give_the_usual_errors():
    with pytest.raises(RuntimeError, match=r"max_num_steps=3 reached at t="):
        node.odeint(_robertson, torch.tensor([1.0, 0.0, 0.0], dtype=F64), [0.0, 40.0], method="rodas4",
                    options={"max_num_steps": 3})
    with pytest.raises(FloatingPointError, match=r"NaN or inf"):
        node.odeint(lambda t, y: y * float("nan") if t > 0.5 else -y, torch.ones(2, dtype=F64), [0.0, 1.0],
                    method="rodas4")


# --------------------------------------------------------------------------- stability functions


@pytest.mark.parametrize("method", [m for m in node.METHODS if m != "rodas4"] + ["rodas4"])
def test_one_step_on_the_test_equation_multiplies_by_the_stability_function(method):
    # The formula R(z) (a tableau property) and the engine's actual step must agree: one step of
    # size h on y' = lambda y, for real and complex-like (rotation) test problems.
    tab = node.TABLEAUS[method]
    for lam in (-0.7, -3.0, -250.0):
        h = 0.4
        opts = {"step_size": h} if not tab.adaptive else {"first_step": h, "max_step": h}
        with torch.no_grad():
            ys = node.odeint(lambda t, y: lam * y, torch.ones(1, dtype=F64), [0.0, h], method=method,
                             rtol=1e9, atol=1e9, options=opts)
        expected = tab.stability_function(lam * h).real
        assert abs(ys[-1].item() - expected) <= 1e-12 * max(1.0, abs(expected)), (lam, ys[-1].item(), expected)
    # A rotation y' = [[0, -w], [w, 0]] y has eigenvalues +-iw: one step applies R(i w h).
    w, h = 2.0, 0.3
    opts = {"step_size": h} if not tab.adaptive else {"first_step": h, "max_step": h}
    with torch.no_grad():
        ys = node.odeint(lambda t, y: torch.stack([-w * y[1], w * y[0]]), torch.tensor([1.0, 0.0], dtype=F64),
                         [0.0, h], method=method, rtol=1e9, atol=1e9, options=opts)
    r = complex(tab.stability_function(1j * w * h))
    assert abs(ys[-1, 0].item() - r.real) < 1e-12 and abs(ys[-1, 1].item() - r.imag) < 1e-12


def test_stability_functions_approximate_exp_to_their_order_and_known_boundaries():
    z = np.array([0.05, 0.025]) * (1 + 0.5j)
    for name in node.METHODS:
        tab = node.TABLEAUS[name]
        err = np.abs(tab.stability_function(z) - np.exp(z))
        # R(z) - e^z = C z^{p+1} + ...: halving z divides the error by 2^{p+1} (or more: tsit5's
        # z^6 coefficient is tuned close to 1/720, so its next terms show).
        assert np.log2(err[0] / err[1]) > tab.order + 0.75, (name, np.log2(err[0] / err[1]))
    from scipy.optimize import brentq

    # Real stability boundaries: Euler -2, RK4 -2.785, dopri5 -3.307 (HNW II, section IV.2).
    for name, boundary in (("euler", -2.0), ("rk4", -2.7852935634), ("dopri5", -3.3065678926)):
        root = brentq(lambda x: abs(node.TABLEAUS[name].stability_function(x)) - 1, -6, -0.5)
        assert abs(root - boundary) < 1e-8, (name, root)
    rodas = node.TABLEAUS["rodas4"]
    assert abs(rodas.stability_function(-1e12)) < 1e-10  # L-stable: R(-inf) = 0
    assert abs(rodas.stability_function(-1e12, embedded=True)) < 1e-10
    assert isinstance(rodas, node.RosenbrockTableau)
    assert rodas.stability_function(np.zeros((2, 3))).shape == (2, 3)
