"""Expert iteration / rejection-sampling fine-tuning (docs/algorithms.md section 5).

    alignjax iterate --config configs/expert_iteration.py:tiny --workdir runs/ei \
        --config.model.init_from=runs/sft
    alignjax iterate ... --config.expert_iteration.reward=runs/rm --config.expert_iteration.min_reward=-inf
    alignjax iterate ... --config.expert_iteration.keep=all      # every distinct correct sample

Each of expert_iteration.rounds rounds samples expert_iteration.samples_per_prompt responses per
prompt from the current policy, scores them with expert_iteration.reward, keeps the best per
prompt (keep="best") or every distinct one (keep="all") scoring at least min_reward (-inf: keep
them whatever they score), and fine-tunes on the kept records for steps_per_round SFT steps
(the optimizer, batch and model settings below are the SFT preset's). The next round samples
from the model that round trained.
"""

import os

from alignjax.config import load_config_module

_sft = load_config_module(os.path.join(os.path.dirname(__file__), "sft.py"))
PRESETS = _sft.PRESETS
DEFAULT_PRESET = "tiny"


def get_config(preset: str | None = None):
    preset = preset or DEFAULT_PRESET
    c = _sft.get_config(preset)
    c.expert_iteration = dict(
        rounds=3,
        prompts="toy",              # toy (the toy suite's training prompts) or a file with "prompt"
        num_prompts=0,              # the first N prompts (0: all)
        samples_per_prompt=8,       # K
        keep="best",                # best | all (every distinct response reaching min_reward)
        min_reward=float("-inf"),   # samples scoring less are never kept; e.g. 1.0 with the checker
        reward="",                  # toy | a reward-model dir | python:FILE.py:FN | weighted sums
        temperature=1.0, top_p=1.0, top_k=0,
        max_new_tokens=256,
        sample_batch_size=256,      # sequences per generate call
        steps_per_round=200,
        eval_toy=0,                 # held-out toy prompts scored by the checker after each round (0: off)
    )
    c.tokenizer.path = ""  # the policy's own (model.init_from): expert iteration starts from a model
    if preset in ("tiny", "small"):
        # The toy suite: the checker is the reward and only correct answers are kept.
        c.expert_iteration.update(reward="toy", min_reward=1.0, num_prompts=2048, max_new_tokens=16,
                                  steps_per_round=50, eval_toy=200)
        c.optimizer.update(lr=3e-4, warmup_steps=10)
        c.train.update(eval_every=0)
        c.checkpoint.every = 100
    else:
        c.data.eval = ""
        c.expert_iteration.update(prompts="hf://HuggingFaceH4/ultrachat_200k:train_gen", num_prompts=10000,
                                  max_new_tokens=512)
    return c
