"""Trainers: one shared loop (loop.py) around one small module per algorithm."""


def _sft(config, workdir):
    from alignjax.train import sft
    return sft.train(config, workdir)


def _reward(config, workdir):
    from alignjax.train import reward
    return reward.train(config, workdir)


def _dpo(config, workdir):
    from alignjax.train import dpo
    return dpo.train(config, workdir)


# config.algorithm -> train(config, workdir)
ALGORITHMS = {"sft": _sft, "reward": _reward, "dpo": _dpo}
