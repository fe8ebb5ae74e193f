"""The KL penalty: per-token estimators and the fixed / adaptive coefficient (Ziegler et al. 2019)."""

from __future__ import annotations

import torch

ESTIMATORS = ("k1", "k2", "k3")


def kl_per_token(logprobs: torch.Tensor, ref_logprobs: torch.Tensor, estimator: str = "k1") -> torch.Tensor:
    """Estimate of KL(policy || reference) at each sampled token (samples come from the policy).

    k1 = log p - log q: unbiased, can be negative per token. k2 = (log p - log q)^2 / 2: biased, never negative.
    k3 = (q/p - 1) - log(q/p): unbiased, never negative, lower variance (Schulman, "Approximating KL
    divergence"). As a term of the loss (GRPO's kl_in=loss) k1 has an expected gradient of zero on the policy's
    own samples, so only k2 and k3 are allowed there; in the reward (PPO, reinforce_pp) any of them."""
    log_ratio = logprobs - ref_logprobs
    if estimator == "k1":
        return log_ratio
    if estimator == "k2":
        return 0.5 * log_ratio**2
    if estimator == "k3":
        return torch.expm1(-log_ratio) + log_ratio
    raise ValueError(f"stage.kl_estimator must be one of {', '.join(ESTIMATORS)}, got {estimator!r}")


class FixedKLController:
    def __init__(self, kl_coef: float):
        self.value = kl_coef

    def update(self, current_kl: float, n_steps: int) -> None:
        pass


class AdaptiveKLController:
    """Move the coefficient so the measured KL tracks `target`: proportional error clipped to ±0.2,
    scaled by n_steps / horizon (Ziegler et al. 2019, section 2.2)."""

    def __init__(self, kl_coef: float, target: float, horizon: int):
        if target <= 0 or horizon <= 0:
            raise ValueError(f"stage.kl_target and stage.kl_horizon must be > 0 (got {target}, {horizon})")
        self.value, self.target, self.horizon = kl_coef, target, horizon

    def update(self, current_kl: float, n_steps: int) -> None:
        error = min(max(current_kl / self.target - 1.0, -0.2), 0.2)
        self.value *= 1.0 + error * n_steps / self.horizon


def kl_controller(kl_coef: float, target: float | None, horizon: int):
    return FixedKLController(kl_coef) if target is None else AdaptiveKLController(kl_coef, target, horizon)
