"""Reward functions the tests pass as reward.fn=tests.rewards_for_tests:<name>."""


def length(prompts, completions, **fields):
    """Longer is better: a reward that differs within almost every group, whatever the model."""
    return [float(len(c)) for c in completions]


def constant(prompts, completions, **fields):
    """Every answer alike: no preference anywhere."""
    return [1.0 for _ in completions]


def half_solved(prompts, completions, **fields):
    """Half the prompts (by their characters) solved, every answer 1.0; the rest 0.5 and 0 by turns (answers are
    scored in their groups' order): flat groups at the best reward beside groups that differ, whatever the model."""
    return [1.0 if sum(map(ord, p)) % 2 else 0.5 * (i % 2) for i, p in enumerate(prompts)]


def thirds(prompts, completions, **fields):
    """By the prompt's characters: a third solved (every answer 1.0), a third failing (every answer 0.0), a third
    whose answers get 1.0 and 0.0 by turns (scored in their groups' order): all three kinds of group, whatever the
    model, so dynamic sampling's `failing` form takes extra rounds."""
    def score(i, p):
        kind = sum(map(ord, p)) % 3
        return 1.0 if kind == 0 else 0.0 if kind == 1 else float(i % 2)
    return [score(i, p) for i, p in enumerate(prompts)]
