"""`alignjax convert alignjax-to-hf` on a PPO workdir: the policy exports as LlamaForCausalLM (the
workdir's own model) and `--slot value` exports the value model as LlamaForSequenceClassification;
transformers' models give alignjax's logits / per-token values."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

from alignjax.cli import main as cli_main
from alignjax.config import load_config
from alignjax.model.store import load_model
from alignjax.train import run_training

OVERRIDES = [
    # one PPO step of a small random model; the value learning rate is large so that the value
    # model (zero score head at the start) gives values far from zero after that one update
    "model.hidden_size=64", "model.intermediate_size=128", "model.num_hidden_layers=2",
    "model.num_attention_heads=4", "model.num_key_value_heads=2", "tokenizer.path=toy",
    "train.steps=1", "train.batch_size=8", "train.log_every=1", "train.eval_every=0",
    "checkpoint.every=1", "checkpoint.async_save=False", "value_optimizer.lr=0.05",
    "ppo.epochs=1", "ppo.num_minibatches=1", "ppo.max_new_tokens=4", "ppo.temperature=1.0",
]


# The tests that use it are slow: one PPO step trains the workdir (~90 s on the loaded 2-core machine).
@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    path = tmp_path_factory.mktemp("ppo") / "run"
    run_training(load_config("configs/ppo.py:tiny", OVERRIDES), str(path))
    return path


def _batch(pad=0):
    """Token rows right-padded with `pad` (never drawn as a real token), and their masks."""
    rng = np.random.RandomState(0)
    lengths, width = [10, 6, 3], 10
    tokens = np.full((3, width), pad, np.int64)
    for i, n in enumerate(lengths):
        tokens[i, :n] = rng.choice([t for t in range(3, 60) if t != pad], n)
    segments = (np.arange(width)[None] < np.array(lengths)[:, None]).astype(np.int32)
    positions = np.where(segments, np.arange(width)[None], 0)
    return tokens, segments, positions, np.array(lengths)


@pytest.mark.slow
def test_value_slot_exports_as_sequence_classification(workdir, tmp_path):
    cli_main(["convert", "alignjax-to-hf", "--ckpt", str(workdir), "--slot", "value",
              "--out", str(tmp_path / "value")])
    cfg = json.load(open(tmp_path / "value" / "config.json"))
    assert cfg["architectures"] == ["LlamaForSequenceClassification"] and cfg["num_labels"] == 1
    hf, info = AutoModelForSequenceClassification.from_pretrained(tmp_path / "value",
                                                                  output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]

    value = load_model(str(workdir), slot="value")
    assert value.head == "scalar"
    # HF reads the classification score at the last token that is not pad_token_id
    assert hf.config.pad_token_id is not None
    tokens, segments, positions, lengths = _batch(hf.config.pad_token_id)
    ours, _ = value.module.apply(value.params, tokens.astype(np.int32), positions, segments)
    ours = np.asarray(ours)
    real = segments.astype(bool)
    assert np.abs(ours[real]).max() > 1e-2  # the trained head, not the zero-initialised one
    with torch.no_grad():
        hidden = hf.model(torch.tensor(tokens), attention_mask=torch.tensor(segments)).last_hidden_state
        per_token = hf.score(hidden)[..., 0].numpy()
    np.testing.assert_allclose(per_token[real], ours[real], atol=1e-4, rtol=0)
    with torch.no_grad():  # the classification output: the value at the last real token
        last = hf(torch.tensor(tokens), attention_mask=torch.tensor(segments)).logits[:, 0].numpy()
    np.testing.assert_allclose(last, ours[np.arange(3), lengths - 1], atol=1e-4, rtol=0)


@pytest.mark.slow
def test_policy_exports_as_causal_lm(workdir, tmp_path):
    cli_main(["convert", "alignjax-to-hf", "--ckpt", str(workdir), "--out", str(tmp_path / "policy")])
    hf = AutoModelForCausalLM.from_pretrained(tmp_path / "policy")
    policy = load_model(str(workdir))
    assert policy.head == "lm"
    tokens, segments, positions, _ = _batch()
    ours = np.asarray(policy.module.apply(policy.params, tokens.astype(np.int32), positions, segments)[0])
    with torch.no_grad():
        ref = hf(torch.tensor(tokens), attention_mask=torch.tensor(segments)).logits.numpy()
    real = segments.astype(bool)
    np.testing.assert_allclose(ref[real], ours[real], atol=1e-4, rtol=0)


@pytest.mark.slow
def test_bad_slot_is_one_clear_line(workdir, tmp_path, capsys):
    with pytest.raises(SystemExit):
        cli_main(["convert", "alignjax-to-hf", "--ckpt", str(workdir), "--slot", "reference",
                  "--out", str(tmp_path / "x")])
    err = capsys.readouterr().err
    assert "--slot reference" in err and "policy, value" in err and "Traceback" not in err


def test_slot_of_a_model_directory_is_one_clear_line(tmp_path, capsys):
    (tmp_path / "hf").mkdir()
    (tmp_path / "hf" / "config.json").write_text("{}")
    with pytest.raises(SystemExit):
        cli_main(["convert", "alignjax-to-hf", "--ckpt", str(tmp_path / "hf"), "--slot", "value",
                  "--out", str(tmp_path / "x")])
    err = capsys.readouterr().err
    assert "--slot value" in err and "is not a training workdir" in err and "Traceback" not in err
