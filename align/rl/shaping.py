"""From sampled responses to per-token rewards: where each response ends, the shaped score, the KL term."""

from __future__ import annotations

import torch

from align.rl.kl import kl_per_token


def response_mask(responses: torch.Tensor, stop_ids: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """(mask, ended): mask is 1 up to and including the first stop token, 0 after; `ended` says
    whether a stop token appeared at all (else the response ran out of max_new_tokens)."""
    is_stop = torch.zeros_like(responses, dtype=torch.bool)
    for token in stop_ids:
        is_stop |= responses == token
    ended = is_stop.any(dim=1)
    # stops seen strictly before position t
    before = torch.cumsum(is_stop.long(), dim=1) - is_stop.long()
    mask = (before == 0).long()
    return mask, ended


def last_index(mask: torch.Tensor) -> torch.Tensor:
    """Index of the last 1 in each row (0 for an empty row)."""
    return (mask.sum(dim=1) - 1).clamp(min=0)


def shape_scores(scores: torch.Tensor, ended: torch.Tensor, *, mean: float | None = None, std: float | None = None,
                 clip: float | None = None, missing_eos_penalty: float | None = None) -> torch.Tensor:
    """Normalise with the reward model's mean/std, clip to ±clip, then subtract the missing-EOS penalty."""
    out = scores.float()
    if mean is not None and std is not None:
        out = (out - mean) / max(std, 1e-8)
    if clip is not None:
        out = out.clamp(-clip, clip)
    if missing_eos_penalty is not None:
        out = torch.where(ended, out, out - missing_eos_penalty)
    return out


def token_rewards(scores, logprobs, ref_logprobs, mask, kl_coef: float, estimator: str = "k1"):
    """Per-token rewards: -kl_coef * KL at every response token, plus the score at the last one.
    Returns (rewards, kl) with both zero past the end of each response."""
    mask_f = mask.to(logprobs.dtype)
    kl = kl_per_token(logprobs, ref_logprobs, estimator) * mask_f
    rewards = -kl_coef * kl
    rows = torch.arange(rewards.shape[0], device=rewards.device)
    rewards[rows, last_index(mask)] += scores.to(rewards.dtype)
    return rewards * mask_f, kl
