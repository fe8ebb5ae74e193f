"""stage=grpo: critic-free online RL with verifiable (or learned) rewards, on PPO's engine.

Each step: `stage.rollout_batch_size` prompts per rank, each answered `stage.group_size` times by the policy
-> every response scored by the reward group (reward=checker by default: the data's task checker) -> DAPO's
overlong penalty and the missing-EOS penalty -> one advantage per response from its group (stage.advantage:
grpo, dr_grpo, rloo, reinforce_pp; align/rl/advantages.py) -> groups whose rewards are all equal left out
(counted) -> `stage.ppo_epochs` passes of the policy loss (stage.policy_loss: PPO's clipped surrogate or CISPO's
clipped weight; stage.ratio_level: token ratios or GSPO's sequence ratio) over micro-batches, aggregated per
stage.loss_agg, with beta * KL(policy || reference) in the loss or in the reward.

Models: the policy and its frozen reference from the run's sft (with LoRA the reference is the policy with
its adapter off); with stage.beta=0 and full weights no reference is loaded at all. A reward model only
when the reward group uses one. Checkpoints, exact resume, preemption and the non-finite guard are the
online loop's (align/rl/loop.py).
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass

import torch
from omegaconf import DictConfig

from align import envs, rewards
from align.config.registry import Footprint, Held, StageSpec
from align.config.schema import AT_LEAST_ONE, NON_NEGATIVE, POSITIVE, Check, keyed, one_of
from align.data.loader import prompt_datasets
from align.data.prompts import Prompt, prompt_records
from align.models import distributed
from align.models.distributed import mean_over_ranks
from align.models.loading import (
    cast_trainable,
    describe,
    load_causal_lm,
    load_pretrained,
    load_tokenizer,
    resolve_name,
)
from align.rl import dynamic, rollout, vllm_engine
from align.rl.advantages import ADVANTAGES, group_advantages, overlong_penalty, token_advantages, zero_variance
from align.rl.engine import (
    Trainable,
    checkpointing_active,
    device,
    enable_checkpointing,
    frozen,
)
from align.rl.episodes import EpisodeRunner, Episodes
from align.rl.kl import ESTIMATORS, kl_per_token
from align.rl.loop import OnlineLoop, reward_model_scores
from align.rl.losses import AGGREGATIONS, POLICY_LOSSES, RATIO_LEVELS, aggregate, aggregation_count
from align.rl.losses import clipped_surrogate
from align.rl.masked import masked_mean
from align.rl.mismatch import correction
from align.run import handoff
from align.run.stage_run import StageResult, StageRun
from align.stages import online
from align.stages.common import resolve_lr, start_from
from align.stages.online import OnlineStageConfig

log = logging.getLogger("align")
DEFAULT_REWARD = "checker"  # reward.kind=auto: the data's task checker


@dataclass
class GRPOStageConfig(OnlineStageConfig):
    """Critic-free online RL (GRPO, Dr. GRPO, RLOO, REINFORCE++, DAPO's pieces) on PPO's engine."""

    name: str = "grpo"
    group_size: int = keyed(8, Check(low=2), "responses sampled per prompt (one group)")
    rollout_batch_size: int = keyed(8, AT_LEAST_ONE, "prompts per rank per step (x group_size responses)")
    overlong_buffer: int = keyed(0, NON_NEGATIVE, "DAPO soft overlong penalty over the last N tokens before "
                                                  "max_new_tokens; 0: off")
    overlong_penalty: float = keyed(1.0, NON_NEGATIVE, "the overlong penalty at max_new_tokens")
    # advantages and loss
    advantage: str = keyed("grpo", one_of(*ADVANTAGES),
                           "grpo: group mean/std; dr_grpo: no std, no length normalisation; rloo: leave-one-out; "
                           "reinforce_pp: group mean, per-token KL in the reward, batch-whitened")
    loss_agg: str = keyed("auto", one_of("auto", *AGGREGATIONS),
                          "auto: seq_sum (sum / max_new_tokens) for dr_grpo, seq_mean with ratio_level=sequence, "
                          "token_mean otherwise")
    policy_loss: str = keyed("clip", one_of(*POLICY_LOSSES),
                             "clip: PPO's clipped surrogate; cispo: the ratio clipped as a weight on every token's "
                             "log-prob gradient, no token dropped (CISPO)")
    ratio_level: str = keyed("token", one_of(*RATIO_LEVELS),
                             "token: each token's importance ratio; sequence: the answer's length-normalised ratio, "
                             "clipped per answer (GSPO)")
    clip_low: float | None = keyed(None, POSITIVE, "ratio clip below 1; null: 0.2, or 3e-4 with ratio_level=sequence "
                                                   "(GSPO's), or 1.0 with policy_loss=cispo (no lower bound)")
    clip_high: float | None = keyed(None, POSITIVE, "ratio clip above 1 (DAPO's clip-higher when above clip_low); "
                                                    "null: 0.28, or 4e-4 with ratio_level=sequence (GSPO's)")
    drop_zero_variance: bool = keyed(True, help="leave out groups whose rewards are all equal (DAPO); counted")
    dynamic_sampling: int | None = keyed(None, NON_NEGATIVE,
                                         "DAPO's dynamic sampling: up to N more rounds of fresh prompts per step "
                                         "until the batch holds rollout_batch_size groups whose rewards differ or "
                                         "are solved (logged: sampling/rounds, groups/with_signal, "
                                         "groups/solved_share); 0: off; null: 4, or 0 with env=python")
    dynamic_sampling_replaces: str = keyed("failing", one_of("failing", "flat"),
                                           "which flat groups the extra rounds replace: failing (all but those "
                                           "flat at the best reward the run has seen, which are solved), flat "
                                           "(every one, as DAPO)")
    beta: float = keyed(0.0, NON_NEGATIVE, "KL(policy || reference) coefficient; 0: no reference pass at all")
    kl_in: str = keyed("auto", one_of("auto", "loss", "reward"),
                       "auto: in the reward for reinforce_pp, in the loss otherwise; reward needs reinforce_pp (the "
                       "other kinds give one advantage per answer, with no per-token reward to shape)")
    kl_estimator: str = keyed("k3", one_of(*ESTIMATORS), "per-token KL estimator; in the loss k2 or k3 (k1's "
                              "expected gradient there is zero)")
    ppo_epochs: int = keyed(1, AT_LEAST_ONE, "passes over each rollout batch")
    # multi-turn episodes (env=python)
    max_turns: int = keyed(4, AT_LEAST_ONE, "env=python: the most model turns of one episode")
    max_episode_tokens: int = keyed(256, AT_LEAST_ONE, "env=python: the most tokens after the prompt in one episode, "
                                                       "the model's turns and the environment's together; "
                                                       "stage.max_new_tokens bounds each model turn")


def default_reward(cfg) -> str:
    """What reward=auto means: the environment's reward when the stage runs episodes, else the data's checker."""
    return "env" if envs.selected(cfg) else DEFAULT_REWARD


def extra_rounds(cfg) -> int:
    """stage.dynamic_sampling, null resolved: 4 extra rounds at most for single answers (docs/quality.md: sparse
    signal, three seeds), none for env=python's episodes, which it does not sample again."""
    if cfg.stage.dynamic_sampling is not None:
        return cfg.stage.dynamic_sampling
    return 0 if envs.selected(cfg) else 4


def clip_range(stage) -> tuple[float, float]:
    """(clip_low, clip_high), null resolved: CISPO's weight has no lower bound (its paper tuned only the upper one);
    a sequence ratio (GSPO) moves far less than a token's, and its paper clips it at 3e-4 / 4e-4."""
    if stage.policy_loss == "cispo":
        low, high = 1.0, 0.28
    elif stage.ratio_level == "sequence":
        low, high = 3e-4, 4e-4
    else:
        low, high = 0.2, 0.28
    return (low if stage.clip_low is None else stage.clip_low, high if stage.clip_high is None else stage.clip_high)


def loss_aggregation(stage) -> str:
    """stage.loss_agg, auto resolved: Dr. GRPO's constant normaliser; GSPO's mean over each answer, then answers."""
    if stage.loss_agg != "auto":
        return stage.loss_agg
    return "seq_sum" if stage.advantage == "dr_grpo" else "seq_mean" if stage.ratio_level == "sequence" else \
        "token_mean"


def grpo_kl_in(stage) -> str:
    """Where GRPO's KL term goes, `auto` resolved: the reward for reinforce_pp, the loss for the other kinds."""
    if stage.kl_in != "auto":
        return stage.kl_in
    return "reward" if stage.advantage == "reinforce_pp" else "loss"


def run(cfg: DictConfig) -> StageResult:
    s = cfg.stage
    stage = StageRun(cfg)
    parent, source = start_from(cfg, "sft", s.init)
    rm_parent = online.reward_model_parent(cfg, default_reward(cfg))
    uses_rm = rm_parent is not None
    rm_warnings = rewards.at_chance(rm_parent, "grpo")
    # built once, before any model loads (a bad reward is refused here); the loop binds its rm component
    reward = rewards.build(cfg.reward, cfg.data, rm_score=(lambda b: None) if uses_rm else None,
                           auto=default_reward(cfg), env=envs.selected(cfg))

    tokenizer = load_tokenizer(resolve_name(source), cfg.model)
    train_ds, eval_ds, report = prompt_datasets(cfg.data, tokenizer, s.max_prompt_length, cfg.train.seed)
    train = prompt_records(train_ds)
    held_out = prompt_records(eval_ds)[: s.eval_prompts]
    log.info("prompts: %d train, %d eval; %s", len(train), len(held_out), report.errors.summary())

    torch.manual_seed(cfg.train.seed)
    steps = online.steps(cfg, len(train))
    samples = s.rollout_batch_size * s.group_size
    updates = steps * s.ppo_epochs * (samples // (cfg.train.batch_size * cfg.train.grad_accum))

    policy, reference, peft = _load_policy(cfg, stage, source, updates)
    rm = online.load_reward_model(cfg, stage.ds_config, rm_parent, tokenizer.pad_token_id) if uses_rm else None
    on_engine = vllm_engine.resolve(cfg.rollout.engine) == "vllm"  # the engine's log-probs are kept per turn
    episodes = EpisodeRunner.for_stage(cfg, tokenizer, return_logp=on_engine) if envs.selected(cfg) else None
    loop = GRPOLoop(cfg, policy, reference, peft, tokenizer, reward, rm, episodes)

    stage.prepare_checkpoints()
    stage.start_logging()
    history, before, after = online.train_and_evaluate(loop, stage, train, steps, held_out)
    world = distributed.world_size()
    extra = {"samples_per_s": steps * samples * world / max(loop.train_time, 1e-9)}
    if history:
        extra["zero_variance_groups_dropped"] = sum(h.get("groups/dropped", 0) for h in history)
        extra["reward_errors"] = sum(h.get("reward/errors", 0) for h in history)
    metrics = online.metrics(loop, steps, history, before, after, report, ("reward/total_mean", "reward/checker"),
                             extra)
    parents = [p for p in (parent, rm_parent) if p]
    return online.save_and_commit(stage, {handoff.MODEL_DIR: (loop.actor, parent)}, tokenizer, parents, parent,
                                  metrics, [{"step": i + 1, **h} for i, h in enumerate(history)],
                                  {"warnings": rm_warnings + loop.warnings})


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


class GRPOLoop(OnlineLoop):
    name = "grpo"
    progress_keys = ("reward/total_mean", "groups/zero_variance_share")
    log_keys = ("reward/total_mean", "reward/checker", "reward/rm", "reward/python", "reward/env",
                "groups/zero_variance_share", "objective/kl", "policy/entropy", "policy/clipfrac", "response/length",
                "episode/turns", "episode/tool_calls", "env/errors", "time/generation_share", "time/env_share")

    def __init__(self, cfg, policy: Trainable, reference, peft: bool, tokenizer, reward: rewards.Reward, rm=None,
                 episodes: EpisodeRunner | None = None):
        self.episodes = episodes  # env=python: each prompt is a multi-turn episode (set first: the base class sizes
        # the vLLM engine's context by longest_rollout(), which reads it)
        super().__init__(cfg, policy, reference, peft, tokenizer, reward.checker)
        # seq_* aggregations divide by the longest possible answer: an episode's tokens when it runs them
        self.longest = self.longest_rollout()
        self.rm = rm
        self.reward = reward
        if rm is not None:
            reward.bind_rm(self.rm_score)
        s = self.s
        self.agg, self.clip = loss_aggregation(s), clip_range(s)
        self.kl_in = grpo_kl_in(s)
        self.kl_in_reward = s.beta > 0 and self.kl_in == "reward"
        self.extra_rounds = extra_rounds(cfg)
        self.reward_seen: tuple[float, float] | None = None  # dynamic sampling: the run's lowest and highest reward

    def frozen_models(self) -> tuple:
        return (*super().frozen_models(), *([self.rm[0]] if self.rm is not None else []))

    @torch.no_grad()
    def rm_score(self, batch) -> torch.Tensor:
        return reward_model_scores(self.rm, batch)

    def longest_rollout(self) -> int:
        return self.s.max_episode_tokens if self.episodes is not None else self.s.max_new_tokens

    def run_episodes(self, prompts: list[Prompt], greedy: bool) -> Episodes:
        """The prompts' episodes, every turn sampled with the loop's sampler; the engine sleeps once they are done."""
        def sample(contexts, g, n, turns):
            return self.sample(contexts, g, n, more_turns=True, turns=turns)

        out = self.episodes.run(sample, prompts, greedy, device=device())
        if self.vllm is not None and not greedy:
            self.vllm.sleep()
        return out

    def answer(self, prompts: list[Prompt]):
        if self.episodes is None:
            return super().answer(prompts)
        out = self.run_episodes(prompts, greedy=True)
        own = {"env_reward": out.rewards, "turns": torch.tensor([float(e.turns) for e in out.items]),
               "tool_calls": torch.tensor([float(e.tool_calls) for e in out.items])}
        return out.batch, out.answers, own

    def eval_scores(self, batch, responses, items) -> dict:
        if self.rm is None:
            return {}
        return {"reward_mean": self.rm_score(batch)}

    def step(self, prompts: list[Prompt]) -> dict:
        t0 = time.perf_counter()
        r = self._rollout(prompts)
        update = self._update(r)
        return self._stats(r, update, time.perf_counter() - t0)

    def _rollout(self, prompts: list[Prompt]) -> GroupRollout:
        """Sample group_size answers per prompt and score them (with dynamic sampling, more rounds of fresh prompts
        while the batch is short of groups with signal or solved), then turn the scores into per-token advantages."""
        G = self.s.group_size
        sampled, rounds = self._sample(prompts), 0
        self._see(sampled)
        while rounds < self.extra_rounds and self._short_of_signal(sampled, len(prompts)):
            more = self._sample(self.draw_prompts())
            self._see(more)
            sampled, rounds = Sampled.concat([sampled, more], self.pad), rounds + 1
        every = sampled
        if rounds:  # the first len(prompts) groups with signal, then flat ones: every rank keeps its row count
            sampled = sampled.select(dynamic.rows_of(dynamic.fill(dynamic.signal(sampled.flat, G), len(prompts)), G))
        r = self._advantages(sampled)
        r.rounds, r.every = rounds, every
        return r

    def _single_update(self, rows: int) -> bool:
        """A rollout of `rows` answers takes one optimizer step: the update's live log-probs are the behaviour's,
        so no separate pass computes them."""
        return self.s.ppo_epochs == 1 and rows == self.cfg.train.batch_size * self.cfg.train.grad_accum

    def _short_of_signal(self, sampled: "Sampled", target: int) -> bool:
        """Some rank has fewer than `target` groups with signal, or solved (dynamic_sampling_replaces=failing, once
        the run has seen two different rewards: before, no round); all ranks then sample another round together."""
        if self.s.dynamic_sampling_replaces == "failing" and not dynamic.can_tell(self.reward_seen):
            return False  # every rank holds the same range (gathered per round)
        found = int(dynamic.signal(sampled.flat, self.s.group_size).sum()) + int(self._solved(sampled).sum())
        return distributed.all_reduce_scalar(float(target - found), "max") > 0

    def _solved(self, sampled: "Sampled") -> torch.Tensor:
        """[groups] bool: flat at the best reward the run has seen (none with dynamic_sampling_replaces=flat)."""
        if self.s.dynamic_sampling_replaces == "flat":
            return torch.zeros(len(sampled.flat) // self.s.group_size, dtype=torch.bool)
        return dynamic.solved(sampled.flat, sampled.total, sampled.scored.valid, self.s.group_size, self.reward_seen)

    def _see(self, sampled: "Sampled") -> None:
        """Widen the run's range of rewards seen (over every rank) by one sampling round; only dynamic sampling's
        `failing` form reads it, and only then is it gathered (a collective per round)."""
        if not self.extra_rounds or self.s.dynamic_sampling_replaces == "flat":
            return
        seen = dynamic.seen_range(self.reward_seen, sampled.total, sampled.scored.valid) or (math.inf, -math.inf)
        lo, hi = distributed.all_reduce_scalar(seen[0], "min"), distributed.all_reduce_scalar(seen[1], "max")
        self.reward_seen = (lo, hi) if lo <= hi else None

    def extra_state(self) -> dict:
        return {"reward_seen": self.reward_seen}

    def load_extra_state(self, state: dict) -> None:
        self.reward_seen = None if state.get("reward_seen") is None else tuple(state["reward_seen"])

    def _sample(self, prompts: list[Prompt]) -> "Sampled":
        """One round: group_size answers per prompt, the log-probs the update needs, the shaped rewards."""
        s, G = self.s, self.s.group_size
        items = [p for p in prompts for _ in range(G)]
        t0 = time.perf_counter()
        with self.rollout_window(), torch.no_grad():  # ZeRO-3: one gather for generation and these passes
            episodes = self.run_episodes(items, greedy=False) if self.episodes is not None else None
            batch = episodes.batch if episodes is not None else self.sample([p.ids for p in items])
            t_gen = time.perf_counter() - t0
            sampled_elsewhere = batch.engine_logp is not None  # the trainer's log-probs are then needed anyway
            needed = not self._single_update(len(items)) or self.kl_in_reward or sampled_elsewhere
            behaviour = rollout.response_logprobs(self.actor.module, batch, s.temperature)[0] if needed else None
            ref_logp = self.reference_logprobs(batch, s.temperature) if s.beta > 0 else None
        if episodes is None:
            scored = self.reward(batch, rollout.decode_responses(self.tok, batch), items)
        else:  # the environment's reward beside the group's other components, which read each last model turn
            scored = self.reward(batch, episodes.answers, items, {"env": (episodes.rewards, episodes.valid)})
        total = scored.total.clone()
        total += overlong_penalty(batch.mask.sum(1).cpu(), s.max_new_tokens, s.overlong_buffer, s.overlong_penalty)
        if s.missing_eos_penalty is not None:
            total = torch.where(batch.ended.cpu(), total, total - s.missing_eos_penalty)
        return Sampled(batch, behaviour, ref_logp, scored, total, zero_variance(total, G, scored.valid), t_gen,
                       episodes.stats() if episodes is not None else None)

    def _advantages(self, sampled: "Sampled") -> GroupRollout:
        """Which answers train (valid; not in a flat group; inside an engine's mismatch bound) and their advantages."""
        s, G, batch, total = self.s, self.s.group_size, sampled.batch, sampled.total
        mask, valid, behaviour, flat = batch.mask, sampled.scored.valid, sampled.behaviour, sampled.flat
        kl_in_reward = self.kl_in_reward
        keep = valid & (~flat if s.drop_zero_variance else torch.ones_like(flat))
        is_w, mismatch = None, {}
        if batch.engine_logp is not None:
            is_w, inside, mismatch = correction(behaviour, batch.engine_logp, mask, self.cfg.rollout)
            keep = keep & inside.cpu()
        loss_mask = mask * keep.to(mask.device)[:, None].to(mask.dtype)
        with torch.no_grad():
            kl_tokens = kl_per_token(behaviour, sampled.ref_logp, "k1") if kl_in_reward else None
            seq_adv = group_advantages(total, G, s.advantage, valid=valid).to(mask.device)
            # whitened (reinforce_pp) over the answers that train, not over the groups left out
            advantages = token_advantages(seq_adv, loss_mask, s.advantage, kl_tokens, s.beta if kl_in_reward else 0)
        old_logp = None if self._single_update(len(total)) else behaviour
        return GroupRollout(batch, sampled.scored, total, flat, keep, loss_mask, advantages, old_logp,
                            sampled.ref_logp, mask.sum(1).cpu(), sampled.t_gen, is_w, mismatch, sampled.episodes)

    def _update(self, r: GroupRollout) -> dict[str, list]:
        """stage.ppo_epochs passes of clipped-surrogate updates over the kept answers, in micro-batches."""
        s, n, mask = self.s, len(r.keep), r.batch.mask
        update: dict[str, list] = {}
        micro, accum = self.cfg.train.batch_size, self.cfg.train.grad_accum
        for _ in range(s.ppo_epochs):
            order = _kept_first(r.keep, self.gen)
            # each optimizer step (grad_accum micro-batches) divides by its own kept tokens or answers, summed over
            # the ranks: a micro-batch holding one kept answer weighs that answer, not a whole batch
            denominators = window_denominators(r.loss_mask, order, micro, accum, self.agg)
            for mb_index, start in enumerate(range(0, n, micro)):
                idx = order[start : start + micro].to(mask.device)
                if not bool(r.keep[idx.cpu()].any()) and self.actor.engine is None:
                    self.actor.step()  # nothing to learn from here: count the micro-step, skip the passes
                    continue
                stats = self._micro_step(r, idx, denominators[mb_index // accum])
                for k, v in stats.items():
                    update.setdefault(k, []).append(float(v))
        return update

    def _micro_step(self, r: GroupRollout, idx: torch.Tensor, denominator: float) -> dict:
        """One micro-batch's loss, backward and (accumulated) step; its stats ({} when its loss was non-finite)."""
        s, mb = self.s, r.batch.select(idx)
        with checkpointing_active(self.actor.model):
            logp, entropy = rollout.response_logprobs(self.actor.model, mb, s.temperature, with_entropy=True)
        old = logp.detach() if r.old_logp is None else r.old_logp[idx]
        loss, stats = clipped_surrogate(logp, old, r.advantages[idx], r.loss_mask[idx], *self.clip, self.agg,
                                        self.longest, denominator, None if r.is_weights is None else r.is_weights[idx],
                                        level=s.ratio_level, kind=s.policy_loss)
        if r.ref_logp is not None and self.kl_in == "loss":
            kl = aggregate(kl_per_token(logp, r.ref_logp[idx], s.kl_estimator), r.loss_mask[idx], self.agg,
                           self.longest, denominator)
            loss = loss + s.beta * kl
            stats["loss/kl"] = kl.detach()
        if not self.finite_on_all_ranks(loss):
            # still a micro-step (as a left-out one is): the accumulation windows stay those of this rollout
            self.actor.backward(zero_loss(logp))
            self.actor.step()
            return {}
        self.actor.backward(loss)
        self.actor.step()
        stats.update({"loss/policy": loss.detach(), "policy/entropy": masked_mean(entropy.detach(), mb.mask)})
        if r.ref_logp is not None:  # KL(policy || reference) per response, by the sampled tokens
            stats["objective/kl"] = ((logp.detach() - r.ref_logp[idx]) * mb.mask).sum(1).mean()
        return stats

    def _stats(self, r: GroupRollout, update: dict[str, list], step_time: float) -> dict:
        """The step's statistics; rewards over every answer sampled (with dynamic sampling, not only those that
        trained: they measure the policy, not the selection)."""
        G, every = self.s.group_size, r.every
        scored = every.scored
        out = {"reward/total_mean": float(scored.total[scored.valid].mean()) if scored.valid.any() else 0.0,
               "reward/std": float(scored.total.std()) if len(scored.total) > 1 else 0.0,
               "reward/shaped_mean": float(every.total[scored.valid].mean()) if scored.valid.any() else 0.0,
               "reward/errors": float(scored.errors),
               "groups/zero_variance_share": float(every.flat.view(-1, G)[:, 0].float().mean()),
               "groups/dropped": float((~r.keep).view(-1, G).all(1).sum()) if self.s.drop_zero_variance else 0.0,
               "response/length": float(r.lengths.float().mean()),
               "response/ended": float(r.batch.ended.float().mean()),
               "time/generation_share": r.t_gen / step_time, "time/step_s": step_time,
               "samples/s": len(scored.total) / step_time}
        out.update({f"reward/{k}": float(v.mean()) for k, v in scored.components.items()})
        if self.extra_rounds:  # the rounds this step sampled, and the share of its batch that has signal
            out.update({"sampling/rounds": float(1 + r.rounds),
                        "groups/with_signal": float(dynamic.signal(r.flat, G).float().mean()),
                        "groups/solved_share": float(self._solved(every).float().mean())})
        out.update(online.engine_stats(self.vllm, r.mismatch))
        if r.episodes is not None:  # turns, tool calls, env errors; the rollout's time in the environment
            out.update(r.episodes)
            out["time/env_share"] = r.episodes["time/env_s"] / step_time
            out["time/generation_share"] = max(r.t_gen - r.episodes["time/env_s"], 0.0) / step_time
        out.update({k: sum(v) / len(v) for k, v in update.items()})
        out["lr/actor"] = self.actor.lr()
        return mean_over_ranks(out)


@dataclass
class GroupRollout:
    """One step's sampled groups: the batch, its rewards (as scored, then shaped), which answers train, and the
    log-probs and advantages the update reads."""

    batch: rollout.Batch
    scored: rewards.Scored
    total: torch.Tensor  # [N] the shaped reward (overlong and missing-EOS penalties added)
    flat: torch.Tensor  # [N] bool: in a group whose rewards are all equal
    keep: torch.Tensor  # [N] bool: trains (valid, and not dropped as zero-variance)
    loss_mask: torch.Tensor  # [N, R] the response tokens of the kept answers
    advantages: torch.Tensor  # [N, R]
    old_logp: torch.Tensor | None  # [N, R] behaviour log-probs; None: one update, the live ones are
    ref_logp: torch.Tensor | None  # [N, R] the reference's; None with stage.beta=0
    lengths: torch.Tensor  # [N]
    t_gen: float  # seconds spent sampling
    is_weights: torch.Tensor | None = None  # [N, R] importance weights of an engine's rollout (rl/mismatch.py)
    mismatch: dict | None = None  # engine vs trainer log-probs of the sampled tokens
    episodes: dict | None = None  # env=python: the episodes' stats (turns, tool calls, errors, time in the env)
    rounds: int = 0  # stage.dynamic_sampling: the extra sampling rounds this step took
    every: "Sampled | None" = None  # every answer sampled this step (with extra rounds, more than trained)


@dataclass
class Sampled:
    """One or more sampling rounds' groups, scored: what dynamic sampling concatenates and selects from."""

    batch: rollout.Batch
    behaviour: torch.Tensor | None  # [N, R] the trainer's log-probs of the sampled tokens, when the update needs them
    ref_logp: torch.Tensor | None  # [N, R]
    scored: rewards.Scored
    total: torch.Tensor  # [N] shaped
    flat: torch.Tensor  # [N] bool: in a group whose rewards are all equal
    t_gen: float
    episodes: dict | None = None  # env=python (never with dynamic sampling): the episodes' stats

    def select(self, rows: torch.Tensor) -> "Sampled":
        pick = lambda t: None if t is None else t[rows.to(t.device)]  # noqa: E731
        scored = rewards.Scored(pick(self.scored.total), {k: pick(v) for k, v in self.scored.components.items()},
                                pick(self.scored.valid), self.scored.errors)
        return Sampled(self.batch.select(rows.to(self.batch.mask.device)), pick(self.behaviour), pick(self.ref_logp),
                       scored, pick(self.total), pick(self.flat), self.t_gen, self.episodes)

    @staticmethod
    def concat(parts: list["Sampled"], pad_id: int) -> "Sampled":
        rows = lambda get, pad=0: rollout.concat_rows([get(p) for p in parts], pad)  # noqa: E731
        scored = rewards.Scored(rows(lambda p: p.scored.total),
                                {k: rows(lambda p, k=k: p.scored.components[k]) for k in parts[0].scored.components},
                                rows(lambda p: p.scored.valid), sum(p.scored.errors for p in parts))
        return Sampled(rollout.Batch.concat([p.batch for p in parts], pad_id), rows(lambda p: p.behaviour),
                       rows(lambda p: p.ref_logp), scored, rows(lambda p: p.total), rows(lambda p: p.flat),
                       sum(p.t_gen for p in parts))


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


def checks(cfg) -> list[str]:
    """Rules between grpo's keys (align/config/rules.py runs them before anything loads)."""
    out, s, t = online.rollout_problems(cfg), cfg.stage, cfg.train
    mini, samples = t.batch_size * t.grad_accum, s.rollout_batch_size * s.group_size
    if mini > 0 and samples % mini:
        out.append(f"stage.rollout_batch_size x stage.group_size = {samples} responses per step must be a multiple "
                   f"of train.batch_size x train.grad_accum = {mini} (one optimizer step); e.g. train.batch_size="
                   f"{math.gcd(samples, t.batch_size)}")
    if envs.selected(cfg):
        out += _episode_problems(cfg)
    kl_in = grpo_kl_in(s)
    if kl_in == "reward" and s.advantage != "reinforce_pp":
        out.append(f"stage.kl_in=reward with stage.advantage={s.advantage}: the KL would enter neither the "
                   "advantages (one per answer, from its group) nor the loss, so stage.beta would do nothing. "
                   "Fix: stage.kl_in=loss (or auto), or stage.advantage=reinforce_pp")
    if kl_in == "loss" and s.beta > 0 and s.kl_estimator == "k1":
        out.append("stage.kl_estimator=k1 with the KL in the loss: on the policy's own samples k1's expected "
                   "gradient is zero, so stage.beta would only add noise. Fix: stage.kl_estimator=k3 (the "
                   "default) or k2")
    return out


def _episode_problems(cfg) -> list[str]:
    """env=python's rules: a class that loads, and the keys that mean one answer per prompt."""
    out, s = [], cfg.stage
    try:
        envs.load_class(cfg.env.cls)
    except envs.EnvError as e:
        out.append(str(e))
    if s.overlong_buffer > 0:
        out.append("stage.overlong_buffer (DAPO's overlong penalty) measures one answer against stage.max_new_tokens; "
                   "an episode has several turns. Fix: stage.overlong_buffer=0 with env=python")
    if s.max_new_tokens > s.max_episode_tokens:
        out.append(f"stage.max_new_tokens={s.max_new_tokens} (one model turn) is over stage.max_episode_tokens="
                   f"{s.max_episode_tokens} (the whole episode). Fix: raise stage.max_episode_tokens")
    if s.dynamic_sampling:
        out.append("stage.dynamic_sampling samples single answers again; it does not run multi-turn episodes "
                   "(env=python). Fix: stage.dynamic_sampling=null (off with env=python) or 0")
    return out


def _parents(cfg) -> list[tuple[str, str | None]]:
    return online.parents_with_reward_model(cfg, default_reward(cfg))


def footprint(cfg) -> Footprint:
    """The policy; a frozen reference with full weights and stage.beta > 0; a reward model when the reward group
    uses one; rollouts of rollout_batch_size x group_size answers (an episode's tokens with env=python)."""
    s = cfg.stage
    cpu = s.frozen_device == "cpu"
    ref = cfg.peft.method == "none" and s.beta > 0
    rm = "rm" in rewards.components_of(cfg.reward, default_reward(cfg))
    answer = s.max_episode_tokens if envs.selected(cfg) else s.max_new_tokens
    models = (Held("policy", trains=True), *([Held("reference", on_cpu=cpu)] if ref else []),
              *([Held("reward model", score_head=True, on_cpu=cpu)] if rm else []))
    return Footprint(models, rollout_sequences=s.rollout_batch_size * s.group_size,
                     rollout_tokens=s.max_prompt_length + answer, chunked_logits=True,
                     train_tokens=s.max_prompt_length + answer)


# learning rates: the tiny model's chosen on the task zoo, five reasoning-gym tasks and the demo over seeds (3e-5:
# the zoo's +10 kept, less below SFT where there was little to learn; docs/quality.md, GRPO's learning rate)
SPEC = StageSpec(
    name="grpo", footprint=footprint, schema=GRPOStageConfig, run=run, parents=_parents, checks=checks, default_reward=DEFAULT_REWARD,
    lr={"tiny": 3e-5, "full": 1e-6, "adapter": 1e-5}, policy=True, reads_reward=True, reads_rollout=True,
    reads_env=True,
    headline=("first_reward/total_mean", "reward/total_mean", "eval_checker_accuracy_before",
              "eval_checker_accuracy", "eval_env_reward_before", "eval_env_reward", "eval_greedy_logratio"))
