"""Small statistics for comparing classifiers on one test set: an interval for an error rate, an
exact paired test for two classifiers, and how many test images a given difference would need.

With ``n`` test images one mistake moves the error by ``1/n``; these helpers say what a measured
difference can and cannot support. Pure Python (``math`` and ``statistics``), no SciPy needed.
"""

from __future__ import annotations

import math
from statistics import NormalDist
from typing import NamedTuple, Sequence, Tuple, Union

import numpy as np

__all__ = ["wilson_interval", "McNemarResult", "mcnemar_exact", "mcnemar_sample_size"]

ArrayLike = Union[Sequence[bool], np.ndarray]


def wilson_interval(k: int, n: int, confidence: float = 0.95) -> Tuple[float, float]:
    """Wilson score interval for a binomial proportion: ``k`` successes (e.g. test errors) in ``n``.

    With :math:`\\hat p = k/n` and :math:`z` the standard normal quantile of
    :math:`(1 + \\text{confidence})/2`,

    .. math::

        \\frac{\\hat p + \\frac{z^2}{2n} \\pm z \\sqrt{\\frac{\\hat p(1-\\hat p)}{n} + \\frac{z^2}{4n^2}}}
             {1 + \\frac{z^2}{n}} .

    Unlike the normal ("Wald") interval it stays inside [0, 1] and is not empty at ``k = 0``, which
    matters for error rates of a few mistakes. Same as ``scipy.stats.binomtest(k, n)
    .proportion_ci(confidence, method="wilson")``.

    Args:
        k: number of successes, ``0 <= k <= n``.
        n: number of trials, ``n >= 1``.
        confidence: the interval's coverage, in (0, 1).

    Returns:
        ``(low, high)``, floats in [0, 1].
    """
    if n < 1 or not 0 <= k <= n:
        raise ValueError(f"wilson_interval: need 0 <= k <= n and n >= 1, got k={k}, n={n}.")
    if not 0 < confidence < 1:
        raise ValueError(f"wilson_interval: confidence must be in (0, 1), got {confidence}.")
    z = NormalDist().inv_cdf((1 + confidence) / 2)
    p = k / n
    denominator = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denominator
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denominator
    low = 0.0 if k == 0 else max(0.0, centre - half)      # exact ends: rounding would leave 1e-17
    high = 1.0 if k == n else min(1.0, centre + half)
    return low, high


class McNemarResult(NamedTuple):
    """The outcome of :func:`mcnemar_exact`.

    Attributes:
        only_a: images classifier A gets right and B wrong (discordant pairs ``b``).
        only_b: images B gets right and A wrong (discordant pairs ``c``).
        pvalue: two-sided exact p-value for "A and B have the same error rate".
    """
    only_a: int
    only_b: int
    pvalue: float


def mcnemar_exact(correct_a: ArrayLike, correct_b: ArrayLike) -> McNemarResult:
    """Exact McNemar test: do two classifiers, scored on the same images, differ in error rate?

    Only the discordant images count: ``b`` where A is right and B wrong, ``c`` the reverse.
    Under the null hypothesis each discordant image is equally likely to go either way, so
    :math:`b \\sim \\text{Binomial}(b + c, 1/2)` and the two-sided p-value is

    .. math::

        p = \\min\\Big(1,\\ 2 \\sum_{i=0}^{\\min(b, c)} \\binom{b+c}{i} 2^{-(b+c)}\\Big) ,

    which is 1 when ``b + c = 0``. Images both get right (or both wrong) carry no information about
    the difference and do not enter. Same as ``scipy.stats.binomtest(b, b + c, 0.5).pvalue``.

    Args:
        correct_a, correct_b: booleans of shape ``(N,)``, whether A (resp. B) classified test image
            ``i`` correctly; the same images in the same order.

    Returns:
        A :class:`McNemarResult` ``(only_a, only_b, pvalue)``.
    """
    a = np.asarray(correct_a, dtype=bool)
    b_ = np.asarray(correct_b, dtype=bool)
    if a.ndim != 1 or a.shape != b_.shape:
        raise ValueError(f"mcnemar_exact: need two boolean vectors of the same length, got shapes "
                         f"{a.shape} and {b_.shape}.")
    only_a = int(np.sum(a & ~b_))
    only_b = int(np.sum(~a & b_))
    m = only_a + only_b
    if m == 0:
        return McNemarResult(0, 0, 1.0)
    tail = sum(math.comb(m, i) for i in range(min(only_a, only_b) + 1)) / 2 ** m
    return McNemarResult(only_a, only_b, min(1.0, 2 * tail))


def mcnemar_sample_size(difference: float, discordant: float, alpha: float = 0.05,
                        power: float = 0.8) -> int:
    """Test images a paired (McNemar) comparison needs to detect a difference in error rate.

    For two classifiers whose error rates differ by :math:`\\delta` = ``difference`` and disagree
    on a fraction :math:`\\psi` = ``discordant`` of the images (:math:`\\psi \\ge |\\delta|`), the
    normal approximation of Connor (1987) gives

    .. math::

        n = \\frac{\\big(z_{1-\\alpha/2} \\sqrt{\\psi} + z_{1-\\beta} \\sqrt{\\psi - \\delta^2}\\big)^2}{\\delta^2}

    images for a two-sided test at level :math:`\\alpha` with power :math:`1 - \\beta`.

    Args:
        difference: the difference of the two error rates, a fraction (0.0001 is 0.01 points).
        discordant: the fraction of images on which the two classifiers disagree.
        alpha: the test's level.
        power: the probability of detecting the difference when it is there.

    Returns:
        The number of test images, rounded up.
    """
    delta = abs(difference)
    if delta == 0 or not delta <= discordant <= 1:
        raise ValueError(f"mcnemar_sample_size: need 0 < |difference| <= discordant <= 1, got "
                         f"difference={difference}, discordant={discordant}.")
    z_alpha = NormalDist().inv_cdf(1 - alpha / 2)
    z_beta = NormalDist().inv_cdf(power)
    n = (z_alpha * math.sqrt(discordant) + z_beta * math.sqrt(discordant - delta * delta)) ** 2 / delta ** 2
    return math.ceil(n)
