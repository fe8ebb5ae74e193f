"""The eval stage's numbers as pure functions of scores and log-probs (unit-tested by hand)."""

from __future__ import annotations

import math

import torch

IGNORE_INDEX = -100


def token_nll(logits: torch.Tensor, labels: torch.Tensor) -> tuple[float, int]:
    """(summed negative log-likelihood, number of scored tokens) of `labels` under next-token `logits`
    ([B, T, V] and [B, T]; label -100 is not scored; position t predicts label t+1)."""
    logp = torch.log_softmax(logits[:, :-1].float(), dim=-1)
    return labelled_nll(logp.gather(-1, labels[:, 1:].clamp(min=0).unsqueeze(-1)).squeeze(-1), labels)


def labelled_nll(picked: torch.Tensor, labels: torch.Tensor) -> tuple[float, int]:
    """token_nll from `picked` ([B, T-1]: the log-prob of labels[:, 1:] at each position, however computed:
    the eval stage does it by chunks, rl/logprobs.py)."""
    keep = labels[:, 1:] != IGNORE_INDEX
    if not keep.any():
        return 0.0, 0
    return float(-(picked * keep).sum()), int(keep.sum())


def perplexity(nll_sum: float, tokens: int) -> float:
    """exp(mean NLL per token); nan without tokens."""
    return math.exp(nll_sum / tokens) if tokens else float("nan")


def win_rate(scores: torch.Tensor, baseline_scores: torch.Tensor) -> float:
    """Share of prompts where the policy's answer scores above the baseline's; a tie counts half."""
    if scores.shape != baseline_scores.shape or scores.numel() == 0:
        raise ValueError(f"win_rate needs two equal, non-empty score vectors, got {tuple(scores.shape)} and "
                         f"{tuple(baseline_scores.shape)}")
    wins = (scores > baseline_scores).float() + 0.5 * (scores == baseline_scores).float()
    return float(wins.mean())


def sequence_kl(logp: torch.Tensor, ref_logp: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Per response: sum over its tokens of log p - log q. On responses sampled from p its mean is an
    unbiased estimate of KL(p || q) per response."""
    return ((logp - ref_logp) * mask).sum(-1)


def pair_accuracy(chosen: torch.Tensor, rejected: torch.Tensor) -> float:
    """Share of pairs the judge scores chosen above rejected (ties count as wrong, as in training)."""
    return float((chosen > rejected).float().mean()) if chosen.numel() else float("nan")
