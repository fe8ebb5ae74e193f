"""The stage-output contract as a stage lives it: its folder (a link from the cache replaced by a real folder), its
lock, its checkpoints (resume, or kept aside when a forced re-run starts over), the training loop's durability
(committed checkpoints, preemption, the non-finite guard: guards.py), W&B, and the commit that writes stage.json
last. Every stage, built-in or not, writes through StageRun."""

from __future__ import annotations

import ast
import json
import logging
import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

from omegaconf import DictConfig

from align.config.deepspeed import deepspeed_config
from align.models import distributed
from align.run import checkpointing, handoff, tracking
from align.run.lock import LOCK_FILE, StageLock, StageLocked, release_held
from align.run.preemption import Preempted, SignalFlag, TrainingDiverged

log = logging.getLogger("align")

HASH_FILE = ".config_hash"
IDENTITY_FILE = ".identity.json"  # beside HASH_FILE: the config and inputs the checkpoints were trained with
ASIDE = checkpointing.ASIDE


class CheckpointsKept(handoff.HandoffError):
    """An interrupted run's checkpoints would be lost: refused before anything loads."""
SHARED_DATA = "shared_data"  # checkpoints/shared_data: datasets every rank reads (StageRun.shared_datasets)


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
        self.ds_config = deepspeed_config(self.cfg)  # validated before anything loads
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
        from align.run.guards import CommitCheckpoints, SkipNonFinite, StopOnSignal

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
