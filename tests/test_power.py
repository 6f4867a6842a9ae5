"""The power of a two-sided paired t test and the pairs it needs (experiments/power.py), against
hand-computed values, published ones and a simulation."""

import math

import numpy as np
import pytest
from scipy import stats

from ssl_lib.experiments.power import pairs_needed, paired_t_power

Z975, Z80 = 1.959964, 0.841621  # the normal quantiles 0.975 and 0.8


def test_no_difference_is_rejected_at_the_level_alpha():
    # delta 0: the statistic is a central t, and the test rejects with probability alpha exactly
    for n in (2, 5, 40):
        assert paired_t_power(n, 0.0, 1.0) == pytest.approx(0.05, abs=1e-12)
        assert paired_t_power(n, 0.0, 1.0, alpha=0.1) == pytest.approx(0.1, abs=1e-12)


def test_published_values():
    # G*Power (one-sample / matched pairs t test, two tails, d = 0.5, alpha 0.05, power 0.8): 34 pairs,
    # actual power 0.8077775; R's power.t.test(delta = 1, sd = 1, type = "paired", power = 0.8): n = 9.94
    assert pairs_needed(0.5, 1.0) == 34 and paired_t_power(34, 0.5, 1.0) == pytest.approx(0.8077775, abs=1e-6)
    assert paired_t_power(33, 0.5, 1.0) < 0.8
    assert pairs_needed(1.0, 1.0) == 10 and paired_t_power(9, 1.0, 1.0) < 0.8 <= paired_t_power(10, 1.0, 1.0)


@pytest.mark.parametrize("delta, sd", [(0.2, 1.0), (0.3, 1.0), (1.0, 3.37), (1.0, 0.65 * math.sqrt(2))])
def test_the_normal_approximation_plus_the_t_correction(delta, sd):
    # n_z = (z_.975 + z_.8)^2 sd^2 / delta^2 ignores that sd is estimated: the t test needs a little
    # more, about z_.975^2 / 2 pairs (Guenther 1981), e.g. 196.2 + 1.9 at d = 0.2
    n_z = (Z975 + Z80) ** 2 * sd ** 2 / delta ** 2
    n = pairs_needed(delta, sd)
    assert n >= math.ceil(n_z)
    assert abs(n - math.ceil(n_z + Z975 ** 2 / 2)) <= 1


def test_a_simulation_of_the_test_agrees():
    rng = np.random.default_rng(0)
    n, delta, sd, reps = 6, 0.01, 0.0092, 20_000  # the main test's size: 6 pairs at the paper's 250-label spread
    diffs = rng.normal(delta, sd, size=(reps, n))
    rejected = np.mean(stats.ttest_1samp(diffs, 0.0, axis=1).pvalue < 0.05)
    expected = paired_t_power(n, delta, sd)
    assert abs(rejected - expected) < 4 * math.sqrt(expected * (1 - expected) / reps)  # 4 standard errors


def test_edge_cases():
    assert paired_t_power(0, 1.0, 1.0) == paired_t_power(1, 1.0, 1.0) == 0.0  # no spread from one pair: no test
    assert paired_t_power(2, 0.01, 0.0) == 1.0 and paired_t_power(2, 0.0, 0.0) == 0.0  # sd 0: t infinite, or 0/0
    assert pairs_needed(0.01, 0.0) == 2
    assert paired_t_power(5, -0.3, 1.0) == paired_t_power(5, 0.3, 1.0)  # two-sided
    assert paired_t_power(10_000, 1.0, 0.001) == 1.0  # far beyond scipy's noncentral t tail (nan there): still a number
    powers = [paired_t_power(n, 0.5, 1.0) for n in range(2, 60)]
    assert powers == sorted(powers)


@pytest.mark.parametrize("call, name", [
    (lambda: paired_t_power(-1, 1.0, 1.0), "n"), (lambda: paired_t_power(2.5, 1.0, 1.0), "n"),
    (lambda: paired_t_power(True, 1.0, 1.0), "n"), (lambda: paired_t_power(3, float("nan"), 1.0), "delta"),
    (lambda: paired_t_power(3, "1", 1.0), "delta"), (lambda: paired_t_power(3, 1.0, -0.1), "sd_diff"),
    (lambda: paired_t_power(3, 1.0, 1.0, alpha=0.0), "alpha"), (lambda: paired_t_power(3, 1.0, 1.0, alpha=1.5), "alpha"),
    (lambda: pairs_needed(0.0, 1.0), "delta"), (lambda: pairs_needed(1.0, 1.0, power=0.01), "power"),
    (lambda: pairs_needed(1.0, 1.0, power=1.0), "power"), (lambda: pairs_needed(1e-4, 1.0, max_pairs=1000), "max_pairs"),
])
def test_bad_arguments_name_the_argument(call, name):
    with pytest.raises(ValueError, match=rf"^{name} "):
        call()
