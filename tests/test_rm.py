"""The reward-model stage: learns the demo preference, keeps its score head through save, reload and merge."""

from __future__ import annotations

import json

import pytest
import torch

from conftest import compose

PROBE = [[259, 81, 68, 85, 257, 260, 66, 257], [259, 66, 257, 260, 81, 68, 257]]


def rm(runs, *overrides):
    from align.stages.rm import run

    return run(compose("stage=rm", f"run.root={runs}", "train.logging_steps=5", "train.save_steps=10000",
                       *overrides))


@pytest.fixture(scope="module")
def trained_rm(tmp_path_factory):
    # straight from the builtin tiny model (no SFT in this run): four passes over the 4,000 demo pairs
    # (two passes give 0.77 on pairs with one-letter near misses)
    return rm(tmp_path_factory.mktemp("rm") / "runs", "train.epochs=4", "train.batch_size=32", "train.lr=2e-3")


def test_rm_learns_the_demo_preference(trained_rm):
    m = trained_rm.metrics
    assert m["eval_accuracy"] >= 0.85, m  # measured 0.87 (one thread)
    assert m["eval_margin"] > 1.0 and m["reward_chosen_mean"] > m["reward_rejected_mean"], m
    assert m["last_loss"] < m["first_loss"] - 0.3, m
    record = json.loads((trained_rm.out / "stage.json").read_text())
    assert record["task"] == "seq_cls" and record["parents"] == []
    for key in ("eval_accuracy", "eval_margin", "reward_mean", "reward_std"):
        assert key in record["metrics"]


def test_rm_starts_from_the_runs_sft(tmp_path):
    from align.stages.sft import run as sft

    runs = tmp_path / "runs"
    sft(compose(f"run.root={runs}", "train.max_steps=3", "data.max_rows=64", "train.save_steps=1000"))
    result = rm(runs, "train.max_steps=2", "data.max_rows=64")
    record = json.loads((result.out / "stage.json").read_text())
    assert [p["stage"] for p in record["parents"]] == ["sft"]
    assert record["parents"][0]["path"] == str(runs / "demo" / "sft")


def scores(model, pad=256):
    from align.rl.rollout import score

    return score(model, PROBE, pad)


def test_full_rm_reloads_with_same_scores(trained_rm):
    from transformers import AutoModelForSequenceClassification

    reloaded = AutoModelForSequenceClassification.from_pretrained(trained_rm.out / "model")
    torch.testing.assert_close(scores(reloaded), scores(trained_rm.model), rtol=0, atol=1e-5)


@pytest.mark.parametrize("method", ["lora", "qlora"])
def test_adapter_rm_keeps_score_head_through_save_reload_and_merge(tmp_path, method):
    from peft import PeftModel
    from transformers import AutoModelForSequenceClassification

    from align.__main__ import dispatch
    from align.models.loading import quantization_config

    overrides = [f"peft={method}", "train.max_steps=6", "data.max_rows=96", "peft.r=4", "peft.dropout=0.0"]
    result = rm(tmp_path / "runs", *overrides)
    live = scores(result.model)
    model_dir = result.out / "model"
    saved = json.loads((model_dir / "adapter_config.json").read_text())
    assert "score" in saved["modules_to_save"] and saved["task_type"] == "SEQ_CLS"

    kwargs = {"num_labels": 1, "dtype": torch.float32}
    if method == "qlora":
        kwargs["quantization_config"] = quantization_config(compose(*overrides).peft, torch.float32)
    base = AutoModelForSequenceClassification.from_pretrained(saved["base_model_name_or_path"], **kwargs)
    base_scores = scores(base)
    reloaded = PeftModel.from_pretrained(base, model_dir)
    torch.testing.assert_close(scores(reloaded), live, rtol=0, atol=1e-5)
    assert (live - base_scores).abs().max() > 1e-3  # the saved head is the trained one, not a fresh init

    merged_dir = dispatch(compose("stage=rm", f"run.root={tmp_path / 'runs'}", *overrides), "export")
    merged = AutoModelForSequenceClassification.from_pretrained(merged_dir)
    assert not (merged_dir / "adapter_config.json").exists()
    torch.testing.assert_close(scores(merged), live, rtol=0, atol=1e-5)
