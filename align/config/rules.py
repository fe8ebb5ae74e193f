"""Every value checked before anything loads: the ranges declared beside each key in the schema
(align/config/schema.py `keyed(..., Check)`), the relations between keys, and keys the schema does not know.

Each problem names the key, the value, what is allowed and the default, so the fix is one edit.
"""

from __future__ import annotations

import dataclasses
import difflib

from omegaconf import DictConfig, ListConfig, OmegaConf

from align.config.deepspeed import deepspeed_config
from align.config.registry import registry, stage_schemas
from align.config.schema import Check

SECTIONS = ("run", "train", "model", "data", "peft", "deepspeed", "logger")


def fmt(value) -> str:
    if isinstance(value, (list, ListConfig)):
        return "[" + ",".join(fmt(v) for v in value) + "]"
    return "null" if value is None else str(value)


def _schema_fields(schema: type) -> dict[str, dataclasses.Field]:
    return {f.name: f for f in dataclasses.fields(schema)}


def _check_node(node: DictConfig, schema: type, prefix: str) -> list[str]:
    out = []
    for name, f in _schema_fields(schema).items():
        if name not in node or OmegaConf.is_missing(node, name):
            continue
        value = node[name]
        if isinstance(value, DictConfig):
            sub = OmegaConf.get_type(value)
            if dataclasses.is_dataclass(sub):
                out += _check_node(value, sub, f"{prefix}{name}.")
            continue
        check: Check | None = f.metadata.get("check")
        if check is None:
            continue
        items = list(value) if isinstance(value, ListConfig) else [value]
        if all(check.allows(v) for v in items):
            continue
        default = f.default if f.default is not dataclasses.MISSING else None
        helptext = f.metadata.get("help")
        out.append(f"{prefix}{name}={fmt(value)}: must be {check.describe()}"
                   + (f" ({helptext})" if helptext else "")
                   + f". Fix: set {prefix}{name} to a value {check.describe()}; the default is {fmt(default)}")
    return out


def relations(cfg: DictConfig) -> list[str]:
    """Rules between keys (each key alone may be fine): the shared groups' here, each stage's own from its
    StageSpec.checks."""
    out = []
    if cfg.data.checker == "regex" and not cfg.data.checker_pattern:
        out.append("data.checker=regex needs data.checker_pattern (a Python regular expression)")
    if cfg.data.checker == "gym" and not str(cfg.data.train).startswith("gym:"):
        out.append(f"data.checker=gym scores a reasoning-gym task's answers with its score_answer; data.train="
                   f"{cfg.data.train} is not one: use data=gym:<task>, or another data.checker")
    spec = registry().get(cfg.stage.name)
    return out + (spec.checks(cfg) if spec is not None else [])


def run_name_problem(name) -> str | None:
    """run.name is one folder inside run.root: no path separator, no `..`, not empty."""
    text = str(name) if name is not None else ""
    if not text or "/" in text or "\\" in text or ".." in text or text in (".",):
        return (f"run.name={text!r}: a run name is one folder inside run.root, without '/', '\\' or '..'. "
                "Fix: run.name=my_run (to write elsewhere, set run.root)")
    return None


class Unsupported(ValueError):
    """A configuration align refuses before loading a model (exit code 2, like bad data)."""


def problems(cfg: DictConfig) -> list[str]:
    """What is wrong with one stage's config (recipes: each stage's own config)."""
    from align.config.compose import align_schema

    fields = _schema_fields(align_schema())
    out = []
    for section in SECTIONS:
        if section in cfg:
            out += _check_node(cfg[section], fields[section].default_factory, f"{section}.")
    schema = stage_schemas().get(cfg.stage.name)
    if schema is not None:
        out += _check_node(cfg.stage, schema, "stage.")
    out += relations(cfg)
    try:
        deepspeed_config(cfg)
    except ValueError as e:
        if str(e).split(" ", 1)[0] not in {p.split("=", 1)[0] for p in out}:  # one message per key
            out.append(str(e))
    return out


def check(cfg: DictConfig) -> None:
    """Raise Unsupported listing every problem of `cfg` (one stage's config)."""
    found = problems(cfg)
    if found:
        raise Unsupported(f"stage={cfg.stage.name}: this configuration is not supported:\n"
                          + "\n".join(f"  - {p}" for p in found))


# keys that existed once, with what replaced them
RETIRED = {"vf_coef": "removed: the critic has its own AdamW, so a weight on its loss changed only its gradient "
                      "clipping; stage.critic_max_grad_norm sets that clipping (vf_coef 0.1 under "
                      "train.max_grad_norm 1.0 was a norm of 10, the default) and stage.critic_lr its pace"}


def unknown_keys(cfg: DictConfig, prefix: str = "") -> list[str]:
    """Keys that no schema declares (`+train.lrr=1e-4` adds one past Hydra's own check), with the
    nearest known key. Free-form dicts (deepspeed.extra) take any key."""
    schema = OmegaConf.get_type(cfg)
    if not dataclasses.is_dataclass(schema):
        return []
    known = _schema_fields(schema)
    out = []
    for key in cfg:
        if key not in known:
            if str(key) in RETIRED:
                out.append(f"{prefix}{key}: {RETIRED[str(key)]}")
                continue
            near = difflib.get_close_matches(str(key), list(known), n=1)
            hint = f"; did you mean {prefix}{near[0]}?" if near else f"; {prefix.rstrip('.') or 'the top level'} has " \
                                                                       f"{', '.join(sorted(known))}"
            out.append(f"{prefix}{key}: no such key{hint}")
            continue
        value = cfg._get_node(key)
        if isinstance(value, DictConfig) and not OmegaConf.is_missing(cfg, key):
            out += unknown_keys(value, f"{prefix}{key}.")
    return out
