"""Ranks and DeepSpeed: the ZeRO JSON built from `deepspeed.*` and `train.*`, process-group setup, barriers.

Under `deepspeed --num_gpus N launch/<stage>.sh` every rank runs the same stage with the same
config, so every rank computes the same output directory; only rank 0 writes files. A plain
`python -m align deepspeed=zero2` (no launcher) runs as a world of one.
"""

from __future__ import annotations

import os
import socket

OFFLOAD_DEVICES = ("none", "cpu")


def enabled(cfg) -> bool:
    return cfg.deepspeed.zero_stage >= 0


def deepspeed_config(cfg) -> dict | None:
    """The DeepSpeed JSON for the HF Trainer, "auto" values filled by it from train.* (batch, accumulation,
    clipping, precision, lr); None when `deepspeed=none`."""
    ds = cfg.deepspeed
    if not enabled(cfg):
        return None
    stage = int(ds.zero_stage)
    if stage not in (0, 1, 2, 3):
        raise ValueError(f"deepspeed.zero_stage must be -1 (off) or 0-3, got {stage}")
    for key in ("offload_optimizer", "offload_param"):
        if ds[key] not in OFFLOAD_DEVICES:
            raise ValueError(f"deepspeed.{key} must be one of {', '.join(OFFLOAD_DEVICES)}, got {ds[key]!r}")
    if ds.offload_param != "none" and stage != 3:
        raise ValueError(f"deepspeed.offload_param needs ZeRO-3 (deepspeed=zero3_offload); zero_stage is {stage}")
    if ds.offload_optimizer != "none" and stage == 0:
        raise ValueError("deepspeed.offload_optimizer needs ZeRO stage 1, 2 or 3")

    zero: dict = {"stage": stage}
    if stage >= 1:
        zero.update(overlap_comm=ds.overlap_comm, contiguous_gradients=ds.contiguous_gradients,
                    reduce_bucket_size=ds.bucket_size)
    if stage == 3:
        zero.update(
            stage3_prefetch_bucket_size=ds.bucket_size,
            stage3_param_persistence_threshold="auto",
            # save_model() writes full 16-bit weights (plain transformers can load model/), not only shards
            stage3_gather_16bit_weights_on_model_save=True,
        )
    if ds.offload_optimizer != "none":
        zero["offload_optimizer"] = {"device": ds.offload_optimizer, "pin_memory": _pin_memory()}
    if ds.offload_param != "none":
        zero["offload_param"] = {"device": ds.offload_param, "pin_memory": _pin_memory()}

    config = {
        "train_micro_batch_size_per_gpu": "auto",
        "train_batch_size": "auto",
        "gradient_accumulation_steps": "auto",
        "gradient_clipping": "auto",
        "bf16": {"enabled": "auto", "check_grad_overflow": True},  # skip non-finite steps (guards.SkipNonFinite)
        "fp16": {"enabled": "auto"},
        "zero_optimization": zero,
        "steps_per_print": 10**9,  # the trainer logs; DeepSpeed's own step prints would interleave
        "wall_clock_breakdown": False,
    }
    if ds.offload_optimizer != "none":
        # an offloaded optimizer must be DeepSpeed's own (CPU Adam); its settings come from train.*
        config["optimizer"] = {"type": "AdamW", "params": {"lr": "auto", "betas": "auto", "eps": "auto",
                                                           "weight_decay": "auto"}}
    from omegaconf import OmegaConf

    extra = OmegaConf.to_container(ds.extra, resolve=True) if ds.extra else {}
    return _merge(config, extra)


def _merge(base: dict, extra: dict) -> dict:
    out = dict(base)
    for key, value in extra.items():
        out[key] = _merge(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


def _pin_memory() -> bool:
    import torch

    return torch.cuda.is_available()


def ensure_world() -> None:
    """Give a launcher-less process the env of a one-rank world (else DeepSpeed looks for MPI)."""
    if "WORLD_SIZE" in os.environ and "MASTER_ADDR" in os.environ:
        return
    os.environ.setdefault("RANK", "0")
    os.environ.setdefault("LOCAL_RANK", "0")
    os.environ.setdefault("WORLD_SIZE", "1")
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", str(_free_port()))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def init(cfg) -> None:
    """Join the process group before any model is built: ZeRO-3 builds models already sharded."""
    if not enabled(cfg):
        return
    ensure_world()
    import deepspeed

    deepspeed.init_distributed()
    _unlink_shm_allreduce_buffer()
    share_cpu_threads()


def share_cpu_threads() -> int | None:
    """On CPU, give each of the ranks on this machine its share of the cores, as torchrun does, unless the user
    chose (OMP_NUM_THREADS). Left alone, every rank starts one compute thread per core: two ranks on two cores
    run four busy threads, and the collectives of ZeRO-3 (which gathers each layer's weights on every forward
    and backward) wait behind them. Returns the threads set, or None where it leaves torch alone."""
    import torch

    local = os.environ.get("LOCAL_SIZE") or os.environ.get("LOCAL_WORLD_SIZE")
    if torch.cuda.is_available() or "OMP_NUM_THREADS" in os.environ or not local or int(local) < 2:
        return None
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    threads = max(1, cores // int(local))
    torch.set_num_threads(threads)
    return threads


SHM_DIR = "/dev/shm"


def shm_allreduce_buffer() -> str:
    """The /dev/shm file DeepSpeed's CPU all-reduce maps for this rank (deepspeed/ops/csrc/cpu/comm/shm.cpp
    names it after the user, MASTER_ADDR, MASTER_PORT and the rank; 66 MB)."""
    env = os.environ
    return (f"{SHM_DIR}/deepspeed_allreduce_buffer_{os.getuid()}_{env.get('MASTER_ADDR', '')}_"
            f"{env.get('MASTER_PORT', '')}_{rank()}")


def _unlink_shm_allreduce_buffer() -> None:
    """DeepSpeed never unlinks its CPU all-reduce buffers, so every launch on a new port left 66 MB per
    rank in /dev/shm until reboot (a test suite of launches filled a 24 GB machine's memory). Once every
    rank has mapped its peers' buffers (init_distributed does that before it returns; the barrier waits
    for all ranks) the names can go: the mappings live on until the processes exit."""
    if not is_initialized() or os.environ.get("LOCAL_SIZE") != str(world_size()):
        return  # DeepSpeed maps the buffers only when all ranks share the machine (the same test on every rank)
    barrier()
    try:
        os.unlink(shm_allreduce_buffer())
    except FileNotFoundError:  # DeepSpeed built without its shm op, or the accelerator is not the CPU
        pass


def is_initialized() -> bool:
    import torch.distributed as dist

    return dist.is_available() and dist.is_initialized()


def barrier() -> None:
    if is_initialized():
        import torch.distributed as dist

        dist.barrier()


def rank() -> int:
    return int(os.environ.get("RANK", "0"))


def world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def fill_auto(config: dict, *, micro_batch: int, grad_accum: int, max_grad_norm: float, dtype, lr: float,
              weight_decay: float, hidden_size: int | None) -> dict:
    """A DeepSpeed JSON with every "auto" replaced, for engines built without the HF Trainer (PPO)."""
    import torch

    hidden = hidden_size or 1024
    values = {
        "train_micro_batch_size_per_gpu": micro_batch,
        "gradient_accumulation_steps": grad_accum,
        "train_batch_size": micro_batch * grad_accum * world_size(),
        "gradient_clipping": max_grad_norm,
        "reduce_bucket_size": hidden * hidden,
        "stage3_prefetch_bucket_size": int(0.9 * hidden * hidden),
        "stage3_param_persistence_threshold": 10 * hidden,
        "lr": lr,
        "betas": [0.9, 0.999],
        "eps": 1e-8,
        "weight_decay": weight_decay,
    }
    precision = {"bf16": dtype == torch.bfloat16, "fp16": dtype == torch.float16}

    def fill(node, section=None):
        if isinstance(node, dict):
            return {k: (precision[section] if k == "enabled" and section in precision and v == "auto" else fill(v, k))
                    for k, v in node.items()}
        if node == "auto":
            if section not in values:
                raise ValueError(f"no value for the DeepSpeed setting {section!r}=auto")
            return values[section]
        return node

    return fill(config)


def all_reduce_scalar(value: float, op: str) -> float:
    """`value` reduced over all ranks with op `min` or `max` (the value itself without a process group).
    A collective: every rank must call it."""
    if not is_initialized():
        return value
    import torch
    import torch.distributed as dist

    t = torch.tensor([float(value)], dtype=torch.float64)
    if dist.get_backend() == "nccl":
        t = t.cuda()
    dist.all_reduce(t, op={"min": dist.ReduceOp.MIN, "max": dist.ReduceOp.MAX}[op])
    return float(t.item())


def broadcast_object(obj):
    """Rank 0's value on every rank (the value itself when there is no process group)."""
    if not is_initialized():
        return obj
    import torch.distributed as dist

    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]
