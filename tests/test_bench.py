"""`alignjax bench`: the train bench's table/JSON, its token and FLOP accounting (no timings asserted)."""
from __future__ import annotations

import json

import pytest

from alignjax.bench import PRESETS, bench_config
from alignjax.cli import main as cli_main
from alignjax.train import metrics


def test_flops_per_token_counts_weights_and_full_attention():
    c = bench_config("medium")
    e, i, layers, h, k, d, v = 512, 1376, 8, 8, 4, 64, 8192
    matmul_weights = layers * (e * h * d + 2 * e * k * d + h * d * e + 3 * e * i) + v * e
    norms = layers * 2 * e + e
    for t in (64, 256):
        assert c.flops_per_token(t) == 6 * (matmul_weights + norms) + 12 * layers * t * h * d


@pytest.mark.parametrize("preset", sorted(PRESETS))
def test_every_preset_makes_a_config(preset):
    """`--preset 1b` raised a TypeError: its own max_position_embeddings was passed twice."""
    c = bench_config(preset, dtype="bfloat16")
    assert c.dtype == "bfloat16"
    assert c.max_position_embeddings == PRESETS[preset].get("max_position_embeddings", 4096)


@pytest.mark.slow  # two jitted train steps + torch: ~45 s of CPU
def test_bench_train_dpo_table_and_json(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(metrics, "cpu_peak_flops", lambda dtype="float32", **kw: 1e11)  # no timing here
    out = tmp_path / "bench.json"
    cli_main(["bench", "train", "--algorithm", "dpo", "--preset", "tiny", "--batch", "8,16",
              "--seq-len", "16", "--steps", "1", "--json", str(out)])
    text = capsys.readouterr().out
    lines = text.strip().splitlines()
    assert lines[0].startswith("bench train --algorithm dpo: preset=tiny") and "batch=8,16" in lines[0]
    rows = [ln.split() for ln in lines if ln.split() and ln.split()[0] in ("8", "16")]
    assert [r[0] for r in rows] == ["8", "16"] and all(r[-1].endswith("%") for r in rows)
    results = json.loads(out.read_text())["results"]
    fpt = bench_config("tiny").flops_per_token(16) * 4 / 3  # + the reference's forward
    for r, batch in zip(results, (8, 16)):
        assert (r["batch"], r["algorithm"]) == (batch, "dpo")
        # Tokens: chosen and rejected of every pair, on both sides.
        assert r["alignjax_tokens_per_s"] * r["alignjax_s_per_call"] == pytest.approx(2 * batch * 16)
        assert r["torch_tokens_per_s"] * r["torch_s_per_call"] == pytest.approx(2 * batch * 16)
        assert r["flops_per_token"] == pytest.approx(fpt) and r["peak_flops"] == 1e11
        assert r["alignjax_mfu"] == pytest.approx(r["alignjax_tokens_per_s"] * fpt / 1e11)
        assert r["torch_mfu"] == pytest.approx(r["torch_tokens_per_s"] * fpt / 1e11)
        assert r["speedup"] == pytest.approx(r["alignjax_tokens_per_s"] / r["torch_tokens_per_s"])


@pytest.mark.parametrize("args, message", [
    (["--batch", "8,x"], "give positive batch sizes"),
    (["--batch", "0"], "give positive batch sizes"),
    (["--batch", "4"], "not a multiple of the mesh's data x fsdp"),
])
def test_bench_bad_batch_is_one_line(args, message, capsys):
    with pytest.raises(SystemExit):
        cli_main(["bench", "train", "--preset", "tiny", "--seq-len", "8", "--no-torch"] + args)
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err


@pytest.mark.slow  # two rollout samplers + transformers.generate: ~50 s on the loaded 2-core machine
def test_bench_rollout_table_and_json(tmp_path, capsys):
    out = tmp_path / "rollout.json"
    cli_main(["bench", "rollout", "--preset", "tiny", "--batch", "8,16", "--samples-per-prompt", "2",
              "--seq-len", "8", "--new-tokens", "4", "--steps", "1", "--json", str(out)])
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[0].startswith("bench rollout: preset=tiny") and "batch=8,16" in lines[0]
    assert "samples_per_prompt=2 temperature=0.7" in lines[0]
    rows = [ln.split() for ln in lines if ln.split() and ln.split()[0] in ("8", "16")]
    assert [r[0] for r in rows] == ["8", "16"] and all(r[-1].endswith("x") for r in rows)
    results = json.loads(out.read_text())["results"]
    for r, batch in zip(results, (8, 16)):
        assert (r["what"], r["batch"], r["new_tokens"], r["samples_per_prompt"]) == ("rollout", batch, 4, 2)
        # Both sides generate every response in full: batch / 2 prompts x 2 samples x 4 tokens.
        assert r["alignjax_tokens_per_call"] == r["torch_tokens_per_call"] == batch * 4
        assert r["alignjax_tokens_per_s"] * r["alignjax_s_per_call"] == pytest.approx(batch * 4)
        assert r["torch_tokens_per_s"] * r["torch_s_per_call"] == pytest.approx(batch * 4)
        assert r["speedup"] == pytest.approx(r["alignjax_tokens_per_s"] / r["torch_tokens_per_s"])


def test_bench_rollout_batch_not_a_multiple_of_samples_is_one_line(capsys):
    with pytest.raises(SystemExit):
        cli_main(["bench", "rollout", "--preset", "tiny", "--batch", "8", "--samples-per-prompt", "3",
                  "--no-torch"])
    err = capsys.readouterr().err
    assert "--batch 8 is not a multiple of --samples-per-prompt 3" in err and "Traceback" not in err
