"""The over-optimisation watch: a learned reward rising while the task's checker falls means the policy is
learning the reward model's blind spots, not the task (Gao et al. 2023)."""

from __future__ import annotations


def overoptimisation(learned: list[float], checker: list[float], window: int, min_rise: float = 0.0,
                     min_fall: float = 0.02) -> str | None:
    """Compare the means of the last `window` steps with the `window` before them: a learned reward that rose
    (by more than min_rise) while the checker's accuracy fell by more than min_fall. None when not (or too few
    steps)."""
    if window < 1 or len(learned) < 2 * window or len(checker) < 2 * window:
        return None

    def change(xs):
        return sum(xs[-window:]) / window - sum(xs[-2 * window : -window]) / window

    d_learned, d_checker = change(learned), change(checker)
    if d_learned > min_rise and d_checker < -min_fall:
        return (f"over-optimisation: over the last {window} steps the reward model's score rose by {d_learned:.3f} "
                f"while the checker's accuracy of the same rollouts fell by {-d_checker:.3f} - the policy is gaming "
                "the reward model. Raise the KL coefficient, stop earlier (train.max_steps), or reward with the "
                "checker (reward=checker or reward=weighted)")
    return None
