"""ZeRO-3 gathering for the online loop: the policy's weights gathered once per rollout (or a step's models once
per step) instead of layer by layer in every forward, when they fit; outside ZeRO-3 nothing changes."""

from __future__ import annotations

from contextlib import contextmanager

import torch

from align.models import distributed
from align.rl.engine import Trainable, frozen_engine


@contextmanager
def generation_weights(trainable: Trainable, mode: str = "auto"):
    """Under ZeRO-3 every generated token would gather the sharded weights layer by layer from every rank. When
    the whole policy fits (mode auto: its full weights take under a quarter of the free memory; on: always),
    gather it once for the rollout (gathered_unhooked: the idea of DeepSpeed-Chat's hybrid engine). Yields
    whether the ranks must still generate in lock-step (synced_gpus): only when the weights stay sharded."""
    engine = trainable.engine
    if engine is None or engine.zero_optimization_stage() != 3 or mode == "off" or (
            mode == "auto" and not _fits_gathered([engine.module])):
        yield True
        return
    with gathered_unhooked([engine]):
        yield False


@contextmanager
def step_weights(trainables, frozen=(), mode: str = "auto"):
    """Under ZeRO-3 every forward and backward of a step gathers each layer's weights from every rank and frees
    them again, through DeepSpeed's hooks on every module: on a small model or a slow interconnect that costs
    more than the arithmetic (2 CPU ranks: a PPO step 4x its ZeRO-2 time). When the models of a step fit
    (mode auto: their full weights take under a quarter of the free memory; on: always), hold them gathered for
    the whole step (gathered_unhooked); gradients are still reduce-scattered and the optimizer state stays
    sharded. Models whose shards are offloaded to CPU memory (deepspeed=zero3_offload, stage.frozen_device=cpu)
    are left as they are: their memory is what the user asked to save. `frozen`: models only run (frozen(): a
    reward model, a reference). Yields the engines it gathered (none outside ZeRO-3)."""
    engines = [t.engine for t in trainables] + [frozen_engine(m) for m in frozen]
    engines = [e for e in engines if e is not None and e.zero_optimization_stage() == 3 and not _offloaded(e)]
    if not engines or mode == "off" or (mode == "auto" and not _fits_gathered([e.module for e in engines])):
        yield []
        return
    with gathered_unhooked(engines, [t for t in trainables if t.engine in engines]):
        yield engines


def _offloaded(engine) -> bool:
    offload = engine.zero_offload_param()
    return offload is not None and offload.device != "none"


@contextmanager
def gathered_unhooked(engines, trainables=()):
    """The weights of ZeRO-3 `engines` gathered in one collective (per dtype) and ZeRO-3's module hooks taken off,
    as DeepSpeed's own generation context does, so forwards and backwards run on whole weights with no per-layer
    gathers. DeepSpeed's optimizer step re-shards its model's weights: after each step of `trainables` they are
    gathered again, with the new values. On exit the hooks come back and the weights are sharded again."""
    from deepspeed.runtime.zero.partition_parameters import ZeroParamStatus

    seen: dict[int, torch.nn.Parameter] = {}
    for engine in engines:
        for p in engine.module.parameters():
            seen.setdefault(p.ds_id, p)
    params = [seen[k] for k in sorted(seen)]  # the same order on every rank

    def gather() -> None:
        missing = [p for p in params if p.ds_status == ZeroParamStatus.NOT_AVAILABLE]
        if missing:
            missing[0].all_gather_coalesced(missing).wait()

    offloads = [_parameter_offload(e) for e in engines]
    for offload in offloads:
        for hook in offload.forward_hooks + offload.backward_hooks:
            hook.remove()
        offload.forward_hooks, offload.backward_hooks = [], []
    gather()
    for t in trainables:
        t.after_step.append(gather)
    try:
        yield
    finally:
        for t in trainables:
            t.after_step.remove(gather)
        for offload in offloads:
            offload._register_deepspeed_module(offload.module)
        held = [p for p in params if p.ds_status == ZeroParamStatus.AVAILABLE and not p.ds_persist]
        if held:
            held[0].partition(param_list=held)


def _parameter_offload(engine):
    """Where a ZeRO-3 engine keeps its module hooks (as deepspeed.runtime.zero.stage3's generation context finds
    them: the optimizer's parameter offload, or a frozen engine's DeepSpeedZeRoOffload itself)."""
    optimizer = engine.optimizer
    return optimizer.parameter_offload if hasattr(optimizer, "parameter_offload") else optimizer


def _fits_gathered(modules) -> bool:
    """Whether the full weights of `modules` fit to be gathered (_fits_bytes)."""
    return _fits_bytes(sum(getattr(p, "ds_numel", p.numel()) * p.element_size() for m in modules
                           for p in m.parameters()))


def _fits_bytes(full: int) -> bool:
    """Whether `full` bytes take under a quarter of the free memory on every rank: the ranks decide together (a
    collective), since one rank gathering while another keeps ZeRO-3's hooks would leave their collectives
    unmatched."""
    return distributed.all_reduce_scalar(float(_fits_here(full)), "min") == 1.0


def _fits_here(full: int) -> bool:
    if torch.cuda.is_available():
        free, _ = torch.cuda.mem_get_info()
    else:
        import psutil

        free = psutil.virtual_memory().available
    return full < free / 4
