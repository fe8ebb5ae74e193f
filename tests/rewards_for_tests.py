"""Reward functions the tests pass as reward.fn=tests.rewards_for_tests:<name>."""


def length(prompts, completions, **fields):
    """Longer is better: a reward that differs within almost every group, whatever the model."""
    return [float(len(c)) for c in completions]


def constant(prompts, completions, **fields):
    """Every answer alike: no preference anywhere."""
    return [1.0 for _ in completions]
