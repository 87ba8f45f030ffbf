"""The one integration loop and its registry: no import cycle, methods are plug-ins, hooks see
every accepted step, and the batched dense output is the per-time formula."""

from __future__ import annotations

import ast
import math
from fractions import Fraction
from pathlib import Path

import numpy as np
import pytest
import torch

import neuralode as node
from neuralode import _methods
from neuralode._loop import FIXED_OPTIONS, FixedSteps, SolverStats, StepControl, integrate, rms_norm
from neuralode._rk import ExplicitRK

PACKAGE = Path(node.__file__).parent
F64 = torch.float64


def _imports(module: Path) -> set[str]:
    """The package's own modules that ``module`` imports (``from . import x``, ``from .x import y``)."""
    found = set()
    for item in ast.walk(ast.parse(module.read_text(encoding="utf-8"))):
        if isinstance(item, ast.ImportFrom) and item.level == 1:
            if item.module:
                found.add(item.module.split(".")[0])
            else:
                found.update(alias.name for alias in item.names)
    return found


def test_the_library_has_no_import_cycle():
    graph = {p.stem: _imports(p) for p in PACKAGE.glob("*.py") if p.stem != "__init__"}
    state: dict[str, str] = {}

    def visit(name: str, path: list[str]) -> None:
        if state.get(name) == "done":
            return
        assert state.get(name) != "open", "import cycle: " + " -> ".join(path + [name])
        state[name] = "open"
        for dep in sorted(graph.get(name, ())):
            visit(dep, path + [name])
        state[name] = "done"

    for name in graph:
        visit(name, [])
    # The steppers know the loop, not each other or the registry; the loop knows no stepper.
    assert not {"_rosenbrock", "_methods", "_odeint"} & graph["_rk"]
    assert not {"_rk", "_methods", "_odeint"} & graph["_rosenbrock"]
    assert not {"_rk", "_rosenbrock", "_methods", "_odeint", "adjoint"} & graph["_loop"]


def test_the_registry_is_built_in_one_place_and_lists_every_method():
    assert node.TABLEAUS is _methods.TABLEAUS and node.METHODS == tuple(_methods.REGISTRY)
    assert set(node.TABLEAUS) == set(node.METHODS) and node.METHODS[-1] == "rodas4"
    from neuralode import _tableaus

    assert not hasattr(_tableaus, "TABLEAUS")  # the explicit tableaux alone are EXPLICIT_TABLEAUS
    assert set(_tableaus.EXPLICIT_TABLEAUS) == set(node.METHODS) - {"rodas4"}


def test_a_new_explicit_method_is_a_tableau_and_a_registry_entry(monkeypatch):
    # Ralston's third-order method (Ralston 1962), not one of ours: c = (0, 1/2, 3/4).
    F = Fraction
    ralston = node.ButcherTableau(name="ralston3", order=3, c=(F(0), F(1, 2), F(3, 4)),
                                  a=((F(1, 2),), (F(0), F(3, 4))), b=(F(2, 9), F(1, 3), F(4, 9)))
    monkeypatch.setitem(_methods.REGISTRY, "ralston3", _methods.Method(ralston, ExplicitRK, FIXED_OPTIONS))
    y0 = torch.tensor([1.0, 0.5], dtype=F64)
    errors = []
    for h in (0.1, 0.05):
        ys = node.odeint(lambda t, y: -y * torch.cos(t), y0, [0.0, 2.0], method="ralston3", options={"step_size": h})
        errors.append((ys[-1] - y0 * math.exp(-math.sin(2.0))).abs().max().item())
    assert 2.7 < math.log2(errors[0] / errors[1]) < 3.3, errors  # third order, as its tableau says


@pytest.mark.parametrize("method", ["dopri5", "rodas4", "rk4"])
def test_hooks_see_every_accepted_step_and_its_dense_output(method):
    def f(t, y):
        return torch.stack([y[1], -y[0]])

    y0 = torch.tensor([1.0, 0.0], dtype=F64)
    t_out = [0.0, 0.7, 2.0]
    entry = _methods.REGISTRY[method]
    options = {**entry.defaults, **({"step_size": 0.1} if not entry.adaptive else {})}
    stats = SolverStats()
    seen = []

    def hook(step, interpolate):
        ends = interpolate([1e-12, 0.5, 1.0 - 1e-12])
        assert ends.shape == (3, 2)
        # The dense output runs from the step's start to its end, through the exact solution.
        assert torch.allclose(ends[0], step.y, atol=1e-9) and torch.allclose(ends[2], step.y1, atol=1e-9)
        exact_mid = torch.tensor([math.cos(step.t + step.h / 2), -math.sin(step.t + step.h / 2)], dtype=F64)
        assert torch.allclose(ends[1], exact_mid, atol=1e-4)
        seen.append(step.t1)

    ys = _methods.solve(entry, lambda s, y: (setattr(stats, "nfe", stats.nfe + 1), f(s, y))[1], y0, t_out,
                        rtol=1e-8, atol=1e-10, norm=rms_norm, options=options, stats=stats, on_accept=[hook])
    assert seen == stats.step_times and len(seen) == stats.n_accepted > 2
    assert ys.shape == (3, 2) and torch.allclose(ys[-1], torch.tensor([math.cos(2.0), -math.sin(2.0)], dtype=F64),
                                                 atol=1e-4)


def test_batched_dense_output_is_the_continuous_extension_at_each_time():
    # dopri5's outputs between steps, evaluated together as one matrix product, agree with its
    # continuous extension y + h sum_i b_i(theta) k_i evaluated time by time in exact arithmetic
    # for the weights (independent code: the tableau's fractions).
    tab = node.TABLEAUS["dopri5"]
    stepper = ExplicitRK(tab, {}, SolverStats(), torch.Size([3]))

    def f(t, y):
        return math.sin(3 * t) - y**2

    y0 = torch.tensor([0.3, -0.2, 1.0], dtype=F64)
    stepper.start(f, 0.1, y0)
    step = stepper.attempt(f, 0.1, y0, 0.35)
    thetas = [0.125, 0.5, 0.9]
    batched = stepper.dense(f, step, thetas)
    for theta, row in zip(thetas, batched):
        weights = [float(sum(d * Fraction(theta) ** (m + 1) for m, d in enumerate(col))) for col in tab.dense]
        one = y0 + step.h * sum(w * k for w, k in zip(weights, step.ks))
        assert torch.allclose(row, one, rtol=0, atol=1e-15)


def test_fixed_steps_report_the_first_non_finite_step_once_per_solve():
    calls = []

    def f(t, y):
        calls.append(t)
        return torch.where(t > 0.45, torch.full_like(y, math.inf), -y)

    with pytest.raises(FloatingPointError, match=r"t=0\.6"):
        node.odeint(f, torch.ones(2, dtype=F64), [0.0, 1.0], method="euler", options={"step_size": 0.1})
    # Euler from 0.5 uses f(0.5) = inf: the state at t = 0.6 is the first that is not finite.


def test_integrate_with_a_hand_built_controller_matches_odeint():
    y0 = torch.tensor([1.0, 2.0], dtype=F64)
    t_out = [0.0, 0.5, 1.0]

    def f(t, y):
        return -2 * y

    stats = SolverStats()
    entry = _methods.REGISTRY["tsit5"]
    stepper = entry.stepper(entry.tableau, entry.defaults, stats, y0.shape)
    control = StepControl(entry.defaults, stepper, t_out, 1e-8, 1e-10, rms_norm, stats)
    ys = integrate(stepper, control, f, y0, t_out)
    reference, ref_stats = node.odeint(f, y0, t_out, method="tsit5", rtol=1e-8, atol=1e-10, return_stats=True)
    assert torch.equal(ys, reference) and stats.step_times == ref_stats.step_times
    grid = FixedSteps({"step_size": 0.3}, [0.0, 1.0], SolverStats())
    assert np.allclose([grid.point(i) for i in range(grid.n_steps + 1)], [0.0, 0.3, 0.6, 0.9, 1.0])


def test_rodas4_adjoint_integrates_the_parameter_adjoint_as_a_quadrature():
    # A small MLP: the backward rodas4 solve factorises the 2D x 2D Jacobian of [z, a] only, and
    # the parameters' gradient (a Gauss-Legendre quadrature along its steps) matches backprop
    # through a tight dopri5 solve.
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(3, 8), torch.nn.Tanh(), torch.nn.Linear(8, 3)).double()

    class Field(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.net = net

        def forward(self, t, y):
            return self.net(y) - 5.0 * y

    field = Field()
    y0 = torch.randn(3, dtype=F64, requires_grad=True)
    t = [0.0, 0.5, 1.0]
    params = [y0, *net.parameters()]
    reference = torch.autograd.grad(node.odeint(field, y0, t, rtol=1e-12, atol=1e-12).pow(2).sum(), params)
    sizes = []
    original = torch.linalg.lu_factor_ex

    def spy(matrix, *args, **kwargs):
        sizes.append(matrix.shape[-1])
        return original(matrix, *args, **kwargs)

    ys, stats = node.odeint_adjoint(field, y0, t, method="rodas4", rtol=1e-7, atol=1e-9, return_stats=True)
    torch.linalg.lu_factor_ex = spy
    try:
        grads = torch.autograd.grad(ys.pow(2).sum(), params)
    finally:
        torch.linalg.lu_factor_ex = original
    assert sizes and set(sizes) == {6}  # [z, a]: 2 x 3, not 6 + 59 parameters
    for g, r in zip(grads, reference):
        assert torch.allclose(g, r, rtol=1e-5, atol=1e-8), (g, r)
    assert stats.backward_n_accepted > 0


@pytest.mark.parametrize("method", ["dopri5", "rk4", "rodas4"])
def test_torchdiffeq_step_callbacks_are_called_as_torchdiffeq_calls_them(method):
    import torchdiffeq

    class Field(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.log = []

        def forward(self, t, y):
            return (-2.0 * y[0] + torch.sin(4 * t) * y[1], -y[1])

        def callback_step(self, t0, y0, dt):
            assert isinstance(y0, tuple) and t0.dim() == 0 and dt.dim() == 0
            self.log.append(("step", float(t0), float(dt)))

        def callback_accept_step(self, t0, y0, dt):
            self.log.append(("accept", float(t0), float(dt)))

        def callback_reject_step(self, t0, y0, dt):
            self.log.append(("reject", float(t0), float(dt)))

    y0 = (torch.tensor([1.0, 2.0], dtype=F64), torch.tensor(0.5, dtype=F64))
    options = {"step_size": 0.25} if method == "rk4" else {"first_step": 0.9}  # forces a rejection
    field = Field()
    _, stats = node.odeint(field, y0, [0.0, 1.0], method=method, options=options, return_stats=True)
    kinds = [k for k, _, _ in field.log]
    assert kinds.count("step") == stats.n_accepted + stats.n_rejected == len(kinds) // 2
    assert kinds.count("accept") == stats.n_accepted and kinds.count("reject") == stats.n_rejected
    accepted = [(t0, dt) for k, t0, dt in field.log if k == "accept"]
    assert [t0 + dt for t0, dt in accepted] == pytest.approx(stats.step_times, abs=1e-15)
    if method != "rk4":
        assert stats.n_rejected >= 1
    # The same Module runs under torchdiffeq unchanged, with the same kinds of call.
    if method == "dopri5":
        theirs = Field()
        torchdiffeq.odeint(theirs, y0, torch.tensor([0.0, 1.0], dtype=F64), method="dopri5",
                           options={"first_step": 0.9})
        assert {k for k, _, _ in theirs.log} == {"step", "accept", "reject"}
