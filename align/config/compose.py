"""Composition: the whole config Hydra reads, assembled from the shared groups (schema.py) and every registered
stage's schema (registry.py): `stage=NAME` selects a stage's schema, and a recipe gets one section per stage
(`dpo.beta=0.1`, `sft.train.epochs=2`) whose unset keys leave the shared value alone. Recipes (recipes.py) turn a
section back into the stage's own config.
"""

from __future__ import annotations

import dataclasses
import functools
import typing
from dataclasses import field
from typing import Any, Optional

from omegaconf import MISSING

from align.config.registry import reads_env, reads_reward, reads_rollout, stage_schemas
from align.config.schema import (
    DataConfig,
    EnvConfig,
    ModelConfig,
    PeftConfig,
    RewardConfig,
    RolloutConfig,
    SharedConfig,
    StageConfig,
    TrainConfig,
)

SECTION_GROUPS = {"train": TrainConfig, "data": DataConfig, "model": ModelConfig, "peft": PeftConfig}


def section_groups(stage: str) -> dict[str, type]:
    """The groups a recipe may set per stage. The reward group joins them for the stages that read it, unless the
    stage has a key of that name (ppo's stage.reward, its reward model: there the group is set for the recipe); the
    rollout group joins them for the stages that sample with it, the env group for those that run episodes."""
    own = stage_schemas().get(stage)
    clash = own is not None and "reward" in {f.name for f in dataclasses.fields(own)}
    return {**SECTION_GROUPS, **({"reward": RewardConfig} if reads_reward(stage) and not clash else {}),
            **({"rollout": RolloutConfig} if reads_rollout(stage) else {}),
            **({"env": EnvConfig} if reads_env(stage) else {})}


def _overlay(schema: type, name: str, extra: dict[str, type] | None = None) -> type:
    """A dataclass with the same fields as `schema`, each optional and unset (`???`) by default.

    An unset field leaves the base value alone; a set one (null included) replaces it. Typed, so a
    typo (`dpo.betta=0.1`) or a wrong type is rejected before anything loads.
    """
    hints = typing.get_type_hints(schema)
    fields = []
    for f in dataclasses.fields(schema):
        if f.name == "name" and issubclass(schema, StageConfig):
            continue
        kind = hints[f.name]
        if dataclasses.is_dataclass(kind):
            sub = _overlay(kind, f"{name}{kind.__name__}")
            fields.append((f.name, sub, field(default_factory=sub)))
        else:
            fields.append((f.name, Any if kind is Any else Optional[kind], field(default=MISSING)))
    for key, sub in (extra or {}).items():
        fields.append((key, sub, field(default_factory=sub)))
    return dataclasses.make_dataclass(name, fields)


def _section(stage: str, schema: type) -> type:
    groups = {g: _overlay(group, f"{stage.upper()}{group.__name__}Overlay")
              for g, group in section_groups(stage).items()}
    return _overlay(schema, f"{stage.upper()}Section", groups)


@functools.lru_cache(maxsize=1)
def sections() -> dict[str, type]:
    """A recipe's per-stage section of each registered stage: `dpo.beta=0.1`, `sft.train.epochs=2`."""
    return {name: _section(name, schema) for name, schema in stage_schemas().items()}


@functools.lru_cache(maxsize=1)
def align_schema() -> type:
    """The whole config: the shared groups, and per-stage overrides inside a recipe (see recipes/), one section
    per registered stage, whose unset keys leave the shared value alone."""
    extra = [(name, section, field(default_factory=section)) for name, section in sections().items()]
    return dataclasses.make_dataclass("AlignConfig", extra, bases=(SharedConfig,))
