"""Tests for the toy instruction suite (alignjax/data/toy.py): pure Python, no jax."""

import json

import numpy as np
import pytest

from alignjax.data import toy

N_MANY = 3000  # enough to hit every template and length of every task many times


@pytest.fixture(scope="module")
def many():
    return toy.make_examples(N_MANY, seed=123)


def test_deterministic_by_seed():
    a, b = toy.make_examples(300, seed=7), toy.make_examples(300, seed=7)
    assert a == b
    assert [e.prompt for e in a] != [e.prompt for e in toy.make_examples(300, seed=8)]
    rng_a, rng_b = np.random.default_rng(0), np.random.default_rng(0)
    assert [toy.wrong_answer(e, rng_a) for e in a] == [toy.wrong_answer(e, rng_b) for e in a]
    assert toy.toy_splits(100, 20, seed=1) == toy.toy_splits(100, 20, seed=1)


def test_tasks_balanced_and_selectable(many):
    counts = {t: sum(e.task == t for e in many) for t in toy.TASKS}
    assert set(counts) == {"reverse", "sort", "upper", "count", "repeat", "pick"}
    assert max(counts.values()) - min(counts.values()) <= 1
    only = toy.make_examples(50, seed=0, tasks=["sort", "count"])
    assert {e.task for e in only} == {"sort", "count"}
    with pytest.raises(ValueError):
        toy.make_examples(5, seed=0, tasks=["nope"])


def test_splits_disjoint_and_sized():
    s = toy.toy_splits(n_train=2000, n_eval=200, seed=0)
    assert len(s["train"]) == 2000 and len(s["eval"]) == 200
    train, evals = [e.prompt for e in s["train"]], [e.prompt for e in s["eval"]]
    assert len(set(train)) == len(train) and len(set(evals)) == len(evals)
    assert not set(train) & set(evals)
    assert {e.task for e in s["eval"]} == set(toy.TASKS)


def test_checker_accepts_answers_rejects_wrong_answers(many):
    rng = np.random.default_rng(0)
    for e in many:
        assert toy.check(e, e.answer) == 1.0
        assert toy.check(e, f"  {e.answer}\n") == 1.0  # surrounding whitespace is forgiven
        wrong = toy.wrong_answer(e, rng)
        assert wrong != e.answer and wrong.strip() == wrong and wrong
        assert toy.check(e, wrong) == 0.0, (e.prompt, wrong)
        for w in toy.wrong_answers(e, rng, 5):
            assert toy.check(e, w) == 0.0


def test_checker_from_prompt_agrees_with_example(many):
    rng = np.random.default_rng(1)
    for e in many:
        assert toy.parse(e.prompt) == (e.task, e.meta)
        assert toy.from_prompt(e.prompt) == e
        for r in (e.answer, toy.wrong_answer(e, rng), e.answer.lower(), ""):
            assert toy.check(e.prompt, r) == toy.check(e, r)


@pytest.mark.parametrize(
    "prompt, expected",
    [
        ("sort: 3 1 2", {"3 1 2", "3 2 1", "2 1 3", "1 3 2"}),  # unsorted, descending, one swap
        ("count: cat dog fox", {"2", "4"}),  # off by one
        ("uppercase: red cat", {"red cat", "RED cat"}),  # not or half uppercased
        ("first word: cat dog", {"dog", "cat dog"}),  # the other end, the whole list
        ("repeat 2 times: sun", {"sun", "sun sun sun"}),  # wrong number of copies
    ],
)
def test_wrong_answers_are_near_misses(prompt, expected):
    e = toy.from_prompt(prompt)
    rng = np.random.default_rng(0)
    seen = {toy.wrong_answer(e, rng) for _ in range(300)}
    assert expected <= seen and e.answer not in seen


@pytest.mark.parametrize(
    "prompt, good, bads",
    [
        ("sort: 3 1 2", "1 2 3", ["1 3 2", "3 2 1", "1  2 3", "1,2,3", "1 2"]),
        ("sort the numbers: 5 0 5 2", "0 2 5 5", ["0 2 5", "0 5 5 2"]),
        ("reverse: cat dog fox", "fox dog cat", ["cat dog fox", "fox cat dog", "fox dog"]),
        ("reverse the list: red sun", "sun red", ["red sun", "SUN RED"]),
        ("uppercase: red cat", "RED CAT", ["red cat", "RED cat", "Red Cat", "RED"]),
        ("make uppercase: key", "KEY", ["key", "KEY KEY"]),
        ("count: cat dog fox", "3", ["three", "4", "2", "3 3"]),
        ("how many words: sun", "1", ["0", "sun"]),
        ("repeat 3 times: red cat", "red cat red cat red cat", ["red cat red cat", "red red red cat cat"]),
        ("repeat 1 times: hat", "hat", ["hat hat", "HAT"]),
        ("first word: cat dog fox", "cat", ["fox", "dog", "cat dog fox"]),
        ("last word: cat dog fox", "fox", ["cat", "fox."]),
    ],
)
def test_hand_written_cases(prompt, good, bads):
    assert toy.check(prompt, good) == 1.0
    assert toy.check(prompt, f"\n {good} \n") == 1.0
    for bad in bads:
        assert toy.check(prompt, bad) == 0.0, bad


def test_parse_inside_chat_template_and_errors():
    chat = "<|start_header_id|>user<|end_header_id|>\n\nsort: 3 1 2<|eot_id|><|start_header_id|>assistant"
    assert toy.check(chat, "1 2 3") == 1.0
    two_turns = "User: reverse: cat dog\nAssistant: dog cat\nUser: first word: sun moon\nAssistant:"
    assert toy.parse(two_turns)[0] == "pick" and toy.check(two_turns, "sun") == 1.0
    with pytest.raises(ValueError):
        toy.check("what is the capital of france?", "paris")
    with pytest.raises(TypeError):
        toy.check("sort: 2 1", None)


def test_reward_fn_shape_and_dtype(many):
    prompts = [e.prompt for e in many[:12]]
    responses = [e.answer if i % 3 else "nope" for i, e in enumerate(many[:12])]
    r = toy.reward_fn(prompts, responses)
    assert r.shape == (12,) and r.dtype == np.float32
    np.testing.assert_array_equal(r, [0.0 if i % 3 == 0 else 1.0 for i in range(12)])
    assert toy.reward_fn([], []).shape == (0,)
    with pytest.raises(ValueError):
        toy.reward_fn(prompts, responses[:-1])


def test_lengths_bounded(many):
    # Short enough that prompt + answer fits well under 64 tokens for a word-level tokenizer.
    totals = [len(e.prompt.split()) + len(e.answer.split()) for e in many]
    assert max(totals) <= 20
    assert max(len(e.prompt) + len(e.answer) for e in many) <= 120


def test_closed_vocabulary_and_tokenizer(many):
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    tok = Tokenizer(models.WordLevel(unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.train_from_iterator(toy.all_texts(many[:300]), trainers.WordLevelTrainer(special_tokens=["[UNK]"]))
    assert tok.get_vocab_size() < 100
    rng = np.random.default_rng(3)
    unk = tok.token_to_id("[UNK]")
    for e in many:  # held-out prompts, answers and wrong answers never hit an unknown token
        for text in (e.prompt, e.answer, toy.wrong_answer(e, rng)):
            assert unk not in tok.encode(text).ids, text


def test_record_formats(many):
    exs = many[:60]
    pc = toy.sft_records(exs)
    assert all(set(r) == {"prompt", "completion"} for r in pc)
    msgs = toy.sft_records(exs, style="messages")
    assert all([m["role"] for m in r["messages"]] == ["user", "assistant"] for r in msgs)
    assert msgs[0]["messages"][1]["content"] == exs[0].answer
    with pytest.raises(ValueError):
        toy.sft_records(exs, style="chat")

    for r, e in zip(toy.preference_records(exs, seed=0), exs):
        assert set(r) == {"prompt", "chosen", "rejected"}
        assert toy.check(e, r["chosen"]) == 1.0 and toy.check(e, r["rejected"]) == 0.0

    for r, e in zip(toy.ranked_records(exs, k=4, seed=0), exs):
        assert set(r) == {"prompt", "responses", "scores"}
        assert len(r["responses"]) == len(set(r["responses"])) == len(r["scores"]) == 4
        assert r["responses"][0] == e.answer and r["scores"][0] == 1.0
        assert r["scores"] == sorted(r["scores"], reverse=True) and max(r["scores"][1:]) < 0.5

    kto = toy.kto_records(exs, seed=0)
    assert all(set(r) == {"prompt", "completion", "label"} and isinstance(r["label"], bool) for r in kto)
    assert {r["label"] for r in kto} == {True, False}
    assert all(toy.check(r["prompt"], r["completion"]) == float(r["label"]) for r in kto)


def test_main_writes_every_format(tmp_path):
    toy.main(["--out", str(tmp_path), "--n-train", "30", "--n-eval", "6"])
    for fmt in ("sft", "messages", "preference", "ranked", "kto"):
        for split, n in (("train", 30), ("eval", 6)):
            lines = (tmp_path / f"{fmt}_{split}.jsonl").read_text().splitlines()
            assert len(lines) == n and all(isinstance(json.loads(x), dict) for x in lines)


def test_imperfect_demonstrations(tmp_path):
    """data.train=toy_imperfect: on the unreliable tasks a seeded 75% of the SFT answers are wrong
    (the checker rejects them), elsewhere none; the held-out split stays gold for data.eval=toy."""
    from alignjax.data.sources import DataError
    from alignjax.train.setup import data_sources
    examples = toy.toy_splits(n_train=3000)["train"]
    noisy = toy.imperfect(examples)
    for task in toy.TASKS:
        wrong = [not toy.check(e, n.answer) for e, n in zip(examples, noisy) if e.task == task]
        assert abs(np.mean(wrong) - toy.IMPERFECT_TASKS.get(task, 0.0)) < 0.06, task
    assert all(n.answer == e.answer or not toy.check(e, n.answer) for e, n in zip(examples, noisy))
    assert [n.answer for n in toy.imperfect(examples)] == [n.answer for n in noisy]  # seeded
    [path] = data_sources("toy_imperfect", str(tmp_path), "train")
    answers = [json.loads(x)["messages"][1]["content"] for x in open(path)]
    full = toy.toy_splits()["train"]
    assert [a for a in answers] == [n.answer for n in toy.imperfect(full)]
    [gold] = data_sources("toy", str(tmp_path), "eval")
    assert all(toy.check(e, json.loads(x)["messages"][1]["content"])
               for e, x in zip(toy.toy_splits()["eval"], open(gold)))
    with pytest.raises(DataError, match="toy_imperfect holds SFT demonstrations"):
        data_sources("toy_imperfect", str(tmp_path), "train", kind="preference")
