"""KV-cache generation equals transformers' greedy generate; sampling is seeded; no recompiles."""

import json

import numpy as np
import pytest
import torch

from alignjax import sharding as shd
from alignjax.cli import main as cli_main
from alignjax.errors import UserError
from alignjax.model.generate import Generator, SamplingParams, filter_logits
from alignjax.model.llama import Llama
from alignjax.model.store import load_model
from hf_models import make_hf_model

EOS, PAD = 2, 0


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    path = tmp_path_factory.mktemp("gen")
    hf = make_hf_model("llama31", path)
    ours = load_model(str(path), shd.make_mesh({"data": 2, "fsdp": 2, "tensor": 2}))
    return hf, ours, Generator(ours.module, ours.mesh, eos_ids=(EOS,), pad_id=PAD)


def _hf_greedy(hf, prompts, n):
    width = max(map(len, prompts))
    ids = np.full((len(prompts), width), PAD)
    mask = np.zeros_like(ids)
    for i, p in enumerate(prompts):
        ids[i, width - len(p):], mask[i, width - len(p):] = p, 1
    with torch.no_grad():
        out = hf.generate(torch.tensor(ids), attention_mask=torch.tensor(mask), do_sample=False,
                          max_new_tokens=n, pad_token_id=PAD, eos_token_id=EOS)
    return out[:, width:].numpy()


def _until_eos(row):
    row = list(row)
    return row[: row.index(EOS) + 1] if EOS in row else row


@pytest.mark.parametrize("lengths", [[7, 7], [3, 11, 6, 1]], ids=["no_padding", "left_padded"])
def test_greedy_equals_transformers(models, lengths):
    hf, ours, gen = models
    rng = np.random.RandomState(sum(lengths))
    prompts = [list(rng.randint(3, 160, n)) for n in lengths]
    out = gen.generate_ids(ours.params, prompts, SamplingParams(max_new_tokens=20, temperature=0.0))
    ref = _hf_greedy(hf, prompts, 20)
    for i in range(len(prompts)):
        mine = [int(t) for t, m in zip(out["tokens"][i], out["mask"][i]) if m]
        assert mine == _until_eos(ref[i]), i


def test_eos_masks_the_rest(models):
    _, ours, _ = models
    # A generator that treats a frequent token as EOS: everything after it is pad and masked.
    prompts = [[5, 6, 7], [9, 10]]
    plain = Generator(ours.module, ours.mesh, eos_ids=(), pad_id=PAD)
    raw = plain.generate_ids(ours.params, prompts, SamplingParams(max_new_tokens=12, temperature=0.0))
    eos = int(raw["tokens"][0, 3])
    gen = Generator(ours.module, ours.mesh, eos_ids=(eos,), pad_id=PAD)
    out = gen.generate_ids(ours.params, prompts, SamplingParams(max_new_tokens=12, temperature=0.0))
    first = list(out["tokens"][0]).index(eos)
    assert out["mask"][0, : first + 1].all() and not out["mask"][0, first + 1:].any()
    assert (out["tokens"][0, first + 1:] == PAD).all()
    assert (out["logps"][0, first + 1:] == 0).all()


def test_sampling_is_seeded_and_does_not_recompile(models):
    _, ours, gen = models
    prompts = [[5, 6, 7], [9, 10, 11, 12], [4]]
    sp = SamplingParams(max_new_tokens=16, temperature=0.9, top_k=40, top_p=0.9, seed=7)
    a = gen.generate_ids(ours.params, prompts, sp)
    n = gen.compile_count()
    b = gen.generate_ids(ours.params, prompts, sp)
    c = gen.generate_ids(ours.params, prompts, SamplingParams(16, temperature=1.3, top_k=40, top_p=0.5,
                                                              seed=8))
    g = gen.generate_ids(ours.params, prompts, SamplingParams(16, temperature=0.0, top_k=40))
    np.testing.assert_array_equal(a["tokens"], b["tokens"])
    assert not np.array_equal(a["tokens"], c["tokens"])
    # Same bucket shapes and top-k; new temperature (greedy included) / top-p / seed: no recompile.
    assert gen.compile_count() == n
    gen.generate_ids(ours.params, prompts, SamplingParams(16, temperature=0.9, top_k=0, seed=7))
    assert gen.compile_count() == n + 1  # top-k is static (lax.top_k): a new k compiles once
    assert g["mask"].any()


def test_filter_logits_top_k_and_top_p():
    logits = np.log(np.array([[0.5, 0.3, 0.15, 0.05]], np.float32))
    kept = np.isfinite(np.asarray(filter_logits(logits, 2, 1.0)))
    assert kept.tolist() == [[True, True, False, False]]
    kept = np.isfinite(np.asarray(filter_logits(logits, 0, 0.7)))
    assert kept.tolist() == [[True, True, False, False]]
    kept = np.isfinite(np.asarray(filter_logits(logits, 0, 1.0)))
    assert kept.all()


def _np_filter(row, k, p):
    """NumPy reference: keep the k largest (ties kept), then the smallest nucleus reaching mass p."""
    keep = row >= np.sort(row)[::-1][k - 1] if k else np.ones(row.shape, bool)
    order = np.argsort(-row, kind="stable")
    probs = np.where(keep, np.exp(row - row.max()), 0.0)
    probs = probs / probs.sum()
    before = np.cumsum(probs[order]) - probs[order]
    cutoff = row[order][before < p].min()
    return keep & (row >= cutoff)


@pytest.mark.parametrize("k, p", [(5, 1.0), (0, 0.6), (5, 0.6), (40, 0.95), (64, 0.3)])
def test_filter_logits_matches_numpy(k, p):
    logits = np.random.RandomState(k).randn(3, 64).astype(np.float32) * 2
    logits[0, :4] = logits[0, 4]  # ties at the k-th value
    kept = np.isfinite(np.asarray(filter_logits(logits, k, np.float32(p))))
    np.testing.assert_array_equal(kept, np.stack([_np_filter(r, k, p) for r in logits]))


@pytest.mark.parametrize("tok_name", ["bpe_tokenizer", "spm_tokenizer"])
def test_generate_cli_prints_completions(tok_name, request, tmp_path, capsys):
    tok = request.getfixturevalue(tok_name)
    hf = make_hf_model("llama32", tmp_path / "m", vocab_size=len(tok), eos_token_id=tok.eos_token_id,
                       bos_token_id=tok.bos_token_id, pad_token_id=tok.pad_token_id)
    tok.save_pretrained(tmp_path / "m")
    texts = ["sort: 3 1 2", "reverse: cat dog fox"]
    cli_main(["generate", "--model", str(tmp_path / "m"), "--max-new-tokens", "8", "--chat", "--json"]
             + sum((["--prompt", t] for t in texts), []))
    printed = json.loads(capsys.readouterr().out)
    for text, item in zip(texts, printed):
        ids = tok.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True,
                                      tokenize=True, return_dict=True)["input_ids"]
        with torch.no_grad():
            out = hf.generate(torch.tensor([ids]), do_sample=False, max_new_tokens=8,
                              eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
        assert item["completion"] == tok.decode(out[0, len(ids):], skip_special_tokens=True)
        assert item["prompt"] == text


def test_cli_errors_are_one_line(tmp_path, capsys):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "gpt2", "vocab_size": 10}))
    with pytest.raises(SystemExit) as e:
        cli_main(["generate", "--model", str(tmp_path), "--prompt", "hi"])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert "model_type='gpt2' is not a Llama model" in err and "Traceback" not in err


@pytest.mark.parametrize("kw, message", [
    (dict(temperature=-1), "--temperature must be >= 0 (0 = greedy), got -1"),
    (dict(top_p=0.0), "--top-p must be in (0, 1] (1 = off), got 0.0"),
    (dict(top_p=1.5), "--top-p must be in (0, 1] (1 = off), got 1.5"),
    (dict(top_k=-2), "--top-k must be >= 0 (0 = off), got -2"),
    (dict(max_new_tokens=0), "--max-new-tokens must be >= 1, got 0"),
])
def test_sampling_params_are_validated(kw, message):
    with pytest.raises(UserError) as e:
        SamplingParams(**kw)
    assert str(e.value) == message


def test_prompts_longer_than_the_positions_are_refused_or_truncated(models, caplog):
    hf, ours, _ = models
    short = Llama(ours.config.replace(max_position_embeddings=24))  # same weights, 24 positions
    prompt = list(np.random.RandomState(3).randint(3, 160, 20))
    sp = SamplingParams(max_new_tokens=8, temperature=0.0)
    with pytest.raises(UserError, match="prompt 0 has 20 tokens; with --max-new-tokens 8 that exceeds "
                                        "the model's max_position_embeddings 24.*--truncate-prompts"):
        Generator(short, ours.mesh, eos_ids=(EOS,), pad_id=PAD).generate_ids(ours.params, [prompt], sp)
    gen = Generator(short, ours.mesh, eos_ids=(EOS,), pad_id=PAD, overflow="truncate")
    with caplog.at_level("WARNING"):
        out = gen.generate_ids(ours.params, [prompt, prompt[-5:]], sp)
    assert "left-truncated 1 prompt(s) to their last 16 tokens" in caplog.text
    ref = _hf_greedy(hf, [prompt[-16:]], 8)[0]  # transformers on the kept tail
    assert [int(t) for t, m in zip(out["tokens"][0], out["mask"][0]) if m] == _until_eos(ref)
    with pytest.raises(UserError, match="--max-new-tokens 24 leaves no room"):
        gen.generate_ids(ours.params, [prompt], SamplingParams(max_new_tokens=24))
