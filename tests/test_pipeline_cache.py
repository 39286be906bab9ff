"""Input pipeline speed features: the per-process example cache and batch prefetching.

References are the same pipeline with both features off (cache_mb=0, prefetch_batches=0).
"""
from __future__ import annotations

import json

import numpy as np
import pytest

from alignjax.data import formatting, preference_format
from alignjax.data.pipeline import make_sft_iterator
from alignjax.data.preference import make_preference_iterator

OFF = {"cache_mb": 0, "prefetch_batches": 0}


def _write(path, records):
    with open(path, "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in records)
    return str(path)


def _sft_records(n):
    return [{"prompt": f"What is {i} plus {i}? ", "completion": f"It is {2 * i}." + " ok" * (i % 4)}
            for i in range(n)]


def _count_calls(monkeypatch, cls):
    calls = {"n": 0}
    original = cls.__call__

    def counting(self, *a, **kw):
        calls["n"] += 1
        return original(self, *a, **kw)

    monkeypatch.setattr(cls, "__call__", counting)
    return calls


def _assert_same(got, want):
    assert len(got) == len(want)
    for g, w in zip(got, want):
        assert g.keys() == w.keys()
        for k in w:
            np.testing.assert_array_equal(g[k], w[k])


@pytest.mark.parametrize("cache_mb, tokenized", [(64, 13), (0.0005, None)])
def test_sft_cache_tokenizes_once_and_changes_nothing(tmp_path, bpe_tokenizer, monkeypatch,
                                                      cache_mb, tokenized):
    path = _write(tmp_path / "r.jsonl", _sft_records(13))
    kw = dict(seed=3, batch_size=2, seq_len=48, num_epochs=3)
    calls = _count_calls(monkeypatch, formatting.SFTFormatter)
    plain = make_sft_iterator(path, bpe_tokenizer, {**OFF, "pack_bins": 3}, **kw)
    want = list(plain)
    assert calls["n"] == 3 * 13  # without a cache every epoch re-tokenises
    calls["n"] = 0
    # One read thread: with several, epoch 2 can ask for a record still being tokenised for
    # epoch 1 (tokenised twice, harmless) and the count below would vary.
    cached = make_sft_iterator(path, bpe_tokenizer, {"cache_mb": cache_mb, "prefetch_batches": 0,
                                                     "pack_bins": 3, "read_threads": 1}, **kw)
    _assert_same(list(cached), want)
    if tokenized is not None:
        assert calls["n"] == tokenized
    else:  # ~500 bytes hold no entry: everything is tokenised again, still correct
        assert calls["n"] == 3 * 13
    assert cached.sft_stats.as_dict() == plain.sft_stats.as_dict()  # counted per epoch either way


def test_sft_prefetch_same_batches_and_exact_resume(tmp_path, bpe_tokenizer):
    path = _write(tmp_path / "r.jsonl", _sft_records(11))
    kw = dict(seed=5, batch_size=2, seq_len=40)
    plain = make_sft_iterator(path, bpe_tokenizer, {**OFF, "pack_bins": 3}, **kw)
    want = [next(plain) for _ in range(12)]  # crosses epochs
    cfg = {"prefetch_batches": 4, "pack_bins": 3}
    it = make_sft_iterator(path, bpe_tokenizer, cfg, **kw)
    assert "Prefetch" in type(it).__name__  # the feature is really on
    got = [next(it) for _ in range(5)]
    state = json.loads(json.dumps(it.get_state()))  # taken while the thread has run ahead
    resumed = make_sft_iterator(path, bpe_tokenizer, cfg, **kw)
    resumed.set_state(state)
    _assert_same(got + [next(resumed) for _ in range(7)], want)


def test_preference_cache_and_prefetch(tmp_path, bpe_tokenizer, monkeypatch):
    records = [{"prompt": f"Pick {i}: ", "chosen": f"yes {i}", "rejected": f"no {i}" + " x" * (i % 3)}
               for i in range(9)]
    path = _write(tmp_path / "p.jsonl", records)
    kw = dict(kind="pair", seed=2, batch_size=2, seq_len=32, num_epochs=2)
    calls = _count_calls(monkeypatch, preference_format.PreferenceFormatter)
    plain = make_preference_iterator(path, bpe_tokenizer, OFF, **kw)
    want = list(plain)
    assert calls["n"] == 2 * 9
    calls["n"] = 0
    fast = make_preference_iterator(path, bpe_tokenizer, {"prefetch_batches": 3, "read_threads": 1}, **kw)
    assert "Prefetch" in type(fast).__name__
    _assert_same(list(fast), want)
    assert calls["n"] == 9
    assert fast.pref_stats.as_dict() == plain.pref_stats.as_dict()
