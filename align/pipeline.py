"""Run a recipe: its stages in order, each skipped when up to date, then the run summary.

`python -m align recipe=demo` runs here; a single `stage=...` does not (it always trains). Under
the DeepSpeed launcher every rank walks the same list: rank 0 decides what each stage does and
broadcasts it, and all ranks wait for each stage's commit before the next decision.
"""

from __future__ import annotations

import gc
import logging
from dataclasses import dataclass
from pathlib import Path

from omegaconf import DictConfig

from align import cache, distributed, handoff, preflight, recipes, supported, tracking

log = logging.getLogger("align")


def _say(msg: str, *args) -> None:
    if tracking.is_main_process():  # every rank walks the pipeline; one tells
        log.info(msg, *args)


@dataclass
class StageOutcome:
    stage: str
    status: str  # trained | up to date | reused
    path: Path
    info: dict  # its stage.json


@dataclass
class Job:
    """Where this job of a (possibly swept) recipe writes: its run name and W&B group."""

    run_name: str
    group: str | None


def swept_keys(argv: list[str], sweeper_params: dict | None = None) -> set[str]:
    """The keys a sweep varies: command-line sweeps (`dpo.beta=0.05,0.3`, `choice(...)`, `range(...)`)
    and the sweeper's own search space (Optuna's `hydra.sweeper.params`)."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    keys = {o.key_or_group for o in OverridesParser.create().parse_overrides(
        [a for a in argv if "=" in a and not a.startswith("-")]) if o.is_sweep_override()}
    return keys | set(sweeper_params or {})


def job_name(task_overrides: list[str], keys: set[str]) -> str:
    """`dpo.beta=0.05` (several joined by ','): this job's values of the swept keys, usable as a folder name."""
    parts = []
    for o in task_overrides:
        key, _, value = o.lstrip("+~").partition("=")
        if key in keys:
            parts.append(f"{key}={value}".replace("/", "_"))
    return ",".join(sorted(parts))


def job(cfg: DictConfig, sweep_name: str | None) -> Job:
    """In a sweep (-m), each job is `<run.name>/<its swept values>` and all share the group `<run.name>`."""
    if sweep_name is None:
        return Job(cfg.run.name, cfg.logger.group)
    name = f"{cfg.run.name}/{sweep_name}" if sweep_name else cfg.run.name
    return Job(name, cfg.logger.group or cfg.run.name)


def run(cfg: DictConfig, task_overrides: list[str], sweep_name: str | None = None) -> float | None:
    """Run the recipe's stages; `sweep_name` (the job's swept values) is set for the jobs of a sweep."""
    recipes.check(cfg, task_overrides)
    objective_stage = (cfg.pipeline.objective or "").partition(".")[0]
    if objective_stage and objective_stage not in cfg.pipeline.stages:
        if sweep_name is not None:  # a sweeper needs the value: refuse before anything trains
            raise recipes.RecipeError(
                f"pipeline.objective={cfg.pipeline.objective}: {objective_stage!r} is not among pipeline.stages "
                f"({', '.join(cfg.pipeline.stages)}); add it, or set pipeline.objective to a metric of a stage that runs")
        _say("pipeline.objective=%s is not computed: this run does not include %s",
             cfg.pipeline.objective, objective_stage)
        cfg.pipeline.objective = None
    j = job(cfg, sweep_name)
    force = set(cfg.pipeline.force) | ({"all"} if cfg.run.force else set())
    outcomes = []
    _say("recipe %s: %s (run %s)", cfg.pipeline.name, " -> ".join(cfg.pipeline.stages), j.run_name)
    stage_cfgs = [recipes.stage_config(cfg, name, j.run_name) for name in cfg.pipeline.stages]
    for scfg in stage_cfgs:  # every stage's combination, before the first one trains
        supported.check(scfg)
    for name, scfg in zip(cfg.pipeline.stages, stage_cfgs, strict=True):
        if j.group is not None:
            scfg.logger.group = j.group
        distributed.init(scfg)
        distributed.barrier()  # the previous stage is committed on every rank's view
        decision = distributed.broadcast_object(
            cache.decide(scfg, force=name in force or "all" in force) if tracking.is_main_process() else None)
        out = handoff.stage_dir(scfg)
        if decision.action == cache.SKIP:
            _say("%s: up to date (%s)", name, out)
            status = "up to date"
        elif decision.action == cache.REUSE:
            if tracking.is_main_process():
                cache.link(scfg, decision.source)
            _say("%s: up to date, reusing %s (same config and parents)", name, decision.source)
            status = "reused"
        else:
            _say("%s: running (%s)", name, decision.reason)
            scfg.run.force = scfg.run.force or name in force or "all" in force  # start over, old checkpoints aside
            preflight.check(scfg)
            _run_stage(scfg)
            status = "trained"
        distributed.barrier()
        outcomes.append(StageOutcome(name, status, out, handoff.read_stage_json(out)))
    run_dir = Path(cfg.run.root) / j.run_name
    if cfg.pipeline.summary and tracking.is_main_process():
        from align import summary

        summary.report(run_dir, cfg.pipeline.name, outcomes)
    return objective(cfg, outcomes)


def run_stage(cfg: DictConfig):
    """The stage's module run on `cfg`; a stage that stopped before writing anything leaves no folder behind."""
    from align.stages.common import discard_if_unstarted

    from align.stages import get

    run = get(cfg.stage.name).run
    try:
        return run(cfg)
    except BaseException:
        discard_if_unstarted(cfg)
        raise


def _run_stage(cfg: DictConfig) -> None:
    result = run_stage(cfg)
    del result  # the trained model: free it before the next stage loads its own
    gc.collect()
    import torch

    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def objective(cfg: DictConfig, outcomes: list[StageOutcome]) -> float | None:
    """The value of `pipeline.objective` (`<stage>.<metric>`) for a sweeper to optimise."""
    spec = cfg.pipeline.objective
    if not spec:
        return None
    stage, _, metric = spec.partition(".")
    found = {o.stage: o for o in outcomes}
    if stage not in found:
        raise recipes.RecipeError(f"pipeline.objective={spec}: {stage!r} is not a stage of this recipe")
    metrics = found[stage].info.get("metrics", {})
    if metric not in metrics:
        raise recipes.RecipeError(
            f"pipeline.objective={spec}: {found[stage].path / handoff.STAGE_JSON} has no metric {metric!r}; "
            f"it has {', '.join(sorted(metrics))}")
    return float(metrics[metric])
