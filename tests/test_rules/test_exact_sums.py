"""Exact sums: the statistics of the values held, whatever came and went before."""

from __future__ import annotations

import math
from decimal import Decimal, localcontext
from fractions import Fraction

from hypothesis import given
from hypothesis import strategies as st

from rules.exact_sums import ExactSums

FLOATS = st.floats(allow_nan=False, allow_infinity=False, min_value=-1e150, max_value=1e150)


def summed(values: list[float]) -> ExactSums:
    sums = ExactSums()
    for value in values:
        sums.add(value)
    return sums


@given(st.lists(FLOATS, min_size=1, max_size=40))
def test_the_mean_and_the_sample_variance_are_the_exact_ones_correctly_rounded(
    values: list[float],
) -> None:
    sums = summed(values)
    exact = [Fraction(value) for value in values]
    mean = sum(exact, Fraction(0)) / len(exact)
    assert sums.mean() == float(mean)
    if len(values) < 2:
        assert sums.sample_variance() is None
        return
    variance = sum(((value - mean) ** 2 for value in exact), Fraction(0)) / (len(exact) - 1)
    assert sums.sample_variance() == float(variance)
    population = variance * (len(exact) - 1) / len(exact)
    # The root of the exact population variance: a float variance underflows for spreads
    # below ~1e-154 (and overflows above ~1e154) where the std itself is an ordinary float.
    with localcontext() as context:
        context.prec = 60
        root = (Decimal(population.numerator) / Decimal(population.denominator)).sqrt()
    expected_std = float(root)
    assert math.isclose(sums.population_std(), expected_std, rel_tol=1e-15, abs_tol=0.0)


@given(st.lists(FLOATS, min_size=1, max_size=20), st.lists(FLOATS, max_size=20))
def test_removed_values_leave_no_trace(kept: list[float], passing: list[float]) -> None:
    sums = ExactSums()
    for value in passing + kept:
        sums.add(value)
    for value in passing:
        sums.remove(value)
    fresh = summed(list(reversed(kept)))
    assert sums.count == fresh.count
    assert (sums.mean(), sums.sample_variance(), sums.population_std()) == (
        fresh.mean(),
        fresh.sample_variance(),
        fresh.population_std(),
    )
