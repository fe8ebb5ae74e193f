"""Reference-free preference losses (SimPO, ORPO) as pure tensor functions of the policy's per-token log-probs.

Both score an answer by its mean per-token log-probability (length-normalised), so no frozen reference model is
needed. Rows come as TRL's preference batches do: the first half chosen answers, the second half rejected.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

REFERENCE_FREE = ("simpo", "orpo")


def answer_logps(per_token_logps: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(summed, mean) log-probability of each row's answer: `per_token_logps` [N, T] already aligned with `mask`
    [N, T] (1 on answer tokens)."""
    summed = (per_token_logps * mask).sum(-1)
    return summed, summed / mask.sum(-1).clamp(min=1)


def simpo(chosen: torch.Tensor, rejected: torch.Tensor, beta: float, gamma: float) -> torch.Tensor:
    """SimPO per pair: -log sigmoid(beta * (mean logp chosen - mean logp rejected) - gamma); gamma is the target
    margin in reward units."""
    return -F.logsigmoid(beta * (chosen - rejected) - gamma)


def log1mexp(x: torch.Tensor) -> torch.Tensor:
    """log(1 - exp(x)) for x < 0, accurate near 0 and far below it (x is clamped just below 0: a probability of
    exactly 1 has infinite odds)."""
    x = x.clamp(max=-1e-6)
    return torch.where(x > -0.6931, torch.log(-torch.expm1(x)), torch.log1p(-torch.exp(x)))


def orpo_log_odds(chosen: torch.Tensor, rejected: torch.Tensor) -> torch.Tensor:
    """log odds(chosen) - log odds(rejected), odds(y) = p / (1 - p) with p = exp(mean per-token logp)."""
    return (chosen - rejected) - (log1mexp(chosen) - log1mexp(rejected))


def orpo(chosen: torch.Tensor, rejected: torch.Tensor, lam: float) -> torch.Tensor:
    """ORPO's odds-ratio term per pair, -lam * log sigmoid(log odds ratio); the NLL on the chosen answers is added
    by the caller (it is a token mean over the batch, not a per-pair value)."""
    return -lam * F.logsigmoid(orpo_log_odds(chosen, rejected))


def chosen_nll(per_token_logps: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean negative log-likelihood over every chosen-answer token in the batch (the first half of the rows)."""
    logps, chosen_mask = per_token_logps.chunk(2)[0], mask.chunk(2)[0]
    return -(logps * chosen_mask).sum() / chosen_mask.sum().clamp(min=1)
