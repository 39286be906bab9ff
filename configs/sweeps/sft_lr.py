"""Learning-rate sweep over the tiny SFT preset (3 runs, 150 steps each).

    base, runs = alignjax.config.expand_sweep("configs/sweeps/sft_lr.py")
    # -> "configs/sft.py:tiny", [("optimizer.lr=0.001", ["train.steps=150", ..., "optimizer.lr=0.001"]), ...]

Each run trains in ``<sweep workdir>/<name>``, e.g. ``runs/sft_lr/optimizer.lr=0.003``. The format
(SWEEP grid sugar, or BASE + get_sweep() for an explicit list) is documented in alignjax/config.py.
"""

SWEEP = {
    "base": "configs/sft.py:tiny",
    "grid": {"optimizer.lr": [1e-3, 2e-3, 3e-3]},
    "fixed": {"train.steps": 150, "checkpoint.every": 150},
}
