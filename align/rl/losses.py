"""PPO's clipped policy and value losses, with the statistics worth logging."""

from __future__ import annotations

import torch

from align.rl.masked import masked_mean, masked_var


def policy_loss(logprobs, old_logprobs, advantages, mask, clip_range: float):
    """-min(ratio * A, clip(ratio, 1 ± eps) * A) over response tokens; returns (loss, stats)."""
    log_ratio = logprobs - old_logprobs
    ratio = torch.exp(log_ratio)
    unclipped = -advantages * ratio
    clipped = -advantages * torch.clamp(ratio, 1.0 - clip_range, 1.0 + clip_range)
    loss = masked_mean(torch.maximum(unclipped, clipped), mask)
    with torch.no_grad():
        stats = {
            "policy/clipfrac": masked_mean((clipped > unclipped).float(), mask),
            "policy/approx_kl": masked_mean(0.5 * log_ratio**2, mask),
            "policy/ratio_mean": masked_mean(ratio, mask),
        }
    return loss, stats


def value_loss(values, old_values, returns, mask, clip_range_value: float):
    """0.5 * max((V - R)^2, (V_clipped - R)^2), V_clipped within ± clip of the rollout's values."""
    clipped_values = old_values + torch.clamp(values - old_values, -clip_range_value, clip_range_value)
    unclipped_err = (values - returns) ** 2
    clipped_err = (clipped_values - returns) ** 2
    loss = 0.5 * masked_mean(torch.maximum(unclipped_err, clipped_err), mask)
    with torch.no_grad():
        stats = {"value/clipfrac": masked_mean((clipped_err > unclipped_err).float(), mask)}
    return loss, stats


def explained_variance(values, returns, mask) -> torch.Tensor:
    """1 - Var(R - V) / Var(R): 1 is a perfect critic, 0 no better than a constant."""
    var_returns = masked_var(returns, mask)
    return 1.0 - masked_var(returns - values, mask) / var_returns.clamp(min=1e-8)


def entropy_from_logprobs(logp: torch.Tensor) -> torch.Tensor:
    """Entropy of each distribution given its log-probabilities over the last dimension."""
    return -(logp.exp() * logp).sum(-1)


def entropy_from_logits(logits: torch.Tensor) -> torch.Tensor:
    return entropy_from_logprobs(torch.log_softmax(logits.float(), dim=-1))
