"""The policy's current weights as its plain transformers checkpoint names them, for an inference engine to load:
full weights as they are, a LoRA adapter merged into its base weight (W + scale * B @ A), a QLoRA base dequantised
first. One module at a time: under ZeRO-3 each module's shards are gathered, yielded and released before the next,
so the whole model is never held twice."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch

from align.rl.logprobs import transformers_model


def full_weights(model, dtype: torch.dtype | None = None) -> Iterator[tuple[str, torch.Tensor]]:
    """(checkpoint name, tensor) of every weight of `model` (a transformers causal LM, or one inside PEFT's and
    DeepSpeed's wrappers), adapters merged, cast to `dtype`. Every rank must iterate it under ZeRO-3 (gathers are
    collectives); the tensors are valid until the next item is drawn."""
    yield from _walk(transformers_model(model), "", dtype)


def _walk(module: torch.nn.Module, prefix: str, dtype) -> Iterator[tuple[str, torch.Tensor]]:
    if _is_lora(module):
        yield from _merged(module, prefix, dtype)
        return
    own = list(module.named_parameters(recurse=False))
    if own:
        with _gathered([p for _, p in own]) as zero3:
            for name, p in own:
                yield f"{prefix}{name}", _out(_dense(module, name, p), dtype, zero3)
    for name, child in module.named_children():
        yield from _walk(child, f"{prefix}{name}.", dtype)


def _is_lora(module) -> bool:
    from peft.tuners.lora import LoraLayer

    return isinstance(module, LoraLayer)


def _merged(layer, prefix: str, dtype) -> Iterator[tuple[str, torch.Tensor]]:
    """A LoRA-wrapped linear layer as one dense layer: its base weight (dequantised under QLoRA) plus the deltas of
    its active adapters (none while they are already merged into the base)."""
    with _gathered(list(layer.parameters())) as zero3:
        base = layer.get_base_layer()
        weight = _dense(base, "weight", base.weight).float()
        if not getattr(layer, "merged", False):
            for name in layer.active_adapters:
                if name in layer.lora_A:
                    weight = weight + layer.get_delta_weight(name).float()
        yield f"{prefix}weight", _out(weight, dtype, False)
        if getattr(base, "bias", None) is not None:
            yield f"{prefix}bias", _out(base.bias.detach(), dtype, zero3)


def _dense(module, name: str, p: torch.Tensor) -> torch.Tensor:
    """A parameter as dense numbers: a bitsandbytes-quantised weight (QLoRA) dequantised, others as they are."""
    if name == "weight" and type(p).__name__ in ("Params4bit", "Int8Params"):
        # not peft's dequantize_module_weight: on a CPU it replaces module.weight with a copy, which drops the
        # attributes ZeRO-3 keeps on the parameter
        from peft.utils.integrations import dequantize_bnb_weight

        return dequantize_bnb_weight(p, state=getattr(module, "state", None))
    return p.detach()


def _out(t: torch.Tensor, dtype, copy: bool) -> torch.Tensor:
    """Cast to the engine's dtype; a gathered ZeRO-3 shard is copied, since its full storage is released when the
    gather closes and the consumer may still hold it."""
    if dtype is not None and t.dtype != dtype:
        return t.to(dtype)
    return t.clone() if copy else t


@contextmanager
def _gathered(params):
    """The full values of ZeRO-3 partitioned `params` inside the block (a collective: every rank enters it); yields
    whether it gathered. Parameters that are not partitioned, or already gathered (inside the online loop's
    rollout window, gather.py: they must stay gathered after the block), are left alone."""
    sharded = [p for p in params if hasattr(p, "ds_id") and p.ds_status.name == "NOT_AVAILABLE"]
    if not sharded:
        yield False
        return
    import deepspeed

    with deepspeed.zero.GatheredParameters(sharded, modifier_rank=None):
        yield True
