import math

import numpy as np
import pytest

from neuralode import stats

scipy_stats = pytest.importorskip("scipy.stats")


@pytest.mark.parametrize("k, n", [(0, 10), (1, 359), (4, 1000), (42, 100), (1000, 1000)])
@pytest.mark.parametrize("confidence", [0.9, 0.95])
def test_wilson_interval_matches_scipy(k, n, confidence):
    expected = scipy_stats.binomtest(k, n).proportion_ci(confidence, method="wilson")
    low, high = stats.wilson_interval(k, n, confidence)
    assert low == pytest.approx(expected.low, abs=1e-12) and high == pytest.approx(expected.high, abs=1e-12)
    assert 0 <= low <= k / n <= high <= 1


def test_wilson_interval_known_value_and_bad_arguments():
    # 4 errors in 1,000 images: the textbook Wilson interval is about [0.16%, 1.02%].
    low, high = stats.wilson_interval(4, 1000)
    assert (round(100 * low, 2), round(100 * high, 2)) == (0.16, 1.02)
    for k, n in ((-1, 10), (11, 10), (0, 0)):
        with pytest.raises(ValueError, match="0 <= k <= n"):
            stats.wilson_interval(k, n)


def _pairs(both_right, only_a, only_b, both_wrong):
    a = [True] * both_right + [True] * only_a + [False] * only_b + [False] * both_wrong
    b = [True] * both_right + [False] * only_a + [True] * only_b + [False] * both_wrong
    return np.array(a), np.array(b)


@pytest.mark.parametrize("only_a, only_b", [(0, 0), (3, 0), (5, 2), (7, 19), (30, 30), (1, 40)])
def test_mcnemar_exact_matches_scipy_binomtest(only_a, only_b):
    a, b = _pairs(900, only_a, only_b, 11)
    result = stats.mcnemar_exact(a, b)
    assert (result.only_a, result.only_b) == (only_a, only_b)
    expected = 1.0 if only_a + only_b == 0 else scipy_stats.binomtest(only_a, only_a + only_b, 0.5).pvalue
    assert result.pvalue == pytest.approx(expected, rel=1e-12)


def test_mcnemar_exact_ignores_concordant_pairs():
    # A bug that counted the images both get right (or both wrong) as ties would change the
    # p-value when only concordant images are added; the exact test must not move.
    base = stats.mcnemar_exact(*_pairs(10, 8, 1, 0)).pvalue
    assert base == pytest.approx(2 * (1 + 9) / 2 ** 9)             # 2 P(X <= 1), X ~ Bin(9, 1/2)
    for extra_right, extra_wrong in ((1000, 0), (0, 500), (5000, 5000)):
        assert stats.mcnemar_exact(*_pairs(10 + extra_right, 8, 1, extra_wrong)).pvalue == base
    # Symmetric in the two classifiers, and a swap exchanges the discordant counts.
    a, b = _pairs(10, 8, 1, 0)
    swapped = stats.mcnemar_exact(b, a)
    assert (swapped.only_a, swapped.only_b, swapped.pvalue) == (1, 8, base)


def test_mcnemar_exact_rejects_mismatched_inputs():
    with pytest.raises(ValueError, match="same length"):
        stats.mcnemar_exact([True, False], [True])


def test_mcnemar_sample_size():
    # Connor (1987): delta = 0.1, psi = 0.3, alpha = 0.05, power 0.8 gives about 234 pairs.
    z_a, z_b = 1.959963984540054, 0.8416212335729143
    expected = math.ceil((z_a * math.sqrt(0.3) + z_b * math.sqrt(0.3 - 0.01)) ** 2 / 0.01)
    assert stats.mcnemar_sample_size(0.1, 0.3) == expected == 234
    # A ten times smaller difference at the same discordance needs about a hundred times more.
    assert 90 < stats.mcnemar_sample_size(0.01, 0.3) / expected < 110
    with pytest.raises(ValueError, match="discordant"):
        stats.mcnemar_sample_size(0.2, 0.1)
