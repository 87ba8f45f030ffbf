"""Bad input gets a clear error naming the argument; a solve that cannot finish fails fast."""

import time

import pytest
import torch

import neuralode as node

Y0 = torch.tensor([1.0, 2.0])


def rhs(t, y):
    return -y


@pytest.mark.parametrize("t, message", [
    ([0.0, 1.0, 0.5], "strictly increasing or strictly decreasing"),
    ([0.0, 1.0, 1.0], "strictly increasing or strictly decreasing"),
    ([[0.0, 1.0]], "1-D"),
    ([], "at least one time"),
    ([0.0, float("nan")], "NaN or inf"),
    ("soon", "t must be"),
])
def test_bad_times(t, message):
    with pytest.raises((ValueError, TypeError), match=message):
        node.odeint(rhs, Y0, t)


def test_complex_times_are_refused():
    with pytest.raises(TypeError, match="real numbers"):
        node.odeint(rhs, Y0, torch.tensor([0.0, 1.0], dtype=torch.complex64))


@pytest.mark.parametrize("y0, error, message", [
    (torch.tensor([1, 2]), TypeError, "floating point.*to\\(torch.float32\\)"),
    ([1.0, 2.0], TypeError, "y0\\[0\\] must be a torch.Tensor"),
    (3.0, TypeError, "y0 must be a torch.Tensor"),
    ((), ValueError, "empty tuple"),
    ((torch.zeros(2), torch.zeros(2, dtype=torch.float64)), ValueError, "y0\\[1\\] is torch.float64"),
])
def test_bad_states(y0, error, message):
    with pytest.raises(error, match=message):
        node.odeint(lambda t, y: y, y0, [0.0, 1.0])


def test_func_must_be_callable():
    with pytest.raises(TypeError, match="func must be callable"):
        node.odeint("f", Y0, [0.0, 1.0])


@pytest.mark.parametrize("method", node.METHODS)
def test_dynamics_of_the_wrong_shape(method):
    with pytest.raises(ValueError, match=r"returned shape \(3,\), but the state has shape \(2,\)"):
        node.odeint(lambda t, y: torch.zeros(3), Y0, [0.0, 1.0], method=method)


def test_dynamics_of_the_wrong_dtype_or_type():
    with pytest.raises(TypeError, match="returned dtype torch.float64"):
        node.odeint(lambda t, y: y.double(), Y0, [0.0, 1.0])
    with pytest.raises(TypeError, match="must return a tensor"):
        node.odeint(lambda t, y: 1.0, Y0, [0.0, 1.0])
    with pytest.raises(ValueError, match="must return a tuple of 2"):
        node.odeint(lambda t, y: y[0], (Y0, Y0), [0.0, 1.0])


def test_unknown_method_lists_the_valid_ones():
    with pytest.raises(ValueError, match="unknown method 'rk45'.*euler.*dopri5"):
        node.odeint(rhs, Y0, [0.0, 1.0], method="rk45")


@pytest.mark.parametrize("method, options, message", [
    ("dopri5", {"step_size": 0.1}, "unknown option.*step_size.*valid options.*first_step"),
    ("rk4", {"first_step": 0.1}, "unknown option.*valid options are \\['grid_constructor', 'interp', 'max_num_steps', 'perturb', 'step_size'\\]"),
    ("rk4", {"step_size": -0.1}, "must be positive"),
    ("rk4", {"step_size": "small"}, "must be a real number"),
    ("dopri5", {"dfactor": 2.0}, "dfactor"),
    ("dopri5", [("max_step", 1)], "options must be a dict"),
])
def test_bad_options(method, options, message):
    with pytest.raises((ValueError, TypeError), match=message):
        node.odeint(rhs, Y0, [0.0, 1.0], method=method, options=options)


@pytest.mark.parametrize("kwargs, message", [
    (dict(rtol=-1e-3), "rtol must be a finite number >= 0"),
    (dict(atol=float("inf")), "atol must be a finite number >= 0"),
    (dict(rtol="1e-3"), "rtol must be a real number"),
    (dict(rtol=0.0, atol=0.0), "cannot both be 0"),
])
def test_bad_tolerances(kwargs, message):
    with pytest.raises((ValueError, TypeError), match=message):
        node.odeint(rhs, Y0, [0.0, 1.0], **kwargs)


def test_blow_up_fails_fast_with_the_time():
    # y' = y^2, y(0) = 1 has y = 1 / (1 - t): it blows up at t = 1.
    start = time.perf_counter()
    with pytest.raises((RuntimeError, FloatingPointError), match=r"t=(0\.99|1\b|1\.0)"):
        node.odeint(lambda t, y: y**2, torch.ones(1, dtype=torch.float64), [0.0, 2.0])
    assert time.perf_counter() - start < 10


def test_min_step_is_enforced():
    with pytest.raises(RuntimeError, match="step size underflow.*min_step=0.1"):
        node.odeint(lambda t, y: y**2, torch.ones(1, dtype=torch.float64), [0.0, 2.0],
                    options={"min_step": 0.1})


@pytest.mark.parametrize("method", node.METHODS)
def test_non_finite_state_names_the_time(method):
    def f(t, y):
        return y / (0.5 - t) ** 0 if t < 0.5 else y * float("nan")

    options = None if node.TABLEAUS[method].adaptive else {"step_size": 0.1}
    with pytest.raises(FloatingPointError, match=r"NaN or inf.*t=0\.[5-7]|t=0\.[45].*NaN or inf"):
        node.odeint(f, Y0.double(), [0.0, 1.0], method=method, options=options)


def test_non_finite_initial_state_is_refused_at_once():
    with pytest.raises(FloatingPointError, match="initial state or its derivative.*t=0"):
        node.odeint(rhs, torch.tensor([1.0, float("nan")]), [0.0, 1.0])


def test_too_many_steps_fails_fast():
    with pytest.raises(RuntimeError, match=r"max_num_steps=5 reached at t=.*options=\{'max_num_steps'"):
        node.odeint(lambda t, y: torch.cos(50 * t) * y, Y0.double(), [0.0, 10.0],
                    options={"max_num_steps": 5})


def test_dynamics_on_another_device_are_named():
    # A tensor on another device than the state (here the "meta" device, which any machine has) is
    # reported with both devices, not left to fail somewhere inside the solver.
    with pytest.raises(RuntimeError, match="returned a tensor on meta, but the state is on cpu"):
        node.odeint(lambda t, y: torch.zeros_like(y, device="meta"), Y0, [0.0, 1.0])
    with pytest.raises(RuntimeError, match=r"func\(t, y\)\[1\] returned a tensor on meta"):
        node.odeint(lambda t, y: (y[0], torch.zeros_like(y[1], device="meta")), (Y0, Y0), [0.0, 1.0])


@pytest.mark.parametrize("method", ["dopri5", "rk4", "rodas4"])
@pytest.mark.parametrize("adjoint", [False, True])
def test_autocast_runs_the_dynamics_in_low_precision_and_keeps_the_state(method, adjoint):
    # Under torch.autocast an nn.Linear returns bfloat16 while the state is float32: the solver casts
    # each evaluation back (torchdiffeq's behaviour), instead of refusing the dtype. Outside autocast
    # the same mismatch stays an error (test above).
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(3, 16), torch.nn.Tanh(), torch.nn.Linear(16, 3))
    y0 = torch.randn(4, 3)
    solve = node.odeint_adjoint if adjoint else node.odeint
    kwargs = dict(adjoint_params=tuple(net.parameters())) if adjoint else {}
    options = {"step_size": 0.1} if method == "rk4" else None
    reference = solve(lambda t, y: net(y), y0, [0.0, 1.0], method=method, rtol=1e-3, atol=1e-4,
                      options=options, **kwargs)[-1]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = solve(lambda t, y: net(y), y0, [0.0, 1.0], method=method, rtol=1e-3, atol=1e-4,
                    options=options, **kwargs)[-1]
        assert net(y0).dtype == torch.bfloat16  # autocast is really on
    assert out.dtype == torch.float32
    assert (out - reference).abs().max() < 0.05   # bfloat16 keeps about 3 significant digits
    out.sum().backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in net.parameters())
