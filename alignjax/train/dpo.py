"""Preference optimisation (docs/algorithms.md sections 3-4): the DPO family, RRHF/PRO and KTO.

`dpo.loss_type` is a name or a weighted sum: "dpo+sft" (RPO), "dpo:1.0+sft:0.5", or a list of
(name, weight) pairs. Pairwise
losses read pairs, `rrhf`/`pro` read ranked groups, `kto` reads unpaired labelled examples.

The reference model (slot "reference", read from `model.init_from` with the policy in one read)
is either colocated (frozen params on the same mesh, in `dpo.ref_dtype`, passed to the step) or
precomputed: one pass over each split before training stores the reference log-probs per record
(WORKDIR/reference_logps_<split>_p<process>.npy), batches carry them, and no reference weights
stay in device memory. TR-DPO (`dpo.ref_refresh_every` > 0, colocated only) refreshes the
reference every tau steps, ref <- alpha * policy + (1 - alpha) * ref; it then lives in the train
state (state["frozen"]["reference"]), so checkpoints and resume carry it.

`dpo.*` is parsed once, by `settings(config)`, into a `DPOSettings`.
"""

from __future__ import annotations

import dataclasses
import io

import jax
import jax.numpy as jnp
import numpy as np

from alignjax import fs
from alignjax.losses.preference import (PAIR_LOSSES, REFERENCE_FREE, SMOOTHED, PairLogps, PrefHParams,
                                         preference_loss)
from alignjax.losses.ranking import kto_loss, pro_loss, rrhf_loss
from alignjax.model.config import ConfigError
from alignjax.train.grouped import (abstract_grouped_batch, example_weights, means_to_sums,
                                    group_logps, sums_to_means)
from alignjax.train.registry import AlgorithmSpec
from alignjax.train.slots import Follow, Slot

RANKED, UNPAIRED = ("rrhf", "pro"), ("kto",)
REFERENCES = ("colocated", "precomputed")


@dataclasses.dataclass(frozen=True)
class DPOSettings:
    terms: tuple                 # ((loss name, weight), ...)
    kind: str                    # pair | ranked | kto: the data the losses read
    needs_reference: bool
    reference: str               # colocated | precomputed
    ref_dtype: str
    refresh_every: int           # TR-DPO: 0 = a frozen reference
    refresh_alpha: float
    hparams: PrefHParams
    rrhf_sft_weight: float
    pro_use_scores: bool
    desirable_weight: float
    undesirable_weight: float
    num_responses: int           # K of ranked data


def loss_terms(loss_type) -> tuple:
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
        return tuple(terms)
    return tuple((str(n), float(w)) for n, w in loss_type)


def _data_kind(names) -> str:
    """pair | ranked | kto, from the loss names (one kind per run)."""
    valid = sorted(PAIR_LOSSES) + list(RANKED) + list(UNPAIRED)
    for n in names:
        if n not in valid:
            raise ConfigError(f"dpo.loss_type: unknown loss {n!r}; valid: {', '.join(valid)}")
    if any(n in RANKED + UNPAIRED for n in names):
        if len(names) > 1:
            raise ConfigError(f"dpo.loss_type={list(names)}: {names[0]} cannot be combined with "
                              "other losses")
        return "ranked" if names[0] in RANKED else "kto"
    return "pair"


def settings(config) -> DPOSettings:
    """`config.dpo` parsed and checked once; every problem is a ConfigError naming its key."""
    c = config.dpo
    terms = loss_terms(c.loss_type)
    names = [n for n, _ in terms]
    kind = _data_kind(names)
    needs_ref = not all(n in REFERENCE_FREE or n in RANKED for n in names)
    if c.reference not in REFERENCES:
        raise ConfigError(f"dpo.reference={c.reference!r}: use 'colocated' or 'precomputed'")
    try:
        fields = PrefHParams.__dataclass_fields__
        hp = PrefHParams(**{k: bool(c[k]) if f.type in (bool, "bool") else float(c[k])
                            for k, f in fields.items()})
    except ValueError as e:
        raise ConfigError(f"dpo: {e}") from None
    if hp.label_smoothing and not set(names) & SMOOTHED:
        raise ConfigError(
            f"dpo.label_smoothing={hp.label_smoothing} is not read by dpo.loss_type={c.loss_type!r} "
            f"(dpo is TRL's sigmoid, unsmoothed); it applies to {', '.join(sorted(SMOOTHED))}: for "
            "conservative DPO set dpo.loss_type=cdpo")
    every, alpha = int(c.ref_refresh_every), float(c.ref_refresh_alpha)
    if every < 0 or not 0.0 < alpha <= 1.0:
        raise ConfigError(f"dpo.ref_refresh_every={every}, dpo.ref_refresh_alpha={alpha}: use every >= 0 "
                          "steps (0 = off) and 0 < alpha <= 1 (1 = copy the policy)")
    if every and c.reference != "colocated":
        raise ConfigError("dpo.ref_refresh_every > 0 needs dpo.reference=colocated: a precomputed "
                          "reference cannot follow the policy")
    if every and not needs_ref:
        raise ConfigError(f"dpo.ref_refresh_every > 0 but dpo.loss_type={c.loss_type!r} uses no "
                          "reference model; set dpo.ref_refresh_every=0")
    return DPOSettings(terms, kind, needs_ref, c.reference, c.ref_dtype, every, alpha, hp,
                       float(c.rrhf_sft_weight), bool(c.pro_use_scores), float(c.desirable_weight),
                       float(c.undesirable_weight), int(config.data.num_responses))


def reference_slot(config, s: DPOSettings) -> Slot:
    """The reference: the model training starts from, in dpo.ref_dtype."""
    follows = Follow("policy", s.refresh_every, s.refresh_alpha) if s.refresh_every else None
    return Slot("reference", "lm", config.model.init_from, trains=False, dtype=s.ref_dtype,
                follows=follows)


def slots(config, s: DPOSettings) -> list:
    """The policy, plus the reference when the step reads it (colocated)."""
    policy = Slot("policy", "lm", config.model.init_from)
    if s.needs_reference and s.reference == "colocated":
        return [policy, reference_slot(config, s)]
    return [policy]


def make_sums_fn(module, ref_module, s: DPOSettings):
    """sums_fn(params, batch, frozen) for the shared train step; the reference's log-probs come
    from frozen["reference"] (colocated) or from the batch (precomputed)."""
    terms, kind, hp = s.terms, s.kind, s.hparams

    def sums_fn(params, batch, frozen=None):
        logps, lens = group_logps(module, params["policy"], batch)
        w = example_weights(batch)
        if not s.needs_reference:
            ref_logps = None
        elif s.reference == "precomputed":
            ref_logps = batch["ref_logps"]
        else:
            ref_logps = jax.lax.stop_gradient(
                group_logps(ref_module, frozen["reference"], batch)[0])
        if kind == "pair":
            x = PairLogps(logps[:, 0], logps[:, 1], lens[:, 0], lens[:, 1],
                          *((ref_logps[:, 0], ref_logps[:, 1]) if ref_logps is not None else ()))
            loss, m = preference_loss(x, terms, hp, sample_weight=w)
        elif kind == "ranked":
            valid = batch["valid"] & (w[:, None] > 0)
            if terms[0][0] == "rrhf":
                loss, m = rrhf_loss(logps, lens, batch["scores"], valid,
                                    sft_weight=s.rrhf_sft_weight)
            else:
                loss, m = pro_loss(logps, lens, valid, batch["scores"] if s.pro_use_scores else None)
            m = dict(m, **_ranked_accuracy(logps, lens, batch["scores"], valid))
        else:
            loss, m = kto_loss(logps[:, 0], ref_logps[:, 0], batch["label"] > 0.5, logps[:, 1],
                               ref_logps[:, 1], beta=hp.beta,
                               desirable_weight=s.desirable_weight,
                               undesirable_weight=s.undesirable_weight, sample_weight_b=w)
        m = {k: v for k, v in m.items() if k != "loss" and jnp.ndim(v) == 0}
        return means_to_sums(loss, m, jnp.sum(w))

    return sums_fn


def sums(config, s: DPOSettings, modules):
    ref_module = modules.get("reference")
    if ref_module is None and s.needs_reference:  # precomputed: the module of the one pass
        from alignjax.train.slots import slot_module
        ref_module = slot_module(modules["policy"].config, reference_slot(config, s))
    return make_sums_fn(modules["policy"], ref_module, s), metrics


def abstract_batch(config, s: DPOSettings) -> dict:
    b = int(config.train.batch_size)
    k = s.num_responses if s.kind == "ranked" else 2
    batch = abstract_grouped_batch(b, k, int(config.data.seq_len))
    if s.needs_reference and s.reference == "precomputed":
        batch["ref_logps"] = jax.ShapeDtypeStruct((b, k), jnp.float32)
    return batch


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
    from alignjax.data.check import warn_overlap
    from alignjax.train.data_split import eval_iterators, open_split
    from alignjax.train.setup import eval_batch_size
    d, t = config.data, config.train
    pc, pi = jax.process_count(), jax.process_index()
    train_sources = open_split(config, workdir, run.tokenizer, "train", kind)  # list or Mixture
    eval_sources = open_split(config, workdir, run.tokenizer, "eval", kind)
    warn_overlap(d, train_sources, eval_sources)  # data.check_overlap

    def eval_iter(records=None):  # records: one eval source's, when there are several
        return make_preference_eval_iterator(eval_sources, run.tokenizer, d, kind=kind,
                                             batch_size=eval_batch_size(config),
                                             seq_len=int(d.seq_len), process_index=pi,
                                             process_count=pc, records=records)

    train_iter = make_preference_iterator(
        train_sources, run.tokenizer, d, kind=kind, seed=int(d.shuffle_seed),
        batch_size=int(t.batch_size) // pc, seq_len=int(d.seq_len), process_index=pi, process_count=pc)
    return train_iter, eval_iterators(eval_sources, eval_iter), train_sources, eval_sources


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
    """Reference log-probs [N, K] of every record, in one ordered pass over the processes'
    shares. Each process keeps the whole table: its training batches come from one shuffled
    order of all records, not from the share it scored.

    Stored as WORKDIR/reference_logps_<split>_p<process>.npy and reused on resume (then
    `ref_params`, a callable, is not called: the reference is not read).
    """
    from alignjax import sharding as shd
    from alignjax.data.preference import make_preference_eval_iterator
    from alignjax.train.loop import to_global
    from alignjax.train.setup import eval_batch_size
    path = reference_table_path(workdir, split)
    if fs.exists(path):
        return np.load(io.BytesIO(fs.as_path(path).read_bytes()))
    params = ref_params()
    it = make_preference_eval_iterator(sources, run.tokenizer, config.data, kind=kind,
                                       batch_size=eval_batch_size(config),
                                       seq_len=int(config.data.seq_len),
                                       process_index=jax.process_index(),
                                       process_count=jax.process_count())
    fn = jax.jit(lambda p, b: group_logps(ref_module, p, b)[0])
    rows = {}
    with shd.mesh_context(run.mesh, run.rules):
        for batch in it:
            index = to_global(batch.pop("index"), run.mesh, run.rules)
            logps = fn(params, to_global(batch, run.mesh, run.rules))
            index, logps = shd.to_host(index), shd.to_host(logps)  # every process's rows
            rows.update({int(i): logps[j] for j, i in enumerate(index) if i >= 0})
    n = max(rows) + 1 if rows else 0
    table = np.zeros((n, logps.shape[1]), np.float32)
    for i, row in rows.items():
        table[i] = row
    buffer = io.BytesIO()
    np.save(buffer, table)
    fs.write_bytes(path, buffer.getvalue())
    return table


def reference_table_path(workdir: str, split: str) -> str:
    return fs.join(workdir, f"reference_logps_{split}_p{jax.process_index()}.npy")


def build(config, workdir: str, run, s: DPOSettings, modules, loader):
    from alignjax.train.data_split import map_eval
    from alignjax.train.loop import Algorithm
    from alignjax.train.slots import slot_module
    train_iter, eval_iter, train_sources, eval_sources = _iterators(config, workdir, run, s.kind)
    if s.needs_reference and s.reference == "precomputed":
        slot = reference_slot(config, s)
        ref_module, held = slot_module(run.model_config, slot), []

        def ref_params():  # read once, only if a table is missing
            if not held:
                held.append(loader.load(slot, ref_module))
            return held[0]

        train_table = precompute_reference(config, workdir, run, ref_module, ref_params, s.kind,
                                           train_sources, "train")
        eval_table = (precompute_reference(config, workdir, run, ref_module, ref_params, s.kind,
                                           eval_sources, "eval") if eval_sources else None)
        for tree in held:  # no reference left on the devices
            jax.tree_util.tree_map(lambda x: x.delete(), tree)
        held.clear()
        train_iter = WithReference(train_iter, train_table)
        eval_iter = map_eval(eval_iter, lambda it: WithReference(it, eval_table))
    sums_fn, metrics_fn = sums(config, s, modules)
    return Algorithm("dpo", sums_fn, metrics_fn, train_iter, eval_iterator=eval_iter)


SPEC = AlgorithmSpec("dpo", settings, slots, sums, abstract_batch, build)
