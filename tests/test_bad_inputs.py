"""Bad inputs, one table (issue 10): each row runs `alignjax ...` in-process and must exit non-zero
with exactly one line on stderr that names the file, flag or key, no traceback, and leave every
file that was there unchanged. The last test checks that the shared workdir still resumes.

Rows run against one small world built once per module: a 2-step trained workdir, its Hugging Face
export and damaged copies of it, config and data files. `{name}` in a row is a path of that world.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import shlex
import shutil
import struct

import pytest

from alignjax.cli import main as cli_main

# A model small enough to train 2 steps and export in seconds.
TINY = ["--config.model.hidden_size=32", "--config.model.intermediate_size=64",
        "--config.model.num_hidden_layers=1", "--config.model.num_attention_heads=2",
        "--config.model.num_key_value_heads=1", "--config.data.seq_len=32",
        "--config.train.batch_size=8", "--config.optimizer.warmup_steps=1",
        "--config.train.log_every=1", "--config.train.eval_every=0",
        "--config.checkpoint.async_save=False"]
TRAIN = "train --config configs/sft.py:tiny --workdir {fresh}"  # a new workdir per row
NEEDS_NO_GCSFS = pytest.mark.skipif(importlib.util.find_spec("gcsfs") is not None,
                                    reason="gcsfs is installed: gs:// would be tried for real")


def _train_args(world, steps: int) -> list[str]:
    return (["train", "--config", "configs/sft.py:tiny", "--workdir", world["wd"],
             f"--config.data.train={world['data']}", "--config.data.eval=",
             f"--config.train.steps={steps}"] + TINY)


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("bad_inputs")
    w = {k: str(root / k) for k in ("wd", "hf", "out", "afile", "empty")}
    records = [{"prompt": f"sort: {i} {i + 2} {i + 1}", "completion": f"{i} {i + 1} {i + 2}"}
               for i in range(32)]
    w["data"] = _write(root / "train.jsonl", "".join(json.dumps(r) + "\n" for r in records))
    cli_main(_train_args(w, 2))
    cli_main(["convert", "alignjax-to-hf", "--ckpt", w["wd"], "--out", w["hf"]])
    _write(root / "afile", "just a file\n")
    w["wd_broken"] = str(root / "wd_broken")  # every checkpoint has lost its array files
    shutil.copytree(w["wd"], w["wd_broken"])
    for step in os.listdir(os.path.join(w["wd_broken"], "checkpoints")):
        state = os.path.join(w["wd_broken"], "checkpoints", step, "state")
        for base, dirs, _ in os.walk(state):
            if os.path.basename(base) == "d":
                shutil.rmtree(base)
    os.makedirs(w["empty"])

    def hf_copy(name, edit):
        dst = root / name
        dst.mkdir()
        for f in os.listdir(w["hf"]):
            (dst / f).write_bytes((root / "hf" / f).read_bytes())
        edit(dst)
        w[name] = str(dst)

    shard = "model-00001-of-00001.safetensors"
    hf_copy("hf_badjson", lambda d: (d / "config.json").write_text('{"model_type": "llama",\n  oops\n'))
    hf_copy("hf_nohidden", lambda d: _edit_json(d / "config.json", lambda c: c.pop("hidden_size")))
    hf_copy("hf_gpt2", lambda d: _edit_json(d / "config.json", lambda c: c.update(model_type="gpt2")))
    hf_copy("hf_trunc_data", lambda d: _truncate(d / shard, 4000))
    hf_copy("hf_trunc_header", lambda d: _truncate(d / shard, 100))
    hf_copy("hf_badheader", lambda d: _corrupt_header(d / shard))
    hf_copy("hf_noweights", lambda d: [os.remove(d / f) for f in os.listdir(d)
                                       if f.endswith((".safetensors", ".index.json"))])
    for name, text in {
        "syntax.py": "def get_config(preset=None):\n    x = (\n",
        "raises.py": "def get_config(preset=None):\n    return undefined_name\n",
        "noget.py": "X = 1\n",
        "nosweep.py": "X = 1\n",
        "badgrid.py": "SWEEP = {'base': 'configs/sft.py:tiny', 'grid': {'optimizer.lr': []}}\n",
        "prompts.jsonl": '{"text": "no prompt key here"}\n',
    }.items():
        w[name.replace(".", "_")] = _write(root / name, text)
    w["root"] = str(root)
    return w


def _write(path, text: str) -> str:
    path.write_text(text)
    return str(path)


def _edit_json(path, fn):
    data = json.loads(path.read_text())
    fn(data)
    path.write_text(json.dumps(data))


def _truncate(path, size: int):
    with open(path, "r+b") as f:
        f.truncate(size)


def _corrupt_header(path):
    blob = bytearray(path.read_bytes())
    (n,) = struct.unpack("<Q", blob[:8])
    blob[8:8 + n] = b"{" * n  # same length, not JSON
    path.write_bytes(bytes(blob))


def _snapshot(root: str) -> dict:
    out = {}
    for base, _, files in os.walk(root):
        for f in files:
            p = os.path.join(base, f)
            with open(p, "rb") as fh:
                out[p] = hashlib.sha1(fh.read()).hexdigest()
    return out


# (id, command line, substrings the one error line must contain). Issue 10's cases first, then
# inputs that already had a clear error and must keep it.
ROWS = [
    # -- issue 10: tracebacks that became one-line errors
    ("hf-config-corrupt", "convert hf-to-alignjax --hf {hf_badjson} --out {out}",
     ["{hf_badjson}/config.json:2", "not valid JSON"]),
    ("hf-config-missing-key", "convert hf-to-alignjax --hf {hf_nohidden} --out {out}",
     ["config.json", "hidden_size"]),
    ("safetensors-truncated-data", "convert hf-to-alignjax --hf {hf_trunc_data} --out {out}",
     ["{hf_trunc_data}/model-00001-of-00001.safetensors", "truncated"]),
    ("safetensors-truncated-header", "convert hf-to-alignjax --hf {hf_trunc_header} --out {out}",
     ["{hf_trunc_header}/model-00001-of-00001.safetensors", "truncated"]),
    ("safetensors-garbled-header", "convert hf-to-alignjax --hf {hf_badheader} --out {out}",
     ["{hf_badheader}/model-00001-of-00001.safetensors", "damaged header"]),
    ("generate-truncated-weights", "generate --model {hf_trunc_data} --prompt hi",
     ["model-00001-of-00001.safetensors", "truncated"]),
    ("workdir-parent-is-file", "train --config configs/sft.py:tiny --workdir {afile}/run",
     ["--workdir", "{afile}", "not a directory"]),
    ("workdir-read-only-fs", "train --config configs/sft.py:tiny --workdir /sys/alignjax-run",
     ["--workdir", "/sys/alignjax-run", "cannot create files"]),
    ("workdir-under-proc", "train --config configs/sft.py:tiny --workdir /proc/alignjax-run",
     ["--workdir", "/proc/alignjax-run", "virtual file system"]),
    ("export-out-read-only", "convert alignjax-to-hf --ckpt {wd} --out /sys/alignjax-export",
     ["--out", "/sys/alignjax-export"]),
    ("import-out-under-file", "convert hf-to-alignjax --hf {hf} --out {afile}/model",
     ["--out", "{afile}"]),
    ("sample-out-under-proc", "sample --model {wd} --prompts toy --reward toy --out /proc/x.jsonl",
     ["--out", "/proc"]),
    ("config-not-python", "train --config README.md --workdir {fresh}",
     ["README.md", "not a Python config file"]),
    ("config-syntax-error", "train --config {syntax_py} --workdir {fresh}",
     ["{syntax_py}:2", "syntax error"]),
    ("config-raises", "train --config {raises_py} --workdir {fresh}",
     ["{raises_py}:2", "NameError"]),
    # -- issue 10: misleading errors
    ("config-is-folder", "train --config configs --workdir {fresh}",
     ["'configs'", "is a directory", "configs/sft.py:tiny"]),
    ("tokenizer-path-missing", TRAIN + " --config.tokenizer.path={root}/no-tokenizer",
     ["{root}/no-tokenizer", "no such tokenizer directory"]),
    ("score-max-length-0", "score --model {wd} --prompt a --response b --max-length 0",
     ["--max-length 0", ">= 2"]),
    # -- already clear: command line
    ("no-command", "", ["required: COMMAND"]),
    ("unknown-command", "frobnicate", ["invalid choice: 'frobnicate'"]),
    ("unknown-flag", "generate --model {wd} --prompt hi --frob", ["unrecognized arguments: --frob"]),
    ("override-on-generate", "generate --model {wd} --prompt hi --config.train.steps=3",
     ["unrecognized arguments: --config.train.steps=3"]),
    ("train-missing-workdir", "train --config configs/sft.py:tiny", ["--workdir"]),
    ("train-missing-config", "train --workdir {fresh}", ["--config"]),
    ("convert-missing-direction", "convert", ["DIRECTION"]),
    ("convert-bad-dtype", "convert alignjax-to-hf --ckpt {wd} --out {out} --dtype int8",
     ["--dtype", "'int8'"]),
    ("convert-bad-head", "convert hf-to-alignjax --hf {hf} --out {out} --head value", ["--head"]),
    ("generate-no-prompt", "generate --model {wd}", ["--prompt"]),
    ("generate-int-flag", "generate --model {wd} --prompt hi --max-new-tokens many",
     ["--max-new-tokens", "'many'"]),
    ("sample-bad-mode", "sample --model {wd} --prompts toy --reward toy --out {out}.jsonl --mode every",
     ["--mode", "'every'"]),
    ("bench-bad-what", "bench backward", ["'backward'"]),
    # -- already clear: config files, presets, overrides
    ("config-missing-file", "train --config configs/nope.py --workdir {fresh}",
     ["configs/nope.py", "not found"]),
    ("config-unknown-preset", "train --config configs/sft.py:huge --workdir {fresh}",
     ["unknown preset 'huge'", "tiny"]),
    ("config-no-get-config", "train --config {noget_py} --workdir {fresh}",
     ["{noget_py}", "get_config"]),
    ("override-unknown-key", TRAIN + " --config.optimizer.lrr=1", ["optimizer.lrr", "optimizer.lr"]),
    ("override-no-value", TRAIN + " --config.train.steps", ["train.steps", "key=value"]),
    ("override-int-from-float", TRAIN + " --config.train.steps=2e-5", ["train.steps", "integer"]),
    ("override-not-a-number", TRAIN + " --config.optimizer.lr=fast", ["optimizer.lr", "number"]),
    ("override-bad-bool", TRAIN + " --config.train.nan_guard=maybe", ["train.nan_guard", "true/false"]),
    ("override-section", TRAIN + " --config.optimizer=1", ["'optimizer'", "config section"]),
    ("override-bad-literal", TRAIN + " --config.model.rope_scaling={{", ["model.rope_scaling"]),
    ("bad-dtype", TRAIN + " --config.model.dtype=float8", ["model.dtype", "float32"]),
    ("bad-remat", TRAIN + " --config.model.remat_policy=some", ["model.remat_policy"]),
    ("bad-format", TRAIN + " --config.data.format=chatml", ["data.format"]),
    ("bad-packing", TRAIN + " --config.data.packing=tight", ["data.packing"]),
    ("bad-schedule", TRAIN + " --config.optimizer.schedule=step", ["optimizer.schedule"]),
    ("negative-lr", TRAIN + " --config.optimizer.lr=-1", ["optimizer.lr"]),
    ("bad-b2", TRAIN + " --config.optimizer.b2=1.5", ["optimizer.b2"]),
    ("zero-log-every", TRAIN + " --config.train.log_every=0", ["train.log_every"]),
    ("zero-accum", TRAIN + " --config.train.grad_accum_steps=0", ["train.grad_accum_steps"]),
    ("warmup-too-long", TRAIN + " --config.optimizer.warmup_steps=5000", ["optimizer.warmup_steps"]),
    ("batch-not-divisible", TRAIN + " --config.train.batch_size=12",
     ["train.batch_size=12 is not divisible"]),
    ("seq-len-beyond-model", TRAIN + " --config.data.seq_len=4096",
     ["data.seq_len", "max_position_embeddings"]),
    ("kv-heads-not-dividing", TRAIN + " --config.model.num_key_value_heads=3",
     ["model.num_key_value_heads"]),
    ("mesh-not-dividing", TRAIN + " --config.mesh.data=3", ["mesh"]),
    ("mesh-zero", TRAIN + " --config.mesh.fsdp=0", ["mesh.fsdp"]),
    ("empty-train-data", TRAIN + " --config.data.train=", ["data.train"]),
    ("no-tokenizer", TRAIN + " --config.tokenizer.path=", ["tokenizer.path"]),
    ("dpo-bad-loss", "train --config configs/dpo.py:tiny --workdir {fresh} --config.model.init_from={wd} "
     "--config.dpo.loss_type=dpoo", ["dpoo"]),
    ("dpo-bad-reference", "train --config configs/dpo.py:tiny --workdir {fresh} "
     "--config.model.init_from={wd} --config.dpo.reference=cached", ["dpo.reference"]),
    ("dpo-bad-beta", "train --config configs/dpo.py:tiny --workdir {fresh} "
     "--config.model.init_from={wd} --config.dpo.beta=-1", ["beta"]),
    # -- already clear: data, models, workdirs
    ("missing-data-file", TRAIN + " --config.data.train={root}/nope.jsonl --config.data.eval=",
     ["{root}/nope.jsonl"]),
    ("data-dir-not-a-dataset", TRAIN + " --config.data.train={empty} --config.data.eval=",
     ["{empty}", "save_to_disk"]),
    ("data-unknown-format", TRAIN + " --config.data.train={afile} --config.data.eval=",
     ["{afile}", "unknown data format"]),
    ("tokenizer-path-is-file", TRAIN + " --config.tokenizer.path={afile}", ["{afile}", "is a file"]),
    ("init-from-missing", TRAIN + " --config.model.init_from={root}/no-model", ["{root}/no-model"]),
    ("resume-architecture-change", "train --config configs/sft.py:tiny --workdir {wd} "
     "--config.data.train={data} --config.data.eval= --config.train.steps=2 "
     "--config.model.hidden_size=64 --config.model.intermediate_size=64 "
     "--config.model.num_hidden_layers=1 --config.model.num_attention_heads=2 "
     "--config.model.num_key_value_heads=1 --config.data.seq_len=32 --config.train.batch_size=8 "
     "--config.optimizer.warmup_steps=1", ["cannot resume", "model.hidden_size"]),
    ("generate-missing-model", "generate --model {root}/no-model --prompt hi", ["{root}/no-model"]),
    ("generate-empty-dir", "generate --model {empty} --prompt hi", ["{empty}", "config.json"]),
    ("generate-not-llama", "generate --model {hf_gpt2} --prompt hi", ["model_type='gpt2'"]),
    ("generate-bad-mesh", "generate --model {wd} --prompt hi --mesh data=x", ["--mesh 'data=x'"]),
    ("generate-mesh-no-size", "generate --model {wd} --prompt hi --mesh data", ["--mesh 'data'"]),
    ("generate-no-control-tokens", "generate --model {wd} --prompt hi --condition good",
     ["control tokens"]),
    ("import-no-weights", "convert hf-to-alignjax --hf {hf_noweights} --out {out}",
     ["{hf_noweights}", "safetensors"]),
    ("import-missing-dir", "convert hf-to-alignjax --hf {root}/no-hf --out {out}", ["{root}/no-hf"]),
    ("export-missing-ckpt", "convert alignjax-to-hf --ckpt {root}/no-ckpt --out {out}",
     ["{root}/no-ckpt"]),
    ("score-lm-model", "score --model {wd} --prompt a --response b", ["head='lm'", "scalar"]),
    ("score-count-mismatch", "score --model {wd} --prompt a --prompt b --response c",
     ["--response", "--prompt"]),
    ("sample-prompts-missing", "sample --model {wd} --prompts {root}/none.jsonl --reward toy "
     "--out {out}.jsonl", ["{root}/none.jsonl"]),
    ("sample-prompts-no-field", "sample --model {wd} --prompts {prompts_jsonl} --reward toy "
     "--out {out}.jsonl", ["{prompts_jsonl}", "prompt"]),
    ("sample-out-is-dir", "sample --model {wd} --prompts toy --reward toy --out {empty}",
     ["--out {empty}", "is a directory"]),
    ("hf-is-a-file", "convert hf-to-alignjax --hf {afile} --out {out}", ["{afile}"]),
    ("sample-reward-missing", "sample --model {wd} --prompts toy --reward {root}/no-rm "
     "--out {out}.jsonl", ["{root}/no-rm"]),
    ("sweep-missing-file", "sweep --sweep {root}/no-sweep.py --workdir {fresh}", ["no-sweep.py"]),
    ("sweep-no-sweep", "sweep --sweep {nosweep_py} --workdir {fresh}", ["{nosweep_py}", "SWEEP"]),
    ("sweep-empty-grid", "sweep --sweep {badgrid_py} --workdir {fresh}",
     ["{badgrid_py}", "optimizer.lr", "non-empty"]),
    # gs:// works through gcsfs (the [gcs]/[tpu] extras), which the test install lacks
    pytest.param("train-remote-workdir-no-gcsfs",
                 "train --config configs/sft.py:tiny --workdir gs://bucket/run",
                 ["--workdir gs://bucket/run", "gcsfs"], marks=NEEDS_NO_GCSFS),
    pytest.param("export-remote-out-no-gcsfs",
                 "convert alignjax-to-hf --ckpt {wd} --out gs://bucket/hf",
                 ["--out gs://bucket/hf", "gcsfs"], marks=NEEDS_NO_GCSFS),
    ("import-remote-out", "convert hf-to-alignjax --hf {hf} --out gs://bucket/m",
     ["--out gs://bucket/m", "local path"]),
    ("sample-remote-out", "sample --model {wd} --prompts toy --reward toy --out gs://bucket/s.jsonl",
     ["--out gs://bucket/s.jsonl", "local path"]),
    ("compile-bad-topology", "compile --config configs/sft.py:tiny --topology v9-8", ["v9-8"]),
    ("compile-odd-topology", "compile --config configs/sft.py:tiny --topology v5p-7", ["v5p-7"]),
    # -- issue 10 cases fixed by the other helpers (exports, damaged checkpoints)
    ("export-into-workdir", "convert alignjax-to-hf --ckpt {wd} --out {wd}",
     ["--out {wd}", "training workdir"]),
    ("export-into-non-empty", "convert alignjax-to-hf --ckpt {wd} --out {hf}",
     ["--out {hf}", "--overwrite"]),
    ("import-into-workdir", "convert hf-to-alignjax --hf {hf} --out {wd}",
     ["--out {wd}", "training workdir"]),
    # -- issue 10: sampling flags that were silently wrong or a JAX TypeError (checked up front)
    ("generate-negative-new-tokens", "generate --model {wd} --prompt hi --max-new-tokens -5",
     ["--max-new-tokens", "-5"]),
    ("generate-negative-temperature", "generate --model {wd} --prompt hi --temperature -1",
     ["--temperature", ">= 0"]),
    ("generate-top-p-above-1", "generate --model {wd} --prompt hi --top-p 1.5", ["--top-p", "1.5"]),
    ("generate-top-p-zero", "generate --model {wd} --prompt hi --top-p 0 --temperature 1",
     ["--top-p", "0.0"]),
    ("generate-negative-top-k", "generate --model {wd} --prompt hi --top-k -3", ["--top-k", "-3"]),
    ("generate-new-tokens-beyond-model", "generate --model {wd} --prompt hi --max-new-tokens 300",
     ["--max-new-tokens 300", "max_position_embeddings"]),
    ("generate-prompt-beyond-model", "generate --model {wd} --max-new-tokens 8 --prompt '"
     + "sort: 1 2 3 " * 120 + "'", ["max_position_embeddings"]),
    ("sample-negative-temperature", "sample --model {wd} --prompts toy --reward toy "
     "--out {out}.jsonl --temperature -1", ["--temperature", ">= 0"]),
    ("sample-too-few-samples", "sample --model {wd} --prompts toy --reward toy --out {out}.jsonl "
     "--n 1", ["--n 1", "n >= 2"]),
    ("generate-no-checkpoint-restores", "generate --model {wd_broken} --prompt hi",
     ["{wd_broken}/checkpoints", "no checkpoint restores"]),
]


def _param(row):
    if hasattr(row, "marks"):  # a pytest.param(...) row (a NamedTuple too)
        row_id, *values = row.values
        return pytest.param(*values, id=row_id, marks=row.marks)
    return pytest.param(*row[1:], id=row[0])


@pytest.mark.parametrize("command,expected", [_param(r) for r in ROWS])
def test_bad_input_gets_one_line(world, capsys, request, command, expected):
    # {fresh}: a workdir of this row's own (a failed start may leave files there).
    fresh = os.path.join(world["root"], "fresh", request.node.callspec.id)
    argv = shlex.split(command.format(**dict(world, fresh=fresh)))
    before = _snapshot(world["root"])
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:
        cli_main(argv)
    err = capsys.readouterr().err
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert e.value.code not in (0, None), err
    assert "Traceback" not in err
    assert len(lines) == 1, err
    for text in expected:
        assert text.format(**world) in lines[0], lines[0]
    after = _snapshot(world["root"])
    changed = [p for p, h in before.items() if after.get(p) != h]
    assert not changed, f"changed or removed: {changed}"


def test_resume_when_no_checkpoint_restores(world, capsys):
    # Not a table row: the data check runs before the restore and prints its summary line first
    # ("alignjax: data.train: no example truncated or dropped"), so the error is the last line.
    before = _snapshot(world["root"])
    with pytest.raises(SystemExit) as e:
        cli_main(["train", "--config", "configs/sft.py:tiny", "--workdir", world["wd_broken"],
                  f"--config.data.train={world['data']}", "--config.data.eval=",
                  "--config.train.steps=2"] + TINY)
    err = capsys.readouterr().err
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert e.value.code == 2 and "Traceback" not in err
    assert lines[-1].startswith(f"alignjax: error: {world['wd_broken']}/checkpoints: no checkpoint "
                                "restores"), err
    assert all(ln.startswith("alignjax: ") and "error" not in ln for ln in lines[:-1]), err
    after = _snapshot(world["root"])
    assert [p for p, h in before.items() if after.get(p) != h] == []


@pytest.mark.parametrize("lines,message", [
    ('{"prompt": "a", "completion": null}', "{path}:1: 'completion' is null"),
    ('{"prompt": "a", "completion": "b"}\n{"prompt": "a", "completion": \n', "{path}:2: "),
])
def test_bad_records_are_listed_before_training(world, capsys, tmp_path, lines, message):
    # A list of bad records (the first 20 and the count) is the one multi-line error: a header
    # naming data.train, then one file:line per record; nothing is trained or saved.
    path = _write(tmp_path / "data.jsonl", lines + "\n")
    workdir = tmp_path / "run"
    with pytest.raises(SystemExit) as e:
        cli_main(shlex.split(TRAIN.format(fresh=workdir)) +
                 [f"--config.data.train={path}", "--config.data.eval="] + TINY)
    err = capsys.readouterr().err
    out = [ln for ln in err.splitlines() if ln.strip()]
    assert e.value.code == 2 and "Traceback" not in err and "it/s" not in err, err
    assert out[0].startswith("alignjax: error: data.train: 1 invalid records"), err
    assert len(out) == 2 and message.format(path=path) in out[1], err
    assert not (workdir / "checkpoints").exists()


@pytest.mark.parametrize("record,message", [
    ({"prompt": "a", "completion": None}, "f.jsonl:3: 'completion' is null"),
    ({"prompt": "a", "completion": 5}, "f.jsonl:3: 'completion' is int"),
    ({"text": ["x"], "prompt": 1, "completion": "b"}, "f.jsonl:3: 'prompt' is int"),
    ({"prompt": "a", "completion": [{"role": "assistant", "content": "b"}]},
     "'prompt' is str and 'completion' is list"),
    ({"prompt": "a"}, "f.jsonl:3: cannot tell the record format"),
])
def test_wrong_typed_record_names_field_and_type(bpe_tokenizer, record, message):
    # Was "record lacks ['completion'] ... (present: ['completion', 'prompt'])" for a null field.
    from alignjax.data.formatting import SFTFormatter
    from alignjax.data.sources import DataError

    with pytest.raises(DataError) as e:
        SFTFormatter(bpe_tokenizer)(record, "f.jsonl:3")
    assert message in str(e.value) and "lacks" not in str(e.value)


@pytest.mark.parametrize("env,devices,expected", [
    ({}, [], "cpu"),  # no accelerator: quiet CPU (no libtpu probing noise)
    ({}, ["/dev/accel0"], None),  # a TPU VM: jax chooses
    ({}, ["/dev/nvidia0"], None),  # a GPU host: jax chooses
    ({"JAX_PLATFORMS": "tpu"}, [], "tpu"),  # the user's choice always wins
])
def test_quiet_platform(monkeypatch, env, devices, expected):
    from alignjax import cli

    monkeypatch.delenv("JAX_PLATFORMS", raising=False)
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    monkeypatch.setattr(cli.glob, "glob", lambda pattern: [d for d in devices
                                                           if d.startswith(pattern.rstrip("*"))])
    cli.quiet_platform()
    assert os.environ.get("JAX_PLATFORMS") == expected


def test_read_only_directory_is_refused_up_front(tmp_path, capsys):
    # Permission bits do not stop root (the /proc and /sys rows above cover root); as a user they do.
    if os.geteuid() == 0:
        pytest.skip("running as root: chmod 555 does not stop writes")
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o555)
    try:
        with pytest.raises(SystemExit) as e:
            cli_main(["train", "--config", "configs/sft.py:tiny", "--workdir", str(ro / "run")])
    finally:
        ro.chmod(0o755)
    assert e.value.code == 2
    assert f"--workdir {ro / 'run'}: cannot create files in {ro}" in capsys.readouterr().err


def test_read_only_file_system_message(tmp_path, monkeypatch):
    # A read-only mount cannot be made without privileges: the probe's real failure is simulated.
    import errno
    import tempfile

    from alignjax.errors import UserError, require_writable_dir

    def erofs(**kw):
        raise OSError(errno.EROFS, os.strerror(errno.EROFS), kw["dir"])

    monkeypatch.setattr(tempfile, "mkdtemp", erofs)
    with pytest.raises(UserError, match=rf"--out {tmp_path}/x: cannot create files in {tmp_path}: "
                                        "Read-only file system; choose a writable directory"):
        require_writable_dir(str(tmp_path / "x"), "--out")


@pytest.mark.parametrize("kind,record,message", [
    ("pair", {"prompt": "p", "chosen": None, "rejected": "b"}, "'chosen' is null"),
    ("kto", {"prompt": "p", "completion": "a", "label": None}, "'label' is null"),
])
def test_null_preference_field_is_named(tmp_path, bpe_tokenizer, kind, record, message):
    # Was "record lacks ['chosen'] ... (present: ['chosen', 'prompt', 'rejected'])".
    from alignjax.data.preference import make_preference_eval_iterator
    from alignjax.data.sources import DataError

    path = _write(tmp_path / "prefs.jsonl", json.dumps(record) + "\n")
    with pytest.raises(DataError) as e:
        list(make_preference_eval_iterator(path, bpe_tokenizer, {}, kind=kind, batch_size=2,
                                           seq_len=32))
    assert f"{path}:1: {message}" in str(e.value) and "lacks" not in str(e.value)


def test_interrupt_outside_training_is_one_line(world, capsys, monkeypatch):
    def interrupted(args):
        raise KeyboardInterrupt

    monkeypatch.setattr("alignjax.cli.cmd_generate", interrupted)
    with pytest.raises(SystemExit) as e:
        cli_main(["generate", "--model", world["wd"], "--prompt", "hi"])
    assert e.value.code == 130
    assert capsys.readouterr().err.strip() == "alignjax: interrupted"


def test_unexpected_errors_keep_their_traceback(world, monkeypatch):
    # A bug is not the user's fault: cli.main must not hide it behind a one-line message.
    def buggy(args):
        raise OSError("no path involved")

    monkeypatch.setattr("alignjax.cli.cmd_generate", buggy)
    with pytest.raises(OSError, match="no path involved"):
        cli_main(["generate", "--model", world["wd"], "--prompt", "hi"])


def test_workdir_still_resumes_after_every_row(world, capsys):
    """Runs last: the workdir every row pointed at continues from its checkpoint 2 to step 3."""
    from alignjax.train.metrics import read_metrics

    cli_main(_train_args(world, 3))
    steps = [row["step"] for row in read_metrics(world["wd"])]
    assert steps == [1, 2, 3]
