"""A reward every sample of a random model earns a different share of (tests: best-of-n, RSO)."""


def reward(prompts, completions):
    return [float(len(c)) for c in completions]
