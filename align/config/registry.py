"""The stage registry: every stage, built-in or from another package, as a StageSpec.

A stage module declares `SPEC = StageSpec(...)`: its schema (the `stage.*` keys), its run, its parents, its
default learning rates, whether its output is a policy, its headline metrics, whether it reads the reward group
and which reward it takes by default, and its own rules between keys. The CLI, recipes, cache, handoff, eval,
summary and launchers ask the registry and never branch on a stage's name.

The built-in stages are the modules named in align/stages/__init__.py (`BUILTIN`); a stage from another package
registers through the `align.stages` entry point (pyproject.toml):

    [project.entry-points."align.stages"]
    distill = "my_package.distill"        # a module with SPEC = StageSpec(name="distill", ...)

Both are imported by name on the first call of registry(): this is the one place where the config layer reaches
the stages, late (by importlib, like any plugin), so align.config never imports a stage module statically.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Callable

ENTRY_POINTS = "align.stages"
BUILTIN_PACKAGE = "align.stages"  # its BUILTIN tuple names the built-in stage modules, in the order --help lists them


def init_parent(stage: str) -> Callable:
    """parents(cfg) of a stage that starts from `stage`'s output (or stage.init)."""
    return lambda cfg: [(stage, cfg.stage.init)]


def no_checks(cfg) -> list[str]:
    return []


@dataclass(frozen=True)
class Held:
    """A model a stage holds while it runs, as the memory planner (align/plan) counts it."""

    role: str  # what the stage calls it: policy, reference, critic, reward model
    trains: bool = False  # trained: its weights follow peft=, with gradients and optimizer states
    score_head: bool = False  # a sequence classifier (reward model, critic): no output layer over the vocabulary
    on_cpu: bool = False  # kept in CPU memory (stage.frozen_device=cpu)
    peft: str | None = None  # a trained model's own adapter method (ppo's critic_peft); None: peft.method


@dataclass(frozen=True)
class Footprint:
    """What a stage holds on each GPU besides its micro-batch: its models, and where it samples, how many sequences
    of how many tokens at once (their KV cache)."""

    models: tuple  # of Held
    rollout_sequences: int = 0
    rollout_tokens: int = 0
    sampling_apart: bool = False  # sampling loads the policy whole, before training loads (iterative_dpo)
    chunked_logits: bool = False  # the output layer runs in chunks (align's loop) instead of over the micro-batch
    pair_rows: int = 1  # rows per example in a micro-batch (2: a preference pair, chosen and rejected together)
    train_tokens: int | None = None  # tokens per row trained on; None: train.max_length


def policy_only(cfg) -> Footprint:
    return Footprint((Held("policy", trains=True),))


@dataclass(frozen=True)
class StageSpec:
    name: str
    schema: type  # a dataclass deriving from align.config.schema.StageConfig: the stage.* keys, defaults, checks
    run: Callable  # run(cfg) -> align.run.stage_run.StageResult
    # the (parent stage, override) pairs it starts from, resolved with handoff.find_parent (the cache reads them);
    # none resolved (or stage.init=base) and `trains`: the stage loads model.name_or_path itself (preflight checks it)
    parents: Callable = field(default=lambda cfg: [])
    lr: dict = field(default_factory=dict)  # train.lr=null: {"tiny": .., "full": .., "adapter": ..}
    policy: bool = False  # its model/ is a policy the eval stage measures
    headline: tuple = ()  # stage.json metrics a summary shows first
    reads_reward: bool = False  # reads the reward group (reward=...): its keys count in the stage's identity
    reads_rollout: bool = False  # samples with the rollout group (rollout.engine=...): its keys count in its identity
    reads_env: bool = False  # runs episodes against the env group (env=python): its keys count in its identity
    default_reward: str | None = None  # what reward.kind=auto means for this stage (checker, rm, python)
    trains: bool = True  # False: measures only (eval)
    checks: Callable = no_checks  # checks(cfg) -> problems between its keys (each alone may be fine), with the fix
    footprint: Callable = policy_only  # footprint(cfg) -> Footprint: what it holds, for `align plan`

    def default_lr(self, kind: str) -> float:
        if kind not in self.lr:
            raise ValueError(f"stage {self.name} has no default learning rate for {kind} weights; set train.lr")
        return self.lr[kind]


class UnknownStage(ValueError):
    pass


def _builtin() -> tuple[str, ...]:
    return importlib.import_module(BUILTIN_PACKAGE).BUILTIN


@lru_cache(maxsize=1)
def registry() -> dict[str, StageSpec]:
    """name -> StageSpec: the built-in stages, then those of the `align.stages` entry point."""
    from importlib.metadata import entry_points

    found: dict[str, StageSpec] = {}
    for name in _builtin():
        found[name] = importlib.import_module(f"{BUILTIN_PACKAGE}.{name}").SPEC
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
    """Stage names without importing any stage module (for --help): the built-ins and the entry points' names."""
    from importlib.metadata import entry_points

    builtin = _builtin()
    return [*builtin, *(ep.name for ep in entry_points(group=ENTRY_POINTS) if ep.name not in builtin)]


def get(name: str) -> StageSpec:
    stages = registry()
    if name not in stages:
        raise UnknownStage(f"stage={name} is not a stage; choose one of {', '.join(stages)}")
    return stages[name]


def policies() -> tuple[str, ...]:
    return tuple(n for n, s in registry().items() if s.policy)


def stage_schemas() -> dict[str, type]:
    """name -> the dataclass of its stage.* keys, for every registered stage."""
    return {name: spec.schema for name, spec in registry().items()}


def reads_rollout(stage: str | None) -> bool:
    """Whether the rollout group applies to `stage` (`grpo.rollout.engine=vllm` inside a recipe)."""
    spec = registry().get(stage)
    return bool(spec and spec.reads_rollout)


def reads_env(stage: str | None) -> bool:
    """Whether the env group applies to `stage` (`grpo.env.timeout_s=5` inside a recipe)."""
    spec = registry().get(stage)
    return bool(spec and spec.reads_env)


def reads_reward(stage: str | None) -> bool:
    """Whether the reward group applies to `stage` (`grpo.reward.kind=rm` inside a recipe)."""
    spec = registry().get(stage)
    return bool(spec and spec.reads_reward)
