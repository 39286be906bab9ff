"""Config files, overrides, validation, saved configs and sweeps (no jax compile; fast)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest

from alignjax.config import (MISSING, check_resume_config, config_diff, expand_sweep, load_config,
                             load_saved_config, save_config)
from alignjax.train.registry import validate_config
from alignjax.errors import UserError
from alignjax.model.config import ConfigError, LlamaConfig

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SFT = os.path.join(ROOT, "configs", "sft.py")
# tiny/small on 8 fake CPU devices; the real models on v5p-64 (32 chips).
PRESET_DEVICES = {"tiny": 8, "small": 8, "llama2_7b": 32, "llama3_8b": 32, "llama3_70b": 32}


def tiny(*overrides):
    return load_config(f"{SFT}:tiny", overrides)


def invalid(config, num_devices=8) -> str:
    with pytest.raises(ConfigError) as e:
        validate_config(config, num_devices)
    return str(e.value)


def write(tmp_path, name, text):
    path = tmp_path / name
    path.write_text(textwrap.dedent(text))
    return str(path)


# ---- presets -----------------------------------------------------------------------------------

@pytest.mark.parametrize("preset", list(PRESET_DEVICES))
def test_presets_load_and_validate(preset):
    config = load_config(f"{SFT}:{preset}")
    validate_config(config, PRESET_DEVICES[preset])
    # the model fields are exactly what the Llama module takes, plus the two that say where the
    # model comes from and how long a context the run uses
    model = {k: v for k, v in config.model.to_dict().items()
             if k not in ("init_from", "context_length")}
    LlamaConfig(**model)


def test_preset_architectures_and_sizes():
    def params(preset):
        m = load_config(f"{SFT}:{preset}").model.to_dict()
        m.pop("init_from"), m.pop("context_length")
        return LlamaConfig(**m).num_params()

    assert 1e5 <= params("tiny") <= 1e6
    assert round(params("llama2_7b") / 1e9, 2) == 6.74
    assert round(params("llama3_8b") / 1e9, 2) == 8.03
    assert round(params("llama3_70b") / 1e9, 1) == 70.6
    c = load_config(f"{SFT}:llama3_70b")
    assert (c.model.dtype, c.model.param_dtype) == ("bfloat16", "float32")
    assert c.model.remat_policy == "full"
    assert c.optimizer.lr == 2e-5 and c.model.init_from == ""


def test_spec_without_preset_uses_default():
    assert config_diff(load_config(SFT), tiny()) == {}


def test_relative_spec_resolves_from_repo_root(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert load_config("configs/sft.py:small").model.hidden_size == 384


def test_unknown_preset_lists_presets():
    with pytest.raises(ConfigError, match=r"unknown preset 'huge'.*tiny, small, llama2_7b"):
        load_config(f"{SFT}:huge")


def test_missing_file_and_missing_get_config(tmp_path):
    with pytest.raises(ConfigError, match="nope.py"):
        load_config(str(tmp_path / "nope.py"))
    path = write(tmp_path, "empty.py", "X = 1\n")
    with pytest.raises(ConfigError, match="get_config"):
        load_config(path)
    assert issubclass(ConfigError, UserError)


def test_loading_does_not_import_jax():
    code = ("import sys, alignjax.config as c; c.load_config('configs/sft.py:tiny'); "
            "assert 'jax' not in sys.modules, 'jax imported'")
    subprocess.run([sys.executable, "-c", code], cwd=ROOT, check=True)


# ---- overrides ---------------------------------------------------------------------------------

def test_override_key_forms():
    c = tiny("--config.optimizer.lr=2e-5", "config.train.steps=7", "train.seed=3")
    assert (c.optimizer.lr, c.train.steps, c.train.seed) == (2e-5, 7, 3)


def test_override_casts_to_field_type():
    c = tiny("optimizer.grad_clip=3", "train.nan_guard=false", "data.completion_only_loss=1",
             "data.train=a.jsonl,hf://x/y:train", "tokenizer.path=/tmp/tok=1")
    assert c.optimizer.grad_clip == 3.0 and isinstance(c.optimizer.grad_clip, float)
    assert c.train.nan_guard is False and c.data.completion_only_loss is True
    assert c.data.train == "a.jsonl,hf://x/y:train"  # strings are verbatim, commas included
    assert c.tokenizer.path == "/tmp/tok=1"  # only the first '=' splits
    with pytest.raises(ConfigError, match="true/false"):
        tiny("train.nan_guard=yes please")


def test_override_none_fields():
    c = tiny("model.head_dim=32", "model.rope_scaling={'rope_type': 'linear', 'factor': 2.0}",
             "sharding.rules=(('batch', ('data', 'fsdp')), ('embed', None))")
    assert c.model.head_dim == 32
    assert c.model.rope_scaling.to_dict() == {"rope_type": "linear", "factor": 2.0}
    assert c.sharding.rules == (("batch", ("data", "fsdp")), ("embed", None))
    assert tiny("model.head_dim=not a literal").model.head_dim == "not a literal"  # str fallback


def test_override_tuple_and_list_fields(tmp_path):
    path = write(tmp_path, "cfg.py", """
        from ml_collections import ConfigDict
        def get_config(preset=None):
            return ConfigDict(dict(axes=("a", "b"), sizes=[1, 2], opt=dict(extra={"k": 1})))
        """)
    c = load_config(path, ["axes=('x', 'y', 'z')", "sizes=[3]", "opt.extra={'k': 2, 'j': 3}"])
    assert c.axes == ("x", "y", "z") and c.sizes == [3]
    assert c.opt.extra.to_dict() == {"k": 2, "j": 3}  # a nested dict value is replaced whole
    assert load_config(path, ["axes=['p']"]).axes == ("p",)  # a list literal fits a tuple field
    with pytest.raises(ConfigError, match="axes"):
        load_config(path, ["axes=(unclosed"])


@pytest.mark.parametrize("text", ["2e-5", "3.0", "many"])
def test_int_field_rejects_non_integers(text):
    with pytest.raises(ConfigError, match=r"train\.steps.*integer"):
        tiny(f"train.steps={text}")


def test_unknown_key_names_key_and_suggests_near_ones():
    with pytest.raises(ConfigError) as e:
        tiny("--config.optimizer.lrr=1e-4")
    assert "'optimizer.lrr'" in str(e.value) and "optimizer.lr" in str(e.value)
    with pytest.raises(ConfigError, match=r"'train\.batchsize'.*train\.batch_size"):
        tiny("train.batchsize=8")
    with pytest.raises(ConfigError, match=r"'optimiser\.lr'.*optimizer\.lr"):
        tiny("optimiser.lr=8")
    with pytest.raises(ConfigError, match="key=value"):
        tiny("train.steps")


def test_sections_cannot_be_replaced_and_config_is_locked():
    with pytest.raises(ConfigError, match="section"):
        tiny("model={'hidden_size': 8}")
    c = tiny()
    with pytest.raises(AttributeError):
        c.optimizer.lrr = 1.0
    c2 = tiny("model.rope_scaling={'rope_type': 'linear', 'factor': 2.0}")
    with pytest.raises(AttributeError):
        c2.model.rope_scaling.typo = 1  # dicts set by overrides are locked too


# ---- validation --------------------------------------------------------------------------------

def test_batch_not_divisible_by_data_fsdp():
    msg = invalid(tiny("train.batch_size=30"))
    assert "train.batch_size=30" in msg and "mesh.data" in msg and "mesh.fsdp" in msg
    msg = invalid(tiny("mesh.data=2", "mesh.fsdp=4", "train.batch_size=12"))
    assert "2*4 = 8" in msg


def test_grad_accum_divisibility():
    assert "train.grad_accum_steps=3" in invalid(tiny("train.grad_accum_steps=3"))
    msg = invalid(tiny("train.grad_accum_steps=8"))  # 32 / 8 = 4 rows over 8 data shards
    assert "micro-batch" in msg and "train.grad_accum_steps" in msg
    validate_config(tiny("train.grad_accum_steps=4"), 8)
    validate_config(tiny("train.grad_accum_steps=8"), 4)


def test_seq_len_beyond_max_positions():
    msg = invalid(tiny("data.seq_len=512"))
    assert "data.seq_len=512" in msg and "model.max_position_embeddings=256" in msg
    # With init_from the architecture is unknown until the directory is read: no error here.
    validate_config(tiny("data.seq_len=512", "model.init_from=/models/x"), 8)


def test_enum_and_range_errors_are_collected():
    msg = invalid(tiny("optimizer.schedule=cosin", "data.packing=packed", "optimizer.lr=0",
                       "optimizer.warmup_steps=600", "data.format=chat",
                       "data.truncation=left", "model.remat_policy=some"))
    for key in ("optimizer.schedule='cosin'", "cosine, linear, constant", "data.packing='packed'",
                "optimizer.lr=0.0", "optimizer.warmup_steps=600", "train.steps=600",
                "data.format='chat'", "data.truncation='left'", "model.remat_policy='some'"):
        assert key in msg


def test_mesh_and_sharding_errors():
    assert "mesh" in invalid(tiny("mesh.fsdp=3"))
    assert "mesh.tensor=0" in invalid(tiny("mesh.tensor=0"))
    msg = invalid(load_config(f"{SFT}:llama3_70b", ["mesh.tensor=16"]), 32)
    assert "kv_heads" in msg and "mesh.tensor" in msg
    assert "num_key_value_heads" in invalid(tiny("model.num_key_value_heads=3"))


def test_tokenizer_required_without_init_from():
    assert "tokenizer.path" in invalid(tiny("tokenizer.path="))
    validate_config(tiny("tokenizer.path=", "model.init_from=/models/x"), 8)


# ---- saved configs -----------------------------------------------------------------------------

def test_save_load_round_trip(tmp_path):
    c = tiny("sharding.rules=(('batch', ('data', 'fsdp')),)", "optimizer.lr=3e-3")
    path = save_config(c, str(tmp_path / "run"))
    assert json.load(open(path))["optimizer"]["lr"] == 3e-3  # plain readable JSON
    loaded = load_saved_config(str(tmp_path / "run"))
    assert config_diff(c, loaded) == {}  # tuples come back as lists; they compare equal
    assert loaded.train.batch_size == 32 and loaded.model.head_dim is None
    validate_config(loaded, 8)
    with pytest.raises(AttributeError):
        loaded.train.typo = 1
    with pytest.raises(ConfigError, match="config.json"):
        load_saved_config(str(tmp_path / "elsewhere"))


def test_config_diff():
    a = tiny()
    b = tiny("optimizer.lr=1e-4", "model.rope_scaling={'rope_type': 'linear', 'factor': 2.0}")
    diff = config_diff(a, b)
    assert diff["optimizer.lr"] == (3e-3, 1e-4)
    assert diff["model.rope_scaling"] == (None, MISSING)
    assert diff["model.rope_scaling.factor"] == (MISSING, 2.0)
    assert len(diff) == 4
    assert config_diff({"x": {"y": (1, 2)}}, {"x": {"y": [1, 2]}}) == {}


def test_resume_refuses_architecture_change_and_reports_the_rest(tmp_path):
    save_config(tiny(), str(tmp_path))
    saved = load_saved_config(str(tmp_path))
    assert check_resume_config(saved, tiny("train.steps=900")) == {"train.steps": (600, 900)}
    with pytest.raises(ConfigError, match=r"model\.hidden_size: 128 -> 256"):
        check_resume_config(saved, tiny("model.hidden_size=256"))


# ---- sweeps ------------------------------------------------------------------------------------

def test_grid_sweep_order_and_names(tmp_path):
    path = write(tmp_path, "grid.py", """
        SWEEP = {"base": "configs/sft.py:tiny",
                 "grid": {"optimizer.lr": [1e-4, 3e-4], "train.seed": [0, 1]},
                 "fixed": {"train.steps": 20}}
        """)
    base, runs = expand_sweep(path)
    assert base == "configs/sft.py:tiny"
    assert [name for name, _ in runs] == [
        "optimizer.lr=0.0001,train.seed=0", "optimizer.lr=0.0001,train.seed=1",
        "optimizer.lr=0.0003,train.seed=0", "optimizer.lr=0.0003,train.seed=1"]
    assert runs[3][1] == ["train.steps=20", "optimizer.lr=0.0003", "train.seed=1"]
    c = load_config(base, runs[3][1])
    assert (c.optimizer.lr, c.train.seed, c.train.steps) == (3e-4, 1, 20)


def test_explicit_sweep_list_and_safe_names(tmp_path):
    path = write(tmp_path, "list.py", """
        BASE = "configs/sft.py:tiny"
        def get_sweep():
            return [{"name": "fast run", "optimizer.lr": 1e-3},
                    {"data.train": "/data/a b.jsonl", "optimizer.schedule": "linear"},
                    {"model.rope_scaling": {"rope_type": "linear", "factor": 2.0}}]
        """)
    base, runs = expand_sweep(path)
    names = [n for n, _ in runs]
    assert names[0] == "fast_run"
    for name in names:
        assert "/" not in name and " " not in name and len(name) <= 120
        assert not name.startswith(".")
    overrides = runs[2][1]
    c = load_config(f"{SFT}:tiny", overrides)
    assert c.model.rope_scaling.factor == 2.0
    assert load_config(f"{SFT}:tiny", runs[1][1]).data.train == "/data/a b.jsonl"


def test_sweep_errors(tmp_path):
    with pytest.raises(ConfigError, match="SWEEP"):
        expand_sweep(write(tmp_path, "none.py", "X = 1\n"))
    dup = write(tmp_path, "dup.py", """
        BASE = "configs/sft.py:tiny"
        def get_sweep():
            return [{"name": "a"}, {"name": "a"}]
        """)
    with pytest.raises(ConfigError, match="'a'"):
        expand_sweep(dup)


def test_shipped_lr_sweep_loads_and_validates():
    base, runs = expand_sweep(os.path.join(ROOT, "configs", "sweeps", "sft_lr.py"))
    assert 2 <= len(runs) <= 3
    lrs = set()
    for _, overrides in runs:
        c = load_config(base, overrides)
        validate_config(c, 8)
        lrs.add(c.optimizer.lr)
    assert len(lrs) == len(runs)


def test_context_length_extends_a_checkpoint_and_a_too_long_seq_len_is_refused(tmp_path):
    """A model read from init_from keeps its context unless model.context_length extends it;
    training past it (positions it never saw, and a saved model that then refuses its own
    prompts) is a one-line error naming the keys."""
    from alignjax.config import load_config
    from alignjax.model.config import ConfigError
    from alignjax.train.setup import model_config
    from tests.hf_models import make_hf_model
    make_hf_model("llama2", tmp_path / "hf")  # max_position_embeddings 256
    base = [f"model.init_from={tmp_path / 'hf'}", "tokenizer.path="]
    assert model_config(load_config("configs/sft.py:tiny", base)).max_position_embeddings == 256
    with pytest.raises(ConfigError, match=r"data.seq_len=512 exceeds the context of model.init_from"
                                          r".*set model.context_length=512"):
        model_config(load_config("configs/sft.py:tiny", base + ["data.seq_len=512"]))
    extended = load_config("configs/sft.py:tiny", base + ["data.seq_len=512",
                                                          "model.context_length=1024"])
    assert model_config(extended).max_position_embeddings == 1024
