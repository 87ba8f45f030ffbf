import math
from fractions import Fraction

import numpy as np
import pytest
import torch
import torchdiffeq

import neuralode as node
from neuralode._tableaus import ButcherTableau


@pytest.mark.parametrize("name", node.METHODS)
def test_registry_tableaus_are_consistent(name):
    tab = node.TABLEAUS[name]
    assert tab.name == name
    exact = all(x.denominator < 10**12 for x in tab.b)  # published as fractions, not decimals
    tol = 0 if exact else 1e-14
    for i, row in enumerate(tab.a, start=1):
        assert abs(sum(row) - tab.c[i]) <= tol
    assert abs(sum(tab.b) - 1) <= tol
    if tab.adaptive:
        assert abs(sum(tab.b_error)) <= tol and tab.error_order < tab.order
    if isinstance(tab, node.ButcherTableau) and tab.dense is not None:
        assert all(abs(sum(d) - b) <= tol for d, b in zip(tab.dense, tab.b))


def _bad(**changes):
    kwargs = dict(name="bad", order=2, c=(Fraction(0), Fraction(1, 2)), a=((Fraction(1, 2),),),
                  b=(Fraction(0), Fraction(1)))
    kwargs.update(changes)
    return kwargs


def test_dopri5_dense_output_passes_through_the_midpoint_value():
    # Shampine's midpoint weights, as the per-stage polynomials evaluate them at theta = 1/2.
    tab = node.TABLEAUS["dopri5"]
    at_half = [sum(d * Fraction(1, 2) ** (m + 1) for m, d in enumerate(row)) for row in tab.dense]
    assert at_half[0] == Fraction(6025192743, 30085553152) / 2
    assert at_half[-1] == Fraction(11237099, 235043384) / 2


def test_a_valid_tableau_builds():
    assert ButcherTableau(**_bad()).stages == 2


@pytest.mark.parametrize("changes, message", [
    (dict(a=((Fraction(1, 3),),)), "sums to 1/3"),
    (dict(b=(Fraction(1, 2), Fraction(1, 3))), "summing to 1"),
    (dict(c=(Fraction(1), Fraction(1, 2))), "c\\[0\\] must be 0"),
    (dict(b_error=(Fraction(1), Fraction(0)), error_order=1), "summing to 0"),
    (dict(b_error=(Fraction(1), Fraction(-1))), "go together"),
    (dict(a=()), "needs 1 rows"),
])
def test_inconsistent_tableaus_are_refused(changes, message):
    with pytest.raises(ValueError, match=message):
        ButcherTableau(**_bad(**changes))


# --- heun3 and rk4_38, torchdiffeq's fixed-step methods (issue 17) ---------------------------------

F64 = torch.float64
EXPLICIT = [name for name in node.METHODS if isinstance(node.TABLEAUS[name], ButcherTableau)]


def _order_conditions(tab):
    """The eight conditions through order 4 (HNW I, section II.2) as {order: [(lhs, rhs)]}, exact."""
    s, b, c = tab.stages, list(tab.b), list(tab.c)
    A = [[tab.a[i - 1][j] if j < i else 0 for j in range(s)] for i in range(s)]
    dot = lambda u, v: sum(x * y for x, y in zip(u, v))  # noqa: E731
    Ac = [dot(row, c) for row in A]
    return {1: [(sum(b), 1)],
            2: [(dot(b, c), Fraction(1, 2))],
            3: [(dot(b, [x**2 for x in c]), Fraction(1, 3)), (dot(b, Ac), Fraction(1, 6))],
            4: [(dot(b, [x**3 for x in c]), Fraction(1, 4)), (dot(b, [x * y for x, y in zip(c, Ac)]), Fraction(1, 8)),
                (dot(b, [dot(row, [x**2 for x in c]) for row in A]), Fraction(1, 12)),
                (dot(b, [dot(row, Ac) for row in A]), Fraction(1, 24))]}


def _order_from_conditions(tab, tol=Fraction(1, 10**12)):
    order = 0
    for p, conditions in _order_conditions(tab).items():
        if not all(abs(lhs - rhs) <= tol for lhs, rhs in conditions):
            break
        order = p
    return order


@pytest.mark.parametrize("name, order", [("heun3", 3), ("rk4", 4), ("rk4_38", 4)])
def test_order_conditions_give_the_order(name, order):
    tab = node.TABLEAUS[name]
    assert all(isinstance(x, Fraction) for x in tab.b + tab.c)
    assert _order_from_conditions(tab) == order == tab.order
    if order == 3:  # exactly 3: some order-4 condition fails
        assert any(lhs != rhs for lhs, rhs in _order_conditions(tab)[4])


@pytest.mark.parametrize("name", EXPLICIT)
def test_every_explicit_tableau_meets_the_conditions_of_its_order(name):
    tab = node.TABLEAUS[name]
    assert _order_from_conditions(tab) == min(tab.order, 4)


def test_registry_places_the_new_fixed_step_methods():
    methods = list(node.METHODS)
    assert methods.index("heun3") == methods.index("heun2") + 1
    assert methods.index("rk4_38") == methods.index("rk4") + 1
    assert not node.TABLEAUS["heun3"].adaptive and not node.TABLEAUS["rk4_38"].adaptive


def test_rk4_38_has_rk4s_stability_function():
    # R is a polynomial of degree <= 4 matching e^z through z^4: the same for every 4-stage order-4 method.
    z = np.linspace(-4, 1, 11)[:, None] + 1j * np.linspace(-3, 3, 7)[None, :]
    rk4, rk4_38 = node.TABLEAUS["rk4"].stability_function(z), node.TABLEAUS["rk4_38"].stability_function(z)
    assert np.allclose(rk4, rk4_38, rtol=1e-14, atol=1e-14)
    assert np.allclose(node.TABLEAUS["heun3"].stability_function(z), 1 + z + z**2 / 2 + z**3 / 6, rtol=1e-14, atol=1e-14)


def _cosine(t, y):
    return torch.cos(t) * y


def _cosine_exact(t1, y0):
    return y0 * math.exp(math.sin(t1))


@pytest.mark.parametrize("name, order", [("heun3", 3), ("rk4_38", 4)])
def test_observed_order_from_halving_the_step(name, order):
    # y' = -2 t y, y = y0 exp(-t^2) on [0, 2]: non-autonomous, so the nodes c_i matter too.
    y0 = torch.tensor([1.0, -0.5], dtype=F64)
    exact = y0 * math.exp(-4.0)
    errors = []
    for n in (32, 64, 128):
        ys = node.odeint(lambda t, y: -2 * t * y, y0, [0.0, 2.0], method=name, options={"step_size": 2.0 / n})
        errors.append((ys[-1] - exact).abs().max().item())
    observed = [math.log2(e0 / e1) for e0, e1 in zip(errors, errors[1:])]  # 2^p per halving
    assert all(abs(p - order) < 0.15 for p in observed), (name, errors, observed)


@pytest.mark.parametrize("ours, theirs", [("heun3", "heun3"), ("rk4_38", "rk4")])
def test_matches_torchdiffeq_on_the_step_grid(ours, theirs):
    # t is the step grid: no interpolation, just the steps, which must agree to rounding.
    y0 = torch.tensor([1.0, -2.0, 0.5], dtype=F64)
    t = torch.linspace(0.0, 4.0, 41, dtype=F64)
    a = node.odeint(_cosine, y0, t, method=ours)
    b = torchdiffeq.odeint(_cosine, y0, t, method=theirs)
    assert torch.allclose(a, b, rtol=1e-13, atol=1e-13), (a - b).abs().max()


@pytest.mark.parametrize("ours, theirs", [("heun3", "heun3"), ("rk4_38", "rk4")])
def test_outputs_inside_steps_match_torchdiffeqs_cubic_interpolation(ours, theirs):
    # Fixed-step methods without a continuous extension of their own use the cubic Hermite
    # interpolant, as torchdiffeq does with interp="cubic".
    y0 = torch.tensor([1.0, -2.0], dtype=F64)
    t = torch.tensor([0.0, 0.13, 0.5, 1.27, 2.0], dtype=F64)
    a = node.odeint(_cosine, y0, t, method=ours, options={"step_size": 0.1})
    b = torchdiffeq.odeint(_cosine, y0, t, method=theirs, options={"step_size": 0.1, "interp": "cubic"})
    assert torch.allclose(a, b, rtol=1e-13, atol=1e-13), (a - b).abs().max()
    exact = torch.stack([_cosine_exact(s, y0) for s in t.tolist()])
    assert (a - exact).abs().max() < 1e-3  # third-order interpolant, h = 0.1


def test_our_rk4_is_not_torchdiffeqs_rk4():
    # The classical scheme and the 3/8 rule differ by far more than rounding: a mix-up would show.
    y0 = torch.tensor([1.0, -2.0, 0.5], dtype=F64)
    t = torch.linspace(0.0, 4.0, 41, dtype=F64)
    theirs = torchdiffeq.odeint(_cosine, y0, t, method="rk4")
    gap = (node.odeint(_cosine, y0, t, method="rk4") - theirs).abs().max().item()
    rounding = (node.odeint(_cosine, y0, t, method="rk4_38") - theirs).abs().max().item()
    assert gap > 1e-8 and gap > 1e4 * rounding, (gap, rounding)


@pytest.mark.parametrize("ours, theirs", [("heun3", "heun3"), ("rk4_38", "rk4")])
def test_float32(ours, theirs):
    y0 = torch.tensor([1.0, -2.0], dtype=torch.float32)
    t = torch.linspace(0.0, 4.0, 41, dtype=torch.float32)
    a = node.odeint(_cosine, y0, t, method=ours)
    assert a.dtype == torch.float32 and torch.isfinite(a).all()
    a64 = node.odeint(_cosine, y0.double(), t.double(), method=ours)
    assert torch.allclose(a.double(), a64, rtol=1e-5, atol=1e-5)
    b = torchdiffeq.odeint(_cosine, y0, t, method=theirs)
    assert torch.allclose(a, b, rtol=1e-5, atol=1e-5)
