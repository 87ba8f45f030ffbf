"""odeint_adjoint: gradients equal backprop's, finite differences agree, memory stays flat."""

import pytest
import torch

import neuralode as node
from problems import DEVICES

T = [0.0, 0.3, 0.7, 1.0]


def _model(dtype=torch.float64, device="cpu", seed=0, hidden=16):
    torch.manual_seed(seed)
    return node.MLPDynamics(3, hidden=hidden, time_dependent=True).to(dtype=dtype, device=device)


def _gradients(solver, func, y0, t, loss=None, **kwargs):
    """dL/dy0 and dL/dtheta for a loss on several output times."""
    y0 = y0.detach().clone().requires_grad_(True)
    func.zero_grad()
    ys = solver(func, y0, t, **kwargs)
    value = (ys[1:] ** 2).sum() + ys[-1].sum() if loss is None else loss(ys)
    value.backward()
    return [y0.grad] + [p.grad.clone() for p in func.parameters()]


def _max_relative(gs, refs):
    return max(((g - r).abs().max() / r.abs().max()).item() for g, r in zip(gs, refs))


@pytest.mark.parametrize("variant", [{}, {"seminorm": True}, {"checkpoints": 1}, {"checkpoints": 3},
                                     {"adjoint_method": "tsit5"}])
@pytest.mark.parametrize("method", ["dopri5", "tsit5", "bosh3"])
def test_adjoint_matches_backprop_through_the_solver(method, variant):
    func, y0 = _model(), torch.randn(4, 3, dtype=torch.float64)
    tol = dict(rtol=1e-10, atol=1e-10) if method != "bosh3" else dict(rtol=1e-8, atol=1e-8)
    ref = _gradients(node.odeint, func, y0, T, method=method, **tol)
    got = _gradients(node.odeint_adjoint, func, y0, T, method=method, **tol, **variant)
    assert _max_relative(got, ref) < 1e-5


def test_one_checkpoint_reproduces_backprop_exactly():
    # One segment: the re-solve is the very computation the forward pass did.
    func, y0 = _model(), torch.randn(4, 3, dtype=torch.float64)
    ref = _gradients(node.odeint, func, y0, T, rtol=1e-6, atol=1e-6)
    got = _gradients(node.odeint_adjoint, func, y0, T, rtol=1e-6, atol=1e-6, checkpoints=1)
    assert all(torch.equal(g, r) for g, r in zip(got, ref))


@pytest.mark.parametrize("method", ["rk4", "dopri5"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
def test_adjoint_dtypes_and_fixed_step_methods(dtype, method):
    func, y0 = _model(dtype), torch.randn(4, 3, dtype=dtype)
    kwargs = dict(method=method, rtol=1e-6, atol=1e-6) if method == "dopri5" else \
        dict(method=method, options={"step_size": 0.01})
    ref = _gradients(node.odeint, func, y0, T, **kwargs)
    got = _gradients(node.odeint_adjoint, func, y0, T, **kwargs)
    assert all(g.dtype == dtype for g in got)
    assert _max_relative(got, ref) < (1e-3 if dtype == torch.float32 else 1e-5)


def test_gradcheck_in_float64_including_the_output_times():
    func = _model(hidden=4)
    params = tuple(func.parameters())

    def solve(y0, t, *ps):
        return node.odeint_adjoint(func, y0, t, rtol=1e-11, atol=1e-11, adjoint_params=ps)

    y0 = torch.randn(2, 3, dtype=torch.float64, requires_grad=True)
    t = torch.tensor([0.0, 0.4, 0.9], dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(solve, (y0, t) + params, eps=1e-6, atol=1e-5, rtol=1e-4)


def test_time_gradients_match_finite_differences_backwards_in_time():
    func = _model()
    y0 = torch.randn(2, 3, dtype=torch.float64)
    t = torch.tensor([1.0, 0.5, -0.2], dtype=torch.float64, requires_grad=True)
    ys = node.odeint_adjoint(func, y0, t, rtol=1e-11, atol=1e-11)
    (ys ** 2).sum().backward()
    eps = 1e-6
    for i in range(3):
        shift = torch.zeros(3, dtype=torch.float64)
        shift[i] = eps
        up = (node.odeint(func, y0, t.detach() + shift, rtol=1e-11, atol=1e-11) ** 2).sum()
        down = (node.odeint(func, y0, t.detach() - shift, rtol=1e-11, atol=1e-11) ** 2).sum()
        assert t.grad[i].item() == pytest.approx(((up - down) / (2 * eps)).item(), rel=1e-5, abs=1e-7)


def test_tuple_states_and_plain_functions():
    A = torch.tensor([[0.0, 1.0], [-1.0, -0.1]], dtype=torch.float64, requires_grad=True)
    c = torch.tensor(0.5, dtype=torch.float64, requires_grad=True)

    def f(t, state):
        x, s = state
        return x @ A.T, c * (x ** 2).sum(dim=-1)

    x0 = torch.randn(3, 2, dtype=torch.float64, requires_grad=True)
    s0 = torch.zeros(3, dtype=torch.float64)
    grads = {}
    for name, solver, extra in [("backprop", node.odeint, {}),
                                ("adjoint", node.odeint_adjoint, {"adjoint_params": (A, c)})]:
        xs, ss = solver(f, (x0, s0), T, rtol=1e-10, atol=1e-10, **extra)
        assert xs.shape == (4, 3, 2) and ss.shape == (4, 3)
        grads[name] = torch.autograd.grad(xs[-1].sum() + ss.sum(), (x0, A, c))
    assert _max_relative(grads["adjoint"], grads["backprop"]) < 1e-6


@pytest.mark.parametrize("device", DEVICES, ids=str)
def test_adjoint_follows_the_device(device):
    func, y0 = _model(device=device), torch.randn(4, 3, dtype=torch.float64, device=device)
    got = _gradients(node.odeint_adjoint, func, y0, T, rtol=1e-8, atol=1e-8)
    assert all(g.device == y0.device for g in got)


def _saved(solver, steps, **kwargs):
    func, y0 = _model(), torch.randn(8, 3, dtype=torch.float64)
    options = {"step_size": 1.0 / steps}
    return node.saved_tensor_bytes(lambda: solver(func, y0.requires_grad_(), [0.0, 1.0], method="rk4",
                                                   options=options, **kwargs))


def test_adjoint_memory_is_constant_in_the_number_of_steps_and_backprop_is_linear():
    adjoint = [_saved(node.odeint_adjoint, n) for n in (10, 200)]
    backprop = [_saved(node.odeint, n) for n in (10, 200)]
    assert adjoint[0] == adjoint[1] > 0
    assert backprop[1] / backprop[0] == pytest.approx(20, rel=0.1)
    assert backprop[1] > 50 * adjoint[1]


def test_checkpointed_memory_grows_with_the_checkpoints_not_the_steps():
    few = [_saved(node.odeint_adjoint, n, checkpoints=2) for n in (10, 200)]
    many = _saved(node.odeint_adjoint, 200, checkpoints=8)
    assert few[0] == few[1] < many


def test_checkpointing_repairs_the_backsolve_drift_on_lorenz():
    class Lorenz(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.p = torch.nn.Parameter(torch.tensor([10.0, 28.0, 8 / 3], dtype=torch.float64))

        def forward(self, t, y):
            sigma, rho, beta = self.p
            return torch.stack([sigma * (y[1] - y[0]), y[0] * (rho - y[2]) - y[1], y[0] * y[1] - beta * y[2]])

    func, y0 = Lorenz(), torch.ones(3, dtype=torch.float64)
    loss = lambda ys: ys[-1].sum()  # noqa: E731
    ref = torch.cat(_gradients(node.odeint, func, y0, [0.0, 1.0], loss, rtol=1e-12, atol=1e-12))
    error = {}
    for name, kwargs in [("backsolve", {}), ("checkpointed", {"checkpoints": 8})]:
        got = torch.cat(_gradients(node.odeint_adjoint, func, y0, [0.0, 1.0], loss, rtol=1e-6, atol=1e-6, **kwargs))
        error[name] = ((got - ref).norm() / ref.norm()).item()
    assert error["checkpointed"] < 1e-4, error
    assert error["backsolve"] > 100 * error["checkpointed"], error


def test_seminorm_saves_backward_steps():
    torch.manual_seed(0)
    func = node.MLPDynamics(2, hidden=64)
    y0 = torch.randn(64, 2)
    nfe = {}
    for seminorm in (False, True):
        ys, stats = node.odeint_adjoint(func, y0, [0.0, 2.0], rtol=1e-6, atol=1e-8, seminorm=seminorm,
                                        return_stats=True)
        ys[-1].pow(2).sum().backward()
        nfe[seminorm] = stats.backward_nfe
        assert stats.nfe > 0 and stats.backward_nfe > 0 and stats.backward_n_accepted > 0
    assert nfe[True] < nfe[False], nfe


def test_plain_function_needs_adjoint_params():
    with pytest.raises(ValueError, match="adjoint_params=\\(\\)"):
        node.odeint_adjoint(lambda t, y: -y, torch.ones(2), [0.0, 1.0])
    with pytest.raises(TypeError, match="adjoint_params\\[0\\] must be a tensor"):
        node.odeint_adjoint(lambda t, y: -y, torch.ones(2), [0.0, 1.0], adjoint_params=[1.0])
    y0 = torch.ones(2, requires_grad=True)
    node.odeint_adjoint(lambda t, y: -y, y0, [0.0, 1.0], adjoint_params=())[-1].sum().backward()
    assert torch.allclose(y0.grad, torch.full((2,), torch.exp(torch.tensor(-1.0)).item()), atol=1e-6)


@pytest.mark.parametrize("bad", [0, -2, 1.5, True])
def test_bad_checkpoints(bad):
    with pytest.raises(ValueError, match="checkpoints must be None or an integer >= 1"):
        node.odeint_adjoint(_model(), torch.ones(1, 3, dtype=torch.float64), [0.0, 1.0], checkpoints=bad)


def test_segments_snap_to_nearby_output_times():
    from neuralode.adjoint import _segments

    times = torch.linspace(0, 1, 11, dtype=torch.float64).tolist()
    segs = _segments(times, 5)
    ends = [grid[-1] for grid, _, _ in segs]
    assert ends == [times[2], times[4], times[6], times[8], times[10]]
    assert [last for _, _, last in segs] == [2, 4, 6, 8, 10]
    assert sorted(j for _, interior, last in segs for j in interior + [last]) == list(range(1, 11))


def test_peak_saved_bytes_sees_what_the_checkpointed_backward_builds():
    func, y0 = _model(), torch.randn(8, 3, dtype=torch.float64)

    def step(checkpoints, backward):
        def run():
            ys = node.odeint_adjoint(func, y0.requires_grad_(), [0.0, 1.0], method="rk4",
                                     options={"step_size": 1.0 / 64}, checkpoints=checkpoints)
            if backward:
                ys[-1].sum().backward()
        return run

    forward_only = node.saved_tensor_bytes(step(4, False), peak=True)
    with_backward = node.saved_tensor_bytes(step(4, True), peak=True)
    backprop = node.saved_tensor_bytes(lambda: node.odeint(func, y0, [0.0, 1.0], method="rk4",
                                                           options={"step_size": 1.0 / 64}), peak=True)
    # Re-solving one of four segments holds about a quarter of backprop's graph, and no more.
    assert forward_only < with_backward < 0.5 * backprop


@pytest.mark.parametrize("kwargs, message", [(dict(adjoint_method="rk45"), "unknown adjoint_method 'rk45'"),
                                             (dict(adjoint_rtol=-1.0), "adjoint_rtol must be"),
                                             (dict(adjoint_options={"step": 1}), "unknown option")])
def test_bad_backward_settings_name_the_adjoint_argument(kwargs, message):
    with pytest.raises(ValueError, match=message):
        node.odeint_adjoint(lambda t, y: -y, torch.ones(2), [0.0, 1.0], adjoint_params=(), **kwargs)


@pytest.mark.parametrize("method", ["dopri5", "rodas4"])
def test_checkpointed_resolve_replays_the_forward_steps(method):
    # The re-solve must take the forward's accepted steps, not choose steps again: with arithmetic that
    # differs by rounding (nondeterministic GPU kernels), an accept/reject decision at the margin
    # could otherwise flip and the gradient would belong to another discretisation. Here the
    # dynamics add a different tiny perturbation at every call, so that no two solves compute the
    # same numbers, and the forward solve has rejected steps that a replay must not repeat.
    calls = [0]
    a = torch.nn.Parameter(torch.tensor(2.0, dtype=torch.float64))

    def f(t, y):
        calls[0] += 1
        wobble = 1 + 1e-12 * (calls[0] % 7)
        return torch.stack([y[..., 1], -a * y[..., 0] * wobble + torch.sin(3 * t)], -1)

    y0 = torch.tensor([[1.0, 0.0], [0.5, 0.5]], dtype=torch.float64)
    ys, stats = node.odeint_adjoint(f, y0, [0.0, 6.0], method=method, rtol=1e-5, atol=1e-7, checkpoints=3,
                                    return_stats=True, adjoint_params=(a,))
    ys[-1].sum().backward()
    assert stats.n_rejected > 0, "the test needs a forward solve with rejected steps"
    assert (stats.backward_n_accepted, stats.backward_n_rejected) == (stats.n_accepted, 0)
    # And the gradient agrees with backprop through one solve of the whole interval (whose steps differ
    # from the three segments', hence the solver-tolerance agreement, not rounding).
    grad_adjoint = a.grad.clone()
    a.grad = None
    node.odeint(f, y0, [0.0, 6.0], method=method, rtol=1e-5, atol=1e-7)[-1].sum().backward()
    assert torch.allclose(grad_adjoint, a.grad, rtol=1e-4)
