"""Sampling-based data (docs/algorithms.md section 5): selection rules and prompt files (`alignjax
sample` end to end from the trained model: test_sampling_cli.py)."""


import numpy as np
import pytest

from alignjax import sampling


def test_best_worst_and_ties():
    assert sampling.best_worst(np.array([0.2, 0.9, -1.0, 0.9])) == (1, 2)
    assert sampling.best_worst(np.array([1.0, 1.0, 1.0])) is None


def test_rso_acceptance_probability_follows_the_formula():
    """Candidates are visited in order; with rewards [-1, 0] and beta 0.5 the first is accepted in
    round one with probability exp((-1 - 0) / 0.5), else the second (holding r_max) is."""
    rng = np.random.default_rng(0)
    trials = 20000
    first = sum(sampling.rso_accept(np.array([-1.0, 0.0]), 1, 0.5, rng) == [0] for _ in range(trials))
    expected = np.exp(-2.0)
    assert abs(first / trials - expected) < 4 * np.sqrt(expected * (1 - expected) / trials)
    # The best candidate is always accepted, and nothing is accepted twice.
    for _ in range(200):
        r = rng.normal(size=16)
        got = sampling.rso_accept(r, 8, 0.5, rng)
        assert int(np.argmax(r)) in got and len(set(got)) == len(got) == 8


def test_pairs_are_ordered_by_reward_and_skip_ties():
    rng = np.random.default_rng(0)
    r = np.array([0.1, 0.5, 0.5, 0.9, 0.3, 0.7])
    pairs = sampling.pair_by_reward(list(range(6)), r, rng)
    used = [i for p in pairs for i in p]
    assert len(used) == len(set(used))
    assert all(r[w] > r[l] for w, l in pairs)


def test_select_modes():
    rng = np.random.default_rng(0)
    texts, r = ["a", "b", "", "a"], np.array([0.5, 1.0, 2.0, 0.5])
    # The empty response (EOS first) is never used, even with the best reward.
    assert sampling.select("best_of_n", "p", texts, r, rng) == [{"prompt": "p", "completion": "b", "reward": 1.0}]
    [pair] = sampling.select("pairs", "p", texts, r, rng)
    assert (pair["chosen"], pair["rejected"]) == ("b", "a")
    [ranked] = sampling.select("ranked", "p", texts, r, rng)
    assert ranked["responses"] == ["b", "a"] and ranked["scores"] == [1.0, 0.5]
    assert sampling.select("pairs", "p", ["x", "y"], np.array([1.0, 1.0]), rng) == []
    # min_reward: rejection-sampling fine-tuning keeps only good-enough responses
    assert sampling.select("best_of_n", "p", texts, r, rng, min_reward=1.5) == []
    assert [x["completion"] for x in sampling.select("best_of_n", "p", texts, r, rng, min_reward=1.0)] == ["b"]
    kept = sampling.select("filtered", "p", texts + ["c"], np.append(r, 0.7), rng, min_reward=0.5)
    assert [(x["completion"], x["reward"]) for x in kept] == [("a", 0.5), ("b", 1.0), ("c", 0.7)]  # "a" once
    every = sampling.select("all", "p", texts + ["c"], np.append(r, 0.7), rng)  # repeats kept, "" not
    assert [(x["completion"], x["reward"]) for x in every] == [("a", 0.5), ("b", 1.0), ("a", 0.5), ("c", 0.7)]
    assert [x["completion"] for x in sampling.select("all", "p", texts, r, rng, min_reward=0.6)] == ["b"]
    with pytest.raises(Exception, match="--mode"):
        sampling.select("bogus", "p", texts, r, rng)


def test_read_prompts_names_the_bad_line(tmp_path):
    from alignjax.data.sources import DataError
    path = tmp_path / "prompts.jsonl"
    path.write_text('{"prompt": "sort: 3 1"}\n{"text": "no prompt"}\n')
    with pytest.raises(DataError, match=r"prompts.jsonl:2"):
        sampling.read_prompts(str(path))
