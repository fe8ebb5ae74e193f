"""The DeepSpeed JSON generated from the deepspeed= group (the multi-rank runs are in test_launch.py)."""

from __future__ import annotations

import pytest

from conftest import compose


def ds(*overrides):
    from align.config.deepspeed import deepspeed_config

    return deepspeed_config(compose(*overrides))


def test_none_means_no_deepspeed():
    assert ds() is None


@pytest.mark.parametrize("group,stage", [("zero1", 1), ("zero2", 2), ("zero3", 3), ("zero3_offload", 3)])
def test_groups_map_to_zero_stages_with_auto_values(group, stage):
    config = ds(f"deepspeed={group}")
    assert config["zero_optimization"]["stage"] == stage
    for key in ("train_micro_batch_size_per_gpu", "gradient_accumulation_steps", "gradient_clipping"):
        assert config[key] == "auto"  # the HF Trainer fills these from train.*
    assert config["bf16"] == {"enabled": "auto", "check_grad_overflow": True}  # NaN steps skipped (guards.py)
    gathers = config["zero_optimization"].get("stage3_gather_16bit_weights_on_model_save")
    assert gathers is (True if stage == 3 else None)


def test_offload_uses_deepspeeds_cpu_optimizer():
    config = ds("deepspeed=zero3_offload")
    zero = config["zero_optimization"]
    assert zero["offload_optimizer"]["device"] == "cpu" and zero["offload_param"]["device"] == "cpu"
    assert config["optimizer"]["type"] == "AdamW" and config["optimizer"]["params"]["lr"] == "auto"
    assert "optimizer" not in ds("deepspeed=zero2")


def test_extra_is_merged_last():
    config = ds("deepspeed=zero2", "+deepspeed.extra.zero_optimization.round_robin_gradients=true",
                "+deepspeed.extra.steps_per_print=5")
    assert config["zero_optimization"]["round_robin_gradients"] is True
    assert config["zero_optimization"]["stage"] == 2 and config["steps_per_print"] == 5


def test_bad_combinations_are_refused_with_the_fix():
    with pytest.raises(ValueError, match="offload_param needs ZeRO-3"):
        ds("deepspeed=zero2", "deepspeed.offload_param=cpu")
    with pytest.raises(ValueError, match="must be -1 \\(off\\) or 0-3"):
        ds("deepspeed.zero_stage=4")
    with pytest.raises(ValueError, match="offload_optimizer must be one of none, cpu"):
        ds("deepspeed=zero2", "deepspeed.offload_optimizer=nvme")


@pytest.mark.parametrize("on_cpu", [False, True])
def test_frozen_models_under_zero3_keep_the_sharding_without_an_optimizer(on_cpu):
    """PPO's reference and reward model under ZeRO-3: the run's sharding, no optimizer or optimizer offload;
    stage.frozen_device=cpu puts their shards in CPU memory (parameter offload)."""
    import torch

    from align.config.deepspeed import deepspeed_config
    from align.rl.engine import frozen_engine_config

    cfg = compose("stage=ppo", "deepspeed=zero3_offload", f"stage.frozen_device={'cpu' if on_cpu else 'auto'}")
    config = frozen_engine_config(cfg, deepspeed_config(cfg), torch.float32, 64, on_cpu)
    zero = config["zero_optimization"]
    assert zero["stage"] == 3 and "optimizer" not in config and "offload_optimizer" not in zero
    assert zero["offload_param"]["device"] == "cpu"  # zero3_offload offloads parameters already
    cfg = compose("stage=ppo", "deepspeed=zero3")
    zero = frozen_engine_config(cfg, deepspeed_config(cfg), torch.float32, 64, on_cpu)["zero_optimization"]
    assert ("offload_param" in zero) == on_cpu
    assert config["train_micro_batch_size_per_gpu"] == cfg.train.batch_size


def test_ranks_on_one_cpu_machine_share_its_cores(monkeypatch):
    """Two ranks on a 2-core machine each starting 2 compute threads made ZeRO-3's collectives wait behind
    four busy threads (bench/zero3.py: a PPO step 7.7 s, then 1.7 s with the cores shared)."""
    import os

    import torch

    from align.models.distributed import share_cpu_threads

    before = torch.get_num_threads()
    cores = len(os.sched_getaffinity(0))
    try:
        monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
        monkeypatch.setenv("LOCAL_SIZE", "2")
        assert share_cpu_threads() == max(1, cores // 2)
        assert torch.get_num_threads() == max(1, cores // 2)
        monkeypatch.setenv("OMP_NUM_THREADS", "3")  # the user's choice stands
        torch.set_num_threads(before)
        assert share_cpu_threads() is None and torch.get_num_threads() == before
        monkeypatch.delenv("OMP_NUM_THREADS")
        monkeypatch.setenv("LOCAL_SIZE", "1")  # one rank keeps every core
        assert share_cpu_threads() is None and torch.get_num_threads() == before
    finally:
        torch.set_num_threads(before)


def _decide(rank: int, port: int, out: str) -> None:
    import torch.distributed as dist

    from align.rl import gather

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    gather._fits_here = lambda full: rank == 0  # rank 1 is short of memory
    with open(f"{out}.{rank}", "w") as f:
        f.write(str(gather._fits_bytes(1)))
    dist.destroy_process_group()


def test_ranks_agree_whether_the_weights_fit_to_be_gathered(tmp_path):
    """Whether ZeRO-3 weights are gathered for a step (stage.gather_for_step / gather_for_rollout auto) is decided by
    every rank together: one rank gathering while another kept ZeRO-3's per-layer hooks would leave their
    collectives unmatched (a hang). Two gloo ranks, only rank 0 with room: both decide not to gather."""
    import socket

    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_decide, args=(port, str(tmp_path / "fits")), nprocs=2)
    assert [(tmp_path / f"fits.{r}").read_text() for r in (0, 1)] == ["False", "False"]
