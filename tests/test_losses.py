"""alignjax.losses vs the NumPy transcription of docs/algorithms.md (tests/reference_losses.py)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

try:  # pytest's default import mode puts tests/ on sys.path
    import reference_losses as ref
except ImportError:  # tests/ turned into a package
    from tests import reference_losses as ref
from alignjax.losses import (
    PAIR_LOSSES,
    PairLogps,
    PrefHParams,
    bradley_terry_loss,
    kto_loss,
    preference_loss,
    pro_loss,
    rrhf_loss,
    sft_loss,
    sft_loss_sums,
    sft_metrics_from_sums,
)
from alignjax.losses.preference import REFERENCE_FREE


def close(actual, expected, tol=1e-5):
    np.testing.assert_allclose(np.asarray(actual, np.float64), expected, rtol=tol, atol=tol)


def f64(a):
    """What the float32 jax side actually sees, in float64 for the reference."""
    return np.asarray(a, np.float32).astype(np.float64)


def make_pairs(seed=0, b=16):
    rng = np.random.RandomState(seed)
    nw = rng.randint(1, 40, b).astype(np.float32)
    nl = rng.randint(1, 40, b).astype(np.float32)
    pw = (-rng.uniform(0.01, 2.5, b) * nw).astype(np.float32)  # avg logp in (-2.5, -0.01)
    pl = (-rng.uniform(0.01, 2.5, b) * nl).astype(np.float32)
    rw = (pw + rng.normal(0, 4, b)).astype(np.float32)
    rl = (pl + rng.normal(0, 4, b)).astype(np.float32)
    x = PairLogps(*map(jnp.asarray, (pw, pl, nw, nl, rw, rl)))
    d = dict(pw=f64(pw), pl=f64(pl), nw=f64(nw), nl=f64(nl), rw=f64(rw), rl=f64(rl))
    return x, d


def ref_kwargs(hp):
    return dict(
        beta=hp.beta, eps=hp.label_smoothing, exo_eps=hp.exo_eps, tau=hp.discopop_tau,
        gamma=hp.simpo_gamma, lam=hp.orpo_lambda, delta=hp.slic_delta,
    )


# ------------------------------------------------------------------ pairwise family

CASES = [(name, PrefHParams()) for name in sorted(PAIR_LOSSES)] + [
    ("cdpo", PrefHParams(label_smoothing=0.2)),
    ("robust", PrefHParams(label_smoothing=0.2)),
    ("aot", PrefHParams(label_smoothing=0.1, beta=0.5)),
    ("aot_unpaired", PrefHParams(label_smoothing=0.1)),
    ("exo_pair", PrefHParams(exo_eps=0.05, beta=0.3)),
    ("simpo", PrefHParams(beta=2.0, simpo_gamma=0.8)),
    ("simpo", PrefHParams(beta=2.0, simpo_gamma=0.8, label_smoothing=0.2)),
    ("ipo", PrefHParams(beta=0.5)),
    ("discopop", PrefHParams(beta=0.4, discopop_tau=0.1)),
    ("orpo", PrefHParams(orpo_lambda=0.5)),
    ("slic", PrefHParams(slic_delta=2.0, slic_lambda=0.3)),
]


@pytest.mark.parametrize("name,hp", CASES, ids=[f"{n}-{i}" for i, (n, _) in enumerate(CASES)])
def test_pair_loss_matches_reference(name, hp):
    x, d = make_pairs(seed=len(name))
    kw = ref_kwargs(hp)
    if name == "slic":
        kw["lam"] = hp.slic_lambda
    close(PAIR_LOSSES[name](x, hp), ref.PAIR[name](d, **kw))


def test_label_smoothing_belongs_to_cdpo_not_dpo():
    """TRL >= 0.29's `sigmoid` (= dpo) does not smooth; conservative DPO is `cdpo`."""
    x, d = make_pairs(1)
    hp = PrefHParams(label_smoothing=0.3)
    close(PAIR_LOSSES["cdpo"](x, hp), ref.cdpo(d, beta=0.1, eps=0.3))
    close(PAIR_LOSSES["dpo"](x, hp), ref.dpo(d))
    close(PAIR_LOSSES["sigmoid"](x, hp), ref.dpo(d))


def test_rpo_sft_term_in_both_conventions():
    x, d = make_pairs(4)
    ours, _ = preference_loss(x, "sft")
    trl, _ = preference_loss(x, "sft", PrefHParams(sft_token_mean=True))
    close(ours, ref.sft_term(d).mean())
    close(trl, ref.sft_term_token_mean(d))
    assert abs(float(ours) - float(trl)) > 1e-3  # the two conventions differ on these lengths
    w = np.array([1.0] * 12 + [0.0] * 4, np.float32)  # filler rows count for nothing
    got, _ = preference_loss(x, "sft", PrefHParams(sft_token_mean=True), sample_weight=w)
    close(got, ref.sft_term_token_mean({k: v[:12] for k, v in d.items()}))


def test_simpo_and_orpo_log_as_trl():
    """SimPO/ORPO log average log-probs; ORPO's rewards are scaled by lambda (TRL's ORPO beta)."""
    x, d = make_pairs(5)
    aw, al = d["pw"] / d["nw"], d["pl"] / d["nl"]
    _, m = preference_loss(x, "orpo", PrefHParams(beta=0.1, orpo_lambda=0.5))
    close(m["rewards/chosen"], (0.5 * aw).mean())
    close(m["rewards/margins"], (0.5 * (aw - al)).mean())
    close(m["logps/chosen"], aw.mean())
    _, m = preference_loss(x, "simpo", PrefHParams(beta=2.0))
    close(m["rewards/chosen"], (2.0 * aw).mean())
    close(m["logps/rejected"], al.mean())
    _, m = preference_loss(x, "slic", PrefHParams())
    close(m["logps/chosen"], d["pw"].mean(), tol=1e-4)  # sums, as before


def test_aot_couples_the_batch_by_sorting():
    """Re-ordering the reference ratios alone changes nothing: only their sorted values matter."""
    x, d = make_pairs(2)
    hp = PrefHParams()
    perm = np.random.RandomState(0).permutation(16)
    x_perm = x._replace(ref_chosen=x.ref_chosen[perm], ref_rejected=x.ref_rejected[perm])
    close(jnp.sum(PAIR_LOSSES["aot"](x_perm, hp)), np.sum(ref.aot(d)))
    # ...whereas per-pair DPO does depend on which reference belongs to which pair.
    assert abs(float(jnp.sum(PAIR_LOSSES["dpo"](x_perm, hp))) - np.sum(ref.dpo(d))) > 1e-3


@pytest.mark.parametrize("name", sorted(PAIR_LOSSES))
def test_filler_rows_change_no_loss(name):
    """An eval batch padded with filler rows (weight 0) gives the loss of its real rows alone,
    for every loss, including the ones that couple the batch (aot sorts it). Before the fix, aot
    sorted the fillers in: 5 pairs in eval batches of 4 gave the last pair 0.693 or 0.892."""
    x, d = make_pairs(3, b=5)
    real = 3
    hp = PrefHParams(label_smoothing=0.1) if name.startswith("aot") else PrefHParams()
    alone = PairLogps(*(v[:real] for v in x))
    filler = PairLogps(*(v[jnp.array([0, 0])] * 0.5 + 7.0 for v in x))  # arbitrary filler values
    padded = PairLogps(*(jnp.concatenate([a, f]) for a, f in zip(alone, filler)))
    weights = jnp.asarray([1.0] * real + [0.0, 0.0])
    want, _ = preference_loss(alone, name, hp)
    got, metrics = preference_loss(padded, name, hp, sample_weight=weights)
    close(got, float(want))
    assert np.isfinite(float(got)) and all(np.isfinite(float(v)) for v in metrics.values())
    if name == "aot":  # and the real rows alone still match the NumPy transcription
        close(want, np.mean(ref.aot({k: v[:real] for k, v in d.items()}, beta=hp.beta, eps=0.1)))


@pytest.mark.parametrize("loss_type", ["dpo", "ipo", "simpo"])
def test_preference_metrics(loss_type):
    x, d = make_pairs(3)
    hp = PrefHParams()
    loss, m = preference_loss(x, loss_type, hp)
    close(loss, ref.PAIR[loss_type](d, **ref_kwargs(hp)).mean())
    if loss_type in REFERENCE_FREE:  # SimPO convention: rewards are beta * avg logp
        rw, rl = d["pw"] / d["nw"], d["pl"] / d["nl"]
    else:
        rw, rl = d["pw"] - d["rw"], d["pl"] - d["rl"]
    close(m["rewards/chosen"], (0.1 * rw).mean())
    close(m["rewards/rejected"], (0.1 * rl).mean())
    close(m["rewards/margins"], (0.1 * (rw - rl)).mean())
    close(m["rewards/accuracies"], (rw > rl).mean())
    lw, ll = (rw, rl) if loss_type == "simpo" else (d["pw"], d["pl"])  # SimPO logs averages
    close(m["logps/chosen"], lw.mean(), tol=1e-4)
    close(m["logps/rejected"], ll.mean(), tol=1e-4)


def test_combined_loss_is_weighted_sum_with_sample_weight():
    x, d = make_pairs(4)
    hp = PrefHParams(label_smoothing=0.1)
    w = np.random.RandomState(1).randint(0, 2, 16).astype(np.float32)
    w[0] = 1.0
    terms = [("cdpo", 1.0), ("sft", 1.0), ("ipo", 0.25)]  # smoothed RPO plus an IPO term
    loss, m = preference_loss(x, terms, hp, sample_weight=jnp.asarray(w))
    kw = ref_kwargs(hp)
    expected = sum(wt * (ref.PAIR[n](d, **kw) * w).sum() / w.sum() for n, wt in terms)
    close(loss, expected)
    close(m["loss/sft"], (ref.sft_term(d) * w).sum() / w.sum())
    rw = d["pw"] - d["rw"]
    close(m["rewards/chosen"], (0.1 * rw * w).sum() / w.sum())


def test_jit_with_static_loss_spec():
    x, d = make_pairs(5)
    fn = jax.jit(preference_loss, static_argnames=("loss_type", "hp"))
    loss, _ = fn(x, (("bco_pair", 0.5), ("sft", 2.0)), PrefHParams())
    close(loss, 0.5 * ref.bco_pair(d).mean() + 2.0 * ref.sft_term(d).mean())


def test_unknown_and_missing_reference_errors():
    x, _ = make_pairs(6)
    with pytest.raises(ValueError, match="valid: .*dpo.*simpo"):
        preference_loss(x, "dpoo")
    with pytest.raises(ValueError, match="unknown"):
        preference_loss(x, [("dpo", 1.0), ("nope", 1.0)])
    with pytest.raises(ValueError, match="reference"):
        preference_loss(x._replace(ref_chosen=None, ref_rejected=None), "dpo")
    with pytest.raises(ValueError, match="label_smoothing"):
        PrefHParams(label_smoothing=0.5)
    # reference-free losses need no reference
    preference_loss(x._replace(ref_chosen=None, ref_rejected=None), "orpo")


def _extreme_pairs():
    """Every combination of log-ratios +-50, policy sums at 0 (float32 avg logp exactly 0) and -100."""
    vals = np.array([-50.0, 50.0], np.float32)
    uw, ul = np.meshgrid(vals, vals)
    uw, ul = uw.ravel(), ul.ravel()
    pw = np.where(uw > 0, 0.0, -100.0).astype(np.float32)
    pl = np.where(ul > 0, -100.0, 0.0).astype(np.float32)  # both orders of the policy gap
    n = np.array([1.0, 3.0, 1.0, 7.0], np.float32)
    return PairLogps(*map(jnp.asarray, (pw, pl, n, n[::-1].copy(), pw - uw, pl - ul)))


@pytest.mark.parametrize("beta", [0.1, 2.0])
def test_gradients_finite_for_extreme_log_ratios(beta):
    x = _extreme_pairs()
    hp = PrefHParams(beta=beta, label_smoothing=0.1)

    @jax.jit
    def all_grads(x):
        return {n: jax.grad(lambda x: preference_loss(x, n, hp)[0])(x) for n in PAIR_LOSSES}

    for name, g in all_grads(x).items():
        for field in ("chosen", "rejected", "ref_chosen", "ref_rejected"):
            assert np.all(np.isfinite(np.asarray(getattr(g, field)))), (name, field)
        value = preference_loss(x, name, hp)[0]
        assert np.isfinite(float(value)), name


# ------------------------------------------------------------------------ SFT, BT


def test_sft_loss_and_accumulation():
    rng = np.random.RandomState(7)
    logps = -rng.exponential(2.0, (4, 9)).astype(np.float32)
    mask = (rng.uniform(size=(4, 9)) < 0.6).astype(np.float32)
    correct = rng.uniform(size=(4, 9)) < 0.5
    loss, m = sft_loss(jnp.asarray(logps), jnp.asarray(mask), jnp.asarray(correct))
    close(loss, ref.sft_loss(f64(logps), mask))
    close(m["perplexity"], np.exp(ref.sft_loss(f64(logps), mask)), tol=1e-4)
    close(m["mean_token_accuracy"], (correct * mask).sum() / mask.sum())
    # Two micro-batches of different token counts: sum the sums, divide once.
    parts = [sft_loss_sums(jnp.asarray(logps[s]), jnp.asarray(mask[s]), jnp.asarray(correct[s]))
             for s in (slice(0, 1), slice(1, 4))]
    acc_loss, _ = sft_metrics_from_sums(*(sum(p[i] for p in parts) for i in range(3)))
    close(acc_loss, ref.sft_loss(f64(logps), mask))
    # an all-masked batch gives 0, not NaN
    assert float(sft_loss(jnp.asarray(logps), jnp.zeros_like(jnp.asarray(mask)))[0]) == 0.0


def test_bradley_terry():
    rng = np.random.RandomState(8)
    rw, rl, mg = (rng.normal(0, 2, 12).astype(np.float32) for _ in range(3))
    loss, m = bradley_terry_loss(jnp.asarray(rw), jnp.asarray(rl), jnp.asarray(mg), center_coef=0.01)
    close(loss, ref.bradley_terry(f64(rw), f64(rl), f64(mg), c=0.01))
    close(bradley_terry_loss(jnp.asarray(rw), jnp.asarray(rl))[0], ref.bradley_terry(f64(rw), f64(rl)))
    close(m["accuracy"], (rw > rl).mean())
    close(m["margin"], (f64(rw) - f64(rl)).mean())
    both = np.concatenate([f64(rw), f64(rl)])
    close([m["reward_mean"], m["reward_min"], m["reward_max"]], [both.mean(), both.min(), both.max()])


# -------------------------------------------------------------------- KTO, ranking


@pytest.mark.parametrize("kl_shift", [3.0, -3.0])  # positive z0, and z0 clipped at 0
def test_kto_matches_reference(kl_shift):
    rng = np.random.RandomState(9)
    pol, refl = (-rng.uniform(5, 50, 10).astype(np.float32) for _ in range(2))
    desirable = rng.uniform(size=10) < 0.5
    kl_ref = -rng.uniform(5, 50, 10).astype(np.float32)
    kl_pol = (kl_ref + kl_shift + rng.normal(0, 0.5, 10)).astype(np.float32)
    args = tuple(map(jnp.asarray, (pol, refl, desirable, kl_pol, kl_ref)))
    loss, m = kto_loss(*args, beta=0.3)
    exp_loss, z0 = ref.kto(f64(pol), f64(refl), desirable, f64(kl_pol), f64(kl_ref), beta=0.3)
    close(loss, exp_loss)
    close(m["kl"], z0)
    # z0 is detached: the mismatched-pair log-probs get no gradient.
    g = jax.grad(lambda kp: kto_loss(args[0], args[1], args[2], kp, args[4], beta=0.3)[0])(args[3])
    assert np.all(np.asarray(g) == 0.0)


def _ragged_groups(seed, with_scores=True):
    rng = np.random.RandomState(seed)
    b, k = 5, 4
    lens = rng.randint(1, 30, (b, k)).astype(np.float32)
    logps = (-rng.uniform(0.05, 3.0, (b, k)) * lens).astype(np.float32)
    scores = rng.normal(0, 1, (b, k)).astype(np.float32)
    scores[1, 2] = scores[1, 0]  # a tie
    valid = np.ones((b, k), bool)
    valid[2, 3] = False
    valid[3, 1] = valid[3, 3] = False  # a hole in the middle
    valid[4, 1:] = False  # a single response
    logps[~valid] = np.nan  # garbage in the padding slots must not leak
    groups = [(f64(logps[i][valid[i]]), f64(lens[i][valid[i]]), f64(scores[i][valid[i]]))
              for i in range(b)]
    arrays = tuple(map(jnp.asarray, (logps, lens, scores, valid)))
    return arrays, groups


def test_rrhf_ragged_groups():
    (logps, lens, scores, valid), groups = _ragged_groups(10)
    loss, m = rrhf_loss(logps, lens, scores, valid)
    close(loss, np.mean([ref.rrhf_group(*g) for g in groups]))
    g = jax.grad(lambda lp: rrhf_loss(lp, lens, scores, valid)[0])(logps)
    assert np.all(np.isfinite(np.asarray(g)[np.asarray(valid)]))


@pytest.mark.parametrize("with_scores", [True, False])
def test_pro_ragged_groups(with_scores):
    (logps, lens, scores, valid), groups = _ragged_groups(11)
    loss, _ = pro_loss(logps, lens, valid, scores if with_scores else None)
    expected = [ref.pro_group(lp, n, sc if with_scores else None) for lp, n, sc in groups]
    close(loss, np.mean(expected))
    g = jax.grad(lambda lp: pro_loss(lp, lens, valid, scores if with_scores else None)[0])(logps)
    assert np.all(np.isfinite(np.asarray(g)))


def test_pro_plain_plackett_luce_and_weight_override():
    (logps, lens, scores, valid), groups = _ragged_groups(12)
    loss, _ = pro_loss(logps, lens, valid, None, sft_weight=0.3)
    close(loss, np.mean([ref.pro_group(lp, n, None, w=0.3) for lp, n, _ in groups]))


def test_dpo_config_refuses_label_smoothing_that_no_term_reads():
    from alignjax.config import load_config
    from alignjax.model.config import ConfigError
    from alignjax.train import dpo
    config = load_config("configs/dpo.py:tiny", ["dpo.loss_type=dpo", "dpo.label_smoothing=0.1"])
    with pytest.raises(ConfigError, match="dpo.loss_type=cdpo"):
        dpo.settings(config)
    ok = dpo.settings(load_config("configs/dpo.py:tiny", ["dpo.loss_type=cdpo+sft",
                                                          "dpo.label_smoothing=0.1",
                                                          "dpo.sft_token_mean=True"]))
    assert ok.hparams.label_smoothing == 0.1 and ok.hparams.sft_token_mean is True
