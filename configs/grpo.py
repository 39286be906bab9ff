"""Critic-free online RL (docs/algorithms.md section 7): GRPO, RLOO, REINFORCE++(-baseline).

    alignjax train --config configs/grpo.py:tiny --workdir runs/grpo --config.model.init_from=runs/sft
    alignjax train ... --config.grpo.advantage=rloo                 # TRL's RLOO (beta 0.05 in the reward)
    alignjax train ... --config.grpo.advantage=reinforce_pp         # OpenRLHF's REINFORCE++
    alignjax train ... --config.grpo.reward=runs/rm                 # a reward model instead of the checker
    alignjax train ... --config.grpo.loss_type=dr_grpo --config.grpo.scale_rewards=none   # Dr. GRPO
    alignjax train ... --config.grpo.epsilon_high=0.28 --config.grpo.overlong_buffer=4    # DAPO

One step = one rollout of train.batch_size responses (train.batch_size / grpo.samples_per_prompt
prompts from data.train, each sampled samples_per_prompt times) + grpo.epochs x
grpo.num_minibatches optimizer updates. No value model; the reference model is loaded only when
grpo.beta > 0.

Defaults are TRL's GRPOConfig (num_generations 8, temperature 1.0, epsilon 0.2, beta 0, loss_type
dapo, scale_rewards group, num_iterations 1, lr 1e-6). grpo.beta / ratio / loss_type left at
None / auto take the chosen method's defaults (alignjax/train/grpo.py: TRL's RLOOConfig for rloo,
OpenRLHF for reinforce_pp).
"""

import os

from alignjax.config import load_config_module

_sft = load_config_module(os.path.join(os.path.dirname(__file__), "sft.py"))
PRESETS = _sft.PRESETS
DEFAULT_PRESET = "tiny"


def get_config(preset: str | None = None):
    preset = preset or DEFAULT_PRESET
    c = _sft.get_config(preset)
    c.algorithm = "grpo"
    c.grpo = dict(
        advantage="grpo",           # grpo | rloo | reinforce_pp | reinforce_pp_baseline
        reward="",                  # toy | a reward-model dir | python:FILE.py:FN | weighted sums
        reward_normalize=False,
        samples_per_prompt=8,       # G (TRL num_generations); >= 2 except for reinforce_pp
        max_prompt_len=512,         # prompts are left-padded to it; a longer one is an error
        max_new_tokens=256,
        temperature=1.0, top_p=1.0, top_k=0,
        missing_eos_penalty=0.0,    # subtracted from the score of a response without EOS (0 = off)
        overlong_buffer=0,          # DAPO soft overlong penalty over the last b new tokens (0 = off)
        overlong_factor=1.0,
        scale_rewards="group",      # grpo advantages: group | batch | none (Dr. GRPO)
        beta=None,                  # None = the method's: grpo 0 (k3 in the loss), rloo 0.05, reinforce 0.01
        ratio="auto",               # auto | token | gspo | sequence
        loss_type="auto",           # auto | grpo | bnpo | dr_grpo | dapo
        epsilon_low=0.2, epsilon_high=0.2,
        epochs=1, num_minibatches=1,
        ref_dtype="bfloat16" if preset not in ("tiny", "small") else "float32",
    )
    c.tokenizer.path = ""  # the policy's own (model.init_from): RL always starts from a model
    c.data.eval = ""  # data.train: the prompts
    c.optimizer.update(lr=1e-6, b2=0.999, eps=1e-8, weight_decay=0.0, schedule="linear",
                       warmup_steps=0, min_lr_ratio=0.0, grad_clip=1.0)
    c.train.update(eval_every=50, eval_batches=0)
    if preset in ("tiny", "small"):
        # The toy suite: prompts are at most 34 tokens with the chat template, answers at most
        # 12 tokens + EOS. The checker is the reward; start from a short SFT run.
        c.grpo.update(reward="toy", max_prompt_len=40, max_new_tokens=16, samples_per_prompt=8,
                      missing_eos_penalty=1.0, num_minibatches=2)
        c.data.update(train="toy", seq_len=56)
        c.optimizer.update(lr=2e-5)
        c.train.update(steps=100, batch_size=64, log_every=5, eval_every=20)
        c.checkpoint.every = 50
    else:
        # A real chat prompt set (a string "prompt" field); set model.init_from to the SFT model
        # and grpo.reward to a reward model (configs/reward.py) or a python: function.
        c.data.update(train="hf://HuggingFaceH4/ultrachat_200k:train_gen", seq_len=768)
        c.train.update(steps=500, batch_size=512, grad_accum_steps=2, log_every=1)
        c.grpo.update(num_minibatches=4)
        c.checkpoint.every = 50
    return c
