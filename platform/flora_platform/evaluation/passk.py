"""pass@k: the unbiased estimator of Chen et al. (2021), as MultiPL-E and the paper use it.

For one problem with n samples of which c pass, the probability that at least one of k samples
drawn without replacement passes:

    pass@k = 1 - C(n - c, k) / C(n, k)        (= 1 when n - c < k: every k-subset holds a pass)

computed as 1 - prod_{i = n-c+1}^{n} (1 - k / i), which never forms the huge binomials. A
benchmark's pass@k is the mean over its problems.
"""

from __future__ import annotations

import math
from collections.abc import Iterable


def pass_at_k(n: int, c: int, k: int) -> float:
    """Estimated pass@k of one problem from n samples, c of them passing."""
    if not (isinstance(n, int) and isinstance(c, int) and isinstance(k, int)):
        raise TypeError(f"n, c and k must be ints, got {n!r}, {c!r}, {k!r}")
    if not 0 <= c <= n:
        raise ValueError(f"need 0 <= c <= n, got c={c}, n={n}")
    if not 1 <= k <= n:
        raise ValueError(f"need 1 <= k <= n (k samples out of n), got k={k}, n={n}; draw more samples or lower k")
    if n - c < k:
        return 1.0
    return 1.0 - math.prod(1.0 - k / i for i in range(n - c + 1, n + 1))


def mean_pass_at_k(counts: Iterable[tuple[int, int]], k: int) -> float:
    """Mean pass@k over problems given as (n, c) pairs; NaN when there are none."""
    values = [pass_at_k(n, c, k) for n, c in counts]
    return sum(values) / len(values) if values else float("nan")
