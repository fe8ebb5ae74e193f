"""Critic-free advantages of the GRPO family, from one scalar reward per sampled response. Responses come
in groups of `group_size` consecutive rows that answer the same prompt.

  grpo          (r - group mean) / (group std + eps)           Shao et al. 2024 (DeepSeekMath)
  dr_grpo       r - group mean  (no std scaling)              Liu et al. 2025 ("Dr. GRPO")
  rloo          r - mean of the other G-1 rewards              Ahmadian et al. 2024
  reinforce_pp  r - group mean, then per-token KL in the reward and whitening over the batch's tokens
                                                              Hu 2025 (REINFORCE++ with a group baseline)
"""

from __future__ import annotations

import torch

from align.rl.masked import whiten

ADVANTAGES = ("grpo", "dr_grpo", "rloo", "reinforce_pp")


def groups(scores: torch.Tensor, group_size: int) -> torch.Tensor:
    if scores.dim() != 1 or scores.numel() % group_size:
        raise ValueError(f"{scores.numel()} rewards do not split into groups of {group_size}")
    return scores.view(-1, group_size)


def group_advantages(scores: torch.Tensor, group_size: int, kind: str, eps: float = 1e-6,
                     valid: torch.Tensor | None = None) -> torch.Tensor:
    """One advantage per response, [N]. The std is the unbiased one (torch's default). `valid` [N] bool: responses
    whose reward failed (False) are left out of their group's mean, std and leave-one-out baseline and get
    advantage 0; a group needs two valid answers to carry any signal."""
    g = groups(scores.float(), group_size)
    ok = torch.ones_like(g, dtype=torch.bool) if valid is None else groups(valid, group_size).bool()
    okf = ok.float()
    n = okf.sum(dim=1, keepdim=True)
    mean = (g * okf).sum(dim=1, keepdim=True) / n.clamp(min=1)
    centred = (g - mean) * okf
    if kind == "grpo":
        if bool(ok.all()):
            std = g.std(dim=1, keepdim=True)
        else:
            std = ((centred**2).sum(dim=1, keepdim=True) / (n - 1).clamp(min=1)).sqrt()
        out = centred / (std + eps)
    elif kind in ("dr_grpo", "reinforce_pp"):
        out = centred
    elif kind == "rloo":
        if group_size < 2:
            raise ValueError("rloo needs stage.group_size >= 2 (the baseline is the other answers' mean)")
        out = centred * n / (n - 1).clamp(min=1)  # = r - (sum of the other valid rewards) / (n - 1)
    else:
        raise ValueError(f"stage.advantage must be one of {', '.join(ADVANTAGES)}, got {kind!r}")
    return torch.where(ok & (n > 1), out, torch.zeros_like(out)).reshape(-1)


def zero_variance(scores: torch.Tensor, group_size: int, valid: torch.Tensor | None = None) -> torch.Tensor:
    """[N] bool: the response belongs to a group whose valid rewards are all equal, or that has fewer than two
    valid rewards (it carries no signal)."""
    g = groups(scores.float(), group_size)
    ok = torch.ones_like(g, dtype=torch.bool) if valid is None else groups(valid, group_size).bool()
    high = torch.where(ok, g, torch.full_like(g, -torch.inf)).amax(dim=1, keepdim=True)
    low = torch.where(ok, g, torch.full_like(g, torch.inf)).amin(dim=1, keepdim=True)
    same = (ok.sum(dim=1, keepdim=True) < 2) | (high == low)
    return same.expand_as(g).reshape(-1)


def overlong_penalty(lengths: torch.Tensor, max_new_tokens: int, buffer: int, factor: float = 1.0) -> torch.Tensor:
    """DAPO's soft overlong punishment (<= 0): nothing up to max_new_tokens - buffer, then falling linearly to
    -factor at max_new_tokens (Yu et al. 2025, eq. 13)."""
    if buffer <= 0:
        return torch.zeros_like(lengths, dtype=torch.float32)
    free = max_new_tokens - buffer
    over = (lengths.float() - free).clamp(min=0)
    return -factor * (over / buffer).clamp(max=1.0)


def token_advantages(seq_advantages: torch.Tensor, mask: torch.Tensor, kind: str, kl: torch.Tensor | None = None,
                     beta: float = 0.0) -> torch.Tensor:
    """[N, T] advantages of every response token. The GRPO kinds give each token its response's advantage;
    reinforce_pp adds -beta * KL at every token and the advantage at the last, sums the rewards to go (gamma 1)
    and whitens over the tokens of `mask`: pass the loss mask (dropped groups' rows zero), so that the advantages
    that train are zero-mean and unit-variance, not those of the rows left out."""
    mask_f = mask.to(torch.float32)
    if kind != "reinforce_pp":
        return seq_advantages.float()[:, None] * mask_f
    rewards = torch.zeros_like(mask_f)
    if kl is not None and beta:
        rewards = rewards - beta * kl.float() * mask_f
    last = (mask.sum(dim=1) - 1).clamp(min=0)
    rewards[torch.arange(rewards.shape[0], device=rewards.device), last] += seq_advantages.float()
    to_go = rewards.flip(1).cumsum(1).flip(1) * mask_f
    return whiten(to_go, mask)
