"""Trainers: one shared loop (loop.py) around one small module per algorithm."""


def _sft(config, workdir):
    from alignjax.train import sft
    return sft.train(config, workdir)


# config.algorithm -> train(config, workdir)
ALGORITHMS = {"sft": _sft}
