"""Weighted data mixtures (alignjax.data.mixture), per-source eval and the train.epochs budget."""

import collections
import json
import math
import types

import numpy as np
import pytest

from alignjax.config import load_config
from alignjax.data.mixture import Mixture, parse_sources, unique_names
from alignjax.data.pipeline import make_sft_eval_iterator, make_sft_iterator
from alignjax.data.preference import (
    make_preference_eval_iterator,
    make_preference_iterator,
)
from alignjax.data.sources import DataError, open_sources
from alignjax.model.config import ConfigError
from alignjax.train import budget
from alignjax.train.data_split import open_split

SIZES = {"a": 30, "b": 50, "c": 20}


def _write(path, records):
    with open(path, "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in records)
    return str(path)


def _sft_files(tmp_path):
    out = {}
    for name, n in SIZES.items():
        out[name] = _write(tmp_path / f"{name}.jsonl", [
            {"prompt": f"{name} question {i}", "completion": f"{name} answer {i}"} for i in range(n)])
    return out


def _mixture(files, weights):
    specs = parse_sources(",".join(f"{files[k]}:{w}" for k, w in weights.items()))
    return Mixture([open_sources(s.spec) for s in specs], unique_names(specs),
                   [s.weight for s in specs])


def _draws(mixture, n, process_index=0, process_count=1, seed=0):
    records = mixture.mixed_records(seed=seed, process_index=process_index,
                                    process_count=process_count, shuffle=True, num_epochs=None)
    return [int(records[i]) for i in range(n)]


def test_shares_follow_the_weights(tmp_path):
    files = _sft_files(tmp_path)
    weights = {"a": 0.7, "b": 0.2, "c": 0.1}
    mixture = _mixture(files, weights)
    n = 3000
    counts = collections.Counter(mixture.names[mixture.component(i)] for i in _draws(mixture, n))
    for name, w in weights.items():  # within a binomial 3 sigma of the weight
        assert abs(counts[name] - n * w) <= 3 * math.sqrt(n * w * (1 - w)), (name, counts)
    # each source's records all come round (its own shuffled, repeated stream)
    draws = _draws(mixture, n)
    for k, r in enumerate(mixture.ranges):
        assert {d for d in draws if d in r} == set(r)


def test_draws_split_over_processes_and_seed_changes_order(tmp_path):
    mixture = _mixture(_sft_files(tmp_path), {"a": 3, "b": 1, "c": 1})
    one = _draws(mixture, 200)
    two = [_draws(mixture, 100, p, 2) for p in (0, 1)]
    assert one[0::2] == two[0] and one[1::2] == two[1]
    assert _draws(mixture, 200, seed=1) != one


def test_resume_continues_the_same_draws(tmp_path, bpe_tokenizer):
    """A restored iterator continues the same sequence of (source, record) draws."""
    files = _sft_files(tmp_path)
    cfg = {"packing": "pad", "prefetch_batches": 2}

    def fresh():
        return make_sft_iterator(_mixture(files, {"a": 0.5, "b": 0.3, "c": 0.2}), bpe_tokenizer,
                                 cfg, seed=3, batch_size=4, seq_len=32)

    it = fresh()
    for _ in range(3):
        next(it)
    state = it.get_state()
    rest = [next(it) for _ in range(6)]
    resumed = fresh()
    resumed.set_state(state)
    for want in rest:
        got = next(resumed)
        assert all(np.array_equal(got[k], want[k]) for k in want)
    # data/drawn/<source>: exact from the position, and carried over by the restored state
    mixture = _mixture(files, {"a": 0.5, "b": 0.3, "c": 0.2})
    for n_rows, iterator in ((12, None), (36, resumed)):
        want = collections.Counter(mixture.names[mixture.component(i)]
                                   for i in _draws(mixture, n_rows, seed=3))
        got = (iterator.sft_stats.drawn.as_dict(iterator.get_state()) if iterator is not None
               else it.sft_stats.drawn.as_dict(state))
        assert got == dict(want) and set(got) == {"a", "b", "c"}


def test_old_comma_list_is_still_a_concatenation(tmp_path, bpe_tokenizer):
    files = _sft_files(tmp_path)
    config = load_config("configs/sft.py:tiny", [f"data.train={files['a']},{files['b']}",
                                                 "data.eval="])
    sources = open_split(config, str(tmp_path), bpe_tokenizer, "train")
    assert isinstance(sources, list) and [len(s) for s in sources] == [30, 50]


@pytest.mark.parametrize("spec, match", [
    ("A:-0.5,B:1", "negative weight"),
    ("A:0,B:0.0", "all weights are zero"),
    ("A:x,B:1", "malformed weight 'x'"),
    ("A:0.5,B", "have no weight"),
    ('[{"path": "A", "weight": 1, "colour": "red"}]', "unknown keys"),
    ('[{"path": "A", "weight": "lots"}]', "malformed weight"),
    ("[not a list", "cannot read"),
])
def test_bad_specs_name_the_key_and_spec(tmp_path, spec, match):
    files = _sft_files(tmp_path)
    spec = spec.replace("A", files["a"]).replace("B", files["b"])
    with pytest.raises(DataError, match=match) as e:
        parse_sources(spec, "data.train")
    assert "data.train" in str(e.value)


def test_spec_forms(tmp_path):
    files = _sft_files(tmp_path)
    (tmp_path / "ds").mkdir()  # a save_to_disk directory keeps its :split
    got = parse_sources(f"{files['a']}:0.7,{tmp_path}/ds:test:0.2,hf://org/name:train:0.1")
    assert [(s.spec, s.weight) for s in got] == [
        (files["a"], 0.7), (f"{tmp_path}/ds:test", 0.2), ("hf://org/name:train", 0.1)]
    assert parse_sources(f"{tmp_path}/ds:test")[0].spec == f"{tmp_path}/ds:test"
    assert parse_sources("hf://org/name:test")[0].weight is None
    listed = parse_sources(json.dumps([{"path": files["a"], "weight": 2, "format": "text",
                                        "name": "first"}, files["b"] + ":1"]))
    assert listed[0].overrides == (("format", "text"),) and listed[1].weight == 1.0
    assert unique_names(listed) == ["first", "b"]
    assert unique_names(parse_sources(f"{files['a']},{files['a']}")) == ["a", "a_2"]


def test_each_source_keeps_its_own_format(tmp_path, bpe_tokenizer):
    """A source with format=text trains on every token, the other only on completions."""
    files = _sft_files(tmp_path)
    text = _write(tmp_path / "t.jsonl", [{"prompt": "ignored", "text": f"plain text {i}"}
                                          for i in range(10)])
    specs = parse_sources(json.dumps([
        {"path": files["a"], "weight": 1, "format": "prompt_completion"},
        {"path": text, "weight": 1, "format": "text"}]))
    mixture = Mixture([open_sources(s.spec) for s in specs], unique_names(specs),
                      [s.weight for s in specs], [dict(s.overrides) for s in specs])
    batches = list(make_sft_eval_iterator(mixture, bpe_tokenizer, {"format": "messages"},
                                          batch_size=40, seq_len=32))
    mask, seg = batches[0]["loss_mask"], batches[0]["segment_ids"]
    prompt_completion, plain = mask[:30], mask[30:40]
    # text: every token after BOS is a target; prompt_completion: the prompt's are not
    assert (plain.sum(1) == (seg[30:40] > 0).sum(1) - 1).all()
    assert (prompt_completion.sum(1) < (seg[:30] > 0).sum(1) - 3).all()


def test_wrong_algorithm_format_names_file_and_expected_keys(tmp_path, bpe_tokenizer):
    files = _sft_files(tmp_path)
    config = load_config("configs/sft.py:tiny", [f"data.train={files['a']}:1,{files['b']}:1",
                                                 "data.eval=", "data.seq_len=64"])
    tok = bpe_tokenizer
    with pytest.raises(DataError, match=r"data.train: .*a.jsonl holds SFT records") as e:
        open_split(config, str(tmp_path), tok, "train", "pair")
    assert "['prompt', 'chosen', 'rejected']" in str(e.value)
    pairs = _write(tmp_path / "p.jsonl", [{"prompt": "q", "chosen": "y", "rejected": "n"}] * 3)
    config = load_config("configs/sft.py:tiny", [f"data.train={pairs}", "data.eval="])
    with pytest.raises(DataError, match=r"p.jsonl holds preference records .*reads SFT data"):
        open_split(config, str(tmp_path), tok, "train", "sft")


def _pair_files(tmp_path):
    out = {}
    for name, n in (("x", 12), ("y", 8)):
        out[name] = _write(tmp_path / f"{name}.jsonl", [
            {"prompt": f"{name} q{i}", "chosen": f"{name} good {i}", "rejected": f"{name} bad {i}"}
            for i in range(n)])
    return out


def test_preference_mixture_and_per_source_eval(tmp_path, bpe_tokenizer):
    files = _pair_files(tmp_path)
    specs = parse_sources(f"{files['x']}:0.25,{files['y']}:0.75")
    mixture = Mixture([open_sources(s.spec) for s in specs], unique_names(specs),
                      [s.weight for s in specs])
    it = make_preference_iterator(mixture, bpe_tokenizer, {"prefetch_batches": 0}, kind="pair",
                                  seed=0, batch_size=8, seq_len=48)
    index = np.concatenate([next(it)["index"] for _ in range(10)])
    from_y = np.isin(index, list(mixture.ranges[1])).mean()
    assert abs(from_y - 0.75) < 0.05 and it.epoch_size() == (20, 20, False)
    assert set(it.pref_stats.drawn.as_dict()) == {"x", "y"}
    for k, r in enumerate(mixture.ranges):  # eval one source: only its records, global indices
        seen = np.concatenate([b["index"] for b in make_preference_eval_iterator(
            mixture, bpe_tokenizer, {}, kind="pair", batch_size=4, seq_len=48, records=r)])
        assert sorted(seen[seen >= 0]) == list(r)


def _fake_algo(iterator):
    return types.SimpleNamespace(train_iterator=iterator, producer=None, name="sft")


def test_epochs_set_the_steps(tmp_path, bpe_tokenizer):
    files = _pair_files(tmp_path)
    it = make_preference_iterator([files["x"], files["y"]], bpe_tokenizer, {}, kind="pair",
                                  seed=0, batch_size=4, seq_len=48)
    logged = []
    config = load_config("configs/sft.py:tiny", ["train.epochs=2", "train.batch_size=8",
                                                 "optimizer.warmup_steps=1"])
    assert budget.train_steps(config, _fake_algo(it), logged.append) == 5  # ceil(2 * 20 / 8)
    config = load_config("configs/sft.py:tiny", ["train.steps=10", "train.batch_size=8"])
    assert budget.train_steps(config, _fake_algo(it), logged.append) == 10
    assert "covers 4.00 epochs" in logged[-1]
    sft = make_sft_iterator(_sft_files(tmp_path)["a"], bpe_tokenizer, {"packing": "pack"},
                            seed=0, batch_size=4, seq_len=64)
    config = load_config("configs/sft.py:tiny", ["train.epochs=1", "train.batch_size=2",
                                                 "optimizer.warmup_steps=0"])
    records, rows, estimated = sft.epoch_size()
    assert records == 30 and estimated and rows < records  # short records: packed several a row
    assert budget.train_steps(config, _fake_algo(sft), logged.append) == math.ceil(rows / 2)
    assert "estimate" in logged[-1]
    online = types.SimpleNamespace(train_iterator=None, producer=object(), name="ppo")
    with pytest.raises(ConfigError, match="train.epochs=1 needs offline data"):
        budget.train_steps(config, online, logged.append)


@pytest.mark.slow
def test_per_source_eval_and_draws_in_metrics(tmp_path):
    """A 2-step SFT run on a mixture, its steps set by train.epochs: metrics.jsonl holds
    eval/<source>/loss and mean_token_accuracy, the pooled eval/loss, and data/drawn/<source>."""
    from conftest import SMALL_MODEL

    from alignjax.train import run_training
    from alignjax.train.metrics import read_metrics
    msgs = [{"messages": [{"role": "user", "content": f"sort: {i} 1"},
                          {"role": "assistant", "content": f"1 {i}"}]} for i in range(16)]
    a = _write(tmp_path / "sorting.jsonl", msgs)
    b = _write(tmp_path / "counting.jsonl", [{"prompt": f"count: {'x ' * (i % 5)}",
                                              "completion": str(i % 5)} for i in range(16)])
    workdir = tmp_path / "run"
    run_training(load_config("configs/sft.py:tiny", SMALL_MODEL + [
        f"data.train={a}:0.5,{b}:0.5", f"data.eval={a},{b}", "data.packing=pad",
        "train.epochs=0.5", "train.batch_size=8", "train.log_every=1", "train.eval_every=0",
        "optimizer.warmup_steps=0", "checkpoint.async_save=False", "data.seq_len=48"]),
        str(workdir))
    rows = read_metrics(str(workdir))
    assert max(r["step"] for r in rows) == 2  # ceil(0.5 * 32 records / 8)
    last = {k: v for r in rows for k, v in r.items()}
    for name in ("sorting", "counting"):
        assert {f"eval/{name}/loss", f"eval/{name}/mean_token_accuracy",
                f"data/drawn/{name}"} <= set(last)
    assert "eval/loss" in last
    assert min(last["eval/sorting/loss"], last["eval/counting/loss"]) <= last["eval/loss"] <= max(
        last["eval/sorting/loss"], last["eval/counting/loss"])


@pytest.mark.slow
def test_dpo_on_a_mixture_with_a_precomputed_reference(tmp_path, small_start_model):
    """Pairs from two weighted sources; the precomputed reference table is indexed by the
    mixture's global record index, and each eval source gets its own DPO metrics."""
    from alignjax.train import run_training
    from alignjax.train.metrics import read_metrics
    files = _pair_files(tmp_path)
    run_training(load_config("configs/dpo.py:tiny", [
        f"model.init_from={small_start_model}", "tokenizer.path=", "dpo.reference=precomputed",
        f"data.train={files['x']}:0.5,{files['y']}:0.5", f"data.eval={files['x']},{files['y']}",
        "train.steps=2", "train.batch_size=8", "train.log_every=1", "train.eval_every=0",
        "optimizer.warmup_steps=0", "checkpoint.async_save=False"]), str(tmp_path / "dpo"))
    last = {k: v for r in read_metrics(str(tmp_path / "dpo")) for k, v in r.items()}
    for name in ("x", "y"):
        assert {f"eval/{name}/loss", f"eval/{name}/rewards/accuracies",
                f"data/drawn/{name}"} <= set(last)
    assert "eval/rewards/accuracies" in last and last["data/drawn/x"] == last["data/drawn/y"]


def test_a_list_in_the_config_file(tmp_path, bpe_tokenizer):
    """configs may hold data.train as a list (set with ConfigDict.ignore_type); it validates and
    opens as a mixture with per-source settings."""
    from alignjax.config import validate_schema
    files = _sft_files(tmp_path)
    config = load_config("configs/sft.py:tiny", ["data.eval=", "data.seq_len=64"])
    with config.ignore_type():
        config.data.train = [{"path": files["a"], "weight": 0.75, "format": "prompt_completion"},
                             f"{files['b']}:0.25"]
    validate_schema(config, 8, ["sft"])
    mixture = open_split(config, str(tmp_path), bpe_tokenizer, "train")
    assert isinstance(mixture, Mixture) and mixture.weights == [0.75, 0.25]
    assert mixture.names == ["a", "b"] and mixture.overrides[0] == {"format": "prompt_completion"}
