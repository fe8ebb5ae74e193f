"""DAPO's dynamic sampling as pure functions: which groups of one or more sampling rounds fill a step's batch.

A group carries signal when its valid rewards are not all equal; the step keeps its batch's row count (every rank
trains the same number of micro-batches) and fills it with groups with signal first, in the order they were
sampled, then with flat groups (left out of the update, as without dynamic sampling).

A flat group is *solved* when its reward is the best the run has seen, once the run has seen two different rewards:
every answer to its prompt already gets the most there is to get, and sampling the prompt again teaches nothing. Any
other flat group is *failing* (all wrong, or all equally mediocre). With `stage.dynamic_sampling_replaces=failing`
the extra rounds replace only failing groups, and only once the run can tell the two apart (it has seen two different
rewards): a run never rewarded yet samples no extra round, where every round would find the same zero. DAPO's `flat`
replaces solved ones too, from the first step.
"""

from __future__ import annotations

import torch


def signal(flat: torch.Tensor, group_size: int) -> torch.Tensor:
    """[groups] bool: the group's rewards differ (`flat` [N]: the row's group has none)."""
    return ~flat.view(-1, group_size)[:, 0]


def fill(has_signal: torch.Tensor, target: int) -> torch.Tensor:
    """Indices of `target` groups among `has_signal` [groups] (the rounds' groups in sampling order): those with
    signal first, then flat ones, each in sampling order."""
    order = torch.cat([torch.nonzero(has_signal).flatten(), torch.nonzero(~has_signal).flatten()])
    return order[:target]


def rows_of(groups: torch.Tensor, group_size: int) -> torch.Tensor:
    """The row indices of whole groups (group g: rows g*G .. g*G+G-1), in the groups' order."""
    return (groups[:, None] * group_size + torch.arange(group_size)).flatten()


def seen_range(seen: tuple[float, float] | None, total: torch.Tensor, valid: torch.Tensor) -> tuple[float, float] | None:
    """The lowest and highest valid reward seen so far, `seen` widened by one round's rewards (None: none yet)."""
    if not valid.any():
        return seen
    lo, hi = float(total[valid].min()), float(total[valid].max())
    return (lo, hi) if seen is None else (min(seen[0], lo), max(seen[1], hi))


def can_tell(seen: tuple[float, float] | None) -> bool:
    """The run has seen two different rewards, so a flat group can be told solved or failing."""
    return seen is not None and seen[1] > seen[0]


def solved(flat: torch.Tensor, total: torch.Tensor, valid: torch.Tensor, group_size: int,
           seen: tuple[float, float] | None) -> torch.Tensor:
    """[groups] bool: the group is flat at the best reward seen (`seen`: the run's lowest and highest); none while
    the run has seen fewer than two different rewards (a flat group then may be all wrong or all right)."""
    groups = len(flat) // group_size
    if not can_tell(seen):
        return torch.zeros(groups, dtype=torch.bool)
    best = torch.where(valid, total.float(), torch.full_like(total, -torch.inf, dtype=torch.float)).view(groups, -1)
    tolerance = 1e-6 * max(1.0, abs(seen[1]))
    return signal(flat, group_size).logical_not() & (best.amax(1) >= seen[1] - tolerance)
