"""Preference pairs and ranked groups from rated responses (alignjax.data.ratings)."""
from __future__ import annotations

import itertools
import json
import os
import zlib

import numpy as np
import pytest
from ml_collections import ConfigDict

from alignjax.config import load_config
from alignjax.data import toy
from alignjax.data.preference import (
    make_preference_eval_iterator,
    make_preference_iterator,
)
from alignjax.data.preference_format import InvalidRecord, PreferenceFormatter
from alignjax.data.ratings import (
    RatedSource,
    pairs_from_rated,
    ranked_from_rated,
    read_rated,
    write_from_ratings,
)
from alignjax.data.sources import DataError, JsonlSource
from alignjax.model.config import ConfigError
from alignjax.train.registry import validate_config

T = 64
PLAIN = {"chat_template": False}
CONFIGS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs")

# Scores with a tie at the top, an all-tie record, close scores (for min_margin) and a plain pair.
SCORES = [[1.0, 3.0, 3.0, 2.0], [5.0, 5.0], [2.0, 7.5, 4.0, 7.0, 1.0], [3.0, 1.0],
          [4.0, 4.0, 1.0]]


def _plain(n, scores):
    return {"prompt": f"question {n}", "responses": [
        {"text": f"answer {n}.{k}", "score": s} for k, s in enumerate(scores)]}


RECORDS = [_plain(n, s) for n, s in enumerate(SCORES)]


def _write(tmp_path, name, records) -> str:
    path = tmp_path / f"{name}.jsonl"
    toy.write_jsonl(records, path)
    return str(path)


# ------------------------------------------------------------------ an independent reference


def _key(prompt, texts, scores) -> int:
    """The documented seeding rule: crc32 of the JSON of [prompt, responses, scores]."""
    text = json.dumps([prompt, texts, [float(s) for s in scores]], sort_keys=True,
                      ensure_ascii=False)
    return zlib.crc32(text.encode("utf-8"))


def _reference(prompt, texts, scores, rule, min_margin=0.0, seed=0):
    """([(chosen text, rejected text, margin)], ties) written from the rules' description."""
    best = scores.index(max(scores))
    if rule == "best_vs_worst":
        candidates = [(best, scores.index(min(scores)))]
    elif rule == "best_vs_random":
        others = [k for k in range(len(scores)) if k != best]
        draw = np.random.default_rng([seed, _key(prompt, texts, scores)]).integers(len(others))
        candidates = [(best, others[draw])]
    else:
        candidates = []
        for a, b in itertools.combinations(range(len(scores)), 2):
            candidates.append((b, a) if scores[b] > scores[a] else (a, b))
    kept = [(texts[i], texts[j], scores[i] - scores[j]) for i, j in candidates
            if scores[i] != scores[j] and scores[i] - scores[j] >= min_margin]
    return kept, len(candidates) - len(kept)


def _texts(record):
    return [r["text"] for r in record["responses"]], [r["score"] for r in record["responses"]]


@pytest.mark.parametrize("rule", ["best_vs_worst", "best_vs_random", "all_pairs"])
@pytest.mark.parametrize("min_margin", [0.0, 1.5])
@pytest.mark.parametrize("seed", [0, 7])
def test_rules_match_reference(rule, min_margin, seed):
    total_ties = 0
    for rec in RECORDS:
        texts, scores = _texts(rec)
        want, want_ties = _reference(rec["prompt"], texts, scores, rule, min_margin, seed)
        got, ties = pairs_from_rated(rec, rule, min_margin, seed)
        assert [(p["chosen"], p["rejected"], p["margin"]) for p in got] == want, rec
        assert all(p["prompt"] == rec["prompt"] for p in got)
        assert ties == want_ties
        total_ties += ties
    if rule != "best_vs_random":  # the random draw's ties depend on the seed
        assert total_ties == {("best_vs_worst", 0.0): 1, ("best_vs_worst", 1.5): 1,
                              ("all_pairs", 0.0): 3, ("all_pairs", 1.5): 8}[rule, min_margin]


def test_fixed_examples():
    """A few hand-checked answers, so the reference itself is not the only witness."""
    rec = RECORDS[2]  # scores 2.0, 7.5, 4.0, 7.0, 1.0
    pairs, ties = pairs_from_rated(rec, "best_vs_worst")
    assert [(p["chosen"], p["rejected"], p["margin"]) for p in pairs] == [
        ("answer 2.1", "answer 2.4", 6.5)] and ties == 0
    pairs, ties = pairs_from_rated(rec, "all_pairs", min_margin=3.0)
    assert sorted((p["chosen"][-1], p["rejected"][-1]) for p in pairs) == [
        ("1", "0"), ("1", "2"), ("1", "4"), ("2", "4"), ("3", "0"), ("3", "2"), ("3", "4")]
    assert ties == 3  # 0-4 (1.0), 0-2 (2.0), 1-3 (0.5)
    pairs, ties = pairs_from_rated(RECORDS[0], "best_vs_worst")  # tie at the top: the first
    assert (pairs[0]["chosen"], pairs[0]["rejected"]) == ("answer 0.1", "answer 0.0")
    assert pairs_from_rated(RECORDS[1], "all_pairs") == ([], 1)


def test_best_vs_random_is_seeded_per_record():
    recs = [_plain(n, [9.0, 1.0, 2.0, 3.0]) for n in range(40)]
    draws = [pairs_from_rated(r, "best_vs_random", seed=3)[0][0]["rejected"][-1] for r in recs]
    assert draws == [pairs_from_rated(r, "best_vs_random", seed=3)[0][0]["rejected"][-1]
                     for r in recs]  # deterministic
    assert set(draws) == {"1", "2", "3"}  # every other response is drawn, never the best
    other = [pairs_from_rated(r, "best_vs_random", seed=4)[0][0]["rejected"][-1] for r in recs]
    assert other != draws  # the seed matters
    # The draw belongs to the record, not to its position in the file.
    forward = RatedSource(recs, "best_vs_random", seed=3)
    backward = RatedSource(recs[::-1], "best_vs_random", seed=3)
    assert [forward[n] for n in range(len(recs))] == [backward[n] for n in range(len(recs))][::-1]


# ------------------------------------------------------------------ layouts


def test_ultrafeedback_and_plain_layouts():
    uf = {"source": "evol_instruct", "instruction": "Name a prime.", "models": ["a", "b", "c"],
          "completions": [
              {"model": "a", "response": "4", "overall_score": 2.0, "fine-grained_score": 4.5,
               "annotations": {"helpfulness": {"Rating": "2"}}},
              {"model": "b", "response": "7", "overall_score": 8.5, "fine-grained_score": 3.0},
              {"model": "c", "response": "9", "overall_score": 5, "fine-grained_score": 1.25}]}
    pairs, _ = pairs_from_rated(uf, "best_vs_worst")
    assert pairs == [{"prompt": "Name a prime.", "chosen": "7", "rejected": "4", "margin": 6.5}]
    pairs, _ = pairs_from_rated(uf, "best_vs_worst", rating_key="fine-grained_score")
    assert pairs == [{"prompt": "Name a prime.", "chosen": "4", "rejected": "9", "margin": 3.25}]
    plain_list = {"prompt": "p", "responses": ["x", "y", "z"], "scores": [1, 3, 2]}
    assert read_rated(plain_list).responses == ("x", "y", "z")
    assert pairs_from_rated(plain_list, "best_vs_worst")[0][0]["chosen"] == "y"
    messages = {"prompt": [{"role": "user", "content": "hi"}], "responses": [
        {"text": [{"role": "assistant", "content": "hello"}], "score": 1},
        {"text": [{"role": "assistant", "content": "go away"}], "score": 0}]}
    assert pairs_from_rated(messages, "best_vs_worst")[0][0]["rejected"][0]["content"] == "go away"


def test_ranked_groups():
    rec = RECORDS[2]
    assert ranked_from_rated(rec) == {"prompt": "question 2",
                                      "responses": [f"answer 2.{k}" for k in range(5)],
                                      "scores": [2.0, 7.5, 4.0, 7.0, 1.0]}
    assert ranked_from_rated(RECORDS[1]) is None  # all tied: no ranking
    src = RatedSource(RECORDS, "ranked")
    assert len(src) == 4 and src.stats.ties == 1 and src[1] == ranked_from_rated(rec)


# ------------------------------------------------------------------ the source


def test_rated_source_index_counts_and_where(tmp_path):
    path = _write(tmp_path, "rated", RECORDS)
    src = RatedSource(JsonlSource(path), "all_pairs", min_margin=1.5, margin_scale=0.5)
    want = []
    for rec in RECORDS:
        kept, _ = _reference(rec["prompt"], *_texts(rec), "all_pairs", 1.5)
        want += [(rec["prompt"], c, r, 0.5 * m) for c, r, m in kept]
    assert [(p["prompt"], p["chosen"], p["rejected"], p["margin"]) for p in
            (src[n] for n in range(len(src)))] == want
    assert (src.stats.records, src.stats.examples, src.stats.ties, src.stats.invalid) == (
        5, 13, 8, 0)
    assert src.where(0) == f"{path}:1 (response 1 over 0)"
    assert src.where(len(src) - 1).startswith(f"{path}:5 ")
    assert list(src.examples_of(1)) == [] and len(src.examples_of(2)) == 8


def test_bad_records(tmp_path):
    one = {"prompt": "q", "responses": [{"text": "only", "score": 1}]}
    records = [RECORDS[0], one, RECORDS[3], {"prompt": "q", "responses": [
        {"text": "a", "score": "high"}, {"text": "b", "score": 1}]}]
    path = _write(tmp_path, "bad", records)
    with pytest.raises(InvalidRecord) as e:
        RatedSource(JsonlSource(path), "best_vs_worst")
    msg = str(e.value)
    assert "2 invalid rated records" in msg and f"{path}:2" in msg and "got 1" in msg
    assert f"{path}:4" in msg and "number" in msg
    src = RatedSource(JsonlSource(path), "best_vs_worst", skip_invalid=True)
    assert src.stats.invalid == 2 and len(src) == 2
    assert src.where(1).startswith(f"{path}:3")
    with pytest.raises(DataError, match="'completions'.*'responses'"):
        RatedSource([{"prompt": "q", "chosen": "a", "rejected": "b"}] * 2, "best_vs_worst")


def test_all_ties_and_unknown_rule(tmp_path, bpe_tokenizer):
    tied = [_plain(n, [2.0, 2.0, 2.0]) for n in range(3)]
    with pytest.raises(DataError, match=r"all 9 candidate pairs are ties"):
        RatedSource(tied, "all_pairs")
    with pytest.raises(DataError, match=r"all 2 candidate pairs are ties.*min_margin=5"):
        RatedSource([RECORDS[3], _plain(9, [1.0, 2.0])], "best_vs_worst", min_margin=5)
    with pytest.raises(DataError, match="unknown"):
        RatedSource(RECORDS, "best_vs_best")
    with pytest.raises(DataError, match="unknown"):
        pairs_from_rated(RECORDS[0], "top2")
    path = _write(tmp_path, "rated", RECORDS)
    with pytest.raises(DataError, match="does not fit preference kind 'ranked'"):
        make_preference_eval_iterator(path, bpe_tokenizer, {"from_ratings": "all_pairs",
                                                            "num_responses": 2},
                                      kind="ranked", batch_size=2, seq_len=T)


def test_write_from_ratings(tmp_path):
    path = _write(tmp_path, "rated", RECORDS)
    out = tmp_path / "pairs.jsonl"
    stats = write_from_ratings(path, str(out), "all_pairs", min_margin=1.0)
    written = [json.loads(line) for line in out.read_text().splitlines()]
    want = [p for rec in RECORDS for p in pairs_from_rated(rec, "all_pairs", 1.0)[0]]
    assert written == want and stats.examples == len(want) and stats.ties > 0
    assert all(w["margin"] >= 1.0 for w in written)


# ------------------------------------------------------------------ end to end


def test_iterator_from_rated_jsonl(tmp_path, bpe_tokenizer):
    tok = bpe_tokenizer
    path = _write(tmp_path, "rated", RECORDS)
    cfg = {**PLAIN, "from_ratings": "all_pairs", "min_margin": 1.5, "rating_margin_scale": 1.0}
    it = make_preference_eval_iterator(path, tok, cfg, kind="pair", batch_size=4, seq_len=T)
    batches = list(it)
    want = [p for rec in RECORDS for p in pairs_from_rated(rec, "all_pairs", 1.5)[0]]
    fmt = PreferenceFormatter(tok, PLAIN, "pair")
    n = 0
    for batch in batches:
        for b in np.flatnonzero(batch["example_valid"]):
            pair = want[n]
            prompt = tok(pair["prompt"])["input_ids"]
            for k, text in enumerate((pair["chosen"], pair["rejected"])):
                ids = prompt + tok(text, add_special_tokens=False)["input_ids"] + [
                    tok.eos_token_id]
                row = batch["tokens"][b, k][batch["segment_ids"][b, k] > 0]
                assert row.tolist() == ids, (n, k)
            assert batch["margin"][b] == pytest.approx(pair["margin"])
            assert batch["index"][b] == n
            n += 1
    assert n == len(want) == 13
    ex = fmt(want[0])
    assert batches[0]["tokens"][0, 0, :len(ex.prompt)].tolist() == ex.prompt.tolist()

    # Margins stay 0 unless rating_margin_scale turns them on.
    off = next(make_preference_eval_iterator(path, tok, {**cfg, "rating_margin_scale": 0.0},
                                             kind="pair", batch_size=4, seq_len=T))
    assert not off["margin"].any()

    # The shuffled train iterator: one epoch is every pair once, and resume is exact.
    it = make_preference_iterator(path, tok, cfg, kind="pair", seed=1, batch_size=2, seq_len=T,
                                  num_epochs=1)
    first = next(it)
    state = it.get_state()
    rest = [b["index"][b["example_valid"]].tolist() for b in it]
    assert sorted(first["index"].tolist() + [i for r in rest for i in r]) == list(range(13))
    again = make_preference_iterator(path, tok, cfg, kind="pair", seed=1, batch_size=2,
                                     seq_len=T, num_epochs=1)
    again.set_state(state)
    assert [b["index"][b["example_valid"]].tolist() for b in again] == rest


def test_ranked_iterator_from_rated_jsonl(tmp_path, bpe_tokenizer):
    tok = bpe_tokenizer
    path = _write(tmp_path, "rated", RECORDS)
    cfg = {**PLAIN, "from_ratings": "ranked", "num_responses": 3}
    batch = next(make_preference_eval_iterator(path, tok, cfg, kind="ranked", batch_size=4,
                                               seq_len=T))
    assert batch["example_valid"].all()  # 4 groups: the all-tied record is dropped
    np.testing.assert_array_equal(batch["scores"], [[3, 3, 2], [7.5, 7, 4], [3, 1, 0],
                                                    [4, 4, 1]])
    np.testing.assert_array_equal(batch["valid"][2], [True, True, False])
    best = tok("question 2")["input_ids"] + tok("answer 2.1", add_special_tokens=False)[
        "input_ids"] + [tok.eos_token_id]
    assert batch["tokens"][1, 0][batch["segment_ids"][1, 0] > 0].tolist() == best


def test_pre_training_check(tmp_path, bpe_tokenizer):
    from alignjax.train.setup import checked_sources
    same = {"prompt": "q", "responses": [{"text": "same", "score": 2},
                                         {"text": "same", "score": 1}]}
    path = _write(tmp_path, "rated", [*RECORDS, same])
    cfg = ConfigDict({**PLAIN, "from_ratings": "best_vs_worst", "seq_len": T,
                      "skip_invalid": False})
    with pytest.raises(DataError, match=rf"(?s)1 invalid records of 6.*{path}:6.*identical"):
        checked_sources(path, str(tmp_path), "train", bpe_tokenizer, cfg, "pair")
    cfg.skip_invalid = True
    sources = checked_sources(path, str(tmp_path), "train", bpe_tokenizer, cfg, "pair")
    it = make_preference_eval_iterator(sources, bpe_tokenizer, cfg, kind="pair", batch_size=8,
                                       seq_len=T)
    assert next(it)["example_valid"].sum() == 4  # 5 records, one all tied; the bad one skipped


def test_config_keys():
    for name in ("dpo", "reward"):
        c = load_config(os.path.join(CONFIGS, f"{name}.py") + ":tiny",
                        ["data.from_ratings=best_vs_random", "data.min_margin=1.0"])
        validate_config(c, 8)
        assert c.data.rating_margin_scale == 0.0 and c.data.rating_key == ""
        bad = load_config(os.path.join(CONFIGS, f"{name}.py") + ":tiny",
                          ["data.from_ratings=best_vs_best", "data.min_margin=-1.0"])
        with pytest.raises(ConfigError) as e:
            validate_config(bad, 8)
        assert "data.from_ratings" in str(e.value) and "data.min_margin" in str(e.value)
