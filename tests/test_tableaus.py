from fractions import Fraction

import pytest

import neuralode as node
from neuralode._tableaus import ButcherTableau


@pytest.mark.parametrize("name", node.METHODS)
def test_registry_tableaus_are_consistent(name):
    tab = node.TABLEAUS[name]
    assert tab.name == name
    for i, row in enumerate(tab.a, start=1):
        assert sum(row) == tab.c[i]
    assert sum(tab.b) == 1
    if tab.adaptive:
        assert sum(tab.b_error) == 0 and tab.error_order < tab.order


def _bad(**changes):
    kwargs = dict(name="bad", order=2, c=(Fraction(0), Fraction(1, 2)), a=((Fraction(1, 2),),),
                  b=(Fraction(0), Fraction(1)))
    kwargs.update(changes)
    return kwargs


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
