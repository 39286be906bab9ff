"""Reward sources (alignjax.rewards): spec parsing, toy, user Python functions, reward models
(text and token-id paths, normalisation, a policy with another tokenizer) and their errors."""

import dataclasses
import logging

import jax
import numpy as np
import pytest

from alignjax import rewards
from alignjax.data import toy
from alignjax.errors import UserError

SEQ_LEN = 64
_EXAMPLES = toy.make_examples(11, seed=0)
PROMPTS = [e.prompt for e in _EXAMPLES]
# right, near misses and junk, all distinct
COMPLETIONS = [e.answer if i % 3 == 0 else (e.answer + " cat" if i % 3 == 1 else f"no {i}")
               for i, e in enumerate(_EXAMPLES)]


# ---- tiny models, built without training -----------------------------------------------------

def _save_tiny(path, tokenizer_dir, head, extra=None, seed=0):
    from alignjax import sharding as shd
    from alignjax.data.tokenizer import load_tokenizer
    from alignjax.model.config import LlamaConfig
    from alignjax.model.params import abstract_params, build_module
    from alignjax.model.store import save_model_dir
    tok = load_tokenizer(tokenizer_dir)
    config = LlamaConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=96,
                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                         max_position_embeddings=128, bos_token_id=tok.bos_token_id,
                         eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    # Random weights from NumPy: no init program to compile (tens of seconds on a busy CPU).
    abstract, _ = abstract_params(build_module(config, head), shd.make_mesh())
    rng = np.random.default_rng(seed)

    def draw(path, a):
        noise = rng.normal(size=a.shape) * 0.1
        return (noise + (jax.tree_util.keystr(path).endswith("['scale']"))).astype(a.dtype)
    params = jax.tree_util.tree_map_with_path(draw, abstract)
    save_model_dir(str(path), params, config, head=head, tokenizer_dir=str(tokenizer_dir),
                   extra=extra)
    return str(path)


@pytest.fixture(scope="module")
def tok_dir(bpe_tokenizer, tmp_path_factory):
    path = tmp_path_factory.mktemp("tok")
    bpe_tokenizer.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def rm_dir(tok_dir, tmp_path_factory):
    return _save_tiny(tmp_path_factory.mktemp("rm") / "rm", tok_dir, "scalar",
                      {"reward_stats": {"mean": 0.3, "std": 2.0, "source": "test"}})


@pytest.fixture(scope="module")
def rm(rm_dir):
    return rewards.build_reward(rm_dir, seq_len=SEQ_LEN, batch_size=8)


@pytest.fixture(scope="module")
def py_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("py") / "my_rewards.py"
    path.write_text(
        "CALLS = []\n"
        "\n"
        "def length(prompts, completions):\n"
        "    CALLS.append(len(completions))\n"
        "    return [len(p) + 0.5 * len(c) for p, c in zip(prompts, completions)]\n")
    return str(path)


# ---- parsing ---------------------------------------------------------------------------------

def test_parse_spec_terms_weights_and_python_colons(tmp_path):
    T = rewards.Term
    assert rewards.parse_spec("toy") == [T("toy", "toy")]
    assert rewards.parse_spec(" toy + 0.5*runs/rm ") == [T("toy", "toy"),
                                                          T("model", "runs/rm", weight=0.5)]
    assert rewards.parse_spec("2*python:C:/x/r.py:fmt+runs/rm") == [
        T("python", "C:/x/r.py", "fmt", 2.0), T("model", "runs/rm")]
    assert rewards.parse_spec(["runs/a+b", ("toy", 0.25)]) == [
        T("model", "runs/a+b"), T("toy", "toy", weight=0.25)]
    plus = tmp_path / "owner+name"
    plus.mkdir()  # an existing path with a "+" is one path
    assert rewards.parse_spec(str(plus)) == [T("model", str(plus))]


@pytest.mark.parametrize("spec, match", [
    ("", "empty reward spec"),
    ("   ", "empty reward spec"),
    ("toy+", "empty term"),
    ("toy + + runs/rm", "empty term"),
    ("0*toy", "weight '0' in '0\\*toy' must be a positive"),
    ("-1*toy", "must be a positive finite"),
    ("nan*toy", "must be a positive finite"),
    ("toy*0.5", "weight 'toy' in 'toy\\*0.5' is not a number; write WEIGHT\\*SOURCE"),
    ("abc*toy", "weight 'abc' .* is not a number"),
    ("0.5*", "no source after"),
    ("python:r.py", "write python:FILE.py:FUNCTION"),
    ("python:r.py:", "write python:FILE.py:FUNCTION"),
    ("python::fn", "write python:FILE.py:FUNCTION"),
    (["toy", ("runs/rm", 0)], "must be a positive"),
    ([], "empty list"),
    ([("toy",)], "source string or a \\(source, weight\\) pair"),
])
def test_parse_spec_errors(spec, match):
    with pytest.raises(UserError, match=f"^ppo.reward.*{match}"):
        rewards.parse_spec(spec, what="ppo.reward")


# ---- toy and python --------------------------------------------------------------------------

def test_toy_scores_equal_the_checker():
    exs = toy.make_examples(12, seed=3)
    completions = [e.answer if i % 3 else e.answer + " x" for i, e in enumerate(exs)]
    prompts = [e.prompt for e in exs]
    got = rewards.build_reward("toy").score(prompts, completions)
    want = [toy.check(p, c) for p, c in zip(prompts, completions)]
    assert got.dtype == np.float32 and got.tolist() == want and 0 < sum(want) < len(want)


def test_python_function_called_per_batch_in_order(py_file):
    reward = rewards.build_reward(f"python:{py_file}:length", batch_size=4)
    calls = reward.sources[0].fn.__globals__["CALLS"]
    calls.clear()
    got = reward.score(PROMPTS[:10], COMPLETIONS[:10])
    want = [len(p) + 0.5 * len(c) for p, c in zip(PROMPTS[:10], COMPLETIONS[:10])]
    assert calls == [4, 4, 2]
    np.testing.assert_array_equal(got, np.float32(want))


def _write(tmp_path, body, name="r.py"):
    path = tmp_path / name
    path.write_text(body)
    return str(path)


@pytest.mark.parametrize("body, match", [
    (None, "no such file"),
    ("def f(p, c):\n    return [0.0] * len(c)\n\ndef g(:\n", "r.py:4: SyntaxError"),
    ("import os\n\nraise RuntimeError('boom at import')\n", "importing .*r.py failed at .*r.py:3: "
     "RuntimeError: boom at import"),
    ("import no_such_package_xyz\n", "r.py:1: ModuleNotFoundError"),
    ("def other(p, c):\n    return [0.0]\n", "has no function 'f' \\(it defines: other\\)"),
    ("f = 3\n", "f is not a function \\(it is int\\)"),
    ("def f(p, c):\n    x = 1\n    return [1 / (x - 1)] * len(c)\n",
     "f\\(\\) raised ZeroDivisionError: division by zero \\(at .*r.py:3\\)"),
    ("def f(p, c):\n    return [0.0] * (len(c) - 1)\n",
     "f\\(\\) returned 3 scores for a batch of 4"),
    ("def f(p, c):\n    return 1.0\n", "f\\(\\) returned float, not a sequence of 4 floats"),
    ("def f(p, c):\n    return 'abcd'\n", "f\\(\\) returned str, not a sequence"),
    ("import numpy as np\ndef f(p, c):\n    return np.zeros((len(c), 1))\n", "shape \\(4, 1\\)"),
    ("def f(p, c):\n    return [0.0, 1.0, 'x', 2.0]\n", "non-numeric value at index 2: 'x'"),
    ("def f(p, c):\n    return [0.0, None, 1.0, 2.0]\n", "non-numeric value at index 1: None"),
    ("def f(p, c):\n    return [float('nan') if x == 'owl' else 0.0 for x in c]\n",
     "returned nan at index 5; scores must be finite"),
    ("def f(p, c):\n    return [float('inf') if x == 'dog cat' else 0.0 for x in c]\n",
     "returned inf at index 2"),
])
def test_python_function_errors_name_the_function(tmp_path, body, match):
    path = str(tmp_path / "r.py") if body is None else _write(tmp_path, body)
    prompts, completions = PROMPTS[:4], COMPLETIONS[:4]
    if "index 5" in match:  # the index counts across batches: 5 is the second batch's second
        prompts, completions = PROMPTS[:8], ["a", "b", "c", "d", "e", "owl", "g", "h"]
    if "inf" in match:
        completions = ["a", "b", "dog cat", "d"]
    with pytest.raises(UserError, match=f"^--reward python:{path}:f: .*{match}") as e:
        rewards.build_reward(f"python:{path}:f", batch_size=4, what="--reward").score(
            prompts, completions)
    assert "\n" not in str(e.value)


def test_python_array_results_are_accepted(tmp_path):
    path = _write(tmp_path, "import numpy as np\nimport jax.numpy as jnp\n"
                  "def f(p, c):\n    return np.arange(len(c))\n"
                  "def g(p, c):\n    return jnp.ones(len(c)) * 2\n"
                  "def h(p, c):\n    return [True, 1, 2.5][:len(c)]\n")
    reward = rewards.build_reward(f"python:{path}:f + python:{path}:g + python:{path}:h")
    parts = reward.score_parts(PROMPTS[:3], COMPLETIONS[:3])
    assert [p.tolist() for p in parts] == [[0, 1, 2], [2, 2, 2], [1, 1, 2.5]]


def test_weighted_sum_equals_the_weighted_parts(py_file):
    reward = rewards.build_reward(f"toy + 0.5*python:{py_file}:length + 2.5*toy")
    prompts = PROMPTS[:6]
    completions = COMPLETIONS[:6]
    checker = np.array([toy.check(p, c) for p, c in zip(prompts, completions)])
    length = np.array([len(p) + 0.5 * len(c) for p, c in zip(prompts, completions)])
    assert 0 < checker.sum() < len(checker)
    np.testing.assert_allclose(reward.score(prompts, completions),
                               checker + 0.5 * length + 2.5 * checker, rtol=1e-6)
    assert reward.names == ["toy", f"python:{py_file}:length", "toy"]


# ---- reward models ---------------------------------------------------------------------------

def test_reward_model_scores_equal_score_texts(rm, rm_dir):
    from alignjax.data.tokenizer import load_tokenizer
    from alignjax.model.store import load_model
    from alignjax.train.reward import score_texts
    model = load_model(rm_dir, head="scalar")
    want = score_texts(model, load_tokenizer(model.tokenizer_dir), PROMPTS, COMPLETIONS,
                       seq_len=SEQ_LEN)
    got = rm.score(PROMPTS, COMPLETIONS)  # 11 texts in batches of 8: the second one is padded
    assert got.dtype == np.float32 and got.shape == (11,)
    assert np.ptp(want) > 1e-3  # distinct scores: not a comparison of constants
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)


def test_score_ids_equals_score_on_the_same_texts(rm):
    from alignjax.model.tokenize import encode_prompts
    tok = rm.sources[0].tokenizer
    # longer than SEQ_LEN: the prompt loses its start
    long_prompt = "reverse the list: " + " ".join(["cat dog fox"] * 30)
    prompts, completions = PROMPTS + [long_prompt], COMPLETIONS + ["cat dog"]
    prompt_ids = encode_prompts(tok, prompts, chat=True)  # as the generator gets them
    eot, pad = tok.eos_token_id, tok.pad_token_id
    completion_ids = []
    for i, c in enumerate(completions):
        ids = tok(c, add_special_tokens=False)["input_ids"]
        # as generated: EOS then padding, EOS at the very end, or cut off without EOS
        completion_ids.append([ids + [eot] + [pad] * 3, ids + [eot], ids][i % 3])
    assert len(prompt_ids[-1]) > SEQ_LEN
    got = rm.sources[0].score_ids(prompt_ids, completion_ids)
    np.testing.assert_allclose(got, rm.score(prompts, completions), rtol=1e-6, atol=1e-7)


def test_normalize_uses_the_stored_stats(rm, rm_dir):
    raw = rm.score(PROMPTS, COMPLETIONS)
    normed = rewards.build_reward(rm_dir, seq_len=SEQ_LEN, normalize=True,
                                  batch_size=8).score(PROMPTS, COMPLETIONS)
    np.testing.assert_allclose(normed, (raw - 0.3) / 2.0, rtol=1e-5, atol=1e-6)
    src = rm.sources[0]
    no_stats = dataclasses.replace(src.model, extra={})
    with pytest.raises(UserError, match="has no reward_stats"):
        rewards.RewardModelSource(no_stats, src.tokenizer, "runs/x", normalize=True)
    zero = dataclasses.replace(src.model, extra={"reward_stats": {"mean": 0.0, "std": 0.0}})
    with pytest.raises(UserError, match="std is 0.0"):
        rewards.RewardModelSource(zero, src.tokenizer, "runs/x", normalize=True)


def test_weighted_sum_with_a_reward_model(rm, rm_dir, py_file):
    reward = rewards.build_reward(f"0.5*{rm_dir} + toy + 3*python:{py_file}:length",
                                  seq_len=SEQ_LEN)
    checker = np.array([toy.check(p, c) for p, c in zip(PROMPTS, COMPLETIONS)])
    length = np.array([len(p) + 0.5 * len(c) for p, c in zip(PROMPTS, COMPLETIONS)])
    want = 0.5 * rm.score(PROMPTS, COMPLETIONS) + checker + 3 * length
    np.testing.assert_allclose(reward.score(PROMPTS, COMPLETIONS), want, rtol=1e-5)


def test_non_reward_model_paths_are_refused(tok_dir, tmp_path):
    lm = _save_tiny(tmp_path / "sft", tok_dir, "lm")
    with pytest.raises(UserError, match=(
            f"^ppo.reward: {lm} is a causal LM \\(lm head\\), not a reward model; train one "
            "with configs/reward.py or pass a scalar-head model$")):
        rewards.build_reward(f"toy + {lm}", what="ppo.reward")
    with pytest.raises(UserError, match="runs/nope: no such file or directory; give toy"):
        rewards.build_reward("toy + runs/nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="neither an alignjax model directory"):
        rewards.build_reward(str(tmp_path / "empty"))
    with pytest.raises(UserError, match="is a file, not a model directory"):
        rewards.build_reward(str(tmp_path / "sft" / "alignjax_model.json"))


def test_hf_heads_are_read_from_config_json(tmp_path):
    import json
    for name, arch in [("cls", "LlamaForSequenceClassification"), ("lm", "LlamaForCausalLM")]:
        (tmp_path / name).mkdir()
        (tmp_path / name / "config.json").write_text(json.dumps({"architectures": [arch]}))
    assert rewards.model_head(str(tmp_path / "cls")) == "scalar"
    with pytest.raises(UserError, match="is a causal LM"):
        rewards.build_reward(str(tmp_path / "lm"))


def test_policy_with_the_same_tokenizer_uses_the_ids(rm_dir, tok_dir, caplog):
    from alignjax.data.tokenizer import load_tokenizer
    from alignjax.model.tokenize import encode_prompts
    policy_tok = load_tokenizer(tok_dir)  # a separate object with the same files
    with caplog.at_level(logging.WARNING, logger="alignjax.rewards"):
        reward = rewards.build_reward(f"{rm_dir} + toy", seq_len=SEQ_LEN,
                                      policy_tokenizer=policy_tok)
    assert reward.ids_ok == [True, False] and "different tokenizer" not in caplog.text
    prompt_ids = encode_prompts(policy_tok, PROMPTS, chat=True)
    eos = policy_tok.eos_token_id
    completion_ids = [policy_tok(c, add_special_tokens=False)["input_ids"] + [eos]
                      for c in COMPLETIONS]
    np.testing.assert_allclose(reward.score_rollout(PROMPTS, prompt_ids, completion_ids),
                               reward.score(PROMPTS, COMPLETIONS), rtol=1e-5, atol=1e-6)


def test_policy_with_another_tokenizer_is_decoded_and_retokenised(rm, rm_dir, spm_tokenizer,
                                                                   caplog):
    from alignjax.model.tokenize import encode_prompts
    with caplog.at_level(logging.WARNING, logger="alignjax.rewards"):
        reward = rewards.build_reward(f"{rm_dir} + 2*{rm_dir}", seq_len=SEQ_LEN,
                                      policy_tokenizer=spm_tokenizer)
        assert reward.ids_ok == [False, False]
        prompt_ids = encode_prompts(spm_tokenizer, PROMPTS, chat=True)
        completion_ids = [spm_tokenizer(c, add_special_tokens=False)["input_ids"]
                          + [spm_tokenizer.eos_token_id, spm_tokenizer.pad_token_id]
                          for c in COMPLETIONS]
        want = 3 * rm.score(PROMPTS, COMPLETIONS)  # the reward model's own-text scores
        for _ in range(2):
            np.testing.assert_allclose(reward.score_rollout(PROMPTS, prompt_ids, completion_ids),
                                       want, rtol=1e-5, atol=1e-6)
    lines = [r for r in caplog.records if "different tokenizer" in r.getMessage()]
    assert len(lines) == 1 and rm_dir in lines[0].getMessage()  # once, not per batch or term
