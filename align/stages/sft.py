"""SFT: instruction tuning on TRL's SFTTrainer, loss on assistant tokens only.

Reads top to bottom: output dir -> tokenizer -> data (validated before any model loads) ->
model (+LoRA/QLoRA) -> trainer -> train -> evaluate -> save -> commit.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass

from omegaconf import DictConfig

from align.config.registry import StageSpec
from align.config.schema import StageConfig, keyed
from align.data.loader import sft_datasets
from align.data.packing import FLAT, ROWS, RowPackedCollator, pack_rows, packed_layout, row_packed_trainer
from align.models.loading import (
    cast_trainable,
    describe,
    load_causal_lm,
    load_tokenizer,
    resolve_name,
    set_use_cache,
)
from align.run import handoff
from align.run.stage_run import StageResult, StageRun
from align.stages.common import max_length, numeric_metrics, save_and_commit, trainer_metrics, training_arguments

log = logging.getLogger("align")


@dataclass
class SFTStageConfig(StageConfig):
    name: str = "sft"
    packing: bool = keyed(False, help="pack whole examples into train.max_length rows")


def run(cfg: DictConfig) -> StageResult:
    from trl import SFTConfig, SFTTrainer

    stage = StageRun(cfg)
    parent = handoff.find_parent(cfg, "init", cfg.stage.init) if cfg.stage.init else None
    source = str(parent.model) if parent else cfg.model.name_or_path

    tokenizer = load_tokenizer(resolve_name(source), cfg.model)
    length = max_length(cfg, tokenizer)
    train_ds, eval_ds, report = sft_datasets(cfg.data, tokenizer, length, cfg.train.seed)
    log.info("data: %d train rows, %d eval rows; %s", report.train_rows, report.eval_rows, report.errors.summary())

    model = load_causal_lm(source, cfg.model, cfg.peft)
    log.info("model %s: %s", source, describe(model))

    layout, trainer_cls, collator, train_ds = _packing(cfg, model, tokenizer, train_ds, length, SFTTrainer)

    stage.prepare_checkpoints()
    stage.start_logging()
    args = SFTConfig(
        **training_arguments(cfg, stage, eval_ds is not None),
        max_length=length,
        packing=layout == FLAT,  # ROWS: packed above, batched by RowPackedCollator
        packing_strategy="bfd",
        padding_free=layout == FLAT,
        eval_packing=False,
        completion_only_loss=False,  # labels are built by align's loader (assistant tokens only)
        assistant_only_loss=False,
        dataset_num_proc=None,
    )
    trainer = trainer_cls(
        model=model, args=args, train_dataset=train_ds, eval_dataset=eval_ds, processing_class=tokenizer,
        data_collator=collator,
    )
    if cfg.peft.method == "qlora":
        cast_trainable(trainer.model)
    result = stage.train(trainer)

    metrics = trainer_metrics(stage, trainer, result)
    metrics["train_tokens_per_s"] = _tokens_per_s(trainer, result)
    if eval_ds is not None:
        ev = trainer.evaluate()
        metrics["eval_loss"] = ev["eval_loss"]
        metrics["eval_perplexity"] = math.exp(min(ev["eval_loss"], 50.0))
        if "eval_mean_token_accuracy" in ev:
            metrics["eval_token_accuracy"] = ev["eval_mean_token_accuracy"]
    metrics.update(report.metrics())
    metrics = numeric_metrics(metrics)

    set_use_cache(trainer.model, True)
    return save_and_commit(stage, trainer, tokenizer, parent, metrics)


def _packing(cfg: DictConfig, model, tokenizer, train_ds, length: int, trainer_cls):
    """(layout, trainer class, collator, train rows) for stage.packing: [B, L] rows for sdpa/eager attention,
    one flattened sequence (TRL's own) for flash attention; none without packing."""
    layout = packed_layout(model.config._attn_implementation) if cfg.stage.packing else None
    collator = None
    if layout == ROWS:
        train_ds = pack_rows(train_ds, length)
        trainer_cls, collator = row_packed_trainer(trainer_cls), RowPackedCollator(tokenizer.pad_token_id)
        model.config.get_text_config().pad_token_id = tokenizer.pad_token_id  # as TRL does for its own collator
        model.generation_config.pad_token_id = tokenizer.pad_token_id
    if layout:
        log.info("packing: %s (attention: %s)", layout, model.config._attn_implementation)
    return layout, trainer_cls, collator, train_ds


def _tokens_per_s(trainer, result) -> float | None:
    tokens = trainer.state.num_input_tokens_seen or None
    runtime = result.metrics.get("train_runtime")
    if not tokens:
        tokens = next((h.get("num_tokens") for h in reversed(trainer.state.log_history) if "num_tokens" in h), None)
    return tokens / runtime if tokens and runtime else None


SPEC = StageSpec(
    name="sft", schema=SFTStageConfig, run=run,
    parents=lambda cfg: [("init", cfg.stage.init)] if cfg.stage.init else [],
    # learning rates: chosen on the demo and the task zoo over seeds and CPU kernels (docs/quality.md)
    lr={"tiny": 1e-3, "full": 2e-5, "adapter": 2e-4}, policy=True,
    headline=("first_loss", "last_loss", "eval_loss", "eval_token_accuracy"))
