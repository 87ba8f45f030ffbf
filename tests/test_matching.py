"""Flow matching (neuralode.matching) against closed forms: the paths, the loss and the CFM theorem,
the exact marginal field between Gaussians, minibatch OT, sampling and the CNF's exact likelihood."""

import itertools
import math

import pytest
import torch

from neuralode import matching as fm
from neuralode.cnf import CNF, CNFDynamics
from problems import DEVICES


@pytest.fixture(autouse=True)
def one_thread():
    # Tiny tensors: on two cores shared with other work, a second intra-op thread makes training ~60x slower.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


PATHS = {"linear": fm.LinearPath(), "linear-sigma_min": fm.LinearPath(0.1), "gaussian": fm.GaussianPath(0.3),
         "cosine": fm.CosinePath()}


def _pairs(n, dim=2, dtype=torch.float64, device="cpu", seed=0):
    g = torch.Generator().manual_seed(seed)
    x0, x1, eps = (torch.randn(n, dim, generator=g, dtype=dtype).to(device) for _ in range(3))
    return x0, 3 + x1, eps


def _marginal(path, t, m0, s0, m1, s1):
    """Mean and std of x_t between independent N(m0, s0^2) and N(m1, s1^2), from the path's coefficients."""
    a, b, _, _ = path.coefficients(torch.tensor(float(t), dtype=torch.float64))
    return a * m0 + b * m1, torch.sqrt(a**2 * s0**2 + b**2 * s1**2 + path.sigma**2)


# ------------------------------------------------------------------------------------------------ paths
@pytest.mark.parametrize("name", PATHS)
def test_path_ends_and_velocity_is_the_time_derivative(name):
    path = PATHS[name]
    x0, x1, eps = _pairs(7)
    sigma_min = getattr(path, "sigma_min", 0.0)
    start = path(x0, x1, torch.zeros(7, dtype=torch.float64), eps)[0]
    end = path(x0, x1, torch.tensor(1.0, dtype=torch.float64), eps)[0]  # a 0-d t broadcasts too
    assert torch.allclose(start, x0 + path.sigma * eps, atol=1e-12)
    assert torch.allclose(end, x1 + sigma_min * x0 + path.sigma * eps, atol=1e-12)
    t = torch.linspace(0.05, 0.95, 7, dtype=torch.float64)
    h = 1e-6
    slope = (path(x0, x1, t + h, eps)[0] - path(x0, x1, t - h, eps)[0]) / (2 * h)
    assert torch.allclose(path(x0, x1, t, eps)[1], slope, atol=1e-8)


def test_paths_refuse_bad_settings():
    with pytest.raises(ValueError, match="eps="):
        fm.GaussianPath(0.1)(*_pairs(3)[:2], torch.zeros(3, dtype=torch.float64))
    with pytest.raises(ValueError, match="sigma_min"):
        fm.LinearPath(1.0)
    with pytest.raises(ValueError, match="sigma"):
        fm.GaussianPath(-0.1)
    with pytest.raises(ValueError, match="GaussianPath: sigma"):
        fm.GaussianPath("0.1")  # a string: named, not a bare TypeError from the comparison
    with pytest.raises(ValueError, match="LinearPath: sigma_min"):
        fm.LinearPath(None)
    with pytest.raises(ValueError, match="std0 and std1 must be positive"):
        fm.gaussian_marginal_field(fm.LinearPath(), 0.0, 1.0, 2.0, torch.tensor([0.5, 0.0]))


# ------------------------------------------------------------------------------------------------ loss
@pytest.mark.parametrize("device", DEVICES, ids=str)
def test_loss_evaluates_a_cnf_dynamics_at_each_examples_own_time(device):
    # The loss vmaps the field over examples; a loop calling it as the CNF does (0-d t) must agree.
    torch.manual_seed(0)
    field = CNFDynamics(2, (16, 16)).double().to(device)
    x0, x1, _ = _pairs(9, device=device)
    path = fm.GaussianPath(0.2)
    loss = fm.flow_matching_loss(field, x0, x1, path, generator=torch.Generator().manual_seed(1))
    g = torch.Generator().manual_seed(1)  # replay its draws: t first, then eps, on the CPU generator
    t = torch.rand(9, generator=g, dtype=torch.float64).to(device)
    eps = torch.randn(9, 2, generator=g, dtype=torch.float64).to(device)
    x_t, u_t = path(x0, x1, t, eps)
    v = torch.cat([field(t[i], x_t[i:i + 1]) for i in range(9)])
    assert torch.allclose(loss, ((v - u_t)**2).sum(dim=1).mean(), rtol=1e-12)
    loss.backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in field.parameters())


def test_loss_is_zero_for_the_exact_field_of_a_single_pair():
    # One pair repeated: the marginal field is the conditional one, x1 - x0, for any t and noise.
    x0, x1 = torch.tensor([[0.5, -1.0]]).repeat(64, 1), torch.tensor([[2.0, 1.0]]).repeat(64, 1)
    for path in (fm.LinearPath(), fm.GaussianPath(0.5)):
        assert fm.flow_matching_loss(lambda t, x: x1[:1] - x0[:1], x0, x1, path) == 0
        assert fm.flow_matching_loss(lambda t, x: x1[:1] - x0[:1] + 0.1, x0, x1, path) > 0


def test_loss_refuses_bad_input():
    x0, x1, _ = _pairs(4)
    field = lambda t, x: x  # noqa: E731
    with pytest.raises(TypeError, match="AffinePath"):
        fm.flow_matching_loss(field, x0, x1, "linear")
    with pytest.raises(ValueError, match="share a shape"):
        fm.flow_matching_loss(field, x0, x1[:3], fm.LinearPath())
    with pytest.raises(ValueError, match=r"shape \(4,\)"):
        fm.flow_matching_loss(field, x0, x1, fm.LinearPath(), t=torch.rand(4, 1))
    with pytest.raises(ValueError, match=r"t must lie in \[0, 1\]"):
        fm.flow_matching_loss(field, x0, x1, fm.LinearPath(), t=torch.full((4,), 5.0))
    with pytest.raises(ValueError, match=r"t must lie in \[0, 1\]"):
        fm.flow_matching_loss(field, x0, x1, fm.LinearPath(), t=torch.tensor([0.5, float("nan"), 0.5, 0.5]))
    # A field returning (1, 1) per call for a 2-D state would broadcast to a finite, meaningless loss.
    with pytest.raises(ValueError, match=r"returned shape \(1,\) per example, expected \(2,\)"):
        fm.flow_matching_loss(lambda t, x: x.sum(1, keepdim=True), x0, x1, fm.LinearPath())
    # The ends of [0, 1] are allowed.
    assert torch.isfinite(fm.flow_matching_loss(field, x0, x1, fm.LinearPath(), t=torch.tensor([0.0, 1.0, 0.0, 1.0])))


@pytest.mark.parametrize("name", PATHS)
def test_conditional_and_marginal_losses_have_the_same_gradient(name):
    # Lipman et al. (2023), Theorem 2, for the field v = th0 + th1 x + th2 t + th3 t x between 1-D Gaussians:
    # grad L_CFM - grad L_FM = E[2 (u_marginal(x_t) - u_t) phi], phi = (1, x, t, t x), is zero. Estimated on
    # the same 200k samples, each component must be within 4 standard errors of 0, while the marginal field
    # of a slightly wrong target (std 0.6 for 0.5) must not be: the check can see a mistake of that size.
    path, n = PATHS[name], 200_000
    g = torch.Generator().manual_seed(0)
    x0 = 0.5 + 1.5 * torch.randn(n, 1, generator=g, dtype=torch.float64)
    x1 = 3.0 + 0.5 * torch.randn(n, 1, generator=g, dtype=torch.float64)
    t = torch.rand(n, generator=g, dtype=torch.float64)
    theta = torch.tensor([0.3, -0.2, 1.0, 0.5], dtype=torch.float64, requires_grad=True)
    field = lambda s, x: theta[0] + theta[1] * x + theta[2] * s + theta[3] * s * x  # noqa: E731
    loss = fm.flow_matching_loss(field, x0, x1, path, t=t, generator=torch.Generator().manual_seed(5))
    grad_cfm, = torch.autograd.grad(loss, theta)
    eps = torch.randn(n, 1, generator=torch.Generator().manual_seed(5), dtype=torch.float64)  # the loss's noise
    x_t, u_t = path(x0, x1, t, eps)
    phi = torch.cat([torch.ones_like(x_t), x_t, t[:, None], t[:, None] * x_t], dim=1)
    with torch.no_grad():
        assert torch.allclose(grad_cfm, (2 * (field(t[:, None], x_t) - u_t) * phi).mean(0), rtol=1e-10)
        for std1, same in ((0.5, True), (0.6, False)):
            diff = 2 * (fm.gaussian_marginal_field(path, 0.5, 1.5, 3.0, std1)(t, x_t) - u_t) * phi
            z = diff.mean(0) / (diff.std(0) / math.sqrt(n))
            assert bool((z.abs() < 4).all()) == same, (name, std1, z)


# ------------------------------------------------------------------------------------------------ closed form
@pytest.mark.parametrize("name", PATHS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("device", DEVICES, ids=str)
def test_marginal_field_flow_is_the_affine_map_between_the_gaussians(name, dtype, device):
    # The flow of u_t(x) = m_t' + (s_t'/s_t)(x - m_t) maps x to m_1 + (s_1/s_0)(x - m_0), every point exactly.
    path = PATHS[name]
    m0, s0 = torch.tensor([0.0, 1.0]), torch.tensor([1.0, 2.0])
    m1, s1 = torch.tensor([3.0, -2.0]), torch.tensor([0.5, 1.0])
    field = fm.gaussian_marginal_field(path, m0, s0, m1, s1)
    (a0, r0), (a1, r1) = _marginal(path, 0, m0, s0, m1, s1), _marginal(path, 1, m0, s0, m1, s1)
    x0 = (a0 + r0 * torch.randn(50, 2, generator=torch.Generator().manual_seed(0))).to(device, dtype)
    tol = 1e-9 if dtype == torch.float64 else 1e-5
    x1 = fm.sample(field, x0, rtol=tol, atol=tol)
    expected = (a1 + r1 / r0 * (x0.cpu().double() - a0)).to(device, dtype)
    assert x1.dtype == dtype and x1.device == x0.device
    assert torch.allclose(x1, expected, atol=50 * tol), (x1 - expected).abs().max()


@pytest.mark.parametrize("t", [0.2, 0.5, 0.8])
def test_cosine_marginal_field_is_the_probability_flow_drift(t):
    # CosinePath's docstring: u_t(x) = (b_t'/b_t)(x + grad log p_t(x)), the variance-preserving diffusion's
    # probability-flow drift. Between N(0, 1) and N(m1, s1^2) the marginal p_t is N(m_t, s_t^2), with score
    # -(x - m_t)/s_t^2; the exact marginal field must equal the drift built from it.
    m1, s1 = torch.tensor([2.0, -1.0], dtype=torch.float64), torch.tensor([0.5, 1.5], dtype=torch.float64)
    path = fm.CosinePath()
    field = fm.gaussian_marginal_field(path, 0.0, 1.0, m1, s1)
    x = torch.randn(30, 2, generator=torch.Generator().manual_seed(1), dtype=torch.float64) * 2
    tt = torch.tensor(t, dtype=torch.float64)
    a, b, _, db = path.coefficients(tt)
    m_t, s_t = b * m1, torch.sqrt(a**2 + b**2 * s1**2)
    drift = db / b * (x - (x - m_t) / s_t**2)
    assert torch.allclose(field(tt, x), drift, atol=1e-12, rtol=1e-12)
    # A sign error in the score term (x - s) would be far off.
    assert not torch.allclose(field(tt, x), db / b * (x + (x - m_t) / s_t**2), atol=1e-2)


@pytest.mark.parametrize("name", ["linear", "cosine"])
def test_cnf_of_the_marginal_field_gives_the_exact_target_density(name):
    # The convention: noise at t = 0, data at t = 1, so CNF(field) with its defaults t0=0, t1=1 is the model.
    field = fm.gaussian_marginal_field(PATHS[name], 0.0, 1.0, torch.tensor([3.0, -1.0]), torch.tensor([0.5, 2.0]))
    cnf = CNF(field, rtol=1e-10, atol=1e-10, adjoint=False)
    x = torch.randn(20, 2, generator=torch.Generator().manual_seed(0), dtype=torch.float64) * 2
    mean, std = torch.tensor([3.0, -1.0], dtype=torch.float64), torch.tensor([0.5, 2.0], dtype=torch.float64)
    expected = torch.distributions.Normal(mean, std).log_prob(x).sum(dim=1)
    assert torch.allclose(cnf.log_prob(x), expected, atol=1e-7)


def test_trained_cnf_dynamics_learn_the_marginal_field_and_its_exact_likelihood():
    # N(0, 1) to N(2, 0.5^2) on the straight path, 1000 Adam steps of 512 pairs (about 2 s on one core).
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(0)
    dynamics, path = CNFDynamics(1, (32, 32), activation="tanh"), fm.LinearPath()
    opt = torch.optim.Adam(dynamics.parameters(), lr=2e-2)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(opt, 1000)
    for _ in range(1000):
        x0, x1 = torch.randn(512, 1, generator=g), 2 + 0.5 * torch.randn(512, 1, generator=g)
        loss = fm.flow_matching_loss(dynamics, x0, x1, path, generator=g)
        opt.zero_grad()
        loss.backward()
        opt.step()
        schedule.step()
    # The field, where the marginal p_t puts its mass: root-mean-square error below 0.2 (the field's own
    # RMS is about 2.1; an untrained one is off by about 2).
    t = torch.rand(4000, generator=g)
    x_t, _ = path(torch.randn(4000, 1, generator=g), 2 + 0.5 * torch.randn(4000, 1, generator=g), t)
    with torch.no_grad():
        learned = torch.cat([dynamics(t[i], x_t[i:i + 1]) for i in range(0, 4000, 40)])
    exact = fm.gaussian_marginal_field(path, 0.0, 1.0, 2.0, 0.5)(t[::40], x_t[::40])
    assert (learned - exact).pow(2).mean().sqrt() < 0.2
    # The likelihood: the mean of log q - log p over target samples estimates -KL(p || q) <= 0.
    x = 2 + 0.5 * torch.randn(500, 1, generator=g)
    gap = CNF(dynamics).log_prob(x).detach() - torch.distributions.Normal(2.0, 0.5).log_prob(x)[:, 0]
    assert -0.05 < gap.mean() < 0.02 and gap.abs().mean() < 0.2, (gap.mean(), gap.abs().mean())


# ------------------------------------------------------------------------------------------------ OT coupling
def _cost(x0, x1):
    return ((x0.double() - x1.double())**2).sum()


@pytest.mark.parametrize("batch", [1, 2, 3, 5, 6])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_ot_coupling_is_the_best_permutation(batch, dtype):
    g = torch.Generator().manual_seed(batch)
    for _ in range(5):
        x0, x1 = torch.randn(batch, 3, generator=g, dtype=dtype), torch.randn(batch, 3, generator=g, dtype=dtype)
        paired = fm.ot_coupling(x0, x1)
        best = min(_cost(x0[list(p)], x1) for p in itertools.permutations(range(batch)))
        assert paired.dtype == dtype and torch.allclose(_cost(paired, x1), best, rtol=1e-9)
        assert _cost(paired, x1) <= _cost(x0, x1) + 1e-9
        assert torch.equal(paired.sort(dim=0).values, x0.sort(dim=0).values)  # the same rows, reordered


@pytest.mark.parametrize("device", DEVICES, ids=str)
def test_ot_coupling_follows_the_device_and_flattens_images(device):
    g = torch.Generator().manual_seed(0)
    x1 = torch.randn(64, 1, 2, 2, generator=g).to(device)
    x0 = x1[torch.randperm(64, generator=g).to(device)] + 1e-3  # the optimal pairing undoes the shuffle
    paired = fm.ot_coupling(x0, x1)
    assert paired.device == x0.device and torch.allclose(paired, x1 + 1e-3)


def test_ot_coupling_refuses_bad_input():
    x = torch.randn(4, 2)
    for args, match in (((x, x[:3]), "same shape"), ((x, x.long()), "floating-point"),
                        ((x[:, 0], x[:, 0]), r"\(B, \*S\)"), ((x, x.clone().fill_(math.nan)), "NaN")):
        with pytest.raises(ValueError, match=match):
            fm.ot_coupling(*args)


# ------------------------------------------------------------------------------------------------ sampling
def test_euler_sampling_is_the_hand_written_loop():
    field = fm.gaussian_marginal_field(fm.LinearPath(), 0.0, 1.0, 2.0, 0.5)
    x0 = torch.randn(100, 1, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    x, times = x0, torch.linspace(0, 1, 8, dtype=torch.float64).tolist()
    for a, b in zip(times[:-1], times[1:]):
        x = torch.add(x, field(torch.tensor(a, dtype=torch.float64), x), alpha=b - a)  # odeint's own rounding
    x1, stats = fm.sample(field, x0, method="euler", steps=7, return_stats=True)
    assert torch.equal(x1, x) and stats.nfe == 7
    exact = 2 + 0.5 * x0
    errors = [(fm.sample(field, x0, method="euler", steps=k) - exact).abs().max() for k in (8, 16)]
    assert 1.8 < errors[0] / errors[1] < 2.2  # first order


def test_sample_refuses_bad_steps():
    field, x0 = (lambda t, x: -x), torch.randn(3, 2)
    for kwargs, match in (({"method": "dopri5", "steps": 4}, "fixed-step"), ({"method": "euler"}, "needs steps"),
                          ({"method": "euler", "steps": 0}, "positive int"), ({"method": "rk45"}, "unknown method")):
        with pytest.raises(ValueError, match=match):
            fm.sample(field, x0, **kwargs)
    assert fm.sample(field, x0, method="euler", options={"step_size": 0.5}).shape == x0.shape


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_straightness_of_a_line_and_of_a_rotation(dtype):
    x0 = torch.randn(10, 2, generator=torch.Generator().manual_seed(0), dtype=dtype)
    velocity = torch.tensor([1.0, -2.0], dtype=dtype)
    assert fm.straightness(lambda t, x: velocity.expand_as(x), x0, "euler", steps=1).abs().max() < 1e-5
    # x' = (x2, -x1) for one time unit: speed r, chord 2 r sin(1/2), so S = r^2 (1 - 4 sin^2(1/2)).
    rotation = lambda t, x: torch.stack([x[:, 1], -x[:, 0]], dim=1)  # noqa: E731
    tol = 1e-9 if dtype == torch.float64 else 1e-5
    s = fm.straightness(rotation, x0, rtol=tol, atol=tol)
    expected = (x0**2).sum(dim=1) * (1 - 4 * math.sin(0.5)**2)
    assert s.dtype == dtype and torch.allclose(s, expected, rtol=100 * tol, atol=100 * tol)
