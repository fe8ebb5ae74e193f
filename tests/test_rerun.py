"""Finished means finished: a rerun of a complete stage with the same config, data and parents changes
nothing; a changed one re-trains, saying what changed; resume never trains past its budget; run.force
keeps an interrupted run's checkpoints aside until the new run has committed one of its own."""

from __future__ import annotations

import hashlib
import json
import os

import pytest

from conftest import run_cli, write_jsonl

FAST = ["run.root=runs", "data.max_rows=32", "train.save_steps=1000", "train.logging_steps=1"]


def tree(path) -> dict:
    return {str(p.relative_to(path)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(path.rglob("*")) if p.is_file() and p.name != ".lock"}


@pytest.mark.parametrize("budget", ["train.max_steps=2", "train.epochs=1"])
def test_rerunning_a_finished_stage_changes_nothing(budget, tmp_path, monkeypatch, caplog):
    monkeypatch.chdir(tmp_path)
    args = ["stage=sft", "run.name=y", *FAST, budget]
    assert run_cli(args, monkeypatch) == 0
    out = tmp_path / "runs" / "y" / "sft"
    first, info = tree(out), json.loads((out / "stage.json").read_text())
    assert info["metrics"]["global_step"] == 2  # 32 rows / batch 16 = 2 steps an epoch
    assert not list(out.rglob("README.md"))  # no model card naming "[None]" as the base
    with caplog.at_level("INFO", logger="align"):
        assert run_cli(args, monkeypatch) == 0
    assert "sft: up to date" in caplog.text and "nothing changed" in caplog.text
    assert tree(out) == first  # same model/, same stage.json (same output_id), same checkpoints

    caplog.clear()
    with caplog.at_level("INFO", logger="align"):
        assert run_cli([*args, "train.lr=1e-3"], monkeypatch) == 0
    assert "sft: running (changed: train.lr: null -> 0.001); the complete output stays in" in caplog.text
    again = json.loads((out / "stage.json").read_text())
    assert again["output_id"] != info["output_id"] and again["metrics"]["global_step"] == 2


def test_an_edited_data_file_retrains_and_a_touched_one_does_not(tmp_path, monkeypatch, caplog):
    monkeypatch.chdir(tmp_path)
    data = write_jsonl(tmp_path / "mine.jsonl", [{"prompt": f"say {w}", "completion": w} for w in "abcdefgh"])
    args = ["stage=sft", "run.name=d", "data.train=mine.jsonl", "train.max_steps=1", *FAST]
    assert run_cli(args, monkeypatch) == 0
    out = tmp_path / "runs" / "d" / "sft"
    first = json.loads((out / "stage.json").read_text())
    assert first["inputs"]["data.train"] and first["inputs"]["model"] == "builtin:tiny@main"
    os.utime(data, (1, 1))  # same bytes, another mtime
    with caplog.at_level("INFO", logger="align"):
        assert run_cli(args, monkeypatch) == 0
    assert "sft: up to date" in caplog.text
    write_jsonl(data, [{"prompt": f"say {w}", "completion": w.upper()} for w in "abcdefgh"])  # edited in place
    caplog.clear()
    with caplog.at_level("INFO", logger="align"):
        assert run_cli(args, monkeypatch) == 0
    assert "sft: running (changed: data.train content changed)" in caplog.text
    assert json.loads((out / "stage.json").read_text())["output_id"] != first["output_id"]


def test_resume_from_the_last_step_s_checkpoint_never_trains_past_max_steps(tmp_path, monkeypatch, caplog):
    """A crash between the last checkpoint and the commit: the Trainer resumed from a checkpoint saved at
    max_steps would train one step more; align resumes from the one before (exact resume: same weights)."""
    from align.run import checkpointing
    monkeypatch.chdir(tmp_path)
    args = ["stage=sft", "run.name=c", *FAST, "train.max_steps=3", "train.save_steps=2"]
    assert run_cli(args, monkeypatch) == 0
    out = tmp_path / "runs" / "c" / "sft"
    whole = json.loads((out / "stage.json").read_text())
    assert [p.name for p in checkpointing.checkpoints(out / "checkpoints")] == ["checkpoint-2", "checkpoint-3"]
    (out / "stage.json").unlink()  # as if the process died before the commit
    with caplog.at_level("INFO", logger="align"):
        assert run_cli(args, monkeypatch) == 0
    assert f"resuming from {os.path.join('runs', 'c', 'sft', 'checkpoints', 'checkpoint-2')}" in caplog.text
    again = json.loads((out / "stage.json").read_text())
    assert again["metrics"]["global_step"] == 3
    assert again["metrics"]["last_loss"] == pytest.approx(whole["metrics"]["last_loss"], rel=1e-5)


def test_within_budget_skips_checkpoints_saved_at_the_end(tmp_path):
    from align.run import checkpointing
    for step, max_steps in ((2, 4), (4, 4)):
        path = tmp_path / f"checkpoint-{step}"
        path.mkdir()
        (path / "trainer_state.json").write_text(json.dumps({"global_step": step, "max_steps": max_steps}))
        checkpointing.commit(path)
    assert checkpointing.within_budget(tmp_path).name == "checkpoint-2"
    checkpointing.rotate(tmp_path, 1)  # only the end's checkpoint is left: start over
    assert checkpointing.within_budget(tmp_path) is None


def test_force_keeps_the_interrupted_checkpoints_aside_until_the_new_run_commits_one(tmp_path, monkeypatch):
    from align.run import checkpointing
    from align.run.stage_run import ASIDE, HASH_FILE

    monkeypatch.chdir(tmp_path)
    out = tmp_path / "runs" / "f" / "sft"
    old = out / "checkpoints" / "checkpoint-7"
    old.mkdir(parents=True)
    checkpointing.commit(old)
    (out / "checkpoints" / HASH_FILE).write_text("0123456789abcdef\n")
    args = ["stage=sft", "run.name=f", *FAST, "train.max_steps=2", "train.save_steps=1"]
    assert run_cli(args, monkeypatch) == 2  # another config's interrupted run: refused
    assert checkpointing.is_committed(old)

    seen = []
    original = checkpointing.commit

    def commit(path, info=None):
        seen.append((path.name, (out / ASIDE / "checkpoint-7").is_dir()))
        original(path, info)

    monkeypatch.setattr(checkpointing, "commit", commit)
    assert run_cli([*args, "run.force=true"], monkeypatch) == 0
    assert seen[0] == ("checkpoint-1", True)  # kept aside while the new run had no checkpoint
    assert not (out / ASIDE).exists() and not old.exists()
    assert [p.name for p in checkpointing.checkpoints(out / "checkpoints")] == ["checkpoint-1", "checkpoint-2"]


def test_the_resume_warning_about_tied_weights_is_dropped_and_others_are_kept():
    import logging

    from align.models.loading import load_causal_lm
    from align.run.stage_run import TiedKeysFilter
    from conftest import compose

    cfg = compose()
    quiet = TiedKeysFilter(load_causal_lm(cfg.model.name_or_path, cfg.model, cfg.peft))

    def record(msg):
        return logging.LogRecord("transformers.trainer", logging.WARNING, __file__, 1, msg, None, None)

    assert not quiet.filter(record("There were missing keys in the checkpoint model loaded: ['lm_head.weight']."))
    assert quiet.filter(record("There were missing keys in the checkpoint model loaded: ['model.norm.weight']."))
    assert quiet.filter(record("Saving model checkpoint"))


def test_the_cache_search_passes_over_a_folder_another_rank_removes_while_it_looks(tmp_path, monkeypatch):
    """Under `deepspeed --num_gpus 2` rank 1 searched run.root for a reusable output while rank 0's preflight
    made and removed its write probe there; the search crashed with FileNotFoundError on the vanished folder."""
    from pathlib import Path

    from align.run import cache
    for stage_dir in ("demo/sft", "sweep/job0/sft", ".align-write-test-x/sft"):
        (tmp_path / stage_dir).mkdir(parents=True)
    probe = tmp_path / "probe"
    (probe / "sft").mkdir(parents=True)
    real = os.scandir

    class Listed:  # the entries as they were when listed; the probe is removed right after
        def __init__(self, entries):
            self.entries = entries

        def __enter__(self):
            return iter(self.entries)

        def __exit__(self, *exc):
            return False

        def __iter__(self):
            return iter(self.entries)

        def close(self):
            pass

    def scandir(path="."):
        with real(path) as it:
            entries = list(it)
        if Path(path) == tmp_path and probe.exists():
            (probe / "sft").rmdir()
            probe.rmdir()
        return Listed(entries)

    monkeypatch.setattr(os, "scandir", scandir)
    found = [cache._stage_dirs(tmp_path, "sft", depth) for depth in (1, 2, 3)]
    assert found == [[tmp_path / "demo/sft"], [tmp_path / "sweep/job0/sft"], []]
