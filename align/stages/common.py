"""What the training stages share besides StageRun (align/run/stage_run.py): the learning rate a stage declares,
the trainer arguments, the sequence length, saving a TRL trainer's model and committing it, and the metrics
printed and recorded."""

from __future__ import annotations

import logging
import math
from pathlib import Path

import torch
from omegaconf import DictConfig

from align.config import registry
from align.models.loading import describe, is_builtin_tiny, load_for_adapter_trainer, point_adapter_at, resolve_dtype
from align.run import handoff, tracking
from align.run.stage_run import StageResult, StageRun

log = logging.getLogger("align")


def resolve_lr(cfg: DictConfig) -> float:
    if cfg.train.lr is not None:
        return float(cfg.train.lr)
    if is_builtin_tiny(cfg.model.name_or_path):
        kind = "tiny"
    else:
        kind = "full" if cfg.peft.method == "none" else "adapter"
    return registry.get(cfg.stage.name).default_lr(kind)  # each stage declares its own (its StageSpec)


def save_and_commit(stage: StageRun, trainer, tokenizer, parent, metrics: dict, task: str = "causal_lm", warnings: list[dict] | None = None) -> StageResult:
    """A TRL trainer's model saved on every rank (ZeRO gathers), then on the main process committed."""
    main = trainer.is_world_process_zero()
    if parent is not None:
        point_adapter_at(trainer.model, str(parent.model))
    staged = handoff.staging_dir(stage.out) if main else handoff.staged_path(stage.out)
    trainer.save_model(str(staged))
    if main:
        # Trainer pickles its arguments next to the weights; the handoff holds safetensors only
        # (config.yaml has the settings), so nothing in model/ needs unpickling
        (staged / "training_args.bin").unlink(missing_ok=True)
        commit_staged(stage, {handoff.MODEL_DIR: staged}, tokenizer, [parent] if parent else [], parent, metrics,
                      task=task, history=trainer.state.log_history, extra={"warnings": warnings or []})
    return StageResult(stage.out, metrics, trainer.model)


def commit_staged(stage: StageRun, staged: dict[str, Path], tokenizer, parents: list, parent, metrics: dict,
                  task: str = "causal_lm", history: list[dict] | None = None, extra: dict | None = None) -> None:
    """The one commit of every stage that trains (main process): the tokenizer beside each staged folder (model/,
    ppo's critic/), the folders swapped in, stage.json last (StageRun.commit), the summary printed. The base model
    recorded is the parent's (model.name_or_path without one)."""
    for folder in staged.values():
        tokenizer.save_pretrained(folder)
    base = parent.info.get("base_model", str(parent.model)) if parent is not None else stage.cfg.model.name_or_path
    extra_dirs = {k: v for k, v in staged.items() if k != handoff.MODEL_DIR}
    stage.commit(staged[handoff.MODEL_DIR], parents, base, metrics, task=task, extra_dirs=extra_dirs, extra=extra,
                 history=history)
    print_summary(stage.cfg.stage.name, metrics, stage.out)


def training_arguments(cfg: DictConfig, run: StageRun, has_eval: bool) -> dict:
    """Keyword arguments shared by every TRL config (SFTConfig, RewardConfig, DPOConfig)."""
    t = cfg.train
    dtype = resolve_dtype(cfg.model.dtype)
    kwargs = dict(
        output_dir=str(run.checkpoints),
        per_device_train_batch_size=t.batch_size,
        per_device_eval_batch_size=t.batch_size,
        gradient_accumulation_steps=t.grad_accum,
        learning_rate=resolve_lr(cfg),
        num_train_epochs=t.epochs,
        max_steps=t.max_steps,
        lr_scheduler_type=t.lr_scheduler,
        warmup_steps=t.warmup_ratio,
        weight_decay=t.weight_decay,
        max_grad_norm=t.max_grad_norm,
        seed=t.seed,
        data_seed=t.seed,
        logging_steps=t.logging_steps,
        logging_first_step=True,
        eval_strategy="steps" if (has_eval and t.eval_steps > 0) else "no",
        eval_steps=t.eval_steps if t.eval_steps > 0 else None,
        save_strategy="steps",
        save_steps=t.save_steps,
        save_total_limit=None,  # align rotates, and only after the newer checkpoint is committed (guards.py)
        bf16=dtype == torch.bfloat16,
        fp16=dtype == torch.float16,
        use_cpu=not torch.cuda.is_available(),
        **{checkpointing_argument(): cfg.model.gradient_checkpointing},
        report_to=["wandb"] if (cfg.logger.backend == "wandb") else [],
        run_name=cfg.logger.name or f"{cfg.run.name}-{cfg.stage.name}",
        disable_tqdm=False,
        dataloader_num_workers=0,
        deepspeed=run.ds_config,
    )
    return kwargs


def checkpointing_argument() -> str:
    """TrainingArguments' name for activation checkpointing: activation_checkpointing from transformers 5.20 on
    (gradient_checkpointing is then a deprecated alias), gradient_checkpointing before."""
    from transformers import TrainingArguments

    fields = TrainingArguments.__dataclass_fields__
    return "activation_checkpointing" if "activation_checkpointing" in fields else "gradient_checkpointing"


MODEL_LIMIT_UNSET = 10**7  # transformers' stand-in model_max_length when a tokenizer names none


def policy_and_reference(cfg: DictConfig, source: str, reference: bool = True):
    """(policy, reference or None, PEFT config or None) for a TRL preference trainer (dpo, kto): under LoRA the
    reference is the policy with its adapter off, with precomputed log-probs (or a loss that needs no reference:
    `reference=False`) there is none, otherwise a frozen copy."""
    model, peft_config = load_for_adapter_trainer(source, cfg.model, cfg.peft)
    ref_model = None
    if not reference:
        log.info("policy from %s: %s; no reference (the loss needs none)", source, describe(model))
        return model, None, peft_config
    if peft_config is None and not cfg.stage.get("precompute_ref_logps", False):
        ref_model, _ = load_for_adapter_trainer(source, cfg.model, cfg.peft)
        ref_model.requires_grad_(False)
        ref_model.eval()
    log.info("policy from %s: %s; reference: %s", source, describe(model),
             "the same weights, adapter off" if peft_config is not None else
             "precomputed log-probs" if ref_model is None else "a frozen copy")
    return model, ref_model, peft_config


def preference_metrics(trainer, names: dict, evaluate: bool) -> dict:
    """A TRL preference trainer's statistics (dpo, kto) under align's names (`names`: TRL's -> ours): train_<ours> at
    the last logged training step, train_first_margin at the first that logged a margin (margins should grow), and
    with `evaluate` eval_loss and eval_<ours> from a final evaluation."""
    steps = [h for h in trainer.state.log_history if "loss" in h and any(theirs in h for theirs in names)]
    out = {f"train_{ours}": steps[-1][theirs] for theirs, ours in names.items() if theirs in steps[-1]} if steps else {}
    margins = [h["rewards/margins"] for h in steps if "rewards/margins" in h]
    if margins:
        out["train_first_margin"] = margins[0]
    if evaluate:
        ev = trainer.evaluate()
        out["eval_loss"] = ev.get("eval_loss")
        out.update({f"eval_{ours}": ev[f"eval_{theirs}"] for theirs, ours in names.items() if f"eval_{theirs}" in ev})
    return out


def max_length(cfg: DictConfig, tokenizer) -> int:
    """train.max_length, capped at the model's own limit (its tokenizer's model_max_length): the default 2048
    must not ask a 512-position model for positions it does not have."""
    limit = getattr(tokenizer, "model_max_length", None) or MODEL_LIMIT_UNSET
    if limit < MODEL_LIMIT_UNSET and cfg.train.max_length > limit:
        log.info("train.max_length=%d is above the model's limit of %d tokens: using %d", cfg.train.max_length,
                 limit, limit)
        return int(limit)
    return cfg.train.max_length


def start_from(cfg: DictConfig, parent_stage: str, override: str | None) -> tuple[handoff.Parent | None, str]:
    """(parent, model source) of a stage that starts from `parent_stage`'s output (or `override`: stage.init,
    a path, or `base`); without one it starts from model.name_or_path, and says so."""
    parent = handoff.find_parent(cfg, parent_stage, override)
    source = str(parent.model) if parent else cfg.model.name_or_path
    if parent is None:
        if cfg.stage.init == handoff.BASE:
            log.info("stage.init=base: starting from %s", source)
        else:
            log.info("no completed %s in run %s: starting from %s", parent_stage, cfg.run.name, source)
    return parent, source


def trainer_metrics(stage: StageRun, trainer, result) -> dict:
    """What every TRL stage records of its training: losses (first, last, per logged step), runtime, steps,
    non-finite steps skipped."""
    return {"train_loss": result.training_loss, **log_history_metrics(trainer.state.log_history),
            "train_runtime_s": result.metrics.get("train_runtime"), "global_step": trainer.state.global_step,
            "nonfinite_steps_skipped": stage.skipped_steps}


def log_history_metrics(log_history: list[dict]) -> dict:
    """First and last logged training loss: what a user compares to see that training worked."""
    losses = [h["loss"] for h in log_history if "loss" in h]
    out = {}
    if losses:
        out["first_loss"] = losses[0]
        out["last_loss"] = losses[-1]
    return out


def numeric_metrics(metrics: dict) -> dict:
    """The numbers of `metrics` for stage.json: finite floats rounded to 6 places, ints and non-finite floats
    kept as they are (a NaN loss is worth recording), everything else dropped."""
    out = {}
    for k, v in metrics.items():
        if isinstance(v, bool) or not isinstance(v, (int, float)):
            continue
        out[k] = round(v, 6) if isinstance(v, float) and math.isfinite(v) else v
    return out


def print_summary(stage: str, metrics: dict, out: Path) -> None:
    if not tracking.is_main_process():
        return
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"{stage}: final metrics")
    table.add_column("metric")
    table.add_column("value", justify="right")
    for k, v in metrics.items():
        table.add_row(k, f"{v:.4f}" if isinstance(v, float) else str(v))
    console = Console()
    console.print(table)
    console.print(f"[bold]{stage} output:[/bold] {out}")
