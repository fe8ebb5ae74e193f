"""What the online stages (those on align/rl/loop.py) share: their schema base (sampling, the frozen models' place,
the held-out eval), the number of steps, the run around the loop (held-out eval before and after, the metrics
recorded), and saving the trained models and committing them."""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass

from align import rewards
from align.config.schema import AT_LEAST_ONE, NON_NEGATIVE, POSITIVE, Check, StageConfig, keyed, one_of
from align.data.prompts import Prompt
from align.models import distributed
from align.models.loading import point_adapter_at, set_use_cache
from align.rl.engine import frozen_reward_model
from align.run import handoff, tracking
from align.run.stage_run import StageResult, StageRun
from align.stages.common import commit_staged, numeric_metrics

log = logging.getLogger("align")


@dataclass
class OnlineStageConfig(StageConfig):
    """What the online stages (ppo, grpo) share: sampling, the frozen models' place, the held-out eval."""

    frozen_device: str = keyed("auto", one_of("auto", "cpu"),
                               "auto: reference and reward model beside the policy; cpu: their weights stay in CPU memory")
    max_prompt_length: int = keyed(512, AT_LEAST_ONE, "longest prompt in tokens")
    max_new_tokens: int = keyed(64, AT_LEAST_ONE, "longest response in tokens")
    temperature: float = keyed(1.0, POSITIVE, "sampling temperature of rollouts")
    top_p: float = keyed(1.0, Check(0, 1, low_open=True), "nucleus sampling of rollouts")
    stop_tokens: list[str] = keyed(None, help="extra single-token stops besides EOS", factory=list)
    missing_eos_penalty: float | None = keyed(None, NON_NEGATIVE, "subtracted from the score of a response with no EOS")
    eval_prompts: int = keyed(256, NON_NEGATIVE, "held-out prompts answered (greedy) before and after training; 0: none")
    watch_window: int = keyed(10, Check(low=2), "steps compared by the over-optimisation watch (learned reward "
                                                "vs the checker on the rollouts)")
    gather_for_rollout: str = keyed("auto", one_of("auto", "on", "off"),
                                    "ZeRO-3: gather the policy once per rollout instead of per token (auto: when its "
                                    "full weights take under a quarter of the free memory)")
    gather_for_step: str = keyed("auto", one_of("auto", "on", "off"),
                                 "ZeRO-3: gather a step's models once (rollout, scoring, update) instead of layer by "
                                 "layer in every forward and backward (auto: when their full weights take under a "
                                 "quarter of the free memory; otherwise gather_for_rollout still applies). Models "
                                 "offloaded to CPU memory stay sharded")


def steps(cfg, n_prompts: int) -> int:
    """train.max_steps, or train.epochs over the prompts at stage.rollout_batch_size per rank."""
    if cfg.train.max_steps > 0:
        return cfg.train.max_steps
    return max(1, math.ceil(cfg.train.epochs * n_prompts / (cfg.stage.rollout_batch_size * distributed.world_size())))


def train_and_evaluate(loop, stage: StageRun, train: list[Prompt], n_steps: int, held_out: list[Prompt]):
    """The held-out eval (greedy answers to `held_out`) before training (restored from the checkpoint when
    resuming), the loop's training, the eval after. Returns (history, before, after)."""
    before = None
    if stage.resume_from is None:
        before = loop.evaluate(held_out) if held_out else {}
    history = loop.train(train, n_steps, stage.cfg.stage.rollout_batch_size, stage.wandb_run, stage.checkpoints,
                         stage.resume_from, before)
    after = loop.evaluate(held_out) if held_out else {}
    return history, loop.before, after


def metrics(loop, n_steps: int, history: list[dict], before: dict, after: dict, report, first: tuple,
            extra: dict | None = None) -> dict:
    """What an online stage records: steps, time, skipped updates, `first` keys of step 1, the last step's stats,
    the held-out eval before and after, the data report."""
    out = {"global_step": n_steps, "train_runtime_s": loop.train_time, "nonfinite_updates_skipped": loop.skipped,
           **(extra or {})}
    if history:
        out.update({f"first_{k}": history[0][k] for k in first if k in history[0]})
        out.update(history[-1])
    out.update({f"eval_{k}_before": v for k, v in before.items()})
    out.update({f"eval_{k}": v for k, v in after.items()})
    out.update(report.metrics())
    return numeric_metrics(out)


def save_and_commit(stage: StageRun, trained: dict, tokenizer, parents: list, actor_parent, metrics: dict,
                    history: list[dict], extra: dict | None = None) -> StageResult:
    """The loop's trained models saved on every rank (ZeRO-3 gathers), then on the main process each written to
    its output folder (`trained`: folder -> (Trainable, the parent whose adapter it continues)) and committed.
    The model/ folder's model is the result."""
    states = {name: t.state_dict_for_save() for name, (t, _) in trained.items()}  # collectives: every rank
    if tracking.is_main_process():
        staged = {}
        for name, (t, parent) in trained.items():
            if parent is not None:
                point_adapter_at(t.module, str(parent.model))
            if name == handoff.MODEL_DIR:
                set_use_cache(t.module, True)
            staged[name] = handoff.staging_dir(stage.out, name)
            t.module.save_pretrained(staged[name], state_dict=states[name])
        commit_staged(stage, staged, tokenizer, parents, actor_parent, metrics, history=history, extra=extra)
    distributed.barrier()
    return StageResult(stage.out, metrics, trained[handoff.MODEL_DIR][0].module)


def engine_stats(engine, mismatch: dict | None) -> dict:
    """What a step logs about a vLLM rollout: the engine/trainer mismatch of its log-probs, the sync's time."""
    if engine is None:
        return {}
    return {**(mismatch or {}), "time/sync_s": engine.sync_s}


def rollout_problems(cfg) -> list[str]:
    """The rollout group's rules (rollout.engine=vllm without vLLM, a tensor-parallel size that does not divide the
    ranks), run before anything loads."""
    from align.rl import vllm_engine

    return vllm_engine.problems(cfg.rollout) if "rollout" in cfg else []


def reward_model_parent(cfg, auto: str):
    """The reward model's stage output when the reward group uses one (`auto`: the stage's default reward), None
    when it does not; refused without one, before anything loads."""
    if "rm" not in rewards.components_of(cfg.reward, auto):
        return None
    found = handoff.find_parent(cfg, "rm", cfg.reward.model)
    if found is None:
        raise handoff.HandoffError(f"reward=rm needs a reward model: run `python -m align stage=rm run.name="
                                   f"{cfg.run.name}` first, or pass reward.model=PATH")
    return found


def parents_with_reward_model(cfg, auto: str) -> list[tuple[str, str | None]]:
    """A stage's parents when it starts from the SFT and may be judged by the run's reward model."""
    rm = [("rm", cfg.reward.model)] if "rm" in rewards.components_of(cfg.reward, auto) else []
    return [("sft", cfg.stage.init)] + rm


def load_reward_model(cfg, ds_config: dict | None, parent, pad_id: int):
    """(model, mean, std): the reward model frozen (sharded under ZeRO-3 when `ds_config` says so, whole without
    one), with the statistics of its scores its stage recorded (rl/loop.reward_model_scores normalises with them)."""
    log.info("reward model %s", parent.model)
    return frozen_reward_model(cfg, ds_config, parent, pad_id), *rewards.rm_statistics(parent)

