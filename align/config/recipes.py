"""Recipes: whole pipelines as short YAML files in recipes/ (and ./recipes/ of the working directory).

A recipe is an entry of the Hydra group `recipe`, applied at the top level of the config: it names
the ordered stages (`pipeline.stages`) and overrides keys per stage in a section named after the
stage (`rm.init: base`, `rm.train.lr: 2e-3`). `stage_config(cfg, NAME)` turns the composed config
into exactly the config `python -m align stage=NAME <same overrides>` would have: the stage's own
defaults (its schema), the shared groups, then the section's keys on top. So a stage run
alone and the same stage inside a recipe have the same config hash, and the cache treats them alike.
"""

from __future__ import annotations

from pathlib import Path

from hydra.core.config_store import ConfigStore
from omegaconf import DictConfig, OmegaConf

from align.config.compose import align_schema, section_groups, sections
from align.config.paths import recipe_dirs
from align.config.registry import stage_schemas


def per_stage_keys() -> tuple[str, ...]:
    """The section names: one per registered stage (sft, rm, dpo, ...)."""
    return tuple(sections())


class RecipeError(ValueError):
    pass


OPEN_DICTS = ("reward.weights", "env.kwargs")  # maps of the user's own names: `reward.weights={checker: 1.0}`


def open_dicts(schema: DictConfig) -> DictConfig:
    """The schema with its free-form maps open to new keys (struct mode, which Hydra turns on, would refuse
    `reward.weights={checker: 1.0}` from the command line), in the shared groups and in every stage's section."""
    for path in OPEN_DICTS:
        for prefix in ("", *(f"{stage}." for stage in sections())):
            node = OmegaConf.select(schema, prefix + path, default=None)
            if isinstance(node, DictConfig):
                OmegaConf.set_struct(node, False)
            elif prefix and OmegaConf.select(schema, prefix + path.rsplit(".", 1)[0], default=None) is not None:
                # a section's map is unset (MISSING) until given: its group's node takes the new keys instead;
                # a misspelt key there is still caught (rules.unknown_keys checks every key against the schema)
                OmegaConf.set_struct(OmegaConf.select(schema, prefix + path.rsplit(".", 1)[0]), False)
    return schema


def register() -> None:
    """The schema, each stage's options of the `stage` group, and the recipes, in Hydra's ConfigStore."""
    cs = ConfigStore.instance()
    cs.store(name="align_schema", node=open_dicts(OmegaConf.structured(align_schema())))
    for name, schema in stage_schemas().items():  # `stage=NAME` selects the stage's schema with its defaults
        cs.store(group="stage", name=name, node=schema(name=name))
    register_recipes(cs)


def register_recipes(cs: ConfigStore) -> dict[str, Path]:
    """Store every recipes/*.yaml as `recipe=<stem>` (a later directory wins). Returns name -> file."""
    found: dict[str, Path] = {}
    for d in recipe_dirs():
        for path in sorted(d.glob("*.yaml")):
            found[path.stem] = path
    for name, path in found.items():
        cs.store(group="recipe", name=name, node=OmegaConf.load(path), package="_global_")
    return found


def _set_keys(node: DictConfig) -> dict:
    """The keys of a section that were set (missing `???` ones dropped), nested."""
    out = {}
    for key in node:
        if OmegaConf.is_missing(node, key):
            continue
        value = node[key]
        if isinstance(value, DictConfig) and OmegaConf.get_type(value) not in (dict, None):
            sub = _set_keys(value)
            if sub:
                out[key] = sub
        else:
            out[key] = OmegaConf.to_container(value, resolve=False) if OmegaConf.is_config(value) else value
    return out


def section_overrides(cfg: DictConfig, stage: str) -> dict:
    return _set_keys(cfg[stage])


def stage_defaults(stage: str) -> DictConfig:
    """What `stage=<stage>` selects: the stage's schema, its defaults."""
    return OmegaConf.structured(stage_schemas()[stage](name=stage))


def strip(cfg: DictConfig) -> DictConfig:
    """A single stage's config: everything but the pipeline and the per-stage sections."""
    data = OmegaConf.to_container(cfg, resolve=False)
    for key in ("pipeline", *per_stage_keys()):  # not part of a single stage's config
        data.pop(key, None)
    out = OmegaConf.create(data)
    OmegaConf.set_struct(out, True)
    return out


def stage_config(cfg: DictConfig, stage: str, run_name: str | None = None) -> DictConfig:
    """The config of `stage` inside the recipe: its defaults, the shared groups, its section on top."""
    if stage not in stage_schemas():
        raise RecipeError(f"pipeline.stages names {stage!r}; stages are {', '.join(stage_schemas())}")
    overrides = section_overrides(cfg, stage)
    base = {**OmegaConf.to_container(cfg, resolve=False), "stage": {}}
    merged = OmegaConf.merge(OmegaConf.structured(align_schema()), base)  # typed again; sections dropped by strip()
    merged.stage = stage_defaults(stage)
    groups = {k: overrides.pop(k) for k in list(overrides) if k in section_groups(stage)}
    if overrides:
        merged.stage = OmegaConf.merge(merged.stage, overrides)
    for group, values in groups.items():
        merged[group] = OmegaConf.merge(merged[group], values)
    if run_name is not None:
        merged.run.name = run_name
    return strip(merged)


def check(cfg: DictConfig, task_overrides: list[str]) -> None:
    """Refuse per-stage keys that would be silently ignored, with the fix."""
    stages = list(cfg.pipeline.stages)
    if not stages:
        used = [s for s in per_stage_keys() if s in cfg and section_overrides(cfg, s)]
        if used:
            key = next(iter(section_overrides(cfg, used[0])))
            raise RecipeError(
                f"{used[0]}.* keys only apply inside a recipe (recipe=NAME); for a single stage use stage.* "
                f"(stage={used[0]} stage.{key}=...) or train.* directly")
        return
    for name in stages:
        if name not in stage_schemas():
            raise RecipeError(f"pipeline.stages names {name!r}; stages are {', '.join(stage_schemas())}")
    for o in task_overrides:
        name = o.lstrip("+~").split(".", 1)[0]
        if name in per_stage_keys() and name not in stages and "." in o:
            raise RecipeError(f"{o}: recipe {cfg.pipeline.name} runs {', '.join(stages)}, not {name}")
    for force in cfg.pipeline.force:
        if force != "all" and force not in stages:
            raise RecipeError(f"pipeline.force names {force!r}; this recipe runs {', '.join(stages)} (or use all)")
    stage_keys = [o for o in task_overrides if o.lstrip("+~").startswith("stage.") or o.lstrip("+~").startswith("stage=")]
    if stage_keys:
        key = stage_keys[0].split(".", 1)[-1].lstrip("=")
        owners = [s for s in stages if key.split("=")[0].split(".")[0] in stage_schemas()[s].__dataclass_fields__]
        raise RecipeError(
            f"{stage_keys[0]}: inside a recipe a stage's keys are addressed by its name "
            f"(e.g. {' or '.join(f'{o}.{key}' for o in (owners or stages[-1:]))}), since the recipe runs several stages")
