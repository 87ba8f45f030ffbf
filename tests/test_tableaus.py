from fractions import Fraction

import pytest

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
