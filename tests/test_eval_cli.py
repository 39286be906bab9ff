"""`alignjax eval winrate|judge|length` and `alignjax plot` end to end through cli.main, on tiny
random models built in-process (their verdicts are noise: these tests check the plumbing, the
counts and the files; the arithmetic is checked in test_winrate.py, the judge in test_judge.py)."""

import json
import struct

import numpy as np
import pytest

from alignjax import cli
from alignjax.data import toy

try:  # pytest's default import mode puts tests/ on sys.path
    from test_judge import save_tiny
except ImportError:  # tests/ turned into a package
    from tests.test_judge import save_tiny

PROMPTS = [e.prompt for e in toy.make_examples(5, seed=[0, 1])]
FAST = ["--max-new-tokens", "4", "--batch-size", "8", "--chat"]


@pytest.fixture(scope="module")
def dirs(bpe_tokenizer, spm_tokenizer, tmp_path_factory):
    """Model and baseline with different tokenizers (byte-level BPE and sentencepiece): allowed,
    the texts are compared."""
    root = tmp_path_factory.mktemp("eval")
    tok, spm = root / "tok", root / "spm"
    bpe_tokenizer.save_pretrained(tok)
    spm_tokenizer.save_pretrained(spm)
    prompts = root / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in PROMPTS))
    return dict(root=root, prompts=str(prompts),
                a=save_tiny(root / "a", tok, "lm", seed=1), b=save_tiny(root / "b", spm, "lm", seed=2),
                rm=save_tiny(root / "rm", tok, "scalar", seed=3))


def png_size(path):
    with open(path, "rb") as f:
        head = f.read(24)
    assert head[:8] == b"\x89PNG\r\n\x1a\n" and head[12:16] == b"IHDR"
    return struct.unpack(">II", head[16:24])


def _winrate(dirs, out, judge, *extra):
    cli.main(["eval", "winrate", "--model", dirs["a"], "--baseline", dirs["b"], "--prompts",
              dirs["prompts"], "--judge", judge, "--out", str(out), *FAST, *extra])
    report = json.loads((out / "winrate.json").read_text())
    table = (out / "winrate.md").read_text()
    samples = [json.loads(x) for x in (out / "samples.jsonl").read_text().splitlines()]
    assert png_size(out / "winrate.png")[0] > 100
    assert report["n"] + report["unparsed"] == len(PROMPTS) == len(samples)
    assert report["wins"] + report["ties"] + report["losses"] == report["n"]
    assert table.count("\n") == 3 and str(report["wins"]) in table
    return report, samples


@pytest.mark.slow  # ~10 s of compiles: out of the 5-minute fast tier
def test_winrate_toy_judge_counts_the_checker(dirs, tmp_path):
    report, samples = _winrate(dirs, tmp_path / "toy", "toy")
    want = [0.5 + 0.5 * np.sign(toy.check(s["prompt"], s["model"]) - toy.check(s["prompt"], s["baseline"]))
            for s in samples]
    assert [s["preference"] for s in samples] == want
    assert report["judge"]["order"] == "single" and report["judge"]["positional_consistency"] is None
    lens = [len(s["model"]) for s in samples]
    assert report["mean_length_model"] == pytest.approx(np.mean(lens))


def test_winrate_reward_judge(dirs, tmp_path):
    from alignjax import rewards
    report, samples = _winrate(dirs, tmp_path / "rm", f"reward:{dirs['rm']}")
    r = rewards.build_reward(dirs["rm"])
    ra = r.score([s["prompt"] for s in samples], [s["model"] for s in samples])
    rb = r.score([s["prompt"] for s in samples], [s["baseline"] for s in samples])
    assert [s["preference"] for s in samples] == [0.5 + 0.5 * np.sign(x - y) for x, y in zip(ra, rb)]


def test_winrate_llm_judge_text_mode_counts_unparsed(dirs, tmp_path):
    report, samples = _winrate(dirs, tmp_path / "llm", f"llm:{dirs['a']}", "--verdict", "text",
                               "--template", "mtbench", "--judge-max-new-tokens", "6")
    j = report["judge"]
    verdicts = [s["verdict"] for s in samples] + [s["verdict_swapped"] for s in samples]
    assert j["judgements"] == 2 * len(PROMPTS) and j["template"] == "mtbench"
    assert j["unparsed_replies"] == sum(v is None for v in verdicts)
    assert report["unparsed"] == sum(s["preference"] is None for s in samples)
    assert report["unparsed"] == sum(s["verdict"] is None or s["verdict_swapped"] is None
                                     for s in samples)


def test_winrate_llm_judge_probability_mode(dirs, tmp_path):
    report, samples = _winrate(dirs, tmp_path / "llmp", f"llm:{dirs['a']}")
    prefs = [s["preference"] for s in samples]
    assert report["unparsed"] == 0 and all(0 < p < 1 for p in prefs)
    assert report["mean_preference"] == pytest.approx(np.mean(prefs))
    assert 0 <= report["judge"]["positional_consistency"] <= 1


def test_eval_judge_on_toy_pairs_with_the_checker(tmp_path, capsys):
    cli.main(["eval", "judge", "--judge", "toy", "--pairs", "toy", "--num-pairs", "6",
              "--out", str(tmp_path)])
    report = json.loads((tmp_path / "judge.json").read_text())
    assert set(report["subsets"]) == {"natural", "longer", "surface", "fluent"}
    assert report["all"]["n"] == 24 and report["all"]["accuracy"] == 1.0  # the checker is the gold
    assert report["all"]["agreement"] == 1.0
    assert "| fluent | 6 | 1.000 |" in capsys.readouterr().out


def test_eval_judge_llm_on_a_pairs_file(dirs, tmp_path):
    pairs = tmp_path / "pairs.jsonl"
    rows = [dict(prompt=p, output_a="x y", output_b="y", label="AB"[i % 2], subset="s%d" % (i % 2))
            for i, p in enumerate(PROMPTS[:4])]
    pairs.write_text("".join(json.dumps(r) + "\n" for r in rows))
    cli.main(["eval", "judge", "--judge", f"llm:{dirs['a']}", "--pairs", str(pairs), "--out",
              str(tmp_path / "o")])
    report = json.loads((tmp_path / "o" / "judge.json").read_text())
    assert set(report["subsets"]) == {"s0", "s1"} and report["all"]["n"] == 4
    assert report["all"]["unparsed"] == 0 and report["template"] == "rules"


def test_eval_length_and_plot(dirs, tmp_path):
    cli.main(["eval", "length", "--model", dirs["a"], "--model", dirs["b"], "--prompts",
              dirs["prompts"], "--reward", "toy", "--out", str(tmp_path / "len"), *FAST])
    report = json.loads((tmp_path / "len" / "length.json").read_text())
    assert list(report["models"]) == [dirs["a"], dirs["b"]]
    for d in report["models"].values():
        assert len(d["lengths"]) == len(PROMPTS) and d["mean_length"] == pytest.approx(np.mean(d["lengths"]))
    png_size(tmp_path / "len" / "length.png")
    run = tmp_path / "run"
    run.mkdir()
    (run / "metrics.jsonl").write_text("".join(json.dumps({"step": s, "loss": 1 / s, "eval/accuracy": s / 10})
                                               + "\n" for s in range(1, 6)))
    cli.main(["plot", str(run), "--metrics", "loss,eval/accuracy", "--out", str(tmp_path / "p.png")])
    assert png_size(tmp_path / "p.png") == (700, 520)  # plots.plot_metrics: 7 x 2.6 in per panel, 100 dpi


def _error(capsys, argv):
    with pytest.raises(SystemExit) as e:
        cli.main(argv)
    err = capsys.readouterr().err.strip()
    assert e.value.code != 0 and "\n" not in err and "Traceback" not in err
    return err


def test_bad_input_is_one_line(dirs, tmp_path, capsys):
    base = ["eval", "winrate", "--model", dirs["a"], "--baseline", dirs["b"], "--out",
            str(tmp_path / "o"), *FAST]
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "sort: 3 1"}\n{"prompt": "reverse: cat dog"\n')
    assert f"{bad}:2" in _error(capsys, base + ["--prompts", str(bad), "--judge", "toy"])
    assert "unknown judge template" in _error(capsys, base + ["--prompts", "toy", "--judge", "toy",
                                                              "--template", "fancy"])
    assert "a reward model (scalar head), not a causal LM" in _error(
        capsys, base + ["--prompts", "toy", "--judge", f"llm:{dirs['rm']}"])
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text('{"prompt": "p", "output_a": "a", "output_b": "b", "label": "C"}\n')
    assert f"{pairs}:1: label 'C' must be A or B" in _error(
        capsys, ["eval", "judge", "--judge", "toy", "--pairs", str(pairs)])
    run = tmp_path / "run"
    run.mkdir()
    (run / "metrics.jsonl").write_text('{"step": 1, "loss": 2.0}\n')
    assert "keys present: loss" in _error(capsys, ["plot", str(run), "--metrics", "nope", "--out",
                                                   str(tmp_path / "x.png")])
