"""What every stage shares: output directory, resume, trainer arguments, the commit, the summary."""

from __future__ import annotations

import ast
import json
import logging
import math
import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from omegaconf import DictConfig

from align import checkpointing, distributed, handoff, stages, tracking
from align.lock import LOCK_FILE, StageLock, StageLocked, release_held
from align.preemption import Preempted, SignalFlag, TrainingDiverged
from align.models.loading import is_builtin_tiny, point_adapter_at, resolve_dtype

log = logging.getLogger("align")

HASH_FILE = ".config_hash"
IDENTITY_FILE = ".identity.json"  # beside HASH_FILE: the config and inputs the checkpoints were trained with
ASIDE = checkpointing.ASIDE


class CheckpointsKept(handoff.HandoffError):
    """An interrupted run's checkpoints would be lost: refused before anything loads."""
SHARED_DATA = "shared_data"  # checkpoints/shared_data: datasets every rank reads (StageRun.shared_datasets)


def resolve_lr(cfg: DictConfig) -> float:
    if cfg.train.lr is not None:
        return float(cfg.train.lr)
    if is_builtin_tiny(cfg.model.name_or_path):
        kind = "tiny"
    else:
        kind = "full" if cfg.peft.method == "none" else "adapter"
    return stages.get(cfg.stage.name).default_lr(kind)  # each stage declares its own (its StageSpec)


def weights_kind(cfg: DictConfig) -> str:
    return "full" if cfg.peft.method == "none" else cfg.peft.method


class TiedKeysFilter(logging.Filter):
    """Drops the Trainer's resume warning about missing keys when every one of them is a tied weight
    (lm_head.weight shares the embeddings' tensor, so checkpoints rightly leave it out)."""

    PREFIX = "There were missing keys in the checkpoint model loaded: "

    def __init__(self, model):
        super().__init__()
        tied = set()
        for module in model.modules():
            keys = getattr(module, "_tied_weights_keys", None) or ()
            tied |= set(keys)
        self.tied = tied

    def filter(self, record: logging.LogRecord) -> bool:
        msg = record.getMessage()
        if not msg.startswith(self.PREFIX):
            return True
        try:
            missing = ast.literal_eval(msg[len(self.PREFIX):].rstrip("."))
        except (ValueError, SyntaxError):
            return True
        return not all(any(k == t or k.endswith("." + t) for t in self.tied) for k in missing)


@dataclass
class StageResult:
    out: Path
    metrics: dict
    model: object = None  # the trained model, still in memory (tests compare it with the saved one)


@dataclass
class StageRun:
    """One stage's output directory, lifetime and record."""

    cfg: DictConfig
    out: Path = field(init=False)
    started: float = field(default_factory=time.time)
    wandb_run: object = None
    resume_from: str | None = None
    lock: StageLock | None = None
    skipped_steps: int = 0  # updates dropped by the non-finite guard

    def __post_init__(self):
        from transformers import set_seed

        # before any model is built: new heads (the RM's score head) and fresh adapters are initialised
        # from this, not from whatever the process drew before
        set_seed(self.cfg.train.seed)
        self.out = handoff.stage_dir(self.cfg)
        self.identity = handoff.identity(self.cfg)
        self.config_hash = handoff.config_hash(self.cfg, self.identity)
        self.ds_config = distributed.deepspeed_config(self.cfg)  # validated before anything loads
        self.start_over = self._check_checkpoints()  # before anything loads: refuse rather than lose a run
        distributed.init(self.cfg)
        refused = None
        if tracking.is_main_process():
            if self.out.is_symlink():  # linked to another run's output by the cache: train into our own
                self.out.unlink()
            self.out.mkdir(parents=True, exist_ok=True)
            try:
                self.lock = StageLock(self.out).acquire()  # held until the commit
            except StageLocked as e:
                refused = str(e)
        refused = distributed.broadcast_object(refused)  # every rank stops, not only rank 0
        if refused:
            raise StageLocked(refused)

    @property
    def checkpoints(self) -> Path:
        return self.out / handoff.CHECKPOINTS

    def _check_checkpoints(self) -> bool:
        """Whether this run starts over (else it resumes). Raises CheckpointsKept when starting over would
        discard an interrupted run's checkpoints that were trained with another config or data."""
        marker = self.checkpoints / HASH_FILE
        recorded = marker.read_text().strip() if marker.is_file() else None
        latest = checkpointing.latest(self.checkpoints)
        if recorded == self.config_hash and latest is not None and self.cfg.run.resume and not self.cfg.run.force:
            return False
        if latest is None or self.cfg.run.force or not self.cfg.run.resume:
            return True
        if handoff.is_complete(self.out) and handoff.read_stage_json(self.out).get("config_hash") == recorded:
            return True  # the checkpoints of the complete output, not of an interrupted run
        ident = self.checkpoints / IDENTITY_FILE
        old = json.loads(ident.read_text()) if ident.is_file() else {}
        raise CheckpointsKept(
            f"{self.checkpoints} holds an interrupted run's checkpoint ({latest.name}) trained with another "
            f"config: {handoff.changes(old, self.identity)}. Nothing was changed. To resume it, run with the same "
            f"config; to start over, add run.force=true (its checkpoints are kept in {self.out / ASIDE} until the "
            f"new run commits its first checkpoint)")

    def prepare_checkpoints(self) -> None:
        """Resume from the latest checkpoint when the config matches; otherwise start clean, with the old
        checkpoints kept aside until the new run has committed one (checkpointing.commit_when_all_written)."""
        if not self.start_over:
            found = checkpointing.within_budget(self.checkpoints)  # committed ones only: never a half-written one
            if found is not None:
                self.resume_from = str(found)
                log.info("resuming from %s", self.resume_from)
                return
            log.info("%s is the end of training: training again from the start (same config and data; the "
                     "result is the same)", checkpointing.latest(self.checkpoints))
        if tracking.is_main_process():
            if checkpointing.latest(self.checkpoints) is not None:
                shutil.rmtree(self.out / ASIDE, ignore_errors=True)
                os.replace(self.checkpoints, self.out / ASIDE)
            else:
                shutil.rmtree(self.checkpoints, ignore_errors=True)
            self.checkpoints.mkdir(parents=True)
            (self.checkpoints / IDENTITY_FILE).write_text(json.dumps(self.identity, default=str))
            (self.checkpoints / HASH_FILE).write_text(self.config_hash + "\n")
        distributed.barrier()  # no rank starts writing checkpoints into a folder rank 0 is clearing

    def shared_datasets(self, *datasets):
        """The datasets as every rank's copy of one folder on disk (under checkpoints/, rewritten on each start).

        An in-memory dataset caches `map` results in a temporary folder of its own process; TRL's
        precomputed reference log-probs are mapped on rank 0 and read by name on the others, so under a
        launcher the data must live where all ranks look. One process: the datasets unchanged."""
        if distributed.world_size() == 1:
            return datasets
        from datasets import load_from_disk

        folder = self.checkpoints / SHARED_DATA
        if tracking.is_main_process():
            shutil.rmtree(folder, ignore_errors=True)
            for i, ds in enumerate(datasets):
                if ds is not None:
                    ds.save_to_disk(str(folder / str(i)))
        distributed.barrier()
        return tuple(None if ds is None else load_from_disk(str(folder / str(i))) for i, ds in enumerate(datasets))

    def train(self, trainer):
        """trainer.train() with committed checkpoints, preemption and the non-finite guard; resumes
        from the latest committed checkpoint when prepare_checkpoints found one."""
        from align.stages.guards import CommitCheckpoints, SkipNonFinite, StopOnSignal

        trainer.create_model_card = lambda *args, **kwargs: None  # TRL's card in checkpoints/ names no base ("[None]")
        quiet = TiedKeysFilter(trainer.model)
        trainer_log = logging.getLogger("transformers.trainer")
        trainer_log.addFilter(quiet)
        with SignalFlag() as flag:
            stop, guard = StopOnSignal(flag), SkipNonFinite(self.cfg.train.max_bad_steps, trainer.accelerator)
            for callback in (CommitCheckpoints(self.cfg.train.keep_checkpoints), guard, stop):
                trainer.add_callback(callback)
            try:
                result = trainer.train(resume_from_checkpoint=self.resume_from)
            finally:
                trainer_log.removeFilter(quiet)
        self.skipped_steps = guard.skipped
        name = self.cfg.stage.name
        if guard.diverged_at is not None:
            latest = checkpointing.latest(self.checkpoints)
            raise TrainingDiverged(
                f"{name}: {guard.in_a_row} non-finite steps in a row (train.max_bad_steps={self.cfg.train.max_bad_steps}) "
                f"at step {guard.diverged_at}; stopped. Lower train.lr or check the data. "
                + (f"The last good checkpoint is {latest}." if latest else "No checkpoint was written yet."))
        if stop.stopped_at is not None:
            raise Preempted.after_save(name, flag, stop.stopped_at, checkpointing.latest(self.checkpoints))
        return result

    def start_logging(self) -> None:
        self.wandb_run = tracking.start(self.cfg, self.out)

    def commit(self, staged_model: Path | None, parents: list[handoff.Parent], base_model: str, metrics: dict,
               task: str = "causal_lm", extra_dirs: dict[str, Path] | None = None, extra: dict | None = None,
               history: list[dict] | None = None, extra_files: dict[str, str] | None = None) -> dict:
        record = {
            "stage": self.cfg.stage.name,
            "task": task,
            "run": self.cfg.run.name,
            "parents": [p.as_record() for p in parents],
            "base_model": base_model,
            "weights": weights_kind(self.cfg),
            "adapter": self.cfg.peft.method != "none",
            "distributed": {"world_size": distributed.world_size(), "zero_stage": self.cfg.deepspeed.zero_stage},
            "config_hash": self.config_hash,
            "inputs": self.identity["inputs"],
            "metrics": metrics,
            "wall_time_s": round(time.time() - self.started, 2),
            "versions": handoff.versions(),
            "wandb_run_id": self.wandb_run.id if self.wandb_run is not None else None,
            **(extra or {}),
        }
        record = handoff.commit(self.out, staged_model, self.cfg, record, extra_dirs, history, extra_files)
        shutil.rmtree(self.out / ASIDE, ignore_errors=True)  # a forced re-run that saved no checkpoint
        if self.lock is not None:
            self.lock.release()
        tracking.finish(self.wandb_run, metrics)
        return record


def discard_if_unstarted(cfg: DictConfig) -> None:
    """After a stage failed: remove its folder when the run left nothing in it but its lock (a bad file or
    a missing parent found before training), so no empty stage folder is mistaken for a started one."""
    out = handoff.stage_dir(cfg)
    if not tracking.is_main_process() or out.is_symlink() or not out.is_dir():
        return
    if {p.name for p in out.iterdir()} <= {LOCK_FILE}:
        release_held(out)
        shutil.rmtree(out, ignore_errors=True)
        if out.parent.is_dir() and not any(out.parent.iterdir()):
            out.parent.rmdir()  # the run folder this stage made


def save_and_commit(stage: StageRun, trainer, tokenizer, parent, base_model: str, metrics: dict,
                    task: str = "causal_lm", warnings: list[dict] | None = None) -> StageResult:
    """Save on every rank (ZeRO gathers), then on the main process swap the model in and write stage.json."""
    main = trainer.is_world_process_zero()
    if parent is not None:
        point_adapter_at(trainer.model, str(parent.model))
    staged = handoff.staging_dir(stage.out) if main else handoff.staged_path(stage.out)
    trainer.save_model(str(staged))
    if main:
        # Trainer pickles its arguments next to the weights; the handoff holds safetensors only
        # (config.yaml has the settings), so nothing in model/ needs unpickling
        (staged / "training_args.bin").unlink(missing_ok=True)
        tokenizer.save_pretrained(staged)
        if parent is not None:
            base_model = parent.info.get("base_model", str(parent.model))
        stage.commit(staged, [parent] if parent else [], base_model, metrics, task=task,
                     history=trainer.state.log_history, extra={"warnings": warnings or []})
        print_summary(stage.cfg.stage.name, metrics, stage.out)
    return StageResult(stage.out, metrics, trainer.model)


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
        activation_checkpointing=cfg.model.gradient_checkpointing,
        report_to=["wandb"] if (cfg.logger.backend == "wandb") else [],
        run_name=cfg.logger.name or f"{cfg.run.name}-{cfg.stage.name}",
        disable_tqdm=False,
        dataloader_num_workers=0,
        deepspeed=run.ds_config,
    )
    return kwargs


MODEL_LIMIT_UNSET = 10**7  # transformers' stand-in model_max_length when a tokenizer names none


def max_length(cfg: DictConfig, tokenizer) -> int:
    """train.max_length, capped at the model's own limit (its tokenizer's model_max_length): the default 2048
    must not ask a 512-position model for positions it does not have."""
    limit = getattr(tokenizer, "model_max_length", None) or MODEL_LIMIT_UNSET
    if limit < MODEL_LIMIT_UNSET and cfg.train.max_length > limit:
        log.info("train.max_length=%d is above the model's limit of %d tokens: using %d", cfg.train.max_length,
                 limit, limit)
        return int(limit)
    return cfg.train.max_length


def log_no_parent(cfg: DictConfig, parent_stage: str, source: str) -> None:
    if cfg.stage.init == handoff.BASE:
        log.info("stage.init=base: starting from %s", source)
    else:
        log.info("no completed %s in run %s: starting from %s", parent_stage, cfg.run.name, source)


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
