"""Reference-free preference losses on stage=dpo (SimPO, ORPO): the loss functions against hand-computed values,
the stage's first loss against the same formula computed with plain transformers (no reference loaded), and on
the demo's pairs the held-out chosen answers move above the rejected ones, read back from disk."""

from __future__ import annotations

import json
import logging
import math

import pytest
import torch

from conftest import compose, write_jsonl


def dpo(runs, *overrides):
    from align.stages.dpo import run

    return run(compose("stage=dpo", f"run.root={runs}", "train.logging_steps=1", "train.save_steps=10000",
                       *overrides))


def test_losses_by_hand():
    from align.rl.reference_free import answer_logps, chosen_nll, log1mexp, orpo, orpo_log_odds, simpo

    # SimPO: -log sigmoid(2 * (-1 - -2) - 1) = log(1 + e^-1)
    assert simpo(torch.tensor([-1.0]), torch.tensor([-2.0]), 2.0, 1.0).item() == pytest.approx(
        math.log1p(math.exp(-1)), abs=1e-6)
    # ORPO: p = 1/2 (odds 1) against p = 1/4 (odds 1/3): log odds ratio log 3, term -0.1 log sigmoid(log 3)
    chosen, rejected = torch.tensor([math.log(0.5)]), torch.tensor([math.log(0.25)])
    assert orpo_log_odds(chosen, rejected).item() == pytest.approx(math.log(3), abs=1e-6)
    assert orpo(chosen, rejected, 0.1).item() == pytest.approx(0.1 * math.log(4 / 3), abs=1e-6)
    # log(1 - e^x): near 0 and far below it
    assert log1mexp(torch.tensor(-1e-3, dtype=torch.float64)).item() == pytest.approx(math.log(-math.expm1(-1e-3)))
    assert log1mexp(torch.tensor(-30.0, dtype=torch.float64)).item() == pytest.approx(-math.exp(-30), rel=1e-6)
    assert torch.isfinite(log1mexp(torch.tensor(0.0)))  # probability 1: clamped, not -inf
    # answers: rows 0-1 chosen, 2-3 rejected; padding (mask 0) never counts
    logps = torch.tensor([[-1.0, -2.0, -9.0], [-3.0, -9.0, -9.0], [-1.0, -1.0, -1.0], [-4.0, -9.0, -9.0]])
    mask = torch.tensor([[1, 1, 0], [1, 0, 0], [1, 1, 1], [1, 0, 0]])
    summed, mean = answer_logps(logps, mask)
    assert summed.tolist() == [-3.0, -3.0, -3.0, -4.0] and mean.tolist() == [-1.5, -3.0, -1.0, -4.0]
    assert chosen_nll(logps, mask).item() == pytest.approx(2.0)  # (1 + 2 + 3) / 3 chosen tokens


def plain_answer_logps(model, rows) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per pair: mean token log-prob of chosen and of rejected, and the chosen answer's (summed, token count)."""
    def logps(prompt, answer):
        ids = torch.tensor([prompt + answer])
        out = torch.log_softmax(model(input_ids=ids).logits[0, :-1].float(), -1)
        return out[len(prompt) - 1:].gather(-1, ids[0, len(prompt):, None])[:, 0]

    with torch.no_grad():
        chosen = [logps(r["prompt_ids"], r["chosen_ids"]) for r in rows]
        rejected = [logps(r["prompt_ids"], r["rejected_ids"]) for r in rows]
    mean = lambda xs: torch.stack([x.mean() for x in xs])  # noqa: E731
    return mean(chosen), mean(rejected), torch.stack([torch.stack([c.sum(), torch.tensor(len(c))]) for c in chosen])


@pytest.fixture(scope="module")
def eight_pairs(tmp_path_factory):
    words = ["cat", "dog", "cow", "pig", "hen", "owl", "emu", "yak"]
    rows = [{"prompt": f"Spell {w}.", "chosen": " ".join(w), "rejected": " ".join(w[:2])} for w in words]
    return write_jsonl(tmp_path_factory.mktemp("pairs") / "pairs.jsonl", rows)


@pytest.fixture(scope="module")
def family_models(tmp_path_factory):
    """Fixtures shaped like Llama 3 (BOS, pad = EOS, <|eot_id|>) and Qwen (ChatML, no BOS): tests/families.py."""
    from families import build

    root = tmp_path_factory.mktemp("ref-free-families")
    return {f: str(build(f, root / f)) for f in ("llama3", "chatml")}


@pytest.mark.parametrize("model", ["builtin:tiny", "llama3", "chatml"])
@pytest.mark.parametrize("loss", ["simpo", "orpo"])
def test_first_loss_is_the_formula_on_the_starting_model(tmp_path, eight_pairs, family_models, loss, model, caplog):
    """One batch holds all eight pairs (the mean does not depend on their order): the stage's first loss is the
    formula on the base model's log-probs, computed here with plain transformers, on the tiny model and on
    real-family fixtures (their BOS, chat template and end-of-turn token in the encoded pairs). Nothing is loaded
    as a reference."""
    from transformers import AutoModelForCausalLM

    from align.data.loader import dpo_datasets
    from align.models.loading import load_tokenizer, resolve_name

    overrides = (f"stage.loss_type={loss}", f"data.train={eight_pairs}", "data.eval=null", "train.batch_size=8",
                 "train.max_steps=1", f"model.name_or_path={family_models.get(model, model)}")
    with caplog.at_level(logging.INFO, logger="align"):
        result = dpo(tmp_path / "runs", *overrides)
    assert "no reference (the loss needs none)" in caplog.text
    cfg = compose("stage=dpo", *overrides)
    name = resolve_name(cfg.model.name_or_path)
    rows, _, _ = dpo_datasets(cfg.data, load_tokenizer(name, cfg.model), 2048, cfg.train.seed)
    assert len(rows) == 8
    chosen, rejected, (sums_counts) = plain_answer_logps(AutoModelForCausalLM.from_pretrained(name).eval(), rows)
    if loss == "simpo":  # beta 2.0, gamma 1.0 (the defaults)
        expected = -torch.nn.functional.logsigmoid(2.0 * (chosen - rejected) - 1.0).mean()
    else:  # NLL over every chosen token + 0.1 x the odds-ratio term
        nll = -sums_counts[:, 0].sum() / sums_counts[:, 1].sum()
        odds = (chosen - rejected) - (torch.log(-torch.expm1(chosen)) - torch.log(-torch.expm1(rejected)))
        expected = nll - 0.1 * torch.nn.functional.logsigmoid(odds).mean()
    assert result.metrics["first_loss"] == pytest.approx(expected.item(), abs=1e-4)
    assert result.metrics["beta"] == {"simpo": 2.0, "orpo": 0.1}[loss]


def test_mixing_a_reference_free_loss_with_a_reference_loss_is_refused_before_loading():
    from align.config import rules

    with pytest.raises(rules.Unsupported) as error:
        rules.check(compose("stage=dpo", "stage.loss_type=[simpo,sigmoid]"))
    assert "simpo score answers without a reference and combine only with sft" in str(error.value)
    assert "stage.loss_type=[simpo,sft]" in str(error.value)
    assert rules.problems(compose("stage=dpo", "stage.loss_type=[simpo,sft]")) == []
    assert rules.problems(compose("stage=dpo", "stage.loss_type=orpo", "deepspeed=zero3", "peft=lora")) == []


def held_out_margins(model, rows) -> torch.Tensor:
    chosen, rejected, _ = plain_answer_logps(model, rows)
    return chosen - rejected


@pytest.mark.parametrize("loss,peft", [("[simpo,sft]", "none"), ("orpo", "lora")])
def test_on_the_demo_pairs_held_out_chosen_answers_rise_above_rejected(tmp_path, loss, peft, caplog):
    """From the raw tiny model (ORPO needs no SFT first; SimPO with its NLL term runs the same way here): the
    held-out pairs' mean token log-prob margin, read back from the saved output by plain transformers, grows, with
    no displacement warning; LoRA's adapter (ORPO) reloads onto its base."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from align.data.loader import dpo_datasets
    from align.models.loading import load_merged, resolve_name

    result = dpo(tmp_path / "runs", f"stage.loss_type={loss}", f"peft={peft}", "train.max_steps=100",
                 "train.batch_size=16", "train.lr=3e-3")
    name = resolve_name("builtin:tiny")
    cfg = compose("stage=dpo")
    _, held_out, _ = dpo_datasets(cfg.data, AutoTokenizer.from_pretrained(name), 2048, cfg.train.seed)
    rows = held_out.select(range(64))
    before = held_out_margins(AutoModelForCausalLM.from_pretrained(name).eval(), rows)
    after = held_out_margins(load_merged(AutoModelForCausalLM, str(result.out / "model")).eval(), rows)
    gain = after - before  # measured: [simpo,sft] 0.025 -> 1.012 nats per token (median gain 0.072); orpo with
    # LoRA 0.025 -> 0.098 (median 0.020): ORPO's odds-ratio term has weight 0.1 beside its NLL
    assert gain.mean() > 0.05 and gain.median() > 0, (before.mean(), after.mean(), gain.median())
    m = result.metrics
    assert m["eval_accuracy"] > 0.6 and m["eval_margin"] > 0 and m["last_loss"] < m["first_loss"], m
    record = json.loads((result.out / "stage.json").read_text())
    assert record["adapter"] is (peft == "lora") and record["warnings"] == []


def test_without_a_reference_the_guard_compares_the_last_logged_steps_with_the_first():
    """The displacement guard of a reference-free loss: the chosen answers' log-prob, a mean over up to 10 logged
    batches at the end against the first 10 (one batch differs from the next by a nat or two)."""
    from types import SimpleNamespace

    from align.stages.displacement import DisplacementWatch

    state = SimpleNamespace(global_step=0, is_world_process_zero=True)
    watch = DisplacementWatch(2.0, 2.0, reference=False)
    noise = [0.8, -0.8] * 10  # batch to batch
    for step, logp in enumerate([-20.0 + n for n in noise] + [-21.0 + n for n in noise]):  # 1 nat down: no warning
        state.global_step = step + 1
        watch.on_log(None, state, None, {"logps/chosen": logp, "rewards/margins": 0.1 * step, "rewards/chosen": 0})
    assert watch.warnings == [] and watch.metrics()["train_chosen_logp_change"] == pytest.approx(-1.0)
    for logp in [-24.0 + n for n in noise]:  # 4 nats below the first ten while the margin grew
        state.global_step += 1
        watch.on_log(None, state, None, {"logps/chosen": logp, "rewards/margins": 5.0, "rewards/chosen": 0})
    assert [w["kind"] for w in watch.warnings] == ["likelihood_displacement"]
    message = watch.warnings[0]["message"]
    assert "below the first logged steps'" in message and "[simpo,sft] for SimPO" in message
    assert watch.metrics()["train_chosen_logp_change"] == pytest.approx(-4.0)
