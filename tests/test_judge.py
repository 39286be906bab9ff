"""alignjax.eval.judge: templates and their parsers, probability-mode verdicts against the judge's
own logits, both-order combination, the toy judge pairs, and bad input."""

import jax
import numpy as np
import pytest

from alignjax.errors import UserError
from alignjax.eval import judge as J
from alignjax.eval import toy_judge, winrate


def save_tiny(path, tokenizer_dir, head, seed=0, max_positions=2048):
    """A tiny random model dir (NumPy weights, no init program to compile) with the tokenizer;
    a long context because judge prompts are long in a 512-token BPE vocabulary."""
    from alignjax import sharding as shd
    from alignjax.data.tokenizer import load_tokenizer
    from alignjax.model.config import LlamaConfig
    from alignjax.model.params import abstract_params, build_module
    from alignjax.model.store import save_model_dir
    tok = load_tokenizer(str(tokenizer_dir))
    config = LlamaConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=96,
                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                         max_position_embeddings=max_positions, bos_token_id=tok.bos_token_id,
                         eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    abstract, _ = abstract_params(build_module(config, head), shd.make_mesh())
    rng = np.random.default_rng(seed)

    def draw(p, a):
        return (rng.normal(size=a.shape) * 0.1
                + jax.tree_util.keystr(p).endswith("['scale']")).astype(a.dtype)
    save_model_dir(str(path), jax.tree_util.tree_map_with_path(draw, abstract), config, head=head,
                   tokenizer_dir=str(tokenizer_dir))
    return str(path)


@pytest.fixture(scope="module")
def tok_dir(bpe_tokenizer, tmp_path_factory):
    path = tmp_path_factory.mktemp("tok")
    bpe_tokenizer.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def lm_dir(tok_dir, tmp_path_factory):
    return save_tiny(tmp_path_factory.mktemp("lm") / "judge", tok_dir, "lm")


# ---- parsing (pure) ------------------------------------------------------------------------------

@pytest.mark.parametrize("reply, want", [
    ("A", "A"), ("B", "B"), (" B.", "B"), ("(A)", "A"), ("Output (b)", "B"), ("output A is better", "A"),
    ("[B]", "B"), ("A\nbecause it is right", "A"),
    ("", None), ("a better answer is the first", None), ("Both are fine", None), ("C", None),
    ("AB", None), ("The answer: A", None),
])
def test_parse_letter(reply, want):
    assert J.parse_letter(reply) == want


@pytest.mark.parametrize("reply, want", [
    ("A is more accurate. [[A]]", "A"), ("[[B]]", "B"), ("equally good [[C]]", "tie"),
    ("[[ A ]]", "A"), ("A]]", None), ("first [[A]] then [[B]]", None), ("[[A]] ... [[A]]", "A"),
    ("B", None), ("[[D]]", None), ("", None),
])
def test_parse_brackets(reply, want):
    assert J.parse_brackets(reply) == want


def test_every_template_renders_its_parts_and_parses_its_own_format():
    for name, t in J.TEMPLATES.items():
        text = t.render("sort: 3 1", "1 3", "3 1", notes="Reference answer: 1 3")
        assert "sort: 3 1" in text and "1 3" in text and "3 1" in text, name
        assert ("Reference answer: 1 3" in text) == (t.notes_prompt is not None), name
        good = "[[B]]" if name == "mtbench" else "B"
        assert t.parse(good) == "B" and t.parse("no verdict here") is None, name
    assert "{instruction}" in J.TEMPLATES["rules_metrics_reference"].notes_prompt
    rules = J.TEMPLATES["rules"].render("i", "x", "y")
    assert "no more and no less" in rules and "length" in rules and "position" in rules


def test_unknown_template_and_judge_spec_are_one_line_errors():
    with pytest.raises(UserError, match=r"^--template 'fancy': unknown judge template; choose from "
                                        r"vanilla, rules, rules_metrics_reference, mtbench$"):
        J.build_judge("toy", template="fancy")
    with pytest.raises(UserError, match=r"^--judge 'gpt4': write toy, reward:DIR"):
        J.build_judge("gpt4")


def test_scalar_head_is_refused_as_llm_judge(tok_dir, tmp_path):
    rm = save_tiny(tmp_path / "rm", tok_dir, "scalar")
    with pytest.raises(UserError, match=r"^--judge llm:.*rm: a reward model \(scalar head\), not a "
                                        r"causal LM; use --judge reward:"):
        J.build_judge(f"llm:{rm}")


# ---- both orders (pure, with a scripted judge) ---------------------------------------------------

class _Scripted:
    """Replies from a table: (first output, second output) -> verdict."""

    order_matters, name, mode = True, "scripted", "text"
    template = J.TEMPLATES["rules"]

    def __init__(self, replies):
        self.replies = replies  # (first, second) -> verdict

    def verdicts(self, instructions, firsts, seconds):
        return dict(verdicts=[self.replies[(a, b)] for a, b in zip(firsts, seconds)], probs=None)


def test_compare_applies_the_mtbench_rule_and_counts_unparsed():
    replies = {("m1", "b1"): "A", ("b1", "m1"): "B",      # consistent win
               ("m2", "b2"): "A", ("b2", "m2"): "A",      # position bias -> tie
               ("m3", "b3"): "B", ("b3", "m3"): "A",      # consistent loss
               ("m4", "b4"): None, ("b4", "m4"): "B"}     # unparsed
    out = J.compare(_Scripted(replies), ["p"] * 4, ["m1", "m2", "m3", "m4"], ["b1", "b2", "b3", "b4"])
    assert out["prefs"] == [1.0, 0.5, 0.0, None]
    d = out["details"]
    assert d["unparsed_replies"] == 1 and d["judgements"] == 8
    assert d["positional_consistency"] == pytest.approx(2 / 3)
    assert d["first_position_rate"] == pytest.approx(4 / 7)
    single = J.compare(_Scripted(replies), ["p"] * 4, ["m1", "m2", "m3", "m4"],
                       ["b1", "b2", "b3", "b4"], order="single")
    assert single["prefs"] == [1.0, 1.0, 0.0, None] and single["details"]["positional_consistency"] is None


def test_toy_score_judge_reads_each_output_alone():
    from alignjax.data import toy
    exs = toy.make_examples(4, seed=5)
    right = [e.answer for e in exs]
    wrong = [toy.wrong_answer(e, np.random.default_rng(0)) for e in exs]
    j = J.build_judge("toy")
    out = J.compare(j, [e.prompt for e in exs], [right[0], wrong[1], right[2], wrong[3]],
                    [wrong[0], right[1], right[2], wrong[3]])
    assert out["prefs"] == [1.0, 0.0, 0.5, 0.5] and out["details"]["order"] == "single"


# ---- the LLM judge on a tiny random model ------------------------------------------------------

def _direct_preferences(model, tokenizer, template, instructions, firsts, seconds):
    """p(A) / (p(A) + p(B)) from module.apply's full logits at each prompt's last token. The
    prompts are right-padded into one batch (a causal model's logits at a token do not see the
    tokens after it), unlike the judge's left-padded buckets; one forward, so one compile."""
    import jax.numpy as jnp
    from alignjax.model.tokenize import encode_prompts
    prefix_ids = tokenizer(template.reply_prefix, add_special_tokens=False)["input_ids"] \
        if template.reply_prefix else []
    a_id, b_id = J.label_token_ids(tokenizer, template.reply_prefix)
    rows = [encode_prompts(tokenizer, [template.render(i, f, s)], chat=True)[0] + prefix_ids
            for i, f, s in zip(instructions, firsts, seconds)]
    width = max(map(len, rows))
    tokens = np.full((len(rows), width), tokenizer.pad_token_id, np.int32)
    mask = np.zeros_like(tokens)
    for r, ids in enumerate(rows):
        tokens[r, :len(ids)], mask[r, :len(ids)] = ids, 1
    positions = np.broadcast_to(np.arange(width), tokens.shape)
    logits, _ = jax.jit(model.module.apply)(model.params, jnp.asarray(tokens), jnp.asarray(positions),
                                            jnp.asarray(mask))
    last = np.asarray(logits, np.float64)[np.arange(len(rows)), [len(ids) - 1 for ids in rows]]
    # p(A) / (p(A) + p(B)): the softmax's normaliser cancels, leaving a sigmoid of the logit gap.
    return 1.0 / (1.0 + np.exp(last[:, b_id] - last[:, a_id]))


@pytest.mark.slow  # a judge model scores every pair
@pytest.mark.parametrize("template", ["rules", "mtbench"])
def test_probability_verdicts_equal_the_judges_own_logits(lm_dir, template):
    judge = J.build_judge(f"llm:{lm_dir}", template=template, mode="prob", batch_size=8)
    inst = ["reverse: cat dog", "sort: 3 1 2", "count the words: red sun"]
    firsts, seconds = ["dog cat", "1 2 3", "2"], ["cat dog", "3 2 1 0", "3"]
    got = judge.verdicts(inst, firsts, seconds)
    want = _direct_preferences(judge.model, judge.tokenizer, J.TEMPLATES[template], inst, firsts,
                               seconds)
    np.testing.assert_allclose(got["probs"], want, rtol=1e-4, atol=1e-5)
    assert not np.allclose(want, 0.5, atol=1e-4)  # a random model has some preference
    assert got["verdicts"] == [J.verdict_from_probability(p) for p in want]
    both = J.compare(judge, inst, firsts, seconds)
    swapped = _direct_preferences(judge.model, judge.tokenizer, J.TEMPLATES[template], inst,
                                  seconds, firsts)
    np.testing.assert_allclose(both["prefs"], winrate.combine_probabilities(want, swapped),
                               rtol=1e-4, atol=1e-5)


@pytest.mark.slow  # ~10 s of compiles: out of the 5-minute fast tier
def test_text_mode_with_two_stages_counts_unparsed_replies(lm_dir):
    judge = J.build_judge(f"llm:{lm_dir}", template="rules_metrics_reference", mode="text",
                          batch_size=4, max_new_tokens=6)
    judge.notes_max_new_tokens = 6
    inst = ["reverse: cat dog", "sort: 3 1"]
    out = J.compare(judge, inst, ["dog cat", "1 3"], ["cat dog", "3 1"])
    runs = out["runs"]
    replies = runs["first"]["replies"] + runs["swapped"]["replies"]
    parsed = [J.parse_letter(r) for r in replies]
    assert runs["first"]["verdicts"] + runs["swapped"]["verdicts"] == parsed
    assert out["details"]["unparsed_replies"] == sum(p is None for p in parsed)
    assert len(judge._notes) == 2  # one first-stage generation per instruction, both orders
    assert out["prefs"] == winrate.combine_both_orders(runs["first"]["verdicts"],
                                                      runs["swapped"]["verdicts"])


# ---- toy judge pairs ---------------------------------------------------------------------------

def test_toy_judge_pairs_subsets_gold_and_balance():
    from alignjax.data import toy
    pairs = toy_judge.judge_pairs(n_per_subset=12, seed=0)
    subsets = {p["subset"] for p in pairs}
    assert subsets == set(toy_judge.SUBSETS)
    for s in subsets:
        rows = [p for p in pairs if p["subset"] == s]
        assert len(rows) == 12
        for task in {p["task"] for p in rows}:  # balanced positions within each task
            labels = [p["label"] for p in rows if p["task"] == task]
            assert abs(labels.count("A") - labels.count("B")) <= 1, (s, task, labels)
    for p in pairs:
        good, bad = (p["output_a"], p["output_b"]) if p["label"] == "A" else (p["output_b"], p["output_a"])
        assert toy.check(p["prompt"], good) == 1.0 and toy.check(p["prompt"], bad) == 0.0
        if p["subset"] == "longer":
            assert len(bad) > len(good)
        if p["subset"] == "fluent":
            assert bad.endswith(".") and " " in bad
    surface = [p for p in pairs if p["subset"] == "surface"]
    for p in surface:  # the wrong answer copies the prompt's own words, in its order
        bad = p["output_b"] if p["label"] == "A" else p["output_a"]
        assert bad in p["prompt"]


def test_toy_judge_training_records_hold_out_the_evaluation_prompts():
    records = toy_judge.sft_records(30, "vanilla")
    held_out = {p["prompt"] for p in toy_judge.judge_pairs(100, seed=0)}
    t = J.TEMPLATES["vanilla"]
    labels = [r["messages"][1]["content"] for r in records]
    assert abs(labels.count("A") - 15) <= 3 and set(labels) == {"A", "B"}
    for r in records:
        user = r["messages"][0]["content"]
        assert r["messages"][0]["role"] == "user" and user.startswith(t.prompt.split("{instruction}")[0])
        instruction = user.split("# Instruction\n")[1].split("\n")[0]
        assert instruction not in held_out


def test_toy_judge_training_records_for_several_templates_and_the_two_stage_one():
    from alignjax.data import toy
    records = toy_judge.sft_records(12, "vanilla,rules_metrics_reference")
    vanilla, staged = records[:12], records[12:]
    assert len(staged) == 24  # per pair: the notes stage, then the judgement with those notes
    t = J.TEMPLATES["rules_metrics_reference"]
    by_prompt = {e.prompt: e for e in toy.make_examples(200, seed=[1, 1])}
    for notes_rec, judge_rec in zip(staged[::2], staged[1::2]):
        user, notes = (m["content"] for m in notes_rec["messages"])
        instruction = user.split("# Instruction\n")[1].split("\n")[0]
        assert user == t.notes_prompt.format(instruction=instruction)
        reference = notes.split("Reference answer: ")[1]
        assert toy.check(by_prompt[instruction], reference)  # the gold answer, checked
        judged = judge_rec["messages"][0]["content"]
        assert notes in judged and judge_rec["messages"][1]["content"] in ("A", "B")
        first = judged.split("# Output (A)\n")[1].split("\n")[0]
        second = judged.split("# Output (B)\n")[1].split("\n")[0]
        right = first if judge_rec["messages"][1]["content"] == "A" else second
        assert right == reference
    assert all("Your preparation" not in r["messages"][0]["content"] for r in vanilla)
