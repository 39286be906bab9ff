"""Pure loss functions and the shared log-prob kernel (docs/algorithms.md sections 1-4)."""

from alignjax.losses.logprobs import TokenStats, sequence_logps, token_logps, token_stats
from alignjax.losses.preference import PAIR_LOSSES, PairLogps, PrefHParams, preference_loss
from alignjax.losses.ranking import kto_loss, pro_loss, rrhf_loss
from alignjax.losses.reward import bradley_terry_loss
from alignjax.losses.sft import sft_loss, sft_loss_sums, sft_metrics_from_sums

__all__ = [
    "PAIR_LOSSES",
    "PairLogps",
    "PrefHParams",
    "TokenStats",
    "bradley_terry_loss",
    "kto_loss",
    "preference_loss",
    "pro_loss",
    "rrhf_loss",
    "sequence_logps",
    "sft_loss",
    "sft_loss_sums",
    "sft_metrics_from_sums",
    "token_logps",
    "token_stats",
]
