"""PPO with a per-token KL penalty: align's own actor-critic loop (TRL 1.16 ships no PPO trainer).

Each step: sample a response per prompt with the actor -> score it with the reward model (normalised
with the RM's stored mean/std, clipped, minus a penalty when no EOS came) -> per-token rewards
-kl_coef * KL(actor || reference) plus the score on the last token -> GAE advantages and returns from
the critic's values -> `stage.ppo_epochs` passes of clipped policy and value losses over
mini-batches. The math lives in align/rl/ as pure tensor functions.

Models: actor and frozen reference from the run's sft (with LoRA the reference is the actor with
its adapter off: one base copy in memory), reward model from the run's rm, critic initialised from
the reward model (its score head becomes the value head).
"""

from __future__ import annotations


import logging
import math
import time

import torch
from omegaconf import DictConfig

from align import checkers, distributed, handoff, rewards, tracking
from align.config import PPOStageConfig
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
    wrap_peft,
)
from align.rl import rollout
from align.rl.engine import Trainable, checkpointing_active, enable_checkpointing, frozen
from align.rl.loop import (
    OnlineLoop,
    load_reward_model,
    mean_over_ranks,
    on_device_of,
    prompt_items,
    reward_statistics,
    rollout_checker,
)
from align.rl.gae import gae
from align.rl.kl import ESTIMATORS, kl_controller
from align.rl.losses import explained_variance, policy_loss, value_loss
from align.rl.masked import masked_mean, whiten
from align.rl.rewards import shape_scores, token_rewards
from align.stages import StageSpec
from align.stages.common import StageResult, StageRun, numeric_metrics, print_summary, resolve_lr

log = logging.getLogger("align")
CRITIC_DIR = "critic"


def run(cfg: DictConfig) -> StageResult:
    s = cfg.stage
    _validate(cfg)
    stage = StageRun(cfg)
    actor_parent = handoff.find_parent(cfg, "sft", s.actor or s.init)
    rewards.build(cfg.reward, cfg.data, rm_score=lambda b: None, stage="ppo")  # refuse a bad reward group early
    reward_parent = handoff.find_parent(cfg, "rm", s.reward or cfg.reward.model)
    if reward_parent is None:
        raise handoff.HandoffError(
            f"ppo needs a reward model: run `python -m align stage=rm run.name={cfg.run.name}` first, "
            "or pass stage.reward=PATH")
    critic_parent = handoff.find_parent(cfg, "rm", s.critic) if s.critic else reward_parent
    actor_source = str(actor_parent.model) if actor_parent else cfg.model.name_or_path

    tokenizer = load_tokenizer(resolve_name(actor_source), cfg.model)
    train_ds, eval_ds, report = prompt_datasets(cfg.data, tokenizer, s.max_prompt_length, cfg.train.seed)
    train_prompts = prompt_items(train_ds)  # (ids, prompt_text/reference): the checker reads the rollouts too
    n_eval = s.eval_prompts if (eval_ds is not None and s.eval_prompts) else 0
    eval_prompts = list(eval_ds["prompt_ids"])[:n_eval] if n_eval else []
    eval_texts = list(zip(eval_ds["prompt_text"], eval_ds["reference"]))[:n_eval] if n_eval else []
    log.info("prompts: %d train, %d eval; %s", len(train_prompts), len(eval_prompts), report.errors.summary())

    torch.manual_seed(cfg.train.seed)
    world = distributed.world_size()
    steps = cfg.train.max_steps if cfg.train.max_steps > 0 else max(
        1, math.ceil(cfg.train.epochs * len(train_prompts) / (s.rollout_batch_size * world)))
    updates_per_step = s.ppo_epochs * (s.rollout_batch_size // (cfg.train.batch_size * cfg.train.grad_accum))
    total_updates = steps * updates_per_step

    models = _load_models(cfg, stage, actor_source, reward_parent, critic_parent, tokenizer, total_updates)
    norm = reward_statistics(reward_parent) if s.reward_norm else (None, None)
    loop = PPOLoop(cfg, models, tokenizer, norm, checkers.from_config(cfg.data))

    stage.prepare_checkpoints()
    stage.start_logging()
    before = None
    if stage.resume_from is None:
        before = loop.evaluate(eval_prompts, eval_texts) if eval_prompts else {}
    history = loop.train(train_prompts, steps, s.rollout_batch_size, stage.wandb_run, stage.checkpoints,
                         stage.resume_from, before)
    before = loop.before  # restored from the checkpoint when resuming
    after = loop.evaluate(eval_prompts, eval_texts) if eval_prompts else {}

    metrics = {"global_step": steps, "train_runtime_s": loop.train_time, "nonfinite_updates_skipped": loop.skipped}
    if history:
        first, last = history[0], history[-1]
        metrics.update({f"first_{k}": first[k] for k in ("reward/score_mean", "objective/kl") if k in first})
        metrics.update({k: last[k] for k in last})
    metrics.update({f"eval_{k}_before": v for k, v in before.items()})
    metrics.update({f"eval_{k}": v for k, v in after.items()})
    metrics.update(report.metrics())
    metrics = numeric_metrics(metrics)
    parents = [p for p in (actor_parent, reward_parent, critic_parent if s.critic else None) if p]
    curves = [{"step": i + 1, **h} for i, h in enumerate(history)]
    return _save_and_commit(stage, models, tokenizer, parents, actor_parent, critic_parent, metrics, curves,
                            loop.warnings)


def _validate(cfg) -> None:
    s, t = cfg.stage, cfg.train
    mini = t.batch_size * t.grad_accum
    if s.rollout_batch_size % mini:
        raise ValueError(f"stage.rollout_batch_size={s.rollout_batch_size} must be a multiple of train.batch_size x "
                         f"train.grad_accum = {mini} (one PPO mini-batch)")
    if s.kl_estimator not in ESTIMATORS:
        raise ValueError(f"stage.kl_estimator must be one of {', '.join(ESTIMATORS)}, got {s.kl_estimator!r}")
    if s.critic_peft not in ("auto", "none", "lora"):
        raise ValueError(f"stage.critic_peft must be auto, none or lora, got {s.critic_peft!r}")
    if s.temperature <= 0:
        raise ValueError("stage.temperature must be > 0")


class Models:
    def __init__(self, actor: Trainable, critic: Trainable, reference, reward, peft_actor: bool):
        self.actor, self.critic, self.reference, self.reward, self.peft_actor = actor, critic, reference, reward, peft_actor


def _load_models(cfg, stage: StageRun, actor_source, reward_parent, critic_parent, tokenizer, total_updates) -> Models:
    from omegaconf import OmegaConf
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    s, ds = cfg.stage, stage.ds_config
    none = OmegaConf.create({"method": "none"})
    pad = tokenizer.pad_token_id

    actor = load_causal_lm(actor_source, cfg.model, cfg.peft)
    if cfg.peft.method == "qlora":
        cast_trainable(actor)
    peft_actor = cfg.peft.method != "none"
    reference = None
    on_cpu = s.frozen_device == "cpu"
    if not peft_actor:
        reference = frozen(load_pretrained(AutoModelForCausalLM, actor_source, cfg.model, none), cfg, ds, on_cpu)

    reward = load_reward_model(cfg, ds, reward_parent, pad)

    critic = load_pretrained(AutoModelForSequenceClassification, str(critic_parent.model), cfg.model, none,
                             num_labels=1)
    critic.config.pad_token_id = pad
    critic_peft = s.critic_peft if s.critic_peft != "auto" else ("lora" if peft_actor else "none")
    if critic_peft == "lora":
        critic = wrap_peft(critic, OmegaConf.merge(cfg.peft, {"method": "lora"}), cfg.model, task_type="SEQ_CLS",
                           modules_to_save=["score"])
    for m in (actor, critic):
        if cfg.model.gradient_checkpointing:
            enable_checkpointing(m)
        m.eval()  # no dropout anywhere: the first PPO pass must reproduce the rollout's log-probs exactly
    log.info("actor from %s: %s; reference: %s", actor_source, describe(actor),
             "the actor with its adapter off" if peft_actor else "a frozen copy")
    log.info("reward model %s; critic from %s (%s): %s", reward_parent.model, critic_parent.model, critic_peft,
             describe(critic))

    lr = resolve_lr(cfg)
    actor_t = Trainable(actor, lr=lr, cfg=cfg, total_steps=total_updates, ds_config=ds)
    critic_t = Trainable(critic, lr=s.critic_lr or lr, cfg=cfg, total_steps=total_updates, ds_config=ds,
                         max_grad_norm=s.critic_max_grad_norm)
    return Models(actor_t, critic_t, reference, reward, peft_actor)


class PPOLoop(OnlineLoop):
    name = "ppo"
    progress_keys = ("reward/score_mean", "objective/kl")
    log_keys = ("reward/score_mean", "objective/kl", "objective/kl_coef", "policy/entropy", "policy/clipfrac",
                "loss/value", "value/explained_variance", "response/length", "time/generation_share")

    def __init__(self, cfg, models: Models, tokenizer, norm, checker=None):
        super().__init__(cfg, models.actor, models.reference, models.peft_actor, tokenizer, checker)
        self.m = models
        self.norm_mean, self.norm_std = norm
        self.kl_ctl = kl_controller(self.s.kl_coef, self.s.kl_target, self.s.kl_horizon)
        # reward=rm (ppo's auto): the RM's raw score, normalised below; any other reward group: its total, with an
        # rm component normalised by the RM's statistics
        self.group = None if rewards.kind_of(cfg.reward, "ppo") == "rm" else rewards.build(
            cfg.reward, cfg.data, rm_score=self.normalised_rm_score, stage="ppo")

    @torch.no_grad()
    def normalised_rm_score(self, batch) -> torch.Tensor:
        return shape_scores(self.score(batch), batch.ended, mean=self.norm_mean, std=self.norm_std)

    @property
    def watched(self) -> tuple[str, str]:
        """With reward=rm the RM's raw score is reward/score_mean; a reward group logs it as reward/rm."""
        return ("reward/score_mean", "reward/checker") if self.group is None else super().watched

    def trained(self) -> dict:
        return {"actor": self.m.actor, "critic": self.m.critic}

    def frozen_models(self) -> tuple:
        return (*super().frozen_models(), self.m.reward)

    def extra_state(self) -> dict:
        return {"kl_coef": self.kl_ctl.value}

    def load_extra_state(self, state: dict) -> None:
        self.kl_ctl.value = state["kl_coef"]

    def eval_scores(self, batch, responses, items) -> dict:
        return {"reward_mean": self.score(batch)}

    @torch.no_grad()
    def score(self, batch) -> torch.Tensor:
        return on_device_of(self.m.reward, batch, lambda b: rollout.sequence_scores(self.m.reward, b))

    # --- one PPO step ---------------------------------------------------------------------------
    def step(self, prompts) -> dict:
        s = self.s
        t0 = time.perf_counter()
        with self.rollout_window(), torch.no_grad():
            batch = self.sample([ids for ids, _ in prompts])
            t_gen = time.perf_counter() - t0
            old_logp, _ = rollout.response_logprobs(self.m.actor.module, batch, s.temperature)
            ref_logp = self.reference_logprobs(batch, s.temperature)
        with torch.no_grad():
            old_values = rollout.values(self.m.critic.module, batch)
            group = None
            if self.group is None:
                raw = self.score(batch)
                scores = shape_scores(raw, batch.ended, mean=self.norm_mean, std=self.norm_std, clip=s.reward_clip,
                                      missing_eos_penalty=s.missing_eos_penalty)
            else:  # a failed user function (data.on_error=skip) scores 0 and is counted
                group = self.group(batch, rollout.decode_responses(self.tok, batch), [item for _, item in prompts])
                raw = torch.where(group.valid, group.total, torch.zeros_like(group.total)).to(batch.mask.device)
                scores = shape_scores(raw, batch.ended, clip=s.reward_clip, missing_eos_penalty=s.missing_eos_penalty)
            rewards, kl = token_rewards(scores, old_logp, ref_logp, batch.mask, self.kl_ctl.value, s.kl_estimator)
            if s.whiten_rewards:
                rewards = whiten(rewards, batch.mask, shift_mean=False)
            advantages, returns = gae(rewards, old_values, batch.mask, s.gamma, s.lam)
            if s.whiten_advantages:
                advantages = whiten(advantages, batch.mask)
        mask = batch.mask
        seq_kl = (kl * mask).sum(1).mean()
        rollout_stats = {
            "reward/score_mean": raw.mean(), "reward/score_std": raw.std() if len(raw) > 1 else torch.tensor(0.0),
            "reward/shaped_mean": scores.mean(), "objective/kl": seq_kl, "objective/kl_coef": self.kl_ctl.value,
            "objective/non_score_reward": (-self.kl_ctl.value * kl * mask).sum(1).mean(),
            "response/length": mask.sum(1).float().mean(), "response/ended": batch.ended.float().mean(),
        }
        if group is not None:
            rollout_stats.update({f"reward/{k}": v.mean() for k, v in group.components.items()})
            rollout_stats["reward/errors"] = torch.tensor(float(group.errors))
        elif self.checker is not None:  # the over-optimisation watch compares it with the RM's score
            rollout_stats["reward/checker"] = rollout_checker(
                self.checker, rollout.decode_responses(self.tok, batch), [item for _, item in prompts]).mean()

        update_stats: dict[str, list] = {}
        n, micro = len(prompts), self.cfg.train.batch_size
        for _ in range(s.ppo_epochs):
            order = torch.randperm(n, generator=self.gen)
            for start in range(0, n, micro):
                idx = order[start : start + micro].to(mask.device)
                mb = batch.select(idx)
                with checkpointing_active(self.m.actor.model, self.m.critic.model):
                    logp, entropy = rollout.response_logprobs(self.m.actor.model, mb, s.temperature,
                                                              with_entropy=True)
                    vpred = rollout.values(self.m.critic.model, mb)
                pg_loss, pg_stats = policy_loss(logp, old_logp[idx], advantages[idx], mb.mask, s.clip_range)
                vf_loss, vf_stats = value_loss(vpred, old_values[idx], returns[idx], mb.mask, s.clip_range_value)
                if not self.finite_on_all_ranks(pg_loss, vf_loss):
                    continue  # this mini-batch's update is dropped on every rank
                self.m.actor.backward(pg_loss)
                self.m.actor.step()
                self.m.critic.backward(vf_loss)
                self.m.critic.step()
                for k, v in {"loss/policy": pg_loss.detach(), "loss/value": vf_loss.detach(),
                             "policy/entropy": masked_mean(entropy.detach(), mb.mask), **pg_stats,
                             **vf_stats}.items():
                    update_stats.setdefault(k, []).append(float(v))
        step_time = time.perf_counter() - t0

        stats = {k: float(v) for k, v in rollout_stats.items()}
        stats.update({k: sum(v) / len(v) for k, v in update_stats.items()})
        stats["value/explained_variance"] = float(explained_variance(old_values, returns, mask))
        stats["time/generation_share"] = t_gen / step_time
        stats["time/step_s"] = step_time
        stats["lr/actor"] = self.m.actor.lr()
        stats = mean_over_ranks(stats)
        self.kl_ctl.update(stats["objective/kl"], n * distributed.world_size())
        return stats


def _save_and_commit(stage: StageRun, models: Models, tokenizer, parents, actor_parent, critic_parent,
                     metrics: dict, history: list[dict], warnings: list[dict]) -> StageResult:
    main = tracking.is_main_process()
    actor_sd = models.actor.state_dict_for_save()  # collectives: every rank takes part
    critic_sd = models.critic.state_dict_for_save()
    actor, critic = models.actor.module, models.critic.module
    if main:
        if actor_parent is not None:
            point_adapter_at(actor, str(actor_parent.model))
        point_adapter_at(critic, str(critic_parent.model))
        set_use_cache(actor, True)
        staged = handoff.staging_dir(stage.out)
        actor.save_pretrained(staged, state_dict=actor_sd)
        tokenizer.save_pretrained(staged)
        staged_critic = handoff.staging_dir(stage.out, CRITIC_DIR)
        critic.save_pretrained(staged_critic, state_dict=critic_sd)
        tokenizer.save_pretrained(staged_critic)
        base = actor_parent.info.get("base_model", str(actor_parent.model)) if actor_parent else stage.cfg.model.name_or_path
        stage.commit(staged, parents, base, metrics, extra_dirs={CRITIC_DIR: staged_critic},
                     extra={"critic": {"dir": CRITIC_DIR, "task": "seq_cls", "init": str(critic_parent.model)},
                            "warnings": warnings},
                     history=history)
        print_summary("ppo", metrics, stage.out)
    distributed.barrier()
    return StageResult(stage.out, metrics, actor)


def _parents(cfg) -> list[tuple[str, str | None]]:
    s = cfg.stage
    return [("sft", s.actor or s.init), ("rm", s.reward or cfg.reward.model)] + ([("rm", s.critic)] if s.critic else [])


SPEC = StageSpec(
    name="ppo", schema=PPOStageConfig, run=run, parents=_parents,
    lr={"tiny": 1e-4, "full": 1e-6, "adapter": 1e-5}, policy=True, reward=True,
    headline=("first_reward/score_mean", "reward/score_mean", "objective/kl", "eval_reward_mean_before",
              "eval_reward_mean", "eval_checker_accuracy_before", "eval_checker_accuracy"))
