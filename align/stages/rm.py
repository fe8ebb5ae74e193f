"""Reward model: a one-output sequence classifier trained on preference pairs, from the run's SFT.

Loss (TRL's RewardTrainer): -log sigmoid(r_chosen - r_rejected - margin), margin from an optional
`margin` column, plus center_rewards_coef * mean((r_chosen + r_rejected)^2) when set. After
training the eval pairs are scored: accuracy, mean margin, and the reward mean/std that PPO uses
to normalise rewards.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
from omegaconf import DictConfig

from align.config.registry import Footprint, Held, StageSpec, init_parent
from align.config.schema import NON_NEGATIVE, StageConfig, keyed
from align.data.chat import scoring_pad_id
from align.data.loader import preference_datasets
from align.models.loading import (
    cast_trainable,
    describe,
    load_reward_model,
    load_tokenizer,
    resolve_name,
)
from align.rl.rollout import last_token_scores, score
from align.run.stage_run import StageResult, StageRun
from align.stages.common import (
    max_length,
    numeric_metrics,
    save_and_commit,
    start_from,
    trainer_metrics,
    training_arguments,
)

log = logging.getLogger("align")


@dataclass
class RMStageConfig(StageConfig):
    name: str = "rm"
    center_rewards_coef: float | None = keyed(None, NON_NEGATIVE, "adds coef * mean((r_chosen + r_rejected)^2)")


def run(cfg: DictConfig) -> StageResult:
    from trl import RewardConfig, RewardTrainer

    stage = StageRun(cfg)
    parent, source = start_from(cfg, "sft", cfg.stage.init)

    tokenizer = load_tokenizer(resolve_name(source), cfg.model)
    use_scoring_pad(tokenizer)
    length = max_length(cfg, tokenizer)
    train_ds, eval_ds, report = preference_datasets(cfg.data, tokenizer, length, cfg.train.seed)
    log.info("data: %d train pairs, %d eval pairs; %s", report.train_rows, report.eval_rows, report.errors.summary())

    model = load_reward_model(source, cfg.model, cfg.peft, tokenizer.pad_token_id)
    log.info("reward model from %s: %s", source, describe(model))

    stage.prepare_checkpoints()
    stage.start_logging()
    args = RewardConfig(
        **training_arguments(cfg, stage, eval_ds is not None),
        max_length=length,
        center_rewards_coefficient=cfg.stage.center_rewards_coef,
        disable_dropout=True,
    )
    trainer = end_of_turn_trainer(RewardTrainer)(model=model, args=args, train_dataset=train_ds, eval_dataset=eval_ds,
                                                 processing_class=tokenizer)
    if cfg.peft.method == "qlora":  # TRL casts adapters to bf16; the head must match the float32 activations
        cast_trainable(trainer.model)
    result = stage.train(trainer)

    metrics = trainer_metrics(stage, trainer, result)
    metrics.update(pair_metrics(trainer.model, eval_ds if eval_ds is not None else train_ds, tokenizer.pad_token_id,
                                "eval" if eval_ds is not None else "train"))
    metrics.update(report.metrics())
    metrics = numeric_metrics(metrics)

    return save_and_commit(stage, trainer, tokenizer, parent, metrics, task="seq_cls")


def use_scoring_pad(tokenizer) -> None:
    """Give the reward model a pad token that is no end-of-turn token (chat.scoring_pad_id), saved with its
    tokenizer and config: other tools then score the token align trains and reads."""
    pad = scoring_pad_id(tokenizer)
    if pad is None:
        log.warning("every special token of this tokenizer ends a turn: the reward model keeps pad = %s, and tools "
                    "that pool at the last non-pad token (transformers' classifiers) will read the token before it",
                    tokenizer.pad_token)
    elif pad != tokenizer.pad_token_id:
        log.info("reward model pad token: %s (the tokenizer's pad %s ends turns, and transformers' classifiers "
                 "score the last token that is not the pad)", tokenizer.convert_ids_to_tokens(pad), tokenizer.pad_token)
        tokenizer.pad_token = tokenizer.convert_ids_to_tokens(pad)


def end_of_turn_trainer(trainer_cls):
    """TRL's RewardTrainer with each sequence scored at its last real token (rollout.last_token_scores), the
    position PPO and the eval stage score: transformers' pooling skips pad ids, and with pad = EOS (Llama 3,
    Mistral) that would move the score to the token before the end of turn."""

    from transformers.modeling_outputs import SequenceClassifierOutput

    class EndOfTurnRewardTrainer(trainer_cls):
        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            def scorer(input_ids, attention_mask, **_):
                return SequenceClassifierOutput(logits=last_token_scores(model, input_ids, attention_mask).unsqueeze(-1))

            return super().compute_loss(scorer, inputs, return_outputs, num_items_in_batch)

    return EndOfTurnRewardTrainer


def pair_metrics(model, dataset, pad_token_id: int, split: str) -> dict:
    """Accuracy, mean margin and the reward distribution over a set of pairs."""
    chosen = score(model, dataset["chosen_ids"], pad_token_id)
    rejected = score(model, dataset["rejected_ids"], pad_token_id)
    both = torch.cat([chosen, rejected])
    return {
        f"{split}_accuracy": (chosen > rejected).float().mean().item(),
        f"{split}_margin": (chosen - rejected).mean().item(),
        "reward_mean": both.mean().item(),
        "reward_std": both.std().item(),
        "reward_chosen_mean": chosen.mean().item(),
        "reward_rejected_mean": rejected.mean().item(),
    }


def footprint(cfg) -> Footprint:
    """A sequence classifier trains on pairs (chosen and rejected in one micro-batch)."""
    return Footprint((Held("reward model", trains=True, score_head=True),), pair_rows=2)


SPEC = StageSpec(
    name="rm", schema=RMStageConfig, run=run, parents=init_parent("sft"), footprint=footprint, lr={"tiny": 1e-3, "full": 1e-5, "adapter": 1e-4},
    headline=("first_loss", "last_loss", "eval_accuracy", "eval_margin"))
