"""Win-rate arithmetic (alignjax/eval/winrate.py) against independent transcriptions."""

from __future__ import annotations

import numpy as np
import pytest

from alignjax.eval import winrate as wr


def test_win_stats_counts_and_rates():
    p = [1, 1, 0.5, 0, 1, 0.5, 0.9, 0.2]
    s = wr.win_stats(p)
    assert (s["wins"], s["ties"], s["losses"]) == (4, 2, 2)
    assert s["win_rate"] == pytest.approx(4 / 8)
    assert s["adjusted_win_rate"] == pytest.approx((4 + 1) / 8)
    assert s["mean_preference"] == pytest.approx(np.mean(p))


def test_bootstrap_interval_matches_a_plain_loop():
    x = np.random.RandomState(0).rand(40) > 0.3
    lo, hi = wr.bootstrap_interval(x, n_boot=500, seed=3)
    rng = np.random.default_rng(3)
    idx = rng.integers(0, 40, size=(500, 40))
    means = sorted(float(np.mean(x[row])) for row in idx)
    assert lo == pytest.approx(np.quantile(means, 0.025))
    assert hi == pytest.approx(np.quantile(means, 0.975))
    assert lo <= x.mean() <= hi


@pytest.mark.parametrize("first,swapped,want", [
    ("A", "B", 1.0),     # model wins in both orders
    ("B", "A", 0.0),     # baseline wins in both orders
    ("A", "A", 0.5),     # positional bias: "first wins" both times -> tie
    ("tie", "B", 0.5),   # a tie in either order -> tie
    ("A", None, None),   # unparsed -> counted apart
])
def test_mt_bench_rule(first, swapped, want):
    assert wr.combine_both_orders([first], [swapped]) == [want]


def test_probability_mode_equals_direct_softmax_over_the_two_labels():
    rs = np.random.RandomState(1)
    logits = rs.randn(5, 10) * 3  # the judge's next-token logits; labels are ids 3 and 7
    logp = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
    p = wr.probability_preference(logp[:, 3], logp[:, 7])
    probs = np.exp(logp)
    np.testing.assert_allclose(p, probs[:, 3] / (probs[:, 3] + probs[:, 7]), rtol=1e-12)
    p2 = wr.probability_preference(logp[:, 7], logp[:, 3])  # the swapped order
    np.testing.assert_allclose(wr.combine_probabilities(p, p2), p, rtol=1e-12)


def test_judge_accuracy_and_agreement():
    gold = ["A", "B", "A", "B"]
    first = ["A", "A", "A", None]       # always "A": right on 0 and 2
    swapped = ["B", "B", "A", "A"]      # mapped back: A, A, B, B
    s = wr.judge_accuracy(first, swapped, gold)
    assert s["accuracy"] == pytest.approx((2 + 2) / 8)
    assert s["accuracy_first_order"] == pytest.approx(2 / 4)
    assert s["agreement"] == pytest.approx(2 / 3)  # pairs 0, 1, 2 parsed; 0 and 1 agree
    assert s["unparsed"] == 1


def _newton_logistic(x, y, w, C, iters=100):
    """Weighted logistic regression, L2 (1/2)||phi||^2 + C * weighted log-loss, intercept free."""
    theta = np.zeros(2)  # (intercept, phi)
    X = np.stack([np.ones_like(x), x], 1)
    for _ in range(iters):
        q = 1 / (1 + np.exp(-X @ theta))
        grad = C * X.T @ (w * (q - y)) + np.array([0, theta[1]])
        hess = C * (X * (w * q * (1 - q))[:, None]).T @ X + np.diag([0, 1.0])
        theta -= np.linalg.solve(hess, grad)
    return theta


def test_length_controlled_win_rate_matches_a_newton_fit():
    rs = np.random.RandomState(2)
    n = 60
    lm, lb = rs.randint(5, 80, n), rs.randint(5, 80, n)
    prefs = np.clip(rs.rand(n) + 0.2 * np.sign(lm - lb), 0, 1)
    delta = (lm - lb).astype(float)
    x = np.tanh(delta / delta.std())
    theta = _newton_logistic(np.concatenate([x, x]), np.concatenate([np.ones(n), np.zeros(n)]),
                             np.concatenate([prefs, 1 - prefs]), C=100.0)
    assert wr.length_controlled_win_rate(prefs, lm, lb) == pytest.approx(1 / (1 + np.exp(-theta[0])), abs=1e-4)


def test_length_control_removes_wins_that_come_only_from_length():
    rs = np.random.RandomState(3)
    n = 200
    lb = rs.randint(20, 60, n)
    longer = rs.rand(n) < 0.7
    lm = np.where(longer, lb + rs.randint(5, 40, n), lb - rs.randint(5, 15, n))
    prefs = longer.astype(float)  # the model wins exactly when its answer is longer
    raw = wr.win_stats(prefs)["win_rate"]
    lc = wr.length_controlled_win_rate(prefs, lm, lb)
    assert raw == pytest.approx(longer.mean())
    assert abs(lc - 0.5) < abs(raw - 0.5) / 2, (raw, lc)
    # wins unrelated to length keep their rate
    fair = (rs.rand(n) < 0.7).astype(float)
    assert wr.length_controlled_win_rate(fair, lm, lb) == pytest.approx(fair.mean(), abs=0.06)


def test_length_correlation():
    n = np.arange(10.0)
    c = wr.length_correlation(2 * n + 1, n)
    assert c["pearson"] == pytest.approx(1.0) and c["spearman"] == pytest.approx(1.0)


def test_summarize_counts_unparsed_and_reports_everything():
    s = wr.summarize([1.0, None, 0.0, 0.5, 1.0], [10, 11, 12, 13, 14], [9, 9, 9, 9, 9])
    assert s["unparsed"] == 1 and s["n"] == 4
    assert s["adjusted_win_rate"] == pytest.approx(2.5 / 4)
    lo, hi = s["adjusted_win_rate_ci95"]
    assert 0 <= lo <= s["adjusted_win_rate"] <= hi <= 1
    assert s["mean_length_model"] == pytest.approx(np.mean([10, 12, 13, 14]))
