"""Preference optimisation (docs/algorithms.md sections 3-4): the DPO family, RRHF/PRO and KTO.

`dpo.loss_type` is a name or a weighted sum: "dpo+sft" (RPO), "dpo:1.0+sft:0.5", or a list of
(name, weight) pairs. Pairwise
losses read pairs, `rrhf`/`pro` read ranked groups, `kto` reads unpaired labelled examples.

The reference model is either colocated (frozen params on the same mesh, in `dpo.ref_dtype`,
passed to the step as an argument) or precomputed: one pass over the training set before
training stores the reference log-probs per record (WORKDIR/reference_logps.npy), batches carry
them, and no reference weights stay in device memory. TR-DPO (`dpo.ref_refresh_every` > 0, colocated
only) refreshes the reference every tau steps, ref <- alpha * policy + (1 - alpha) * ref; it then
lives in the train state, so checkpoints and resume carry it.
"""

from __future__ import annotations

import os

import jax
import jax.numpy as jnp
import numpy as np

from alignjax.losses.preference import PAIR_LOSSES, REFERENCE_FREE, PairLogps, PrefHParams, preference_loss
from alignjax.losses.ranking import kto_loss, pro_loss, rrhf_loss
from alignjax.model.config import ConfigError
from alignjax.train.grouped import example_weights, means_to_sums, sequence_logps, sums_to_means

RANKED, UNPAIRED = ("rrhf", "pro"), ("kto",)
REF_FILE = "reference_logps.npy"


def loss_terms(loss_type) -> list[tuple[str, float]]:
    """A name, a list of (name, weight) pairs, or that list written as a string (CLI overrides)."""
    if isinstance(loss_type, str) and loss_type.strip().startswith(("[", "(")):
        import ast
        try:
            loss_type = ast.literal_eval(loss_type)
        except (ValueError, SyntaxError):
            raise ConfigError(f"dpo.loss_type={loss_type!r}: write a list such as "
                              "[('dpo', 1.0), ('sft', 1.0)]") from None
    if isinstance(loss_type, str):  # "dpo", or "dpo+sft", or "dpo:1.0+sft:0.5"
        terms = []
        for part in loss_type.split("+"):
            name, _, weight = part.strip().partition(":")
            try:
                terms.append((name.strip(), float(weight) if weight else 1.0))
            except ValueError:
                raise ConfigError(f"dpo.loss_type={loss_type!r}: weights are numbers, e.g. "
                                  "dpo:1.0+sft:0.5") from None
        return terms
    return [(str(n), float(w)) for n, w in loss_type]


def data_kind(loss_type) -> str:
    """pair | ranked | kto, from the loss names (one kind per run)."""
    names = [n for n, _ in loss_terms(loss_type)]
    valid = sorted(PAIR_LOSSES) + list(RANKED) + list(UNPAIRED)
    for n in names:
        if n not in valid:
            raise ConfigError(f"dpo.loss_type: unknown loss {n!r}; valid: {', '.join(valid)}")
    if any(n in RANKED + UNPAIRED for n in names):
        if len(names) > 1:
            raise ConfigError(f"dpo.loss_type={names}: {names[0]} cannot be combined with other losses")
        return "ranked" if names[0] in RANKED else "kto"
    return "pair"


def needs_reference(loss_type) -> bool:
    names = [n for n, _ in loss_terms(loss_type)]
    return not all(n in REFERENCE_FREE or n in RANKED for n in names)


def refresh_settings(dpo_cfg) -> tuple[int, float]:
    """(every, alpha) of TR-DPO's reference refresh; every = 0 means a frozen reference."""
    every, alpha = int(dpo_cfg.get("ref_refresh_every", 0) or 0), float(dpo_cfg.get("ref_refresh_alpha", 1.0))
    if every < 0 or not 0.0 < alpha <= 1.0:
        raise ConfigError(f"dpo.ref_refresh_every={every}, dpo.ref_refresh_alpha={alpha}: use every >= 0 "
                          "steps (0 = off) and 0 < alpha <= 1 (1 = copy the policy)")
    if every and dpo_cfg.reference != "colocated":
        raise ConfigError("dpo.ref_refresh_every > 0 needs dpo.reference=colocated: a precomputed "
                          "reference cannot follow the policy")
    if every and not needs_reference(dpo_cfg.loss_type):
        raise ConfigError(f"dpo.ref_refresh_every > 0 but dpo.loss_type={dpo_cfg.loss_type!r} uses no "
                          "reference model; set dpo.ref_refresh_every=0")
    return every, alpha


def hparams(dpo_cfg) -> PrefHParams:
    fields = PrefHParams.__dataclass_fields__
    return PrefHParams(**{k: float(dpo_cfg[k]) for k in fields if k in dpo_cfg})


def make_sums_fn(module, ref_module, dpo_cfg, precomputed: bool):
    """sums_fn(params, batch[, ref_params]) for the shared train step."""
    terms = loss_terms(dpo_cfg.loss_type)
    kind, hp = data_kind(terms), hparams(dpo_cfg)

    def sums_fn(params, batch, *ref):
        logps, lens = sequence_logps(module, params, batch)
        w = example_weights(batch)
        if needs_reference(dpo_cfg.loss_type):
            ref_logps = batch["ref_logps"] if precomputed else jax.lax.stop_gradient(
                sequence_logps(ref_module, ref[0], batch)[0])
        else:
            ref_logps = None
        if kind == "pair":
            x = PairLogps(logps[:, 0], logps[:, 1], lens[:, 0], lens[:, 1],
                          *((ref_logps[:, 0], ref_logps[:, 1]) if ref_logps is not None else ()))
            loss, m = preference_loss(x, terms, hp, sample_weight=w)
        elif kind == "ranked":
            valid = batch["valid"] & (w[:, None] > 0)
            fn = rrhf_loss if terms[0][0] == "rrhf" else pro_loss
            if fn is rrhf_loss:
                loss, m = rrhf_loss(logps, lens, batch["scores"], valid,
                                    sft_weight=float(dpo_cfg.get("rrhf_sft_weight", 1.0)))
            else:
                loss, m = pro_loss(logps, lens, valid, batch["scores"] if dpo_cfg.get("pro_use_scores", True) else None)
            m = dict(m, **_ranked_accuracy(logps, lens, batch["scores"], valid))
        else:
            loss, m = kto_loss(logps[:, 0], ref_logps[:, 0], batch["label"] > 0.5, logps[:, 1],
                               ref_logps[:, 1], beta=hp.beta,
                               desirable_weight=float(dpo_cfg.get("desirable_weight", 1.0)),
                               undesirable_weight=float(dpo_cfg.get("undesirable_weight", 1.0)),
                               sample_weight_b=w)
        m = {k: v for k, v in m.items() if k != "loss" and jnp.ndim(v) == 0}
        return means_to_sums(loss, m, jnp.sum(w))

    return sums_fn


def _ranked_accuracy(logps, lens, scores, valid):
    """Share of ranked pairs (i better than j) where the policy's avg log-prob agrees."""
    avg = logps / jnp.maximum(lens, 1.0)
    better = (scores[:, :, None] > scores[:, None, :]) & valid[:, :, None] & valid[:, None, :]
    agree = better & (avg[:, :, None] > avg[:, None, :])
    return {"rewards/accuracies": jnp.sum(agree) / jnp.maximum(jnp.sum(better), 1)}


def metrics(sums) -> dict:
    return sums_to_means(sums)


# ---- building the algorithm -------------------------------------------------------------------

def _iterators(config, workdir, run, kind):
    from alignjax.data.preference import make_preference_eval_iterator, make_preference_iterator
    from alignjax.train.setup import checked_sources
    d, t = config.data, config.train
    pc, pi = jax.process_count(), jax.process_index()
    train_sources = checked_sources(d.train, workdir, "train", run.tokenizer, d, kind)
    eval_sources = checked_sources(d.eval, workdir, "eval", run.tokenizer, d, kind) if d.eval else None
    micro = int(t.batch_size) // int(t.get("grad_accum_steps", 1)) // pc

    def eval_iter(sources=eval_sources):
        return make_preference_eval_iterator(sources, run.tokenizer, d, kind=kind, batch_size=micro,
                                             seq_len=int(d.seq_len), process_index=pi, process_count=pc)

    train_iter = make_preference_iterator(
        train_sources, run.tokenizer, d, kind=kind, seed=int(d.shuffle_seed),
        batch_size=int(t.batch_size) // pc, seq_len=int(d.seq_len), process_index=pi, process_count=pc)
    return train_iter, (eval_iter if eval_sources else None), train_sources, eval_sources


def reference_params(config, run, policy_params):
    """The frozen reference: the initial policy, cast to `dpo.ref_dtype`, on the same mesh."""
    from alignjax.model.params import abstract_params, build_module
    ref_cfg = run.model_config.replace(dtype=config.dpo.ref_dtype, param_dtype=config.dpo.ref_dtype)
    ref_module = build_module(ref_cfg)
    _, shardings = abstract_params(ref_module, run.mesh, run.rules)
    dtype = jnp.dtype(config.dpo.ref_dtype)
    cast = jax.jit(lambda p: jax.tree_util.tree_map(lambda x: x.astype(dtype), p), out_shardings=shardings)
    return ref_module, cast(policy_params)


class WithReference:
    """A preference iterator whose batches carry precomputed reference log-probs (`ref_logps`).

    Checkpointing goes through the wrapped grain iterator's state (same JSON).
    """

    def __init__(self, iterator, table_nk: np.ndarray):
        self.iterator, self.table = iterator, table_nk

    def __iter__(self):
        return self

    def __next__(self):
        batch = dict(next(self.iterator))
        index = batch.pop("index")
        batch["ref_logps"] = np.where((index >= 0)[:, None], self.table[np.maximum(index, 0)], 0.0
                                      ).astype(np.float32)
        return batch

    def get_state(self) -> bytes:
        import json
        return json.dumps(self.iterator.get_state()).encode()

    def set_state(self, state: bytes):
        import json
        self.iterator.set_state(json.loads(state))

    def start_prefetch(self):
        getattr(self.iterator, "start_prefetch", lambda: None)()


def precompute_reference(config, workdir: str, run, ref_module, ref_params, kind: str, sources,
                         split: str) -> np.ndarray:
    """Reference log-probs [N, K] of every record this process reads, in one ordered pass.

    Stored as WORKDIR/reference_logps_<split>_p<process>.npy and reused on resume.
    """
    from alignjax import sharding as shd
    from alignjax.data.preference import make_preference_eval_iterator
    from alignjax.train.loop import to_global
    path = os.path.join(workdir, f"reference_logps_{split}_p{jax.process_index()}.npy")
    if os.path.exists(path):
        return np.load(path)
    d, t = config.data, config.train
    micro = int(t.batch_size) // int(t.get("grad_accum_steps", 1)) // jax.process_count()
    it = make_preference_eval_iterator(sources, run.tokenizer, d, kind=kind, batch_size=micro,
                                       seq_len=int(d.seq_len), process_index=jax.process_index(),
                                       process_count=jax.process_count())
    fn = jax.jit(lambda p, b: sequence_logps(ref_module, p, b)[0])
    rows = {}
    with shd.mesh_context(run.mesh, run.rules):
        for batch in it:
            index = batch.pop("index")
            logps = np.asarray(jax.device_get(fn(ref_params, to_global(batch, run.mesh, run.rules))))
            rows.update({int(i): logps[j] for j, i in enumerate(index) if i >= 0})
    n = max(rows) + 1 if rows else 0
    table = np.zeros((n, logps.shape[1]), np.float32)
    for i, row in rows.items():
        table[i] = row
    os.makedirs(workdir, exist_ok=True)
    np.save(path + ".tmp.npy", table)
    os.replace(path + ".tmp.npy", path)
    return table


def build(config, workdir: str, run):
    from alignjax.train.loop import Algorithm
    from alignjax.train.setup import initial_params
    kind = data_kind(config.dpo.loss_type)
    mode = config.dpo.reference
    train_iter, eval_iter, train_sources, eval_sources = _iterators(config, workdir, run, kind)
    ref_module, frozen, moving = None, (), {}
    if needs_reference(config.dpo.loss_type):
        # The reference is the model training starts from (re-read from model.init_from on resume).
        ref_module, ref = reference_params(
            config, run, initial_params(config, run.module, run.mesh, run.rules))
        every, alpha = refresh_settings(config.dpo)
        if every:  # TR-DPO: the reference moves with training, so it lives in the train state
            moving = dict(reference=ref, ref_module=ref_module, ref_refresh=(every, alpha))
        elif mode == "colocated":
            frozen = (ref,)
        else:
            train_table = precompute_reference(config, workdir, run, ref_module, ref, kind,
                                               train_sources, "train")
            eval_table = (precompute_reference(config, workdir, run, ref_module, ref, kind,
                                               eval_sources, "eval") if eval_sources else None)
            jax.tree_util.tree_map(lambda x: x.delete(), ref)  # no reference left on the devices
            del ref
            train_iter = WithReference(train_iter, train_table)
            if eval_iter is not None:
                make_eval = eval_iter
                eval_iter = lambda: WithReference(make_eval(), eval_table)  # noqa: E731
    return Algorithm("dpo", make_sums_fn(run.module, ref_module, config.dpo, mode == "precomputed"),
                     metrics, train_iter, eval_iter, frozen, **moving)


def train(config, workdir: str) -> dict:
    from alignjax.train.loop import train_loop
    from alignjax.train.setup import build_run
    run = build_run(config, workdir)
    return train_loop(config, workdir, run, build(config, workdir, run))
