"""The count, sum and sum of squares of floats, held exactly.

Every finite float is a dyadic rational, so scaled by a power of two it is an integer:
the sums are integers in units of ``2**-scale``, the scale growing (by exact shifts) only
when a value needs finer bits than any before it. Adding or removing a value is O(1) and
nothing drifts however many values come and go; the mean, the sample variance and the
population standard deviation are the correctly rounded values of the exact statistics,
bit-identical whatever order the values came in and whatever scale the sums are held in
(so a window rebuilt from its values after a restart gives the same statistics).
"""

from __future__ import annotations

import math

_ROOT_BITS = 64  # bits of the integer square root, beyond a double's 53


class ExactSums:
    """Exact sums of the values added and not removed."""

    __slots__ = ("count", "scale", "sum", "sum_sq")

    def __init__(self) -> None:
        self.count = 0
        self.scale = 0  # sums are in units of 2**-scale
        self.sum = 0
        self.sum_sq = 0

    def _exact(self, value: float) -> int:
        """``value`` in units of ``2**-scale``, growing the scale if it needs finer bits."""
        numerator, denominator = value.as_integer_ratio()
        bits = denominator.bit_length() - 1
        if bits > self.scale:
            grow = bits - self.scale
            self.sum <<= grow
            self.sum_sq <<= 2 * grow
            self.scale = bits
        return numerator << (self.scale - bits)

    def add(self, value: float) -> None:
        """Add a finite value."""
        exact = self._exact(value)
        self.count += 1
        self.sum += exact
        self.sum_sq += exact * exact

    def remove(self, value: float) -> None:
        """Remove a value added before."""
        exact = self._exact(value)
        self.count -= 1
        self.sum -= exact
        self.sum_sq -= exact * exact

    def mean(self) -> float:
        """The mean of at least one value (int / int: correctly rounded, never overflows)."""
        return self.sum / (self.count << self.scale)

    def sample_variance(self) -> float | None:
        """The sample variance (n - 1); None below two values."""
        n = self.count
        if n < 2:
            return None
        return (n * self.sum_sq - self.sum * self.sum) / ((n * (n - 1)) << (2 * self.scale))

    def population_std(self) -> float:
        """The population standard deviation (ddof=0, numpy's default) of at least one value.

        ``sqrt(spread) / n`` with ``spread = n * sum_sq - sum**2``, the root taken of the
        exact spread, not of a float variance: values above ~1e154 (whose variance is beyond
        float range) still have their std, and std <= (max - min) / 2 (Popoviciu's
        inequality), so it is always a finite float. The root is
        ``floor(sqrt(spread) * 2**k)`` with ``k`` set by the spread's magnitude, never by
        the scale it is held in.
        """
        n = self.count
        spread = n * self.sum_sq - self.sum * self.sum  # in units of 4**-scale
        k = _ROOT_BITS - (spread.bit_length() - 2 * self.scale) // 2
        shift = 2 * (k - self.scale)
        root = math.isqrt(spread << shift if shift >= 0 else spread >> -shift)
        return root / (n << k) if k >= 0 else (root << -k) / n
