"""stage=iterative_dpo: pairs by hand; on the demo with LoRA over the SFT, two rounds whose pairs are on disk
(the checker's right answer chosen, fresh prompts each round), an output adapter chained through round 1 that plain
loading reproduces to the logit, and DPO moving each round's pairs apart; preempted in round 2 and resumed, the
same weights as an uninterrupted run without sampling again; a judge with no preference and vLLM refused with
their fix."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from conftest import compose
from test_kto import pair_margins

SMALL = ("stage.rounds=2", "stage.prompts_per_round=96", "stage.samples_per_prompt=4", "train.batch_size=16",
         "train.max_steps=8", "train.logging_steps=1", "train.save_steps=2", "stage.temperature=0.7")


def run_stage(name: str, runs, *overrides):
    import importlib

    return importlib.import_module(f"align.stages.{name}").run(compose(f"stage={name}", f"run.root={runs}", *overrides))


def test_best_against_worst_by_hand():
    from align.rl.judged_pairs import best_and_worst

    scores = torch.tensor([[0.0, 1.0, 0.5, 1.0],  # best: the first of the two 1.0s; worst: 0.0
                           [1.0, 1.0, 1.0, 1.0],  # a tie: no pair
                           [0.2, 9.0, 0.7, 0.1],  # 9.0 failed to judge: best 0.7, worst 0.1
                           [0.3, 5.0, 5.0, 5.0]])  # one valid answer: no pair
    valid = torch.tensor([[True] * 4, [True] * 4, [True, False, True, True], [True, False, False, False]])
    best, worst, keep = best_and_worst(scores, valid)
    assert keep.tolist() == [True, False, True, False]
    assert best[[0, 2]].tolist() == [1, 2] and worst[[0, 2]].tolist() == [0, 3]
    with pytest.raises(ValueError, match=r"\[prompts, answers\]"):
        best_and_worst(scores.flatten(), valid.flatten())


@pytest.fixture(scope="module")
def sft_parent(tmp_path_factory) -> Path:
    """The demo's SFT, short (a model that answers right part of the time): its runs folder."""
    runs = tmp_path_factory.mktemp("idpo_sft") / "runs"
    run_stage("sft", runs, "train.max_steps=500", "train.save_steps=10000")  # measured: greedy 0.36 right
    return runs


def runs_on(parent: Path, runs: Path) -> Path:
    """A runs folder whose demo run has the parent's SFT output (linked, as the stage cache links it)."""
    (runs / "demo").mkdir(parents=True)
    (runs / "demo" / "sft").symlink_to(parent / "demo" / "sft")
    return runs


@pytest.fixture(scope="module")
def lora_rounds(sft_parent, tmp_path_factory):
    runs = runs_on(sft_parent, tmp_path_factory.mktemp("idpo") / "runs")
    return runs, run_stage("iterative_dpo", runs, "peft=lora", "train.lr=3e-3", *SMALL)


def read_pairs(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_two_rounds_write_judged_pairs_and_chain_their_adapters(lora_rounds):
    from align.models.loading import adapter_base
    from align.tasks.checkers import demo

    runs, result = lora_rounds
    out = runs / "demo" / "iterative_dpo"
    record = json.loads((out / "stage.json").read_text())
    assert [r["round"] for r in record["rounds"]] == [1, 2]
    rounds = [read_pairs(out / "pairs" / f"round-{r}.jsonl") for r in (1, 2)]
    for r, pairs in enumerate(rounds, 1):
        assert len(pairs) == record["metrics"][f"round_{r}/pairs"] > 10
        assert len(pairs) + record["metrics"][f"round_{r}/tied_prompts"] == 96
        for p in pairs:  # the checker's right answer against a wrong one, and the ids are those texts
            assert p["chosen_score"] == 1.0 == demo(p["prompt"], p["chosen"], None)
            assert p["rejected_score"] == 0.0 == demo(p["prompt"], p["rejected"], None)
    assert not {p["where"] for p in rounds[0]} & {p["where"] for p in rounds[1]}  # fresh prompts each round
    logged = [json.loads(line) for line in (out / "history.jsonl").read_text().splitlines()]
    losses = [(h["round"], h["round_step"], h["step"]) for h in logged if "loss" in h]
    assert [s for _, _, s in losses] == list(range(1, 17))  # 8 steps a round, one axis across both rounds
    assert losses[8] == (2, 1, 9)
    # the output's adapter sits on round 1's, which sits on the SFT's
    round_1 = Path(adapter_base(out / "model"))
    assert round_1.parent.parent.parent == out / "rounds" and round_1.name == "model"
    assert Path(adapter_base(round_1)).resolve() == (runs / "demo" / "sft" / "model").resolve()


def test_the_chained_output_reloads_to_the_same_logits_and_each_round_moved_its_pairs(lora_rounds):
    from transformers import AutoModelForCausalLM

    from align.models.loading import adapter_base, load_merged

    runs, result = lora_rounds
    out = runs / "demo" / "iterative_dpo"
    reloaded = load_merged(AutoModelForCausalLM, str(out / "model")).eval()
    trained = result.model.eval()
    ids = torch.tensor([read_pairs(out / "pairs" / "round-2.jsonl")[0]["prompt_ids"]])
    with torch.no_grad():
        assert torch.allclose(reloaded(input_ids=ids).logits, trained(input_ids=ids).logits, atol=1e-5)
    sft = load_merged(AutoModelForCausalLM, str(runs / "demo" / "sft" / "model")).eval()
    round_1 = load_merged(AutoModelForCausalLM, adapter_base(out / "model")).eval()
    for before, after, r in ((sft, round_1, 1), (round_1, reloaded, 2)):
        pairs = read_pairs(out / "pairs" / f"round-{r}.jsonl")[:24]
        gain = (pair_margins(after, pairs) - pair_margins(before, pairs)).mean()
        assert gain > 0.5, (r, gain)  # nats; DPO's steps on that round's pairs pulled them apart


def test_preempted_in_round_two_resumes_there_without_sampling_again(sft_parent, tmp_path, monkeypatch, caplog):
    from align.run.preemption import Preempted

    keys = (*SMALL, "stage.prompts_per_round=48", "train.max_steps=4")
    whole_runs, cut_runs = runs_on(sft_parent, tmp_path / "a"), runs_on(sft_parent, tmp_path / "b")
    whole = run_stage("iterative_dpo", whole_runs, *keys)
    calls = {"n": 0}

    with monkeypatch.context() as m:
        from align.run import guards

        original = guards.StopOnSignal.on_step_end

        def second_round_step_3(self, args, state, control, **kwargs):  # SIGTERM at round 2's step 3
            calls["n"] += state.global_step == 3
            if calls["n"] == 2 and state.global_step == 3:
                import os
                import signal

                os.kill(os.getpid(), signal.SIGTERM)
            return original(self, args, state, control, **kwargs)

        m.setattr(guards.StopOnSignal, "on_step_end", second_round_step_3)
        with pytest.raises(Preempted, match="stopped by SIGTERM at step 3"):
            run_stage("iterative_dpo", cut_runs, *keys)
    out = cut_runs / "demo" / "iterative_dpo"
    assert not (out / "stage.json").exists()
    sampled = sorted(out.glob("rounds/*/round-*/pairs.jsonl"))
    stamps = [p.stat().st_mtime_ns for p in sampled]
    assert len(sampled) == 2
    with caplog.at_level("INFO", logger="align"):
        resumed = run_stage("iterative_dpo", cut_runs, *keys)
    assert "round 1: done before" in caplog.text and "round 2: " in caplog.text and "sampled before" in caplog.text
    assert "resuming from" in caplog.text and "checkpoint-3" in caplog.text
    assert [p.stat().st_mtime_ns for p in sampled] == stamps  # no round sampled twice
    for (name, a), b in zip(whole.model.state_dict().items(), resumed.model.state_dict().values(), strict=True):
        assert torch.allclose(a, b, atol=1e-6), name
    assert not list(out.glob("rounds/*/round-1/model"))  # full weights: nothing points at round 1's model now


def test_a_judge_without_preference_and_a_vllm_engine_are_refused_with_the_fix(tmp_path):
    from align.stages.iterative_dpo import checks

    cfg = compose("stage=iterative_dpo", f"run.root={tmp_path}", "rollout.engine=vllm")
    assert any("rollout.engine=hf" in p for p in checks(cfg))
    from align.rewards import RewardError

    with pytest.raises(RewardError, match=r"round 1: no pairs.*stage\.samples_per_prompt"):
        run_stage("iterative_dpo", tmp_path, "stage.init=base", "stage.rounds=1", "stage.prompts_per_round=8",
                  "reward=python", "reward.fn=rewards_for_tests:constant")
    assert not (tmp_path / "demo" / "iterative_dpo" / "stage.json").exists()


def test_a_round_without_pairs_ends_the_rounds_with_the_previous_rounds_model(tmp_path, monkeypatch):
    """A policy that answers every prompt alike (all right, typically) leaves nothing to prefer: round 1's model is
    the output, and the record says why."""
    from align.stages import iterative_dpo

    real = iterative_dpo._pairs_of_round

    def round_two_all_tied(cfg, folder, r, *args):
        judged = real(cfg, folder, r, *args)
        return iterative_dpo.Judged([], judged.answers, 1.0, len(args[1])) if r == 2 else judged

    monkeypatch.setattr(iterative_dpo, "_pairs_of_round", round_two_all_tied)
    result = run_stage("iterative_dpo", tmp_path, "stage.init=base", "stage.rounds=3", "stage.prompts_per_round=8",
                       "train.max_steps=2", "reward=python", "reward.fn=rewards_for_tests:length")
    record = json.loads((tmp_path / "demo" / "iterative_dpo" / "stage.json").read_text())
    assert [r["pairs"] > 0 for r in record["rounds"]] == [True, False]  # round 3 never ran
    assert result.metrics["rounds"] == 1 and result.metrics["round_2/pairs"] == 0
    assert result.metrics["global_step"] == 2 and (tmp_path / "demo" / "iterative_dpo" / "pairs" / "round-1.jsonl").is_file()
