"""`python -m align`'s one path, for `stage=NAME` and `recipe=NAME` alike: the names and keys refused, every stage's
config checked, then each stage decided (up to date, reuse another run's output, or run), preflighted, run and
committed, and a recipe summarised.

Under the DeepSpeed launcher every rank walks the same list: rank 0 decides what each stage does and broadcasts it,
and all ranks wait for each stage's commit before the next decision. Stages are reached through the registry
(align/config/registry.py), never imported here.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

from omegaconf import DictConfig

from align.config import recipes, rules
from align.config.registry import get
from align.models import distributed
from align.run import cache, handoff, preflight, tracking

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


def run(cfg: DictConfig, task_overrides: list[str], sweep_name: str | None = None, command: str = "train"):
    """A recipe's stages (pipeline.stages) or the one `stage`, each skipped when up to date. Returns the stage's
    StageResult for a single stage, the value of pipeline.objective for a recipe; `sweep_name` (the job's swept
    values) is set for the jobs of a sweep."""
    refuse_names(cfg)
    recipes.check(cfg, task_overrides)
    if command == "export":
        from align.run.export import run as export

        return export(recipes.strip(cfg))
    recipe = bool(cfg.pipeline.stages)
    j = job(cfg, sweep_name if recipe else None)  # a recipe's sweep jobs get their own folders; a stage's do not
    if recipe:
        _drop_missing_objective(cfg, sweep_name)
        _say("recipe %s: %s (run %s)", cfg.pipeline.name, " -> ".join(cfg.pipeline.stages), j.run_name)
        stage_cfgs = [recipes.stage_config(cfg, name, j.run_name) for name in cfg.pipeline.stages]
    else:
        stage_cfgs = [recipes.strip(cfg)]
        get(stage_cfgs[0].stage.name)  # an unknown name stops here, naming the stages there are
    if command == "plan":  # the memory plan of every stage: nothing loads, nothing is checked on disk
        from align.plan.report import run as plan

        return plan(stage_cfgs)
    for scfg in stage_cfgs:  # every stage's combination, before the first one trains
        rules.check(scfg)
    force = set(cfg.pipeline.force) | ({"all"} if cfg.run.force else set())
    outcomes, result = [], None
    for scfg in stage_cfgs:
        if j.group is not None:
            scfg.logger.group = j.group
        outcome, result = _run_one(scfg, forced=scfg.stage.name in force or "all" in force)
        outcomes.append(outcome)
        if recipe:
            result = None  # the trained model: freed before the next stage loads its own
            _free_memory()
    if not recipe:
        return result
    if cfg.pipeline.summary and tracking.is_main_process():
        from align.run import summary

        summary.report(Path(cfg.run.root) / j.run_name, cfg.pipeline.name, outcomes)
    return objective(cfg, outcomes)


def refuse_names(cfg: DictConfig) -> None:
    """A run.name that is a path, and keys no schema declares: refused before anything else."""
    bad_name = rules.run_name_problem(cfg.run.name)
    if bad_name:
        raise rules.Unsupported(bad_name + " (nothing was run)")
    unknown = rules.unknown_keys(cfg)
    if unknown:
        raise rules.Unsupported("unknown config keys (nothing was run):\n" + "\n".join(f"  - {u}" for u in unknown))


def _drop_missing_objective(cfg: DictConfig, sweep_name: str | None) -> None:
    objective_stage = (cfg.pipeline.objective or "").partition(".")[0]
    if objective_stage and objective_stage not in cfg.pipeline.stages:
        if sweep_name is not None:  # a sweeper needs the value: refuse before anything trains
            raise recipes.RecipeError(
                f"pipeline.objective={cfg.pipeline.objective}: {objective_stage!r} is not among pipeline.stages "
                f"({', '.join(cfg.pipeline.stages)}); add it, or set pipeline.objective to a metric of a stage that runs")
        _say("pipeline.objective=%s is not computed: this run does not include %s",
             cfg.pipeline.objective, objective_stage)
        cfg.pipeline.objective = None


def _run_one(scfg: DictConfig, forced: bool):
    """Decide (rank 0, broadcast), then skip, link or run one stage; every rank waits for its commit."""
    from align.run.stage_run import StageResult

    name = scfg.stage.name
    distributed.init(scfg)
    distributed.barrier()  # the previous stage is committed on every rank's view
    decision = distributed.broadcast_object(cache.decide(scfg, force=forced) if tracking.is_main_process() else None)
    out = handoff.stage_dir(scfg)
    result = None
    if decision.action == cache.SKIP:
        _say("%s: up to date (%s: %s); nothing changed. run.force=true re-trains it", name, out, decision.reason)
        status = "up to date"
    elif decision.action == cache.REUSE:
        if tracking.is_main_process():
            cache.link(scfg, decision.source)
        _say("%s: up to date, reusing %s (same config and parents)", name, decision.source)
        status = "reused"
    else:
        kept = f"; the complete output stays in {out} until the new one commits" if handoff.is_complete(out) else ""
        _say("%s: running (%s)%s", name, decision.reason, kept)
        scfg.run.force = scfg.run.force or forced  # start over, old checkpoints aside
        preflight.check(scfg)
        result = run_stage(scfg)
        status = "trained"
    distributed.barrier()
    info = handoff.read_stage_json(out)
    if result is None:
        result = StageResult(out, info.get("metrics", {}))
    return StageOutcome(name, status, out, info), result


def _free_memory() -> None:
    import gc

    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def run_stage(cfg: DictConfig):
    """The stage's run on `cfg`; a stage that stopped before writing anything leaves no folder behind."""
    from align.run.stage_run import discard_if_unstarted

    try:
        return get(cfg.stage.name).run(cfg)
    except BaseException:
        discard_if_unstarted(cfg)
        raise


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
