"""KTO: alignment from unpaired feedback (thumbs up / thumbs down) on TRL's KTOTrainer, from the run's SFT output.

Each row is one answer with a yes/no label (align/data/feedback.py); preference pairs count as two rows, so the
demo's and the zoo's pairs serve too. The loss pulls a desirable answer's log-ratio against the reference above a
reference point (the policy's KL to the reference, estimated each batch from prompts paired with their neighbours'
answers) and pushes an undesirable one below it. The two classes' weights default to balancing them, as the KTO
paper advises (weight x count equal for both); both are logged. Models as in DPO: with LoRA/QLoRA the reference is
the policy with its adapter off, with full weights a frozen copy.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

from omegaconf import DictConfig

from align.config.registry import Footprint, Held, StageSpec, init_parent
from align.config.schema import POSITIVE, StageConfig, keyed, one_of
from align.data.loader import feedback_datasets
from align.models.loading import cast_trainable, load_tokenizer, resolve_name, set_use_cache
from align.run.stage_run import StageResult, StageRun
from align.stages.common import (
    max_length,
    numeric_metrics,
    policy_and_reference,
    preference_metrics,
    save_and_commit,
    start_from,
    trainer_metrics,
    training_arguments,
)

log = logging.getLogger("align")

KTO_LOSS_TYPES = ("kto", "apo_zero_unpaired")


@dataclass
class KTOStageConfig(StageConfig):
    name: str = "kto"
    # 0.3, not the KTO paper's and TRL's 0.1: measured on the demo and three zoo tasks, 0.1 fell below SFT on one
    # demo seed and collapsed on task/arith (KL 86); 0.3 beat SFT on every one (docs/quality.md)
    beta: float = keyed(0.3, POSITIVE, "strength of the pull toward the reference (higher: stay closer)")
    loss_type: str = keyed("kto", one_of(*KTO_LOSS_TYPES),
                           "kto: against the policy's KL to the reference as the reference point; apo_zero_unpaired: "
                           "against zero (no KL estimate)")
    desirable_weight: float | None = keyed(None, POSITIVE, "weight of the desirable answers' loss; null: balance the "
                                                           "classes (the rarer class weighs count ratio, the other 1)")
    undesirable_weight: float | None = keyed(None, POSITIVE, "weight of the undesirable answers' loss; null: balance "
                                                             "the classes")


# TRL's metric names -> stage.json names (prefixed with eval_ or train_)
METRICS = {
    "rewards/chosen": "rewards_desirable",
    "rewards/rejected": "rewards_undesirable",
    "rewards/margins": "margin",
    "logps/chosen": "logps_desirable",
    "logps/rejected": "logps_undesirable",
    "kl": "kl",
}


def class_weights(labels: list[bool], desirable: float | None, undesirable: float | None) -> tuple[float, float]:
    """(desirable_weight, undesirable_weight): a weight left null makes weight x count equal for both classes, the
    more common class weighing 1 (KTO paper, eq. 8: their ratio within [1, 4/3]); with one class only, 1."""
    n_good = sum(bool(x) for x in labels)
    n_bad = len(labels) - n_good
    if desirable is not None and undesirable is not None:
        return float(desirable), float(undesirable)
    if not n_good or not n_bad:
        return float(desirable or 1.0), float(undesirable or 1.0)
    if desirable is not None:
        return float(desirable), desirable * n_good / n_bad
    if undesirable is not None:
        return undesirable * n_bad / n_good, float(undesirable)
    return (n_bad / n_good, 1.0) if n_good < n_bad else (1.0, n_good / n_bad)


def run(cfg: DictConfig) -> StageResult:
    from trl import KTOConfig, KTOTrainer

    class PretokenizedKTOTrainer(KTOTrainer):
        """align encodes prompt/completion itself (any chat template, errors naming the row); the KL term's
        mismatched answers are each batch's answers shifted by one, as TRL builds them."""

        def _prepare_dataset(self, dataset, processing_class, args, dataset_name):
            if not self.calculate_KL:
                return dataset

            def shifted(batch):
                batch["KL_completion_ids"] = [batch["completion_ids"][-1]] + batch["completion_ids"][:-1]
                return batch

            return dataset.map(shifted, batched=True, batch_size=args.per_device_train_batch_size)

    stage = StageRun(cfg)
    parent, source = start_from(cfg, "sft", cfg.stage.init)
    tokenizer = load_tokenizer(resolve_name(source), cfg.model)
    length = max_length(cfg, tokenizer)
    train_ds, eval_ds, report = feedback_datasets(cfg.data, tokenizer, length, cfg.train.seed)
    # KTOTrainer reads rows in order (each batch's KL term pairs its own prompts and answers): shuffled here, seeded
    train_ds = train_ds.shuffle(seed=cfg.train.seed).flatten_indices()
    labels = train_ds["label"]
    desirable = sum(labels)
    good, bad = class_weights(labels, cfg.stage.desirable_weight, cfg.stage.undesirable_weight)
    log.info("data: %d train answers (%d desirable, weight %.3g; %d undesirable, weight %.3g), %d eval; %s",
             report.train_rows, desirable, good, report.train_rows - desirable, bad, report.eval_rows,
             report.errors.summary())

    stage.prepare_checkpoints()
    args = KTOConfig(**training_arguments(cfg, stage, eval_ds is not None), max_length=length, beta=cfg.stage.beta,
                     loss_type=cfg.stage.loss_type, desirable_weight=good, undesirable_weight=bad,
                     disable_dropout=True, dataset_num_proc=None)
    model, ref_model, peft_config = policy_and_reference(cfg, source)

    stage.start_logging()
    trainer = PretokenizedKTOTrainer(model=model, ref_model=ref_model, args=args, train_dataset=train_ds,
                                     eval_dataset=eval_ds, processing_class=tokenizer, peft_config=peft_config)
    if cfg.peft.method == "qlora":  # TRL casts adapters to bf16; keep them in the compute dtype (see cast_trainable)
        cast_trainable(trainer.model)
    result = stage.train(trainer)

    metrics = trainer_metrics(stage, trainer, result)
    metrics.update(preference_metrics(trainer, METRICS, evaluate=eval_ds is not None))
    metrics.update({"desirable_weight": good, "undesirable_weight": bad, "data/desirable_rows": desirable})
    metrics.update(report.metrics())
    set_use_cache(trainer.model, True)
    return save_and_commit(stage, trainer, tokenizer, parent, numeric_metrics(metrics))


def checks(cfg) -> list[str]:
    """KTO's KL estimate pairs each prompt with another row's answer of the same micro-batch: it needs two rows."""
    if cfg.stage.loss_type == "kto" and cfg.train.batch_size < 2:
        return [f"train.batch_size={cfg.train.batch_size}: stage.loss_type=kto estimates its reference point from the "
                "other answers of the same micro-batch, so it needs train.batch_size >= 2 (or "
                "stage.loss_type=apo_zero_unpaired)"]
    return []


def footprint(cfg) -> Footprint:
    """The policy and, with full weights, a frozen reference; each row's answer and its KL row's mismatched one."""
    copy = cfg.peft.method == "none"
    return Footprint((Held("policy", trains=True), *([Held("reference")] if copy else [])), pair_rows=2)


SPEC = StageSpec(
    name="kto", schema=KTOStageConfig, run=run, parents=init_parent("sft"), checks=checks, footprint=footprint,
    # the tiny model's 1e-4, not DPO's 3e-4: at 3e-4 KTO fell below SFT on task/arith on 2 of 3 seeds (one collapsed);
    # at 1e-4 it beat SFT on the demo and all four zoo tasks on every seed (docs/quality.md)
    lr={"tiny": 1e-4, "full": 5e-7, "adapter": 5e-6}, policy=True,
    headline=("first_loss", "last_loss", "eval_margin", "eval_kl", "desirable_weight", "undesirable_weight"))
