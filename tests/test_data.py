"""SFT data pipeline: sources, formatting/loss masks, truncation, packing contract, grain iterator."""
from __future__ import annotations

import collections
import itertools
import json

import numpy as np
import pytest

from alignjax.data.formatting import SFTFormatter, num_targets, truncate
from alignjax.data.packing import check_batch
from alignjax.data.pipeline import make_sft_eval_iterator, make_sft_iterator
from alignjax.data.sources import DataError, JsonlSource, open_source, open_sources


def _records(n: int) -> list[dict]:
    """Mixed formats, every record unique (its index is in the text)."""
    out = []
    for i in range(n):
        k = i % 3
        if k == 0:
            out.append({"text": f"note {i}: the quick brown fox" + " jumps" * (i % 5)})
        elif k == 1:
            out.append({"prompt": f"What is {i} times 2? ", "completion": f"It is {2 * i}."})
        else:
            out.append({"messages": [
                {"role": "user", "content": f"Say hi {i} times"},
                {"role": "assistant", "content": f"hi x{i}"},
            ]})
    return out


def _write_jsonl(path, records, blank_every=0) -> str:
    with open(path, "w") as f:
        for i, r in enumerate(records):
            f.write(json.dumps(r) + "\n")
            if blank_every and i % blank_every == 0:
                f.write("\n")
    return str(path)


def _docs(batches) -> list[tuple[int, ...]]:
    """Every (tokens of one segment) found in a list of batches."""
    docs = []
    for b in batches:
        for tok_t, seg_t in zip(b["tokens"], b["segment_ids"]):
            for s in np.unique(seg_t[seg_t > 0]):
                docs.append(tuple(tok_t[seg_t == s].tolist()))
    return docs


def _expected_docs(records, tok, seq_len=64, **cfg) -> list[tuple[int, ...]]:
    fmt = SFTFormatter(tok, cfg)
    return [tuple(truncate(fmt(r), seq_len, fmt.cfg.truncation)[0].ids.tolist()) for r in records]


# ----------------------------------------------------------------------------- sources


def test_jsonl_source_lazy_lines(tmp_path):
    recs = _records(7)
    path = _write_jsonl(tmp_path / "a.jsonl", recs, blank_every=3)
    src = open_source(path)
    assert isinstance(src, JsonlSource) and len(src) == 7  # blank lines are not records
    assert [src[i] for i in range(7)] == recs
    assert src.where(0) == f"{path}:1" and src.where(1) == f"{path}:3"  # line numbers skip blanks
    with pytest.raises(IndexError):
        src[7]


def test_jsonl_malformed_line_names_file_and_line(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"text": "ok"}\n\n{"text": "broken"\n[1, 2]\n')
    src = open_source(str(path))
    assert src[0] == {"text": "ok"}
    with pytest.raises(DataError, match=rf"{path}:3: malformed JSON"):
        src[1]
    with pytest.raises(DataError, match=rf"{path}:4: expected a JSON object, got list"):
        src[2]


def test_parquet_and_disk_sources(tmp_path):
    import datasets
    import pyarrow as pa
    import pyarrow.parquet as pq

    recs = [{"prompt": f"p{i}", "completion": f"c{i}"} for i in range(5)]
    pq.write_table(pa.Table.from_pylist(recs), tmp_path / "d.parquet")
    src = open_source(str(tmp_path / "d.parquet"))
    assert len(src) == 5 and src[3] == recs[3] and "d.parquet record 3" in src.where(3)

    datasets.Dataset.from_list(recs).save_to_disk(str(tmp_path / "ds"))
    src = open_source(str(tmp_path / "ds"))
    assert len(src) == 5 and src[4] == recs[4]

    dd = datasets.DatasetDict({"train": datasets.Dataset.from_list(recs),
                               "test": datasets.Dataset.from_list(recs[:2])})
    dd.save_to_disk(str(tmp_path / "dd"))
    assert len(open_source(str(tmp_path / "dd"))) == 5  # train by default
    assert len(open_source(f"{tmp_path / 'dd'}:test")) == 2
    with pytest.raises(DataError, match="available"):
        open_source(f"{tmp_path / 'dd'}:validation")

    both = open_sources([str(tmp_path / "d.parquet"), str(tmp_path / "ds")])
    assert len(both) == 10 and both[7] == recs[2] and "ds record 2" in both.where(7)


def test_empty_and_unknown_sources(tmp_path):
    import datasets
    import pyarrow as pa
    import pyarrow.parquet as pq

    (tmp_path / "e.jsonl").write_text("\n\n")
    pq.write_table(pa.table({"text": pa.array([], pa.string())}), tmp_path / "e.parquet")
    datasets.Dataset.from_dict({"text": []}).save_to_disk(str(tmp_path / "eds"))
    for name in ("e.jsonl", "e.parquet", "eds"):
        with pytest.raises(DataError, match=rf"{tmp_path / name}.*empty"):
            open_source(str(tmp_path / name))
    (tmp_path / "x.csv").write_text("a,b\n")
    (tmp_path / "plain").mkdir()
    for spec, msg in [("x.csv", "unknown data format"), ("plain", "not a datasets"),
                      ("missing.jsonl", "no such"), ("none*.jsonl", "glob matches no files")]:
        with pytest.raises(DataError, match=msg):
            open_source(str(tmp_path / spec))


# ----------------------------------------------------------------------------- formatting


def _decode_targets(tok, ex):
    return tok.decode(ex.ids[ex.loss_mask][:], skip_special_tokens=False)


@pytest.mark.parametrize("name", ["bpe_tokenizer", "spm_tokenizer"])
def test_prompt_completion_mask(name, request):
    tok = request.getfixturevalue(name)
    fmt = SFTFormatter(tok, {})
    ex = fmt({"prompt": "What is 2+2? ", "completion": "It is 4."})
    ids, mask = ex.ids.tolist(), ex.loss_mask
    assert ids[0] == tok.bos_token_id and ids[-1] == tok.eos_token_id and mask[-1]  # EOS is a target
    prompt_ids = tok("What is 2+2? ")["input_ids"]
    assert ids[:len(prompt_ids)] == prompt_ids and not mask[:len(prompt_ids)].any()
    assert mask[len(prompt_ids):].all()
    assert tok.decode(ex.ids[mask], skip_special_tokens=True).strip() == "It is 4."
    full = SFTFormatter(tok, {"completion_only_loss": False})(
        {"prompt": "What is 2+2? ", "completion": "It is 4."})
    assert full.ids.tolist() == ids and full.loss_mask.all()


def test_text_format(bpe_tokenizer):
    tok = bpe_tokenizer
    ex = SFTFormatter(tok, {"format": "text"})({"text": "hello world", "extra": 1})
    assert ex.ids.tolist() == tok("hello world")["input_ids"] + [tok.eos_token_id]
    assert num_targets(ex) == len(ex) - 1  # every token but the first is a target


@pytest.mark.parametrize("name", ["bpe_tokenizer", "spm_tokenizer"])
def test_messages_only_assistant_tokens_have_loss(name, request):
    tok = request.getfixturevalue(name)
    msgs = [{"role": "system", "content": "Be brief."},
            {"role": "user", "content": "Capital of France?"},
            {"role": "assistant", "content": "Paris."},
            {"role": "user", "content": "And Spain?"},
            {"role": "assistant", "content": "Madrid."}]
    ex = SFTFormatter(tok, {})({"messages": msgs})
    rendered = tok(tok.apply_chat_template(msgs, tokenize=False), add_special_tokens=False)
    assert ex.ids.tolist() == rendered["input_ids"]
    # The masked tokens are exactly the assistant contents, each closed by the EOS/end-of-turn.
    runs = [[t for t, _ in grp] for m, grp in itertools.groupby(
        zip(ex.ids.tolist(), ex.loss_mask), key=lambda tm: bool(tm[1])) if m]
    assert len(runs) == 2
    for run, answer in zip(runs, ["Paris.", "Madrid."]):
        assert run[-1] == tok.eos_token_id
        assert tok.decode(run, skip_special_tokens=True).strip() == answer


def test_conversational_prompt_completion(bpe_tokenizer):
    tok = bpe_tokenizer
    prompt = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"},
              {"role": "user", "content": "bye"}]
    ex = SFTFormatter(tok, {})({"prompt": prompt, "completion": [
        {"role": "assistant", "content": "goodbye"}]})
    assert tok.decode(ex.ids[ex.loss_mask], skip_special_tokens=True) == "goodbye"


def test_missing_fields_error_names_location(tmp_path, bpe_tokenizer):
    recs = _records(4)
    recs[2] = {"prompt": "only a prompt"}
    path = _write_jsonl(tmp_path / "m.jsonl", recs)
    with pytest.raises(DataError, match=r"m.jsonl:3: .*expected keys .*'completion'"):
        list(make_sft_iterator(path, bpe_tokenizer, {}, seed=0, batch_size=2, seq_len=64,
                               num_epochs=1, shuffle=False))
    fmt = SFTFormatter(bpe_tokenizer, {"format": "messages"})
    with pytest.raises(DataError, match=r"src\[5\]: record lacks \['messages'\]"):
        fmt({"text": "x"}, "src[5]")
    with pytest.raises(DataError, match="'content'"):
        fmt({"messages": [{"role": "user"}]}, "src[6]")
    with pytest.raises(DataError, match="format"):
        SFTFormatter(bpe_tokenizer, {"format": "chatml"})


def test_truncation_policies(bpe_tokenizer):
    tok = bpe_tokenizer
    rec = {"prompt": "one two three four five six seven eight nine ten ", "completion": "eleven."}
    ex = SFTFormatter(tok, {})(rec)
    n_completion = int(ex.loss_mask.sum())
    limit = len(ex) - 3

    left, status = truncate(ex, limit, "truncate_left_prompt")
    assert status == "truncated" and len(left) == limit
    assert left.ids[0] == tok.bos_token_id  # BOS kept, the start of the prompt dropped
    assert left.ids[-n_completion:].tolist() == ex.ids[-n_completion:].tolist()
    assert left.ids[1:limit - n_completion].tolist() == ex.ids[4:len(ex) - n_completion].tolist()
    assert int(left.loss_mask.sum()) == n_completion

    right, status = truncate(ex, limit, "truncate_right")
    assert status == "truncated" and right.ids.tolist() == ex.ids[:limit].tolist()
    assert right.ids[-1] != tok.eos_token_id

    assert truncate(ex, limit, "drop") == (None, "dropped")
    assert truncate(ex, len(ex), "drop")[1] == "ok"

    # Completion alone longer than the limit: left truncation removes the prompt, then cuts right.
    short, status = truncate(ex, 4, "truncate_left_prompt")
    assert status == "truncated" and short.ids.tolist() == [ex.ids[0]] + ex.ids[-n_completion:][:3].tolist()


def test_pipeline_counts_dropped_and_truncated(tmp_path, bpe_tokenizer):
    recs = [{"text": "short"}, {"text": "long " * 40}, {"prompt": "p " * 40, "completion": "c"}]
    path = _write_jsonl(tmp_path / "t.jsonl", recs)
    common = dict(seed=0, batch_size=2, seq_len=16, num_epochs=1, shuffle=False)
    it = make_sft_iterator(path, bpe_tokenizer, {"truncation": "drop"}, **common)
    assert len(_docs(list(it))) == 1
    assert it.sft_stats.as_dict()["dropped_too_long"] == 2 and it.sft_stats.examples == 3
    it = make_sft_iterator(path, bpe_tokenizer, {"truncation": "truncate_right"}, **common)
    assert len(_docs(list(it))) == 2  # the prompt-only remainder has no target left: dropped
    s = it.sft_stats.as_dict()
    assert (s["truncated"], s["dropped_no_loss"]) == (1, 1)  # kept-and-truncated vs dropped
    it = make_sft_iterator(path, bpe_tokenizer, {}, **common)  # truncate_left_prompt (default)
    assert len(_docs(list(it))) == 3 and it.sft_stats.truncated == 2


# ----------------------------------------------------------------------------- packing + pipeline


@pytest.mark.parametrize("mode", ["pack", "pad"])
def test_batch_contract_and_epoch_coverage(tmp_path, bpe_tokenizer, mode):
    recs = _records(23)
    path = _write_jsonl(tmp_path / "c.jsonl", recs)
    it = make_sft_iterator(path, bpe_tokenizer, {"packing": mode}, seed=3, batch_size=4,
                           seq_len=64, num_epochs=1)
    batches = list(it)
    for b in batches:
        assert set(b) == {"tokens", "positions", "segment_ids", "targets", "loss_mask"}
        assert b["tokens"].shape == (4, 64)
        check_batch(b, bpe_tokenizer.pad_token_id)  # positions, segments, targets, padding
    # Every example exactly once per epoch: nothing silently dropped or duplicated.
    assert collections.Counter(_docs(batches)) == collections.Counter(
        _expected_docs(recs, bpe_tokenizer))
    seg = np.stack([b["segment_ids"] for b in batches])
    if mode == "pad":
        assert seg.max() == 1 and len(batches) == 6
    else:
        assert seg.max() > 1 and len(batches) < 6  # several documents share rows
    # The loss mask marks exactly the per-example targets.
    total = sum(num_targets(SFTFormatter(bpe_tokenizer, {})(r)) for r in recs)
    assert sum(float(b["loss_mask"].sum()) for b in batches) == total


def test_shuffle_deterministic_and_epochs_reshuffle(tmp_path, bpe_tokenizer):
    path = _write_jsonl(tmp_path / "s.jsonl", _records(12))

    def order(seed, epochs=1, shuffle=True):
        it = make_sft_iterator(path, bpe_tokenizer, {"packing": "pad"}, seed=seed, batch_size=1,
                               seq_len=64, num_epochs=epochs, shuffle=shuffle)
        return _docs(list(it))

    a = order(0)
    assert a == order(0) and a != order(1) and sorted(a) == sorted(order(1))
    assert order(0, shuffle=False) == _expected_docs(_records(12), bpe_tokenizer)
    two = order(0, epochs=2)
    assert two[:12] == a and sorted(two[12:]) == sorted(a) and two[12:] != a


def test_process_sharding_disjoint_and_covering(tmp_path, bpe_tokenizer):
    recs = _records(14)
    path = _write_jsonl(tmp_path / "p.jsonl", recs)
    shards = [_docs(make_sft_iterator(path, bpe_tokenizer, {"packing": "pack"}, seed=5,
                                      batch_size=2, seq_len=64, process_index=i,
                                      process_count=3, num_epochs=1))
              for i in range(3)]
    assert [len(s) for s in shards] == [5, 5, 4]
    assert collections.Counter(sum(shards, [])) == collections.Counter(
        _expected_docs(recs, bpe_tokenizer))
    # Process i reads every 3rd record of the one global order, so local batch k of the three
    # processes holds exactly global batch k of one process (padded rows: one record each).
    def batches(i, count, batch_size):
        return [_docs([b]) for b in make_sft_iterator(
            path, bpe_tokenizer, {"packing": "pad"}, seed=5, batch_size=batch_size, seq_len=64,
            process_index=i, process_count=count, num_epochs=1)]
    single = batches(0, 1, 6)
    local = [batches(i, 3, 2) for i in range(3)]
    for k, global_batch in enumerate(single[:2]):  # the full steps (14 records = 2 x 6 + 2)
        assert sorted(global_batch) == sorted(sum((local[i][k] for i in range(3)), []))
    assert sum(local[0], []) == sum(single, [])[0::3]
    with pytest.raises(DataError, match="process_index"):
        make_sft_iterator(path, bpe_tokenizer, {}, seed=0, batch_size=2, seq_len=64,
                          process_index=3, process_count=3)


@pytest.mark.parametrize("mode", ["pack", "pad"])
def test_iterator_state_restore(tmp_path, bpe_tokenizer, mode):
    path = _write_jsonl(tmp_path / "r.jsonl", _records(17))
    kw = dict(seed=11, batch_size=3, seq_len=48)
    cfg = {"packing": mode, "pack_bins": 4}
    it = make_sft_iterator(path, bpe_tokenizer, cfg, **kw)  # infinite: crosses epochs
    for _ in range(5):
        next(it)
    state = json.loads(json.dumps(it.get_state()))
    expected = [next(it) for _ in range(8)]
    resumed = make_sft_iterator(path, bpe_tokenizer, cfg, **kw)
    resumed.set_state(state)
    for want in expected:
        got = next(resumed)
        for k in want:
            np.testing.assert_array_equal(got[k], want[k])


def test_eval_iterator_valid_flags_and_equal_lengths(tmp_path, bpe_tokenizer):
    recs = _records(10)
    path = _write_jsonl(tmp_path / "e.jsonl", recs)
    per_process = []
    for i in range(3):
        it = make_sft_eval_iterator(path, bpe_tokenizer, {"packing": "pack"}, batch_size=3,
                                    seq_len=64, process_index=i, process_count=3)
        batches = list(it)
        for b in batches:
            check_batch(b, bpe_tokenizer.pad_token_id)
            assert b["valid"].dtype == bool and b["valid"].shape == (3,)
            assert not b["loss_mask"][~b["valid"]].any()
            assert np.all(b["segment_ids"][~b["valid"]] == 0)
        per_process.append(batches)
    assert [len(b) for b in per_process] == [2, 2, 2]  # ceil(ceil(10/3)/3): hosts stay in step
    valid = [int(sum(b["valid"].sum() for b in bs)) for bs in per_process]
    assert valid == [4, 3, 3]
    docs = sum((_docs(bs) for bs in per_process), [])
    assert collections.Counter(docs) == collections.Counter(_expected_docs(recs, bpe_tokenizer))
    assert _docs(per_process[0]) == _expected_docs(recs[0::3], bpe_tokenizer)  # in order


def test_check_batch_catches_contract_violations(tmp_path, bpe_tokenizer):
    path = _write_jsonl(tmp_path / "v.jsonl", _records(6))
    batch = next(make_sft_iterator(path, bpe_tokenizer, {"packing": "pack"}, seed=0,
                                   batch_size=2, seq_len=64))
    check_batch(batch, bpe_tokenizer.pad_token_id)
    seg = batch["segment_ids"][0]
    last = int(np.flatnonzero(seg == 1)[-1])  # end of the first document
    for key, value in [("targets", 7), ("loss_mask", 1.0), ("positions", 3)]:
        bad = {k: v.copy() for k, v in batch.items()}
        bad[key][0, last] = value if key != "positions" else bad[key][0, last] + value
        with pytest.raises(AssertionError):
            check_batch(bad, bpe_tokenizer.pad_token_id)


def test_config_dict_accepted(tmp_path, bpe_tokenizer):
    ml_collections = pytest.importorskip("ml_collections")
    path = _write_jsonl(tmp_path / "cd.jsonl", _records(4))
    cfg = ml_collections.ConfigDict({"format": "auto", "packing": "pad", "truncation": "drop",
                                     "completion_only_loss": False, "other": 1})
    it = make_sft_iterator(path, bpe_tokenizer, cfg, seed=0, batch_size=4, seq_len=64,
                           num_epochs=1, shuffle=False)
    batch = next(it)
    assert batch["segment_ids"].max() == 1
    valid = batch["segment_ids"] > 0
    ends = np.zeros_like(valid)
    ends[:, :-1] = valid[:, :-1] & ~valid[:, 1:]
    ends[:, -1] = valid[:, -1]
    # completion_only_loss=False: every in-document target carries loss.
    assert np.array_equal(batch["loss_mask"] > 0, valid & ~ends)


# ----------------------------------------------------------------------------- one EOS per turn

CHATML = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
          "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


@pytest.fixture(scope="module")
def chatml_tokenizer():
    """A ChatML tokenizer (Qwen style): the assistant turn ends "<|im_end|>\\n", EOS = <|im_end|>."""
    from alignjax.data.tokenizer import train_bpe_tokenizer
    tok = train_bpe_tokenizer(vocab_size=512)
    tok.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|im_end|>"],
                            "eos_token": "<|im_end|>"})
    tok.chat_template = CHATML
    return tok


def test_chatml_turn_gets_no_second_eos(chatml_tokenizer):
    """The turn already ends with <|im_end|> then "\\n": appending EOS gave [..., im_end, Ċ, im_end]."""
    from alignjax.data.preference_format import PreferenceFormatter
    tok = chatml_tokenizer
    msgs = [{"role": "user", "content": "ok?"}, {"role": "assistant", "content": "yes"}]
    ex = SFTFormatter(tok, {})({"messages": msgs})
    rendered = tok(tok.apply_chat_template(msgs, tokenize=False), add_special_tokens=False)["input_ids"]
    assert ex.ids.tolist() == rendered  # exactly the template's tokens, nothing appended
    assert ex.ids.tolist().count(tok.eos_token_id) == 2  # one per turn
    _, (chosen, rejected), _ = PreferenceFormatter(tok, {}).encode("ok?", ["yes", "no"])
    for response, word in ((chosen, "yes"), (rejected, "no")):
        assert response.count(tok.eos_token_id) == 1, tok.convert_ids_to_tokens(response)
        assert tok.decode(response, skip_special_tokens=True).strip() == word


@pytest.mark.parametrize("name", ["bpe_tokenizer", "spm_tokenizer"])
def test_completion_ending_with_the_eos_string_gets_no_second_eos(name, request):
    tok = request.getfixturevalue(name)
    fmt = SFTFormatter(tok, {})
    plain = fmt({"prompt": "q", "completion": " yes"}).ids.tolist()
    closed = fmt({"prompt": "q", "completion": " yes" + tok.eos_token}).ids.tolist()
    assert closed == plain and plain[-1] == tok.eos_token_id and plain[-2] != tok.eos_token_id
    text = SFTFormatter(tok, {"format": "text"})({"text": "hello" + tok.eos_token}).ids.tolist()
    assert text.count(tok.eos_token_id) == 1
