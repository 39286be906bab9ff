"""HF -> alignjax -> HF reproduces every tensor exactly and loads in transformers cleanly."""

import json
import os

import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

from alignjax import sharding as shd
from alignjax.cli import main as cli_main
from alignjax.convert.safetensors_io import SafetensorsReader, ShardedSafetensorsWriter
from alignjax.model.store import export_hf, load_model
from hf_models import make_hf_model


def _assert_same_state(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    assert set(sa) == set(sb)
    for k in sa:
        assert torch.equal(sa[k], sb[k]), k


@pytest.mark.parametrize("style", ["llama31", "llama32", "linear_bias"])
def test_round_trip_through_cli_is_exact(style, tmp_path):
    src = make_hf_model(style, tmp_path / "hf")
    cli_main(["convert", "hf-to-alignjax", "--hf", str(tmp_path / "hf"), "--out", str(tmp_path / "aj"),
              "--mesh", "data=2,fsdp=2,tensor=2"])
    cli_main(["convert", "alignjax-to-hf", "--ckpt", str(tmp_path / "aj"), "--out", str(tmp_path / "out"),
              "--mesh", "fsdp=4,tensor=2"])
    back, info = AutoModelForCausalLM.from_pretrained(tmp_path / "out", output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    _assert_same_state(src, back)
    cfg = json.load(open(tmp_path / "out" / "config.json"))
    assert cfg["architectures"] == ["LlamaForCausalLM"]
    assert os.path.exists(tmp_path / "out" / "model.safetensors.index.json")
    assert os.path.exists(tmp_path / "out" / "generation_config.json")


def test_export_shards_and_dtypes(tmp_path):
    make_hf_model("llama2", tmp_path / "hf")
    model = load_model(str(tmp_path / "hf"), shd.make_mesh({"data": 8}))
    files = export_hf(model, str(tmp_path / "bf16"), dtype="bfloat16", max_shard_bytes=20_000)
    assert len([f for f in files if f.endswith(".safetensors")]) > 1
    back = AutoModelForCausalLM.from_pretrained(tmp_path / "bf16", dtype=torch.bfloat16)
    ref = model.params["params"]["embed"]["embedding"]
    np.testing.assert_allclose(back.model.embed_tokens.weight.detach().float().numpy(), np.asarray(ref),
                               rtol=1e-2, atol=1e-3)


@pytest.mark.slow  # ~10 s of compiles: out of the 5-minute fast tier
def test_scalar_head_round_trip_scores(tmp_path):
    src = make_hf_model("llama31", tmp_path / "hf", head="scalar")
    model = load_model(str(tmp_path / "hf"), shd.make_mesh({"data": 2, "fsdp": 2, "tensor": 2}))
    assert model.head == "scalar"
    # Right-padded batch: the reward is read at the last non-pad token, as HF does with pad_token_id.
    rng = np.random.RandomState(0)
    lengths, width = [12, 7, 3, 12], 12
    tokens = np.zeros((4, width), np.int64)
    for i, n in enumerate(lengths):
        tokens[i, :n] = rng.randint(3, 160, n)
    segments = (np.arange(width)[None] < np.array(lengths)[:, None]).astype(np.int32)
    positions = np.where(segments, np.arange(width)[None], 0)
    scores_bt, _ = model.module.apply(model.params, tokens.astype(np.int32), positions, segments)
    ours = np.asarray(scores_bt)[np.arange(4), np.array(lengths) - 1]
    with torch.no_grad():
        ref = src(torch.tensor(tokens), attention_mask=torch.tensor(segments)).logits[:, 0].numpy()
    np.testing.assert_allclose(ours, ref, atol=1e-4, rtol=0)

    cli_main(["convert", "hf-to-alignjax", "--hf", str(tmp_path / "hf"), "--out", str(tmp_path / "aj")])
    cli_main(["convert", "alignjax-to-hf", "--ckpt", str(tmp_path / "aj"), "--out", str(tmp_path / "out")])
    back, info = AutoModelForSequenceClassification.from_pretrained(tmp_path / "out", output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    assert back.config.num_labels == 1
    _assert_same_state(src, back)
    with torch.no_grad():
        again = back(torch.tensor(tokens), attention_mask=torch.tensor(segments)).logits[:, 0].numpy()
    np.testing.assert_allclose(again, ours, atol=1e-4, rtol=0)


def test_safetensors_reader_is_memory_mapped(tmp_path):
    w = ShardedSafetensorsWriter(str(tmp_path), max_shard_bytes=64)
    a, b = np.arange(12, dtype=np.float32).reshape(3, 4), np.ones(20, np.float16)
    w.add("a", a)
    w.add("b", b)
    assert len(w.close()) == 2
    r = SafetensorsReader(str(tmp_path))
    assert isinstance(r.get("a").base, np.memmap) or isinstance(r.get("a"), np.memmap)
    np.testing.assert_array_equal(r.get("a"), a)
    np.testing.assert_array_equal(r.get("b"), b)


def _rewrite(path, drop=(), add=None, reshape=None):
    """Rewrites model.safetensors of an HF dir with a tensor dropped, added or reshaped."""
    from safetensors.numpy import load_file, save_file
    f = os.path.join(path, "model.safetensors")
    tensors = load_file(f)
    for k in drop:
        del tensors[k]
    tensors.update(add or {})
    for k, shape in (reshape or {}).items():
        tensors[k] = np.zeros(shape, np.float32)
    save_file(tensors, f, metadata={"format": "pt"})


def test_bad_checkpoints_give_clear_errors(tmp_path):
    from alignjax.convert.safetensors_io import WeightsError
    from alignjax.model.config import ConfigError
    mesh = shd.make_mesh({"data": 8})
    make_hf_model("llama2", tmp_path / "missing")
    _rewrite(tmp_path / "missing", drop=["model.layers.1.mlp.up_proj.weight"])
    with pytest.raises(WeightsError, match=r"missing from the checkpoint.*model\.layers\.1\.mlp\.up_proj\.weight"):
        load_model(str(tmp_path / "missing"), mesh)

    make_hf_model("llama2", tmp_path / "extra")
    _rewrite(tmp_path / "extra", add={"model.layers.0.self_attn.rotary_scale": np.zeros(4, np.float32)})
    with pytest.raises(WeightsError, match=r"unmapped.*rotary_scale"):
        load_model(str(tmp_path / "extra"), mesh)

    make_hf_model("llama2", tmp_path / "shape")
    _rewrite(tmp_path / "shape", reshape={"model.layers.0.self_attn.k_proj.weight": (32, 64)})
    with pytest.raises(WeightsError, match=r"k_proj\.weight has shape \(32, 64\).*config\.json and the weights disagree"):
        load_model(str(tmp_path / "shape"), mesh)

    (tmp_path / "mistral").mkdir()
    (tmp_path / "mistral" / "config.json").write_text(json.dumps({"model_type": "mistral"}))
    with pytest.raises(ConfigError, match=r"config\.json: model_type='mistral' is not a Llama model"):
        load_model(str(tmp_path / "mistral"), mesh)

    (tmp_path / "empty").mkdir()
    with pytest.raises(ConfigError, match="neither an alignjax model directory"):
        load_model(str(tmp_path / "empty"), mesh)
