"""The statistics of the pages (experiments/stats.py): checked against hand-computed values and
brute-force enumeration, and the errors a comparison must raise rather than guess."""

import itertools
import math

import numpy as np
import pytest

from ssl_lib.experiments import stats

# a hand-made pool with ties on validation (0.7 three times) and a tie on test
VAL = [0.50, 0.70, 0.70, 0.60, 0.90, 0.55, 0.70]
TEST = [0.40, 0.80, 0.60, 0.50, 0.70, 0.30, 0.90]


def _brute_subsets(val, test, k):
    """The test score of the validation-best of every k-subset (ties: the tied trials' mean), averaged."""
    out = []
    for sub in itertools.combinations(range(len(val)), k):
        best = max(val[i] for i in sub)
        out.append(np.mean([test[i] for i in sub if val[i] == best]))
    return float(np.mean(out))


def _brute_draws(val, test, k):
    out = []
    for draw in itertools.product(range(len(val)), repeat=k):
        best = max(val[i] for i in draw)
        out.append(np.mean([test[i] for i in draw if val[i] == best]))
    return float(np.mean(out))


@pytest.mark.parametrize("k", range(1, len(VAL) + 1))
def test_expected_best_of_k_is_the_mean_over_every_k_subset(k):
    assert stats.expected_best_of_k(VAL, TEST, k) == pytest.approx(_brute_subsets(VAL, TEST, k), abs=1e-12)


@pytest.mark.parametrize("k", [1, 2, 3])
def test_with_replacement_it_is_the_mean_over_every_draw_of_k(k):
    assert stats.expected_best_of_k(VAL, TEST, k, replace=True) == pytest.approx(_brute_draws(VAL, TEST, k), abs=1e-12)


def test_expected_best_of_k_by_hand():
    # val ranks 1 < 2 < 3; best of 2 of 3: rank 2 wins C(1,1)/C(3,2) = 1/3, rank 3 wins 2/3
    assert stats.expected_best_of_k([0.1, 0.3, 0.2], [0.0, 0.9, 0.6], 2) == pytest.approx(0.6 / 3 + 2 * 0.9 / 3)
    assert stats.expected_best_of_k([0.1, 0.3, 0.2], [0.0, 0.9, 0.6], 1) == pytest.approx(0.5)  # the pool's mean
    assert stats.expected_best_of_k([0.1, 0.3, 0.2], [0.0, 0.9, 0.6], 3) == pytest.approx(0.9)  # the best's test
    assert stats.selection_weights([0.2, 0.2, 0.2], 2) == pytest.approx([1 / 3] * 3)  # all tied: a random pick
    with pytest.raises(ValueError, match="k must be between 1 and the pool's 3 trials, got 4"):
        stats.expected_best_of_k([0.1, 0.2, 0.3], [0, 0, 0], 4)


def test_the_probability_that_one_pair_of_studies_favours_a():
    va, ta = [0.1, 0.4, 0.3, 0.2], [0.5, 0.9, 0.6, 0.7]
    vb, tb = [0.3, 0.1, 0.2, 0.4], [0.8, 0.6, 0.7, 0.65]
    brute = []
    for sub in itertools.combinations(range(4), 2):  # the same trial indices on both sides
        a = ta[max(sub, key=lambda i: va[i])]
        b = tb[max(sub, key=lambda i: vb[i])]
        brute.append((a > b) + 0.5 * (a == b))
    assert stats.prob_first_wins(va, ta, vb, tb, 2) == pytest.approx(np.mean(brute))
    # with validation ties the draws estimate it: a tied pair picks either trial half the time
    p = stats.prob_first_wins([0.5, 0.5], [1.0, 0.0], [0.5, 0.1], [0.5, 0.5], 2, draws=20_000)
    assert p == pytest.approx(0.5, abs=0.02)


def test_best_of_k_pairs_by_trial_and_its_interval_agrees_with_its_p_value():
    rng = np.random.default_rng(3)
    n = 12
    va, ta, vb, tb = (rng.random(n) for _ in range(4))
    a = {i: (va[i], ta[i] + 0.3) for i in range(n)}
    b = {i: (vb[i], tb[i]) for i in range(n)}
    r = stats.best_of_k(a, b, 4, n_resamples=2000)
    assert r["mean"] == pytest.approx(stats.expected_best_of_k(va, ta + 0.3, 4) - stats.expected_best_of_k(vb, tb, 4))
    assert r["low"] <= r["mean"] <= r["high"] and r["expected_a"][3] - r["expected_b"][3] == pytest.approx(r["mean"])
    assert (r["low"] > 0 or r["high"] < 0) == (r["p"] < 0.05)
    assert r["method"].startswith("expected best of 4, paired bootstrap (BCa)")
    del b[5]
    with pytest.raises(stats.UnpairedError, match="trial 5 has a but not b"):
        stats.best_of_k(a, b, 4)


def test_paired_t_by_hand_at_the_level_asked():
    # differences 0.02, 0.01, 0.03: mean 0.02, sd 0.01; t(0.95, 2) = 2.919986 for a 90% interval
    r = stats.paired_t({0: 0.60, 1: 0.50, 2: 0.55}, {0: 0.58, 1: 0.49, 2: 0.52}, level=0.90)
    assert r["mean"] == pytest.approx(0.02)
    assert r["low"] == pytest.approx(0.02 - 2.919986 * 0.01 / math.sqrt(3), abs=1e-6)
    assert r["p"] == pytest.approx(0.074180, abs=1e-6)  # t = 3.4641, 2 df, two-sided
    sentence = stats.verdict("k-means helps", r)
    assert "90% CI +0.0031 to +0.0369" in sentence and "95%" not in sentence
    assert sentence.startswith("k-means helps: not shown at this budget")  # p = 0.074 > 0.05


def test_paired_t_pairs_by_key_not_by_position():
    r = stats.paired_t({2: 0.5, 0: 0.7, 1: 0.6}, {0: 0.6, 1: 0.5, 2: 0.4})
    assert r["keys"] == [0, 1, 2] and r["mean"] == pytest.approx(0.1) and r["p"] is None  # all three differ by 0.1
    assert "all 3 differences are +0.1000, no spread" in stats.verdict("x", r)
    with pytest.raises(stats.UnpairedError, match="seed 3 has a but not b; seed 7 has b but not a"):
        stats.paired_t({0: 1, 3: 1}, {0: 1, 7: 1})
    one = stats.paired_t({0: 0.5}, {0: 0.4})
    assert one["low"] is None and "1 seeds, too few for an interval" in stats.verdict("x", one)
    zero = stats.paired_t({0: 0.5, 1: 0.6}, {0: 0.5, 1: 0.6})
    assert "same config" not in stats.verdict("x", zero) and "all 2 differences are +0.0000" in stats.verdict("x", zero)
    with pytest.raises(ValueError, match="confidence level must be between 0 and 1"):
        stats.paired_t({0: 1, 1: 2}, {0: 0, 1: 0}, level=95)


def test_holm_by_hand_and_the_verdicts_of_one_page():
    # sorted 0.01, 0.03, 0.04, 0.2 times 4, 3, 2, 1: 0.04, 0.09, 0.08 -> 0.09 (monotone), 0.2
    assert stats.holm([0.01, 0.04, 0.03, 0.2]) == pytest.approx([0.04, 0.09, 0.09, 0.2])
    assert stats.holm([0.5, 0.5]) == pytest.approx([1.0, 1.0])
    strong = stats.paired_t({0: 0.6, 1: 0.61, 2: 0.62}, {0: 0.5, 1: 0.5, 2: 0.52})  # p = 0.0047
    weak = stats.paired_t({0: 0.60, 1: 0.50, 2: 0.55}, {0: 0.58, 1: 0.49, 2: 0.52})  # p = 0.074
    judged = stats.judge({"strong": strong, "weak": weak, "single": stats.paired_t({0: 1}, {0: 0})})
    assert judged["strong"]["p_holm"] == pytest.approx(2 * strong["p"]) and judged["weak"]["p_holm"] == pytest.approx(weak["p"])
    assert judged["strong"]["verdict"].startswith("strong: yes") and "after Holm's correction over 2 verdicts" in judged["strong"]["verdict"]
    assert judged["single"]["p_holm"] is None and "undecided" in judged["single"]["verdict"]
    hurts = stats.judge({"h": stats.paired_t({0: 0.5, 1: 0.51, 2: 0.52}, {0: 0.6, 1: 0.6, 2: 0.62})})
    assert hurts["h"]["verdict"].startswith("h: no, it hurts")
