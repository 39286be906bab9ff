"""Online-RL math (alignjax/losses/rl.py) against the NumPy transcription in reference_rl.py."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import reference_rl as ref
from alignjax.losses import rl

B, T = 6, 9
TOL = dict(rtol=1e-6, atol=1e-6)


def _case(seed=0):
    rs = np.random.RandomState(seed)
    lengths = np.array([9, 1, 4, 0, 7, 3])  # full row, one token, short, empty, ...
    mask = (np.arange(T)[None] < lengths[:, None]).astype(np.float32)
    f = lambda *s: rs.randn(*s).astype(np.float32)  # noqa: E731
    logp, old, refl = -np.abs(f(B, T)), -np.abs(f(B, T)), -np.abs(f(B, T))
    return dict(mask=mask, logp=logp, old=old, ref=refl, values=f(B, T), rewards=f(B, T),
                scores=f(B), adv=f(B, T), lengths=lengths)


def _close(a, b, mask=None):
    a = np.asarray(a, np.float64)
    if mask is not None:
        a = a * mask
        b = np.asarray(b) * mask
    np.testing.assert_allclose(a, b, **TOL)


@pytest.mark.parametrize("kind", rl.KL_ESTIMATORS)
def test_kl_estimators(kind):
    c = _case()
    _close(rl.kl_estimate(c["logp"], c["ref"], kind), ref.kl(c["logp"], c["ref"], kind))


def test_kl_k3_is_nonnegative_and_k1_k3_agree_to_second_order():
    d = jnp.linspace(-1e-2, 1e-2, 11)
    k3 = rl.kl_estimate(d, jnp.zeros_like(d), "k3")
    assert float(k3.min()) >= 0
    np.testing.assert_allclose(k3, d ** 2 / 2, atol=1e-6)


def test_token_rewards_put_the_score_on_the_last_valid_token():
    c = _case(1)
    kl = ref.kl(c["logp"], c["ref"], "k1")
    got = rl.token_rewards(jnp.asarray(c["scores"]), jnp.asarray(kl, jnp.float32), c["mask"], 0.05)
    _close(got, ref.token_rewards(c["scores"], kl, c["mask"], 0.05))
    assert float(got[3].sum()) == 0.0  # an empty response gets nothing


@pytest.mark.parametrize("kl_value", [0.0, 3.0, 6.0, 7.0, 100.0])
def test_adaptive_kl_controller(kl_value):
    got = rl.adaptive_kl_coef(0.05, kl_value, 64, target=6.0, horizon=10000.0)
    np.testing.assert_allclose(float(got), ref.adaptive_kl(0.05, kl_value, 64, 6.0, 10000.0), rtol=1e-6)


@pytest.mark.parametrize("gamma,lam", [(1.0, 0.95), (0.99, 1.0), (0.9, 0.5)])
def test_gae(gamma, lam):
    c = _case(2)
    adv, ret = jax.jit(rl.gae, static_argnums=(3, 4))(c["rewards"], c["values"], c["mask"], gamma, lam)
    want_adv, want_ret = ref.gae(c["rewards"], c["values"], c["mask"], gamma, lam)
    _close(adv, want_adv)
    _close(ret, want_ret)


@pytest.mark.parametrize("shift_mean", [True, False])
@pytest.mark.parametrize("unbiased", [True, False])
def test_whitening(shift_mean, unbiased):
    c = _case(3)
    got = rl.masked_whiten(c["adv"], c["mask"], shift_mean=shift_mean, unbiased=unbiased)
    _close(got, ref.whiten(c["adv"], c["mask"], shift_mean, unbiased), c["mask"])
    assert float(jnp.abs(jnp.where(c["mask"] > 0, 0.0, got)).max()) == 0.0


@pytest.mark.parametrize("dual_clip", [None, 3.0])
def test_ppo_policy_loss(dual_clip):
    c = _case(5)
    loss, stats = rl.ppo_policy_loss(c["logp"], c["old"], c["adv"], 0.2, dual_clip=dual_clip)
    want, clipfrac, approxkl = ref.ppo_policy_loss(c["logp"], c["old"], c["adv"], 0.2, dual_clip)
    _close(loss, want)
    _close(stats.clipped, clipfrac)
    _close(stats.approxkl, approxkl)
    np.testing.assert_allclose(float(rl.masked_mean(loss, c["mask"])), ref.masked_mean(want, c["mask"]),
                               **TOL)


def test_dual_clip_caps_negative_advantages():
    adv = jnp.array([[-1.0]])
    loss, _ = rl.ppo_policy_loss(jnp.array([[3.0]]), jnp.array([[0.0]]), adv, 0.2, dual_clip=3.0)
    assert float(loss[0, 0]) == pytest.approx(3.0)  # exp(3) * 1 would be ~20


def test_ppo_value_loss():
    c = _case(6)
    old = c["values"] + 0.3 * np.random.RandomState(0).randn(B, T).astype(np.float32)
    loss, _ = rl.ppo_value_loss(c["values"], old, c["rewards"], 0.2)
    _close(loss, ref.ppo_value_loss(c["values"], old, c["rewards"], 0.2))


@pytest.mark.parametrize("scale", rl.GRPO_SCALES)
def test_grpo_advantages(scale):
    scores = np.random.RandomState(7).randn(12).astype(np.float32)
    _close(rl.grpo_advantages(scores, 4, scale), ref.grpo_advantages(scores, 4, scale))


def test_grpo_advantages_of_a_constant_group_are_zero():
    adv = rl.grpo_advantages(jnp.array([1.0, 1.0, 0.0, 2.0]), 2, "group")
    np.testing.assert_allclose(adv[:2], 0.0)


@pytest.mark.parametrize("sequence_ratio", [False, True, "sum"])
@pytest.mark.parametrize("beta", [0.0, 0.04])
@pytest.mark.parametrize("token_adv", [False, True])
def test_grpo_token_loss(sequence_ratio, beta, token_adv):
    c = _case(8)
    rs = np.random.RandomState(1)
    adv = (rs.randn(*c["mask"].shape) if token_adv else rs.randn(B)).astype(np.float32)
    got, _ = rl.grpo_token_loss(c["logp"], c["old"], adv, c["mask"], eps_low=0.2, eps_high=0.28,
                                ref_logp_bt=c["ref"], beta=beta, sequence_ratio=sequence_ratio)
    want = ref.grpo_token_loss(c["logp"], c["old"], c["ref"], adv, c["mask"], 0.2, 0.28, beta,
                               sequence_ratio)
    _close(got, want, c["mask"])


@pytest.mark.parametrize("loss_type", rl.GRPO_LOSS_TYPES)
def test_loss_aggregation(loss_type):
    c = _case(9)
    total, norm = rl.aggregate_token_loss(c["adv"], c["mask"], loss_type, max_len=T)
    np.testing.assert_allclose(float(total / norm), ref.aggregate(c["adv"], c["mask"], loss_type, T), **TOL)


def test_rloo_advantages():
    rs = np.random.RandomState(10)
    scores, seq_kl = rs.randn(8).astype(np.float32), rs.rand(8).astype(np.float32)
    adv, _ = rl.rloo_advantages(scores, seq_kl, 4, 0.05)
    _close(adv, ref.rloo_advantages(scores, seq_kl, 4, 0.05))


@pytest.mark.parametrize("group", [None, 3])
def test_reinforce_pp(group):
    c = _case(11)
    kl = ref.kl(c["logp"], c["ref"], "k1").astype(np.float32)
    got = rl.reinforce_pp_advantages(c["scores"], kl, c["mask"], 0.01, group_size=group)
    _close(got, ref.reinforce_pp(c["scores"], kl, c["mask"], 0.01, group), c["mask"])


@pytest.mark.parametrize("n", [0, 10, 12, 15, 16, 30])
def test_overlong_penalty(n):
    got = float(rl.overlong_penalty(jnp.array([n]), max_len=16, buffer=4, factor=1.0)[0])
    assert got == pytest.approx(ref.overlong(n, 16, 4, 1.0))


def test_shape_scores_order_normalise_clip_then_eos():
    s = rl.shape_scores(jnp.array([30.0, 30.0, 1.0]), jnp.array([True, False, False]),
                        reward_mean=10.0, reward_std=2.0, clip=5.0, missing_eos_penalty=1.0)
    np.testing.assert_allclose(s, [5.0, 4.0, -5.5])
    s = rl.shape_scores(jnp.array([3.0, 3.0]), jnp.array([True, False]), missing_eos_score=-1.0)
    np.testing.assert_allclose(s, [3.0, -1.0])


def test_bad_settings_are_named():
    with pytest.raises(ValueError, match="at least 2 samples"):
        rl.grpo_advantages(jnp.ones(4), 1)
    with pytest.raises(ValueError, match="k9"):
        rl.kl_estimate(jnp.ones(2), jnp.ones(2), "k9")
    with pytest.raises(ValueError, match="loss_type"):
        rl.aggregate_token_loss(jnp.ones((2, 2)), jnp.ones((2, 2)), "mean")
