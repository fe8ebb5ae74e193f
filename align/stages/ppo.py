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
import time
from dataclasses import dataclass

import torch
from omegaconf import DictConfig

from align import envs, rewards
from align.config.registry import Footprint, Held, StageSpec
from align.config.schema import AT_LEAST_ONE, NON_NEGATIVE, POSITIVE, PROBABILITY, keyed, one_of
from align.data.loader import prompt_datasets
from align.data.prompts import prompt_records
from align.models import distributed
from align.models.distributed import mean_over_ranks
from align.models.loading import (
    cast_trainable,
    describe,
    load_causal_lm,
    load_pretrained,
    load_tokenizer,
    resolve_name,
    wrap_peft,
)
from align.rl import rollout
from align.rl.engine import Trainable, checkpointing_active, enable_checkpointing, frozen, frozen_reward_model
from align.rl.gae import gae
from align.rl.kl import ESTIMATORS, kl_controller
from align.rl.loop import OnlineLoop, on_device_of
from align.rl.losses import explained_variance, policy_loss, value_loss
from align.rl.masked import masked_mean, whiten
from align.rl.mismatch import correction
from align.rl.shaping import shape_scores, token_rewards
from align.run import handoff
from align.run.stage_run import StageResult, StageRun
from align.stages import online
from align.stages.common import resolve_lr
from align.stages.online import OnlineStageConfig
from align.tasks import checkers

log = logging.getLogger("align")


@dataclass
class PPOStageConfig(OnlineStageConfig):
    name: str = "ppo"
    actor: str | None = keyed(None, help="actor and reference; default: the run's sft (stage.init is the same)")
    reward: str | None = keyed(None, help="reward model; default: the run's rm")
    critic: str | None = keyed(None, help="critic init (a sequence classifier); default: the reward model")
    critic_peft: str = keyed("auto", one_of("auto", "none", "lora"), "auto: LoRA when peft is lora/qlora")
    critic_lr: float | None = keyed(None, POSITIVE, "critic learning rate (the critic has its own AdamW, so this, not a loss weight, sets how fast it learns); null: train.lr")
    critic_max_grad_norm: float | None = keyed(10.0, NON_NEGATIVE, "gradient clipping norm of the critic (its value-loss gradients run larger than the policy's); null: train.max_grad_norm; 0: none")
    rollout_batch_size: int = keyed(64, AT_LEAST_ONE, "prompts per rank per PPO step")
    # score
    reward_norm: bool = keyed(True, help="(score - mean) / std with the reward model's stored statistics")
    reward_clip: float | None = keyed(10.0, POSITIVE, "clip normalised scores to +-this; null: no clip")
    # KL penalty
    kl_coef: float = keyed(0.2, NON_NEGATIVE, "per-token KL penalty coefficient (initial one when kl_target is set)")
    kl_estimator: str = keyed("k1", one_of(*ESTIMATORS), "per-token KL estimator (in the reward: any)")
    kl_target: float | None = keyed(None, POSITIVE, "set: adaptive coefficient tracking this KL per sequence")
    kl_horizon: int = keyed(10000, AT_LEAST_ONE, "adaptive KL controller horizon")
    # advantages and losses
    gamma: float = keyed(1.0, PROBABILITY, "discount")
    lam: float = keyed(0.95, PROBABILITY, "GAE lambda")
    whiten_rewards: bool = keyed(False, help="whiten per-token rewards before GAE")
    whiten_advantages: bool = keyed(True, help="whiten advantages per batch")
    clip_range: float = keyed(0.2, POSITIVE, "policy ratio clip")
    clip_range_value: float = keyed(0.2, POSITIVE, "value clip")
    ppo_epochs: int = keyed(4, AT_LEAST_ONE, "passes over each rollout batch")
CRITIC_DIR = "critic"
DEFAULT_REWARD = "rm"  # reward.kind=auto: the run's reward model


def run(cfg: DictConfig) -> StageResult:
    s = cfg.stage
    stage = StageRun(cfg)
    actor_parent = handoff.find_parent(cfg, "sft", s.actor or s.init)
    # built once, before any model loads (a bad reward group is refused here); its rm component is bound to the
    # loaded reward model by the loop. reward=rm (ppo's auto) scores with the RM alone: no group.
    group = None if rewards.kind_of(cfg.reward, DEFAULT_REWARD) == "rm" else rewards.build(
        cfg.reward, cfg.data, rm_score=lambda b: None, auto=DEFAULT_REWARD)
    reward_parent = handoff.find_parent(cfg, "rm", s.reward or cfg.reward.model)
    if reward_parent is None:
        raise handoff.HandoffError(
            f"ppo needs a reward model: run `python -m align stage=rm run.name={cfg.run.name}` first, "
            "or pass stage.reward=PATH")
    rewarded = "rm" in rewards.components_of(cfg.reward, DEFAULT_REWARD)  # else the RM only starts the critic
    rm_warnings = rewards.at_chance(reward_parent, "ppo") if rewarded else []
    critic_parent = handoff.find_parent(cfg, "rm", s.critic) if s.critic else reward_parent
    actor_source = str(actor_parent.model) if actor_parent else cfg.model.name_or_path

    tokenizer = load_tokenizer(resolve_name(actor_source), cfg.model)
    train_ds, eval_ds, report = prompt_datasets(cfg.data, tokenizer, s.max_prompt_length, cfg.train.seed)
    train_prompts = prompt_records(train_ds)  # text and reference too: the checker reads the rollouts
    held_out = prompt_records(eval_ds)[: s.eval_prompts]
    log.info("prompts: %d train, %d eval; %s", len(train_prompts), len(held_out), report.errors.summary())

    torch.manual_seed(cfg.train.seed)
    steps = online.steps(cfg, len(train_prompts))
    total_updates = steps * s.ppo_epochs * (s.rollout_batch_size // (cfg.train.batch_size * cfg.train.grad_accum))

    models = _load_models(cfg, stage, actor_source, reward_parent, critic_parent, tokenizer, total_updates)
    norm = rewards.rm_statistics(reward_parent) if s.reward_norm else (None, None)
    loop = PPOLoop(cfg, models, tokenizer, norm, group, checkers.from_config(cfg.data))

    stage.prepare_checkpoints()
    stage.start_logging()
    history, before, after = online.train_and_evaluate(loop, stage, train_prompts, steps, held_out)
    metrics = online.metrics(loop, steps, history, before, after, report, ("reward/score_mean", "objective/kl"))
    parents = [p for p in (actor_parent, reward_parent, critic_parent if s.critic else None) if p]
    trained = {handoff.MODEL_DIR: (models.actor, actor_parent), CRITIC_DIR: (models.critic, critic_parent)}
    extra = {"critic": {"dir": CRITIC_DIR, "task": "seq_cls", "init": str(critic_parent.model)},
             "warnings": rm_warnings + loop.warnings}
    return online.save_and_commit(stage, trained, tokenizer, parents, actor_parent, metrics,
                                  [{"step": i + 1, **h} for i, h in enumerate(history)], extra)


def checks(cfg) -> list[str]:
    """Rules between ppo's keys (align/config/rules.py runs them before anything loads)."""
    s, t, out = cfg.stage, cfg.train, online.rollout_problems(cfg)
    if envs.selected(cfg):
        out.append(f"env={cfg.env.kind}: multi-turn episodes run in stage=grpo (PPO's critic values one answer per "
                   "prompt). Fix: stage=grpo, or env=none")
    mini = t.batch_size * t.grad_accum
    if mini > 0 and s.rollout_batch_size % mini:
        out.append(f"stage.rollout_batch_size={s.rollout_batch_size} must be a multiple of train.batch_size x "
                   f"train.grad_accum = {mini} (one PPO mini-batch); e.g. stage.rollout_batch_size="
                   f"{max(mini, s.rollout_batch_size // mini * mini)}")
    return out


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

    reward = frozen_reward_model(cfg, ds, reward_parent, pad)

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

    def __init__(self, cfg, models: Models, tokenizer, norm, group: rewards.Reward | None, checker=None):
        super().__init__(cfg, models.actor, models.reference, models.peft_actor, tokenizer, checker)
        self.m = models
        self.norm_mean, self.norm_std = norm
        self.kl_ctl = kl_controller(self.s.kl_coef, self.s.kl_target, self.s.kl_horizon)
        # reward=rm (ppo's auto, group None): the RM's raw score, normalised below; any other reward group: its
        # total, with an rm component normalised by the RM's statistics
        self.group = group
        if group is not None:
            group.bind_rm(self.normalised_rm_score)

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
        t0 = time.perf_counter()
        r = self._rollout(prompts, t0)
        update_stats = self._update(r)
        step_time = time.perf_counter() - t0
        stats = {k: float(v) for k, v in r.stats.items()}
        stats.update({k: sum(v) / len(v) for k, v in update_stats.items()})
        stats["value/explained_variance"] = float(explained_variance(r.old_values, r.returns, r.batch.mask))
        stats["time/generation_share"] = r.t_gen / step_time
        stats["time/step_s"] = step_time
        stats["lr/actor"] = self.m.actor.lr()
        stats = mean_over_ranks(stats)
        self.kl_ctl.update(stats["objective/kl"], len(prompts) * distributed.world_size())
        return stats

    def _rollout(self, prompts, t0: float) -> PPORollout:
        """Sample, score (the reward model, or the reward group), and the per-token rewards, advantages, returns."""
        s = self.s
        with self.rollout_window(), torch.no_grad():
            batch = self.sample([p.ids for p in prompts])
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
                group = self.group(batch, rollout.decode_responses(self.tok, batch), prompts)
                raw = torch.where(group.valid, group.total, torch.zeros_like(group.total)).to(batch.mask.device)
                scores = shape_scores(raw, batch.ended, clip=s.reward_clip, missing_eos_penalty=s.missing_eos_penalty)
            rewards, kl = token_rewards(scores, old_logp, ref_logp, batch.mask, self.kl_ctl.value, s.kl_estimator)
            if s.whiten_rewards:
                rewards = whiten(rewards, batch.mask, shift_mean=False)
            advantages, returns = gae(rewards, old_values, batch.mask, s.gamma, s.lam)
            if s.whiten_advantages:
                advantages = whiten(advantages, batch.mask)
        stats = self._rollout_stats(batch, raw, scores, kl, group, prompts)
        is_w, policy_mask = None, batch.mask
        if batch.engine_logp is not None:  # sampled by vLLM: its log-probs against the trainer's
            is_w, inside, mismatch = correction(old_logp, batch.engine_logp, batch.mask, self.cfg.rollout)
            policy_mask = batch.mask * inside[:, None].to(batch.mask.dtype)
            stats.update(online.engine_stats(self.vllm, mismatch))
        return PPORollout(batch, old_logp, old_values, advantages, returns, stats, t_gen, is_w, policy_mask)

    def _rollout_stats(self, batch, raw, scores, kl, group, prompts) -> dict:
        mask = batch.mask
        stats = {
            "reward/score_mean": raw.mean(), "reward/score_std": raw.std() if len(raw) > 1 else torch.tensor(0.0),
            "reward/shaped_mean": scores.mean(), "objective/kl": (kl * mask).sum(1).mean(),
            "objective/kl_coef": self.kl_ctl.value,
            "objective/non_score_reward": (-self.kl_ctl.value * kl * mask).sum(1).mean(),
            "response/length": mask.sum(1).float().mean(), "response/ended": batch.ended.float().mean(),
        }
        if group is not None:
            stats.update({f"reward/{k}": v.mean() for k, v in group.components.items()})
            stats["reward/errors"] = torch.tensor(float(group.errors))
        elif self.checker is not None:  # the over-optimisation watch compares it with the RM's score
            stats["reward/checker"] = checkers.score_each(
                self.checker, [p.text for p in prompts], rollout.decode_responses(self.tok, batch),
                [p.reference for p in prompts]).mean()
        return stats

    def _update(self, r: PPORollout) -> dict[str, list]:
        """stage.ppo_epochs passes over the rollout in mini-batches: the clipped policy loss and the value loss."""
        s, batch, mask = self.s, r.batch, r.batch.mask
        update_stats: dict[str, list] = {}
        n, micro = len(batch.mask), self.cfg.train.batch_size
        for _ in range(s.ppo_epochs):
            order = torch.randperm(n, generator=self.gen)
            for start in range(0, n, micro):
                idx = order[start : start + micro].to(mask.device)
                mb = batch.select(idx)
                with checkpointing_active(self.m.actor.model, self.m.critic.model):
                    logp, entropy = rollout.response_logprobs(self.m.actor.model, mb, s.temperature,
                                                              with_entropy=True)
                    vpred = rollout.values(self.m.critic.model, mb)
                pg_loss, pg_stats = policy_loss(logp, r.old_logp[idx], r.advantages[idx], r.policy_mask[idx],
                                                s.clip_range, None if r.is_weights is None else r.is_weights[idx])
                vf_loss, vf_stats = value_loss(vpred, r.old_values[idx], r.returns[idx], mb.mask, s.clip_range_value)
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
        return update_stats


@dataclass
class PPORollout:
    """One step's rollout: the batch, the behaviour log-probs, the critic's values, advantages and returns, and
    what the step logs of it."""

    batch: rollout.Batch
    old_logp: torch.Tensor  # [B, R]
    old_values: torch.Tensor  # [B, R]
    advantages: torch.Tensor  # [B, R]
    returns: torch.Tensor  # [B, R]
    stats: dict
    t_gen: float  # seconds spent sampling
    is_weights: torch.Tensor | None  # [B, R] importance weights of an engine's rollout (rl/mismatch.py)
    policy_mask: torch.Tensor  # [B, R] the tokens the policy loss reads (seq_mask leaves answers out)


def _parents(cfg) -> list[tuple[str, str | None]]:
    s = cfg.stage
    return [("sft", s.actor or s.init), ("rm", s.reward or cfg.reward.model)] + ([("rm", s.critic)] if s.critic else [])


def footprint(cfg) -> Footprint:
    """Actor and critic train; the reference (full weights only: with LoRA the actor with its adapter off) and the
    reward model are frozen, in CPU memory with stage.frozen_device=cpu; rollouts of rollout_batch_size answers."""
    s = cfg.stage
    cpu = s.frozen_device == "cpu"
    critic = s.critic_peft if s.critic_peft != "auto" else ("lora" if cfg.peft.method != "none" else "none")
    models = (Held("actor", trains=True), Held("critic", trains=True, score_head=True, peft=critic),
              *([Held("reference", on_cpu=cpu)] if cfg.peft.method == "none" else []),
              Held("reward model", score_head=True, on_cpu=cpu))
    return Footprint(models, rollout_sequences=s.rollout_batch_size, rollout_tokens=s.max_prompt_length +
                     s.max_new_tokens, chunked_logits=True, train_tokens=s.max_prompt_length + s.max_new_tokens)


SPEC = StageSpec(
    name="ppo", footprint=footprint, schema=PPOStageConfig, run=run, parents=_parents, checks=checks, default_reward=DEFAULT_REWARD,
    lr={"tiny": 1e-4, "full": 1e-6, "adapter": 1e-5}, policy=True, reads_reward=True, reads_rollout=True,
    headline=("first_reward/score_mean", "reward/score_mean", "objective/kl", "eval_reward_mean_before",
              "eval_reward_mean", "eval_checker_accuracy_before", "eval_checker_accuracy"))
