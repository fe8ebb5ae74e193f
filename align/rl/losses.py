"""PPO's clipped policy and value losses, with the statistics worth logging."""

from __future__ import annotations

import torch

from align.rl.masked import masked_mean, masked_var

AGGREGATIONS = ("token_mean", "seq_mean", "seq_sum")


def aggregate(x: torch.Tensor, mask: torch.Tensor, how: str = "token_mean", norm_length: int | None = None,
              denominator: float | torch.Tensor | None = None):
    """One number from per-token values: token_mean (every token weighs the same), seq_mean (mean over each
    response's tokens, then over responses) or seq_sum (each response's sum divided by the constant `norm_length`,
    Dr. GRPO: no length normalisation, then over responses). Rows whose mask is all zero (answers left out) count
    in no denominator. `denominator`: the tokens (token_mean) or responses (seq_*) to divide by instead of this
    batch's own, so that the micro-batches of one optimizer step are normalised by the step's kept tokens or
    answers (window_denominators) and a micro-batch holding one answer weighs no more than that answer."""
    maskf = mask.to(x.dtype)
    if how == "token_mean":
        total = (x * maskf).sum()
    elif how == "seq_mean":
        total = masked_mean(x, mask, dim=1).sum()
    elif how == "seq_sum":
        if not norm_length:
            raise ValueError("seq_sum aggregation needs norm_length (the longest response allowed)")
        total = (x * maskf).sum() / norm_length
    else:
        raise ValueError(f"stage.loss_agg must be one of {', '.join(AGGREGATIONS)}, got {how!r}")
    if denominator is None:
        denominator = aggregation_count(mask, how).to(x.dtype).clamp(min=1)
    return total / denominator


def aggregation_count(mask: torch.Tensor, how: str) -> torch.Tensor:
    """What `aggregate` divides by for `mask`: its tokens (token_mean) or its non-empty rows (seq_mean, seq_sum)."""
    maskf = mask.float()
    return maskf.sum() if how == "token_mean" else (maskf.sum(dim=1) > 0).sum().float()


def clipped_surrogate(logprobs, old_logprobs, advantages, mask, clip_low: float, clip_high: float,
                      how: str = "token_mean", norm_length: int | None = None, denominator=None, weights=None):
    """-min(ratio * A, clip(ratio, 1 - clip_low, 1 + clip_high) * A) per token, aggregated; returns (loss, stats).
    clip_high > clip_low is DAPO's clip-higher (Yu et al. 2025). `weights` (no gradient) multiply each token's
    term: the importance weights of a rollout another engine sampled (rl/mismatch.py)."""
    log_ratio = logprobs - old_logprobs
    ratio = torch.exp(log_ratio)
    unclipped = -advantages * ratio
    clipped = -advantages * torch.clamp(ratio, 1.0 - clip_low, 1.0 + clip_high)
    per_token = torch.maximum(unclipped, clipped)
    if weights is not None:
        per_token = per_token * weights.detach()
    loss = aggregate(per_token, mask, how, norm_length, denominator)
    with torch.no_grad():
        stats = {
            "policy/clipfrac": masked_mean((clipped > unclipped).float(), mask),
            "policy/approx_kl": masked_mean(0.5 * log_ratio**2, mask),
            "policy/ratio_mean": masked_mean(ratio, mask),
        }
    return loss, stats


def policy_loss(logprobs, old_logprobs, advantages, mask, clip_range: float, weights=None):
    """PPO's clipped policy loss, symmetric clip, mean over the batch's response tokens."""
    return clipped_surrogate(logprobs, old_logprobs, advantages, mask, clip_range, clip_range, weights=weights)


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
