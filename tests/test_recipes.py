"""Recipes: composition, the stage cache, sweeps sharing their upstream stages, Optuna, the run summary."""

from __future__ import annotations

import json
import logging
import struct
import subprocess
import sys

import pytest
from omegaconf import OmegaConf

from conftest import REPO, compose, child_env

# every stage a few steps: the cache logic, not the training, is under test
FAST = ["pipeline.stages=[sft,rm,ppo,eval]", "train.max_steps=3", "data.max_rows=200", "ppo.train.max_steps=2",
        "ppo.rollout_batch_size=16", "ppo.eval_prompts=8", "ppo.max_new_tokens=8", "eval.prompts=8",
        "eval.max_new_tokens=8"]
RECIPES = sorted(p.stem for p in (REPO / "recipes").glob("*.yaml"))


def test_every_recipe_composes_into_valid_stage_configs():
    from align.config import recipes
    assert {"demo", "rlhf_ppo", "rlhf_dpo", "hpo_dpo"} <= set(RECIPES)
    for name in RECIPES:
        cfg = compose(f"recipe={name}")
        assert cfg.pipeline.stages, name
        for stage in cfg.pipeline.stages:
            scfg = recipes.stage_config(cfg, stage)
            assert scfg.stage.name == stage and "pipeline" not in scfg and "dpo" not in scfg
    rlhf = compose("recipe=rlhf_ppo")
    assert rlhf.model.name_or_path == "Qwen/Qwen2.5-0.5B-Instruct" and rlhf.peft.method == "lora"
    assert recipes.stage_config(rlhf, "ppo").stage.kl_target == 6.0


def test_section_keys_reach_their_stage_only_and_hash_like_a_single_stage_run():
    from align.run import handoff
    from align.config import recipes
    cfg = compose("recipe=demo", "sft.train.epochs=2", "rm.train.lr=null")
    sft, rm, ppo = (recipes.stage_config(cfg, s) for s in ("sft", "rm", "ppo"))
    assert sft.train.epochs == 2 and sft.train.lr is None and sft.stage.init is None
    assert rm.stage.init == "base" and rm.train.lr is None and rm.train.batch_size == 32 and rm.train.epochs == 4
    assert ppo.stage.temperature == 0.7 and ppo.stage.kl_coef == 0.2 and ppo.train.lr == 3e-4
    assert ppo.train.max_steps == 100 and ppo.train.epochs == 3  # epochs: not rm's or sft's, the shared demo value
    alone = compose("stage=ppo", "stage.temperature=0.7", "stage.kl_coef=0.2", "train.lr=3e-4",
                    "train.max_steps=100")
    assert handoff.config_hash(ppo) == handoff.config_hash(alone)  # same cache entry either way
    assert handoff.config_hash(sft) != handoff.config_hash(compose("stage=sft"))


def test_misplaced_keys_are_refused_with_the_fix():
    from hydra.errors import ConfigCompositionException

    from align.config import recipes
    with pytest.raises(ConfigCompositionException):
        compose("recipe=demo", "dpo.betta=0.1")  # typed sections: a typo never passes silently
    with pytest.raises(recipes.RecipeError, match=r"only apply inside a recipe.*stage.beta"):
        recipes.check(compose("stage=dpo", "dpo.beta=0.3"), ["stage=dpo", "dpo.beta=0.3"])
    with pytest.raises(recipes.RecipeError, match="runs sft, dpo, not ppo"):
        recipes.check(compose("recipe=rlhf_dpo", "ppo.kl_coef=0.1"), ["recipe=rlhf_dpo", "ppo.kl_coef=0.1"])
    with pytest.raises(recipes.RecipeError, match=r"addressed by its name \(e.g. dpo.beta=0.2 or grpo.beta=0.2\)"):
        recipes.check(compose("recipe=demo"), ["recipe=demo", "stage.beta=0.2"])
    with pytest.raises(recipes.RecipeError, match="pipeline.force names 'dpo'"):
        recipes.check(compose("recipe=demo", *FAST, "pipeline.force=[dpo]"), [])


def run_recipe(runs, *extra):
    from align.run import orchestrate as pipeline
    overrides = ["recipe=demo", f"run.root={runs}", *FAST, *extra]
    return pipeline.run(compose(*overrides), overrides)


def output_ids(runs) -> dict:
    return {s: json.loads((runs / "demo" / s / "stage.json").read_text())["output_id"]
            for s in ("sft", "rm", "ppo", "eval")}


@pytest.fixture(scope="module")
def cached_runs(tmp_path_factory):
    runs = tmp_path_factory.mktemp("cache") / "runs"
    run_recipe(runs)
    return runs


def test_second_run_trains_nothing_and_a_changed_rm_key_reruns_rm_and_ppo(cached_runs, caplog):
    first = output_ids(cached_runs)
    with caplog.at_level(logging.INFO, logger="align"):
        value = run_recipe(cached_runs)
    assert output_ids(cached_runs) == first
    for stage in ("sft", "rm", "ppo", "eval"):
        assert f"{stage}: up to date" in caplog.text
    assert value is None  # the demo recipe names no objective (it is not a search)

    caplog.clear()
    with caplog.at_level(logging.INFO, logger="align"):
        run_recipe(cached_runs, "rm.train.lr=1e-3")
    changed = output_ids(cached_runs)
    assert changed["sft"] == first["sft"] and changed["rm"] != first["rm"] and changed["ppo"] != first["ppo"]
    assert changed["eval"] != first["eval"]  # it judges with the new rm and scores the new ppo
    assert "rm: running (changed: train.lr: 0.002 -> 0.001)" in caplog.text and "ppo: running (rm output changed)" in caplog.text
    assert "eval: running (ppo/rm output changed)" in caplog.text

    run_recipe(cached_runs, "rm.train.lr=1e-3", "pipeline.force=[rm]")  # same config, forced: rm and downstream
    forced = output_ids(cached_runs)
    assert forced["sft"] == changed["sft"] and forced["rm"] != changed["rm"] and forced["ppo"] != changed["ppo"]


def test_summary_and_plots_hold_the_stages_numbers(cached_runs):
    from align.run import handoff
    from align.run.summary import _fmt, curves

    run_dir = cached_runs / "demo"
    md = (run_dir / "summary.md").read_text()
    for stage in ("sft", "rm", "ppo"):
        info = handoff.read_stage_json(run_dir / stage)
        for key, value in info["metrics"].items():
            assert f"| {key} | {_fmt(value)} |" in md, (stage, key)
        png = run_dir / "plots" / f"{stage}.png"
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 5000
        assert f"](plots/{stage}.png)" in md
    rm_acc = handoff.read_stage_json(run_dir / "rm")["metrics"]["eval_accuracy"]
    assert "| rm | " in md and f"eval_accuracy {_fmt(rm_acc)}" in md
    evaluated = handoff.read_stage_json(run_dir / "eval")["metrics"]
    assert (run_dir / "eval" / "results.md").read_text().rstrip() in md  # the eval table, whole
    assert f"ppo/checker_accuracy {_fmt(evaluated['ppo/checker_accuracy'])}" in md  # and in the stage table
    history = handoff.read_history(run_dir / "ppo")
    drawn = curves(history)["reward"]["reward/score_mean"]
    assert drawn == ([1, 2], [h["reward/score_mean"] for h in history])
    assert handoff.read_stage_json(run_dir / "ppo")["metrics"]["reward/score_mean"] == pytest.approx(drawn[1][-1],
                                                                                                    abs=1e-6)


def align_cli(*args, cwd, timeout=400):
    env = child_env()
    out = subprocess.run([sys.executable, "-m", "align", *args], cwd=cwd, env=env, capture_output=True, text=True,
                         timeout=timeout)
    assert out.returncode == 0, out.stderr[-4000:]
    return out


def wandb_run_record(stage_dir):
    """The run record (group, display name) of the offline W&B run in a stage directory: the .wandb file
    is a log of length-prefixed protobuf records in 32 KiB blocks."""
    from wandb.proto import wandb_internal_pb2 as pb

    (path,) = stage_dir.glob("wandb/offline-run-*/run-*.wandb")
    data, pos, buf = path.read_bytes(), 7, b""
    assert data[:4] == b":W&B"
    while pos + 7 <= len(data):
        if 32768 - pos % 32768 < 7:
            pos += 32768 - pos % 32768
            continue
        _, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        buf = data[pos + 7:pos + 7 + length] if kind in (1, 2) else buf + data[pos + 7:pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):
            record = pb.Record()
            record.ParseFromString(buf)
            if record.WhichOneof("record_type") == "run":
                return record.run
    raise AssertionError(f"no run record in {path}")


def test_two_job_sweep_trains_sft_once_and_shares_one_wandb_group(tmp_path):
    out = align_cli("-m", "recipe=demo", "pipeline.stages=[sft,dpo]", "run.name=beta-sweep", "dpo.beta=0.05,0.3",
                    "logger=wandb", "train.max_steps=3", "data.max_rows=200", cwd=tmp_path)
    sweep = tmp_path / "runs" / "beta-sweep"
    jobs = [sweep / "dpo.beta=0.05", sweep / "dpo.beta=0.3"]
    assert all((j / "dpo" / "stage.json").is_file() for j in jobs)
    real = [j for j in jobs if not (j / "sft").is_symlink()]
    assert len(real) == 1 and (jobs[1] / "sft").resolve() == (jobs[0] / "sft").resolve()
    assert out.stdout.count("sft: running") + out.stderr.count("sft: running") == 1
    betas = [OmegaConf.load(j / "dpo" / "config.yaml").stage.beta for j in jobs]
    assert betas == [0.05, 0.3]
    runs = [wandb_run_record(j / "dpo") for j in jobs]
    assert [r.run_group for r in runs] == ["beta-sweep", "beta-sweep"]
    assert [r.display_name for r in runs] == ["beta-sweep/dpo.beta=0.05-dpo", "beta-sweep/dpo.beta=0.3-dpo"]
    parents = [json.loads((j / "dpo" / "stage.json").read_text())["parents"][0]["output_id"] for j in jobs]
    assert parents[0] == parents[1]  # both DPOs trained from the one SFT


def test_optuna_recipe_maximises_the_objective(tmp_path):
    align_cli("-m", "recipe=hpo_dpo", "hydra.sweeper.n_trials=2", "train.max_steps=3", "data.max_rows=200",
              cwd=tmp_path)
    sweep = tmp_path / "runs" / "hpo_dpo"
    results = OmegaConf.load(sweep / "optimization_results.yaml")
    trials = [json.loads(p.read_text()) for p in sweep.glob("*/dpo/stage.json")]
    assert len(trials) == 2
    assert results.best_value == pytest.approx(max(t["metrics"]["eval_accuracy"] for t in trials))
    assert len([p for p in sweep.glob("*/sft") if not p.is_symlink()]) == 1
