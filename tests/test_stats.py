"""Bootstrap intervals: per system, paired differences and ratios, stratified by category."""

import numpy as np
import pytest

from desta.core.stats import bootstrap_table, mean_interval


def test_bootstrap_on_a_fixed_input_gives_the_known_interval():
    from scipy import stats

    scores = [1, 1, 1, 0, 1, 0, 1, 1, 0, 1]
    assert mean_interval(scores, resamples=2000, seed=0) == (0.7, 0.4, 1.0)
    scipy_ci = stats.bootstrap((np.array(scores, float),), np.mean, n_resamples=2000, method="percentile",
                               rng=np.random.default_rng(0)).confidence_interval
    assert (scipy_ci.low, scipy_ci.high) == pytest.approx((0.4, 1.0), abs=0.05)
    table = bootstrap_table(["a"] * 10 + ["b"] * 10, {"s": scores + [0] * 10, "t": [1] * 20,
                                                      "same": scores + [0] * 10}, {"f": ("s", "t"), "d": ("s", "same")})
    assert table["a"]["values"]["f"] == pytest.approx(-0.3) and table["a"]["ci"]["f"] == pytest.approx([-0.6, 0.0])
    assert table["b"]["values"]["f"] == -1.0 and table["b"]["ci"]["f"] == [-1.0, -1.0]
    assert table["overall"]["values"]["s"] == pytest.approx(0.35)  # the mean of the category means
    assert table["a"]["ci"]["d"] == [0.0, 0.0]  # paired: identical systems differ by exactly nothing
