"""Preference pairs from a judge's scores of sampled answers (iterative DPO): per prompt, its best answer against
its worst. Pure tensor functions."""

from __future__ import annotations

import torch


def best_and_worst(scores: torch.Tensor, valid: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """For scores [P, K] (K answers per prompt) and valid [P, K] (False: the judge failed on that answer): the index
    of each prompt's best answer, of its worst, and whether the prompt gives a pair. A prompt gives none when its
    valid answers all score the same (a tie: no preference) or fewer than two are valid. Among equal scores the
    first sampled answer is taken."""
    if scores.shape != valid.shape or scores.dim() != 2:
        raise ValueError(f"scores {tuple(scores.shape)} and valid {tuple(valid.shape)} must both be [prompts, answers]")
    scores = scores.float()
    high = scores.masked_fill(~valid, float("-inf"))
    low = scores.masked_fill(~valid, float("inf"))
    best, worst = high.argmax(dim=1), low.argmin(dim=1)  # argmax/argmin return the first of equal values
    rows = torch.arange(scores.shape[0])
    keep = (valid.sum(dim=1) >= 2) & (high[rows, best] > low[rows, worst])
    return best, worst, keep
