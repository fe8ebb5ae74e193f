"""`python -m align plan ...`: each stage's table, its verdict and, when it does not fit, the overrides that make it
fit, cheapest first. Loads no weights and needs no network; the preflight of a stage about to load on a GPU."""

from __future__ import annotations

import copy
import logging
import re
from dataclasses import dataclass

from align.plan.shapes import shape_of
from align.plan.stage_plan import StagePlan, plan_stage

log = logging.getLogger("align")
UNITS = {"": 1e9, "GB": 1e9, "G": 1e9, "GIB": 2**30, "MB": 1e6, "MIB": 2**20, "TB": 1e12}


class PlanError(ValueError):
    pass


def parse_memory(text) -> float | None:
    """'80GB', '80GiB', '24000MB' or a number of GB -> bytes; None for null."""
    if text is None:
        return None
    m = re.fullmatch(r"\s*([0-9.]+)\s*([A-Za-z]*)\s*", str(text))
    if not m or m.group(2).upper() not in UNITS:
        raise PlanError(f"plan.gpu_memory={text!r}: give a size such as 80GB, 80GiB or 24000MB")
    return float(m.group(1)) * UNITS[m.group(2).upper()]


@dataclass(frozen=True)
class Fix:
    override: str  # as the user types it
    cost: str  # what it costs
    apply: object  # cfg -> None: edits a copy
    rank: int  # how much it costs, relative to the others (slower steps < sharding < what trains < offload)


def _set(**keys):
    def apply(cfg):
        for dotted, value in keys.items():
            node = cfg
            *path, last = dotted.split(".")
            for p in path:
                node = node[p]
            node[last] = value
    return apply


def fixes(cfg) -> list[Fix]:
    """The overrides worth trying, cheapest first (what each costs in time or in what trains)."""
    t, d, out = cfg.train, cfg.deepspeed, []
    if not cfg.model.gradient_checkpointing:
        out.append(Fix("model.gradient_checkpointing=true", "about a third more compute per step",
                       _set(**{"model.gradient_checkpointing": True}), 1))
    if t.batch_size > 1:
        half = t.batch_size // 2
        out.append(Fix(f"train.batch_size={half} train.grad_accum={t.grad_accum * 2}",
                       "the same update in smaller micro-batches",
                       _set(**{"train.batch_size": half, "train.grad_accum": t.grad_accum * 2}), 1))
    if t.batch_size > 2:
        out.append(Fix(f"train.batch_size=1 train.grad_accum={t.grad_accum * t.batch_size}",
                       "the same update one row at a time",
                       _set(**{"train.batch_size": 1, "train.grad_accum": t.grad_accum * t.batch_size}), 2))
    if d.zero_stage < 3:
        out.append(Fix("deepspeed=zero3", "weights, gradients and optimizer states sharded (more communication)",
                       _set(**{"deepspeed.zero_stage": 3}), 2))
    if cfg.peft.method == "none":
        out.append(Fix("peft=lora", "trains a LoRA adapter instead of every weight",
                       _set(**{"peft.method": "lora"}), 3))
    if cfg.peft.method != "qlora":
        out.append(Fix("peft=qlora", "a 4-bit base under a LoRA adapter", _set(**{"peft.method": "qlora"}), 4))
    if d.offload_optimizer != "cpu":
        out.append(Fix("deepspeed=zero3_offload", "optimizer states and weights in CPU memory (much slower steps)",
                       _set(**{"deepspeed.zero_stage": 3, "deepspeed.offload_optimizer": "cpu",
                               "deepspeed.offload_param": "cpu"}), 6))
    return out


def fitting(cfg, shape, gpus: int, gpu_memory: float, most: int = 3) -> list[tuple[str, StagePlan]]:
    """Up to `most` overrides, alone or two together, under which the stage fits: the cheapest first (the sum of
    their ranks; fewer overrides first among equals)."""
    from omegaconf import OmegaConf

    options = fixes(cfg)

    def tried(combo: tuple[Fix, ...]):
        c = copy.deepcopy(cfg)
        OmegaConf.set_struct(c, False)
        for f in combo:
            f.apply(c)
        return plan_stage(c, shape, gpus, gpu_memory)

    combos = [(f,) for f in options] + [(a, b) for i, a in enumerate(options) for b in options[i + 1:]
                                        if a.override.split("=")[0] != b.override.split("=")[0]]
    found = [(combo, p) for combo in combos if (p := tried(combo)).verdict == "fits"]
    found.sort(key=lambda cp: (sum(f.rank for f in cp[0]), len(cp[0])))
    return [(" ".join(f.override for f in combo) + "  (" + "; ".join(f.cost for f in combo) + ")", p)
            for combo, p in found[:most]]


def gpus_and_memory(cfg) -> tuple[int, float | None]:
    """plan.gpus and plan.gpu_memory, or the visible GPUs' count and the smallest one's memory."""
    gpus, memory = cfg.plan.gpus, parse_memory(cfg.plan.gpu_memory)
    if gpus is None or memory is None:
        try:
            import torch

            visible = torch.cuda.device_count() if torch.cuda.is_available() else 0
        except ImportError:
            visible = 0
        if visible:
            gpus = gpus or visible
            memory = memory or min(torch.cuda.get_device_properties(i).total_memory for i in range(visible))
    return gpus or 1, memory


def run(stage_cfgs: list) -> list[StagePlan]:
    """Every stage's plan, printed; the list of plans (a sweep's objective never reads it)."""
    from rich.console import Console

    console, plans = Console(), []
    gpus, memory = gpus_and_memory(stage_cfgs[0])
    shape = shape_of(stage_cfgs[0].model.name_or_path)
    console.print(f"[bold]plan[/bold]: {shape.name} ({shape.params / 1e9:.2f}B parameters, {shape.layers} layers, "
                  f"vocabulary {shape.vocab}) on {gpus} GPU(s)" + (f" of {memory / 1e9:.1f} GB" if memory else ""))
    for cfg in stage_cfgs:
        plan = plan_stage(cfg, shape_of(cfg.model.name_or_path), gpus, memory)
        plans.append(plan)
        console.print(table(cfg, plan))
        if plan.verdict in ("does not fit", "tight") and memory is not None:
            options = fitting(cfg, shape_of(cfg.model.name_or_path), gpus, memory)
            lines = [f"  {o}: {p.peak / 1e9:.1f} GB" for o, p in options] or ["  none of "
                     + ", ".join(f.override for f in fixes(cfg)) + " (alone or two together): more GPUs or larger ones"]
            console.print(f"to make {cfg.stage.name} fit, cheapest first:\n" + "\n".join(lines))
    return plans


def table(cfg, plan: StagePlan):
    from rich.table import Table

    zero = cfg.deepspeed.zero_stage
    title = (f"{plan.stage}: peak {plan.peak / 1e9:.1f} GB per GPU ({plan.phase}) - {plan.verdict}  "
             f"[peft={cfg.peft.method}, ZeRO {'off' if zero < 0 else zero}, batch {cfg.train.batch_size}]")
    t = Table(title=title, title_justify="left")
    t.add_column("what")
    t.add_column("GB per GPU", justify="right")
    for what, value in plan.rows:
        t.add_row(what, f"{value / 1e9:.2f}")
    return t


def preflight(cfg) -> None:
    """On a GPU, before a stage loads: a warning (an error with plan.strict=true) when its plan does not fit,
    naming the cheapest overrides that make it fit. Silent without a GPU or a known shape."""
    from align.config.rules import Unsupported
    from align.plan.shapes import ShapeUnknown

    gpus, memory = gpus_and_memory(cfg)
    if memory is None:
        return
    try:
        shape = shape_of(cfg.model.name_or_path)
    except ShapeUnknown:
        return
    plan = plan_stage(cfg, shape, gpus, memory)
    if plan.verdict != "does not fit":
        return
    options = "; ".join(o for o, _ in fitting(cfg, shape, gpus, memory)) or "more GPUs or larger ones"
    message = (f"{cfg.stage.name}: the memory plan says it needs {plan.peak / 1e9:.1f} GB per GPU, more than the "
               f"{memory / 1e9:.1f} GB there is (`python -m align plan` shows each term). Overrides that make it fit: "
               f"{options}")
    if cfg.plan.strict:
        raise Unsupported(message + ". Nothing was loaded (plan.strict=true)")
    log.warning("%s (plan.strict=true refuses instead)", message)
