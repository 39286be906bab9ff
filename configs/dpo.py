"""Preference optimisation config: DPO and its family, SimPO/ORPO/SLiC, RRHF/PRO, KTO.

    alignjax train --config configs/dpo.py:tiny --workdir runs/dpo --config.model.init_from=runs/sft
    alignjax train ... --config.dpo.loss_type=ipo
    alignjax train ... --config.dpo.loss_type=dpo+sft                          # RPO
    alignjax train ... --config.dpo.loss_type=rrhf                             # ranked data

`dpo.reference`: "colocated" keeps the frozen reference (the init_from model, in dpo.ref_dtype)
on the same mesh; "precomputed" computes its log-probs once before training and frees it.
"""

import os

from alignjax.config import load_config_module

_sft = load_config_module(os.path.join(os.path.dirname(__file__), "sft.py"))
PRESETS = _sft.PRESETS
DEFAULT_PRESET = "tiny"


def get_config(preset: str | None = None):
    preset = preset or DEFAULT_PRESET
    c = _sft.get_config(preset)
    c.algorithm = "dpo"
    c.dpo = dict(
        loss_type="dpo",          # a name, or a weighted sum such as "dpo+sft" or "dpo:1.0+sft:0.5"
        reference="colocated",    # colocated | precomputed
        ref_dtype="bfloat16" if preset not in ("tiny", "small") else "float32",
        beta=0.1, label_smoothing=0.0, exo_eps=1e-3, discopop_tau=0.05,
        simpo_gamma=0.5, orpo_lambda=0.1, slic_delta=1.0, slic_lambda=0.1,
        rrhf_sft_weight=1.0, pro_use_scores=True,
        sft_token_mean=False,     # the sft (RPO) term: True = TRL's mean over all chosen tokens
        desirable_weight=1.0, undesirable_weight=1.0,
        # TR-DPO: every tau steps ref <- alpha * policy + (1 - alpha) * ref. 0 = frozen reference;
        # alpha = 1 is the paper's hard update (copy the policy), alpha < 1 its soft update.
        ref_refresh_every=0, ref_refresh_alpha=0.6,
    )
    c.data.packing = "pad"
    c.data.num_responses = 4  # ranked losses: responses per prompt (K)
    # Pairs (ranked groups) built from rated responses (alignjax.data.ratings): "" = off |
    # best_vs_worst | best_vs_random | all_pairs | ranked (kind ranked: RRHF/PRO).
    c.data.from_ratings = ""
    c.data.min_margin = 0.0  # pairs whose score difference is below it are ties, dropped
    c.data.rating_key = ""  # "" = overall_score (UltraFeedback) / score; or e.g. fine-grained_score
    c.data.rating_seed = 0  # best_vs_random's draw (per record, from its content)
    # margin = scale * score difference; only the reward model reads it (0 = off)
    c.data.rating_margin_scale = 0.0
    if preset in ("tiny", "small"):
        # RPO (DPO + the SFT term on the chosen answer) with a large beta. Measured on the toy
        # suite from the 97.5% SFT model (greedy checker accuracy, implicit-reward accuracy):
        # this preset 99.0% / 97%; plain DPO at the same settings 96.5% / 96.5%; plain DPO at
        # beta 0.1, lr 2e-4, 150 steps 76.5% / 89% (it lowers the chosen log-probs).
        c.dpo.update(loss_type="dpo+sft", beta=1.0)
        c.data.seq_len = 64  # toy prompt + response with the chat template: at most 44 tokens
        c.optimizer.update(lr=1e-4, warmup_steps=10, weight_decay=0.0, schedule="cosine")
        c.train.update(steps=100, batch_size=32, log_every=10, eval_every=50, eval_batches=8)
        c.checkpoint.every = 50
    else:
        c.optimizer.update(lr=5e-7, warmup_steps=30)
        c.train.update(steps=1000, batch_size=64, grad_accum_steps=2)
        # Pairs are two sequences each: 2048 tokens and 2 micro-batches keep 7B/8B within
        # v5p HBM next to the reference (check: alignjax compile --topology v5p-64).
        c.data.seq_len = 2048
    return c
