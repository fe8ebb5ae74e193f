"""Ranks: process-group setup, barriers, collectives of scalars and objects, and the DeepSpeed JSON's "auto" values
filled for engines built without the HF Trainer (the JSON itself: align/config/deepspeed.py).

Under `deepspeed --num_gpus N launch/<stage>.sh` every rank runs the same stage with the same
config, so every rank computes the same output directory; only rank 0 writes files. A plain
`python -m align deepspeed=zero2` (no launcher) runs as a world of one.
"""

from __future__ import annotations

import os
import socket


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
    if cfg.deepspeed.zero_stage < 0:  # deepspeed=none
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


def device():
    """This rank's device: its GPU (LOCAL_RANK), else the CPU."""
    import torch

    if torch.cuda.is_available():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    return torch.device("cpu")


def mean_over_ranks(stats: dict) -> dict:
    """Each value averaged over the ranks (the values themselves without a process group). A collective."""
    if not is_initialized() or world_size() == 1:
        return stats
    import torch
    import torch.distributed as dist

    keys = sorted(stats)
    t = torch.tensor([float(stats[k]) for k in keys], dtype=torch.float64, device=device())
    dist.all_reduce(t)
    t /= world_size()
    return dict(zip(keys, t.tolist()))
