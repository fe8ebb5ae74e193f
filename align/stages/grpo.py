"""stage=grpo: critic-free online RL with verifiable (or learned) rewards, on PPO's engine.

Each step: `stage.rollout_batch_size` prompts per rank, each answered `stage.group_size` times by the policy
-> every response scored by the reward group (reward=checker by default: the data's task checker) -> DAPO's
overlong penalty and the missing-EOS penalty -> one advantage per response from its group (stage.advantage:
grpo, dr_grpo, rloo, reinforce_pp; align/rl/advantages.py) -> groups whose rewards are all equal left out
(counted) -> `stage.ppo_epochs` passes of the clipped surrogate (clip_low / clip_high) over micro-batches,
aggregated per stage.loss_agg, with beta * KL(policy || reference) in the loss or in the reward.

Models: the policy and its frozen reference from the run's sft (with LoRA the reference is the policy with
its adapter off); with stage.beta=0 and full weights no reference is loaded at all. A reward model only
when the reward group uses one. Checkpoints, exact resume, preemption and the non-finite guard are the
online loop's (align/rl/loop.py).
"""

from __future__ import annotations


import logging
import math
import time

import torch
from omegaconf import DictConfig

from align import distributed, handoff, rewards, tracking
from align.config import GRPOStageConfig, grpo_kl_in
from align.data.loader import prompt_datasets
from align.models.loading import (
    cast_trainable,
    describe,
    load_causal_lm,
    load_pretrained,
    load_tokenizer,
    point_adapter_at,
    resolve_name,
    set_use_cache,
)
from align.rl import rollout
from align.rl.advantages import group_advantages, overlong_penalty, token_advantages, zero_variance
from align.rl.engine import Trainable, checkpointing_active, enable_checkpointing, frozen
from align.rl.kl import kl_per_token
from align.rl.loop import (
    OnlineLoop,
    load_reward_model,
    mean_over_ranks,
    on_device_of,
    prompt_items,
    reward_statistics,
)
from align.rl.losses import aggregate, aggregation_count, clipped_surrogate
from align.rl.masked import masked_mean
from align.rl.rewards import shape_scores
from align.stages import StageSpec
from align.stages.common import StageResult, StageRun, numeric_metrics, log_no_parent, print_summary, resolve_lr

log = logging.getLogger("align")


def run(cfg: DictConfig) -> StageResult:
    s = cfg.stage
    stage = StageRun(cfg)
    parent = handoff.find_parent(cfg, "sft", s.init)
    source = str(parent.model) if parent else cfg.model.name_or_path
    if parent is None:
        log_no_parent(cfg, "sft", source)
    uses_rm = "rm" in rewards.components_of(cfg.reward)
    rm_parent = handoff.find_parent(cfg, "rm", cfg.reward.model) if uses_rm else None
    if uses_rm and rm_parent is None:
        raise handoff.HandoffError(f"reward=rm needs a reward model: run `python -m align stage=rm run.name="
                                   f"{cfg.run.name}` first, or pass reward.model=PATH")
    rewards.build(cfg.reward, cfg.data, rm_score=(lambda b: None) if uses_rm else None)  # refuse a bad reward early

    tokenizer = load_tokenizer(resolve_name(source), cfg.model)
    train_ds, eval_ds, report = prompt_datasets(cfg.data, tokenizer, s.max_prompt_length, cfg.train.seed)
    train = prompt_items(train_ds)
    held_out = prompt_items(eval_ds)[: s.eval_prompts] if (eval_ds is not None and s.eval_prompts) else []
    log.info("prompts: %d train, %d eval; %s", len(train), len(held_out), report.errors.summary())

    torch.manual_seed(cfg.train.seed)
    world = distributed.world_size()
    steps = cfg.train.max_steps if cfg.train.max_steps > 0 else max(
        1, math.ceil(cfg.train.epochs * len(train) / (s.rollout_batch_size * world)))
    samples = s.rollout_batch_size * s.group_size
    updates = steps * s.ppo_epochs * (samples // (cfg.train.batch_size * cfg.train.grad_accum))

    policy, reference, peft = _load_policy(cfg, stage, source, updates)
    rm = _load_rm(cfg, stage, rm_parent, tokenizer) if uses_rm else None
    loop = GRPOLoop(cfg, policy, reference, peft, tokenizer, rm)

    stage.prepare_checkpoints()
    stage.start_logging()
    before = None
    if stage.resume_from is None:
        before = loop.evaluate([p for p, _ in held_out], [_eval_item(i) for _, i in held_out]) if held_out else {}
    history = loop.train(train, steps, s.rollout_batch_size, stage.wandb_run, stage.checkpoints, stage.resume_from,
                         before)
    after = loop.evaluate([p for p, _ in held_out], [_eval_item(i) for _, i in held_out]) if held_out else {}

    metrics = {"global_step": steps, "train_runtime_s": loop.train_time, "nonfinite_updates_skipped": loop.skipped,
               "samples_per_s": steps * samples * world / max(loop.train_time, 1e-9)}
    if history:
        metrics.update({f"first_{k}": history[0][k] for k in ("reward/total_mean", "reward/checker")
                        if k in history[0]})
        metrics.update(history[-1])
        metrics["zero_variance_groups_dropped"] = sum(h.get("groups/dropped", 0) for h in history)
        metrics["reward_errors"] = sum(h.get("reward/errors", 0) for h in history)
    metrics.update({f"eval_{k}_before": v for k, v in loop.before.items()})
    metrics.update({f"eval_{k}": v for k, v in after.items()})
    metrics.update(report.metrics())
    metrics = numeric_metrics(metrics)
    parents = [p for p in (parent, rm_parent) if p]
    curves = [{"step": i + 1, **h} for i, h in enumerate(history)]
    return _save_and_commit(stage, loop, tokenizer, parents, parent, metrics, curves)


def _eval_item(item: dict) -> tuple:
    return (item["prompt_text"], item["reference"], item)


def _load_policy(cfg, stage: StageRun, source: str, total_updates: int):
    from omegaconf import OmegaConf
    from transformers import AutoModelForCausalLM

    s, ds = cfg.stage, stage.ds_config
    policy = load_causal_lm(source, cfg.model, cfg.peft)
    if cfg.peft.method == "qlora":
        cast_trainable(policy)
    peft = cfg.peft.method != "none"
    reference = None
    if not peft and s.beta > 0:
        reference = frozen(load_pretrained(AutoModelForCausalLM, source, cfg.model,
                                           OmegaConf.create({"method": "none"})), cfg, ds, s.frozen_device == "cpu")
    if cfg.model.gradient_checkpointing:
        enable_checkpointing(policy)
    policy.eval()  # no dropout: the first pass must reproduce the rollout's log-probs exactly
    log.info("policy from %s: %s; reference: %s", source, describe(policy),
             "the policy with its adapter off" if peft else "a frozen copy" if reference is not None else
             "none (stage.beta=0)")
    return Trainable(policy, lr=resolve_lr(cfg), cfg=cfg, total_steps=total_updates, ds_config=ds), reference, peft


def _load_rm(cfg, stage: StageRun, rm_parent, tokenizer):
    """(model, mean, std) of the reward model, frozen, normalised with its stored statistics."""
    log.info("reward model %s", rm_parent.model)
    return (load_reward_model(cfg, stage.ds_config, rm_parent, tokenizer.pad_token_id),
            *reward_statistics(rm_parent))


class GRPOLoop(OnlineLoop):
    name = "grpo"
    progress_keys = ("reward/total_mean", "groups/zero_variance_share")
    log_keys = ("reward/total_mean", "reward/checker", "reward/rm", "reward/python", "groups/zero_variance_share",
                "objective/kl", "policy/entropy", "policy/clipfrac", "response/length", "time/generation_share")

    def __init__(self, cfg, policy: Trainable, reference, peft: bool, tokenizer, rm=None):
        from align import checkers

        super().__init__(cfg, policy, reference, peft, tokenizer, checkers.from_config(cfg.data))
        self.rm = rm
        self.reward = rewards.build(cfg.reward, cfg.data, rm_score=self.rm_score if rm is not None else None)
        s = self.s
        self.agg = s.loss_agg if s.loss_agg != "auto" else ("seq_sum" if s.advantage == "dr_grpo" else "token_mean")
        self.kl_in = grpo_kl_in(s)

    def frozen_models(self) -> tuple:
        return (*super().frozen_models(), *([self.rm[0]] if self.rm is not None else []))

    @torch.no_grad()
    def rm_score(self, batch) -> torch.Tensor:
        model, mean, std = self.rm
        raw = on_device_of(model, batch, lambda b: rollout.sequence_scores(model, b))
        return shape_scores(raw, batch.ended, mean=mean, std=std)

    def eval_scores(self, batch, responses, items) -> dict:
        if self.rm is None:
            return {}
        return {"reward_mean": self.rm_score(batch)}

    def step(self, prompts: list[tuple[list[int], dict]]) -> dict:
        s, G = self.s, self.s.group_size
        items, n = [item for _, item in prompts for _ in range(G)], len(prompts) * G
        single_update = s.ppo_epochs == 1 and n == self.cfg.train.batch_size * self.cfg.train.grad_accum
        kl_in_reward = s.beta > 0 and self.kl_in == "reward"
        t0 = time.perf_counter()
        with self.rollout_window(), torch.no_grad():  # ZeRO-3: one gather for generation and these passes
            batch = self.sample([ids for ids, _ in prompts for _ in range(G)])
            t_gen = time.perf_counter() - t0
            behaviour = None if single_update and not kl_in_reward else \
                rollout.response_logprobs(self.actor.module, batch, s.temperature)[0]
            ref_logp = self.reference_logprobs(batch, s.temperature) if s.beta > 0 else None
        scored = self.reward(batch, rollout.decode_responses(self.tok, batch), items)
        mask = batch.mask
        total = scored.total.clone()
        lengths = mask.sum(1).cpu()
        total += overlong_penalty(lengths, s.max_new_tokens, s.overlong_buffer, s.overlong_penalty)
        if s.missing_eos_penalty is not None:
            total = torch.where(batch.ended.cpu(), total, total - s.missing_eos_penalty)
        valid = scored.valid
        flat = zero_variance(total, G, valid)
        keep = valid & (~flat if s.drop_zero_variance else torch.ones_like(flat))
        loss_mask = mask * keep.to(mask.device)[:, None].to(mask.dtype)
        with torch.no_grad():
            kl_tokens = kl_per_token(behaviour, ref_logp, "k1") if kl_in_reward else None
            seq_adv = group_advantages(total, G, s.advantage, valid=valid).to(mask.device)
            # whitened (reinforce_pp) over the answers that train, not over the groups left out
            advantages = token_advantages(seq_adv, loss_mask, s.advantage, kl_tokens, s.beta if kl_in_reward else 0)
        old_logp = None if single_update else behaviour  # one update: its live log-probs are the behaviour's

        update: dict[str, list] = {}
        micro, accum = self.cfg.train.batch_size, self.cfg.train.grad_accum
        for _ in range(s.ppo_epochs):
            order = _kept_first(keep, self.gen)
            # each optimizer step (grad_accum micro-batches) divides by its own kept tokens or answers, summed over
            # the ranks: a micro-batch holding one kept answer weighs that answer, not a whole batch
            denominators = window_denominators(loss_mask, order, micro, accum, self.agg)
            for mb_index, start in enumerate(range(0, n, micro)):
                idx = order[start : start + micro].to(mask.device)
                if not bool(keep[idx.cpu()].any()) and self.actor.engine is None:
                    self.actor.step()  # nothing to learn from here: count the micro-step, skip the passes
                    continue
                mb = batch.select(idx)
                denominator = denominators[mb_index // accum]
                with checkpointing_active(self.actor.model):
                    logp, entropy = rollout.response_logprobs(self.actor.model, mb, s.temperature, with_entropy=True)
                old = logp.detach() if old_logp is None else old_logp[idx]
                loss, stats = clipped_surrogate(logp, old, advantages[idx], loss_mask[idx], s.clip_low, s.clip_high,
                                                self.agg, s.max_new_tokens, denominator)
                if ref_logp is not None and self.kl_in == "loss":
                    kl = aggregate(kl_per_token(logp, ref_logp[idx], s.kl_estimator), loss_mask[idx], self.agg,
                                   s.max_new_tokens, denominator)
                    loss = loss + s.beta * kl
                    stats["loss/kl"] = kl.detach()
                if not self.finite_on_all_ranks(loss):
                    # still a micro-step (as a left-out one is): the accumulation windows stay those of this rollout
                    self.actor.backward(zero_loss(logp))
                    self.actor.step()
                    continue
                self.actor.backward(loss)
                self.actor.step()
                stats.update({"loss/policy": loss.detach(), "policy/entropy": masked_mean(entropy.detach(), mb.mask)})
                if ref_logp is not None:  # KL(policy || reference) per response, by the sampled tokens
                    stats["objective/kl"] = ((logp.detach() - ref_logp[idx]) * mb.mask).sum(1).mean()
                for k, v in stats.items():
                    update.setdefault(k, []).append(float(v))
        step_time = time.perf_counter() - t0

        out = {"reward/total_mean": float(scored.total[scored.valid].mean()) if scored.valid.any() else 0.0,
               "reward/std": float(scored.total.std()) if n > 1 else 0.0,
               "reward/shaped_mean": float(total[valid].mean()) if valid.any() else 0.0,
               "reward/errors": float(scored.errors),
               "groups/zero_variance_share": float(flat.view(-1, G)[:, 0].float().mean()),
               "groups/dropped": float((~keep).view(-1, G).all(1).sum()) if s.drop_zero_variance else 0.0,
               "response/length": float(lengths.float().mean()), "response/ended": float(batch.ended.float().mean()),
               "time/generation_share": t_gen / step_time, "time/step_s": step_time,
               "samples/s": n / step_time}
        out.update({f"reward/{k}": float(v.mean()) for k, v in scored.components.items()})
        out.update({k: sum(v) / len(v) for k, v in update.items()})
        out["lr/actor"] = self.actor.lr()
        return mean_over_ranks(out)


def window_denominators(loss_mask: torch.Tensor, order: torch.Tensor, micro: int, accum: int, how: str) -> list:
    """For each optimizer step of one pass (grad_accum micro-batches of `micro` rows, in `order`): what its
    micro-batches' losses divide by, so that the step's gradient is the aggregate over all its kept tokens
    (token_mean) or answers (seq_*), on every rank together. The Trainable divides each micro-batch's loss by
    grad_accum and DeepSpeed averages over the ranks; both are undone here."""
    rows = order.to(loss_mask.device)
    counts = [float(aggregation_count(loss_mask[rows[i : i + micro * accum]], how))
              for i in range(0, len(rows), micro * accum)]
    counts = mean_over_ranks(dict(enumerate(counts)))  # the ranks' mean: undoes DeepSpeed's average of gradients
    return [max(counts[i], 1e-8) / accum for i in range(len(counts))]


def zero_loss(logp: torch.Tensor) -> torch.Tensor:
    """A loss of exactly 0 through the policy's graph (non-finite values masked), for a micro-step that must count
    and keep the ranks' collectives matched but move nothing."""
    return torch.nan_to_num(logp, nan=0.0, posinf=0.0, neginf=0.0).sum() * 0.0


def _kept_first(keep: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """A random order of the responses with every kept one before every left-out one (so whole micro-batches
    of left-out responses are skipped)."""
    order = torch.randperm(len(keep), generator=gen)
    return torch.cat([order[keep[order]], order[~keep[order]]])


def _save_and_commit(stage: StageRun, loop: GRPOLoop, tokenizer, parents, parent, metrics: dict,
                     history: list[dict]) -> StageResult:
    main = tracking.is_main_process()
    state = loop.actor.state_dict_for_save()  # collectives: every rank takes part
    policy = loop.actor.module
    if main:
        if parent is not None:
            point_adapter_at(policy, str(parent.model))
        set_use_cache(policy, True)
        staged = handoff.staging_dir(stage.out)
        policy.save_pretrained(staged, state_dict=state)
        tokenizer.save_pretrained(staged)
        base = parent.info.get("base_model", str(parent.model)) if parent else stage.cfg.model.name_or_path
        stage.commit(staged, parents, base, metrics, history=history, extra={"warnings": loop.warnings})
        print_summary("grpo", metrics, stage.out)
    distributed.barrier()
    return StageResult(stage.out, metrics, policy)


def _parents(cfg) -> list[tuple[str, str | None]]:
    rm = [("rm", cfg.reward.model)] if "rm" in rewards.components_of(cfg.reward) else []
    return [("sft", cfg.stage.init)] + rm


# tiny: 1e-4, not 3e-4 — at 3e-4 the policy drifted into new copy slips on json (Eli -> Fay) and its
# entropy collapsed on them, so no group could fix them (docs/quality.md, "GRPO's learning rate")
SPEC = StageSpec(
    name="grpo", schema=GRPOStageConfig, run=run, parents=_parents,
    lr={"tiny": 1e-4, "full": 1e-6, "adapter": 1e-5}, policy=True, reward=True,
    headline=("first_reward/total_mean", "reward/total_mean", "eval_checker_accuracy_before",
              "eval_checker_accuracy", "eval_greedy_logratio"))
