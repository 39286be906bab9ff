"""Win-rate arithmetic for pairwise evaluation (docs/algorithms.md section 8), as pure NumPy functions.

A comparison of a model against a baseline on n prompts is a vector of preferences p_i in [0, 1]
for the model (1 = the model's response wins, 0 = the baseline's, 0.5 = tie). Discrete judges
(checker, parsed LLM verdicts, reward comparisons) give 0 / 0.5 / 1; probability-mode LLM judges
give anything in between. Verdict strings are "A", "B" or "tie" in the order the judge saw the
pair; None is a reply that could not be parsed (counted, never dropped silently).
"""

from __future__ import annotations

from typing import Optional, Sequence

import numpy as np

VERDICTS = ("A", "B", "tie")
_PREF = {"A": 1.0, "B": 0.0, "tie": 0.5}


def win_stats(prefs: Sequence[float]) -> dict:
    """W / T / L counts (p > 0.5, p = 0.5, p < 0.5), win_rate = W / n, adjusted_win_rate =
    (W + T/2) / n, and mean_preference = mean p (AlpacaEval's weighted win rate)."""
    p = np.asarray(prefs, np.float64)
    n = len(p)
    w, l = int(np.sum(p > 0.5)), int(np.sum(p < 0.5))
    t = n - w - l
    return dict(n=n, wins=w, ties=t, losses=l, win_rate=w / n if n else float("nan"),
                adjusted_win_rate=(w + t / 2) / n if n else float("nan"),
                mean_preference=float(p.mean()) if n else float("nan"))


def bootstrap_interval(values: Sequence[float], statistic=np.mean, n_boot: int = 2000,
                       level: float = 0.95, seed: int = 0) -> tuple[float, float]:
    """Percentile bootstrap interval of `statistic`, resampling prompts with replacement."""
    x = np.asarray(values, np.float64)
    if len(x) == 0:
        return float("nan"), float("nan")
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, len(x), size=(n_boot, len(x)))
    stats = np.array([statistic(x[i]) for i in idx])
    lo, hi = np.quantile(stats, [(1 - level) / 2, 1 - (1 - level) / 2])
    return float(lo), float(hi)


def adjusted_preference(p: float) -> float:
    """The per-prompt contribution to the adjusted win rate: 1 win, 1/2 tie, 0 loss."""
    return 1.0 if p > 0.5 else 0.0 if p < 0.5 else 0.5


def swap_back(verdict: Optional[str]) -> Optional[str]:
    """A verdict given with the pair shown swapped (baseline first), in the original order."""
    return {"A": "B", "B": "A"}.get(verdict, verdict)


def combine_both_orders(first: Sequence[Optional[str]], swapped: Sequence[Optional[str]]):
    """MT-Bench rule: the model is shown first in `first` and second in `swapped`. A pair is a
    win or a loss only when both orders say so; any tie or disagreement is a tie. A pair with an
    unparsed verdict in either order gets None. Returns model preferences (1 / 0.5 / 0 / None)."""
    out = []
    for a, b in zip(first, swapped):
        b = swap_back(b)
        if a is None or b is None:
            out.append(None)
        elif a == b and a != "tie":
            out.append(_PREF[a])
        else:
            out.append(0.5)
    return out


def probability_preference(logp_a, logp_b):
    """p(label A) / (p(label A) + p(label B)) from the judge's next-token log-probs of the two
    labels (AlpacaEval's weighted judge): sigmoid(logp_a - logp_b)."""
    d = np.asarray(logp_a, np.float64) - np.asarray(logp_b, np.float64)
    return 1.0 / (1.0 + np.exp(-d))


def combine_probabilities(p_first, p_swapped):
    """Both-order probability mode: the average of p(model first) and 1 - p(model second)."""
    return (np.asarray(p_first, np.float64) + 1.0 - np.asarray(p_swapped, np.float64)) / 2


def positional_consistency(first: Sequence[Optional[str]], swapped: Sequence[Optional[str]]) -> float:
    """Share of pairs (both parsed) whose two orders give the same verdict after mapping back."""
    pairs = [(a, swap_back(b)) for a, b in zip(first, swapped) if a is not None and b is not None]
    return float(np.mean([a == b for a, b in pairs])) if pairs else float("nan")


def judge_accuracy(first: Sequence[Optional[str]], swapped: Sequence[Optional[str]],
                   gold: Sequence[str]) -> dict:
    """LLMBar's meta-evaluation: `gold` is the better output in the original order ("A"/"B").
    accuracy = mean correctness over both orders (an unparsed verdict is wrong), agreement =
    positional consistency, plus single-order accuracy and the unparsed count."""
    right1 = [a == g for a, g in zip(first, gold)]
    right2 = [swap_back(b) == g for b, g in zip(swapped, gold)]
    return dict(n=len(gold), accuracy=float(np.mean(right1 + right2)) if gold else float("nan"),
                accuracy_first_order=float(np.mean(right1)) if gold else float("nan"),
                agreement=positional_consistency(first, swapped),
                unparsed=sum(v is None for v in list(first) + list(swapped)))


def _std_delta_len(len_model, len_baseline):
    delta = np.asarray(len_model, np.float64) - np.asarray(len_baseline, np.float64)
    std = delta.std()
    return delta / std if std > 0 else np.zeros_like(delta)


def length_controlled_win_rate(prefs, len_model, len_baseline, C: float = 100.0) -> float:
    """AlpacaEval 2's length-controlled win rate, without the instruction-difficulty term (it
    needs many models' outputs on the same prompts; we compare two).

    Fits P(model wins) = sigmoid(theta + phi * tanh(std_delta_len)) by logistic regression on
    soft labels (each prompt enters as label 1 with weight p and label 0 with weight 1 - p),
    then predicts at std_delta_len = 0: sigmoid(theta). C is scikit-learn's inverse L2 strength
    on phi (large: nearly unregularised, but finite when length separates wins perfectly).
    """
    from sklearn.linear_model import LogisticRegression
    p = np.asarray(prefs, np.float64)
    x = np.tanh(_std_delta_len(len_model, len_baseline))[:, None]
    if np.all(p == p[0]) and p[0] in (0.0, 1.0):
        return float(p[0])  # one class only: nothing to fit, no length to explain
    features = np.concatenate([x, x])
    labels = np.concatenate([np.ones_like(p), np.zeros_like(p)])
    weights = np.concatenate([p, 1.0 - p])
    fit = LogisticRegression(C=C).fit(features, labels, sample_weight=weights)
    return float(1.0 / (1.0 + np.exp(-fit.intercept_[0])))


def length_correlation(scores, lengths) -> dict:
    """Pearson and Spearman correlation of scores (reward or judge preference) with length."""
    from scipy.stats import pearsonr, spearmanr
    s, n = np.asarray(scores, np.float64), np.asarray(lengths, np.float64)
    if len(s) < 3 or s.std() == 0 or n.std() == 0:
        return dict(pearson=float("nan"), spearman=float("nan"), n=len(s))
    return dict(pearson=float(pearsonr(s, n)[0]), spearman=float(spearmanr(s, n)[0]), n=len(s))


def summarize(prefs: Sequence[Optional[float]], len_model, len_baseline, seed: int = 0) -> dict:
    """Everything `alignjax eval winrate` reports for one comparison; None preferences are the
    unparsed judgements, counted and left out of the rates."""
    keep = [i for i, p in enumerate(prefs) if p is not None]
    p = np.array([prefs[i] for i in keep], np.float64)
    lm, lb = np.asarray(len_model, np.float64)[keep], np.asarray(len_baseline, np.float64)[keep]
    out = win_stats(p)
    out["unparsed"] = len(prefs) - len(keep)
    out["adjusted_win_rate_ci95"] = bootstrap_interval([adjusted_preference(x) for x in p], seed=seed)
    out["length_controlled_win_rate"] = (length_controlled_win_rate(p, lm, lb) if len(p)
                                         else float("nan"))
    out["mean_length_model"] = float(lm.mean()) if len(p) else float("nan")
    out["mean_length_baseline"] = float(lb.mean()) if len(p) else float("nan")
    return out
