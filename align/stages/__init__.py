"""The stage registry: the one list of stages. Each stage module declares `SPEC = StageSpec(...)` — its schema
(the `stage.*` keys), its parents, default learning rates, whether its output is a policy, its headline
metrics, whether it reads the reward group — and the CLI, recipes, cache, handoff, eval, summary and launchers
read it from here.

A stage from another package registers through the `align.stages` entry point (pyproject.toml):

    [project.entry-points."align.stages"]
    distill = "my_package.distill"        # a module with SPEC = StageSpec(name="distill", ...)

and is then used like a built-in one: `python -m align stage=distill`, in a recipe's `pipeline.stages`,
cached, summarised, launched with `deepspeed launch/stage.sh stage=distill`. This module imports nothing
heavy; the stage modules are imported on the first call of registry().
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Callable

BUILTIN = ("sft", "rm", "dpo", "ppo", "grpo", "eval")  # modules under align/stages, in the order --help lists them
ENTRY_POINTS = "align.stages"
# train.lr when unset, by weights: the tiny demo model is trained from scratch and needs far larger steps
LR_KINDS = ("tiny", "full", "adapter")


def init_parent(stage: str = "sft") -> Callable:
    """parents(cfg) of a stage that starts from `stage`'s output (or stage.init)."""
    return lambda cfg: [(stage, cfg.stage.init)]


@dataclass(frozen=True)
class StageSpec:
    name: str
    schema: type  # a dataclass deriving from align.config.StageConfig: the stage.* keys, their defaults and checks
    run: Callable  # run(cfg) -> align.stages.common.StageResult
    # the (parent stage, override) pairs it starts from, resolved with handoff.find_parent (the cache reads them)
    parents: Callable = field(default_factory=init_parent)
    lr: dict = field(default_factory=dict)  # {"tiny": .., "full": .., "adapter": ..}
    policy: bool = False  # its model/ is a policy the eval stage measures
    headline: tuple = ()  # stage.json metrics a summary shows first
    reward: bool = False  # reads the reward group (reward=...): its keys count in the stage's identity
    trains: bool = True  # False: measures only (eval)

    def default_lr(self, kind: str) -> float:
        if kind not in self.lr:
            raise ValueError(f"stage {self.name} has no default learning rate for {kind} weights; set train.lr")
        return self.lr[kind]


class UnknownStage(ValueError):
    pass


@lru_cache(maxsize=1)
def registry() -> dict[str, StageSpec]:
    """name -> StageSpec: the built-in stages, then those of the `align.stages` entry point."""
    from importlib.metadata import entry_points

    found: dict[str, StageSpec] = {}
    for name in BUILTIN:
        found[name] = importlib.import_module(f"align.stages.{name}").SPEC
    for ep in entry_points(group=ENTRY_POINTS):
        loaded = ep.load()
        spec = getattr(loaded, "SPEC", loaded)
        if not isinstance(spec, StageSpec):
            raise TypeError(f"entry point {ep.name} = {ep.value} ({ENTRY_POINTS}) is not a StageSpec or a module with SPEC")
        if spec.name in found:
            raise ValueError(f"entry point {ep.value} registers stage {spec.name!r}, which already exists")
        found[spec.name] = spec
    return found


def names() -> list[str]:
    """Stage names without importing any stage (for --help): the built-ins and the entry points' names."""
    from importlib.metadata import entry_points

    return [*BUILTIN, *(ep.name for ep in entry_points(group=ENTRY_POINTS) if ep.name not in BUILTIN)]


def get(name: str) -> StageSpec:
    stages = registry()
    if name not in stages:
        raise UnknownStage(f"stage={name} is not a stage; choose one of {', '.join(stages)}")
    return stages[name]


def policies() -> tuple[str, ...]:
    return tuple(n for n, s in registry().items() if s.policy)
