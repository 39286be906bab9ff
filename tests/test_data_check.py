"""`alignjax data check` (alignjax.data.check): duplicate prompts, train/eval overlap, token lengths.

The clean data is built to trip a detector that is too loose: its prompts differ from each other in
one number only (Jaccard 0.67 over word 3-grams, 0.88 over single words), and the short toy-style
prompts differ in one digit. Near duplicates are long prompts with one word changed (0.85).
"""
import json
import logging

import pytest

from alignjax.data import check
from alignjax.data.formatting import FormatConfig, SFTFormatter, num_targets, truncate
from alignjax.data.preference_format import PreferenceFormatter, fit_example
from alignjax.data.sources import DataError, open_sources

LONG = ("In the small village by the river the baker wakes before dawn to light the old stone oven "
        "and prepare bread for the market while the fishermen mend their nets and the children "
        "walk slowly to the school on the hill")  # 41 words
LONG_EVAL = ("Describe how a careful gardener plans the spring planting of tomatoes beans and squash "
             "so that every bed gets enough sun water and space while the soil stays healthy for "
             "many years of harvests to come")  # 37 words


def _arith(a: int, b: int) -> str:
    return f"Please add {a} and {b}, showing each step of the work clearly, then check the answer twice."


def _clean_train() -> list[dict]:
    recs = [{"prompt": _arith(a, b), "completion": str(a + b)} for a in range(10, 20) for b in (3, 5)]
    recs += [{"messages": [{"role": "user", "content": f"sort the numbers: 3 1 {d}"},
                           {"role": "assistant", "content": " ".join(sorted(f"31{d}"))}]}
             for d in range(4, 9)]
    recs.append({"text": LONG})
    return recs


def _clean_eval() -> list[dict]:
    recs = [{"prompt": _arith(a, 3), "completion": str(a + 3)} for a in range(20, 25)]
    recs.append({"prompt": LONG_EVAL, "completion": "plan"})
    recs.append({"prompt": "sort the numbers: 3 1 9", "completion": "1 3 9"})
    return recs


def _write(path, records, raw_lines=()):
    with open(path, "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in records)
        f.writelines(line + "\n" for line in raw_lines)
    return str(path)


def _planted_train() -> list[dict]:
    recs = _clean_train()
    # exact duplicate (case, whitespace, another format): of line 1's prompt
    recs.append({"messages": [{"role": "user", "content": "  PLEASE add 10 and  3, showing each step of "
                                                          "the work clearly, then check the answer twice."},
                              {"role": "assistant", "content": "13"}]})
    recs.append({"prompt": LONG.replace("bread", "cakes"), "completion": "ok"})  # near dup of the text
    recs.append({"prompt": _arith(22, 3).upper(), "completion": "25"})  # = eval line 3
    recs.append({"prompt": LONG_EVAL.replace("tomatoes", "peppers"), "completion": "x"})  # ~ eval 6
    return recs


def test_clean_set_has_no_findings():
    train, evals = _clean_train(), _clean_eval()
    prompts = [check.record_prompt(r) for r in train]
    eval_prompts = [check.record_prompt(r) for r in evals]
    assert check.find_duplicates(prompts) == {"exact": [], "near": []}
    assert check.find_overlaps(prompts, eval_prompts) == {"exact": [], "near": []}
    # the clean set is close to the threshold: one number apart is 0.67 over 3-grams, 0.88 over words
    a, b = _arith(10, 3), _arith(11, 3)
    assert check.jaccard(check.shingles(a), check.shingles(b)) == pytest.approx(12 / 18)
    assert check.jaccard(check.shingles(a, 1), check.shingles(b, 1)) > 0.8


def test_finds_planted_duplicates_and_overlaps(tmp_path):
    train = _write(tmp_path / "train.jsonl", _planted_train())
    evals = _write(tmp_path / "eval.jsonl", _clean_eval())
    report = check.check_data(train, evals)
    d, o = report["duplicates"], report["overlap"]
    assert d["exact"]["groups"] == 1 and d["exact"]["records"] == 1
    assert d["exact"]["examples"][0]["locations"] == [f"{train}:1", f"{train}:27"]
    assert d["near"]["pairs"] == 1
    near = d["near"]["examples"][0]
    assert (near["a"], near["b"]) == (f"{train}:26", f"{train}:28")
    assert near["jaccard"] == pytest.approx(36 / 42, abs=1e-4)  # 3 of 39 shingles changed
    assert o["exact"]["train_records"] == 1 and o["exact"]["eval_records"] == 1
    assert o["exact"]["examples"][0]["train"] == f"{train}:29"
    assert o["exact"]["examples"][0]["eval"] == f"{evals}:3"
    assert o["near"]["pairs"] == 1
    assert (o["near"]["examples"][0]["train"], o["near"]["examples"][0]["eval"]) == (
        f"{train}:30", f"{evals}:6")
    assert check.findings(report) == 4
    text = check.render(report)
    assert f"{train}:1, {train}:27" in text and f"{train}:30 ~ {evals}:6" in text


def test_near_pairs_are_verified_exactly():
    """Every reported pair meets the threshold by exact Jaccard; pairs just below are left out."""
    base = [f"word{i}" for i in range(30)]
    variants = [" ".join(base)]
    for k in range(1, 6):  # k words changed, spread out: J falls with k
        w = list(base)
        for j in range(k):
            w[3 + 6 * j] = f"new{j}"
        variants.append(" ".join(w))
    sets = [check.shingles(v) for v in variants]
    expected = sorted((i, j, check.jaccard(sets[i], sets[j]))
                      for i in range(len(sets)) for j in range(i + 1, len(sets))
                      if check.jaccard(sets[i], sets[j]) >= 0.7)
    got = check.find_duplicates(variants, threshold=0.7)["near"]
    assert got == expected and len(got) >= 3
    assert all(jac >= 0.7 for _, _, jac in got)


def test_record_prompt_formats():
    msgs = [{"role": "system", "content": "be nice"}, {"role": "user", "content": "hi"},
            {"role": "assistant", "content": "hello"}, {"role": "user", "content": "sort 2 1"},
            {"role": "assistant", "content": "1 2"}]
    assert check.record_prompt({"messages": msgs}) == "hi\nsort 2 1"
    assert check.record_prompt({"prompt": "p", "completion": "c"}) == "p"
    assert check.record_prompt({"text": "all of it"}) == "all of it"
    assert check.record_prompt({"prompt": "p", "chosen": "a", "rejected": "b"}) == "p"
    assert check.record_prompt({"prompt": "ignored", "chosen": msgs, "rejected": msgs[:4] + [
        {"role": "assistant", "content": "2 1"}]}) == "hi\nsort 2 1"
    hh = "\n\nHuman: what is 2+2?\n\nAssistant: 4\n\nHuman: and 3+3?\n\nAssistant:"
    assert check.record_prompt({"chosen": hh + " 6", "rejected": hh + " 7"}) == "what is 2+2?\nand 3+3?"
    assert check.record_prompt({"instruction": "rate this", "completions": []}) == "rate this"
    with pytest.raises(ValueError, match="no prompt"):
        check.record_prompt({"foo": 1})


def _lengthy_sft() -> list[dict]:
    recs = []
    for k in range(1, 30, 3):
        recs.append({"prompt": " ".join(["cat dog"] * k), "completion": " ".join(["red"] * (k % 7 + 1))})
        recs.append({"messages": [{"role": "user", "content": "sort " + " ".join("9" * k)},
                                  {"role": "assistant", "content": " ".join("9" * (k // 2 + 1))}]})
    recs.append({"text": " ".join(["moon"] * 40)})
    return recs


@pytest.mark.parametrize("policy", ["truncate_left_prompt", "truncate_right", "drop"])
def test_length_stats_match_the_formatter(tmp_path, bpe_tokenizer, policy):
    import numpy as np

    from alignjax.data.pipeline import SFTStats, _TokenizeIndex
    path = _write(tmp_path / "sft.jsonl", _lengthy_sft())
    seq_len, cfg = 24, {"truncation": policy}
    report = check.check_data(path, None, bpe_tokenizer, cfg, seq_len)
    ln = report["lengths"]["train"]
    fmt = SFTFormatter(bpe_tokenizer, FormatConfig.from_config(cfg))
    source = open_sources(path)
    exs = [fmt(source[i]) for i in range(len(source))]
    status = []
    for ex in exs:
        kept, s = truncate(ex, seq_len, policy)
        status.append("no_loss" if kept is not None and num_targets(kept) == 0 else s)
    assert ln["truncated"] == status.count("truncated")
    assert ln["dropped"] == status.count("dropped") + status.count("no_loss")
    assert ln["truncated"] + ln["dropped"] > 0 and ln["records"] == len(exs)
    prompt = np.array([ex.prompt_len for ex in exs])
    assert ln["prompt_tokens"]["max"] == prompt.max() and ln["prompt_tokens"]["min"] == prompt.min()
    assert ln["prompt_tokens"]["p95"] == pytest.approx(np.percentile(prompt, 95))
    assert ln["response_tokens"]["mean"] == pytest.approx(
        np.mean([len(ex) - ex.prompt_len for ex in exs]), abs=0.01)
    # ... and what the training pipeline counts
    stats = SFTStats()
    tok = _TokenizeIndex(source, fmt, seq_len, bpe_tokenizer.pad_token_id, stats)
    for i in range(len(source)):
        tok(i)
    assert ln["truncated"] == stats.truncated
    assert ln["dropped"] == stats.dropped_too_long + stats.dropped_no_loss


def test_length_stats_preference(tmp_path, bpe_tokenizer):
    recs = [{"prompt": " ".join(["cat"] * k), "chosen": " ".join(["red"] * (k % 5 + 1)),
             "rejected": "blue"} for k in range(1, 40, 4)]
    path = _write(tmp_path / "pairs.jsonl", recs)
    report = check.check_data(path, None, bpe_tokenizer, None, 40)
    ln = report["lengths"]["train"]
    assert ln["kind"] == "pair"
    fmt = PreferenceFormatter(bpe_tokenizer, None, "pair")  # chat template: the tokenizer has one
    status = [fit_example(fmt(r), 40)[1] for r in recs]
    assert ln["truncated"] == status.count("truncated") > 0
    assert ln["dropped"] == status.count("prompt_too_long") + status.count("dropped") > 0
    assert ln["prompt_tokens"]["max"] == max(len(fmt(r).prompt) for r in recs)


def test_invalid_records_are_listed_and_bad_files_are_errors(tmp_path):
    path = _write(tmp_path / "t.jsonl", [{"prompt": "a b c", "completion": "x"}, {"foo": 1}])
    report = check.check_data(path)
    assert report["splits"]["train"]["invalid"] == 1
    assert report["splits"]["train"]["invalid_examples"][0].startswith(f"{path}:2: no prompt")
    bad = _write(tmp_path / "bad.jsonl", [{"prompt": "a", "completion": "b"}], ['{"prompt": "a",'])
    with pytest.raises(DataError, match=rf"{bad}:2: malformed JSON"):
        check.check_data(bad)
    with pytest.raises(DataError, match="nope.jsonl"):
        check.check_data(str(tmp_path / "nope.jsonl"))


def test_cli_end_to_end(tmp_path, bpe_tokenizer, capsys):
    from alignjax.cli import main
    tok_dir = tmp_path / "tok"
    bpe_tokenizer.save_pretrained(tok_dir)
    train = _write(tmp_path / "train.jsonl", _planted_train())
    evals = _write(tmp_path / "eval.jsonl", _clean_eval())
    out = tmp_path / "out"
    main(["data", "check", "--train", train, "--eval", evals, "--tokenizer", str(tok_dir),
          "--seq-len", "20", "--out", str(out)])
    text = capsys.readouterr().out
    assert "# Data check" in text and f"{train}:29 = {evals}:3" in text
    assert "seq_len 20" in text and f"wrote {out}/check.json" in text
    report = json.loads((out / "check.json").read_text())
    assert check.findings(report) == 4
    assert report["lengths"]["train"]["records"] == len(_planted_train())
    assert report["lengths"]["train"]["truncated"] > 0


def test_cli_errors_name_file_and_line(tmp_path, capsys):
    from alignjax.cli import main
    bad = _write(tmp_path / "bad.jsonl", [{"prompt": "a", "completion": "b"}], ["{not json"])
    for argv, expected in ((["--train", bad], f"{bad}:2: malformed JSON"),
                           (["--train", str(tmp_path / "missing.jsonl")], "missing.jsonl")):
        with pytest.raises(SystemExit) as e:
            main(["data", "check", *argv])
        assert e.value.code == 2
        err = capsys.readouterr().err
        assert expected in err and "Traceback" not in err


def test_check_overlap_at_start_up_warns(tmp_path, caplog):
    from ml_collections import ConfigDict
    train = _write(tmp_path / "train.jsonl", _planted_train())
    evals = _write(tmp_path / "eval.jsonl", _clean_eval())
    off = ConfigDict({"check_overlap": False})
    with caplog.at_level(logging.INFO, logger="alignjax.data.check"):
        assert check.warn_overlap(off, [train], [evals]) is None
    assert not caplog.records
    on = ConfigDict({"check_overlap": True})
    with caplog.at_level(logging.WARNING, logger="alignjax.data.check"):
        report = check.warn_overlap(on, [open_sources(train)], [evals])
    assert report is not None and check.findings(report) == 4
    [rec] = [r for r in caplog.records if r.levelno == logging.WARNING]
    msg = rec.getMessage()
    assert "1 training records repeat an evaluation prompt exactly and 1 nearly" in msg
    assert f"{train}:29 = {evals}:3" in msg and f"{train}:1 = {train}:27" in msg
    caplog.clear()
    clean = _write(tmp_path / "clean.jsonl", _clean_train())
    with caplog.at_level(logging.WARNING, logger="alignjax.data.check"):
        assert check.findings(check.warn_overlap(on, [clean], None)) == 0
    assert not caplog.records


def test_config_key_defaults_off():
    from alignjax.config import load_config
    for spec in ("configs/sft.py:tiny", "configs/dpo.py:tiny", "configs/reward.py:tiny"):
        assert load_config(spec).data.check_overlap is False


def test_lsh_recall_against_brute_force():
    """On toy prompts (many pairs exactly at 0.8: "sort the numbers: 6 5 9" ~ "... 6 5 9 3") LSH
    finds every pair that the exact all-pairs Jaccard finds."""
    from alignjax.data import toy
    prompts = [e.prompt for e in toy.make_examples(2500, seed=3)]
    sets = [check.shingles(p) for p in prompts]
    truth = {(i, j) for i in range(len(sets)) for j in range(i + 1, len(sets))
             if len(sets[i] & sets[j]) >= 0.8 * len(sets[i] | sets[j])}
    got = {(i, j) for i, j, _ in check.find_duplicates(prompts)["near"]}
    assert len(truth) >= 5 and got == truth
    bands, rows = check.lsh_params(0.8)
    assert bands * rows <= check.NUM_PERM and 1 - (1 - 0.8**rows) ** bands >= 0.999


def test_lsh_recall_exactly_at_the_threshold():
    """400 pairs at Jaccard exactly 0.8 (6 random words and the same plus one: 4 of 5 shingles):
    LSH must make nearly all of them candidates (>= 0.999 each by its parameters)."""
    import numpy as np
    rng = np.random.default_rng(0)
    prompts = []
    for _ in range(400):
        w = [f"w{x}" for x in rng.choice(10**6, 7, replace=False)]
        prompts += [" ".join(w[:6]), " ".join(w)]
    near = check.find_duplicates(prompts)["near"]
    assert all(j == i + 1 and i % 2 == 0 and jac == pytest.approx(0.8) for i, j, jac in near)
    assert len(near) >= 396  # expected misses 0.4; a threshold-tuned LSH (p = 0.95) misses ~20


def test_length_stats_of_pairs_built_from_ratings(tmp_path, bpe_tokenizer, capsys):
    """With data.from_ratings the lengths are those of the pairs training builds (all_pairs: 3
    per record with 3 distinct scores), duplicates are counted over the rated records, and a
    rated record without responses is listed as invalid, not raised."""
    recs = [{"prompt": " ".join(["cat"] * k),
             "responses": [{"text": "red " * (k % 4 + 1), "score": 1}, {"text": "blue", "score": 3},
                           {"text": "green green", "score": 2}]} for k in range(1, 30, 3)]
    recs.append({"prompt": recs[0]["prompt"], "responses": [{"text": "x", "score": 1}]})
    path = _write(tmp_path / "rated.jsonl", recs)
    cfg = {"from_ratings": "all_pairs"}
    report = check.check_data(path, None, bpe_tokenizer, cfg, 30)
    ln = report["lengths"]["train"]
    assert ln["kind"] == "pair" and ln["from_ratings"] == "all_pairs"
    fmt = PreferenceFormatter(bpe_tokenizer, None, "pair")
    pairs = [{"prompt": r["prompt"], "chosen": a["text"], "rejected": b["text"]}
             for r in recs[:-1] for a in r["responses"] for b in r["responses"]
             if a["score"] > b["score"]]
    assert ln["records"] == len(pairs) == 3 * (len(recs) - 1)
    assert ln["response_tokens"]["max"] == max(len(t) for p in pairs for t in fmt(p).responses)
    status = [fit_example(fmt(p), 30)[1] for p in pairs]
    assert ln["truncated"] == status.count("truncated") > 0
    assert report["splits"]["train"]["invalid"] == 1
    assert report["splits"]["train"]["invalid_examples"][0].startswith(f"{path}:{len(recs)}")
    assert report["duplicates"]["exact"]["groups"] == 1  # the last record repeats the first prompt

    from alignjax.cli import main
    main(["data", "check", "--config", "configs/dpo.py:tiny", "--tokenizer", "", "--eval", "",
          f"--config.data.train={path}", "--config.data.from_ratings=best_vs_worst"])
    assert f"built by data.from_ratings=best_vs_worst, {len(recs) - 1} records formatted" in \
        capsys.readouterr().out
    with pytest.raises(SystemExit):
        main(["data", "check", "--train", path, "--config.data.from_ratings=all_pairs"])
    assert "overrides need --config" in capsys.readouterr().err
