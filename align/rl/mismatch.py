"""The engine that sampled a rollout (vLLM) and the trainer compute the same token's log-prob with different
kernels, so the policy that sampled is not exactly the one being trained. What that gap is (logged every step)
and how the update corrects for it: truncated importance sampling per token, or a per-sequence mask of the
answers whose whole-sequence ratio runs past a bound. Pure tensor functions."""

from __future__ import annotations

import math

import torch

from align.config.schema import IS_CORRECTIONS
from align.rl.masked import masked_mean


def mismatch_stats(train_logp: torch.Tensor, engine_logp: torch.Tensor, mask: torch.Tensor) -> dict[str, float]:
    """How far the trainer's log-probs of the sampled tokens are from the engine's: the token ratio
    pi_train / pi_engine (mean, min, max over the response tokens) and KL(engine || trainer) per token, estimated
    from the engine's own samples by k3 (r - 1 - log r, r = pi_train / pi_engine: unbiased and never negative)."""
    m = mask.bool()
    if not m.any():
        return {}
    log_ratio = (train_logp - engine_logp).float()
    ratio = torch.exp(log_ratio)
    k3 = ratio - 1.0 - log_ratio
    return {"mismatch/ratio_mean": float(masked_mean(ratio, mask)),
            "mismatch/ratio_min": float(ratio[m].min()),
            "mismatch/ratio_max": float(ratio[m].max()),
            "mismatch/kl": float(masked_mean(k3, mask)),
            "mismatch/abs_logp_diff_max": float(log_ratio[m].abs().max())}


def is_weights(train_logp: torch.Tensor, engine_logp: torch.Tensor, mask: torch.Tensor, how: str,
               token_cap: float, seq_bound: float) -> torch.Tensor | None:
    """Per-token weights [B, R] that multiply the policy loss so the update follows the trainer's policy although
    the engine sampled (None: no correction).
    - token_tis: min(pi_train / pi_engine, token_cap) per token (truncated importance sampling);
    - seq_mask: the sequence's ratio prod(pi_train / pi_engine) on every token of the answer when it lies within
      [1 / seq_bound, seq_bound], and 0 (the answer left out of the update) when it runs past the bound.
    Both ratios use the trainer's log-probs at rollout time (the behaviour policy as the trainer computes it)."""
    if how == "none":
        return None
    log_ratio = ((train_logp - engine_logp) * mask).float()
    if how == "token_tis":
        return torch.exp(log_ratio).clamp(max=token_cap) * mask
    if how == "seq_mask":
        seq = log_ratio.sum(dim=1, keepdim=True)
        inside = seq.abs() <= math.log(seq_bound)
        return torch.where(inside, torch.exp(seq.clamp(max=math.log(seq_bound))), torch.zeros_like(seq)) * mask
    raise ValueError(f"rollout.is_correction must be one of {', '.join(IS_CORRECTIONS)}, got {how!r}")


def correction(train_logp: torch.Tensor, engine_logp: torch.Tensor, mask: torch.Tensor, rollout_cfg):
    """(per-token weights or None, answers kept [B], stats) for one rollout sampled by an engine: the weights
    multiply the policy loss (rollout.is_correction), the answers seq_mask leaves out are dropped from the update's
    mask (and so from its denominators), the stats log the mismatch."""
    how = rollout_cfg.is_correction
    weights = is_weights(train_logp, engine_logp, mask, how, rollout_cfg.is_token_cap, rollout_cfg.is_seq_bound)
    rows = mask.sum(1) > 0
    kept = torch.ones_like(rows) if how != "seq_mask" else (weights.abs().sum(1) > 0) | ~rows
    stats = mismatch_stats(train_logp, engine_logp, mask)
    # the share of answers (with tokens) that seq_mask left out
    stats["mismatch/masked_share"] = float((~kept & rows).float().sum() / rows.float().sum().clamp(min=1))
    return weights, kept, stats
