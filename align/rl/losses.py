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


RATIO_LEVELS = ("token", "sequence")
POLICY_LOSSES = ("clip", "cispo")


def log_ratios(logprobs, old_logprobs, mask, level: str = "token") -> torch.Tensor:
    """log(pi / pi_old) per token. `sequence`: GSPO's (Zheng et al. 2025) length-normalised sequence ratio, the mean
    of the answer's token log-ratios, as the value of each of its tokens, each token's gradient its own log-prob's
    (GSPO-token: with one advantage per answer, the same update as GSPO's)."""
    log_ratio = logprobs - old_logprobs
    if level == "token":
        return log_ratio
    if level != "sequence":
        raise ValueError(f"stage.ratio_level must be one of {', '.join(RATIO_LEVELS)}, got {level!r}")
    per_answer = masked_mean(log_ratio, mask, dim=1).detach()
    return per_answer[:, None] + logprobs - logprobs.detach()


def clipped_surrogate(logprobs, old_logprobs, advantages, mask, clip_low: float, clip_high: float,
                      how: str = "token_mean", norm_length: int | None = None, denominator=None, weights=None,
                      level: str = "token", kind: str = "clip"):
    """The policy loss per token, aggregated; returns (loss, stats).

    clip: -min(ratio * A, clip(ratio, 1 - clip_low, 1 + clip_high) * A), PPO's; clip_high > clip_low is DAPO's
    clip-higher (Yu et al. 2025). cispo: -sg(clip(ratio, 1 - clip_low, 1 + clip_high)) * A * log pi (MiniMax-M1's
    CISPO): the ratio is clipped as a weight and every token keeps its gradient. `level`: the ratio of each token,
    or of its answer (log_ratios). `weights` (no gradient) multiply each token's term: the importance weights of a
    rollout another engine sampled (rl/mismatch.py)."""
    log_ratio = log_ratios(logprobs, old_logprobs, mask, level)
    ratio = torch.exp(log_ratio)
    bounded = torch.clamp(ratio, 1.0 - clip_low, 1.0 + clip_high)
    if kind == "clip":
        unclipped, clipped = -advantages * ratio, -advantages * bounded
        per_token = torch.maximum(unclipped, clipped)
        was_clipped = clipped > unclipped
    elif kind == "cispo":
        per_token = -advantages * bounded.detach() * logprobs
        was_clipped = bounded != ratio
    else:
        raise ValueError(f"stage.policy_loss must be one of {', '.join(POLICY_LOSSES)}, got {kind!r}")
    if weights is not None:
        per_token = per_token * weights.detach()
    loss = aggregate(per_token, mask, how, norm_length, denominator)
    with torch.no_grad():
        stats = {
            "policy/clipfrac": masked_mean(was_clipped.float(), mask),
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
