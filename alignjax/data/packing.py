"""Tokenized examples -> fixed-shape rows and batches (the batch contract every trainer uses).

    tokens      [B, T] int32    input ids (pad id in padding)
    positions   [B, T] int32    position within its own segment (0 in padding)
    segment_ids [B, T] int32    1, 2, ... per document in the row; 0 = padding
    targets     [B, T] int32    tokens[t+1] of the same segment; pad id where there is none
    loss_mask   [B, T] float32  1 where targets[t] is a completion/assistant token (incl. EOS)

Targets are built per example *before* packing (``shift_example``), so a target can never
cross a document boundary: the last token of each document has target = pad, mask 0.
Packing uses grain's ``FirstFitPackIterDataset`` (grain >= 0.2.12): it packs whole examples
(never splits one), fills padding from ``padding_struct`` and emits per-feature segment ids
(0 = padding) and positions restarting at 0 (0 in padding) -- exactly this contract. It is
deterministic and checkpointable (its state is the parent state plus two ints).
"""
from __future__ import annotations

from typing import Sequence

import grain
import numpy as np

from alignjax.data.formatting import Tokenized

ROW_KEYS = ("tokens", "positions", "segment_ids", "targets", "loss_mask")
_PACKED = ("tokens", "targets", "loss_mask")


def shift_example(ex: Tokenized, pad_id: int) -> dict[str, np.ndarray]:
    """One document -> {tokens [L], targets [L], loss_mask [L]} with next-token targets."""
    ids_l = ex.ids.astype(np.int32)
    targets_l = np.concatenate([ids_l[1:], np.array([pad_id], np.int32)])
    mask_l = np.concatenate([ex.loss_mask[1:], [False]]).astype(np.float32)
    return {"tokens": ids_l, "targets": targets_l, "loss_mask": mask_l}


def empty_row(seq_len: int, pad_id: int) -> dict[str, np.ndarray]:
    """A row of pure padding (segment 0, no loss)."""
    return {
        "tokens": np.full(seq_len, pad_id, np.int32),
        "positions": np.zeros(seq_len, np.int32),
        "segment_ids": np.zeros(seq_len, np.int32),
        "targets": np.full(seq_len, pad_id, np.int32),
        "loss_mask": np.zeros(seq_len, np.float32),
    }


def pad_row(example: dict[str, np.ndarray], seq_len: int, pad_id: int) -> dict[str, np.ndarray]:
    """One example per row, right-padded to ``seq_len``. Extra keys (e.g. ``valid``) pass through."""
    n = len(example["tokens"])
    if n > seq_len:
        raise ValueError(f"example of {n} tokens does not fit seq_len={seq_len}; truncate first")
    row = empty_row(seq_len, pad_id)
    for k in _PACKED:
        row[k][:n] = example[k]
    row["positions"][:n] = np.arange(n, dtype=np.int32)
    row["segment_ids"][:n] = 1 if n else 0
    for k, v in example.items():
        if k not in row:
            row[k] = v
    return row


def _packable(ex: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    return {k: ex[k] for k in _PACKED}


def _rename_packed(row: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    return {
        "tokens": row["tokens"],
        "positions": row["tokens_positions"],
        "segment_ids": row["tokens_segment_ids"],
        "targets": row["targets"],
        "loss_mask": row["loss_mask"].astype(np.float32),
    }


def pack_rows(examples: grain.IterDataset, seq_len: int, pad_id: int, *, num_bins: int,
              seed: int = 0) -> grain.IterDataset:
    """Greedy first-fit packing of shifted examples into rows of ``seq_len`` (grain stage).

    ``num_bins`` rows are filled at once; when an example fits none of them, all are emitted
    (in a seeded, deterministic order) and a new set starts with that example. More bins means
    less padding. No example is split or dropped; a final partial set is emitted at the end.
    """
    from grain.experimental import FirstFitPackIterDataset

    length = {k: seq_len for k in _PACKED}
    packed = FirstFitPackIterDataset(
        examples.map(_packable),
        length_struct=length,
        num_packing_bins=num_bins,
        seed=seed,
        shuffle_bins=True,
        padding_struct={"tokens": pad_id, "targets": pad_id, "loss_mask": 0.0},
    )
    return packed.map(_rename_packed)


def stack_rows(rows: Sequence[dict[str, np.ndarray]], *, batch_size: int, seq_len: int,
               pad_id: int) -> dict[str, np.ndarray]:
    """Rows -> batch [batch_size, ...]; a short final batch is filled with empty rows.

    Rows carrying ``valid`` (eval) get ``valid=False`` for the filler rows.
    """
    rows = list(rows)
    n_real = len(rows)
    if n_real < batch_size:
        filler = empty_row(seq_len, pad_id)
        if rows and "valid" in rows[0]:
            filler["valid"] = np.bool_(False)
        rows += [filler] * (batch_size - n_real)
    return {k: np.stack([r[k] for r in rows]) for k in rows[0]}


def check_batch(batch: dict[str, np.ndarray], pad_id: int) -> None:
    """Assert the batch contract (cheap; used by tests and available to trainers for debugging)."""
    tokens, seg, pos, tgt, mask = (batch[k] for k in ("tokens", "segment_ids", "positions",
                                                      "targets", "loss_mask"))
    assert tokens.dtype == seg.dtype == pos.dtype == tgt.dtype == np.int32, "int32 ids"
    assert mask.dtype == np.float32, "float32 loss_mask"
    assert tokens.shape == seg.shape == pos.shape == tgt.shape == mask.shape
    pad = seg == 0
    assert np.all(tokens[pad] == pad_id) and np.all(pos[pad] == 0) and np.all(mask[pad] == 0)
    same_next = np.zeros_like(pad)
    same_next[:, :-1] = (seg[:, 1:] == seg[:, :-1]) & (seg[:, :-1] > 0)
    assert np.all(tgt[:, :-1][same_next[:, :-1]] == tokens[:, 1:][same_next[:, :-1]])
    assert np.all(tgt[~same_next] == pad_id) and np.all(mask[~same_next] == 0)
    starts = np.ones_like(pad)
    starts[:, 1:] = seg[:, 1:] != seg[:, :-1]
    assert np.all(pos[starts & ~pad] == 0)
    cont = ~starts & ~pad
    prev = np.zeros_like(pos)
    prev[:, 1:] = pos[:, :-1]
    assert np.all(pos[cont] == prev[cont] + 1)
