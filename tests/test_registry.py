"""The stage registry: a stage defined outside the package, registered through the `align.stages` entry point,
runs alone and inside a recipe, is cached (a second run trains nothing) and summarised like a built-in one,
with no edit inside align/."""

from __future__ import annotations

import json
import logging
import sys
import textwrap

import pytest

from conftest import compose

STAGE_MODULE = textwrap.dedent('''
    """A user's stage: the run's SFT policy with its output layer scaled by stage.scale (a sharper or flatter
    softmax), committed through align's stage contract."""
    from dataclasses import dataclass

    import torch

    from align.run import handoff
    from align.config.schema import POSITIVE, StageConfig, keyed
    from align.config.registry import StageSpec, init_parent
    from align.run.stage_run import StageResult, StageRun


    @dataclass
    class SharpenConfig(StageConfig):
        name: str = "sharpen"
        scale: float = keyed(2.0, POSITIVE, "factor on the output layer's weights")


    def run(cfg):
        from transformers import AutoModelForCausalLM, AutoTokenizer

        stage = StageRun(cfg)
        parent = handoff.find_parent(cfg, "sft", cfg.stage.init)
        model = AutoModelForCausalLM.from_pretrained(parent.model)
        with torch.no_grad():
            model.get_output_embeddings().weight.mul_(cfg.stage.scale)
        staged = handoff.staging_dir(stage.out)
        model.save_pretrained(staged)
        AutoTokenizer.from_pretrained(parent.model).save_pretrained(staged)
        metrics = {"scale": cfg.stage.scale, "parameters": sum(p.numel() for p in model.parameters())}
        stage.commit(staged, [parent], parent.info.get("base_model", str(parent.model)), metrics)
        return StageResult(stage.out, metrics, model)


    SPEC = StageSpec(name="sharpen", schema=SharpenConfig, run=run, parents=init_parent("sft"), lr={}, policy=True,
                     headline=("scale",))
''')


@pytest.fixture(params=["entry point", "built-in"])
def user_stage(request, tmp_path, monkeypatch):
    """The same stage added two ways: as another package's (an installed distribution, dist-info on sys.path, whose
    entry point names a module outside align/), and as a built-in one is (its module under align.stages and its
    name in align.stages.BUILTIN, the one registry line)."""
    import types

    import align.stages
    from align.config import compose, registry

    if request.param == "entry point":
        site = tmp_path / "site"
        (site / "user_stages-0.1.dist-info").mkdir(parents=True)
        (site / "user_stages-0.1.dist-info" / "METADATA").write_text(
            "Metadata-Version: 2.1\nName: user-stages\nVersion: 0.1\n")
        (site / "user_stages-0.1.dist-info" / "entry_points.txt").write_text("[align.stages]\nsharpen = user_sharpen\n")
        (site / "user_sharpen.py").write_text(STAGE_MODULE)
        monkeypatch.syspath_prepend(str(site))
    else:
        module = types.ModuleType("align.stages.sharpen")
        module.__file__ = str(tmp_path / "sharpen.py")
        monkeypatch.setitem(sys.modules, "align.stages.sharpen", module)
        exec(compile(STAGE_MODULE, module.__file__, "exec"), module.__dict__)
        monkeypatch.setattr(align.stages, "BUILTIN", (*align.stages.BUILTIN, "sharpen"))
    (tmp_path / "recipes").mkdir()
    (tmp_path / "recipes" / "sharp.yaml").write_text(
        "pipeline:\n  name: sharp\n  stages: [sft, sharpen]\nsft:\n  train:\n    max_steps: 20\nsharpen:\n  scale: 3.0\n")
    monkeypatch.chdir(tmp_path)  # ./recipes/ holds the user's recipe

    def clear():
        for cache in (registry.registry, compose.sections, compose.align_schema):
            cache.cache_clear()

    clear()
    yield tmp_path
    sys.modules.pop("user_sharpen", None)
    monkeypatch.undo()
    clear()


def test_a_stage_from_another_package_runs_in_a_recipe_cached_and_summarised(user_stage, caplog):
    from align.run import handoff, orchestrate as pipeline
    from align.config.registry import names, registry

    assert "sharpen" in names() and registry()["sharpen"].policy
    runs = user_stage / "runs"
    overrides = ["recipe=sharp", f"run.root={runs}", "run.name=r"]
    pipeline.run(compose(*overrides), overrides)
    info = handoff.read_stage_json(runs / "r" / "sharpen")
    assert info["metrics"]["scale"] == 3.0 and [p["stage"] for p in info["parents"]] == ["sft"]
    assert "scale" in (runs / "r" / "summary.md").read_text()  # its headline metric in the run's summary

    with caplog.at_level(logging.INFO, logger="align"):
        pipeline.run(compose(*overrides), overrides)
    assert "sharpen: up to date" in caplog.text and "sft: up to date" in caplog.text

    caplog.clear()
    changed = [*overrides, "sharpen.scale=1.5"]  # its own key, typed by its schema, changes its identity
    with caplog.at_level(logging.INFO, logger="align"):
        pipeline.run(compose(*changed), changed)
    assert "sharpen: running (changed: stage.scale: 3.0 -> 1.5)" in caplog.text
    assert json.loads((runs / "r" / "sharpen" / "stage.json").read_text())["metrics"]["scale"] == 1.5


def test_a_stage_from_another_package_runs_alone_and_its_keys_are_checked(user_stage, monkeypatch):
    from conftest import run_cli

    runs = user_stage / "runs"
    assert run_cli(["stage=sft", f"run.root={runs}", "train.max_steps=5"], monkeypatch) == 0
    assert run_cli(["stage=sharpen", f"run.root={runs}", "stage.scale=-1"], monkeypatch) == 2  # its own Check
    assert run_cli(["stage=sharpen", f"run.root={runs}"], monkeypatch) == 0
    assert json.loads((runs / "demo" / "sharpen" / "stage.json").read_text())["metrics"]["scale"] == 2.0
