"""Conditional tokens: control tokens + vocab resize (exact old rows, mean new rows, shardings),
HF export, record conditioning, blocked generation, and `alignjax generate --condition`."""

import json
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from alignjax import conditional as cond
from alignjax import sharding as shd
from alignjax.cli import main as cli_main
from alignjax.data import toy
from alignjax.data.formatting import SFTFormatter
from alignjax.data.sources import DataError
from alignjax.errors import UserError
from alignjax.model.config import ConfigError, LlamaConfig
from alignjax.model.generate import Generator, SamplingParams, block_logits, sample_token
from alignjax.model.params import abstract_params, build_module, init_params
from alignjax.model.store import export_hf, load_model
from hf_models import make_hf_model

MESH = {"data": 2, "fsdp": 2, "tensor": 2}


@pytest.fixture(scope="module")
def mesh():
    return shd.make_mesh(MESH)


@pytest.fixture(scope="module")
def tok_dir(bpe_tokenizer, tmp_path_factory):
    """The session tokenizer saved once; tests load their own copies (add_tokens mutates)."""
    path = tmp_path_factory.mktemp("tok")
    bpe_tokenizer.save_pretrained(path)
    return path


def _fresh(path):
    from transformers import AutoTokenizer
    return AutoTokenizer.from_pretrained(path)


@pytest.fixture(scope="module")
def ctok(tok_dir):
    tok = _fresh(tok_dir)
    cond.add_control_tokens(tok)
    return tok


def _tiny_config(**kw):
    return LlamaConfig(vocab_size=96, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                       bos_token_id=1, eos_token_id=2, pad_token_id=0, **kw)


# ---- tokens and resize -----------------------------------------------------------------------

def test_add_control_tokens_is_idempotent(tok_dir):
    tok = _fresh(tok_dir)
    n = len(tok)
    ids = cond.add_control_tokens(tok)
    assert ids == (n, n + 1) and len(tok) == n + 2
    assert cond.add_control_tokens(tok) == ids and len(tok) == n + 2
    enc = tok("<|good|>sort: 3 1 2", add_special_tokens=False)["input_ids"]
    assert enc[0] == ids[0] and enc[1:] == tok("sort: 3 1 2", add_special_tokens=False)["input_ids"]
    assert tok.decode(enc, skip_special_tokens=True) == "sort: 3 1 2"
    with pytest.raises(UserError, match="no control tokens"):
        cond.control_token_ids(_fresh(tok_dir))


@pytest.mark.slow  # ~10 s of compiles: out of the 5-minute fast tier
@pytest.mark.parametrize("tied", [False, True], ids=["untied", "tied"])
def test_resize_keeps_old_rows_new_rows_mean_and_shardings(mesh, tied):
    config = _tiny_config(tie_word_embeddings=tied)
    params = init_params(build_module(config), jax.random.PRNGKey(0), mesh)
    new, cfg = cond.resize_vocab(params, config, 100)  # tensor=2 divides 100
    assert cfg.vocab_size == 100 and cfg.replace(vocab_size=96) == config
    old_e, new_e = (np.asarray(p["params"]["embed"]["embedding"]) for p in (params, new))
    assert new_e.shape == (100, 64)
    np.testing.assert_array_equal(new_e[:96], old_e)
    np.testing.assert_allclose(new_e[96:], np.broadcast_to(old_e.mean(0), (4, 64)), atol=1e-7)
    if not tied:
        old_h, new_h = (np.asarray(p["params"]["lm_head"]["kernel"]) for p in (params, new))
        assert new_h.shape == (64, 100)
        np.testing.assert_array_equal(new_h[:, :96], old_h)
        np.testing.assert_allclose(new_h[:, 96:], np.broadcast_to(old_h.mean(1, keepdims=True), (64, 4)),
                                   atol=1e-7)
    _, want = abstract_params(build_module(cfg), mesh)
    got = jax.tree_util.tree_map(lambda a: a.sharding, new)
    assert jax.tree_util.tree_structure(got) == jax.tree_util.tree_structure(want)
    for g, w, a in zip(jax.tree_util.tree_leaves(got), jax.tree_util.tree_leaves(want),
                       jax.tree_util.tree_leaves(new)):
        assert g.is_equivalent_to(w, a.ndim), (g, w)
    assert new["params"]["embed"]["embedding"].sharding.spec == jax.sharding.PartitionSpec("tensor", "fsdp")
    assert new["params"]["layers"] is params["params"]["layers"]  # untouched leaves are not copied
    # The resized model runs, and old-token logits are unchanged.
    toks = jnp.asarray(np.random.RandomState(0).randint(3, 96, (8, 5)), jnp.int32)
    pos = jnp.broadcast_to(jnp.arange(5), (8, 5))
    seg = jnp.ones((8, 5), jnp.int32)
    before = build_module(config).apply(params, toks, pos, seg)[0]
    after = build_module(cfg).apply(new, toks, pos, seg)[0]
    np.testing.assert_allclose(np.asarray(after)[..., :96], np.asarray(before), atol=1e-5)
    np.testing.assert_allclose(np.asarray(after)[..., 96:],
                               np.broadcast_to(np.asarray(before).mean(-1, keepdims=True), (8, 5, 4)),
                               atol=1e-5)  # a mean row scores the mean logit
    assert cond.resize_vocab(new, cfg, 100) == (new, cfg)


def test_resize_sizes_sharding_error_padding_and_rng(mesh):
    config = _tiny_config()
    params = init_params(build_module(config), jax.random.PRNGKey(1), mesh)
    with pytest.raises(shd.ShardingError, match=r"vocab=97.*tensor"):
        cond.resize_vocab(params, config, 97)
    assert cond.resize_vocab(params, config, 97, pad_to_multiple_of=2)[1].vocab_size == 98
    assert cond.resize_vocab(params, config, 97, pad_to_multiple_of=128)[1].vocab_size == 128
    with pytest.raises(ConfigError, match="smaller"):
        cond.resize_vocab(params, config, 64)
    new, _ = cond.resize_vocab(params, config, 98, rng=0)
    e = np.asarray(new["params"]["embed"]["embedding"])
    mean = np.asarray(params["params"]["embed"]["embedding"]).mean(0)
    assert not np.array_equal(e[96], e[97])  # perturbed apart ...
    np.testing.assert_allclose(e[96:], np.broadcast_to(mean, (2, 64)), atol=1e-5)  # ... barely


# ---- export ----------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def exported(tok_dir, mesh, tmp_path_factory):
    """Base HF model (vocab = tokenizer) -> `prepare` (tokens + resize) -> export_hf."""
    root = tmp_path_factory.mktemp("cond")
    tok = _fresh(tok_dir)
    base = make_hf_model("llama2", root / "base", vocab_size=len(tok), eos_token_id=tok.eos_token_id,
                         bos_token_id=tok.bos_token_id, pad_token_id=tok.pad_token_id)
    tok.save_pretrained(root / "base")
    cond.main(["prepare", "--model", str(root / "base"), "--out", str(root / "cond"),
               "--mesh", "data=2,fsdp=2,tensor=2"])
    model = load_model(str(root / "cond"), mesh)
    export_hf(model, str(root / "hf"))
    return base, root, len(tok)


def test_resized_model_exports_and_transformers_reloads_it(exported):
    from transformers import AutoModelForCausalLM, AutoTokenizer
    base, root, n_old = exported
    hf, info = AutoModelForCausalLM.from_pretrained(root / "hf", output_loading_info=True)
    assert not any(info.get(k) for k in ("missing_keys", "unexpected_keys", "mismatched_keys")), info
    tok = AutoTokenizer.from_pretrained(root / "hf")
    assert len(tok) == n_old + 2 == hf.config.vocab_size
    assert hf.get_input_embeddings().weight.shape[0] == n_old + 2 == hf.lm_head.weight.shape[0]
    assert cond.control_token_ids(tok) == (n_old, n_old + 1)
    old_emb = base.get_input_embeddings().weight.detach()
    torch.testing.assert_close(hf.get_input_embeddings().weight[n_old:].detach(),
                               old_emb.mean(0).expand(2, -1), atol=1e-6, rtol=0)
    ids = torch.tensor(np.random.RandomState(0).randint(3, n_old, (2, 9)))
    with torch.no_grad():
        want, got = base(ids).logits, hf(ids).logits
    np.testing.assert_allclose(got[..., :n_old].numpy(), want.numpy(), atol=1e-4)
    np.testing.assert_allclose(got[..., n_old:].numpy(),
                               want.mean(-1, keepdim=True).expand(-1, -1, 2).numpy(), atol=1e-4)


# ---- data ------------------------------------------------------------------------------------

def test_condition_records_prefixes_the_prompt():
    recs = [{"prompt": "p0", "completion": "c0", "score": 0.9},
            {"prompt": "p1", "completion": "c1", "score": 0.2},
            {"prompt": "p2", "completion": "c2", "score": 0.5}]
    out = cond.condition_records(recs, threshold=0.5, drop_prob=0.0, seed=0)
    assert [r["prompt"] for r in out] == ["<|good|>p0", "<|bad|>p1", "<|good|>p2"]
    assert [r["completion"] for r in out] == ["c0", "c1", "c2"]
    assert [r["control_token"] for r in out] == ["<|good|>", "<|bad|>", "<|good|>"]
    assert recs[0]["prompt"] == "p0"  # inputs untouched
    labels = [{"prompt": "a", "completion": "b", "label": True},
              {"prompt": "a", "completion": "c", "label": False}]
    assert [r["prompt"] for r in cond.condition_records(labels, drop_prob=0.0)] == \
        ["<|good|>a", "<|bad|>a"]
    chat = {"messages": [{"role": "system", "content": "be brief"}, {"role": "user", "content": "q"},
                         {"role": "assistant", "content": "x"}, {"role": "user", "content": "q2"}],
            "label": False}
    m = cond.condition_records([chat], drop_prob=0.0)[0]["messages"]
    assert [x["content"] for x in m] == ["be brief", "<|bad|>q", "x", "q2"]
    assert chat["messages"][1]["content"] == "q"
    conv = {"prompt": [{"role": "user", "content": "q"}],
            "completion": [{"role": "assistant", "content": "x"}], "score": 3.0}
    assert cond.condition_records([conv], threshold=1.0, drop_prob=0.0)[0]["prompt"][0]["content"] == \
        "<|good|>q"
    with pytest.raises(DataError, match="text"):
        cond.condition_records([{"text": "t", "label": True}])
    with pytest.raises(DataError, match="'score'"):
        cond.condition_records([{"prompt": "a", "completion": "b"}], threshold=0.5)
    with pytest.raises(DataError, match="'label'"):
        cond.condition_records([{"prompt": "a", "completion": "b"}])
    with pytest.raises(DataError, match="no user message"):
        cond.condition_records([{"messages": [{"role": "assistant", "content": "x"}], "label": 1}])


def test_drop_probability_is_honoured_and_deterministic():
    n = 20000
    recs = [{"prompt": "p", "completion": "c", "label": i % 2 == 0} for i in range(n)]

    def dropped(**kw):
        return np.array([r["control_token"] is None for r in cond.condition_records(recs, **kw)])

    for p in (0.01, 0.1, 0.5):
        d = dropped(drop_prob=p, seed=3)
        sd = np.sqrt(n * p * (1 - p))
        assert abs(d.sum() - n * p) < 5 * sd, (p, d.sum())
        assert abs(d[::2].sum() - d[1::2].sum()) < 5 * sd  # independent of the label
    a, b, c = dropped(drop_prob=0.1, seed=3), dropped(drop_prob=0.1, seed=3), dropped(drop_prob=0.1, seed=4)
    np.testing.assert_array_equal(a, b)
    assert (a != c).any()
    assert not dropped(drop_prob=0.0).any() and dropped(drop_prob=1.0).all()
    kept = [r for r in cond.condition_records(recs, drop_prob=0.1, seed=3) if r["control_token"]]
    assert all(r["prompt"] == r["control_token"] + "p" for r in kept)
    with pytest.raises(DataError, match="drop_prob"):
        cond.condition_records(recs, drop_prob=1.5)


def test_toy_condition_records(tmp_path):
    cond.main(["toy-data", "--out", str(tmp_path), "--n-train", "12", "--n-eval", "6"])
    lines = (tmp_path / "conditional_train.jsonl").read_text().splitlines()
    assert len(lines) == 24 and json.loads(lines[0])["prompt"].startswith("<|good|>")
    exs = toy.make_examples(30, seed=0)
    recs = cond.toy_condition_records(exs, seed=0, drop_prob=0.0)
    assert len(recs) == 60
    for e, good, bad in zip(exs, recs[::2], recs[1::2]):
        assert good["prompt"] == "<|good|>" + e.prompt and toy.check(e, good["completion"]) == 1.0
        assert bad["prompt"] == "<|bad|>" + e.prompt and toy.check(e, bad["completion"]) == 0.0
        assert good["label"] and not bad["label"] and bad["score"] < 1.0
    assert cond.toy_condition_records(exs, seed=0, drop_prob=0.0) == recs
    msgs = cond.toy_condition_records(exs[:3], seed=0, style="messages", drop_prob=0.0)
    assert msgs[1]["messages"][0]["content"] == "<|bad|>" + exs[0].prompt
    assert sum(r["control_token"] is None for r in cond.toy_condition_records(exs, 0, drop_prob=0.5)) > 0


@pytest.mark.parametrize("style", ["prompt_completion", "messages"])
def test_training_and_generation_put_the_token_at_the_same_place(ctok, style):
    fmt = SFTFormatter(ctok)
    good, bad = cond.control_token_ids(ctok)
    exs = toy.make_examples(6, seed=1)
    recs = cond.toy_condition_records(exs, seed=0, style=style, drop_prob=0.0)
    for e, rec in zip(exs, recs[::2]):
        ex = fmt(rec)
        (ids,), blocked = cond.generation_setup(ctok, [e.prompt], "good", chat=style == "messages")
        assert list(ex.ids[:ex.prompt_len]) == ids and good in ids and blocked == (good, bad)
        assert not ex.loss_mask[[i for i, t in enumerate(ex.ids) if t in (good, bad)]].any()


def test_conditioned_source_feeds_the_sft_pipeline(ctok, tmp_path):
    from alignjax.data.pipeline import make_sft_iterator
    recs = toy.kto_records(toy.make_examples(24, seed=2), seed=0)
    toy.write_jsonl(recs, tmp_path / "kto.jsonl")
    src = cond.ConditionedSource(str(tmp_path / "kto.jsonl"), drop_prob=0.25, seed=5)
    assert [src[i] for i in range(len(src))] == cond.condition_records(recs, drop_prob=0.25, seed=5)
    good, bad = cond.control_token_ids(ctok)
    it = make_sft_iterator(src, ctok, {"packing": "pad"}, seed=0, batch_size=24, seq_len=48,
                           shuffle=False, num_epochs=1)
    batch = next(it)
    first = batch["tokens"][:, 1]  # right after BOS
    assert set(first[np.isin(first, (good, bad))]) == {good, bad}
    assert 0 < np.isin(first, (good, bad)).sum() < 24  # some dropped
    assert not batch["loss_mask"][np.isin(batch["targets"], (good, bad))].any()  # never a target


# ---- generation ------------------------------------------------------------------------------

def test_blocked_ids_are_never_sampled():
    logits = jnp.asarray(np.random.RandomState(0).randn(4, 32), jnp.float32).at[:, 7].set(50.0)
    blocked = block_logits(logits, (7, 9))
    for t, k, p in [(0.0, 0, 1.0), (1.0, 0, 1.0), (50.0, 0, 1.0), (1.0, 3, 1.0), (2.0, 0, 0.5)]:
        for s in range(100):
            tok, logp = sample_token(jax.random.PRNGKey(s), blocked, jnp.float32(t), jnp.int32(k),
                                     jnp.float32(p))
            assert not np.isin(np.asarray(tok), (7, 9)).any() and np.isfinite(np.asarray(logp)).all()
    assert block_logits(logits, ()) is logits


def _bias_towards(params, favourite, second, d0=0):
    """Makes `favourite` the top logit everywhere (then `second`): every embedding has +1 on
    feature d0, no layer writes to d0, so after the final norm h[d0] > 0; only the two tokens'
    head columns read d0 (the others keep their context-dependent logits)."""
    p = jax.tree_util.tree_map(lambda x: x, params["params"])
    p["embed"]["embedding"] = p["embed"]["embedding"].at[:, d0].set(1.0)
    p["layers"]["attn"]["o"]["kernel"] = p["layers"]["attn"]["o"]["kernel"].at[..., d0].set(0.0)
    p["layers"]["mlp"]["down"]["kernel"] = p["layers"]["mlp"]["down"]["kernel"].at[..., d0].set(0.0)
    p["final_norm"]["scale"] = p["final_norm"]["scale"].at[d0].set(1.0)
    head = p["lm_head"]["kernel"].at[d0].set(0.0).at[:, favourite].set(0.0).at[:, second].set(0.0)
    p["lm_head"]["kernel"] = head.at[d0, favourite].set(1000.0).at[d0, second].set(900.0)
    return {"params": p}


@pytest.mark.slow  # many decode loops
def test_generator_never_emits_blocked_tokens_even_when_favoured(mesh):
    config = _tiny_config()
    module = build_module(config)
    good, bad = 94, 95
    params = _bias_towards(init_params(module, jax.random.PRNGKey(2), mesh), good, bad)
    prompts = [[1, 5, 6, 7], [1, 9], [1, 30, 31, 32, 33, 34], [1]]
    greedy = SamplingParams(max_new_tokens=10, temperature=0.0)
    toks = jnp.asarray(np.random.RandomState(0).randint(3, 94, (8, 12)), jnp.int32)
    logits = module.apply(params, toks, jnp.broadcast_to(jnp.arange(12), (8, 12)), jnp.ones_like(toks))[0]
    assert (np.asarray(logits).argmax(-1) == good).all()  # the bias works: <|good|> tops everywhere
    only_good = Generator(module, mesh, eos_ids=(2,), pad_id=0, blocked_ids=(good,))
    assert (only_good.generate_ids(params, prompts, greedy)["tokens"] == bad).all()  # next best
    gen = Generator(module, mesh, eos_ids=(2,), pad_id=0, blocked_ids=(good, bad))
    for sp in [greedy, SamplingParams(10, temperature=5.0, top_k=0, seed=2),
               SamplingParams(10, temperature=1.0, top_p=0.9, top_k=5, seed=3)]:
        out = gen.generate_ids(params, prompts, sp)
        assert not np.isin(out["tokens"][out["mask"] == 1], (good, bad)).any(), sp
        assert out["mask"][:, 0].all() and np.isfinite(out["logps"]).all()
    with pytest.raises(ValueError, match="outside the vocabulary"):
        Generator(module, mesh, blocked_ids=(96,))


# ---- CLI -------------------------------------------------------------------------------------

def _torch_greedy(model, ids, n, blocked, eos):
    ids = list(ids)
    out = []
    with torch.no_grad():
        for _ in range(n):
            logits = model(torch.tensor([ids + out])).logits[0, -1]
            logits[list(blocked)] = -float("inf")
            t = int(logits.argmax())
            out.append(t)
            if t == eos:
                break
    return out


def test_cli_condition_good_end_to_end(exported, tmp_path, capsys):
    from transformers import AutoModelForCausalLM, AutoTokenizer
    _, root, _ = exported
    hf = AutoModelForCausalLM.from_pretrained(root / "hf")
    tok = AutoTokenizer.from_pretrained(root / "hf")
    good, bad = cond.control_token_ids(tok)
    with torch.no_grad():  # the torch twin of _bias_towards: control tokens top the logits
        d0 = 0
        hf.model.embed_tokens.weight[:, d0] = 1.0
        # A loud <|good|> input row, so the completion depends on whether the prompt holds it.
        hf.model.embed_tokens.weight[good, d0 + 1:] = 3.0 * torch.randn(
            hf.config.hidden_size - d0 - 1, generator=torch.Generator().manual_seed(0))
        for layer in hf.model.layers:
            layer.self_attn.o_proj.weight[d0] = 0.0
            layer.mlp.down_proj.weight[d0] = 0.0
        hf.model.norm.weight[d0] = 1.0
        hf.lm_head.weight[:, d0] = 0.0
        hf.lm_head.weight[[good, bad]] = 0.0
        hf.lm_head.weight[good, d0], hf.lm_head.weight[bad, d0] = 1000.0, 900.0
    hf.save_pretrained(tmp_path / "m")
    for f in os.listdir(root / "hf"):
        if f.startswith("tokenizer") or f.endswith(".jinja"):
            shutil.copy(root / "hf" / f, tmp_path / "m" / f)
    texts = ["sort: 3 1 2", "reverse: cat dog fox"]
    cli_main(["generate", "--model", str(tmp_path / "m"), "--max-new-tokens", "6", "--json",
              "--condition", "good", "--mesh", "data=2,fsdp=2,tensor=2"]
             + sum((["--prompt", t] for t in texts), []))
    printed = json.loads(capsys.readouterr().out)
    conditioned, unconditioned = [], []
    for text, item in zip(texts, printed):
        ids = tok("<|good|>" + text)["input_ids"]
        assert ids[1] == good
        assert _torch_greedy(hf, ids, 1, (), tok.eos_token_id) == [good]  # would emit it unblocked
        ref = _torch_greedy(hf, ids, 6, (good, bad), tok.eos_token_id)
        assert good not in ref and bad not in ref
        unconditioned.append(_torch_greedy(hf, ids[:1] + ids[2:], 6, (good, bad), tok.eos_token_id))
        conditioned.append(ref)
        assert item["completion"] == tok.decode([t for t in ref if t != tok.eos_token_id],
                                                skip_special_tokens=True)
        assert item["prompt"] == text
    assert conditioned != unconditioned  # so the match above shows the prompt was conditioned


def test_cli_condition_needs_control_tokens(exported, capsys):
    _, root, _ = exported
    with pytest.raises(SystemExit) as e:
        cli_main(["generate", "--model", str(root / "base"), "--prompt", "hi", "--condition", "good"])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert "no control tokens" in err and "Traceback" not in err
