"""Callbacks every TRL-based stage (sft, rm, dpo) trains with: committed checkpoints, preemption,
and skipping updates whose gradients are not finite."""

from __future__ import annotations

import logging
from pathlib import Path

import torch
from transformers import TrainerCallback

from align.run import checkpointing

from align.models import distributed
log = logging.getLogger("align")


class CommitCheckpoints(TrainerCallback):
    """After the Trainer has written checkpoint-N on every rank: mark it committed, then rotate."""

    def __init__(self, keep: int):
        self.keep = keep

    def on_save(self, args, state, control, **kwargs):
        path = Path(args.output_dir) / f"checkpoint-{state.global_step}"
        checkpointing.commit_when_all_written(path, self.keep, state.is_world_process_zero,
                                              {"global_step": state.global_step})


class StopOnSignal(TrainerCallback):
    """At a step boundary after SIGTERM/SIGINT (on any rank): save a checkpoint and stop."""

    def __init__(self, flag):
        self.flag, self.stopped_at = flag, None

    def on_step_end(self, args, state, control, **kwargs):
        if self.flag.requested():
            control.should_save = True
            control.should_training_stop = True
            self.stopped_at = state.global_step


class SkipNonFinite(TrainerCallback):
    """A non-finite gradient (from a NaN/inf loss or an overflow) drops that optimizer update on every
    rank; `max_bad` such steps in a row stop the run.

    Where the optimizer step already skips non-finite gradients itself — DeepSpeed ZeRO (it all-reduces
    an overflow flag over the ranks and skips the step, for fp32, bf16 and fp16 alike) or an fp16
    GradScaler — this only counts those skips (`accelerator.optimizer_step_was_skipped`): zeroing the
    gradients first would hide the overflow from a loss scaler. Otherwise (one process, DDP) it checks
    `param.grad` itself, agreed over the ranks, and drops the gradients of a bad step."""

    def __init__(self, max_bad: int, accelerator):
        from accelerate.utils import DistributedType

        self.max_bad, self.accelerator = max_bad, accelerator
        self.skipped, self.in_a_row, self.diverged_at = 0, 0, None
        self._dropped = False
        self.optimizer_skips_itself = (accelerator.distributed_type == DistributedType.DEEPSPEED
                                       or getattr(accelerator, "scaler", None) is not None)

    def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
        self._dropped = False
        if self.optimizer_skips_itself:
            return
        grads = [p.grad for p in model.parameters() if p.grad is not None]
        finite = bool(torch.stack([torch.isfinite(g).all() for g in grads]).all()) if grads else True
        if distributed.all_reduce_scalar(finite, "min"):
            return
        for p in model.parameters():
            p.grad = None  # the optimizer skips parameters without a gradient
        self._dropped = True

    def on_optimizer_step(self, args, state, control, **kwargs):
        if not (self._dropped or self.accelerator.optimizer_step_was_skipped):
            self.in_a_row = 0
            return
        self.skipped += 1
        self.in_a_row += 1
        log.warning("step %d: non-finite gradient, update skipped (%d in a row, %d in all)",
                    state.global_step + 1, self.in_a_row, self.skipped)
        if self.in_a_row >= self.max_bad:
            control.should_training_stop = True
            self.diverged_at = state.global_step + 1
