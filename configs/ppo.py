"""PPO for RLHF (docs/algorithms.md section 6): policy, value, reference and reward on one mesh.

    alignjax train --config configs/ppo.py:tiny --workdir runs/ppo --config.model.init_from=runs/sft
    alignjax train ... --config.ppo.reward=runs/rm                 # a reward model
    alignjax train ... --config.ppo.reward="toy + 0.5*runs/rm"     # a weighted sum of sources
    alignjax train ... --config.ppo.reward=python:rewards.py:fn    # a function (prompts, completions)

One step = one rollout of train.batch_size responses (train.batch_size / ppo.samples_per_prompt
prompts from data.train) + ppo.epochs x ppo.num_minibatches optimizer updates; each minibatch is
split into train.grad_accum_steps micro-batches. `optimizer` trains the policy and
`value_optimizer` the value model (its own learning rate); their schedules count updates.

Defaults are TRL's PPO (lambda 0.95, value clip 0.2, vf_coef 0.1, 4 epochs, kl_coef 0.05 in the
reward with the k1 estimator, temperature 0.7, advantage whitening on, Adam eps 1e-5, linear
decay) except: the per-token score sits on the EOS token and GAE stops there (docs/algorithms.md
section 6 and alignjax/losses/rl.py); OpenRLHF's lambda 1.0 / value clip 0.5 are one override
away. The value model starts from the reward model when ppo.reward names one (ppo.value_init=auto),
else from the policy with a zero score head.
"""

import os

from alignjax.config import load_config_module

_sft = load_config_module(os.path.join(os.path.dirname(__file__), "sft.py"))
PRESETS = _sft.PRESETS
DEFAULT_PRESET = "tiny"


def get_config(preset: str | None = None):
    preset = preset or DEFAULT_PRESET
    c = _sft.get_config(preset)
    c.algorithm = "ppo"
    c.ppo = dict(
        reward="",                  # toy | a reward-model dir | python:FILE.py:FN | weighted sums
        reward_normalize=False,     # (r - mean) / std with the reward model's stored reward_stats
        samples_per_prompt=1,
        max_prompt_len=512,         # prompts are left-padded to it; a longer one is an error
        max_new_tokens=256,
        temperature=0.7, top_p=1.0, top_k=0,
        epochs=4, num_minibatches=4,
        clip_eps=0.2,
        dual_clip=0.0,              # 0 = off; c > 1 caps a negative-advantage token's loss at -c A
        vf_clip=0.2, vf_coef=0.1,
        ent_coef=0.0,
        gamma=1.0, lam=0.95,
        kl_coef=0.05,
        kl_target=0.0,              # 0 = fixed kl_coef; > 0 = the adaptive controller's target KL
        kl_horizon=10000.0,
        kl_estimator="k1",          # k1 | k2 | k3
        kl_in="reward",             # reward (per-token penalty) | loss (a policy-loss term)
        reward_clip=0.0,            # 0 = off; else scores are clipped to [-c, c]
        missing_eos_penalty=0.0,    # subtracted from the score of a response without EOS (0 = off)
        missing_eos_score=None,     # or: such a response scores exactly this (e.g. -1.0)
        whiten_rewards=False, whiten_advantages=True,
        value_init="auto",          # auto | reward | policy
        ref_dtype="bfloat16" if preset not in ("tiny", "small") else "float32",
    )
    c.tokenizer.path = ""  # the policy's own (model.init_from): PPO always starts from a model
    c.data.eval = ""  # data.train: the prompts
    c.optimizer.update(lr=3e-6, b2=0.999, eps=1e-5, weight_decay=0.0, schedule="linear",
                       warmup_steps=0, min_lr_ratio=0.0, grad_clip=1.0)
    c.value_optimizer = c.optimizer.copy_and_resolve_references()
    c.value_optimizer.lr = 9e-6  # OpenRLHF's critic learning rate
    # PPO has no eval split yet: every train.eval_every steps a few rollout samples go to
    # WORKDIR/samples/step_N.jsonl.
    c.train.update(eval_every=50, eval_batches=0)
    if preset in ("tiny", "small"):
        # The toy suite: prompts are at most 34 tokens with the chat template, answers at most
        # 12 tokens + EOS. The checker is the reward; start from a short SFT run.
        c.ppo.update(reward="toy", max_prompt_len=40, max_new_tokens=16, samples_per_prompt=1,
                     missing_eos_penalty=1.0)
        c.data.update(train="toy", seq_len=56)
        c.optimizer.update(lr=1e-4)
        c.value_optimizer.update(lr=3e-4)
        c.train.update(steps=100, batch_size=64, log_every=5, eval_every=20)
        c.checkpoint.every = 50
    else:
        # A real chat prompt set (a string "prompt" field); set model.init_from to the SFT model
        # and ppo.reward to a reward model trained with configs/reward.py.
        c.data.update(train="hf://HuggingFaceH4/ultrachat_200k:train_gen", seq_len=768)
        c.ppo.update(max_prompt_len=512, max_new_tokens=256)
        c.train.update(steps=500, batch_size=512, grad_accum_steps=2, log_every=1)
        c.checkpoint.every = 50
    return c
