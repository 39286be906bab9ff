"""optax AdamW with warmup + decay, global-norm clipping, and no weight decay on norms/biases."""

from __future__ import annotations

import jax
import optax

from alignjax.config import SCHEDULES
from alignjax.model.config import ConfigError


def learning_rate_schedule(opt, total_steps: int) -> optax.Schedule:
    """Linear warmup from 0 to `lr`, then cosine / linear decay to `lr * min_lr_ratio` (or constant)."""
    lr, warmup = float(opt.lr), int(opt.warmup_steps)
    end = lr * float(opt.get("min_lr_ratio", 0.0))
    decay_steps = max(1, total_steps - warmup)
    if opt.schedule == "cosine":
        decay = optax.cosine_decay_schedule(lr, decay_steps, alpha=end / lr if lr else 0.0)
    elif opt.schedule == "linear":
        decay = optax.linear_schedule(lr, end, decay_steps)
    elif opt.schedule == "constant":
        decay = optax.constant_schedule(lr)
    else:
        raise ConfigError(f"optimizer.schedule={opt.schedule!r}: use one of {SCHEDULES}")
    if warmup <= 0:
        return decay
    return optax.join_schedules([optax.linear_schedule(0.0, lr, warmup), decay], [warmup])


def decay_mask(params):
    """True for matrices (kernels, embeddings); norms' scales and biases are not decayed."""
    def keep(path, _):
        last = getattr(path[-1], "key", "")
        return last in ("kernel", "embedding")
    return jax.tree_util.tree_map_with_path(keep, params)


def make_optimizer(opt, total_steps: int) -> tuple[optax.GradientTransformation, optax.Schedule]:
    schedule = learning_rate_schedule(opt, total_steps)
    parts = []
    if opt.get("grad_clip", 0.0):
        parts.append(optax.clip_by_global_norm(float(opt.grad_clip)))
    parts.append(optax.adamw(schedule, b1=float(opt.b1), b2=float(opt.b2), eps=float(opt.eps),
                             weight_decay=float(opt.weight_decay), mask=decay_mask))
    return optax.chain(*parts), schedule
