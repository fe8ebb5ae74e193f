"""DAPO's dynamic sampling as pure functions: which groups of one or more sampling rounds fill a step's batch.

A group carries signal when its valid rewards are not all equal; the step keeps its batch's row count (every rank
trains the same number of micro-batches) and fills it with groups with signal first, in the order they were
sampled, then with flat groups (left out of the update, as without dynamic sampling).
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
