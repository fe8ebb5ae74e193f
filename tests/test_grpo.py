"""stage=grpo end to end on the tiny model: the checker as the reward raises held-out accuracy, every advantage
kind trains, a python reward function runs from the working directory, LoRA uses the adapter-free policy as its
reference, and a preempted run resumes to the same weights as an uninterrupted one."""

from __future__ import annotations

import json
import os

import pytest
import torch

from conftest import write_jsonl
from test_ppo import run_stage

# temperature 0.7 as in the demo recipe: at 1.0 the tiny SFT model samples a right answer 17% of the time
GRPO = ("train.batch_size=16", "stage.rollout_batch_size=8", "stage.group_size=8", "stage.eval_prompts=64",
        "stage.max_new_tokens=8", "stage.temperature=0.7", "train.logging_steps=1")


@pytest.fixture(scope="module")
def sft_run(tmp_path_factory):
    runs = tmp_path_factory.mktemp("grpo") / "runs"
    run_stage("sft", runs)  # the demo's SFT (3 epochs): a model that answers right about half the time
    return runs


def test_grpo_with_the_checker_as_reward_raises_held_out_accuracy(sft_run):
    result = run_stage("grpo", sft_run, *GRPO, "train.max_steps=100")
    m = result.metrics
    # 100 steps at the tiny model's default lr (3e-5; 250 steps at 1e-4, the default before, took the 64 held-out
    # prompts from 0.59 to 1.00); the demo's +25 points are test_demo's and test_vllm's to hold
    assert m["eval_checker_accuracy"] >= m["eval_checker_accuracy_before"] + 0.05, m
    assert m["reward/checker"] > m["first_reward/checker"], m  # the rollouts' own accuracy rose
    assert "eval_greedy_logratio" not in m and "eval_greedy_logratio_before" not in m  # beta 0 with full weights: no reference loaded
    for key in ("groups/zero_variance_share", "policy/clipfrac", "policy/entropy", "response/length", "samples/s"):
        assert key in m, key
    record = json.loads((result.out / "stage.json").read_text())
    assert [p["stage"] for p in record["parents"]] == ["sft"] and record["warnings"] == []


# two passes over each rollout: the second's ratios are not 1, so the policy loss and its ratio level matter
LOSSES = {"dr_grpo": [], "rloo": ["stage.ratio_level=sequence", "stage.ppo_epochs=2"],
          "reinforce_pp": ["stage.policy_loss=cispo", "stage.ppo_epochs=2"]}


@pytest.mark.parametrize("advantage", list(LOSSES))
def test_every_advantage_kind_and_policy_loss_trains(sft_run, advantage):
    result = run_stage("grpo", sft_run, *GRPO, "train.max_steps=60", f"stage.advantage={advantage}",
                       f"run.name={advantage}", f"stage.init={sft_run / 'demo' / 'sft'}", "stage.beta=0.05",
                       *LOSSES[advantage])
    m = result.metrics
    assert m["eval_checker_accuracy"] > m["eval_checker_accuracy_before"], (advantage, m)
    assert 0 < m["eval_greedy_logratio"] < 5, m  # beta > 0 loads the reference
    if "stage.ratio_level=sequence" in LOSSES[advantage]:
        from align.run.handoff import read_history

        # GSPO's 3e-4 / 4e-4 clip whole answers in pass two (pass one's ratios are 1: nothing clipped there), less
        # as the learning rate decays; measured 0.48-0.60 over the first steps, 0 at the last
        clipped = [h["policy/clipfrac"] for h in read_history(result.out)]
        assert 0.2 < max(clipped[:10]) < 1 and clipped[-1] < max(clipped[:10]), clipped


def test_python_reward_from_the_working_directory(sft_run, tmp_path, monkeypatch):
    """reward=python reward.fn=my_rewards:score, with the rows' own fields; errors skipped and counted."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "my_rewards.py").write_text(
        "def score(prompts, completions, reference, bonus):\n"
        "    if any('cat' in p for p in prompts):\n        raise ValueError('no cats')\n"
        "    return [float(c.strip() == r.strip()) + b for c, r, b in zip(completions, reference, bonus)]\n")
    rows = [{"messages": [{"role": "user", "content": f"Repeat: {w}"}, {"role": "assistant", "content": w}],
             "bonus": 0.0} for w in ("cat", "dog", "sun", "map", "pen", "cup", "hat", "box")] * 4
    data = write_jsonl(tmp_path / "repeat.jsonl", rows)
    result = run_stage("grpo", sft_run, *GRPO, "train.max_steps=3", "reward=python", "reward.fn=my_rewards:score",
                       f"data.train={data}", "data.checker=exact", "stage.eval_prompts=0", "run.name=py",
                       f"stage.init={sft_run / 'demo' / 'sft'}", "data.on_error=skip")
    m = result.metrics
    assert "reward/python" in m and "reward/checker" in m
    # every answer to a "cat" prompt fails (one by one, after the batch failed): whole groups of 8, left out
    assert m["reward_errors"] > 0 and m["reward_errors"] % 8 == 0, m


def test_a_non_finite_micro_batch_still_counts_as_a_micro_step(sft_run, monkeypatch):
    """grad_accum 2 over 4 micro-batches a step: the first micro-batch of each step has a non-finite loss. It is
    skipped and counted, and still takes its place in the accumulation window (as a left-out zero-variance one
    does), so every optimizer step stays within one rollout: 2 steps x 4 micro-steps, 2 skipped."""
    from align.rl.engine import Trainable
    from align.stages import grpo

    calls, steps, real = {"n": 0}, {"n": 0}, grpo.clipped_surrogate

    def nan_first_of_each_step(*args, **kwargs):
        loss, stats = real(*args, **kwargs)
        calls["n"] += 1
        return (loss * float("nan") if calls["n"] % 4 == 1 else loss), stats

    real_step = Trainable.step

    def counted(self):
        steps["n"] += 1
        return real_step(self)

    monkeypatch.setattr(grpo, "clipped_surrogate", nan_first_of_each_step)
    monkeypatch.setattr(Trainable, "step", counted)
    result = run_stage("grpo", sft_run, *GRPO, "train.max_steps=2", "train.grad_accum=2", "stage.eval_prompts=0",
                       "stage.drop_zero_variance=false", "run.name=nan", f"stage.init={sft_run / 'demo' / 'sft'}")
    assert result.metrics["nonfinite_updates_skipped"] == 2
    assert steps["n"] == 8  # was 6: each skipped one shifted every later window by a micro-batch


def test_lora_grpo_reference_is_the_policy_without_its_adapter(sft_run):
    result = run_stage("grpo", sft_run, *GRPO, "train.max_steps=3", "peft=lora", "stage.beta=0.1", "run.name=lora",
                       f"stage.init={sft_run / 'demo' / 'sft'}", "train.lr=1e-3")
    m = result.metrics
    assert m["eval_greedy_logratio_before"] == pytest.approx(0.0, abs=1e-6)  # adapter B = 0: policy == reference
    # after training the adapter-off reference differs from the policy (true of any reference before training)
    assert m["eval_greedy_logratio"] > 1e-3, m
    assert (result.out / "model" / "adapter_config.json").is_file()


def whole_and_resumed(sft_run, tmp_path, monkeypatch, keys) -> tuple:
    """The same GRPO run twice from copies of `sft_run`'s SFT: whole, and stopped by SIGTERM after step 3 and
    then re-run (resumed)."""
    import shutil

    for name in ("a", "b"):
        shutil.copytree(sft_run / "demo" / "sft", tmp_path / name / "demo" / "sft")
    whole = run_stage("grpo", tmp_path / "a", *keys)
    return whole, preempted_then_resumed(monkeypatch, lambda: run_stage("grpo", tmp_path / "b", *keys))


def preempted_then_resumed(monkeypatch, run):
    """run() stopped by SIGTERM after GRPO's step 3, then run() again (it resumes): the second result."""
    import signal

    from align.run.preemption import Preempted
    from align.stages import grpo

    original, calls = grpo.GRPOLoop.step, {"n": 0}

    def step(self, prompts):
        out = original(self, prompts)
        calls["n"] += 1
        if calls["n"] == 3:
            os.kill(os.getpid(), signal.SIGTERM)
        return out

    with monkeypatch.context() as m:
        m.setattr(grpo.GRPOLoop, "step", step)
        with pytest.raises(Preempted, match=r"grpo: stopped by SIGTERM at step 3"):
            run()
    return run()


def test_grpo_preempted_then_resumed_ends_with_the_uninterrupted_weights(sft_run, tmp_path, monkeypatch):
    from safetensors.torch import load_file

    from align.run.handoff import read_history

    # with dynamic sampling, which draws more prompts within a step: the resumed run draws the same ones
    keys = [*GRPO, "train.max_steps=5", "stage.eval_prompts=8", "stage.ppo_epochs=2", "stage.beta=0.05",
            "stage.dynamic_sampling=2"]
    whole, resumed = whole_and_resumed(sft_run, tmp_path, monkeypatch, keys)
    history = read_history(resumed.out)
    assert [h["step"] for h in history] == [1, 2, 3, 4, 5]
    assert max(h["sampling/rounds"] for h in history[3:]) > 1  # a step after the resume drew more prompts
    a, b = (load_file(str(r.out / "model" / "model.safetensors")) for r in (whole, resumed))
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=0, atol=1e-6)
    assert resumed.metrics["eval_checker_accuracy"] == whole.metrics["eval_checker_accuracy"]


def test_overoptimisation_warning_reaches_the_console_and_stage_json(sft_run, monkeypatch, caplog):
    """The watch's rule is tested by hand (test_grpo_math); here its wiring: a learned reward that rises while
    the rollouts' checker accuracy falls (injected into each step's statistics) is warned about once."""
    import logging

    from align.stages import grpo

    original, calls = grpo.GRPOLoop.step, {"n": 0}

    def step(self, prompts):
        out = original(self, prompts)
        calls["n"] += 1
        return {**out, "reward/rm": 0.1 * calls["n"], "reward/checker": 1.0 - 0.05 * calls["n"]}

    monkeypatch.setattr(grpo.GRPOLoop, "step", step)
    with caplog.at_level(logging.WARNING, logger="align"):
        result = run_stage("grpo", sft_run, *GRPO, "train.max_steps=6", "stage.watch_window=3", "run.name=watch",
                           f"stage.init={sft_run / 'demo' / 'sft'}", "stage.eval_prompts=0")
    warnings = json.loads((result.out / "stage.json").read_text())["warnings"]
    assert [(w["kind"], w["step"]) for w in warnings] == [("over_optimisation", 6)]
    assert "rose by 0.300" in warnings[0]["message"] and "fell by 0.150" in warnings[0]["message"]
    assert "over-optimisation" in caplog.text


def test_dynamic_sampling_fills_each_step_with_groups_that_carry_signal(sft_run):
    """stage.dynamic_sampling: steps that sampled flat groups sample fresh prompts again, and the batch that trains
    holds more groups with signal than what was sampled (a group's rewards differ)."""
    from align.run.handoff import read_history

    result = run_stage("grpo", sft_run, *GRPO, "train.max_steps=8", "stage.eval_prompts=8", "run.name=dynamic",
                       f"stage.init={sft_run / 'demo' / 'sft'}", "stage.dynamic_sampling=3")
    history = read_history(result.out)
    rounds = [h["sampling/rounds"] for h in history]
    with_signal = sum(h["groups/with_signal"] for h in history) / len(history)
    sampled_signal = sum(1 - h["groups/zero_variance_share"] for h in history) / len(history)
    assert max(rounds) > 1 and max(rounds) <= 4, rounds
    # the rewards and the rate are over every answer sampled (8 prompts x 8 a round), not only those that trained
    assert [round(h["samples/s"] * h["time/step_s"]) for h in history] == [64 * r for r in rounds]
    assert with_signal > sampled_signal + 0.05 and with_signal > 0.9, (with_signal, sampled_signal)
    assert sum(h["groups/dropped"] for h in history) < sum(8 * h["groups/zero_variance_share"] for h in history)


def test_dynamic_sampling_replaces_failing_groups_and_keeps_solved_ones(sft_run):
    """stage.dynamic_sampling_replaces: with about half the prompts solved (every answer at the best reward there
    is) and the others' answers differing, DAPO's `flat` samples extra rounds on every step (no round holds 8 groups
    that differ), and `failing` none (every group is solved or differs). Flat groups below the best, which `failing`
    does sample again for, are the test above's."""
    from align.run.handoff import read_history

    keys = [*GRPO, "train.max_steps=4", "stage.eval_prompts=0", f"stage.init={sft_run / 'demo' / 'sft'}",
            "stage.dynamic_sampling=3", "reward=python", "reward.fn=tests.rewards_for_tests:half_solved"]
    histories = {how: read_history(run_stage("grpo", sft_run, *keys, f"run.name=replaces_{how}",
                                             f"stage.dynamic_sampling_replaces={how}").out)
                 for how in ("flat", "failing")}
    flat, failing = ([h["sampling/rounds"] for h in histories[k]] for k in ("flat", "failing"))
    assert min(flat) >= 2 and failing == [1, 1, 1, 1], (flat, failing)
    solved = [h["groups/solved_share"] for h in histories["failing"]]
    assert all(0.1 < s < 0.9 for s in solved) and 0.3 < sum(solved) / 4 < 0.7, solved
    assert [h["groups/with_signal"] for h in histories["failing"]] == [1 - s for s in solved]
    assert all(h["groups/solved_share"] == 0 for h in histories["flat"])


def test_dynamic_sampling_pays_no_round_in_a_run_never_rewarded_differently(sft_run):
    """stage.dynamic_sampling with `failing`: a run whose rewards are all alike cannot tell a solved group from a
    failing one, so it samples no extra round, where DAPO's `flat` pays its 4 every step (5x the generation, for
    groups as flat as the first)."""
    from align.run.handoff import read_history

    keys = [*GRPO, "train.max_steps=3", "stage.eval_prompts=0", f"stage.init={sft_run / 'demo' / 'sft'}",
            "stage.dynamic_sampling=4", "reward=python", "reward.fn=tests.rewards_for_tests:constant"]
    rounds = {how: [h["sampling/rounds"] for h in read_history(run_stage(
        "grpo", sft_run, *keys, f"run.name=never_{how}", f"stage.dynamic_sampling_replaces={how}").out)]
        for how in ("flat", "failing")}
    assert rounds == {"flat": [5, 5, 5], "failing": [1, 1, 1]}, rounds
