"""pass@k against the definition: exact binomials (math.comb, fractions) and hand-computed cases."""

import math
from fractions import Fraction

import pytest

from flora_platform.evaluation.passk import mean_pass_at_k, pass_at_k


def reference(n: int, c: int, k: int) -> Fraction:
    """1 - C(n-c, k) / C(n, k), exactly (math.comb is 0 when n - c < k)."""
    return 1 - Fraction(math.comb(n - c, k), math.comb(n, k))


@pytest.mark.parametrize("n,c,k,expected", [
    (1, 0, 1, 0.0),
    (1, 1, 1, 1.0),
    (10, 3, 1, 0.3),                  # pass@1 is the fraction of passing samples
    (5, 2, 2, 0.7),                   # 1 - C(3,2)/C(5,2) = 1 - 3/10
    (4, 1, 2, 0.5),                   # 1 - C(3,2)/C(4,2) = 1 - 3/6
    (6, 0, 3, 0.0),
    (10, 8, 3, 1.0),                  # n - c = 2 < k: every 3-subset holds a pass
    (3, 1, 3, 1.0),                   # n - c = 2 < k = 3
    (100, 1, 10, 0.1),                # 1 - C(99,10)/C(100,10) = 10/100
    (20, 5, 10, 1 - 3003 / 184756),   # C(15,10) = 3003, C(20,10) = 184756
])
def test_hand_computed_cases(n, c, k, expected):
    assert pass_at_k(n, c, k) == pytest.approx(expected, abs=1e-12)
    assert pass_at_k(n, c, k) == pytest.approx(float(reference(n, c, k)), abs=1e-12)


def test_matches_the_exact_binomial_form_everywhere():
    for n in range(1, 25):
        for c in range(n + 1):
            for k in range(1, n + 1):
                assert pass_at_k(n, c, k) == pytest.approx(float(reference(n, c, k)), abs=1e-12), (n, c, k)


def test_large_n_does_not_overflow():
    # C(1000, 500) has 300 digits: the product form never builds it.
    assert pass_at_k(1000, 1, 500) == pytest.approx(0.5)


def test_mean_over_problems_and_bad_arguments():
    assert mean_pass_at_k([(10, 3), (10, 0), (10, 10)], 1) == pytest.approx((0.3 + 0 + 1) / 3)
    assert math.isnan(mean_pass_at_k([], 1))
    with pytest.raises(ValueError, match="c <= n"):
        pass_at_k(5, 6, 1)
    with pytest.raises(ValueError, match="draw more samples"):
        pass_at_k(5, 1, 6)
    with pytest.raises(ValueError, match="k <= n"):
        pass_at_k(5, 1, 0)
