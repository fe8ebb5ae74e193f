"""Every config in conf/ composes; the schema rejects bad values; the CLI prints the resolved config."""

from __future__ import annotations

import subprocess
import sys
import typing

import pytest
from hydra.errors import ConfigCompositionException
from omegaconf.errors import ValidationError

from align.config.paths import config_dir
from conftest import REPO, compose

GROUPS = ["stage", "model", "data", "peft", "deepspeed", "logger"]


def options(group: str) -> list[str]:
    return sorted(p.stem for p in (config_dir() / group).glob("*.yaml"))


@pytest.mark.parametrize("group,option", [(g, o) for g in GROUPS for o in options(g)])
def test_every_group_option_composes(group, option):
    cfg = compose(f"{group}={option}")
    node = cfg[group]
    if group == "stage":
        assert node.name == option
    elif group == "peft":
        assert node.method == option
    elif group == "logger":
        assert node.backend == option
    assert cfg.run.root == "runs"


def test_shared_keys_are_where_design_says():
    cfg = compose("run.name=exp1", "train.max_steps=5", "train.lr=1e-4", "data.train=x.jsonl", "data.eval=y.jsonl")
    assert (cfg.run.name, cfg.train.max_steps, cfg.train.lr) == ("exp1", 5, 1e-4)
    assert (cfg.data.train, cfg.data.eval) == ("x.jsonl", "y.jsonl")
    for key in ("epochs", "batch_size", "grad_accum", "max_length", "seed"):
        assert key in cfg.train


def test_schema_rejects_wrong_type():
    with pytest.raises((ValidationError, ConfigCompositionException), match="train.lr|lr"):
        compose("train.lr=abc")


def test_schema_rejects_unknown_key():
    with pytest.raises(ConfigCompositionException, match="trian"):
        compose("trian.lr=1e-4")


def test_cli_prints_resolved_config_and_drops_local_rank():
    out = subprocess.run(
        [sys.executable, "-m", "align", "--local_rank=1", "--cfg", "job", "peft=lora", "run.name=cli"],
        cwd=REPO, capture_output=True, text=True, timeout=120,
    )
    assert out.returncode == 0, out.stderr
    assert "method: lora" in out.stdout and "name: cli" in out.stdout


def test_drop_local_rank_forms():
    from align.__main__ import drop_local_rank

    assert drop_local_rank(["--local_rank=3", "stage=sft"]) == (["stage=sft"], "3")
    assert drop_local_rank(["--local_rank", "2", "a=b"]) == (["a=b"], "2")
    assert drop_local_rank(["--local-rank=0"]) == ([], "0")
    assert drop_local_rank(["stage=sft"]) == (["stage=sft"], None)


def test_own_data_gets_the_defaults_for_real_models_not_the_demo_s():
    """`data.train=mine.jsonl` alone selects data=custom: no demo setting (64 tokens, batch 16, 3 epochs) leaks
    into a run on the user's data; the demo keeps its own."""
    from align.__main__ import implicit_data_group

    own = compose(*implicit_data_group(["stage=sft", "model=qwen2_5_0_5b", "data.train=mine.jsonl"]))
    assert (own.train.max_length, own.train.batch_size, own.train.grad_accum, own.train.epochs) == (2048, 4, 4, 1.0)
    assert own.data.train == "mine.jsonl" and own.train.logging_steps == 10
    demo = compose()
    assert (demo.train.max_length, demo.train.batch_size, demo.train.grad_accum, demo.train.epochs) == (64, 16, 1, 3.0)
    in_recipe = implicit_data_group(["recipe=rlhf_dpo", "sft.data.train=sft.jsonl"])
    assert in_recipe[0] == "data=custom" and compose(*in_recipe).train.max_length == 2048
    assert implicit_data_group(["data=demo", "data.train=x.jsonl"]) == ["data=demo", "data.train=x.jsonl"]
    assert implicit_data_group(["data.train=demo"]) == ["data.train=demo"]


def test_configuration_reference_is_generated_from_the_schema():
    """docs/configuration.md is what `python -m align.config.reference` writes now (regenerate it when it fails)."""
    from align.config.reference import DOC, render

    assert DOC.read_text() == render(), "docs/configuration.md is stale: run `python -m align.config.reference`"


def _flat(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict) and v and not k.endswith("extra"):
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def test_no_group_file_repeats_a_schema_default():
    """Every default lives once, in the schema: a conf/<group>/<option>.yaml sets only what the option changes
    (a stage file its `name`, a global-package file the groups it changes)."""
    from omegaconf import OmegaConf

    from align.config import schema as config
    from align.config.registry import registry

    shared = typing.get_type_hints(config.SharedConfig)
    repeated = []
    for path in sorted(config_dir().glob("*/*.yaml")):
        group, raw = path.parent.name, OmegaConf.to_container(OmegaConf.load(path))
        raw.pop("defaults", None)
        if group == "stage":
            raw.pop("name", None)
            sections = {"stage": (registry()[path.stem].schema, raw)}
        elif path.read_text().startswith("# @package _global_"):
            sections = {k: (shared[k], v) for k, v in raw.items() if k in shared}
        else:
            sections = {group: (shared[group], raw)}
        for name, (schema, values) in sections.items():
            defaults = _flat(OmegaConf.to_container(OmegaConf.structured(schema)))
            repeated += [f"{path.name}: {name}.{k}" for k, v in _flat(values).items() if k in defaults and defaults[k] == v]
    assert not repeated, repeated
