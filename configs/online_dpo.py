"""Online DPO: two samples per prompt from the current policy each step, a reward picks the
chosen one, a DPO-family step on those pairs (alignjax/train/online_dpo.py).

    alignjax train --config configs/online_dpo.py:tiny --workdir runs/odpo --config.model.init_from=runs/sft
    alignjax train ... --config.dpo.loss_type=ipo                 # any pairwise loss (dpo.* as in configs/dpo.py)
    alignjax train ... --config.online_dpo.reward=runs/rm         # a reward model instead of the checker

train.batch_size counts prompts (= pairs) per step; each is sampled twice. The loss and the
reference are configured as for offline DPO (`dpo.*`, the reference is the start model,
colocated; dpo.ref_refresh_every > 0 gives TR-DPO). Defaults follow TRL's OnlineDPOConfig
(temperature 0.9, beta 0.1, sigmoid loss).
"""

import os

from alignjax.config import load_config_module

_dpo = load_config_module(os.path.join(os.path.dirname(__file__), "dpo.py"))
PRESETS = _dpo.PRESETS
DEFAULT_PRESET = "tiny"


def get_config(preset: str | None = None):
    preset = preset or DEFAULT_PRESET
    c = _dpo.get_config(preset)
    c.algorithm = "online_dpo"
    c.online_dpo = dict(
        reward="",                  # toy | a reward-model dir | python:FILE.py:FN | weighted sums
        reward_normalize=False,
        max_prompt_len=512,         # prompts are left-padded to it; a longer one is an error
        max_new_tokens=256,
        temperature=0.9, top_p=1.0, top_k=0,
        missing_eos_penalty=0.0,    # subtracted from the score of a response without EOS (0 = off)
        skip_ties=False,            # True: leave out pairs whose two scores tie (TRL keeps them)
    )
    c.dpo.update(loss_type="dpo", beta=0.1, reference="colocated")
    c.tokenizer.path = ""  # the policy's own (model.init_from): online DPO starts from a model
    c.data.eval = ""  # data.train: the prompts
    if preset in ("tiny", "small"):
        # The toy suite: the checker is the reward. Prompts are at most 34 tokens with the chat
        # template, answers at most 12 tokens + EOS.
        c.online_dpo.update(reward="toy", max_prompt_len=40, max_new_tokens=16, missing_eos_penalty=1.0,
                            skip_ties=True)
        c.data.update(train="toy", seq_len=56)
        c.optimizer.update(lr=3e-5, warmup_steps=5, schedule="linear", min_lr_ratio=0.0)
        c.train.update(steps=100, batch_size=32, log_every=5, eval_every=20)
        c.checkpoint.every = 50
    else:
        c.data.update(train="hf://HuggingFaceH4/ultrachat_200k:train_gen", seq_len=768)
        c.online_dpo.update(max_new_tokens=256)
        c.optimizer.update(lr=5e-7, warmup_steps=10)
        c.train.update(steps=500, batch_size=64, grad_accum_steps=2, log_every=1, eval_every=0)
        c.checkpoint.every = 50
    return c
