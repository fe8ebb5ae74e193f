"""The DeepSpeed JSON built from `deepspeed.*` (its "auto" values filled from train.* by the HF Trainer, or by
align/models/distributed.fill_auto for the online stages' engines). Pure: checked before anything loads
(align/config/rules.py) and read by the stages."""

from __future__ import annotations

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
