"""W&B: offline without a key, config logged, the run id kept so a re-run continues the same W&B run."""

from __future__ import annotations

import json

from conftest import compose


def test_offline_run_keeps_its_id_across_reruns(tmp_path, monkeypatch):
    from align.stages.sft import run

    monkeypatch.delenv("WANDB_MODE", raising=False)  # no key and no WANDB_MODE: align picks offline itself
    monkeypatch.setenv("HOME", str(tmp_path))  # no ~/.netrc key either
    overrides = [f"run.root={tmp_path / 'runs'}", "logger=wandb", "logger.group=g1", "logger.tags=[t1]",
                 "train.max_steps=3", "data.max_rows=64", "train.save_steps=1000"]
    first = run(compose(*overrides))
    record = json.loads((first.out / "stage.json").read_text())
    run_id = record["wandb_run_id"]
    assert run_id and (first.out / "wandb_id").read_text().strip() == run_id
    offline = list((first.out / "wandb").glob(f"offline-run-*-{run_id}"))
    assert offline and list(offline[0].glob(f"run-{run_id}.wandb")), list((first.out / "wandb").iterdir())
    second = run(compose(*overrides))
    assert json.loads((second.out / "stage.json").read_text())["wandb_run_id"] == run_id
    assert len(list((first.out / "wandb").glob(f"offline-run-*-{run_id}"))) == 2


def test_mode_follows_env_and_key(monkeypatch, tmp_path):
    from align.run.tracking import wandb_mode

    monkeypatch.setenv("HOME", str(tmp_path))
    cfg = compose("logger=wandb")
    monkeypatch.delenv("WANDB_MODE", raising=False)
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    assert wandb_mode(cfg) == "offline"
    monkeypatch.setenv("WANDB_API_KEY", "x" * 40)
    assert wandb_mode(cfg) == "online"
    monkeypatch.setenv("WANDB_MODE", "offline")
    assert wandb_mode(cfg) == "offline"
    assert wandb_mode(compose("logger=wandb", "logger.mode=disabled")) == "disabled"
