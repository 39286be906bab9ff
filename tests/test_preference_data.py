"""Preference data (alignjax.data.preference): pairwise / HH / ranked / KTO records -> [B, K, T]."""
from __future__ import annotations

import dataclasses
import json
import logging

import numpy as np
import pytest

from alignjax.data import toy
from alignjax.data.preference import (check_preference_batch, format_pair_batch,
                                      make_preference_eval_iterator, make_preference_iterator)
from alignjax.data.preference_format import (PreferenceFormatter, PrefExample, fit_example,
                                             format_kto, format_pair, format_ranked,
                                             split_shared_prefix)
from alignjax.data.sources import DataError

T = 96
PLAIN = {"chat_template": False}


def _write(tmp_path, name, records) -> str:
    path = tmp_path / f"{name}.jsonl"
    toy.write_jsonl(records, path)
    return str(path)


def _ids(tok, text):
    return tok(text, add_special_tokens=False)["input_ids"]


def _assert_row(batch, b, k, prompt, response, pad_id):
    """Row (b, k) holds exactly prompt + response, loss on the response targets (EOS included)."""
    ids = list(prompt) + list(response)
    n, t = len(ids), batch["tokens"].shape[-1]
    np.testing.assert_array_equal(batch["tokens"][b, k], ids + [pad_id] * (t - n))
    np.testing.assert_array_equal(batch["positions"][b, k], list(range(n)) + [0] * (t - n))
    np.testing.assert_array_equal(batch["segment_ids"][b, k], [1] * n + [0] * (t - n))
    np.testing.assert_array_equal(batch["targets"][b, k], ids[1:] + [pad_id] * (t - n + 1))
    mask = np.zeros(t, np.float32)
    mask[len(prompt) - 1:n - 1] = 1  # targets[t] = ids[t+1] is a response token
    np.testing.assert_array_equal(batch["loss_mask"][b, k], mask)


def _expected(tok, records, kind, cfg=None, seq_len=T):
    fmt = PreferenceFormatter(tok, cfg, kind)
    policy = (cfg or {}).get("truncation", "truncate_left_prompt")
    return [fit_example(fmt(r), seq_len, policy)[0] for r in records]


def _response_texts(tok, batches, slot=0):
    out = []
    for b in batches:
        for i in np.flatnonzero(b["example_valid"]):
            m = b["loss_mask"][i, slot] > 0
            out.append(tok.decode(b["targets"][i, slot][m]))
    return out


# ----------------------------------------------------------------------------- formatting


def test_pair_strings_plain_and_chat(bpe_tokenizer):
    tok = bpe_tokenizer
    rec = {"prompt": "What is 2+2?", "chosen": "It is 4.", "rejected": "It is 5."}
    ex = format_pair(rec, tok, PLAIN)  # like SFT prompt_completion: BOS + prompt, response + EOS
    assert ex.prompt.tolist() == tok("What is 2+2?")["input_ids"] and ex.n_keep == 1
    assert [r.tolist() for r in ex.responses] == [
        _ids(tok, "It is 4.") + [tok.eos_token_id], _ids(tok, "It is 5.") + [tok.eos_token_id]]
    assert ex.scores.tolist() == [1.0, 0.0] and ex.margin == 0.0
    assert format_pair({**rec, "margin": 0.5}, tok, PLAIN).margin == 0.5

    chat = format_pair(rec, tok)  # default: the tokenizer has a chat template
    user = [{"role": "user", "content": rec["prompt"]}]
    assert chat.prompt.tolist() == _ids(tok, tok.apply_chat_template(
        user, tokenize=False, add_generation_prompt=True))
    full = tok.apply_chat_template(user + [{"role": "assistant", "content": "It is 4."}],
                                   tokenize=False)
    assert chat.prompt.tolist() + chat.responses[0].tolist() == _ids(tok, full)
    assert chat.responses[0][-1] == tok.eos_token_id and chat.n_keep == 1


def test_message_list_formats_match_strings(bpe_tokenizer):
    tok = bpe_tokenizer
    p, c, r = "Name a color.", "Red.", "Seven."
    user, turn = {"role": "user", "content": p}, lambda x: {"role": "assistant", "content": x}
    want = format_pair({"prompt": p, "chosen": c, "rejected": r}, tok)
    variants = [
        {"prompt": p, "chosen": [user, turn(c)], "rejected": [user, turn(r)]},  # UltraFeedback
        {"prompt": p, "chosen": [turn(c)], "rejected": [turn(r)]},  # assistant message only
        {"prompt": [user], "chosen": [turn(c)], "rejected": [turn(r)]},  # conversational
        {"chosen": [user, turn(c)], "rejected": [user, turn(r)]},  # HH-style message lists
    ]
    for rec in variants:
        got = format_pair(rec, tok, PLAIN)  # message records always use the template
        assert got.prompt.tolist() == want.prompt.tolist()
        assert [x.tolist() for x in got.responses] == [x.tolist() for x in want.responses]
    # Multi-turn UltraFeedback: the prompt is everything before the last assistant message.
    convo = [{"role": "system", "content": "Be brief."}, user, turn("Blue."),
             {"role": "user", "content": "Another?"}]
    ex = format_pair({"prompt": "ignored", "chosen": convo + [turn(c)],
                      "rejected": convo + [turn(r)]}, tok)
    assert ex.prompt.tolist() == _ids(tok, tok.apply_chat_template(
        convo, tokenize=False, add_generation_prompt=True))


def test_split_shared_prefix():
    c = "\n\nHuman: hi\n\nAssistant: hello\n\nHuman: color?\n\nAssistant: Sure, red"
    r = "\n\nHuman: hi\n\nAssistant: hello\n\nHuman: color?\n\nAssistant: Sure, 7"
    prompt, yc, yr = split_shared_prefix(c, r)
    assert prompt == "\n\nHuman: hi\n\nAssistant: hello\n\nHuman: color?\n\nAssistant:"
    assert (yc, yr) == (" Sure, red", " Sure, 7")
    u, a = {"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}
    b = {"role": "assistant", "content": "no"}
    assert split_shared_prefix([u, a], [u, b]) == ([u], [a], [b])
    with pytest.raises(ValueError, match="share no"):
        split_shared_prefix("\n\nHuman: a", "\n\nHuman: b")
    with pytest.raises(ValueError, match="both be strings"):
        split_shared_prefix("x", [u])


def test_hh_transcripts_split_prompt_in_pipeline(tmp_path, bpe_tokenizer):
    tok = bpe_tokenizer
    recs = [{"chosen": f"\n\nHuman: count to {i}\n\nAssistant: Sure, {i}",
             "rejected": f"\n\nHuman: count to {i}\n\nAssistant: Sure, no", "margin": float(i)}
            for i in range(3)]
    path = _write(tmp_path, "hh", recs)
    batch = next(make_preference_iterator(path, tok, {}, kind="pair", seed=0, batch_size=3,
                                          seq_len=T, shuffle=False, num_epochs=1))
    check_preference_batch(batch, tok.pad_token_id)
    for i in range(3):  # transcripts are plain text: BOS + prompt up to "Assistant:"
        prompt = tok(f"\n\nHuman: count to {i}\n\nAssistant:")["input_ids"]
        for k, reply in enumerate([f" Sure, {i}", " Sure, no"]):
            _assert_row(batch, i, k, prompt, _ids(tok, reply) + [tok.eos_token_id],
                        tok.pad_token_id)
    np.testing.assert_array_equal(batch["margin"], [0.0, 1.0, 2.0])


# ----------------------------------------------------------------------------- batch contract


def test_toy_pairs_contract(tmp_path, bpe_tokenizer):
    tok, pad = bpe_tokenizer, bpe_tokenizer.pad_token_id
    recs = toy.preference_records(toy.make_examples(10, 0))
    for i in range(0, 10, 2):
        recs[i]["margin"] = 0.25 * i
    path = _write(tmp_path, "pairs", recs)
    it = make_preference_iterator(path, tok, {}, kind="pair", seed=1, batch_size=4, seq_len=T,
                                  num_epochs=1)
    batches = list(it)
    assert len(batches) == 3 and it.pref_stats.examples == 10
    expected = {r["chosen"]: (r, ex) for r, ex in zip(recs, _expected(tok, recs, "pair"))}
    seen = []
    for batch in batches:
        check_preference_batch(batch, pad)
        shapes = {k: (v.shape, v.dtype.name) for k, v in batch.items()}
        assert shapes == {**{k: ((4, 2, T), "int32") for k in
                             ("tokens", "positions", "segment_ids", "targets")},
                          "loss_mask": ((4, 2, T), "float32"), "valid": ((4, 2), "bool"),
                          "scores": ((4, 2), "float32"), "margin": ((4,), "float32"),
                          "label": ((4,), "float32"), "example_valid": ((4,), "bool"),
                          "index": ((4,), "int32")}
        for i in np.flatnonzero(batch["example_valid"]):
            m = batch["loss_mask"][i, 0] > 0
            text = tok.decode(batch["targets"][i, 0][m], skip_special_tokens=True)
            rec, ex = expected[text]
            seen.append(text)
            _assert_row(batch, i, 0, ex.prompt, ex.responses[0], pad)  # same prompt ids in both
            _assert_row(batch, i, 1, ex.prompt, ex.responses[1], pad)
            assert batch["targets"][i, 1][batch["loss_mask"][i, 1] > 0][-1] == tok.eos_token_id
            assert batch["margin"][i] == rec.get("margin", 0.0) and batch["label"][i] == 0
            assert batch["scores"][i].tolist() == [1.0, 0.0] and batch["valid"][i].all()
    assert sorted(seen) == sorted(expected)  # each example once
    last = batches[-1]  # 10 = 4 + 4 + 2: filler rows are empty and invalid
    assert last["example_valid"].tolist() == [True, True, False, False]
    assert not last["loss_mask"][2:].any() and not last["valid"][2:].any()


def test_ranked_ragged_groups_and_top_k(tmp_path, bpe_tokenizer):
    tok, pad = bpe_tokenizer, bpe_tokenizer.pad_token_id
    recs = [{"prompt": "pick one", "responses": ["b", "a"], "scores": [0.5, 0.9]},
            {"prompt": "pick two", "responses": ["x", "y", "z"], "scores": [0.1, 0.3, 0.2]},
            {"prompt": "pick three", "responses": ["p", "q", "r", "s", "t"],
             "scores": [0.0, 4.0, 1.0, 3.0, 2.0]}]
    recs += toy.ranked_records(toy.make_examples(3, 1), k=4)
    path = _write(tmp_path, "ranked", recs)
    cfg = {"num_responses": 4, "chat_template": False}
    it = make_preference_eval_iterator(path, tok, cfg, kind="ranked", batch_size=6, seq_len=T)
    (batch,) = list(it)
    check_preference_batch(batch, pad)
    assert batch["tokens"].shape == (6, 4, T)
    assert batch["valid"][:3].tolist() == [[1, 1, 0, 0], [1, 1, 1, 0], [1, 1, 1, 1]]
    assert batch["valid"][3:].all() and it.pref_stats.ranked_top_k == 1
    np.testing.assert_allclose(batch["scores"][:3], [[0.9, 0.5, 0, 0], [0.3, 0.2, 0.1, 0],
                                                     [4.0, 3.0, 2.0, 1.0]], rtol=1e-6)
    assert np.all(np.diff(batch["scores"][3:], axis=1) <= 0)  # best first
    for i, ex in enumerate(_expected(tok, recs, "ranked", cfg)):
        for k, resp in enumerate(ex.responses):
            _assert_row(batch, i, k, ex.prompt, resp, pad)
    order = [tok.decode(batch["targets"][2, k][batch["loss_mask"][2, k] > 0],
                        skip_special_tokens=True) for k in range(4)]
    assert order == ["q", "s", "t", "r"]  # top 4 of 5 by score; "p" (0.0) is dropped
    assert not batch["loss_mask"][0, 2:].any() and not batch["segment_ids"][0, 2:].any()


def test_kto_mismatched_slot_from_next_example(tmp_path, bpe_tokenizer):
    tok, pad = bpe_tokenizer, bpe_tokenizer.pad_token_id
    recs = toy.kto_records(toy.make_examples(7, 2))
    path = _write(tmp_path, "kto", recs)
    expected = _expected(tok, recs, "kto")
    batches = list(make_preference_eval_iterator(path, tok, {}, kind="kto", batch_size=4,
                                                 seq_len=T))
    assert [b["example_valid"].tolist() for b in batches] == [[True] * 4, [True] * 3 + [False]]
    for n, batch in enumerate(batches):
        check_preference_batch(batch, pad)
        real = expected[4 * n:4 * n + 4]
        for i, ex in enumerate(real):
            other = real[(i + 1) % len(real)]  # (i + 1) mod the real examples of this batch
            _assert_row(batch, i, 0, ex.prompt, ex.responses[0], pad)
            _assert_row(batch, i, 1, ex.prompt, other.responses[0], pad)
            label = float(recs[4 * n + i]["label"])
            assert batch["label"][i] == label and batch["scores"][i].tolist() == [label, 0.0]
    assert sorted(b["label"][b["example_valid"]].sum() for b in batches) == sorted(
        [sum(r["label"] for r in recs[:4]), sum(r["label"] for r in recs[4:])])


def test_kto_label_and_completion_formats(bpe_tokenizer):
    tok = bpe_tokenizer
    ex = format_kto({"prompt": "hi", "completion": "yo", "label": False}, tok, PLAIN)
    assert ex.label == 0.0 and ex.responses[0].tolist() == _ids(tok, "yo") + [tok.eos_token_id]
    msgs = format_kto({"prompt": [{"role": "user", "content": "hi"}], "label": True,
                       "completion": [{"role": "assistant", "content": "yo"}]}, tok)
    assert msgs.label == 1.0 and msgs.prompt.tolist() == format_pair(
        {"prompt": "hi", "chosen": "yo", "rejected": "no"}, tok).prompt.tolist()
    ranked = format_ranked({"prompt": "q", "responses": ["a", "b", "c"], "scores": [1, 3, 2]},
                           tok, {"num_responses": 2})
    assert ranked.scores.tolist() == [3.0, 2.0] and ranked.dropped_responses == 1


def test_spm_tokenizer_pairs(spm_tokenizer):
    tok = spm_tokenizer
    rec = {"prompt": "Say hi", "chosen": "hi there", "rejected": "no"}
    chat = format_pair(rec, tok)  # Llama-2 [INST] template: responses end with </s>
    user = [{"role": "user", "content": "Say hi"}]
    assert chat.prompt.tolist() == _ids(tok, tok.apply_chat_template(
        user, tokenize=False, add_generation_prompt=True))
    assert chat.prompt[0] == tok.bos_token_id and chat.n_keep == 1
    assert all(r[-1] == tok.eos_token_id and (r[:-1] != tok.eos_token_id).all()
               for r in chat.responses)
    assert tok.decode(chat.responses[0], skip_special_tokens=True).strip() == "hi there"
    plain = format_pair(rec, tok, PLAIN)
    assert plain.prompt.tolist() == tok("Say hi")["input_ids"]
    batch = collate_one(tok, chat)
    check_preference_batch(batch, tok.pad_token_id)
    _assert_row(batch, 0, 0, chat.prompt, chat.responses[0], tok.pad_token_id)


def collate_one(tok, ex):
    from alignjax.data.preference import _Collate

    return _Collate("pair", 2, 2, 64, tok.pad_token_id)([ex])


def test_format_pair_batch_for_scoring(bpe_tokenizer):
    tok = bpe_tokenizer
    prompts = ["What is 2+2?", [{"role": "user", "content": "Name a color."}], "word " * 60]
    responses = ["It is 4.", "Red.", "ok"]
    batch = format_pair_batch(tok, prompts, responses, seq_len=40)
    check_preference_batch(batch, tok.pad_token_id)
    assert batch["tokens"].shape == (3, 1, 40) and batch["example_valid"].all()
    want = format_pair({"prompt": prompts[0], "chosen": responses[0], "rejected": "x"}, tok)
    _assert_row(batch, 0, 0, want.prompt, want.responses[0], tok.pad_token_id)
    assert batch["segment_ids"][2, 0].sum() == 40  # long prompt cut on the left
    assert batch["targets"][2, 0, 38] == tok.eos_token_id
    tiny = format_pair_batch(tok, ["a"], ["ok"], seq_len=8)  # the templated prompt alone is > 8
    assert tiny["tokens"][0, 0, 0] == tok.bos_token_id and tiny["loss_mask"].sum() > 0


# ----------------------------------------------------------------------------- truncation


def test_fit_example_policies():
    ex = PrefExample(np.arange(10, 20, dtype=np.int32),  # BOS 10, prompt 11..19
                     (np.arange(100, 106, dtype=np.int32), np.arange(200, 203, dtype=np.int32)),
                     np.array([1, 0], np.float32), n_keep=1)
    assert fit_example(ex, 16)[1] == "ok"
    left, status = fit_example(ex, 14)  # cut 2 prompt tokens after BOS, for both responses
    assert status == "truncated" and left.prompt.tolist() == [10, 13, 14, 15, 16, 17, 18, 19]
    assert [r.tolist() for r in left.responses] == [[100, 101, 102, 103, 104, 105], [200, 201, 202]]
    short = dataclasses.replace(ex, prompt=ex.prompt[:3])
    tiny, _ = fit_example(short, 4)  # prompt cut down to BOS, then responses cut on the right
    assert tiny.prompt.tolist() == [10] and [r.tolist() for r in tiny.responses] == [
        [100, 101, 102], [200, 201, 202]]
    right, _ = fit_example(ex, 13, "truncate_right")
    assert right.prompt.tolist() == ex.prompt.tolist()
    assert right.responses[0].tolist() == [100, 101, 102]
    assert fit_example(ex, 15, "drop") == (None, "dropped")
    # A prompt that alone leaves fewer than min_response_tokens is skipped under every policy.
    for policy in ("truncate_left_prompt", "truncate_right", "drop"):
        assert fit_example(ex, 12, policy, min_response_tokens=3) == (None, "prompt_too_long")
    assert fit_example(ex, 13, "truncate_right", min_response_tokens=3)[1] == "truncated"
    with pytest.raises(DataError, match="truncation"):
        fit_example(ex, 12, "middle")


def test_pipeline_counts_skips_and_warns(tmp_path, bpe_tokenizer, caplog):
    tok = bpe_tokenizer
    recs = [{"prompt": "short", "chosen": "yes", "rejected": "no"},
            {"prompt": "word " * 40, "chosen": "yes", "rejected": "no"},  # prompt alone too long
            {"prompt": "short", "chosen": "go " * 20, "rejected": "no"}]  # response too long
    path = _write(tmp_path, "long", recs)
    kw = dict(kind="pair", seed=0, batch_size=3, seq_len=24, num_epochs=1, shuffle=False)
    cfg = {**PLAIN, "min_response_tokens": 4}
    with caplog.at_level(logging.WARNING, logger="alignjax.data.preference"):
        it = make_preference_iterator(path, tok, cfg, **kw)
        (batch,) = list(it)
    assert batch["example_valid"].tolist() == [True, True, False]
    s = it.pref_stats.as_dict()
    assert (s["examples"], s["truncated"], s["dropped_prompt_too_long"]) == (2, 1, 1)
    assert f"{path}:2" in caplog.text and f"{path}:3" in caplog.text
    truncated = batch["segment_ids"][1].sum(-1)
    assert truncated.max() == 24 and batch["tokens"][1, 0, 0] == tok.bos_token_id
    it = make_preference_iterator(path, tok, {**cfg, "truncation": "drop"}, **kw)
    assert sum(b["example_valid"].sum() for b in it) == 1
    assert it.pref_stats.dropped_too_long == 1 and it.pref_stats.dropped_prompt_too_long == 1


# ----------------------------------------------------------------------------- bad records

GOOD = {"pair": {"prompt": "p", "chosen": "a", "rejected": "b"},
        "ranked": {"prompt": "p", "responses": ["a", "b"], "scores": [1, 0]},
        "kto": {"prompt": "p", "completion": "a", "label": True}}
BAD = [
    ("pair", {"prompt": "p", "chosen": "a"}, r"lacks \['rejected'\].*expected keys.*'chosen'"),
    ("pair", {"prompt": "p", "chosen": "", "rejected": "b"}, "empty chosen"),
    ("pair", {"prompt": "p", "chosen": "a", "rejected": [{"role": "assistant", "content": " "}]},
     "empty rejected"),
    ("pair", {"prompt": "p", "chosen": "same", "rejected": "same"}, "identical"),
    ("pair", {"chosen": "\n\nHuman: a\n\nAssistant: b", "rejected": "\n\nHuman: a\n\nAssistant: b"},
     "identical"),
    ("pair", {"chosen": "\n\nHuman: a", "rejected": "\n\nHuman: b"}, "share no"),
    ("pair", {"prompt": "p", "chosen": "a", "rejected": "b", "margin": "big"}, "'margin' must be"),
    ("ranked", {"prompt": "p", "responses": ["a", "b", "c"], "scores": [1, 2]},
     "'responses' has 3 items but 'scores' 2"),
    ("ranked", {"prompt": "p", "responses": ["a"], "scores": [1]}, ">= 2 responses"),
    ("kto", {"prompt": "p", "completion": "a", "label": "yes"}, "'label' must be a bool"),
    ("kto", {"prompt": "p", "completion": "a"}, r"lacks \['label'\]"),
    ("kto", '{"prompt": "p", "completion"', "malformed JSON"),
]


@pytest.mark.parametrize("kind,record,message", BAD)
def test_bad_record_raises_with_file_and_line(tmp_path, bpe_tokenizer, kind, record, message):
    path = tmp_path / "bad.jsonl"
    path.write_text(f"{json.dumps(GOOD[kind])}\n\n"  # a blank line: line numbers, not indices
                    f"{record if isinstance(record, str) else json.dumps(record)}\n")
    cfg = {"num_responses": 2}
    with pytest.raises(DataError, match=rf"bad\.jsonl:3: .*{message}"):
        list(make_preference_eval_iterator(str(path), bpe_tokenizer, cfg, kind=kind, batch_size=2,
                                           seq_len=T))


def test_skip_invalid_counts_instead_of_raising(tmp_path, bpe_tokenizer):
    path = tmp_path / "mixed.jsonl"
    lines = [json.dumps(GOOD["pair"])] + [json.dumps(r) for k, r, _ in BAD if k == "pair"]
    path.write_text("\n".join(lines + ["{not json", json.dumps(GOOD["pair"])]) + "\n")
    with pytest.raises(DataError, match=r"mixed\.jsonl:2: "):
        list(make_preference_iterator(str(path), bpe_tokenizer, {}, kind="pair", seed=0,
                                      batch_size=2, seq_len=T, num_epochs=1, shuffle=False))
    it = make_preference_iterator(str(path), bpe_tokenizer, {"skip_invalid": True}, kind="pair",
                                  seed=0, batch_size=2, seq_len=T, num_epochs=1)
    assert [b["example_valid"].tolist() for b in it] == [[True, True]]
    n_bad = len(lines) - 1 + 1  # the bad pair records and the malformed line
    assert it.pref_stats.skipped_invalid == n_bad and it.pref_stats.examples == 2


# ----------------------------------------------------------------------------- iterators


def test_config_errors_and_configdict(tmp_path, bpe_tokenizer):
    tok = bpe_tokenizer
    path = _write(tmp_path, "c", [GOOD["ranked"]] * 3)
    kw = dict(seed=0, batch_size=2, seq_len=T)
    bad_cfgs = [({}, "pairs", "kind"), ({"format": "unpaired"}, "pair", "format"),
                ({}, "ranked", "num_responses"),
                ({"num_responses": 2, "truncation": "middle"}, "ranked", "truncation")]
    for cfg, kind, match in bad_cfgs:
        with pytest.raises(DataError, match=match):
            make_preference_iterator(path, tok, cfg, kind=kind, **kw)
    ml_collections = pytest.importorskip("ml_collections")
    cfg = ml_collections.ConfigDict({"num_responses": 3, "format": "auto", "other": 1})
    batch = next(make_preference_iterator(path, tok, cfg, kind="ranked", **kw))
    assert batch["valid"].tolist() == [[True, True, False]] * 2


@pytest.mark.parametrize("kind", ["pair", "kto"])
def test_iterator_state_restore(tmp_path, bpe_tokenizer, kind):
    exs = toy.make_examples(11, 3)
    recs = toy.preference_records(exs) if kind == "pair" else toy.kto_records(exs)
    path = _write(tmp_path, kind, recs)
    kw = dict(kind=kind, seed=7, batch_size=3, seq_len=T)
    it = make_preference_iterator(path, bpe_tokenizer, {}, **kw)  # infinite: crosses epochs
    for _ in range(3):
        next(it)
    state = json.loads(json.dumps(it.get_state()))
    expected = [next(it) for _ in range(5)]
    resumed = make_preference_iterator(path, bpe_tokenizer, {}, **kw)
    resumed.set_state(state)
    for want in expected:
        got = next(resumed)
        assert set(got) == set(want)
        for k in want:
            np.testing.assert_array_equal(got[k], want[k])


def test_process_sharding_and_epoch_reshuffle(tmp_path, bpe_tokenizer):
    tok = bpe_tokenizer
    recs = toy.preference_records(toy.make_examples(14, 4))
    path = _write(tmp_path, "shard", recs)

    def chosen(i, count, epochs=1, seed=5):
        it = make_preference_iterator(path, tok, PLAIN, kind="pair", seed=seed, batch_size=2,
                                      seq_len=T, process_index=i, process_count=count,
                                      num_epochs=epochs)
        return [t.replace(tok.eos_token, "") for t in _response_texts(tok, list(it))]

    shards = [chosen(i, 3) for i in range(3)]
    assert [len(s) for s in shards] == [5, 5, 4]
    assert sorted(sum(shards, [])) == sorted(r["chosen"] for r in recs)  # disjoint and covering
    # every 3rd of the one global order: a step's records do not depend on the process count
    assert shards[0] == chosen(0, 1)[0::3] and shards[1] == chosen(0, 1)[1::3]
    two = chosen(0, 1, epochs=2)
    assert two[:14] == chosen(0, 1) and sorted(two[14:]) == sorted(two[:14])
    assert two[14:] != two[:14]  # reshuffled each epoch
    assert chosen(0, 1, seed=6) != two[:14]
    with pytest.raises(DataError, match="process_index"):
        chosen(3, 3)


def test_eval_iterator_covers_each_example_once(tmp_path, bpe_tokenizer):
    tok = bpe_tokenizer
    recs = toy.preference_records(toy.make_examples(10, 5))
    path = _write(tmp_path, "eval", recs)
    per_process = []
    for i in range(3):
        batches = list(make_preference_eval_iterator(path, tok, PLAIN, kind="pair", batch_size=3,
                                                     seq_len=T, process_index=i, process_count=3))
        for b in batches:
            check_preference_batch(b, tok.pad_token_id)
            assert not b["loss_mask"][~b["example_valid"]].any()
        per_process.append(batches)
    assert [len(b) for b in per_process] == [2, 2, 2]  # hosts stay in step
    assert [int(sum(b["example_valid"].sum() for b in bs)) for bs in per_process] == [4, 3, 3]
    texts = [_response_texts(tok, bs) for bs in per_process]
    strip = lambda ts: [t.replace(tok.eos_token, "") for t in ts]  # noqa: E731
    assert strip(texts[0]) == [r["chosen"] for r in recs[0::3]]  # in order
    assert sorted(strip(sum(texts, []))) == sorted(r["chosen"] for r in recs)
