"""KV-cache generation equals transformers' greedy generate; sampling is seeded; no recompiles."""

import json

import numpy as np
import pytest
import torch

from alignjax import sharding as shd
from alignjax.cli import main as cli_main
from alignjax.model.generate import Generator, SamplingParams, filter_logits
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
    c = gen.generate_ids(ours.params, prompts, SamplingParams(16, temperature=1.3, top_p=0.5, seed=8))
    np.testing.assert_array_equal(a["tokens"], b["tokens"])
    assert not np.array_equal(a["tokens"], c["tokens"])
    assert gen.compile_count() == n  # same bucket shapes, new temperature/top-p/seed: no recompile


def test_filter_logits_top_k_and_top_p():
    logits = np.log(np.array([[0.5, 0.3, 0.15, 0.05]], np.float32))
    kept = np.isfinite(np.asarray(filter_logits(logits, 2, 1.0)))
    assert kept.tolist() == [[True, True, False, False]]
    kept = np.isfinite(np.asarray(filter_logits(logits, 0, 0.7)))
    assert kept.tolist() == [[True, True, False, False]]
    kept = np.isfinite(np.asarray(filter_logits(logits, 0, 1.0)))
    assert kept.all()


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
