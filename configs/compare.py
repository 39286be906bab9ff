"""The method comparison (`alignjax compare`, alignjax/compare.py) on the toy suite.

    alignjax compare --config configs/compare.py:toy --workdir runs/compare --config.start=runs/sft
    alignjax compare ... --config.compare.methods=dpo,grpo,best_of_4 --config.compare.steps=50
    alignjax compare ... --config.compare.reward_model=runs/rm     # RM score column; best-of-n picks by it

Every method starts from compare.start and trains compare.steps optimizer steps with its own
toy preset (configs/<method>.py:tiny); compare.overrides.<method> adds config overrides for one
method, e.g. --config.compare.overrides.grpo="('optimizer.lr=1e-5',)".
"""

from ml_collections import ConfigDict

PRESETS = ("toy",)
DEFAULT_PRESET = "toy"
ALL = ("best_of_4,best_of_16,expert_iteration,rso,conditional,dpo,ipo,slic,simpo,orpo,rrhf,pro,kto,"
       "online_dpo,ppo,grpo,rloo,reinforce_pp")


def get_config(preset: str | None = None) -> ConfigDict:
    c = ConfigDict()
    c.compare = ConfigDict(dict(
        start="",                  # the SFT model every method starts from
        methods=ALL,               # comma-separated (alignjax.compare.METHODS)
        steps=100,                 # optimizer steps per trained method
        eval_prompts=200,          # held-out toy prompts, judged by the checker
        reward="toy",              # what best-of-n and RSO sampling score with
        reward_model="",           # optional: a reward-model dir for the RM-score column
        rso_candidates=8,          # RSO and conditional tokens: samples per prompt from the start model
        rso_prompts=1024,          # ... and training prompts sampled
        conditional_threshold=1.0,  # a sample whose reward reaches this earns <|good|> (the checker: correct)
        # extra config overrides for one method, e.g. grpo=("optimizer.lr=1e-5",)
        overrides=ConfigDict({m: () for m in ALL.split(",")}),
    ))
    return c
